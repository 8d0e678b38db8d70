"""Published weights and ``--model`` URLs onto local disk: names, URLs, the cache, the download.

Every process that needs MegEngine's published weights or a ``--model URL`` calls
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

Reading what was fetched is :mod:`engine.models.weights`. Fetching uses no device, so a
launcher's parent can fetch before any rank starts without touching CUDA.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Dict, Optional

from engine import megengine_env
from engine.atomic import TMP_PREFIX, atomic_write
from engine.errors import UserError, disk_error_message
from engine.locks import acquire

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "OFFICIAL_URL_BASE",
    "PRETRAINED_FILES",
    "PUBLISHED",
    "SKIP_HASH_ENV",
    "URL_SCHEMES",
    "WEIGHTS_URL_BASE",
    "WeightsError",
    "cache_path_for_url",
    "expected_hash_prefix",
    "fetch",
    "is_url",
    "prefetch_weights",
    "pretrained_cache_path",
    "pretrained_url",
    "sha256_of",
]

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

#: The weights source meaning "MegEngine's published weights for the architecture".
PUBLISHED = "published"

URL_SCHEMES = ("http", "https", "ftp", "file", "s3")

# "<anything>_<hex digits>.<ext>": the digits are the start of the file's sha256.
_NAME_HASH = re.compile(r"_([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


class WeightsError(UserError, RuntimeError):
    """Weights could not be fetched, verified or read. A UserError for the tools' one-line
    message; a RuntimeError because ``resnet50(pretrained=True)`` has always raised that on a
    failed fetch."""


def is_url(source: str) -> bool:
    """Whether ``source`` names a URL :func:`fetch` downloads (rather than a local path)."""
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


def _cache_error(message: str) -> WeightsError:
    return WeightsError(message + " (the weights cache; set MGE_HOME to move it)")


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
    # One fetch of a file at a time on this node; the lock file stays (removing it would let a
    # waiter and a newcomer lock different inodes).
    with acquire(dest + ".lock", timeout=None, mode=0o666, error=_cache_error):
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
