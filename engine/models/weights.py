"""Reading weights: a weights file or checkpoint into a model, safely, with named mismatches.

Three steps, each a section below:

* **read** (:func:`unpickle`, :func:`read_file`, :func:`read`): unpickle a local file, or a URL
  fetched by :mod:`engine.models.hub`, *safely* (below);
* **unwrap** (:func:`unwrap`): find the state dict in an official bare weight file, an official
  train.py checkpoint or an engine checkpoint (both ``{"state_dict": ...}``) or a
  ``{"model": ...}`` wrapper;
* **load** (:func:`load_weights`, :func:`load_pretrained`): check every key and shape against the
  model first and name what does not fit, then copy.

Weight files and checkpoints are pickles, and unpickling runs whatever callables the file
names, so a file from a URL could run any code. :func:`unpickle` therefore admits only the
globals that weight files and engine checkpoints are made of (:data:`SAFE_GLOBALS`: containers,
numbers, strings, numpy arrays and scalars, MegEngine tensors) and refuses anything else with an
:class:`UnsafePickleError` that names the global. Files one trusts completely can be read as plain
pickles with ``trusted=True`` or ``ENGINE_TRUST_PICKLE=1``.
"""
from __future__ import annotations

import _compat_pickle
import os
import pickle
from typing import IO, Any, Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from engine.errors import UserError, read_error_message
from engine.models import hub
from engine.models.hub import WeightsError

__all__ = [
    "SAFE_GLOBALS",
    "TRUST_PICKLE_ENV",
    "LoadResult",
    "UnsafePickleError",
    "Unwrapped",
    "WeightsError",
    "WeightsMismatchError",
    "load_pretrained",
    "load_weights",
    "read",
    "read_file",
    "unpickle",
    "unwrap",
]


class UnsafePickleError(WeightsError, pickle.UnpicklingError):
    """A weight file or checkpoint names a global outside :data:`SAFE_GLOBALS`: it was not loaded.

    Also a ``pickle.UnpicklingError``, so code that handles unreadable pickles handles it too."""


class WeightsMismatchError(UserError, ValueError):
    """Weights whose keys or shapes do not fit the model; the message names them and the likely
    cause. A ValueError because ``load_weights`` has always raised that."""


# --------------------------------------------------------------------------------------------
# Read: safe unpickling
# --------------------------------------------------------------------------------------------

#: Set to 1 to unpickle weight files and checkpoints without the allow-list (trusted files only).
TRUST_PICKLE_ENV = "ENGINE_TRUST_PICKLE"

_NUMPY_CORE = ("numpy.core", "numpy._core")  # numpy 1.x and 2.x spell their internals apart

#: The globals a weight file or engine checkpoint may name, as (module, name). Found by recording
#: the ``find_class`` calls while loading megengine.save'd state dicts (numpy values, and Tensors
#: and Parameters with ``keep_var=True``), optimizer and GradScaler states, official train.py
#: checkpoints and engine checkpoints (highest protocol), and plain pickles of protocols 0 to 5.
#: Each of these only builds data; none can call into the rest of the system.
SAFE_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset(
    [("builtins", n) for n in ("set", "frozenset", "complex", "bytes", "bytearray")]
    + [
        ("collections", "OrderedDict"),  # Module.state_dict()
        ("_codecs", "encode"),  # bytes in protocols 0-2 (numpy's raw array data)
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    ]
    + [(core + ".multiarray", "_reconstruct") for core in _NUMPY_CORE]  # arrays, protocols < 5
    + [(core + ".multiarray", "scalar") for core in _NUMPY_CORE]  # numpy scalars (np.float32(1))
    + [(core + ".numeric", "_frombuffer") for core in _NUMPY_CORE]  # arrays, protocol 5
    + [
        # Tensor.__getnewargs__ is (numpy value, dtype, device name): rebuilt by Tensor.__new__,
        # which also applies megengine.load's map_location (Tensor.dmap_callback) when one is set.
        ("megengine.tensor", "Tensor"),
        ("megengine.tensor", "Parameter"),
    ]
)


def _trust_from_env() -> bool:
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


