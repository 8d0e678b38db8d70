"""ImageNet folder -> LMDB shards (see shards.py for the format, plan.py for the plan).

Every file is sniffed by content, strictly decoded, and either kept byte for byte (a JPEG that
libjpeg-turbo decodes to 3 channels), converted to an RGB JPEG at quality 95 (PNG, WebP, BMP,
TIFF, CMYK/YCCK JPEG, or anything larger than --max-side), stored as raw pixels (--raw-fraction),
or skipped with a reason (empty, truncated, corrupt, not an image): convert.py decides. Shards
are independent: forked worker processes pack them in parallel, each shard by one worker from
its first file to its last.

Which file goes to which shard is the plan (plan.py), written first to <split>/plan.json. Node r
of N packs the shards k with k mod N == r, so several machines can pack into one shared folder.

Resumability: a shard is written under a temporary name and renamed when complete, then a small
marker records its counts and checksum; a rerun keeps every shard whose marker matches the
plan and rewrites the rest. meta.json comes last, written from the markers by whichever node
finds them all present (or by --merge). A pack killed at any moment and rerun therefore ends with
every file exactly once.
"""
from __future__ import annotations

import errno
import multiprocessing as mp
import multiprocessing.connection  # noqa: F401  (mp.connection.wait)
import os
import shutil
import sys
import time
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import lmdb

from engine import libjpeg
from engine.cli import option
from engine.data import merge, plan, pool, shard_writer, shards, verify
from engine.data.convert import JPEG_QUALITY, RESTART_INTERVAL, process_file, stores_raw
from engine.data.cpus import usable_cores
from engine.data.decode import roi_available
from engine.data.plan import PackError, Scan
from engine.dist import env as dist_env
from engine.errors import disk_error_message
from engine.locks import FileLock, acquire

__all__ = ["PackError", "PackConfig", "PackResult", "PackedSplit", "pack_imagenet",
           "resolve_nodes", "process_file", "pack_workers", "stores_raw", "LOCK_FILE",
           "JPEG_QUALITY"]

LOCK_FILE = ".pack.lock"
# A worker adds its files to the shared progress counter (a lock and a shared value) this many
# at a time: per file it cost ~2 us, and a few milliseconds of files still move the bar smoothly.
_COUNT_EVERY = 8


def pack_workers() -> int:
    """Packing processes: every usable core (affinity and cgroup quota; the packer is alone)."""
    return usable_cores()


# ---------------------------------------------------------------------------------------------
# Nodes


def resolve_nodes(num_nodes: Optional[int], node_rank: Optional[int],
                  env: Mapping[str, str]) -> Tuple[int, int, str]:
    """(number of nodes, this node's rank, where that came from) for a multi-node pack: see
    engine.dist.env.resolve_nodes; a bad layout is a PackError."""
    return dist_env.resolve_nodes(num_nodes, node_rank, env, error=PackError)


def _lock(path: str, what: str) -> FileLock:
    """The pack's exclusive lock on `path`; PackError naming the holder if another pack has it.

    flock dies with its process, so a killed pack never blocks the rerun.
    """
    return acquire(path, error=PackError, refused=lambda holder: (
        "%s is being written by another pack (%s; lock file %s). Wait for it to finish or stop "
        "it, then rerun" % (what, holder, path)))


# ---------------------------------------------------------------------------------------------
# Packing one shard


def _disk_message(exc: BaseException, path: str, needed: int) -> str:
    if isinstance(exc, OSError):
        return disk_error_message(exc, path, needed)
    # LMDB reports a short write on a full disk as EIO ("Input/output error"): tell a full disk
    # from a real I/O error by the space left.
    text = str(exc)
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        free = None
    if "No space" in text or "MDB_MAP_FULL" in text or (free is not None and free < 16 << 20):
        return disk_error_message(OSError(errno.ENOSPC, "No space left on device"), path, needed)
    return "cannot write %s: LMDB error (%s)%s" % (
        path, text, "" if free is None else "; %.1f MB free there" % (free / 1e6))


