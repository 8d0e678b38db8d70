"""meta.json of a packed split, made from its plan and the markers of its shards: written once
every shard is there (`merge_split`, by whichever node finds them all, or by `merge_pack` after a
multi-node pack), and rewritten for the shards a repair packed again (`replace_shards`).

meta.json lists the shards in plan order, whoever packed them, and its counts are the sums of
the markers', so its content does not depend on which node packed what; it is published by
atomic rename, so several nodes may write it at once. The markers and plan.json themselves are
engine.data.plan's: this module reads them only through it. `merge_pack` also rebuilds, through
plan.rebuild_markers, the markers of finished shards that lost theirs, and says why a split
cannot be merged yet (which shards are missing, which cannot be taken as they are).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence

from engine.data import shards
from engine.data.plan import (
    PLAN_FILE,
    STORAGE_DEFAULTS,
    PackError,
    drop_progress,
    missing,
    read_marker,
    read_plan,
    rebuild_markers,
)
from engine.errors import disk_error_message

__all__ = ["merge_split", "replace_shards", "merge_pack"]

Log = Callable[[str], None]


class _Stats:
    def __init__(self) -> None:
        self.seen = self.kept = 0
        self.kinds: Counter = Counter()
        self.skipped: List[Dict[str, str]] = []
        self.bytes = 0
        self.raw = 0

    def add_marker(self, m: Dict[str, Any]) -> None:
        self.seen += m["seen"]
        self.kept += m["num_samples"]
        self.kinds.update(m["kinds"])
        self.skipped.extend(m["skipped"])
        self.bytes += m["bytes"]
        self.raw += m.get("raw", 0)


def _meta_from(plan: Dict[str, Any], markers: Dict[int, Dict[str, Any]], dst: str
               ) -> Dict[str, Any]:
    stats = _Stats()
    entries = []
    for k in range(len(plan["shards"])):  # in shard order, whoever packed them
        m = markers[k]
        stats.add_marker(m)
        entries.append({"file": m["file"], "num_samples": m["num_samples"], "size": m["size"],
                        "checksum": m["checksum"]})
    meta = {
        "format": shards.FORMAT,
        "version": shards.RAW_VERSION if stats.raw else shards.JPEG_VERSION,
        "split": plan["split"],
        "num_samples": stats.kept,
        "classes": plan["classes"],
        "shards": entries,
        "skipped": stats.skipped,
        "kinds": {k: v for k, v in sorted(stats.kinds.items())},
        "bytes": stats.bytes,
        "seen": stats.seen,
        "seed": plan["seed"],
        "shard_size": plan["shard_size"],
        "max_side": plan["max_side"],
        "shuffled": plan["shuffled"],
        "fingerprint": plan["fingerprint"],
    }
    # Only packs that chose other storage carry these keys: a JPEG-only pack's meta.json is the
    # version-1 file it always was.
    meta.update({k: plan[k] for k in STORAGE_DEFAULTS if k in plan})
    if stats.raw:
        meta["raw_records"] = stats.raw
    return meta


def merge_split(dst: str, plan: Dict[str, Any], log: Log) -> Optional[Dict[str, Any]]:
    """Write meta.json from the markers if every shard is present; else return None.

    Idempotent, and safe for several nodes at once: the content is a function of the markers,
    and it is published by atomic rename.
    """
    meta_path = os.path.join(dst, shards.META_FILE)
    old = shards.read_json(meta_path)
    if old is not None and old.get("fingerprint") == plan["fingerprint"]:
        drop_progress(dst)
        return old
    fp = plan["fingerprint"]
    markers = {k: m for k in range(len(plan["shards"]))
               for m in [read_marker(dst, k, fp)] if m is not None}
    if len(markers) < len(plan["shards"]):
        old = shards.read_json(meta_path)  # another node may have merged (and removed markers) meanwhile
        return old if old is not None and old.get("fingerprint") == fp else None
    meta = _meta_from(plan, markers, dst)
    try:
        shards.write_json_atomic(meta_path, meta)
    except OSError as exc:
        raise PackError(disk_error_message(exc, meta_path)) from None
    drop_progress(dst)
    log("%s: all %d shards present; wrote %s" % (plan["split"], len(plan["shards"]), meta_path))
    return meta


def replace_shards(dst: str, plan: Dict[str, Any], meta: Dict[str, Any],
                   markers: Dict[int, Dict[str, Any]], log: Log) -> Dict[str, Any]:
    """Rewrite the meta.json of a finished split whose shards `markers` (by shard index) were
    packed again (a repair): their size and checksum become the new files'; nothing else
    changes, as the same files packed the same way give the same records. A repacked shard of
    another record count means the input changed behind the fingerprint: PackError."""
    entries = [dict(e) for e in meta["shards"]]
    for k, m in sorted(markers.items()):
        e = entries[k]
        if e["file"] != m["file"] or e["num_samples"] != m["num_samples"]:
            raise PackError(
                "%s repacked holds %d records where %s recorded %d: the input files changed "
                "since the pack although their names, sizes and times did not; delete %s and "
                "pack it again" % (m["file"], m["num_samples"], shards.META_FILE,
                                   e["num_samples"], dst))
        e.update(size=m["size"], checksum=m["checksum"])
    repaired = dict(meta, shards=entries)
    meta_path = os.path.join(dst, shards.META_FILE)
    try:
        shards.write_json_atomic(meta_path, repaired)
    except OSError as exc:
        raise PackError(disk_error_message(exc, meta_path)) from None
    drop_progress(dst)
    log("%s: repacked %s; wrote %s" % (plan["split"], ", ".join(
        shards.shard_name(k) for k in sorted(markers)), meta_path))
    return repaired


def _merge_refusal(dst: str, plan: Dict[str, Any], problems: List[str]) -> str:
    """Why the split `dst` cannot be merged: its absent shards and the unusable ones."""
    n = len(plan["shards"])
    absent = [shards.shard_name(k) for k in missing(dst, plan)
              if not os.path.exists(os.path.join(dst, shards.shard_name(k)))]
    parts = []
    if absent:
        parts.append("%d of %d shards are missing (%s%s); rerun the node(s) that own them "
                     "(shard k belongs to node k mod --num-nodes), then merge again"
                     % (len(absent), n, ", ".join(absent[:8]), " ..." if len(absent) > 8 else ""))
    if problems:
        what = problems[0] + (" (and %d more)" % (len(problems) - 1) if len(problems) > 1
                              else "")
        what += ("; rerun the pack with --data and the arguments it was packed with: it packs "
                 "those shards again")
        parts.append("%d of %d shards are on disk without a usable marker and cannot be taken "
                     "as they are: %s" % (len(problems), n, what))
    return "cannot merge %s: %s" % (dst, "; ".join(parts))


def merge_pack(out: str, splits: Optional[Sequence[str]] = None, log: Log = print
               ) -> Dict[str, Any]:
    """Write meta.json of each split of a multi-node pack from its plan and shard markers.

    A finished shard without a marker (a node killed between the two, or a finished pack that
    lost meta.json) gets its marker rebuilt from the shard file (rebuild_markers). Idempotent.
    Raises PackError naming the missing shards, and those that cannot be taken as they are,
    while any is left (the split then stays unreadable, as it has no meta.json).
    """
    if not os.path.isdir(out):
        raise PackError("--out %s does not exist or is not a folder" % out)
    if splits is None:
        splits = [s for s in ("train", "val") if os.path.exists(os.path.join(out, s, PLAN_FILE))]
        if not splits:
            raise PackError("%s holds no split with a %s: nothing to merge (pack it first)"
                            % (out, PLAN_FILE))
    done = []
    for split in splits:
        dst = os.path.join(out, split)
        plan = read_plan(dst)
        if plan is None:
            raise PackError("%s has no readable %s; pack it first" % (dst, PLAN_FILE))
        meta = merge_split(dst, plan, log)
        problems: List[str] = []
        if meta is None:
            # Shards on disk without a marker: finished, but their markers were lost (a kill
            # between shard and marker, or a finished pack that lost meta.json).
            rebuilt, problems = rebuild_markers(dst, plan, missing(dst, plan), log)
            if rebuilt:
                meta = merge_split(dst, plan, log)
        if meta is None:
            raise PackError(_merge_refusal(dst, plan, problems))
        log("%s: merged, %d records in %d shards" % (split, meta["num_samples"],
                                                    len(meta["shards"])))
        done.append({"split": split, "num_samples": meta["num_samples"],
                     "shards": len(meta["shards"])})
    return {"out": os.path.abspath(out), "splits": done}
