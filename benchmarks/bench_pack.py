#!/usr/bin/env python3
"""Packing rate against its ceiling: one process doing only the strict decode of the same files,
times the worker count. Target: pack_img_s >= 0.8 x decode_ceiling_img_s. Next to it: the
shard checksum (blake2b) rate and its share of the packing time, and tools/verify_pack.py's rates
(--fast: checksums only; full: every record decoded), each in one process.

Workers pack whole shards in parallel, so the default --shard-size here is small enough for the
sample set to form several shards per worker, as ImageNet's 1.28 M files do at the packer's
default of 5000 (257 train shards)."""
import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_data_args, finish, image_files, log, md_table, mean_file_kb, rate,  # noqa: E402
                    read_all, sample_data, show)

from engine.data import shards  # noqa: E402
from engine.data.decode import decode_bgr  # noqa: E402
from engine.data.verify import verify  # noqa: E402
from engine.data.pack import pack_workers, pack_imagenet  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_data_args(p, packed=False)
    p.add_argument("--workers", type=int, default=pack_workers())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--splits", default="train,val")
    p.add_argument("--shard-size", type=int, default=100)
    a = p.parse_args(argv)
    data, _ = sample_data(a.data, need_packed=False, imagenet_like=a.imagenet_like)
    splits = a.splits.split(",")
    src_files = [f for s in splits for f in image_files(os.path.join(data, s))]
    blobs = read_all(src_files)  # warm the page cache too, as packing reads the same files

    def decode_all():
        for b in blobs:
            decode_bgr(b)
        return len(blobs)

    one, _ = rate(decode_all, repeats=a.repeats)
    ceiling = one * a.workers

    kept = []

    def pack_once():
        out = tempfile.mkdtemp(prefix="bench-pack-")
        try:
            res = pack_imagenet(data, out, splits=splits, workers=a.workers, progress=False,
                                shard_size=a.shard_size, log=lambda *x: None)
            return sum(s.seen for s in res.splits)
        finally:
            if kept:
                shutil.rmtree(kept.pop())
            kept.append(out)  # the last pack stays for the checksum and verify figures

    pack_rate, all_rates = rate(pack_once, repeats=a.repeats)
    log("pack rates: %s" % ", ".join("%.0f" % r for r in all_rates))
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
    assert not any(r.mismatches for r in fast + full)
    records = sum(r.decoded for r in full)
    pack_s = len(blobs) / pack_rate  # wall time of one pack at the median rate
    mb = total / 1e6
    rows = [
        ("strict decode, 1 process", one, "1.00"),
        ("decode ceiling (x %d workers)" % a.workers, ceiling, "%.2f" % (ceiling / one)),
        ("pack_imagenet, %d workers" % a.workers, pack_rate, "%.2f" % (pack_rate / one)),
        ("shard checksum, 1 process (%.0f MB/s)" % (mb / sum_s), len(blobs) / sum_s,
         "%.2f" % (len(blobs) / sum_s / one)),
        ("verify_pack --fast, 1 process (%.0f MB/s)" % (mb / fast_s), len(blobs) / fast_s,
         "%.2f" % (len(blobs) / fast_s / one)),
        ("verify_pack (decode all), 1 process", records / full_s,
         "%.2f" % (records / full_s / one)),
    ]
    finish(rows, ["stage (%d files, %.1f MB of shards)" % (len(src_files), mb), "img/s (median)",
                  "x 1 process"],
           {"pack_img_s": round(pack_rate, 1), "decode_ceiling_img_s": round(ceiling, 1),
            "workers": a.workers, "files": len(src_files), "shard_size": a.shard_size,
            "pack_over_ceiling": round(pack_rate / ceiling, 3),
            "pack_img_s_per_worker": round(pack_rate / a.workers, 1),
            "shard_mb": round(mb, 2), "checksum_mb_s": round(mb / sum_s, 1),
            "checksum_share_of_pack": round(sum_s / a.workers / pack_s, 4),
            "verify_fast_mb_s": round(mb / fast_s, 1),
            "verify_full_img_s": round(records / full_s, 1),
            "data": show(data), "mean_file_kb": round(mean_file_kb(src_files), 1)},
           "bench_pack: %s" % show(data))


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
                     r.get("verify_fast_mb_s"), r.get("verify_full_img_s")))
    return md_table(["data", "pack img/s", "decode ceiling img/s", "pack / ceiling",
                     "checksum MB/s", "checksum share of pack time", "verify --fast MB/s",
                     "verify (decode all) img/s"], rows)


if __name__ == "__main__":
    main()
