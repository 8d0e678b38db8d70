"""Weights, in one place: from the published set, a URL or a file into a model.

Four steps, each a section below:

* **fetch** (:func:`fetch`, :func:`prefetch_weights`): a local, complete, verified copy of a
  published file or a ``--model URL``;
* **read** (:func:`unpickle`, :func:`read_file`, :func:`read`): unpickle it *safely* (below);
* **unwrap** (:func:`unwrap`): find the state dict in an official bare weight file, an official
  train.py checkpoint (``{"epoch", "state_dict"}``), an engine checkpoint or a ``{"model": ...}``
  wrapper;
* **load** (:func:`load_weights`, :func:`load_pretrained`, :func:`load_model`): check every key
  and shape against the model first and name what does not fit, then copy.

Fetching. Every process that needs MegEngine's published weights or a ``--model URL`` calls
:func:`fetch` (or, in a launcher's parent before any rank starts, :func:`prefetch_weights`):

* **one download per node**: an exclusive ``flock`` on ``<file>.lock`` beside the cache file
  serialises concurrent fetches; the first downloads, the others wait and then find the file;
* **atomic**: bytes go to a hidden temp file in the cache folder that is renamed over the final
  name only after the download completed (Content-Length matched) and the hash was checked, so
  no reader ever unpickles a half-written file and an interrupted download leaves nothing that
  a later run would trust (its temp file is removed by the next fetch);
* **verified**: a file name that ends in ``_<8+ hex digits>.<ext>`` (MegEngine's published names,
  e.g. ``resnet50_fbaug_76254_4e14b7d1.pkl``) carries the first digits of the file's sha256,
  the torch.hub ``check_hash`` convention. A cached file that does not match is downloaded again;
  a download that does not match is refused and not kept.

The cache is megengine.hub's (``$MGE_HOME``, else ``$XDG_CACHE_HOME/megengine``, else
``~/.cache/megengine``, then ``serialized/<sha256(url)[:6]>_<file name>``), so files cached by
``megengine.hub`` are found here and the other way round. With the cache on a shared file system
whose ``flock`` does not reach other nodes, each node may download once; the rename keeps every
reader safe regardless.

Reading. Weight files and checkpoints are pickles, and unpickling runs whatever callables the
file names, so a file from a URL could run any code. :func:`unpickle` therefore admits only the
globals that weight files and engine checkpoints are made of (:data:`SAFE_GLOBALS`: containers,
numbers, strings, numpy arrays and scalars, MegEngine tensors) and refuses anything else with a
:class:`UnsafePickleError` that names the global. Files one trusts completely can be read as plain
pickles with ``trusted=True`` or ``ENGINE_TRUST_PICKLE=1``.

This module does not import MegEngine at import time, so a launcher's parent can fetch without
touching CUDA; reading a file that holds MegEngine tensors imports it then.
"""
from __future__ import annotations

import _compat_pickle
import errno
import fcntl
import glob
import hashlib
import os
import pickle
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from typing import IO, Any, Dict, FrozenSet, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from engine import megengine_env
from engine.atomic import TMP_PREFIX, atomic_write
from engine.errors import UserError, disk_error_message

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "OFFICIAL_URL_BASE",
    "PRETRAINED_FILES",
    "PUBLISHED",
    "SAFE_GLOBALS",
    "SKIP_HASH_ENV",
    "TRUST_PICKLE_ENV",
    "WEIGHTS_URL_BASE",
    "LoadResult",
    "UnsafePickleError",
    "Unwrapped",
    "WeightsError",
    "WeightsMismatchError",
    "cache_path_for_url",
    "expected_hash_prefix",
    "fetch",
    "is_url",
    "load_pretrained",
    "load_weights",
    "prefetch_weights",
    "pretrained_cache_path",
    "pretrained_url",
    "read",
    "read_file",
    "sha256_of",
    "unpickle",
    "unwrap",
]

# --------------------------------------------------------------------------------------------
# Fetch: published files and URLs onto local disk
# --------------------------------------------------------------------------------------------

