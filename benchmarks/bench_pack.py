#!/usr/bin/env python3
"""Packing rate against its ceiling: one process doing only the strict decode of the same files,
times the worker count, measured right before each of --repeats packs (interleaved; medians,
and the median of the per-round ratios). Target: pack_img_s >= 0.85 x decode_ceiling_img_s.
From the per-worker rate: the projected time to pack ImageNet-1k (1.33 M files, whose mean size
the ImageNet-like set matches) on a 16-core node, one worker per core. Next to it: the
shard checksum (blake2b) rate and its share of the packing time, and tools/verify_pack.py's rates
(--fast: checksums only; full: every record decoded), each in one process.

Workers pack whole shards in parallel, so the default --shard-size here is small enough for the
sample set to form several shards per worker, as ImageNet's 1.28 M files do at the packer's
default of 5000 (257 train shards): 200 makes 14 shards of the ImageNet-like set, 7 per worker
with 2. Each shard costs a fork, an LMDB environment, a marker and a final sync, which at 200
files weigh 25 times what they do at 5000, so the figures here are a little pessimistic.

The packs run in a separate process started before the files are read into this one (the
ceiling's input), as a user's tools/pack_imagenet.py runs: forking a process that holds every
file's bytes would cost each shard's worker more than packing it."""
import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_data_args, finish, image_files, log, md_table, mean_file_kb, rate,  # noqa: E402
                    read_all, sample_data, show)

from engine.data import shards  # noqa: E402
from engine.data.decode import decode_bgr  # noqa: E402
from engine.data.verify import verify  # noqa: E402
from engine.data.pack import pack_workers, pack_imagenet  # noqa: E402