class _SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only :data:`SAFE_GLOBALS` (every global, REDUCE and NEWOBJ
    target and copyreg extension code passes through ``find_class``)."""

    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 write Python 2 names (__builtin__.set); check what they stand for.
        key = (module, name)
        if key in _compat_pickle.NAME_MAPPING:
            key = _compat_pickle.NAME_MAPPING[key]
        elif module in _compat_pickle.IMPORT_MAPPING:
            key = (_compat_pickle.IMPORT_MAPPING[module], name)
        if key not in SAFE_GLOBALS:
            raise UnsafePickleError(
                "refusing to load %s: it names %s.%s, which no weight file or checkpoint holds "
                "(allowed: containers, numbers, strings, numpy arrays, MegEngine tensors), and "
                "unpickling it could run arbitrary code; if you trust this file, pass "
                "--trust-pickle to the tool (or set %s=1, or trusted=True from Python)"
                % (self._source, module, name, TRUST_PICKLE_ENV)
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing to load %s: it uses persistent ids, which no weight file "
                                "or checkpoint holds" % self._source)


def unpickle(path: str, *, trusted: Optional[bool] = None) -> Any:
    """Unpickle ``path`` with the :data:`SAFE_GLOBALS` allow-list; what ``megengine.load`` returns.

    numpy values stay numpy and MegEngine Tensors/Parameters come back as Tensors/Parameters on
    the device they name, as with ``megengine.load(path)``. ``trusted`` None means
    ``$ENGINE_TRUST_PICKLE``; True reads the file as a plain pickle. Raises UnsafePickleError
    (naming the global) for a file outside the allow-list; other read errors propagate.
    """
    if trusted is None:
        trusted = _trust_from_env()
    with open(path, "rb") as f:
        if trusted:
            return pickle.Unpickler(f).load()
        return _SafeUnpickler(f, path).load()


def read_file(path: str, *, trusted: Optional[bool] = None, what: str = "checkpoint") -> Dict[str, Any]:
    """A local weight file or checkpoint as a dict; every problem is a one-line WeightsError
    (``what`` names the file's role in the messages: "checkpoint", "weights file", ...)."""
    if not os.path.exists(path):
        raise WeightsError("%s not found: %s" % (what, path))
    if os.path.isdir(path):
        raise WeightsError("%s is a folder; pass a %s (or use resume=<save dir>)" % (path, what))
    try:
        obj = unpickle(path, trusted=trusted)
    except UnsafePickleError:
        raise
    except OSError as exc:  # permissions, a stale mount: the bytes may be fine
        raise WeightsError(read_error_message(exc, path)) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise WeightsError(
            "cannot read %s %s (%s: %s): it is truncated or not a MegEngine/pickle file"
            % (what, path, type(exc).__name__, " ".join(str(exc).split()))
        ) from None
    if not isinstance(obj, Mapping):
        raise WeightsError("%s holds a %s, not a state dict or checkpoint" % (path, type(obj).__name__))
    return dict(obj)


def read(source: str, *, trusted: Optional[bool] = None) -> Dict[str, Any]:
    """A weights source as a dict: a local file, or a URL fetched once per node into the cache
    (see :func:`engine.models.hub.fetch`), read with :func:`read_file`."""
    return read_file(hub.fetch(source) if hub.is_url(source) else source, trusted=trusted)


# --------------------------------------------------------------------------------------------
# Unwrap: the state dict inside each supported format
# --------------------------------------------------------------------------------------------


class Unwrapped(NamedTuple):
    """The state dict of a weights object and where it came from."""

    state: Mapping[str, Any]
    kind: str  # "bare" (published files), "official-train" ({"state_dict": ...}) or "wrapped"


def unwrap(obj: Any) -> Unwrapped:
    """Find the state dict: official weight files are bare dicts, official train.py checkpoints
    hold it under ``"state_dict"`` (as engine checkpoints do), other wrappers under ``"model"``."""
    if not isinstance(obj, Mapping):
        raise TypeError(
            "expected a state dict (name -> array) or a checkpoint dict with a 'state_dict' or "
            "'model' entry, got %s" % type(obj).__name__
        )
    if isinstance(obj.get("state_dict"), Mapping):
        return Unwrapped(obj["state_dict"], "official-train")
    if isinstance(obj.get("model"), Mapping):
        return Unwrapped(obj["model"], "wrapped")
    return Unwrapped(obj, "bare")


# --------------------------------------------------------------------------------------------
# Load: validate everything, name what does not fit, then copy
# --------------------------------------------------------------------------------------------


class LoadResult(NamedTuple):
    """What :func:`load_weights` skipped (all empty after a strict load)."""

    missing: List[str]
    unexpected: List[str]
    mismatched: List[str]


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "numpy"):  # a MegEngine Tensor (or anything array-like that can say so)
        return np.asarray(value.numpy())
    return np.asarray(value)


def load_weights(model: Any, state: Any, strict: bool = True, source: Optional[str] = None) -> LoadResult:
    """Load official ``.pkl`` weights or a checkpoint into ``model`` and explain any mismatch.

    ``state`` is anything :func:`unwrap` accepts. Everything is validated before anything is
    copied, so a failed load leaves the model untouched (MegEngine's own ``load_state_dict``
    stops half-way). Values are cast to the model's dtypes, because MegEngine would otherwise
    silently adopt the file's dtype (e.g. float16) for the parameter. BN tensors stored as
    ``(1, C, 1, 1)`` by old MegEngine versions are accepted.

    With ``strict=False`` missing, unexpected and shape-mismatched entries are skipped (e.g. to
    fine-tune with a new ``fc``) and returned; with ``strict=True`` they raise
    WeightsMismatchError (a ValueError) naming them and the likely cause, on one line.
    """
    given = {k: _to_numpy(v) for k, v in unwrap(state).state.items()}
    expected = dict(model.state_dict(keep_var=True))
    exp_shapes = {k: tuple(int(d) for d in v.shape) for k, v in expected.items()}
    got_shapes = {k: tuple(v.shape) for k, v in given.items()}

    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    mismatched = []
    to_load: Dict[str, np.ndarray] = {}
    for k, var in expected.items():
        if k not in given:
            continue
        arr, want = given[k], exp_shapes[k]
        if arr.shape != want:
            # Old MegEngine kept BN tensors as (1, C, 1, 1); any 1-D entry of equal size is fine.
            if len(want) == 1 and arr.size == want[0]:
                arr = arr.reshape(want)
            else:
                mismatched.append(k)
                continue
        to_load[k] = arr.astype(np.dtype(var.dtype), copy=False)

    if strict and (missing or unexpected or mismatched):
        raise WeightsMismatchError(_explain(source, exp_shapes, got_shapes, missing, unexpected, mismatched))

    model.load_state_dict(to_load, strict=not (missing or mismatched))
    return LoadResult(missing, unexpected, mismatched)