#: The files MegEngine published (top-1 in the name, sha256 prefix last); wide variants have none.
PRETRAINED_FILES: Dict[str, str] = {
    "resnet18": "resnet18_naiveaug_70312_78a63ca6.pkl",
    "resnet34": "resnet34_naiveaug_73960_fd9d869d.pkl",
    "resnet50": "resnet50_fbaug_76254_4e14b7d1.pkl",
    "resnet101": "resnet101_fbaug_77944_b7932921.pkl",
    "resnet152": "resnet152_fbaug_78582_7551aff3.pkl",
    "resnext50_32x4d": "resnext50_32x4d_fbaug_77592_c4b04e5e.pkl",
    "resnext101_32x8d": "resnext101_32x8d_fbaug_79520_80efb344.pkl",
}

#: Where MegEngine publishes them; it also fixes the cache file names (see pretrained_cache_path).
OFFICIAL_URL_BASE = "https://data.megengine.org.cn/models/weights/"

#: Where published weights are downloaded from; a mirror may replace it, the cache name stays.
WEIGHTS_URL_BASE = OFFICIAL_URL_BASE

#: Socket timeout (seconds) per read; the machine may be offline, so fail fast.
DOWNLOAD_TIMEOUT_S = 10.0

#: Set to 1 to accept files whose sha256 does not match the digits in their name (with a warning).
SKIP_HASH_ENV = "ENGINE_SKIP_WEIGHTS_HASH"

URL_SCHEMES = ("http", "https", "ftp", "file", "s3")

