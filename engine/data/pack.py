"""ImageNet folder -> LMDB shards (see shards.py for the format).

Every file is sniffed by content, strictly decoded, and either kept byte for byte (a JPEG that
libjpeg-turbo decodes to 3 channels), converted to an RGB JPEG at quality 95 (PNG, WebP, BMP,
TIFF, CMYK/YCCK JPEG, or anything larger than --max-side), or skipped with a reason (empty,
truncated, corrupt, not an image). Shards are independent: forked worker processes pack them in
parallel, each shard by one worker from its first file to its last.

The plan: the file list, its order and its split into shards are a pure function of the input
listing and the arguments (the fingerprint), written first to <split>/plan.json. Node r of N
packs the shards k with k mod N == r, so several machines can pack into one shared folder.

Resumability: a shard is written under a temporary name and renamed when complete, then a small
marker records its counts and checksum; a rerun keeps every shard whose marker matches the
plan and rewrites the rest. meta.json comes last, written from the markers by whichever node
finds them all present (or by --merge). A pack killed at any moment and rerun therefore ends with
every file exactly once.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import multiprocessing as mp
import multiprocessing.connection  # noqa: F401  (mp.connection.wait)
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import lmdb
import numpy as np

from engine.data import shards
from engine.data.cpus import usable_cores
from engine.data.decode import DecodeError, decode_bgr, jpeg_info, sniff, validate_jpeg
from engine.data.folder import LayoutError, list_classes, scan_split
from engine.errors import UserError, disk_error_message, signal_cause

__all__ = ["PackError", "pack_imagenet", "merge_pack", "resolve_nodes", "process_file",
           "pack_workers", "PLAN_FILE", "LOCK_FILE"]

JPEG_QUALITY = 95
PROGRESS_DIR = ".pack"
PLAN_FILE = "plan.json"
PLAN_FORMAT = "engine-pack-plan"
LOCK_FILE = ".pack.lock"


class PackError(UserError, ValueError):
    """Bad input or arguments: the message says what was wrong and how to fix it."""


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
            if not info.needs_conversion and not (max_side and max(info.width, info.height)
                                                  > max_side):
                # Kept byte for byte: the scaled strict decode accepts exactly what the full
                # one does (decode.validate_jpeg), and the pixels are not needed.
                validate_jpeg(data, info)
                return {"image": data, "height": info.height, "width": info.width,
                        "kind": "gray" if info.grayscale else "jpeg"}
            bgr = decode_bgr(data, info=info)  # to be converted or resized, then re-encoded
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
# Nodes, locks and the plan


def resolve_nodes(num_nodes: Optional[int], node_rank: Optional[int],
                  env: Mapping[str, str]) -> Tuple[int, int, str]:
    """(number of nodes, this node's rank, where that came from) for a multi-node pack.

    Explicit flags win; else a Slurm array (SLURM_ARRAY_TASK_COUNT + SLURM_ARRAY_TASK_ID, minus
    SLURM_ARRAY_TASK_MIN), a Slurm allocation (SLURM_NNODES + SLURM_NODEID), a launcher's
    NNODES + NODE_RANK, or torchrun's GROUP_RANK (with NNODES or GROUP_WORLD_SIZE); else one
    node. A pure function of its arguments, so it is tested with plain dicts.
    """
    if num_nodes is not None or node_rank is not None:
        if num_nodes is None or node_rank is None:
            raise PackError("--num-nodes and --node-rank go together (got only %s)"
                            % ("--num-nodes" if node_rank is None else "--node-rank"))
        return _check_nodes(num_nodes, node_rank, "--num-nodes/--node-rank")

    def num(name: str) -> Optional[int]:
        v = env.get(name)
        if v is None or not v.strip():
            return None
        try:
            return int(v)
        except ValueError:
            raise PackError("environment variable %s=%r is not an integer; pass --num-nodes and "
                            "--node-rank instead" % (name, v)) from None

    count, task = num("SLURM_ARRAY_TASK_COUNT"), num("SLURM_ARRAY_TASK_ID")
    if count is not None and task is not None:
        low = num("SLURM_ARRAY_TASK_MIN")
        return _check_nodes(count, task - (low or 0),
                            "SLURM_ARRAY_TASK_COUNT/SLURM_ARRAY_TASK_ID (use --array=0-%d)"
                            % (count - 1))
    for n_var, r_var in (("SLURM_NNODES", "SLURM_NODEID"), ("NNODES", "NODE_RANK")):
        n, r = num(n_var), num(r_var)
        if n is not None and r is not None:
            return _check_nodes(n, r, "%s/%s" % (n_var, r_var))
    group = num("GROUP_RANK")
    if group is not None:
        n = num("NNODES")
        n = num("GROUP_WORLD_SIZE") if n is None else n
        if n is None:
            raise PackError("GROUP_RANK is set but neither NNODES nor GROUP_WORLD_SIZE is; pass "
                            "--num-nodes and --node-rank")
        return _check_nodes(n, group, "GROUP_RANK")
    return 1, 0, "single node"


def _check_nodes(n: int, r: int, source: str) -> Tuple[int, int, str]:
    if n < 1:
        raise PackError("the number of nodes must be at least 1 (got %d from %s)" % (n, source))
    if not 0 <= r < n:
        raise PackError("node rank %d is outside 0..%d (from %s)" % (r, n - 1, source))
    return n, r, source


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return "pid %s on host %s, started %s" % (info["pid"], info["host"], info["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _lock(path: str, what: str) -> int:
    """An exclusive flock on `path`, recording who holds it; PackError naming the holder if taken.

    flock dies with its process, so a killed pack never blocks the rerun.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise PackError(disk_error_message(exc, path)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise PackError("%s is being written by another pack (%s; lock file %s). Wait for it to "
                        "finish or stop it, then rerun" % (what, holder, path)) from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:
        pass  # the lock holds without the note; only the message to a second pack is poorer
    return fd


def _shard_digest(chunk: Sequence[Tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for rel, label in chunk:
        h.update(("%s\0%d\n" % (rel, label)).encode())
    return h.hexdigest()


def _make_plan(split: str, classes: List[str], items: List[Tuple[str, int]], fp: str,
               seed: int, shard_size: int, max_side: Optional[int]) -> Dict[str, Any]:
    """Which files go to which shard: a pure function of the listing and the arguments, so every
    node computes the same plan and any node can be rerun alone."""
    chunks = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    return {"format": PLAN_FORMAT, "version": 1, "split": split, "classes": classes,
            "seed": seed, "shard_size": shard_size, "max_side": max_side,
            "shuffled": split == "train", "num_files": len(items), "fingerprint": fp,
            "shards": [{"file": shards.shard_name(k), "num_files": len(c),
                        "files_sha256": _shard_digest(c)} for k, c in enumerate(chunks)]}


def _plan_difference(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    for key in ("split", "seed", "shard_size", "max_side"):
        if old.get(key) != new[key]:
            return "%s %r then, %r now" % (key, old.get(key), new[key])
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
        old = _load_json(path)
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


def _load_json(path: str) -> Optional[Dict[str, Any]]:
    """The JSON object in `path`, or None if it is absent or unreadable (a partial file)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _marker_path(dst: str, k: int) -> str:
    return os.path.join(dst, PROGRESS_DIR, shards.shard_name(k) + ".json")


def _read_marker(dst: str, k: int, fp: str) -> Optional[Dict[str, Any]]:
    m = _load_json(_marker_path(dst, k))
    if m is None or m.get("fingerprint") != fp:
        return None
    if not os.path.exists(os.path.join(dst, shards.shard_name(k))):
        return None
    return m


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


def _pack_shard(job: Dict[str, Any], on_records_done=None) -> Dict[str, Any]:
    """Write one complete shard (decode, validate, serialise, append), then its marker.

    on_records_done() is called when every record is appended: what is left is short and mostly
    waiting for the disk (the checksum runs meanwhile), so the next shard may start.

    Shards are independent, so workers (and nodes) write different shards concurrently and
    nothing but a small marker crosses a process boundary: piping every image back to one writer
    made that process the bottleneck. The shard appears under its final name only when complete;
    a per-shard lock keeps two packs of different node counts from writing the same file.
    """
    src, dst, k, items, fp, max_side = (job[x] for x in
                                        ("src", "dst", "k", "items", "fp", "max_side"))
    name = shards.shard_name(k)
    path = os.path.join(dst, name)
    lock = _lock(os.path.join(dst, PROGRESS_DIR, name + ".lock"),
                 "%s of %s" % (name, os.path.basename(dst)))
    writer = None
    try:
        done = _read_marker(dst, k, fp)  # finished by another pack since this one looked
        if done is not None:
            _count(len(items))
            return done
        m = {"file": name, "fingerprint": fp, "seen": 0, "num_samples": 0,
             "kinds": Counter(), "skipped": [], "bytes": 0}
        writer = shards.ShardWriter(path)
        for rel, label in items:
            r = process_file(os.path.join(src, rel), max_side)
            m["seen"] += 1
            if "skip" in r:
                m["skipped"].append({"path": rel, "reason": r["skip"]})
            else:
                value = shards.pack_record(r["image"], label, r["height"], r["width"], rel)
                writer.append(value)
                m["kinds"][r["kind"]] += 1
                m["bytes"] += len(value)
            _count(1)
        if on_records_done is not None:
            on_records_done()
        checksum = writer.close(checksum=True)  # hashed while the disk finishes writing
        writer = None
        m["num_samples"] = sum(m["kinds"].values())
        m["size"] = os.path.getsize(path)
        m["checksum"] = checksum
        shards.write_json_atomic(_marker_path(dst, k), m)
        return m
    except (lmdb.Error, OSError) as exc:
        if writer is not None:
            writer.abort()
        raise PackError(_disk_message(exc, path, job.get("needed", 0))) from None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        os.close(lock)


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
    # Ctrl-C is the packer's to handle. The packer blocks SIGINT while it forks, so one that
    # arrives before this line waits, and is then discarded here rather than raised.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _die_with_parent()
    if os.getppid() != parent:  # the packer died before the line above took effect
        os._exit(1)
    _progress_counter = counter
    try:
        conn.send(("ok", _pack_shard(job, lambda: conn.send(("records_done", None)))))
        code = 0
    except UserError as exc:
        conn.send(("user", str(exc)))
        code = 2
    except BaseException:
        conn.send(("bug", traceback.format_exc()))
        code = 1
    conn.close()
    sys.exit(code)


def _describe_exit(code: Optional[int]) -> str:
    if code is not None and code < 0:
        return "was killed by signal %d (%s)" % (-code, signal_cause(code))
    return "exited with status %s" % code


def _remove_partial(dst: str, k: int) -> None:
    tmp = os.path.join(dst, shards.shard_name(k)) + ".tmp"
    for f in (tmp, tmp + "-lock"):
        try:
            os.remove(f)
        except OSError:
            pass


def _run_workers(jobs: List[Dict[str, Any]], workers: int, counter, on_progress
                 ) -> Dict[int, Dict[str, Any]]:
    """Pack `jobs` in up to `workers` forked processes, one process per shard.

    Self-managed rather than a multiprocessing.Pool: a Pool silently replaces a worker that was
    killed and waits forever for its task. Here each worker holds the write end of a pipe, so
    its death is an end-of-file seen within one poll; the pack then stops the others, removes
    their partial shards and reports the shard that was lost. Finished shards keep their markers.
    A worker that has appended all its records gives its core to the next shard while it
    finishes (checksum, disk); at most `workers` such finishing workers run besides.
    """
    ctx = mp.get_context("fork")
    pending = list(jobs)
    running: Dict[int, Tuple[Any, Any, Dict[str, Any]]] = {}
    finishing: "set[int]" = set()  # finishing workers: records done, shard not yet published
    markers: Dict[int, Dict[str, Any]] = {}
    shards.close_all_envs()  # a child must not inherit an open LMDB environment
    try:
        while pending or running:
            while (pending and len(running) - len(finishing) < workers
                   and len(running) < 2 * workers):
                job = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(job, send, counter, os.getpid()),
                                   name="pack-%s" % shards.shard_name(job["k"]), daemon=True)
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    proc.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                send.close()  # only the child holds the write end: its death is EOF here
                running[job["k"]] = (proc, recv, job)
            ready = mp.connection.wait([r for _, r, _ in running.values()], timeout=0.2)
            for k, (proc, recv, job) in list(running.items()):
                if recv not in ready:
                    continue
                try:
                    kind, payload = recv.recv()
                except (EOFError, OSError):
                    kind, payload = "lost", None
                if kind == "records_done":
                    finishing.add(k)
                    continue
                proc.join(10)
                recv.close()
                del running[k]
                finishing.discard(k)
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
                        % (where, proc.pid, _describe_exit(proc.exitcode)))
            on_progress()
    finally:
        for proc, recv, job in running.values():
            if proc.is_alive():
                proc.terminate()
        for proc, recv, job in running.values():
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            recv.close()
            _remove_partial(job["dst"], job["k"])
    return markers


# ---------------------------------------------------------------------------------------------
# A split: scan, plan, pack this node's shards, merge


def _fingerprint(split: str, classes, items, stats, seed: int, shard_size: int,
                 max_side: Optional[int]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([shards.VERSION, split, classes, seed, shard_size, max_side]).encode())
    for (rel, label), (size, mtime) in zip(items, stats):
        h.update(("%s\0%d\0%d\0%d\n" % (rel, label, size, mtime)).encode())
    return h.hexdigest()


class _Stats:
    def __init__(self) -> None:
        self.seen = self.kept = 0
        self.kinds: Counter = Counter()
        self.skipped: List[Dict[str, str]] = []
        self.bytes = 0

    def add_marker(self, m: Dict[str, Any]) -> None:
        self.seen += m["seen"]
        self.kept += m["num_samples"]
        self.kinds.update(m["kinds"])
        self.skipped.extend(m["skipped"])
        self.bytes += m["bytes"]


def _scan(data: str, split: str, classes: List[str], seed: int, shard_size: int,
          max_side: Optional[int]) -> Dict[str, Any]:
    """List a split, order it, fingerprint it and plan its shards (reads only)."""
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
    fp = _fingerprint(split, classes, items, stats, seed, shard_size, max_side)
    plan = _make_plan(split, classes, items, fp, seed, shard_size, max_side)
    sizes = [sum(s for s, _ in stats[i:i + shard_size]) for i in range(0, len(items), shard_size)]
    return {"split": split, "src": src, "items": items, "plan": plan, "source_bytes": sizes}


def _meta_from(plan: Dict[str, Any], markers: Dict[int, Dict[str, Any]], dst: str
               ) -> Dict[str, Any]:
    stats = _Stats()
    entries = []
    for k in range(len(plan["shards"])):  # in shard order, whoever packed them
        m = markers[k]
        stats.add_marker(m)
        path = os.path.join(dst, m["file"])
        size = m.get("size", os.path.getsize(path))
        checksum = m.get("checksum") or shards.file_checksum(path)  # markers of older packs
        entries.append({"file": m["file"], "num_samples": m["num_samples"], "size": size,
                        "checksum": checksum})
    return {
        "format": shards.FORMAT,
        "version": shards.VERSION,
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


def _merge_split(dst: str, plan: Dict[str, Any], log) -> Optional[Dict[str, Any]]:
    """Write meta.json from the markers if every shard is present; else return None.

    Idempotent, and safe for several nodes at once: the content is a function of the markers,
    and it is published by atomic rename.
    """
    meta_path = os.path.join(dst, shards.META_FILE)
    old = _load_json(meta_path)
    if old is not None and old.get("fingerprint") == plan["fingerprint"]:
        return old
    fp = plan["fingerprint"]
    markers = {k: m for k in range(len(plan["shards"]))
               for m in [_read_marker(dst, k, fp)] if m is not None}
    if len(markers) < len(plan["shards"]):
        old = _load_json(meta_path)  # another node may have merged (and removed markers) meanwhile
        return old if old is not None and old.get("fingerprint") == fp else None
    meta = _meta_from(plan, markers, dst)
    try:
        shards.write_json_atomic(meta_path, meta)
    except OSError as exc:
        raise PackError(disk_error_message(exc, meta_path)) from None
    shutil.rmtree(os.path.join(dst, PROGRESS_DIR), ignore_errors=True)
    log("%s: all %d shards present; wrote %s" % (plan["split"], len(plan["shards"]), meta_path))
    return meta


def _missing(dst: str, plan: Dict[str, Any]) -> List[int]:
    return [k for k in range(len(plan["shards"]))
            if _read_marker(dst, k, plan["fingerprint"]) is None]


def _pack_split(scan: Dict[str, Any], out: str, workers: int, nodes: Tuple[int, int],
                counter, progress: bool, log) -> Dict[str, Any]:
    split, src, items, plan = scan["split"], scan["src"], scan["items"], scan["plan"]
    fp = plan["fingerprint"]
    dst = os.path.join(out, split)
    done_before = {"split": split, "seen": len(items), "seconds": 0.0, "done_before": True}

    meta_path = os.path.join(dst, shards.META_FILE)
    if os.path.exists(meta_path):
        old = _load_json(meta_path) or {}
        if old.get("fingerprint") == fp:
            log("%s: already packed (%d records in %s), nothing to do"
                % (split, old["num_samples"], dst))
            return dict(done_before, kept=old["num_samples"], skipped=len(old["skipped"]),
                        kinds=old.get("kinds", {}), bytes=old.get("bytes", 0))
        raise PackError(
            "%s already holds a complete pack of different input or arguments. Choose another "
            "--out, or delete %s to repack." % (dst, dst))

    try:
        os.makedirs(os.path.join(dst, PROGRESS_DIR), exist_ok=True)
    except OSError as exc:
        raise PackError(disk_error_message(exc, dst)) from None
    _write_plan(dst, plan)
    n_nodes, rank = nodes
    n_shards = len(plan["shards"])
    mine = [k for k in range(n_shards) if k % n_nodes == rank]
    todo = [k for k in mine if _read_marker(dst, k, fp) is None]
    if len(todo) < len(mine) and todo:
        log("%s: resuming, %d of %d shards already complete"
            % (split, len(mine) - len(todo), len(mine)))
    needed = sum(scan["source_bytes"][k] for k in todo)
    sz = plan["shard_size"]
    jobs = [{"src": src, "dst": dst, "k": k, "items": items[k * sz:(k + 1) * sz], "fp": fp,
             "max_side": plan["max_side"], "needed": needed} for k in todo]
    todo_files = sum(len(j["items"]) for j in jobs)
    mine_files = sum(plan["shards"][k]["num_files"] for k in mine)
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

    meta = _merge_split(dst, plan, log)
    summary = {"split": split, "seconds": seconds, "processed": todo_files, "done_before": False,
               "node": rank, "num_nodes": n_nodes, "shards_packed": len(todo)}
    if meta is None:
        missing = _missing(dst, plan)
        log("%s: node %d of %d packed its %d shards; %d shard(s) of other nodes still missing "
            "(e.g. %s). The last node to finish writes meta.json, or run --merge."
            % (split, rank, n_nodes, len(mine), len(missing),
               shards.shard_name(missing[0]) if missing else "-"))
        summary.update(merged=False, seen=todo_files, kept=None, skipped=0, kinds={}, bytes=0)
        return summary
    summary.update(merged=True, seen=meta.get("seen", len(items)), kept=meta["num_samples"],
                   skipped=len(meta["skipped"]), kinds=meta.get("kinds", {}),
                   bytes=meta.get("bytes", 0), skipped_list=meta["skipped"])
    return summary


def merge_pack(out: str, splits: Optional[Sequence[str]] = None, log=print) -> Dict[str, Any]:
    """Write meta.json of each split of a multi-node pack from its plan and shard markers.

    Idempotent. Raises PackError naming the missing shards while any is absent (the split then
    stays unreadable, as it has no meta.json).
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
        plan = _load_json(os.path.join(dst, PLAN_FILE))
        if plan is None or plan.get("format") != PLAN_FORMAT:
            raise PackError("%s has no readable %s; pack it first" % (dst, PLAN_FILE))
        meta = _merge_split(dst, plan, log)
        if meta is None:
            missing = [shards.shard_name(k) for k in _missing(dst, plan)]
            raise PackError(
                "cannot merge %s: %d of %d shards are missing (%s%s); rerun the node(s) that "
                "own them (shard k belongs to node k mod --num-nodes), then merge again"
                % (dst, len(missing), len(plan["shards"]), ", ".join(missing[:8]),
                   " ..." if len(missing) > 8 else ""))
        log("%s: merged, %d records in %d shards" % (split, meta["num_samples"],
                                                    len(meta["shards"])))
        done.append({"split": split, "num_samples": meta["num_samples"],
                     "shards": len(meta["shards"])})
    return {"out": os.path.abspath(out), "splits": done}


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True,
                mininterval=0.5, file=sys.stderr)


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
    train_dir = os.path.join(data, "train")
    if os.path.isdir(train_dir):
        classes = list_classes(train_dir)
    elif splits == ["val"]:
        classes = list_classes(os.path.join(data, "val"))
        log("note: %s not found; labels follow val's own sorted class folders" % train_dir)
    else:
        raise PackError("%s does not exist; expected ROOT/train/<wnid>/*.JPEG" % train_dir)
    if not classes:
        raise PackError("%s has no class folders" % train_dir)
    # Every requested split is listed and planned before anything is written, so a missing or
    # malformed split is reported up front, not after hours spent on the others.
    scans = [_scan(data, split, classes, seed, shard_size, max_side) for split in splits]

    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise PackError(disk_error_message(exc, out)) from None
    lock_name = LOCK_FILE if n_nodes == 1 else ".pack-node%d-of-%d.lock" % (rank, n_nodes)
    lock = _lock(os.path.join(out, lock_name),
                 out if n_nodes == 1 else "%s (node %d of %d)" % (out, rank, n_nodes))
    if n_nodes > 1:
        log("node %d of %d (from %s): packing shards k with k mod %d == %d"
            % (rank, n_nodes, source, n_nodes, rank))
    counter = mp.get_context("fork").Value("q", 0) if workers > 0 else None
    try:
        summaries = [_pack_split(scan, out, workers, (n_nodes, rank), counter, progress, log)
                     for scan in scans]
    finally:
        os.close(lock)
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
