"""Image classification models whose parameters match MegEngine's official weight files.

* ``specs``: the architectures as data (:data:`ARCHS`, the one list of their names) and the
  input normalization the weights expect (:data:`MEAN_BGR`, :data:`STD_BGR`);
* ``resnet``: the networks, :func:`get_model` and one constructor per architecture;
* ``hub``: fetching published weights and URLs (names, cache, one download per node, sha256);
* ``weights``: reading weights (safe unpickling, unwrapping the file formats, loading with
  named mismatches);
* ``load``: :func:`load_model`, an architecture and a weights source -> :class:`LoadedModel`.
"""
from . import resnet
from .hub import (
    PRETRAINED_FILES,
    PUBLISHED,
    WeightsError,
    fetch,
    prefetch_weights,
    pretrained_cache_path,
    pretrained_url,
)
from .load import LoadedModel, load_model
from .resnet import *  # noqa: F401,F403  (the networks, get_model, one constructor per arch)
from .specs import ARCHS, MEAN_BGR, SPECS, STD_BGR
from .weights import (
    SAFE_GLOBALS,
    TRUST_PICKLE_ENV,
    LoadResult,
    UnsafePickleError,
    WeightsMismatchError,
    load_weights,
    unwrap,
)

__all__ = [
    "ARCHS",
    "MEAN_BGR",
    "PRETRAINED_FILES",
    "PUBLISHED",
    "SAFE_GLOBALS",
    "SPECS",
    "STD_BGR",
    "TRUST_PICKLE_ENV",
    "LoadResult",
    "LoadedModel",
    "UnsafePickleError",
    "WeightsError",
    "WeightsMismatchError",
    "fetch",
    "load_model",
    "load_weights",
    "prefetch_weights",
    "pretrained_cache_path",
    "pretrained_url",
    "unwrap",
] + resnet.__all__
