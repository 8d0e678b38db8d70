"""Copy a packed split to a node-local disk, verifying checksums; resumable and rank-safe.

Per split: the shards are copied first (each to a hidden temporary name, checked against the
checksum in meta.json while copying, then renamed), meta.json last, so a destination without
meta.json is visibly incomplete and readers refuse it. A rerun skips every local shard whose size
and checksum already match, and re-copies a damaged one; it first deletes what a killed run left
(its temporary files) and the wrong copies, so that the free-space check counts their space as
free, and while anything is copied the destination has no meta.json. Several ranks of one node
may run this at once: one copies under an flock on DST/.stage.lock, the others wait (the holder
reports its progress in the lock file; a holder that makes none for `stall_timeout` seconds is
an error), then find the finished stamp and return without rereading anything.

A destination this process cannot write (a read-only mount of a finished stage) is checked in
place, without the lock: a complete, correct copy is accepted, anything else is refused saying
what is wrong. A source shard that is missing or unreadable is an error naming it, never one
about the destination.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from engine.atomic import TMP_PREFIX, atomic_write, fsync_dir
from engine.cli import option
from engine.data import shards
from engine.data.verify import find_splits
from engine.errors import UserError, disk_error_message
from engine.locks import FileLock, Holder, acquire

__all__ = ["StageConfig", "StageError", "stage", "stage_split"]

LOCK = ".stage.lock"
STAMP = ".staged.json"  # written after meta.json: what a finished stage left, for waiting ranks
_CHUNK = 8 << 20


@dataclass
class StageConfig:
    """tools/stage_shards.py's options (engine.cli derives its parser from these fields); the
    defaults of stage() are theirs."""

    src: str = option(MISSING, "packed split (OUT/train) or pack root (OUT)", "SRC")
    dst: str = option(MISSING, "local folder (for a root: DST/<split>)", "DST")
    stall_timeout: float = option(600.0, "a waiting rank gives up if the copying one makes no "
                                         "progress for S seconds", metavar="S")


class StageError(UserError, RuntimeError):
    """The source is damaged or incomplete, or the destination cannot take the copy."""


def _meta_bytes(src: str) -> bytes:
    shards.read_meta(src)  # refuses an incomplete or unknown split with a clear message
    with open(os.path.join(src, shards.META_FILE), "rb") as f:
        return f.read()


def _stamp(dst: str, meta_raw: bytes, entries: List[Dict[str, Any]]) -> Dict[str, Any]:
    files = {}
    for e in entries:
        st = os.stat(os.path.join(dst, e["file"]))
        files[e["file"]] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return {"meta_sha256": hashlib.sha256(meta_raw).hexdigest(), "files": files}


def _stamp_matches(dst: str, meta_raw: bytes, entries: List[Dict[str, Any]]) -> bool:
    try:
        with open(os.path.join(dst, STAMP)) as f:
            old = json.load(f)
        with open(os.path.join(dst, shards.META_FILE), "rb") as f:
            if f.read() != meta_raw:
                return False
        return old == _stamp(dst, meta_raw, entries)
    except (OSError, ValueError):
        return False


class _Progress:
    """Bytes done, published in the lock's note now and then: the waiting ranks' liveness."""

    def __init__(self, lock: FileLock):
        self.lock, self.done, self.last = lock, 0, 0.0
        self.write()

    def add(self, n: int) -> None:
        self.done += n
        if time.time() - self.last > 0.5:
            self.write()

    def write(self) -> None:
        self.last = time.time()
        self.lock.note(bytes_done=self.done)


def _acquire(dst: str, stall_timeout: float, poll: float, log) -> FileLock:
    """The flock on DST/.stage.lock; its `waited` says whether another process held it first."""

    def waiting(holder: Holder) -> None:
        log("%s: another process (pid %s on %s) is staging it; waiting"
            % (dst, holder.pid or "?", holder.host or "?"))

    def stalled(holder: Holder) -> str:
        return ("staging into %s by pid %s on host %s made no progress for %.0f s; stop that "
                "process (a killed one releases the lock by itself) and rerun"
                % (dst, holder.pid or "?", holder.host or "?", stall_timeout))

    return acquire(os.path.join(dst, LOCK), timeout=stall_timeout, poll=poll, error=StageError,
                   refused=stalled, on_wait=waiting)


def _source_error(path: str, exc: OSError) -> StageError:
    """The source shard `path` vanished or cannot be read while staging: not a disk problem of
    the destination."""
    if isinstance(exc, FileNotFoundError):
        return StageError("%s is missing, although %s lists it: the source pack is incomplete "
                          "(deleted or moved while staging?); restore or repack it, then rerun"
                          % (path, os.path.join(os.path.dirname(path), shards.META_FILE)))
    return StageError("cannot read %s (%s); check the source, then rerun"
                      % (path, exc.strerror or exc))


def _source_size(src: str, entry: Dict[str, Any]) -> int:
    """The size of a source shard, refused if it is absent or differs from its meta.json."""
    path = os.path.join(src, entry["file"])
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise _source_error(path, exc) from None
    if "size" in entry and size != entry["size"]:
        raise StageError("%s: %d bytes, its meta.json says %d (the source is truncated or "
                         "replaced); check it with tools/verify_pack.py and repack it"
                         % (path, size, entry["size"]))
    return size


def _copy(src: str, dst: str, expected: Optional[str], progress: _Progress, needed: int) -> None:
    """Copy src to dst through a hidden temp file, hashing the bytes on the way; publish only a
    copy whose checksum matches meta.json (a damaged source or a bad read never lands)."""
    folder = os.path.dirname(dst)
    tmp = os.path.join(folder, TMP_PREFIX + os.path.basename(dst))
    h = hashlib.new(shards.CHECKSUM_ALGO)
    try:
        try:
            fi = open(src, "rb")
        except OSError as exc:
            raise _source_error(src, exc) from None
        with fi:
            try:
                fo = open(tmp, "wb")
            except OSError as exc:
                raise StageError(disk_error_message(exc, dst, needed)) from None
            with fo:
                while True:
                    try:
                        chunk = fi.read(_CHUNK)
                    except OSError as exc:
                        raise _source_error(src, exc) from None
                    if not chunk:
                        break
                    h.update(chunk)
                    try:
                        fo.write(chunk)
                    except OSError as exc:
                        raise StageError(disk_error_message(exc, dst, needed)) from None
                    progress.add(len(chunk))
                try:
                    fo.flush()
                    os.fsync(fo.fileno())
                except OSError as exc:
                    raise StageError(disk_error_message(exc, dst, needed)) from None
        got = "%s:%s" % (shards.CHECKSUM_ALGO, h.hexdigest())
        if expected and got != expected:
            raise StageError("%s: checksum differs from its meta.json (the source is damaged); "
                             "check it with tools/verify_pack.py and repack it" % src)
        try:
            os.replace(tmp, dst)
        except OSError as exc:
            raise StageError(disk_error_message(exc, dst, needed)) from None
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _remove_leftovers(dst: str, entries: List[Dict[str, Any]]) -> None:
    """Remove what a killed earlier stage left in `dst` (its partial temp files), so that the
    space they hold counts as free. Only this stage's own names: the lock is held, so no other
    process is writing them."""
    ours = {TMP_PREFIX + e["file"] for e in entries}
    prefixes = tuple(TMP_PREFIX + name + "." for name in (shards.META_FILE, STAMP))
    for name in os.listdir(dst):
        if name in ours or name.startswith(prefixes):
            try:
                os.remove(os.path.join(dst, name))
            except FileNotFoundError:
                pass


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_in_place(src: str, dst: str, meta_raw: bytes, entries: List[Dict[str, Any]],
                    why: str, log: Callable[[str], None]) -> Dict[str, Any]:
    """A destination this process cannot write (`why`): accept it if it already holds a complete,
    correct copy (what a read-only mount of a finished stage is), else say what is wrong."""
    problem = None
    try:
        with open(os.path.join(dst, shards.META_FILE), "rb") as f:
            if f.read() != meta_raw:
                problem = "its meta.json differs from the source's"
    except OSError:
        problem = "it has no meta.json (the copy is incomplete)"
    if problem is None and not _stamp_matches(dst, meta_raw, entries):
        for e in entries:  # no stamp of this copy: compare every shard with meta.json
            local = os.path.join(dst, e["file"])
            try:
                size = os.path.getsize(local)
                if size != (e["size"] if "size" in e else _source_size(src, e)):
                    problem = "%s has the wrong size" % e["file"]
                elif e.get("checksum") and shards.file_checksum(local) != e["checksum"]:
                    problem = "%s is damaged (its checksum differs)" % e["file"]
            except OSError:
                problem = "%s is missing" % e["file"]
            if problem:
                break
    if problem:
        raise StageError("cannot stage into %s: %s, and %s, so it cannot be repaired there; "
                         "stage into a writable folder" % (dst, why, problem))
    log("%s: %s; it already holds a complete copy (%d shards)" % (dst, why, len(entries)))
    return {"dst": dst, "copied": 0, "kept": len(entries), "waited": False, "bytes": 0}


def _reconcile(src: str, dst: str, meta_raw: bytes, meta: Dict[str, Any], progress: _Progress,
               log: Callable[[str], None]) -> Tuple[List[Dict[str, Any]], int]:
    """Sort the shards already in `dst` into correct ones (kept) and those to copy, and clear
    `dst` of what readers must not find meanwhile: a killed stage's leftovers, the wrong
    copies, shards meta.json omits, the stamp, and meta.json itself while anything is copied.
    Returns the entries to copy and the number kept. The lock is held."""
    entries = meta["shards"]
    local_meta = os.path.join(dst, shards.META_FILE)
    try:
        _remove_leftovers(dst, entries)
        todo, kept = [], 0
        for e in entries:
            local = os.path.join(dst, e["file"])
            # Without a size in meta.json (older packs) the source's own size is the measure.
            want = e["size"] if "size" in e else _source_size(src, e)
            ok = os.path.exists(local) and os.path.getsize(local) == want
            if ok and e.get("checksum"):
                ok = shards.file_checksum(local, progress.add) == e["checksum"]
                if not ok:
                    log("%s: local copy is damaged; copying it again" % local)
            if ok:
                kept += 1
            else:
                todo.append(e)
        try:
            with open(local_meta, "rb") as f:
                stale = f.read() != meta_raw
        except OSError:
            stale = False
        # Readers must not pair a meta.json with shards that are not (yet) its own (while
        # anything is copied the destination has none, as after a killed stage), nor find
        # shards it omits.
        for old in ([local_meta] if stale or todo else []) + [os.path.join(dst, STAMP)] + [
                os.path.join(dst, f) for f in shards.unlisted_shards(dst, meta)]:
            if os.path.exists(old):
                os.remove(old)
        for e in todo:  # a wrong copy is worthless, and its space counts as free
            if os.path.exists(os.path.join(dst, e["file"])):
                os.remove(os.path.join(dst, e["file"]))
    except OSError as exc:
        raise StageError(disk_error_message(exc, dst)) from None
    return todo, kept


def stage_split(src: str, dst: str, stall_timeout: float = StageConfig.stall_timeout,
                poll: float = 0.2, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Copy packed split `src` to `dst`; returns counts of copied and already-correct shards."""
    meta_raw = _meta_bytes(src)
    meta = json.loads(meta_raw)
    entries = meta["shards"]
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise StageError("%s exists and is not a folder" % dst)
    name = os.path.basename(os.path.abspath(dst))
    if name in shards.SPLITS and name != meta["split"]:  # readers would refuse the copy
        raise StageError("%s holds the %s split; stage it into a folder named %s, not %s"
                         % (src, meta["split"], meta["split"], dst))
    if _same_file(src, dst):
        raise StageError("%s is the source itself; stage into another (node-local) folder"
                         % dst)
    try:
        os.makedirs(dst, exist_ok=True)
    except OSError as exc:
        raise StageError(disk_error_message(exc, dst)) from None
    if not os.access(dst, os.W_OK | os.X_OK):
        why = ("its file system is read-only" if _read_only(dst)
               else "this user may not write there")
        return _check_in_place(src, dst, meta_raw, entries, why, log)
    lock = _acquire(dst, stall_timeout, poll, log)
    waited = lock.waited
    with lock:
        if waited and _stamp_matches(dst, meta_raw, entries):
            log("%s: staged by another process, complete" % dst)
            return {"dst": dst, "copied": 0, "kept": len(entries), "waited": True, "bytes": 0}
        progress = _Progress(lock)
        local_meta = os.path.join(dst, shards.META_FILE)
        todo, kept = _reconcile(src, dst, meta_raw, meta, progress, log)
        sizes = [_source_size(src, e) for e in todo]
        free = shutil.disk_usage(dst).free
        if sum(sizes) > free:
            raise StageError("cannot stage into %s: %.1f MB to copy, %.1f MB free there; free "
                             "some space or choose another folder" % (dst, sum(sizes) / 1e6,
                                                                      free / 1e6))
        t0 = time.time()
        for e in todo:
            _copy(os.path.join(src, e["file"]), os.path.join(dst, e["file"]),
                  e.get("checksum"), progress, sum(sizes))
        try:
            atomic_write(local_meta, lambda f: f.write(meta_raw))  # last: now readers may open
            atomic_write(os.path.join(dst, STAMP),
                         lambda f: f.write(json.dumps(_stamp(dst, meta_raw, entries)).encode()))
        except OSError as exc:
            raise StageError(disk_error_message(exc, local_meta)) from None
        fsync_dir(dst)
        seconds = time.time() - t0
        if not any(e.get("checksum") for e in entries):
            log("%s: note: this pack records no checksums; shards were compared by size only"
                % src)
        log("%s: %d shard(s) copied (%.1f MB, %.0f MB/s), %d already correct"
            % (dst, len(todo), sum(sizes) / 1e6,
               sum(sizes) / 1e6 / seconds if seconds > 0 else 0.0, kept))
        return {"dst": dst, "copied": len(todo), "kept": kept, "waited": waited,
                "bytes": sum(sizes), "seconds": seconds}


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def stage(src: str, dst: str, stall_timeout: float = StageConfig.stall_timeout, poll: float = 0.2,
          log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Stage a split (SRC has meta.json) to DST, or every split of a pack root to DST/<split>."""
    splits = find_splits(src)
    if splits == [src]:
        return [stage_split(src, dst, stall_timeout, poll, log)]
    return [stage_split(s, os.path.join(dst, os.path.basename(s)), stall_timeout, poll, log)
            for s in splits]
