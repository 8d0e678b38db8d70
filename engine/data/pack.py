"""ImageNet folder -> LMDB shards (see shards.py for the format, plan.py for the plan).

Every file is sniffed by content, strictly decoded, and either kept byte for byte (a JPEG that
libjpeg-turbo decodes to 3 channels), converted to an RGB JPEG at quality 95 (PNG, WebP, BMP,
TIFF, CMYK/YCCK JPEG, or anything larger than --max-side), or skipped with a reason (empty,
truncated, corrupt, not an image). Shards are independent: forked worker processes pack them in
parallel, each shard by one worker from its first file to its last.

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
import signal
import sys
import time
import traceback
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import cv2
import lmdb
import numpy as np

from engine.data import plan, shards
from engine.data.cpus import usable_cores
from engine.data.decode import DecodeError, decode_bgr, jpeg_info, sniff
from engine.data.forking import DeferredInterrupt, ignore_sigint, start_process
from engine.data.plan import PackError, Scan
from engine.dist.env import EnvError, group_nodes, launcher_nodes, slurm_array, slurm_nodes
from engine.errors import UserError, describe_exit, disk_error_message
from engine.locks import FileLock, acquire

__all__ = ["PackError", "pack_imagenet", "resolve_nodes", "process_file", "pack_workers",
           "LOCK_FILE"]

JPEG_QUALITY = 95
LOCK_FILE = ".pack.lock"


def pack_workers() -> int:
    """Packing processes: every usable core (affinity and cgroup quota; the packer is alone)."""
    return usable_cores()


def _encode_jpeg(bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise DecodeError("re-encoding to JPEG failed")
    return buf.tobytes()


def _limit_side(bgr: np.ndarray, max_side: Optional[int]) -> Tuple[np.ndarray, bool]:
    h, w = bgr.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return bgr, False
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA), True


def process_file(path: str, max_side: Optional[int] = None) -> Dict[str, Any]:
    """Validate one file. Returns {"image", "height", "width", "kind"} or {"skip": reason}.

    kind is "jpeg" (original bytes kept), "gray" (a grayscale JPEG, kept: libjpeg expands it
    to 3 channels) or "converted:<what>".
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return {"skip": "unreadable: %s" % exc.strerror}
    if not data:
        return {"skip": "empty file"}
    fmt = sniff(data)
    try:
        if fmt == "jpeg":
            info = jpeg_info(data)
            bgr = decode_bgr(data, info=info)  # the strict full decode every kept image passes
            if info.needs_conversion:
                kind = "converted:cmyk"
            else:
                kind = "gray" if info.grayscale else "jpeg"
        elif fmt == "unknown":
            return {"skip": "not an image (starts with %s)" % data[:8].hex()}
        else:
            bgr = decode_bgr(data)
            kind = "converted:" + fmt
    except DecodeError as exc:
        return {"skip": "corrupt %s: %s" % (fmt.upper(), exc)}
    bgr, resized = _limit_side(bgr, max_side)
    if resized and not kind.startswith("converted"):
        kind = "converted:resized"
    if kind.startswith("converted"):
        data = _encode_jpeg(bgr)
    return {"image": data, "height": bgr.shape[0], "width": bgr.shape[1], "kind": kind}


# ---------------------------------------------------------------------------------------------
# Nodes


def resolve_nodes(num_nodes: Optional[int], node_rank: Optional[int],
                  env: Mapping[str, str]) -> Tuple[int, int, str]:
    """(number of nodes, this node's rank, where that came from) for a multi-node pack.

    Explicit flags win; else a Slurm array (SLURM_ARRAY_TASK_COUNT + SLURM_ARRAY_TASK_ID, minus
    SLURM_ARRAY_TASK_MIN), a Slurm allocation (SLURM_NNODES or SLURM_JOB_NUM_NODES, +
    SLURM_NODEID), a launcher's NNODES + NODE_RANK, or torchrun's GROUP_RANK (with NNODES or
    GROUP_WORLD_SIZE); else one node. The variables are read as the trainer reads them
    (engine.dist.env, Slurm's "8(x2)" included). A pure function of its arguments, so it is
    tested with plain dicts.
    """
    if num_nodes is not None or node_rank is not None:
        if num_nodes is None or node_rank is None:
            raise PackError("--num-nodes and --node-rank go together (got only %s)"
                            % ("--num-nodes" if node_rank is None else "--node-rank"))
        return _check_nodes(num_nodes, node_rank, "--num-nodes/--node-rank")
    try:
        count, task = slurm_array(env)
        if count is not None and task is not None:
            return _check_nodes(count, task,
                                "SLURM_ARRAY_TASK_COUNT/SLURM_ARRAY_TASK_ID (use --array=0-%d)"
                                % (count - 1))
        # One source at a time: the variables of the sources after the one that applies are
        # never read, so a stray value there cannot fail the pack.
        for source, read in (("SLURM_NNODES/SLURM_NODEID", slurm_nodes),
                             ("NNODES/NODE_RANK", launcher_nodes)):
            n, r = read(env)
            if n is not None and r is not None:
                return _check_nodes(n, r, source)
        group_size, group = group_nodes(env)
        if group is not None:
            n = launcher_nodes(env)[0]
            n = group_size if n is None else n
            if n is None:
                raise PackError("GROUP_RANK is set but neither NNODES nor GROUP_WORLD_SIZE is; "
                                "pass --num-nodes and --node-rank")
            return _check_nodes(n, group, "GROUP_RANK")
    except EnvError as exc:
        raise PackError("%s; pass --num-nodes and --node-rank instead" % exc) from None
    return 1, 0, "single node"


