"""A model from an architecture and a weights source, ready to predict: :func:`load_model`.

What tools/test.py, tools/inference.py and Python callers load. A weights source is None (or
"none" or "published": MegEngine's published weights for the architecture), or a path or URL of
an official bare state dict, an official train.py checkpoint (``{"state_dict": ...}``) or an
engine checkpoint, which also records its architecture, the class list and the run's config
(and, for a run with an EMA, the averaged weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from engine import checkpoint
from engine.cli import DEFAULT_ARCH
from engine.errors import ConfigError, UserError
from engine.imagenet_classes import imagenet_wnids
from engine.models import hub, weights
from engine.models.resnet import ResNet, get_model

__all__ = ["DEFAULT_ARCH", "LoadedModel", "load_model"]


@dataclass
class LoadedModel:
    """A model built by :func:`load_model`, with what its weights file said about it."""

    model: ResNet                   # in eval mode (call .train() to fine-tune)
    arch: str
    num_classes: int
    classes: Optional[List[str]]    # WNIDs in label order when known
    source: str                     # what was loaded, for messages
    image_size: int = 224           # the crop size it was trained at (engine checkpoints)
    kind: str = hub.PUBLISHED       # "published", "engine", or the file's format (unwrap's kind)
    config: Dict[str, Any] = field(default_factory=dict)  # an engine checkpoint's run config


def load_model(arch: Optional[str], source: Optional[str] = None, *,
               trusted: Optional[bool] = None, ema: bool = False) -> LoadedModel:
    """Build ``arch`` with the weights of ``source``, sized to them, in eval mode.

    ``arch`` None means the architecture an engine checkpoint records, else
    :data:`DEFAULT_ARCH`; ``ema`` loads an engine checkpoint's moving average of the weights
    (a run with --ema-decay) instead of its live weights.

    ``source`` None, "none" or "published" means MegEngine's published weights; otherwise a path
    or URL (fetched once per node, see :func:`engine.models.hub.fetch`) of any format
    :func:`engine.models.weights.unwrap` knows, unpickled with the allow-list unless ``trusted``
    (None = $ENGINE_TRUST_PICKLE). The class count comes from the file's ``fc.weight``; the
    classes from an engine checkpoint's record, else the ImageNet WNIDs for 1000 outputs.
    An unknown architecture, an engine checkpoint of another one, a file without ``fc.weight``
    or weights that do not fit raise one-line UserErrors that name both sides.
    """
    if source is None or source.strip().lower() in ("none", hub.PUBLISHED):
        arch = arch or DEFAULT_ARCH
        if ema:
            raise weights.WeightsError("--ema: the published %s weights have no moving average; "
                                       "pass --model with an engine checkpoint of a run with "
                                       "--ema-decay" % arch)
        model = _build(arch, pretrained=True)
        loaded = LoadedModel(model, arch, int(model.fc.weight.shape[0]), None,
                             "published %s weights" % arch)
    else:
        loaded = _from_file(arch, source, trusted, ema)
    if loaded.config.get("classes"):
        loaded.classes = list(loaded.config["classes"])
        if len(loaded.classes) != loaded.num_classes:
            raise UserError("%s is inconsistent: it lists %d classes but fc has %d outputs"
                            % (source, len(loaded.classes), loaded.num_classes))
    elif loaded.num_classes == 1000:
        loaded.classes = imagenet_wnids()  # official weights: labels are the sorted ImageNet WNIDs
    loaded.model.eval()
    return loaded


def _from_file(arch: Optional[str], source: str, trusted: Optional[bool],
               ema: bool = False) -> LoadedModel:
    obj = weights.read(source, trusted=trusted)
    found = weights.unwrap(obj)
    config = checkpoint.config_of(obj)
    saved_arch = (config or {}).get("arch")
    if arch and saved_arch and saved_arch != arch:
        raise weights.WeightsError("%s is a %s checkpoint but --arch is %s: leave --arch out (the "
                                   "checkpoint names its architecture) or pass --arch %s"
                                   % (source, saved_arch, arch, saved_arch))
    arch = arch or saved_arch or DEFAULT_ARCH
    if ema:
        if config is None:
            raise weights.WeightsError("--ema: %s is not an engine checkpoint; only those hold a "
                                       "moving average of the weights" % source)
        averaged = checkpoint.ema_weights_of(obj)
        if averaged is None:
            raise weights.WeightsError("--ema: %s holds no moving average of the weights (its run "
                                       "had no --ema-decay); evaluate it without --ema" % source)
        found = weights.Unwrapped(averaged, found.kind)
    fc = found.state.get("fc.weight")
    if fc is None:
        raise weights.WeightsError("%s has no fc.weight: not a ResNet state dict or checkpoint "
                                   "(keys start with %s)" % (source, ", ".join(list(found.state)[:3])))
    if len(getattr(fc, "shape", ())) != 2:
        raise weights.WeightsError("%s: fc.weight is not a 2-D array (got %s): not a ResNet state "
                                   "dict or checkpoint" % (source, type(fc).__name__))
    num_classes = int(fc.shape[0])
    model = _build(arch, num_classes=num_classes)
    weights.load_weights(model, found.state, strict=True, source=source)
    return LoadedModel(model, arch, num_classes, None, source,
                       int((config or {}).get("image_size") or 224),
                       "engine" if config is not None else found.kind, config or {})


def _build(arch: str, **kwargs: Any) -> ResNet:
    """get_model, with its ValueErrors (an unknown architecture, no published weights for it)
    as UserErrors: here the architecture comes from a flag."""
    try:
        return get_model(arch, **kwargs)
    except UserError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