# ImageNet-1k's train + val files, and the node the projection is for (one pack worker a core)
IMAGENET_FILES = 1281167 + 50000
NODE_CORES = 16


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_data_args(p, packed=False)
    p.add_argument("--workers", type=int, default=pack_workers())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--splits", default="train,val")
    p.add_argument("--shard-size", type=int, default=200)
    p.add_argument("--restart-markers", action="store_true",
                   help="also pack with --restart-markers in every round, right after the "
                        "default pack")
    a = p.parse_args(argv)
    data, _ = sample_data(a.data, need_packed=False, imagenet_like=a.imagenet_like)
    # The packs run in a process started before this one reads the files into memory, as a
    # user's pack_imagenet.py would: the packer forks a worker per shard, and forking this
    # process, with every file's bytes in it, costs each worker more than the pack itself does.
    packer = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
    packer.submit(_pack, None).result()  # started and imported before the first round
    pack_cpu: List[float] = []
    splits = a.splits.split(",")
    src_files = [f for s in splits for f in image_files(os.path.join(data, s))]
    blobs = read_all(src_files)  # warm the page cache too, as packing reads the same files

    def decode_all():
        for b in blobs:
            decode_bgr(b)
        return len(blobs)

    kept: List[str] = []

    def pack_once():
        out = tempfile.mkdtemp(prefix="bench-pack-")
        try:
            seen, cpu = packer.submit(_pack, data, out, splits, a.workers, a.shard_size).result()
            pack_cpu.append(cpu)
            return seen
        finally:
            if kept:
                shutil.rmtree(kept.pop())
            kept.append(out)  # the last pack stays for the checksum and verify figures

    rst_cpu: List[float] = []

    def pack_restarts():
        out = tempfile.mkdtemp(prefix="bench-pack-rst-")
        try:
            seen, cpu = packer.submit(_pack, data, out, splits, a.workers, a.shard_size,
                                      True).result()
            rst_cpu.append(cpu)
            return seen
        finally:
            shutil.rmtree(out)

    # Interleaved: the ceiling is measured right before every pack, so a change of load on a
    # shared machine moves both; the ratio is taken per round, then the median.
    # CPU per image too (the packing process and its reaped workers, os.times): on a shared
    # machine the workers may not get a core each, which the wall-clock ratio charges to
    # the packer; the CPU ratio does not.
    ones, all_rates, ratios, dec_ms, pack_ms = [], [], [], [], []
    rst_rates: List[float] = []
    for r in range(a.repeats):
        c0 = time.process_time()
        ones.append(rate(decode_all, repeats=1)[0])
        dec_ms.append((time.process_time() - c0) / len(blobs) * 1e3)
        all_rates.append(rate(pack_once, repeats=1)[0])
        pack_ms.append(pack_cpu[-1] * 1e3 / len(blobs))
        ratios.append(all_rates[-1] / (ones[-1] * a.workers))
        log("round %d: strict decode %.0f img/s x %d workers, pack %.0f img/s: %.2f; CPU ms/img "
            "decode %.2f, pack %.2f" % (r, ones[-1], a.workers, all_rates[-1], ratios[-1],
                                        dec_ms[-1], pack_ms[-1]))
        if a.restart_markers:
            rst_rates.append(rate(pack_restarts, repeats=1)[0])
            log("round %d: pack --restart-markers %.0f img/s, %.2f CPU ms/img"
                % (r, rst_rates[-1], rst_cpu[-1] * 1e3 / len(blobs)))
    cpu_ratio = statistics.median(d / p for d, p in zip(dec_ms, pack_ms))
    one, pack_rate = statistics.median(ones), statistics.median(all_rates)
    ceiling = one * a.workers
    ratio_med = statistics.median(ratios)
    per_worker = pack_rate / a.workers
    imagenet_s = IMAGENET_FILES / (per_worker * NODE_CORES)
    imagenet_cpu_s = IMAGENET_FILES * statistics.median(pack_ms) / 1e3 / NODE_CORES
    # ... which reads and writes the data set once: the disk rate that pace needs
    imagenet_mb_s = IMAGENET_FILES * mean_file_kb(src_files) / 1e3 / imagenet_cpu_s
    out = kept.pop()
    try:
        files = [os.path.join(out, s, e["file"]) for s in splits
                 for e in shards.read_meta(os.path.join(out, s))["shards"]]
        total = sum(os.path.getsize(f) for f in files)
        t0 = time.perf_counter()
        for f in files:
            shards.file_checksum(f)
        sum_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = verify(out, fast=True)
        fast_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = verify(out)
        full_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(out)
        packer.shutdown()
    assert not any(r.mismatches for r in fast + full)
    records = sum(r.decoded for r in full)
    pack_s = len(blobs) / pack_rate  # wall time of one pack at the median rate
    mb = total / 1e6
    rows = [
        ("strict decode, 1 process", one, "1.00"),
        ("decode ceiling (x %d workers)" % a.workers, ceiling, "%.2f" % (ceiling / one)),
        ("pack_imagenet, %d workers" % a.workers, pack_rate, "%.2f" % (pack_rate / one)),
        ("  pack / ceiling, median of %d rounds: %.2f" % (a.repeats, ratio_med), "", ""),
        ("  per CPU-second (CPU ms/img: decode %.2f, pack %.2f): %.2f"
         % (statistics.median(dec_ms), statistics.median(pack_ms), cpu_ratio), "", ""),
        ("  ImageNet-1k on %d cores: %.0f min at this rate per worker; %.0f min at a core per "
         "worker (its CPU time), reading and writing %.0f MB/s"
         % (NODE_CORES, imagenet_s / 60, imagenet_cpu_s / 60, imagenet_mb_s), "", ""),
        ("shard checksum, 1 process (%.0f MB/s)" % (mb / sum_s), len(blobs) / sum_s,
         "%.2f" % (len(blobs) / sum_s / one)),
        ("verify_pack --fast, 1 process (%.0f MB/s)" % (mb / fast_s), len(blobs) / fast_s,
         "%.2f" % (len(blobs) / fast_s / one)),
        ("verify_pack (decode all), 1 process", records / full_s,
         "%.2f" % (records / full_s / one)),
    ]
    extra: Dict[str, Any] = {}
    if rst_rates:
        rst_rate = statistics.median(rst_rates)
        rst_ms = statistics.median(rst_cpu) * 1e3 / len(blobs)
        rows.insert(5, ("pack_imagenet --restart-markers, %d workers (CPU ms/img %.2f)"
                        % (a.workers, rst_ms), rst_rate, "%.2f" % (rst_rate / one)))
        rows.insert(6, ("  pack --restart-markers / ceiling: %.2f" % (rst_rate / ceiling), "",
                        ""))
        extra = {"pack_restarts_img_s": round(rst_rate, 1),
                 "pack_restarts_over_ceiling": round(rst_rate / ceiling, 3),
                 "pack_restarts_cpu_ms": round(rst_ms, 3)}
    finish(rows, ["stage (%d files, %.1f MB of shards)" % (len(src_files), mb), "img/s (median)",
                  "x 1 process"],
           {"pack_img_s": round(pack_rate, 1), "decode_ceiling_img_s": round(ceiling, 1),
            "workers": a.workers, "files": len(src_files), "shard_size": a.shard_size,
            "pack_over_ceiling": round(ratio_med, 3),
            "pack_over_ceiling_rounds": [round(x, 3) for x in ratios],
            "decode_img_s_rounds": [round(x, 1) for x in ones],
            "pack_img_s_rounds": [round(x, 1) for x in all_rates], "repeats": a.repeats,
            "imagenet_files": IMAGENET_FILES, "node_cores": NODE_CORES,
            "imagenet_pack_minutes_16_cores": round(imagenet_s / 60, 1),
            "imagenet_pack_minutes_16_cores_cpu": round(imagenet_cpu_s / 60, 1),
            "imagenet_pack_disk_mb_s_16_cores_cpu": round(imagenet_mb_s),
            "decode_cpu_ms": round(statistics.median(dec_ms), 3),
            "pack_cpu_ms": round(statistics.median(pack_ms), 3),
            "pack_over_ceiling_cpu": round(cpu_ratio, 3),
            "pack_img_s_per_worker": round(pack_rate / a.workers, 1),
            "shard_mb": round(mb, 2), "checksum_mb_s": round(mb / sum_s, 1),
            "checksum_share_of_pack": round(sum_s / a.workers / pack_s, 4),
            "verify_fast_mb_s": round(mb / fast_s, 1),
            "verify_full_img_s": round(records / full_s, 1),
            "data": show(data), "mean_file_kb": round(mean_file_kb(src_files), 1), **extra},
           "bench_pack: %s" % show(data))


