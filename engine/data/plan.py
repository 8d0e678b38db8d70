"""The pack plan: which file goes to which shard, and what each finished shard recorded. The
only module that knows plan.json and the markers.

    <out>/<split>/plan.json                   the plan, written before any shard
    <out>/<split>/.pack/shard-NNNNN.lmdb.json  a finished shard's marker (the merge removes .pack)
    <out>/<split>/.pack/shard-NNNNN.lmdb.lock  held by the pack writing that shard

The file list, its order and its split into shards are a pure function of the input listing and
the arguments (the fingerprint: names, labels, sizes, modification times, seed, shard size, max
side), so every node computes the same plan and any node can be rerun alone. A marker records a
finished shard's counts, skipped files and checksum under the fingerprint it was packed for; a
shard counts as done only when its marker matches the plan and its file is there. meta.json is
made from the markers by engine.data.merge, which reads them through this module. A finished
shard that has no marker (a kill between shard and marker, a lost meta.json) gets it rebuilt
here from the shard file, once every record in it decodes and its file list is the plan's; a
shard whose file no longer matches its marker is dropped, so that the pack writes it again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from engine.data import shards
from engine.data.folder import LayoutError, list_classes, scan_split
from engine.errors import UserError, disk_error_message
from engine.locks import LockError, acquire

__all__ = ["PackError", "Unrecoverable", "Scan", "input_classes", "scan", "prepare", "read_plan",
           "finished", "drop_progress", "ShardTally", "read_marker", "missing", "rebuild_marker",
           "rebuild_markers", "forget", "drop_damaged", "shard_lock_path", "PLAN_FILE",
           "PLAN_FORMAT", "PROGRESS_DIR", "storage_options"]

PROGRESS_DIR = ".pack"
PLAN_FILE = "plan.json"
PLAN_FORMAT = "engine-pack-plan"

Log = Callable[[str], None]


class PackError(UserError, ValueError):
    """Bad input or arguments: the message says what was wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Scan and plan


# The plan's (and meta.json's) storage keys with their defaults: absent from a pack made with
# the defaults. restart_interval: MCUs between the restart markers written into every JPEG
# record (--restart-markers), 0 for the JPEGs as they came.
STORAGE_DEFAULTS: Dict[str, Any] = {"raw_fraction": 0, "jpeg_quality": None, "restart_interval": 0}
_STORAGE_FLAGS = {"raw_fraction": "--raw-fraction", "jpeg_quality": "--jpeg-quality",
                  "restart_interval": "--restart-markers"}


def storage_options(raw_fraction: float = 0.0, jpeg_quality: Optional[int] = None,
                    restart_interval: int = 0) -> Dict[str, Any]:
    """The plan's keys for how records are stored, present only when not the defaults (every
    record a JPEG as it came, re-encodes at the packer's quality): a pack with the defaults has
    the plan, fingerprint and meta.json it always had."""
    opts: Dict[str, Any] = {}
    if raw_fraction:
        opts["raw_fraction"] = float(raw_fraction)
    if jpeg_quality is not None:
        opts["jpeg_quality"] = int(jpeg_quality)
    if restart_interval:
        opts["restart_interval"] = int(restart_interval)
    return opts


