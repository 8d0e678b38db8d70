#!/usr/bin/env python3
"""Packing rate against its ceiling: one process doing only the strict decode of the same files,
times the worker count. Target: pack_img_s >= 0.8 x decode_ceiling_img_s.

Workers pack whole shards in parallel, so the default --shard-size here is small enough for the
sample set to form several shards per worker, as ImageNet's 1.28 M files do at the packer's
default of 5000 (257 train shards)."""
import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_data_args, finish, image_files, log, rate, read_all, sample_data  # noqa: E402

from engine.data.decode import decode_bgr  # noqa: E402
from engine.data.pack import default_workers, pack_imagenet  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_data_args(p, packed=False)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--splits", default="train,val")
    p.add_argument("--shard-size", type=int, default=100)
    a = p.parse_args(argv)
    data, _ = sample_data(a.data, need_packed=False)
    splits = a.splits.split(",")
    files = [f for s in splits for f in image_files(os.path.join(data, s))]
    blobs = read_all(files)  # warm the page cache too, as packing reads the same files

    def decode_all():
        for b in blobs:
            decode_bgr(b)
        return len(blobs)

    one, _ = rate(decode_all, repeats=a.repeats)
    ceiling = one * a.workers

    def pack_once():
        out = tempfile.mkdtemp(prefix="bench-pack-")
        try:
            res = pack_imagenet(data, out, splits=splits, workers=a.workers, progress=False,
                                shard_size=a.shard_size, log=lambda *x: None)
            return sum(s["seen"] for s in res["splits"])
        finally:
            shutil.rmtree(out)

    pack_rate, all_rates = rate(pack_once, repeats=a.repeats)
    log("pack rates: %s" % ", ".join("%.0f" % r for r in all_rates))
    rows = [
        ("strict decode, 1 process", one, "1.00"),
        ("decode ceiling (x %d workers)" % a.workers, ceiling, "%.2f" % (ceiling / one)),
        ("pack_imagenet, %d workers" % a.workers, pack_rate, "%.2f" % (pack_rate / one)),
    ]
    finish(rows, ["stage (%d files)" % len(files), "img/s (median)", "x 1 process"],
           {"pack_img_s": round(pack_rate, 1), "decode_ceiling_img_s": round(ceiling, 1),
            "workers": a.workers, "files": len(files), "shard_size": a.shard_size,
            "pack_over_ceiling": round(pack_rate / ceiling, 3)},
           "bench_pack: %s" % data)


if __name__ == "__main__":
    main()