def _pack(data: Optional[str], out: str = "", splits: Sequence[str] = (), workers: int = 0,
          shard_size: int = 0, restart_markers: bool = False) -> Tuple[int, float]:
    """(files seen, CPU seconds of this process and its reaped pack workers) of one pack, run in
    the bench's packing process; with data None, only imports (the process's start)."""
    if data is None:
        return 0, 0.0
    t0 = os.times()
    res = pack_imagenet(data, out, splits=list(splits), workers=workers, progress=False,
                        shard_size=shard_size, log=lambda *x: None,
                        restart_markers=restart_markers)
    t1 = os.times()
    return sum(s.seen for s in res.splits), sum(t1[:4]) - sum(t0[:4])


def markdown(results: Sequence[Dict[str, Any]]) -> List[str]:
    """BENCHMARKS.md rows for one or more results of this script (its JSON last lines)."""
    rows = []
    for r in results:
        kb = r.get("mean_file_kb")
        rows.append(("%s, %d files%s, %d workers"
                     % (r.get("data", "sample set"), r["files"],
                        " of %.0f KB" % kb if kb else "", r["workers"]),
                     r["pack_img_s"], r["decode_ceiling_img_s"], r["pack_over_ceiling"],
                     r.get("checksum_mb_s"), r.get("checksum_share_of_pack"),
                     r.get("verify_fast_mb_s"), r.get("verify_full_img_s"),
                     r.get("pack_over_ceiling_cpu"), r.get("imagenet_pack_minutes_16_cores"),
                     r.get("imagenet_pack_minutes_16_cores_cpu")))
    return md_table(["data", "pack img/s", "decode ceiling img/s", "pack / ceiling",
                     "checksum MB/s", "checksum share of pack time", "verify --fast MB/s",
                     "verify (decode all) img/s", "pack / ceiling per CPU-second",
                     "ImageNet-1k pack, 16 cores (min)", "same, a core per worker (min)"],
                    rows) + [
        "", "Medians of interleaved rounds (ceiling, then pack, per round); pack / ceiling is "
        "the median of the rounds' ratios; per CPU-second compares CPU time per image (the packer's "
        "summed over its workers), which other load on the machine distorts less. The "
        "ImageNet-1k times are projections, not measurements (1.33 M files, one worker per "
        "core): from the per-worker rate measured here, and from the CPU time per image, i.e. "
        "with a whole core per worker, as on a node the packer has to itself (the disk must "
        "then keep up: the JSON's imagenet_pack_disk_mb_s_16_cores_cpu, read and written)."]


if __name__ == "__main__":
    main()