def _pack_shard(job: Dict[str, Any],
                records_done: Callable[[], None] = lambda: None) -> Dict[str, Any]:
    """Write one complete shard (decode, validate, serialise, append), then its marker.

    records_done() is called when every record is appended: what is left is short and mostly
    waiting for the disk (the checksum runs meanwhile), so the next shard may start.

    Shards are independent, so workers (and nodes) write different shards concurrently and
    nothing but a small marker crosses a process boundary: piping every image back to one writer
    made that process the bottleneck. The shard appears under its final name only when complete;
    a per-shard lock keeps two packs of different node counts from writing the same file.
    """
    src, dst, k, items, fp, max_side = (job[x] for x in
                                        ("src", "dst", "k", "items", "fp", "max_side"))
    raw_fraction, quality, seed = job.get("raw_fraction", 0.0), job.get("jpeg_quality"), \
        job.get("seed", 0)
    restarts = job.get("restart_interval", 0)
    first = k * job.get("shard_size", 0)  # the plan position of the shard's first file
    name = shards.shard_name(k)
    path = os.path.join(dst, name)
    writer = None
    with _lock(plan.shard_lock_path(dst, k), "%s of %s" % (name, os.path.basename(dst))):
        try:
            done = plan.read_marker(dst, k, fp)  # finished by another pack since this one looked
            if done is not None:
                pool.count(len(items))
                return done
            tally = plan.ShardTally(k, fp)
            writer = shard_writer.ShardWriter(path)
            for j, (rel, label) in enumerate(items):
                raw = stores_raw(seed, first + j, raw_fraction)
                r = process_file(os.path.join(src, rel), max_side, raw, quality, restarts)
                if "skip" in r:
                    tally.skipped(rel, r["skip"])
                else:
                    value = shards.pack_raw_record(r["pixels"], label, rel) if raw else \
                        shards.pack_record(r["image"], label, r["height"], r["width"], rel)
                    writer.append(value)
                    tally.kept(r["kind"], len(value), raw)
                if j % _COUNT_EVERY == _COUNT_EVERY - 1:
                    pool.count(_COUNT_EVERY)
            if len(items) % _COUNT_EVERY:
                pool.count(len(items) % _COUNT_EVERY)
            records_done()
            checksum = writer.close(checksum=True)  # hashed while the disk finishes writing
            writer = None
            return tally.publish(dst, checksum)
        except (lmdb.Error, OSError) as exc:
            if writer is not None:
                writer.abort()
            raise PackError(_disk_message(exc, path, job.get("needed", 0))) from None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise




# ---------------------------------------------------------------------------------------------
# A split: plan, pack this node's shards, merge


def _jobs(sc: Scan, dst: str, ks: Sequence[int]) -> List[Dict[str, Any]]:
    needed = sum(sc.source_bytes[k] for k in ks)
    p = sc.plan
    return [{"src": sc.src, "dst": dst, "k": k, "items": sc.shard_items(k), "fp": sc.fingerprint,
             "max_side": p["max_side"], "needed": needed, "seed": p["seed"],
             "shard_size": p["shard_size"], "raw_fraction": p.get("raw_fraction", 0.0),
             "jpeg_quality": p.get("jpeg_quality"),
             "restart_interval": p.get("restart_interval", 0)} for k in ks]


def _run_jobs(jobs: List[Dict[str, Any]], workers: int, counter, bar) -> Dict[int, Dict[str, Any]]:
    """Pack the shards of `jobs` (in this process, or in `workers` forked ones), moving `bar`;
    returns their markers by shard index."""
    if workers == 0:
        markers = {}
        for job in jobs:
            markers[job["k"]] = _pack_shard(job)
            bar.update(len(job["items"]))
        return markers
    start, shown = counter.value, [0]

    def show():
        now = counter.value - start
        bar.update(now - shown[0])
        shown[0] = now

    return pool.run(_pack_shard, jobs, workers, counter, show)


def _damaged(dst: str, meta: Dict[str, Any], full: bool) -> List[Tuple[int, str]]:
    """(shard index, what is wrong) of a finished split's shards that fail their check: with
    `full`, verification (sizes and checksums; every record of a shard without a checksum),
    otherwise the check every rerun makes (each file present at its recorded size)."""
    entries = meta["shards"]
    if not full:
        found = [(k, verify.shard_problem(dst, e, checksum=False, structure=False))
                 for k, e in enumerate(entries)]
        return [(k, "%s: %s" % (entries[k]["file"], why)) for k, why in found if why]
    rep = verify.verify_split(dst, fast=all(e.get("checksum") for e in entries))
    if rep.mismatches and not rep.damaged:  # meta.json itself
        raise PackError("%s: %s" % (dst, rep.mismatches[0]))
    index = {e["file"]: k for k, e in enumerate(entries)}
    return [(index[name], next(m for m in rep.mismatches if m.startswith(name)))
            for name in rep.damaged]