def _check_nodes(n: int, r: int, source: str) -> Tuple[int, int, str]:
    if n < 1:
        raise PackError("the number of nodes must be at least 1 (got %d from %s)" % (n, source))
    if not 0 <= r < n:
        raise PackError("node rank %d is outside 0..%d (from %s)" % (r, n - 1, source))
    return n, r, source


def _lock(path: str, what: str) -> FileLock:
    """The pack's exclusive lock on `path`; PackError naming the holder if another pack has it.

    flock dies with its process, so a killed pack never blocks the rerun.
    """
    return acquire(path, error=PackError, refused=lambda holder: (
        "%s is being written by another pack (%s; lock file %s). Wait for it to finish or stop "
        "it, then rerun" % (what, holder, path)))


# ---------------------------------------------------------------------------------------------
# Packing one shard


# Files processed, shared with the forked workers so the progress bar moves per file.
_progress_counter = None


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


def _pack_shard(job: Dict[str, Any]) -> Dict[str, Any]:
    """Write one complete shard (decode, validate, serialise, append), then its marker.

    Shards are independent, so workers (and nodes) write different shards concurrently and
    nothing but a small marker crosses a process boundary: piping every image back to one writer
    made that process the bottleneck. The shard appears under its final name only when complete;
    a per-shard lock keeps two packs of different node counts from writing the same file.
    """
    src, dst, k, items, fp, max_side = (job[x] for x in
                                        ("src", "dst", "k", "items", "fp", "max_side"))
    name = shards.shard_name(k)
    path = os.path.join(dst, name)
    writer = None
    with _lock(plan.shard_lock_path(dst, k), "%s of %s" % (name, os.path.basename(dst))):
        try:
            done = plan.read_marker(dst, k, fp)  # finished by another pack since this one looked
            if done is not None:
                _count(len(items))
                return done
            tally = plan.ShardTally(k, fp)
            writer = shards.ShardWriter(path)
            for rel, label in items:
                r = process_file(os.path.join(src, rel), max_side)
                if "skip" in r:
                    tally.skipped(rel, r["skip"])
                else:
                    value = shards.pack_record(r["image"], label, r["height"], r["width"], rel)
                    writer.append(value)
                    tally.kept(r["kind"], len(value))
                _count(1)
            writer.close()
            writer = None
            return tally.publish(dst)
        except (lmdb.Error, OSError) as exc:
            if writer is not None:
                writer.abort()
            raise PackError(_disk_message(exc, path, job.get("needed", 0))) from None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise




def _count(n: int) -> None:
    if _progress_counter is not None:
        with _progress_counter.get_lock():
            _progress_counter.value += n


