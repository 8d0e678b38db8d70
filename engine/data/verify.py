"""Check a packed split against its meta.json: files, sizes, checksums, record counts, records.

Levels: `fast` reads every shard once for its checksum (disk speed, nothing decoded); the default
also checks each shard's LMDB header and record keys, and decodes every record (or a random
sample of them) as the loader would. Splits packed before checksums existed are checked for
everything else, and the report says their checksums are absent.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import MISSING, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import lmdb

from engine.cli import option
from engine.data import shards
from engine.data.decode import DecodeError, decode_bgr

__all__ = ["VerifyConfig", "SplitReport", "verify_split", "verify", "find_splits",
           "shard_problem", "check_record"]


@dataclass
class VerifyConfig:
    """tools/verify_pack.py's options (engine.cli derives its parser from these fields); the
    defaults of verify() are theirs."""

    path: str = option(MISSING, "a packed split (OUT/train) or a pack's root (OUT)", "path")
    fast: bool = option(False, "sizes and checksums only (runs at disk speed, decodes nothing)")
    sample: Optional[int] = option(None, "decode K random records per split instead of all",
                                   metavar="K")
    seed: int = option(0, "which records --sample picks")


@dataclass
class SplitReport:
    """What verify_split() found; `mismatches` lists every problem (empty: all good), `damaged`
    the shard files they were found in, in shard order (a problem with meta.json itself names
    no shard)."""

    split_dir: str
    fast: bool
    mismatches: List[str] = field(default_factory=list)
    damaged: List[str] = field(default_factory=list)
    shards: int = 0
    records: int = 0
    bytes: int = 0                # on disk, of the shards present
    checksums: str = "absent"     # present | partial | absent (packed before they existed)
    checksummed_bytes: int = 0
    decoded: int = 0
    seconds: float = 0.0


def find_splits(path: str) -> List[str]:
    """`path` itself if it is a split (has meta.json or plan.json), else its split sub-folders."""
    def is_split(d: str) -> bool:
        return any(os.path.exists(os.path.join(d, f)) for f in (shards.META_FILE, "plan.json"))

    if not os.path.isdir(path):
        raise shards.ShardError("%s does not exist or is not a folder" % path)
    if is_split(path):
        return [path]
    found = sorted(os.path.join(path, e.name) for e in os.scandir(path)
                   if e.is_dir() and not e.name.startswith(".") and is_split(e.path))
    if not found:
        raise shards.ShardError("%s is neither a packed split (no meta.json) nor a folder of "
                                "packed splits" % path)
    return found


def verify_split(split_dir: str, sample: Optional[int] = None, fast: bool = False,
                 seed: int = VerifyConfig.seed) -> SplitReport:
    """The report of one split; its mismatches list every problem found (empty: all good)."""
    t0 = time.time()
    # Files may have changed since this process last opened them (a verifier rerun after a
    # repair); other readers in the process reopen lazily.
    shards.close_all_envs()
    rep = SplitReport(split_dir, fast)
    bad = rep.mismatches
    try:
        meta = shards.read_meta(split_dir, check_files=False)  # each shard is checked below
    except shards.ShardError as exc:
        bad.append(str(exc))
        rep.seconds = time.time() - t0
        return rep
    entries = meta["shards"]
    rep.shards, rep.records = len(entries), meta["num_samples"]
    with_sums = sum(1 for e in entries if e.get("checksum"))
    rep.checksums = ("present" if with_sums == len(entries) and entries
                        else "partial" if with_sums else "absent")
    readable = []  # shards whose records can be read safely
    for e in entries:
        path = os.path.join(split_dir, e["file"])
        if os.path.exists(path):
            rep.bytes += os.path.getsize(path)
        problem = shard_problem(split_dir, e, checksum=True, structure=not fast, rep=rep)
        if problem:
            bad.append("%s: %s" % (e["file"], problem))
            rep.damaged.append(e["file"])
        elif not fast:
            readable.append(e)
    if not fast and readable:
        _check_records(split_dir, meta, readable, sample, seed, rep)
    order = {e["file"]: i for i, e in enumerate(entries)}
    rep.damaged = sorted(set(rep.damaged), key=order.__getitem__)
    rep.seconds = time.time() - t0
    return rep


def shard_problem(split_dir: str, entry: Dict[str, Any], checksum: bool = True,
                  structure: bool = True, rep: Optional[SplitReport] = None) -> Optional[str]:
    """What is wrong with the shard file of one meta.json entry, None if nothing: missing, a
    size other than recorded, then (`checksum`) a checksum other than recorded, then
    (`structure`) an LMDB header or record keys other than the contract's. Only the first
    problem found is named. `rep` counts the bytes checksummed."""
    path = os.path.join(split_dir, entry["file"])
    if not os.path.exists(path):
        return "missing"
    size = os.path.getsize(path)
    if "size" in entry and size != entry["size"]:
        return "%d bytes, meta.json says %d (truncated or replaced)" % (size, entry["size"])
    if checksum and entry.get("checksum"):
        got = shards.file_checksum(path)
        if rep is not None:
            rep.checksummed_bytes += size
        if got != entry["checksum"]:
            return "checksum differs from meta.json (the file is damaged)"
    if not structure:
        return None
    try:
        shards.check_shard_file(path)
    except shards.ShardError as exc:
        return str(exc)
    return _check_keys(path, int(entry["num_samples"]))


def _check_keys(path: str, expected: int) -> Optional[str]:
    """None if the shard holds exactly the keys 0..expected-1 (the contract)."""
    try:
        env = shards.open_env(path)
    except shards.ShardError as exc:
        return str(exc)
    try:
        with env.begin() as txn:
            n = txn.stat()["entries"]
            if n != expected:
                return "holds %d records, meta.json says %d" % (n, expected)
            if n == 0:
                return None
            cur = txn.cursor()
            # n distinct 8-byte keys from 0 to n-1 are exactly 0..n-1
            first = cur.first() and cur.key()
            last = cur.last() and cur.key()
            if first != shards.record_key(0) or last != shards.record_key(n - 1):
                return "record keys are not 0..%d" % (n - 1)
    except lmdb.Error as exc:
        return "unreadable (%s)" % exc
    return None


def _check_records(split_dir: str, meta: Dict[str, Any], entries: List[Dict[str, Any]],
                   sample: Optional[int], seed: int, rep: SplitReport) -> None:
    n_classes = len(meta["classes"])
    index = [(e, j) for e in entries for j in range(int(e["num_samples"]))]
    if sample is not None and sample < len(index):
        index = random.Random(seed).sample(index, sample)
        index.sort(key=lambda x: (x[0]["file"], x[1]))
    bad = rep.mismatches
    by_file: Dict[str, List[int]] = {}
    for e, j in index:
        by_file.setdefault(e["file"], []).append(j)
    n_raw = 0
    for name, local in by_file.items():
        with shards.open_env(os.path.join(split_dir, name)).begin() as txn:
            for j in local:
                problem, raw = _check(txn.get(shards.record_key(j)), n_classes)
                rep.decoded += 1
                n_raw += raw
                if problem:
                    bad.append("%s record %d: %s" % (name, j, problem))
                    rep.damaged.append(name)
    whole = len(index) == sum(int(e["num_samples"]) for e in meta["shards"])
    if whole and n_raw != meta.get("raw_records", 0):  # meta.json's own claim, and its version's
        bad.append("%s: %d raw records, meta.json says %d"
                   % (shards.META_FILE, n_raw, meta.get("raw_records", 0)))
    elif n_raw and meta["version"] < shards.RAW_VERSION:
        bad.append("%s: raw records in a version-%d split (version %d holds JPEGs only)"
                   % (shards.META_FILE, meta["version"], meta["version"]))


def check_record(value: Optional[bytes], n_classes: int) -> Optional[str]:
    """What is wrong with a shard record's bytes; see _check."""
    return _check(value, n_classes)[0]


