#!/usr/bin/env python3
"""Raw-pixel storage (shard format version 2) against JPEG records: the same files packed with
--raw-fraction 0, 0.5 and 1 (FFCV stores about half its ImageNet as raw pixels), then the
engine Loader's training transform over each pack at each --sizes, one worker: img/s per
worker, CPU milliseconds per image (this process and the worker, as bench_loader counts them)
and the bytes per image on disk. Every (fraction, size) runs --seconds per round, interleaved,
for --repeats rounds; medians are reported. The default data is the sample set's ImageNet-like
variant (~107 KB JPEGs at 450-500 px); --images picks that many train files of it (the first
of each class in turn), so that the all-raw pack stays small."""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
from typing import Any, Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loader import measure  # noqa: E402
from common import (  # noqa: E402
    add_data_args,
    finish,
    log,
    md_table,
    mean_file_kb,
    ratio,
    sample_data,
    show,
)

from engine.data import Loader, shards  # noqa: E402
from engine.data.folder import scan_split  # noqa: E402
from engine.data.pack import pack_imagenet  # noqa: E402


def subset(train_dir: str, n: int, dst: str) -> List[str]:
    """dst/train/<wnid>/... holding links to `n` files of train_dir, classes in turn."""
    by_class: Dict[str, List[str]] = {}
    for rel, _ in scan_split(train_dir):
        by_class.setdefault(rel.split("/")[0], []).append(rel)
    picked: List[str] = []
    queues = [list(v) for _, v in sorted(by_class.items())]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    for rel in picked:
        os.makedirs(os.path.join(dst, "train", os.path.dirname(rel)), exist_ok=True)
        os.symlink(os.path.join(train_dir, rel), os.path.join(dst, "train", rel))
    return [os.path.join(train_dir, rel) for rel in picked]