def _fingerprint(split: str, classes: Sequence[str], items: Sequence[Tuple[str, int]],
                 stats: Sequence[Tuple[int, int]], seed: int, shard_size: int,
                 max_side: Optional[int], storage: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    head: List[Any] = [shards.JPEG_VERSION, split, classes, seed, shard_size, max_side]
    if storage:
        head.append(sorted(storage.items()))
    h.update(json.dumps(head).encode())
    for (rel, label), (size, mtime) in zip(items, stats):
        h.update(("%s\0%d\0%d\0%d\n" % (rel, label, size, mtime)).encode())
    return h.hexdigest()


def _shard_digest(chunk: Sequence[Tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for rel, label in chunk:
        h.update(("%s\0%d\n" % (rel, label)).encode())
    return h.hexdigest()


def _make_plan(split: str, classes: List[str], items: List[Tuple[str, int]], fp: str,
               seed: int, shard_size: int, max_side: Optional[int],
               storage: Mapping[str, Any]) -> Dict[str, Any]:
    """Which files go to which shard: a pure function of the listing and the arguments, so every
    node computes the same plan and any node can be rerun alone."""
    chunks = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    plan = {"format": PLAN_FORMAT, "version": 1, "split": split, "classes": classes,
            "seed": seed, "shard_size": shard_size, "max_side": max_side}
    plan.update(storage)
    plan.update({"shuffled": split == "train", "num_files": len(items), "fingerprint": fp,
                 "shards": [{"file": shards.shard_name(k), "num_files": len(c),
                             "files_sha256": _shard_digest(c)} for k, c in enumerate(chunks)]})
    return plan


@dataclass
class Scan:
    """A listed and planned split, before anything is written."""

    split: str
    src: str  # <data>/<split>
    items: List[Tuple[str, int]]  # (path relative to src, label), in packing order
    plan: Dict[str, Any]
    source_bytes: List[int]  # bytes of input per shard (the disk-space estimate)

    @property
    def fingerprint(self) -> str:
        return self.plan["fingerprint"]

    def shard_items(self, k: int) -> List[Tuple[str, int]]:
        size = self.plan["shard_size"]
        return self.items[k * size:(k + 1) * size]


def input_classes(data: str, splits: Sequence[str], log: Log) -> List[str]:
    """The class list of the input (label i is classes[i]): train's sorted class folders, or
    val's own when only val is packed and there is no train."""
    train_dir = os.path.join(data, "train")
    if os.path.isdir(train_dir):
        classes = list_classes(train_dir)
    elif list(splits) == ["val"]:
        classes = list_classes(os.path.join(data, "val"))
        log("note: %s not found; labels follow val's own sorted class folders" % train_dir)
    else:
        raise PackError("%s does not exist; expected ROOT/train/<wnid>/*.JPEG" % train_dir)
    if not classes:
        raise PackError("%s has no class folders" % train_dir)
    return classes


def scan(data: str, split: str, classes: List[str], seed: int, shard_size: int,
         max_side: Optional[int], storage: Optional[Mapping[str, Any]] = None) -> Scan:
    """List a split, order it, fingerprint it and plan its shards (reads only). `storage` is
    storage_options()."""
    storage = dict(storage or {})
    src = os.path.join(data, split)
    try:
        items = scan_split(src, classes)
    except LayoutError as exc:
        raise PackError(str(exc)) from None
    if not items:
        raise PackError("%s has no image files under its class folders" % src)
    if split == "train":  # each shard mixes classes; the loader shuffles again per epoch
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
    stats = []
    for rel, _ in items:
        try:
            st = os.stat(os.path.join(src, rel))
        except OSError as exc:
            raise PackError("cannot read %s (%s)" % (os.path.join(src, rel), exc.strerror))
        stats.append((st.st_size, st.st_mtime_ns))
    fp = _fingerprint(split, classes, items, stats, seed, shard_size, max_side, storage)
    plan = _make_plan(split, classes, items, fp, seed, shard_size, max_side, storage)
    sizes = [sum(s for s, _ in stats[i:i + shard_size]) for i in range(0, len(items), shard_size)]
    return Scan(split, src, items, plan, sizes)


# ---------------------------------------------------------------------------------------------
# plan.json


def _plan_difference(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    for key in ("split", "seed", "shard_size", "max_side"):
        if old.get(key) != new[key]:
            return "%s %r then, %r now" % (key, old.get(key), new[key])
    for key, default in STORAGE_DEFAULTS.items():
        if old.get(key, default) != new.get(key, default):
            return "%s %r then, %r now (%s)" % (key, old.get(key, default), new.get(key, default),
                                                _STORAGE_FLAGS[key])
    if old.get("classes") != new["classes"]:
        return "the class folders changed: %d then, %d now" % (len(old.get("classes") or []),
                                                              len(new["classes"]))
    if old.get("num_files") != new["num_files"]:
        return "the input listing changed: %s files then, %d now" % (old.get("num_files"),
                                                                    new["num_files"])
    return "the input listing changed: file names, sizes or modification times"


def _write_plan(dst: str, plan: Dict[str, Any]) -> None:
    """Publish plan.json, or refuse if one made from other input or arguments is there.

    Every node writes the same bytes (a pure function, written by atomic rename), so nodes may
    race to write it; reading it back catches a concurrent pack of different arguments.
    """
    path = os.path.join(dst, PLAN_FILE)
    for attempt in (0, 1):
        old = shards.read_json(path)
        if old is None and attempt == 0:
            try:
                shards.write_json_atomic(path, plan)
            except OSError as exc:
                raise PackError(disk_error_message(exc, path)) from None
            continue
        if old != plan:
            raise PackError(
                "%s was made for other input or arguments (%s). Rerun with the arguments it was "
                "made with, or pack into another --out (or delete %s to start that split over)"
                % (path, _plan_difference(old or {}, plan), dst))
        return


def prepare(dst: str, plan: Dict[str, Any]) -> None:
    """Make the split folder ready for shards: its marker folder, then plan.json (or refuse)."""
    try:
        os.makedirs(os.path.join(dst, PROGRESS_DIR), exist_ok=True)
    except OSError as exc:
        raise PackError(disk_error_message(exc, dst)) from None
    _write_plan(dst, plan)


def read_plan(dst: str) -> Optional[Dict[str, Any]]:
    """The plan.json of the split folder `dst`; None if it has none that can be read."""
    plan = shards.read_json(os.path.join(dst, PLAN_FILE))
    return plan if plan is not None and plan.get("format") == PLAN_FORMAT else None


def finished(dst: str, fp: str, plan: Optional[Dict[str, Any]] = None,
             repair: bool = False) -> Optional[Dict[str, Any]]:
    """The meta.json of a complete pack of this plan in `dst`, None if there is none; PackError
    if `dst` holds a complete pack of other input or arguments (naming what changed when
    `plan` is given), or a meta.json that cannot be read. With `repair`, an unparsable
    meta.json is removed and the split counts as not finished: the pack then writes it again."""
    meta_path = os.path.join(dst, shards.META_FILE)
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path) as f:
            old = json.load(f)
    except OSError as exc:
        raise PackError("cannot read %s (%s)" % (meta_path, exc.strerror)) from None
    except ValueError:
        old = None
    if not isinstance(old, dict):
        if not repair:
            raise PackError("%s is not a readable meta.json (damaged?); rerun with --repair to "
                            "write it again and repack only the shards that fail verification"
                            % meta_path)
        os.remove(meta_path)
        return None
    if old.get("fingerprint") == fp:
        drop_progress(dst)  # left by a merge interrupted after it wrote meta.json
        return old
    changed = ""
    if plan is not None:
        changed = " (%s)" % _plan_difference(
            {"split": old.get("split"), "seed": old.get("seed"),
             "shard_size": old.get("shard_size"), "max_side": old.get("max_side"),
             "classes": old.get("classes"), "num_files": old.get("seen"),
             **{k: old[k] for k in STORAGE_DEFAULTS if k in old}}, plan)
    raise PackError("%s already holds a complete pack of different input or arguments%s. Rerun "
                    "with the arguments it was packed with, choose another --out, or delete %s "
                    "to repack." % (dst, changed, dst))


def drop_progress(dst: str) -> None:
    """Remove the markers and shard locks of a split whose meta.json is written."""
    shutil.rmtree(os.path.join(dst, PROGRESS_DIR), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Markers


def _marker_path(dst: str, k: int) -> str:
    return os.path.join(dst, PROGRESS_DIR, shards.shard_name(k) + ".json")


def shard_lock_path(dst: str, k: int) -> str:
    """The lock a pack holds while it writes shard k (beside the markers)."""
    return os.path.join(dst, PROGRESS_DIR, shards.shard_name(k) + ".lock")


def read_marker(dst: str, k: int, fp: str) -> Optional[Dict[str, Any]]:
    """Shard k's marker if it was packed for fingerprint `fp` and its file is there, else None.

    A marker without the shard's size and checksum (written by an engine before they were
    recorded) counts as missing: that shard is packed again rather than trusted unchecked."""
    m = shards.read_json(_marker_path(dst, k))
    if m is None or m.get("fingerprint") != fp or "size" not in m or "checksum" not in m:
        return None
    if not os.path.exists(os.path.join(dst, shards.shard_name(k))):
        return None
    return m


def missing(dst: str, plan: Dict[str, Any], among: Optional[Iterable[int]] = None) -> List[int]:
    """The shards (of `among`, default all) without a marker matching the plan."""
    ks = range(len(plan["shards"])) if among is None else among
    return [k for k in ks if read_marker(dst, k, plan["fingerprint"]) is None]


class ShardTally:
    """The counts of one shard while it is written; `publish` writes them as its marker."""

    def __init__(self, k: int, fp: str):
        self.k = k
        self.marker: Dict[str, Any] = {"file": shards.shard_name(k), "fingerprint": fp,
                                       "seen": 0, "num_samples": 0, "kinds": Counter(),
                                       "skipped": [], "bytes": 0}

    def kept(self, kind: str, nbytes: int, raw: bool = False) -> None:
        """A record appended: `kind` is what the packer did with its file, `raw` whether it
        was stored as pixels (counted only when some are, so JPEG-only markers are as before)."""
        self.marker["seen"] += 1
        self.marker["kinds"][kind] += 1
        self.marker["bytes"] += nbytes
        if raw:
            self.marker["raw"] = self.marker.get("raw", 0) + 1

    def skipped(self, rel: str, reason: str) -> None:
        self.marker["seen"] += 1
        self.marker["skipped"].append({"path": rel, "reason": reason})

    def publish(self, dst: str, checksum: Optional[str] = None) -> Dict[str, Any]:
        """Record the finished shard file (size, checksum) and write the marker atomically.

        `checksum` is the file's shards.file_checksum() when the writer already computed it
        (ShardWriter.close(checksum=True)); otherwise the file is hashed here.
        """
        m = self.marker
        path = os.path.join(dst, m["file"])
        m["num_samples"] = sum(m["kinds"].values())
        m["size"] = os.path.getsize(path)
        m["checksum"] = shards.file_checksum(path) if checksum is None else checksum
        shards.write_json_atomic(_marker_path(dst, self.k), m)
        return m


class Unrecoverable(PackError):
    """A shard file whose marker cannot be rebuilt from it (the message says why)."""


def rebuild_marker(dst: str, k: int, plan: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Write shard k's marker again from the shard file itself; None if there is no file.

    A finished shard without a marker is what a pack killed between publishing the shard and
    its marker leaves, and what a finished pack that lost meta.json is (the merge removes the
    markers). It is taken only as verify_pack checks a pack: every record is read and its image
    decoded, and the records must be exactly the files the plan assigns to the shard, in order
    (the plan's digest of that list). A shard from which files were skipped cannot be taken:
    the names of those files were in the lost marker alone. The counts per kind of image are
    not in a shard either; the marker records them as "unrecorded". Raises Unrecoverable if the
    file is damaged, is not the plan's, or had skipped files.
    """
    from engine.data.verify import check_record  # it decodes: only a repair needs it

    name = shards.shard_name(k)
    path = os.path.join(dst, name)
    if not os.path.exists(path):
        return None
    planned = plan["shards"][k]
    try:
        shards.check_shard_file(path)
        kept: List[Tuple[str, int]] = []
        nbytes = n_raw = 0
        with shards.open_env(path).begin(buffers=True) as txn:
            n = txn.stat()["entries"]
            for i in range(n):
                value = txn.get(shards.record_key(i))
                raw = None if value is None else bytes(value)
                problem = check_record(raw, len(plan["classes"]))
                if problem or raw is None:
                    raise Unrecoverable("%s record %d: %s (the shard is damaged)"
                                        % (path, i, problem or "missing"))
                rec = shards.unpack_record(raw)
                kept.append((rec["path"], int(rec["label"])))
                nbytes += len(raw)
                n_raw += shards.is_raw(rec)
    except Unrecoverable:
        raise
    except shards.ShardError as exc:
        raise Unrecoverable(str(exc).split("; ")[0]) from None
    except Exception as exc:  # noqa: BLE001 - LMDB's errors of a damaged file, not imported here
        raise Unrecoverable("%s cannot be read (%s)" % (path, " ".join(str(exc).split()))) \
            from None
    finally:
        # The pack may rewrite this very file next (or fork): no environment of it may stay.
        shards.close_all_envs()
    if len(kept) < planned["num_files"]:
        raise Unrecoverable(
            "%s holds %d of the %d files planned for it: the names of the %d skipped file(s) "
            "and why were recorded only in its marker and meta.json, which are gone"
            % (path, len(kept), planned["num_files"], planned["num_files"] - len(kept)))
    if _shard_digest(kept) != planned["files_sha256"]:
        raise Unrecoverable(
            "%s does not hold the files %s assigns to it (%d records, %d files planned): it is "
            "from another pack" % (path, PLAN_FILE, len(kept), planned["num_files"]))
    m = {"file": name, "fingerprint": plan["fingerprint"], "seen": planned["num_files"],
         "num_samples": len(kept), "kinds": {"unrecorded": len(kept)} if kept else {},
         "skipped": [], "bytes": nbytes, "size": os.path.getsize(path),
         "checksum": shards.file_checksum(path)}
    if n_raw:
        m["raw"] = n_raw
    shards.write_json_atomic(_marker_path(dst, k), m)
    return m


def rebuild_markers(dst: str, plan: Dict[str, Any], among: Iterable[int], log: Log
                    ) -> Tuple[List[int], List[str]]:
    """Rebuild the markers of the shards of `among` whose file is there but which have no
    marker at all (see rebuild_marker; a marker of another kind, e.g. one without a checksum,
    means the shard is packed again).

    Returns (the shards whose marker was rebuilt, a problem line for each one that could not
    be). A shard another pack is writing right now is left alone (it is a problem line).
    """
    done: List[int] = []
    problems: List[str] = []
    present = [k for k in among if os.path.exists(os.path.join(dst, shards.shard_name(k)))]
    todo = [k for k in present if not os.path.exists(_marker_path(dst, k))]
    problems += ["%s has a marker that does not match %s (another pack's, or one written before "
                 "markers recorded checksums)" % (os.path.join(dst, shards.shard_name(k)),
                                                  PLAN_FILE)
                 for k in present if k not in todo]
    if not todo:
        return done, problems
    try:  # the merge removed the folder of the markers and locks
        os.makedirs(os.path.join(dst, PROGRESS_DIR), exist_ok=True)
    except OSError as exc:
        raise PackError(disk_error_message(exc, os.path.join(dst, PROGRESS_DIR))) from None
    log("%s: %d finished shard(s) have no marker; checking them as verify_pack does (every "
        "image is decoded) to rebuild their markers" % (dst, len(todo)))
    for k in todo:
        path = os.path.join(dst, shards.shard_name(k))
        try:
            with acquire(shard_lock_path(dst, k), refused=lambda holder: (
                    "%s is being written by another pack right now (%s)" % (path, holder))):
                if os.path.exists(_marker_path(dst, k)):  # written meanwhile by its pack
                    continue
                if rebuild_marker(dst, k, plan) is not None:
                    done.append(k)
        except (LockError, Unrecoverable) as exc:
            problems.append(str(exc))
        except OSError as exc:
            raise PackError(disk_error_message(exc, _marker_path(dst, k))) from None
    if done:
        log("%s: rebuilt the markers of %d shard(s) from the shard files (the counts per kind "
            "of image are not in a shard: 'unrecorded')" % (dst, len(done)))
    return done, problems


def forget(dst: str, ks: Iterable[int]) -> None:
    """Remove the markers of shards `ks`, so that the pack writes them again."""
    for k in ks:
        try:
            os.remove(_marker_path(dst, k))
        except FileNotFoundError:
            pass


def drop_damaged(dst: str, plan: Dict[str, Any], among: Iterable[int]) -> List[str]:
    """Of the shards of `among` that have a marker, forget those whose file no longer matches
    the size and checksum the marker recorded (marker and file removed), so that the pack
    writes them again; one line per shard dropped."""
    dropped = []
    for k in among:
        m = read_marker(dst, k, plan["fingerprint"])
        if m is None:
            continue
        path = os.path.join(dst, m["file"])
        size = os.path.getsize(path)
        if size != m["size"]:
            why = "%d bytes, its marker says %d" % (size, m["size"])
        elif shards.file_checksum(path) != m["checksum"]:
            why = "checksum differs from its marker"
        else:
            continue
        for f in (_marker_path(dst, k), path):
            try:
                os.remove(f)
            except FileNotFoundError:
                pass
        dropped.append("%s: %s" % (m["file"], why))
    return dropped