def _die_with_parent() -> None:
    """Ask Linux to kill this worker if the packer dies (kill -9, OOM): an orphan would hold its
    shard's lock and keep writing after the user believes the pack has stopped."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(job: Dict[str, Any], conn, counter, parent: int) -> None:
    global _progress_counter
    ignore_sigint()  # Ctrl-C is the packer's to handle: it stops the workers
    _die_with_parent()
    if os.getppid() != parent:  # the packer died before the line above took effect
        os._exit(1)
    _progress_counter = counter
    try:
        conn.send(("ok", _pack_shard(job)))
        code = 0
    except UserError as exc:
        conn.send(("user", str(exc)))
        code = 2
    except BaseException:
        conn.send(("bug", traceback.format_exc()))
        code = 1
    conn.close()
    sys.exit(code)



def _remove_partial(dst: str, k: int) -> None:
    tmp = os.path.join(dst, shards.shard_name(k)) + ".tmp"
    for f in (tmp, tmp + "-lock"):
        try:
            os.remove(f)
        except OSError:
            pass


def _stop(running: Iterable[Tuple[Any, Any, Dict[str, Any]]]) -> None:
    """Stop the workers still running and remove their partial shards."""
    for proc, recv, job in running:
        if proc.pid is not None and proc.is_alive():
            proc.terminate()
    for proc, recv, job in running:
        if proc.pid is not None:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        recv.close()
        _remove_partial(job["dst"], job["k"])


def _run_workers(jobs: List[Dict[str, Any]], workers: int, counter, on_progress
                 ) -> Dict[int, Dict[str, Any]]:
    """Pack `jobs` in up to `workers` forked processes, one process per shard.

    Self-managed rather than a multiprocessing.Pool: a Pool silently replaces a worker that was
    killed and waits forever for its task. Here each worker holds the write end of a pipe, so
    its death is an end-of-file seen within one poll; the pack then stops the others, removes
    their partial shards and reports the shard that was lost. Finished shards keep their markers.
    """
    ctx = mp.get_context("fork")
    pending = list(jobs)
    running: Dict[int, Tuple[Any, Any, Dict[str, Any]]] = {}
    markers: Dict[int, Dict[str, Any]] = {}
    shards.close_all_envs()  # a child must not inherit an open LMDB environment
    # Ctrl-C is noted and raised at the checks below, never inside a fork or the cleanup (see
    # engine.data.forking); the wait's timeout bounds how long it takes to be acted on.
    with DeferredInterrupt() as interrupt:
        try:
            while pending or running:
                while pending and len(running) < workers:
                    interrupt.check()
                    job = pending.pop(0)
                    recv, send = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_worker, args=(job, send, counter, os.getpid()),
                                       name="pack-%s" % shards.shard_name(job["k"]), daemon=True)
                    running[job["k"]] = (proc, recv, job)
                    try:
                        start_process(proc)
                    finally:
                        send.close()  # only the child holds the write end: its death is EOF
                ready = mp.connection.wait([r for _, r, _ in running.values()], timeout=0.2)
                interrupt.check()
                for k, (proc, recv, job) in list(running.items()):
                    if recv not in ready:
                        continue
                    try:
                        kind, payload = recv.recv()
                    except (EOFError, OSError):
                        kind, payload = "lost", None
                    proc.join(10)
                    recv.close()
                    del running[k]
                    where = "%s/%s" % (os.path.basename(job["dst"]), shards.shard_name(k))
                    if kind == "ok":
                        markers[k] = payload
                    elif kind == "user":
                        raise PackError(payload)
                    elif kind == "bug":
                        raise RuntimeError("the worker packing %s failed:\n%s" % (where, payload))
                    else:
                        raise PackError(
                            "the worker packing %s (pid %s) %s; the other workers were stopped. "
                            "Rerun the same command to resume (finished shards are kept)"
                            % (where, proc.pid, describe_exit(proc.exitcode)))
                on_progress()
        finally:
            _stop(running.values())
    return markers


# ---------------------------------------------------------------------------------------------
# A split: plan, pack this node's shards, merge


def _pack_split(sc: Scan, out: str, workers: int, nodes: Tuple[int, int],
                counter, progress: bool, log) -> Dict[str, Any]:
    split, fp = sc.split, sc.fingerprint
    dst = os.path.join(out, split)
    old = plan.finished(dst, fp)
    if old is not None:
        log("%s: already packed (%d records in %s), nothing to do"
            % (split, old["num_samples"], dst))
        return {"split": split, "seen": len(sc.items), "seconds": 0.0, "done_before": True,
                "kept": old["num_samples"], "skipped": len(old["skipped"]),
                "kinds": old.get("kinds", {}), "bytes": old.get("bytes", 0)}

    plan.prepare(dst, sc.plan)
    n_nodes, rank = nodes
    mine = [k for k in range(len(sc.plan["shards"])) if k % n_nodes == rank]
    todo = plan.missing(dst, sc.plan, among=mine)
    # A shard on disk without its marker is finished (shards appear only when complete): its
    # marker is rebuilt from it rather than the shard repacked. One that does not match the plan
    # is packed again.
    rebuilt, unusable = plan.rebuild_markers(
        dst, sc.plan, todo, log, items_of=sc.shard_items,
        reason=lambda rel: process_file(os.path.join(sc.src, rel), sc.plan["max_side"]).get(
            "skip", "skipped when packed"))
    if unusable:
        log("%s: %d shard(s) on disk without a marker cannot be used as they are (%s); packing "
            "them again" % (split, len(unusable), unusable[0]))
    todo = [k for k in todo if k not in rebuilt]
    if len(todo) < len(mine) and todo:
        log("%s: resuming, %d of %d shards already complete"
            % (split, len(mine) - len(todo), len(mine)))
    needed = sum(sc.source_bytes[k] for k in todo)
    jobs = [{"src": sc.src, "dst": dst, "k": k, "items": sc.shard_items(k), "fp": fp,
             "max_side": sc.plan["max_side"], "needed": needed} for k in todo]
    todo_files = sum(len(j["items"]) for j in jobs)
    mine_files = sum(sc.plan["shards"][k]["num_files"] for k in mine)
    t0 = time.time()
    bar = _progress(mine_files, mine_files - todo_files, "pack " + split, progress)
    try:
        if workers == 0:
            for job in jobs:
                _pack_shard(job)
                bar.update(len(job["items"]))
        else:
            start, shown = counter.value, [0]

            def show():
                now = counter.value - start
                bar.update(now - shown[0])
                shown[0] = now

            _run_workers(jobs, workers, counter, show)
    finally:
        bar.close()
    seconds = time.time() - t0

    meta = plan.merge_split(dst, sc.plan, log)
    summary = {"split": split, "seconds": seconds, "processed": todo_files, "done_before": False,
               "node": rank, "num_nodes": n_nodes, "shards_packed": len(todo)}
    if meta is None:
        absent = plan.missing(dst, sc.plan)
        log("%s: node %d of %d packed its %d shards; %d shard(s) of other nodes still missing "
            "(e.g. %s). The last node to finish writes meta.json, or run --merge."
            % (split, rank, n_nodes, len(mine), len(absent),
               shards.shard_name(absent[0]) if absent else "-"))
        summary.update(merged=False, seen=todo_files, kept=None, skipped=0, kinds={}, bytes=0)
        return summary
    summary.update(merged=True, seen=meta.get("seen", len(sc.items)), kept=meta["num_samples"],
                   skipped=len(meta["skipped"]), kinds=meta.get("kinds", {}),
                   bytes=meta.get("bytes", 0), skipped_list=meta["skipped"])
    return summary


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr, disable=not enabled)


def pack_imagenet(data: str, out: str, splits: Sequence[str] = ("train", "val"),
                  workers: Optional[int] = None, shard_size: int = 5000,
                  max_side: Optional[int] = None, seed: int = 0, strict: bool = False,
                  progress: bool = True, log=print, num_nodes: Optional[int] = None,
                  node_rank: Optional[int] = None,
                  env: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Pack ROOT/<split>/<wnid>/* into OUT/<split>/ shards; returns a summary per split.

    With several nodes (flags, or the Slurm/torchrun environment `env`, default os.environ),
    this node packs shards k with k mod N == rank; whichever node finds every shard present
    writes meta.json. Raises PackError on bad input, a held lock or a full/read-only disk; with
    strict=True also when any file had to be skipped (the shards are still written, so a rerun
    after fixing the files only repacks what changed).
    """
    if shard_size < 1:
        raise PackError("--shard-size must be at least 1 (got %d)" % shard_size)
    if max_side is not None and max_side < 16:
        raise PackError("--max-side must be at least 16 px (got %d)" % max_side)
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
    if not os.path.isdir(data):
        raise PackError("--data %s does not exist or is not a folder" % data)
    if os.path.exists(out) and not os.path.isdir(out):
        raise PackError("--out %s exists and is not a folder; choose a folder" % out)
    classes = plan.input_classes(data, splits, log)
    # Every requested split is listed and planned before anything is written, so a missing or
    # malformed split is reported up front, not after hours spent on the others.
    scans = [plan.scan(data, split, classes, seed, shard_size, max_side) for split in splits]

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
        summaries = [_pack_split(sc, out, workers, (n_nodes, rank), counter, progress, log)
                     for sc in scans]
    result = {"out": os.path.abspath(out), "workers": workers, "num_nodes": n_nodes,
              "node_rank": rank, "splits": summaries}
    for s in summaries:
        if s.get("merged", True):
            log(_summary_line(s, out))
        for item in s.get("skipped_list", [])[:20]:
            log("  skipped %s: %s" % (item["path"], item["reason"]))
    skipped = sum(s["skipped"] for s in summaries)
    if strict and skipped:
        raise PackError("--strict: %d file(s) were skipped (listed in meta.json 'skipped')"
                        % skipped)
    return result


def _summary_line(s: Dict[str, Any], out: str) -> str:
    converted = {k.split(":", 1)[1]: v for k, v in s["kinds"].items() if k.startswith("converted")}
    conv = ", ".join("%s %d" % kv for kv in sorted(converted.items())) or "none"
    rate = s.get("processed", 0) / s["seconds"] if s["seconds"] > 0 else 0.0
    return ("%s: %d files seen, %d kept (%d grayscale), converted: %s; %d skipped; "
            "%.0f img/s; %.1f MB written to %s"
            % (s["split"], s["seen"], s["kept"], s["kinds"].get("gray", 0), conv, s["skipped"],
               rate, s["bytes"] / 1e6, os.path.join(os.path.abspath(out), s["split"])))