def pack_bytes(split_dir: str) -> Dict[str, float]:
    meta = shards.read_meta(split_dir)
    disk = sum(os.path.getsize(os.path.join(split_dir, e["file"])) for e in meta["shards"])
    n = max(1, meta["num_samples"])
    return {"disk_kb": disk / n / 1e3, "record_kb": meta["bytes"] / n / 1e3,
            "raw_records": meta.get("raw_records", 0), "version": meta["version"],
            "records": meta["num_samples"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_data_args(p, packed=False)
    p.set_defaults(imagenet_like=True)
    p.add_argument("--images", type=int, default=400, help="train files packed (default 400)")
    p.add_argument("--fractions", default="0,0.5,1", help="--raw-fraction values")
    p.add_argument("--sizes", default="160,224", help="training crop sizes")
    p.add_argument("--max-side", type=int, default=None,
                   help="the packs' --max-side (FFCV caps ResNet-50's images at 500 px)")
    p.add_argument("--workers", type=int, default=1, help="loader workers (figures are per worker)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=3.0, help="per configuration and round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pack-workers", type=int, default=2)
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="pack into DIR and keep it (default: a temporary folder)")
    a = p.parse_args(argv)
    fractions = [float(f) for f in a.fractions.split(",") if f]
    sizes = [int(s) for s in a.sizes.split(",") if s]
    raw, _ = sample_data(a.data, need_packed=False, imagenet_like=a.imagenet_like)
    work = a.keep or tempfile.mkdtemp(prefix="bench-raw-")
    try:
        src = os.path.join(work, "src")
        if os.path.exists(src):
            shutil.rmtree(src)
        files = subset(os.path.join(raw, "train"), a.images, src)
        packs, sizes_of = {}, {}
        for f in fractions:
            out = os.path.join(work, "raw%g" % f)
            shutil.rmtree(out, ignore_errors=True)
            pack_imagenet(src, out, splits=["train"], workers=a.pack_workers, shard_size=500,
                          max_side=a.max_side, raw_fraction=f, progress=False, log=lambda *x: None)
            packs[f] = os.path.join(out, "train")
            sizes_of[f] = pack_bytes(packs[f])
            log("raw fraction %g: %d records (%d raw), %.1f KB per image on disk"
                % (f, sizes_of[f]["records"], sizes_of[f]["raw_records"], sizes_of[f]["disk_kb"]))
        loaders = {(f, s): Loader(packs[f], batch_size=a.batch_size, train=True, image_size=s,
                                  workers=a.workers) for f in fractions for s in sizes}
        streams = {k: ld.stream() for k, ld in loaders.items()}
        got: Dict[Any, List[float]] = {k: [] for k in loaders}
        cpu: Dict[Any, List[float]] = {k: [] for k in loaders}
        for r in range(a.repeats):
            for k in loaders:
                img_s, ms = measure(streams[k], a.seconds, a.batch_size)
                got[k].append(img_s / max(1, a.workers))
                cpu[k].append(ms)
                log("round %d raw %g, %d px: %.0f img/s per worker, %.2f CPU ms/img"
                    % (r, k[0], k[1], got[k][-1], ms))
        for ld in loaders.values():
            ld.close()
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    rows, runs = [], []
    for s in sizes:
        base = med[(fractions[0], s)]
        for f in fractions:
            b = sizes_of[f]
            rows.append(("raw %g, %d px" % (f, s), med[(f, s)], mcpu[(f, s)],
                         1e3 / mcpu[(f, s)] if mcpu[(f, s)] else "-",
                         "%.2f" % (med[(f, s)] / base), b["disk_kb"],
                         "%.2f" % (b["disk_kb"] / sizes_of[fractions[0]]["disk_kb"])))
            runs.append({"raw_fraction": f, "image_size": s, "img_s_per_worker": round(med[(f, s)], 1),
                         "cpu_ms": round(mcpu[(f, s)], 3), "disk_kb_per_image": round(b["disk_kb"], 1),
                         "record_kb_per_image": round(b["record_kb"], 1),
                         "raw_records": b["raw_records"], "records": b["records"],
                         "version": b["version"]})
    finish(rows, ["%d worker(s), batch %d" % (a.workers, a.batch_size), "img/s per worker",
                  "CPU ms/img", "img per CPU-s", "x raw %g" % fractions[0], "KB/img on disk",
                  "x bytes"],
           {"runs": runs, "repeats": a.repeats, "workers": a.workers, "batch_size": a.batch_size,
            "images": len(files), "mean_file_kb": round(mean_file_kb(files), 1),
            "max_side": a.max_side, "data": show(raw),
            "imagenet_like": a.imagenet_like and a.data is None},
           "bench_raw: %s, %d train files, mean file %.0f KB, max side %s"
           % (show(raw), len(files), mean_file_kb(files), a.max_side or "none"))


# What one H100 consumes training ResNet-50 at the pace of MLPerf Training's submissions (about
# 7,000 images/s per GPU; an approximate public figure, not ours): the loader cores it needs are
# that rate times the CPU time per image.
MLPERF_RESNET50_IMG_S_PER_GPU = 7000


def markdown(results: Sequence[Dict[str, Any]]) -> List[str]:
    """BENCHMARKS.md lines for results of this script: one row per (run, fraction, size)."""
    rows = []
    for res in results:
        base = {r["image_size"]: r for r in res["runs"] if r["raw_fraction"] == 0}
        for r in res["runs"]:
            b = base.get(r["image_size"])
            rows.append(("%d px, raw %g, %s" % (r["image_size"], r["raw_fraction"],
                                                res.get("data", "sample set")),
                         r["img_s_per_worker"], r["cpu_ms"],
                         1e3 / r["cpu_ms"] if r["cpu_ms"] else None,
                         ratio(r["img_s_per_worker"], b and b["img_s_per_worker"]),
                         r["disk_kb_per_image"],
                         ratio(r["disk_kb_per_image"], b and b["disk_kb_per_image"]),
                         "%.1f" % (MLPERF_RESNET50_IMG_S_PER_GPU * r["cpu_ms"] / 1e3)
                         if r["cpu_ms"] else None))
    return md_table(["config", "img/s per worker", "CPU ms/img", "img per CPU-s",
                     "x JPEG", "KB/img on disk", "x JPEG bytes",
                     "loader cores per H100 at MLPerf's ResNet-50 rate"], rows) + [
        "", "The last column: %d img/s per GPU (MLPerf Training's ResNet-50 pace on H100s, "
        "approximate and public, not measured here) x CPU time per image, on this machine's "
        "cores." % MLPERF_RESNET50_IMG_S_PER_GPU]


if __name__ == "__main__":
    main()