def _pack_split(sc: Scan, out: str, workers: int, nodes: Tuple[int, int],
                counter, progress: bool, log, repair: bool = False) -> "PackedSplit":
    split, fp = sc.split, sc.fingerprint
    dst = os.path.join(out, split)
    old = plan.finished(dst, fp, sc.plan, repair=repair)
    if old is not None:
        damaged = _damaged(dst, old, full=repair)
        if damaged and not repair:
            raise PackError(
                "%s is packed but %d of its %d shard(s) are damaged (%s%s); rerun this command "
                "with --repair to repack only those from the plan"
                % (dst, len(damaged), len(old["shards"]), "; ".join(d for _, d in damaged[:4]),
                   "; ..." if len(damaged) > 4 else ""))
        if damaged:
            return _repair_split(sc, dst, old, damaged, workers, counter, progress, log)
        log("%s: already packed (%d records in %s; %s), nothing to do"
            % (split, old["num_samples"], dst,
               "every shard verified" if repair else
               "every shard present at its recorded size; --repair also checks the checksums"))
        return PackedSplit(split, seen=len(sc.items), kept=old["num_samples"],
                           skipped=len(old["skipped"]), kinds=old.get("kinds", {}),
                           bytes=old.get("bytes", 0), seconds=0.0, done_before=True)

    plan.prepare(dst, sc.plan)
    n_nodes, rank = nodes
    mine = [k for k in range(len(sc.plan["shards"])) if k % n_nodes == rank]
    if repair:  # finished shards whose file changed since are packed again
        for line in plan.drop_damaged(dst, sc.plan, mine):
            log("%s: damaged %s; packing it again" % (split, line))
    todo = plan.missing(dst, sc.plan, among=mine)
    if len(todo) < len(mine) and todo:
        log("%s: resuming, %d of %d shards already complete"
            % (split, len(mine) - len(todo), len(mine)))
    jobs = _jobs(sc, dst, todo)
    todo_files = sum(len(j["items"]) for j in jobs)
    mine_files = sum(sc.plan["shards"][k]["num_files"] for k in mine)
    t0 = time.time()
    bar = _progress(mine_files, mine_files - todo_files, "pack " + split, progress)
    try:
        _run_jobs(jobs, workers, counter, bar)
    finally:
        bar.close()
    seconds = time.time() - t0

    meta = merge.merge_split(dst, sc.plan, log)
    ran: Dict[str, Any] = dict(seconds=seconds, processed=todo_files, done_before=False, node=rank,
                               num_nodes=n_nodes, shards_packed=len(todo))
    if meta is None:
        absent = plan.missing(dst, sc.plan)
        log("%s: node %d of %d packed its %d shards; %d shard(s) of other nodes still missing "
            "(e.g. %s). The last node to finish writes meta.json, or run --merge."
            % (split, rank, n_nodes, len(mine), len(absent),
               shards.shard_name(absent[0]) if absent else "-"))
        return PackedSplit(split, merged=False, seen=todo_files, kept=None, skipped=0, kinds={},
                           bytes=0, **ran)
    return PackedSplit(split, merged=True, seen=meta.get("seen", len(sc.items)),
                       kept=meta["num_samples"], skipped=len(meta["skipped"]),
                       kinds=meta.get("kinds", {}), bytes=meta.get("bytes", 0),
                       skipped_list=meta["skipped"], **ran)


def _repair_split(sc: Scan, dst: str, old: Dict[str, Any], damaged: List[Tuple[int, str]],
                  workers: int, counter, progress: bool, log) -> "PackedSplit":
    """Pack the damaged shards of a finished split again, from the plan, and rewrite its
    meta.json for them."""
    for _k, line in damaged:
        log("%s: damaged %s" % (sc.split, line))
    ks = [k for k, _ in damaged]
    plan.forget(dst, ks)  # a marker left beside a damaged shard must not stand for it
    plan.prepare(dst, sc.plan)
    jobs = _jobs(sc, dst, ks)
    files = sum(len(j["items"]) for j in jobs)
    t0 = time.time()
    bar = _progress(files, 0, "repair " + sc.split, progress)
    try:
        markers = _run_jobs(jobs, workers, counter, bar)
    finally:
        bar.close()
    meta = merge.replace_shards(dst, sc.plan, old, markers, log)
    return PackedSplit(sc.split, seen=meta.get("seen", len(sc.items)), kept=meta["num_samples"],
                       skipped=len(meta["skipped"]), kinds=meta.get("kinds", {}),
                       bytes=meta.get("bytes", 0), seconds=time.time() - t0, done_before=False,
                       processed=files, shards_packed=len(ks),
                       repaired=[shards.shard_name(k) for k in ks])


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr, disable=not enabled)