# "<anything>_<hex digits>.<ext>": the digits are the start of the file's sha256.
_NAME_HASH = re.compile(r"_([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


class WeightsError(UserError, RuntimeError):
    """Weights could not be fetched, verified or read. A UserError for the tools' one-line
    message; a RuntimeError because ``resnet50(pretrained=True)`` has always raised that on a
    failed fetch."""


class UnsafePickleError(WeightsError, pickle.UnpicklingError):
    """A weight file or checkpoint names a global outside :data:`SAFE_GLOBALS`: it was not loaded.

    Also a ``pickle.UnpicklingError``, so code that handles unreadable pickles handles it too."""


class WeightsMismatchError(UserError, ValueError):
    """Weights whose keys or shapes do not fit the model; the message names them and the likely
    cause. A ValueError because ``load_weights`` has always raised that."""


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in URL_SCHEMES


def _megengine_home() -> str:
    return megengine_env.megengine_home()  # megengine.hub's rule


def cache_path_for_url(url: str) -> str:
    """``<MGE_HOME>/serialized/<sha256(url)[:6]>_<file name>``, megengine.hub's cache name."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:6]
    name = os.path.basename(urllib.parse.urlparse(url).path) or "weights.pkl"
    return os.path.join(_megengine_home(), "serialized", digest + "_" + name)


def _published_file(arch: str) -> str:
    if arch not in PRETRAINED_FILES:
        raise ValueError(
            "no published ImageNet weights exist for %r (MegEngine published weights only for %s); "
            "build it with pretrained=False and train it, or load your own checkpoint with "
            "engine.models.load_weights" % (arch, ", ".join(PRETRAINED_FILES))
        )
    return PRETRAINED_FILES[arch]


def pretrained_url(arch: str) -> str:
    """The official URL of ``arch``'s published weights."""
    return OFFICIAL_URL_BASE + _published_file(arch)


def pretrained_cache_path(arch: str) -> str:
    """Where the published weights of ``arch`` are cached: pre-place the file here when offline.

    The name is derived from the official URL even when downloading from a mirror, so
    ``megengine.hub.load(..., pretrained=True)`` and this engine share one cache.
    """
    return cache_path_for_url(pretrained_url(arch))


def expected_hash_prefix(name_or_url: str) -> Optional[str]:
    """The sha256 prefix a published file name carries (``..._4e14b7d1.pkl`` -> ``4e14b7d1``)."""
    base = os.path.basename(urllib.parse.urlparse(name_or_url).path or name_or_url)
    m = _NAME_HASH.search(base)
    return m.group(1) if m else None


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _skip_hash() -> bool:
    return os.environ.get(SKIP_HASH_ENV, "").strip().lower() in ("1", "true", "yes")


def _mismatch(what: str, digest: str, prefix: str) -> str:
    return (
        "%s has sha256 %s..., but its name says it starts with %s: the file is damaged, "
        "incomplete or not the published one (set %s=1 to accept it anyway)"
        % (what, digest[:16], prefix, SKIP_HASH_ENV)
    )


@contextmanager
def _node_lock(path: str) -> Iterator[None]:
    """Exclusive flock on ``<path>.lock``: one fetch of a file at a time on this node.

    The lock file stays (removing it would let a waiter and a newcomer lock different inodes).
    """
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise WeightsError(disk_error_message(exc, path + ".lock") + " (the weights cache; set "
                                                                     "MGE_HOME to move it)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _remove_stale_temps(path: str) -> None:
    """Temp files of earlier, killed downloads of this file. Safe: we hold its lock."""
    folder, name = os.path.split(path)
    for tmp in glob.glob(os.path.join(folder, glob.escape(TMP_PREFIX + name) + ".*")):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _open(url: str, timeout: float) -> IO[bytes]:
    if urllib.parse.urlparse(url).scheme == "s3":
        import megfile  # a MegEngine dependency; it knows object stores, urllib does not

        return megfile.smart_open(url, "rb")
    return urllib.request.urlopen(url, timeout=timeout)


def _download(url: str, dest: str, prefix: Optional[str], timeout: float) -> None:
    """url -> temp file -> (length and hash checked) -> rename to dest."""

    def write(out: IO[bytes]) -> None:
        h = hashlib.sha256()
        got = 0
        with _open(url, timeout) as resp:
            headers = getattr(resp, "headers", None)
            length = headers.get("Content-Length") if headers is not None else None
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                h.update(chunk)
                got += len(chunk)
        if length is not None and length.isdigit() and got != int(length):
            raise WeightsError(
                "the download of %s stopped after %d of %s bytes; nothing was kept, rerun to "
                "try again" % (url, got, length)
            )
        if prefix and not h.hexdigest().startswith(prefix):
            msg = _mismatch("the file downloaded from %s" % url, h.hexdigest(), prefix)
            if not _skip_hash():
                raise WeightsError(msg + "; it was not kept")
            sys.stderr.write("warning: %s\n" % msg)

    atomic_write(dest, write)


def fetch(url_or_arch: str, *, timeout: Optional[float] = None) -> str:
    """A local, complete, verified copy of a weights file; returns its path.

    ``url_or_arch`` is an architecture with published weights (``"resnet50"``), a URL
    (http, https, ftp, file, s3) or a local path (returned unchanged). Downloads go to the
    megengine.hub cache, once per node (flock), atomically (temp + rename); a file whose name
    carries a sha256 prefix is checked before it is trusted, cached or not.
    Raises WeightsError (a UserError and a RuntimeError) with a one-line actionable message.
    """
    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    if url_or_arch in PRETRAINED_FILES:
        arch = url_or_arch
        name = PRETRAINED_FILES[arch]
        url = WEIGHTS_URL_BASE + name
        dest = pretrained_cache_path(arch)
        what = "the published %s weights" % arch
    elif is_url(url_or_arch):
        url = url_or_arch
        dest = cache_path_for_url(url)
        what = url
    else:
        if not os.path.isfile(url_or_arch):
            raise WeightsError("weights file not found: %s (pass a file, a URL or an architecture "
                               "with published weights: %s)"
                               % (url_or_arch, ", ".join(PRETRAINED_FILES)))
        return url_or_arch
    prefix = expected_hash_prefix(url)

    folder = os.path.dirname(dest)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise WeightsError(disk_error_message(exc, folder) + " (the weights cache; set MGE_HOME "
                                                             "to move it)") from None
    with _node_lock(dest):
        _remove_stale_temps(dest)
        stale = None
        if os.path.isfile(dest):
            if not prefix:
                return dest
            digest = sha256_of(dest)
            if digest.startswith(prefix):
                return dest
            stale = _mismatch("the cached file %s" % dest, digest, prefix)
            if _skip_hash():
                sys.stderr.write("warning: %s\n" % stale)
                return dest
            sys.stderr.write("%s; downloading it again\n" % stale)
        sys.stderr.write("downloading %s from %s to %s\n" % (what, url, dest))
        try:
            _download(url, dest, prefix, timeout)
        except WeightsError as exc:
            raise WeightsError("%s%s" % (stale + "; " if stale else "", exc)) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM) \
                    and not isinstance(exc, urllib.error.URLError):
                raise WeightsError(disk_error_message(exc, dest)) from None
            raise WeightsError(_offline_message(what, url, dest, exc, stale)) from None
        except Exception as exc:  # noqa: BLE001 - HTTP, socket and object-store errors alike
            raise WeightsError(_offline_message(what, url, dest, exc, stale)) from None
    return dest


def _offline_message(what: str, url: str, dest: str, exc: BaseException,
                     stale: Optional[str]) -> str:
    head = (stale + "; and ") if stale else ""
    return (
        "%scould not download %s from %s (%s: %s). On a machine without internet access, fetch "
        "that file elsewhere and put it at %s (the megengine.hub cache: $MGE_HOME, else "
        "$XDG_CACHE_HOME/megengine, else ~/.cache/megengine, then "
        "serialized/<sha256(url)[:6]>_<file>)" % (head, what, url, type(exc).__name__, exc, dest)
    )


PUBLISHED = "published"


def prefetch_weights(source: Optional[str], arch: str) -> Optional[str]:
    """Fetch the weights a run will load, in a launcher's parent, before any rank starts.

    * ``None``: nothing requested (training from scratch); returns None and fetches nothing;
    * ``"published"``: MegEngine's published weights for ``arch`` (what tools/test.py and
      tools/inference.py load when --model is not given); a WeightsError when there are none;
    * a URL: downloaded into the cache (once per node, verified);
    * a local path: checked to exist and returned unchanged.

    The returned path can be handed to every rank instead of ``source``: loading it is then a
    local file read, and no rank downloads. Raises WeightsError (a UserError) on failure.
    """
    if source is None:
        return None
    if source.strip().lower() == PUBLISHED:
        try:
            _published_file(arch)
        except ValueError as exc:
            raise WeightsError(str(exc)) from None
        return fetch(arch)
    return fetch(source)



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
    (see :func:`fetch`), read with :func:`read_file`."""
    return read_file(fetch(source) if is_url(source) else source, trusted=trusted)


# --------------------------------------------------------------------------------------------
# Unwrap: the state dict inside each supported format
# --------------------------------------------------------------------------------------------


class Unwrapped(NamedTuple):
    """The state dict of a weights object and where it came from."""

    state: Mapping[str, Any]
    kind: str  # "bare" (published files), "official-train", "engine" or "wrapped" ({"model": ...})
    config: Mapping[str, Any]  # an engine checkpoint's run config (arch, classes, ...); else {}


#: The "format" of the trainer's checkpoints (engine.checkpoint writes them; recognised here so
#: that weights can be read from one without importing the checkpoint module).
ENGINE_CHECKPOINT_FORMAT = "engine-checkpoint"


def unwrap(obj: Any) -> Unwrapped:
    """Find the state dict: official weight files are bare dicts, official train.py checkpoints
    hold it under ``"state_dict"`` (as engine checkpoints do), other wrappers under ``"model"``."""
    if not isinstance(obj, Mapping):
        raise TypeError(
            "expected a state dict (name -> array) or a checkpoint dict with a 'state_dict' or "
            "'model' entry, got %s" % type(obj).__name__
        )
    if obj.get("format") == ENGINE_CHECKPOINT_FORMAT and isinstance(obj.get("state_dict"), Mapping):
        return Unwrapped(obj["state_dict"], "engine", dict(obj.get("config") or {}))
    if isinstance(obj.get("state_dict"), Mapping):
        return Unwrapped(obj["state_dict"], "official-train", {})
    if isinstance(obj.get("model"), Mapping):
        return Unwrapped(obj["model"], "wrapped", {})
    return Unwrapped(obj, "bare", {})


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
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        return value.detach().cpu().numpy()
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
    """Fetch (see :func:`fetch`) and strictly load MegEngine's published weights for ``arch``."""
    path = fetch(arch)
    try:
        state = read_file(path, what="cached weight file")
    except UnsafePickleError:
        raise
    except WeightsError as exc:
        # The file passed its sha256 check, so it is what was published, or it was pre-placed.
        raise WeightsError("%s; delete it and retry" % exc) from None
    load_weights(model, state, source=path)


