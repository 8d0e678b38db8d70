#!/usr/bin/env python3
"""A simulated node: --local-world-size loaders in as many processes, as the ranks of one
machine each run one (rank r of L, default sizing from engine.data.cpus), all reading the same
packed split at once. Reports processes, shared memory per loader and per node, peak memory of
the whole process tree (RSS summed, which counts shared pages once per process, and PSS, which
splits them fairly), and images/sec summed over the ranks.

On a small machine the speed is not meaningful (8 ranks share its cores); the process and memory
figures are. --cores N sizes the loaders as on a node with N usable cores (the worker count then
exceeds this machine's cores, so only memory and process figures mean anything). The "before"
row computes what the previous policy (physical cores - 1 workers per rank, a ring of 2 x
workers whole batches) would have allocated for the same node."""
import argparse
import multiprocessing as mp
import os
import sys
import time
from typing import Any, Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_data_args, finish, log, md_escape, md_table, sample_data, show  # noqa: E402

import psutil  # noqa: E402

from engine.data import Loader, default_workers, usable_cores  # noqa: E402


def rank_main(rank: int, args, workers: int, ready, start, results) -> None:
    ld = Loader(args.split, batch_size=args.batch_size, train=True, image_size=args.image_size,
                workers=workers, rank=rank, world_size=args.local_world_size,
                local_world_size=args.local_world_size)
    it = iter(ld)
    next(it)  # workers started, ring mapped, first batch decoded
    ready.put(rank)
    start.wait()
    n, t0 = 0, time.perf_counter()
    for _ in range(args.batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(ld)
            x, _ = next(it)
        n += len(x)
    results.put((rank, n / (time.perf_counter() - t0), ld.workers, ld.shared_memory_bytes))
    start.wait()  # stay alive (with the ring mapped) until the parent has sampled memory
    ld.close()


def tree_memory(root: psutil.Process):
    """(processes, summed RSS, summed PSS) of the ranks and their workers (not this parent)."""
    procs = root.children(recursive=True)
    rss = pss = 0
    for p in procs:
        try:
            full = p.memory_full_info()
            rss += full.rss
            pss += getattr(full, "pss", full.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return len(procs), rss, pss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_data_args(p)
    p.add_argument("--local-world-size", type=int, default=8, help="ranks on the node")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=4, help="measured batches per rank")
    p.add_argument("--cores", type=int, default=None,
                   help="size the loaders as on a node with this many usable cores "
                        "(default: this machine's)")
    a = p.parse_args(argv)
    if a.data is None:
        a.imagenet_like = True  # the only built-in set large enough for 8 x 256
    raw, packed = sample_data(a.data, a.packed, imagenet_like=a.imagenet_like)
    a.split = os.path.join(packed, "train")
    L = a.local_world_size
    cores = usable_cores() if a.cores is None else a.cores
    workers = default_workers(L, cores=cores)
    log("node: %d usable cores, %d ranks -> %d workers per rank" % (cores, L, workers))

    ctx = mp.get_context("fork")
    ready, results = ctx.Queue(), ctx.Queue()
    start = ctx.Barrier(L + 1)
    ranks = [ctx.Process(target=rank_main, args=(r, a, workers, ready, start, results))
             for r in range(L)]
    me = psutil.Process()
    for r in ranks:
        r.start()
    peak = [0, 0, 0]

    def sample():
        n, rss, pss = tree_memory(me)
        peak[0], peak[1], peak[2] = max(peak[0], n), max(peak[1], rss), max(peak[2], pss)

    for _ in range(L):
        while True:
            try:
                ready.get(timeout=0.5)
                break
            except Exception:  # noqa: BLE001 - queue.Empty: keep sampling while ranks start
                sample()
                if any(r.exitcode not in (None, 0) for r in ranks):
                    raise SystemExit("a rank failed to start; see its error above")
    t0 = time.perf_counter()
    start.wait(timeout=600)
    got = []
    while len(got) < L:
        try:
            got.append(results.get(timeout=0.5))
        except Exception:  # noqa: BLE001 - queue.Empty
            if any(r.exitcode not in (None, 0) for r in ranks):
                raise SystemExit("a rank failed; see its error above")
        sample()
    wall = time.perf_counter() - t0
    start.wait(timeout=60)
    for r in ranks:
        r.join(60)
    img_s = sum(g[1] for g in got)
    shm = got[0][3]
    batch_bytes = a.batch_size * 3 * a.image_size ** 2
    old_workers = max(1, cores - 1)  # physical cores - 1 (as if alone), per rank
    old_shm = 2 * old_workers * batch_bytes
    rows = [
        ("now: %d ranks x %d workers" % (L, workers), peak[0], L + cores,
         "%.0f" % (shm / 1e6), "%.0f" % (L * shm / 1e6), "%.0f" % (peak[1] / 1e6),
         "%.0f" % (peak[2] / 1e6), "%.0f" % img_s),
        ("before: %d ranks x %d workers (computed)" % (L, old_workers),
         L * (1 + old_workers), L + cores, "%.0f" % (old_shm / 1e6),
         "%.0f" % (L * old_shm / 1e6), "-", "-", "-"),
    ]
    finish(rows, ["batch %d, %d px, %d usable cores" % (a.batch_size, a.image_size, cores),
                  "processes", "cores + ranks", "ring MB/loader", "ring MB/node",
                  "peak RSS MB (sum)", "peak PSS MB", "img/s (all ranks)"],
           {"local_world_size": L, "usable_cores": cores, "workers_per_rank": workers,
            "processes": peak[0], "process_budget": L + cores,
            "ring_bytes_per_loader": shm, "ring_bytes_per_node": L * shm,
            "slots": shm // (batch_bytes + 4 * a.batch_size),
            "peak_rss_bytes_sum": peak[1], "peak_pss_bytes": peak[2], "img_s": round(img_s, 1),
            "seconds": round(wall, 2), "batch_size": a.batch_size, "image_size": a.image_size,
            "before_workers_per_rank": old_workers, "before_ring_bytes_per_loader": old_shm,
            "before_processes": L * (1 + old_workers),
            "sized_for_this_machine": a.cores is None, "data": show(a.split),
            "batches": a.batches},
           "bench_node: %d simulated ranks on %s" % (L, show(a.split)))


def markdown(results: Sequence[Dict[str, Any]]) -> List[str]:
    """BENCHMARKS.md lines for one or more results of this script (its JSON last lines): per
    run, the measured row and the computed row of the previous sizing policy."""
    rows = []
    for r in results:
        L, cores = r["local_world_size"], r["usable_cores"]
        # A rate counts only where the ranks ran on the cores they were sized for and read past
        # the batches their rings had prefetched before the clock started.
        speed = r["img_s"] if (r.get("sized_for_this_machine", True)
                               and r.get("batches", 0) > r.get("slots", 0)) else None
        node = "%d cores%s" % (cores, "" if r.get("sized_for_this_machine", True)
                               else " (sized as, --cores)")
        rows.append(("%s: now, %d ranks x %d workers" % (node, L, r["workers_per_rank"]),
                     r["processes"], r["process_budget"], r["ring_bytes_per_loader"] / 1e6,
                     r["ring_bytes_per_node"] / 1e6, r["peak_rss_bytes_sum"] / 1e6,
                     r["peak_pss_bytes"] / 1e6, speed))
        old_w = r["before_workers_per_rank"]
        rows.append(("%s: before, %d ranks x %d workers (computed)" % (node, L, old_w),
                     r.get("before_processes", L * (1 + old_w)), r["process_budget"],
                     r["before_ring_bytes_per_loader"] / 1e6,
                     L * r["before_ring_bytes_per_loader"] / 1e6, None, None, None))
    out = md_table(["node", "processes", "cores + ranks", "ring MB per loader",
                    "ring MB per node", "peak RSS MB (sum)", "peak PSS MB", "img/s (all ranks)"],
                   rows)
    if results:
        r = results[0]
        out += ["", "Batch %d, %d px, %s. img/s is shown only for a run sized for this "
                "machine's cores that measured more batches per rank than its ring prefetches "
                "(%d slots); with --cores the worker count exceeds the cores here and only "
                "processes and memory count."
                % (r["batch_size"], r["image_size"], md_escape(r.get("data", "the sample set")),
                   r.get("slots", 0))]
    return out


if __name__ == "__main__":
    main()