@dataclass
class PackConfig:
    """tools/pack_imagenet.py's options (engine.cli derives its parser from these fields); the
    defaults of pack_imagenet() are theirs."""

    out: str = option(MISSING, "output folder", "--out", metavar="OUT")
    data: Optional[str] = option(None, "ImageNet root folder (not needed with --merge)",
                                 "--data", metavar="ROOT")
    splits: Optional[str] = option(None, "comma-separated (default: train,val; with --merge: "
                                         "every split that has a plan.json)")
    workers: Optional[int] = option(
        None, lambda: "decoding processes (default: every usable core, %d here)" % pack_workers())
    shard_size: int = option(5000, "files per shard")
    max_side: Optional[int] = option(None, "re-encode images whose long side exceeds this "
                                           "(default: keep all)")
    raw_fraction: float = option(0.0, "fraction of the records stored as raw uint8 pixels "
                                      "(decoded at pack time, capped at --max-side), chosen by "
                                      "--seed; the loader skips decoding them. 0 keeps every "
                                      "record a JPEG (format version 1)")
    jpeg_quality: Optional[int] = option(None, "quality of the JPEGs the packer re-encodes "
                                               "(converted or over --max-side; default %d)"
                                         % JPEG_QUALITY)
    restart_markers: bool = option(
        False, "rewrite every JPEG record losslessly (the same pixels) with a restart marker "
               "after each MCU, so the loader entropy-decodes only a crop's own part of the image "
               "(on ImageNet-sized files: ~1.2x the loader's images per CPU-second, records ~3%% "
               "larger, packing ~1.75x the CPU time)")
    seed: int = option(0, "train record order, and which records --raw-fraction picks")
    strict: bool = option(False, "exit non-zero if any file had to be skipped")
    num_nodes: Optional[int] = option(None, "machines packing into one shared --out (default: "
                                            "from SLURM_* / NNODES / GROUP_RANK, else 1)")
    node_rank: Optional[int] = option(None, "this machine's rank, 0..N-1")
    merge: bool = option(False, "only write meta.json from the shards all nodes packed")
    repair: bool = option(False, "verify a packed split's shards (sizes and checksums; every "
                                 "record of a shard without one) and repack only those that "
                                 "fail, from the plan, with the arguments it was packed with")
    quiet: bool = option(False, "no progress bar")

    def split_list(self) -> Optional[List[str]]:
        """--splits as a list; None when not given."""
        return [s for s in self.splits.split(",") if s] if self.splits is not None else None


@dataclass
class PackedSplit:
    """What pack_imagenet() did for one split. `kept` is None while other nodes' shards are
    missing (`merged` False: meta.json is not written yet)."""

    split: str
    seen: int                # files listed (this node's share while not merged)
    kept: Optional[int]
    skipped: int
    kinds: Dict[str, int]    # "gray", "converted:<kind>", ... -> count
    bytes: int
    seconds: float
    done_before: bool        # already packed with the same input and arguments
    merged: bool = True
    processed: int = 0       # files this run decoded
    node: int = 0
    num_nodes: int = 1
    shards_packed: int = 0
    skipped_list: List[Dict[str, Any]] = field(default_factory=list)  # {path, reason}
    repaired: List[str] = field(default_factory=list)  # shard files packed again by --repair


@dataclass
class PackResult:
    out: str                 # absolute
    workers: int
    num_nodes: int
    node_rank: int
    splits: List[PackedSplit]