def _describe(shapes: Mapping[str, Tuple[int, ...]]) -> str:
    """Which architecture a key->shape table is, to tell the user what a checkpoint holds."""
    from engine.models.specs import SPECS

    counts = []
    for i in range(1, 5):
        prefix = "layer%d." % i
        blocks = {k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix)}
        counts.append(len(blocks))
    if "layer1.0.conv3.weight" in shapes:
        block = "Bottleneck"
    elif "layer1.0.conv1.weight" in shapes:
        block = "BasicBlock"
    else:
        return "not a ResNet state dict (no layer1.0.conv1.weight)"
    conv2 = tuple(shapes.get("layer1.0.conv2.weight", ()))
    groups, width = 1, 64
    if len(conv2) == 5:  # grouped: (G, O/G, I/G, kh, kw); layer1 width = base_width * groups
        groups, width = conv2[0], conv2[1]
    elif len(conv2) == 4 and block == "Bottleneck":
        width = conv2[0]
    fc = tuple(shapes.get("fc.weight", ()))
    name = next(
        (
            arch
            for arch, spec in SPECS.items()
            if spec.block == block
            and list(spec.layers) == counts
            and spec.groups == groups
            and spec.width_per_group == width
        ),
        None,
    )
    return "%s (%s, layers %s, groups %d, width_per_group %d, %s classes)" % (
        name or "an unknown variant", block, counts, groups, width, fc[0] if fc else None
    )


def _explain(
    source: Optional[str],
    exp_shapes: Mapping[str, Tuple[int, ...]],
    got_shapes: Mapping[str, Tuple[int, ...]],
    missing: List[str],
    unexpected: List[str],
    mismatched: List[str],
) -> str:
    def listing(keys: List[str], limit: int = 8) -> str:
        shown = ", ".join(keys[:limit])
        return shown + (" ... (%d more)" % (len(keys) - limit) if len(keys) > limit else "")

    parts = []
    if missing:
        parts.append("missing in the weights (%d): %s" % (len(missing), listing(missing)))
    if unexpected:
        parts.append("unexpected in the weights (%d): %s" % (len(unexpected), listing(unexpected)))
    if mismatched:
        shapes = ["%s model %s vs weights %s" % (k, exp_shapes[k], got_shapes[k]) for k in mismatched]
        parts.append("shape mismatch (%d): %s" % (len(mismatched), listing(shapes, 4)))

    fc_only = mismatched and all(k.startswith("fc.") for k in mismatched) and not (missing or unexpected)
    if fc_only and "fc.weight" in got_shapes:
        n_file, n_model = got_shapes["fc.weight"][0], exp_shapes["fc.weight"][0]
        parts.append(
            "likely cause: different class count: the weights were trained for %d classes but the "
            "model has num_classes=%d. Build the model with num_classes=%d, or load with "
            "strict=False to keep a fresh fc for fine-tuning" % (n_file, n_model, n_file)
        )
    else:
        prefixes = {k.split(".", 1)[0] for k in got_shapes}
        if len(prefixes) == 1 and not any(k in exp_shapes for k in got_shapes):
            parts.append("likely cause: every key in the weights starts with %r; strip that prefix first"
                         % (next(iter(prefixes)) + "."))
        else:
            parts.append(
                "likely cause: another architecture: the model is %s, the weights look like %s. "
                "Build the matching architecture (see engine.models.ARCHS)"
                % (_describe(exp_shapes), _describe(got_shapes))
            )
    return "the weights%s do not fit the model: %s" % (" in " + source if source else "", "; ".join(parts))


def load_pretrained(model: Any, arch: str) -> None:
    """Fetch (see :func:`engine.models.hub.fetch`) and strictly load MegEngine's published weights
    for ``arch``."""
    path = hub.fetch(arch)
    try:
        state = read_file(path, what="cached weight file")
    except UnsafePickleError:
        raise
    except WeightsError as exc:
        # The file passed its sha256 check, so it is what was published, or it was pre-placed.
        raise WeightsError("%s; delete it and retry" % exc) from None
    load_weights(model, state, source=path)