def _check(value: Optional[bytes], n_classes: int) -> Tuple[Optional[str], bool]:
    """(what is wrong with a shard record's bytes, whether it is a raw record). The problem is
    None for a complete record whose image decodes to its recorded size, or whose raw pixels
    are exactly its recorded shape, and whose label is one of `n_classes`. Damage inside raw
    pixels shows only in the shard's checksum, which every pack with raw records has."""
    if value is None:
        return "missing", False
    try:
        rec = shards.unpack_record(value)
    except Exception as exc:  # msgpack raises several types for damaged bytes
        return "not a msgpack record (%s)" % exc, False
    if not isinstance(rec, dict) or not {"label", "height", "width", "path"} <= set(rec) \
            or not ("image" in rec) ^ shards.is_raw(rec):
        return "lacks required fields", False
    where = " (%s)" % rec["path"]
    if not (isinstance(rec["label"], int) and 0 <= rec["label"] < n_classes):
        return "label %r outside 0..%d%s" % (rec["label"], n_classes - 1, where), False
    if shards.is_raw(rec):
        problem = shards.raw_problem(rec)
        return (problem + where if problem else None), True
    try:
        img = decode_bgr(rec["image"])
    except DecodeError as exc:
        return "image does not decode: %s%s" % (exc, where), False
    if img.shape != (rec["height"], rec["width"], 3):
        return ("image is %s, record says %dx%d%s"
                % (img.shape, rec["height"], rec["width"], where)), False
    return None, False


def verify(path: str, sample: Optional[int] = None, fast: bool = False,
           seed: int = VerifyConfig.seed) -> List[SplitReport]:
    """Verify a split, or every split under a pack's root; one report per split."""
    return [verify_split(d, sample=sample, fast=fast, seed=seed) for d in find_splits(path)]