def pack_imagenet(data: str, out: str, splits: Sequence[str] = ("train", "val"),
                  workers: Optional[int] = None, shard_size: int = PackConfig.shard_size,
                  max_side: Optional[int] = None, seed: int = PackConfig.seed,
                  strict: bool = False, progress: bool = True, log=print,
                  num_nodes: Optional[int] = None, node_rank: Optional[int] = None,
                  env: Optional[Mapping[str, str]] = None, repair: bool = False,
                  raw_fraction: float = PackConfig.raw_fraction,
                  jpeg_quality: Optional[int] = None,
                  restart_markers: bool = PackConfig.restart_markers) -> PackResult:
    """Pack ROOT/<split>/<wnid>/* into OUT/<split>/ shards; returns a summary per split.

    With several nodes (flags, or the Slurm/torchrun environment `env`, default os.environ),
    this node packs shards k with k mod N == rank; whichever node finds every shard present
    writes meta.json. A rerun over a finished split checks that each shard file is there at
    its recorded size and refuses (PackError) if one is not; raw_fraction of the files (by
    stores_raw) are stored as raw pixels, which makes the split format version 2; with repair=True it verifies the
    shards (engine.data.verify) and packs only those that fail again. Raises PackError on bad
    input, a held lock or a full/read-only disk; with strict=True also when any file had to be
    skipped (the shards are still written, so a rerun after fixing the files only repacks what
    changed).
    """
    if shard_size < 1:
        raise PackError("--shard-size must be at least 1 (got %d)" % shard_size)
    if max_side is not None and max_side < 16:
        raise PackError("--max-side must be at least 16 px (got %d)" % max_side)
    if not 0.0 <= raw_fraction <= 1.0:
        raise PackError("--raw-fraction must be between 0 and 1 (got %g)" % raw_fraction)
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
        raise PackError("--jpeg-quality must be between 1 and 100 (got %d)" % jpeg_quality)
    if restart_markers and not roi_available():
        raise PackError("--restart-markers needs the compiled JPEG decoder (engine.data._jpegroi), "
                        "which this install lacks: get libjpeg-turbo's headers with %s, reinstall "
                        "the engine, then rerun (or pack without --restart-markers)"
                        % libjpeg.HOW_TO_GET)
    storage = plan.storage_options(raw_fraction, jpeg_quality,
                                   RESTART_INTERVAL if restart_markers else 0)
    splits = list(splits)
    bad = [s for s in splits if s not in ("train", "val")]
    if bad or not splits:
        raise PackError("--splits takes train and/or val (got %s)" % ",".join(splits))
    if len(set(splits)) != len(splits):
        raise PackError("--splits names a split twice (got %s)" % ",".join(splits))
    workers = pack_workers() if workers is None else workers
    if workers < 0:
        raise PackError("--workers must be >= 0 (0 = decode in the main process)")
    n_nodes, rank, source = resolve_nodes(num_nodes, node_rank,
                                          os.environ if env is None else env)
    if repair and n_nodes > 1:
        raise PackError("--repair runs on one machine, and this is node %d of %d (from %s); run "
                        "it once with --num-nodes 1" % (rank, n_nodes, source))
    if not os.path.isdir(data):
        raise PackError("--data %s does not exist or is not a folder" % data)
    if os.path.exists(out) and not os.path.isdir(out):
        raise PackError("--out %s exists and is not a folder; choose a folder" % out)
    classes = plan.input_classes(data, splits, log)
    # Every requested split is listed and planned before anything is written, so a missing or
    # malformed split is reported up front, not after hours spent on the others.
    scans = [plan.scan(data, split, classes, seed, shard_size, max_side, storage)
             for split in splits]

    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise PackError(disk_error_message(exc, out)) from None
    lock_name = LOCK_FILE if n_nodes == 1 else ".pack-node%d-of-%d.lock" % (rank, n_nodes)
    with _lock(os.path.join(out, lock_name),
               out if n_nodes == 1 else "%s (node %d of %d)" % (out, rank, n_nodes)):
        if n_nodes > 1:
            log("node %d of %d (from %s): packing shards k with k mod %d == %d"
                % (rank, n_nodes, source, n_nodes, rank))
        counter = mp.get_context("fork").Value("q", 0) if workers > 0 else None
        summaries = [_pack_split(sc, out, workers, (n_nodes, rank), counter, progress, log,
                                 repair=repair) for sc in scans]
    result = PackResult(os.path.abspath(out), workers, n_nodes, rank, summaries)
    for s in summaries:
        if s.merged:
            log(_summary_line(s, out))
        for item in s.skipped_list[:20]:
            log("  skipped %s: %s" % (item["path"], item["reason"]))
    skipped = sum(s.skipped for s in summaries)
    if strict and skipped:
        raise PackError("--strict: %d file(s) were skipped (listed in meta.json 'skipped')"
                        % skipped)
    return result


def _summary_line(s: PackedSplit, out: str) -> str:
    converted = {k.split(":", 1)[1]: v for k, v in s.kinds.items() if k.startswith("converted")}
    conv = ", ".join("%s %d" % kv for kv in sorted(converted.items())) or "none"
    rate = "%.0f img/s" % (s.processed / s.seconds) if s.processed and s.seconds > 0 else \
        "nothing decoded"
    if s.done_before:
        done = "nothing to do, %.1f MB in" % (s.bytes / 1e6)
    elif s.repaired:
        done = "repaired %s (%d files, %s); %.1f MB in" % (", ".join(s.repaired), s.processed,
                                                          rate, s.bytes / 1e6)
    else:
        done = "%s; %.1f MB written to" % (rate, s.bytes / 1e6)
    return ("%s: %d files seen, %d kept (%d grayscale), converted: %s; %d skipped; %s %s"
            % (s.split, s.seen, s.kept or 0, s.kinds.get("gray", 0), conv, s.skipped, done,
               os.path.join(os.path.abspath(out), s.split)))
