#!/usr/bin/env python3
"""Where one loader worker's time per image goes, on the ROI path, per output size.

Each stage is timed by calling the functions the worker calls, one stage at a time, on the
same records (the first --images of the loader's epoch-0 order): the record read (LMDB +
msgpack), the crop geometry (RNG, box, DCT scale), the decoder's setup (header, scale, crop
columns), entropy decoding of the rows down to the crop's last, IDCT + upsampling of the window,
colour conversion (YCbCr -> BGR: the whole decode minus the same decode left in YCbCr), the
resize to S x S, and the flip + CHW write into a ring slot. Then the worker's `fill()` on the
same records in this process (what is left over is Python glue between the stages), and a real
Loader with one worker: its worker's CPU time per image beyond `fill()` is IPC and bookkeeping,
and the main process's is reported beside it. All figures are CPU microseconds per image
(process time, so that other load on a shared machine inflates them less than wall time),
medians over --repeats rounds that interleave the stages, the sizes and the loader. The full
strict decode of the same records (TurboJPEG, exact IDCT, one process) is the ceiling the
loader is compared with."""
import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_data_args, finish, log, md_table, sample_data, settle, show,  # noqa: E402
                    tree_cpu)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from engine.data import Loader  # noqa: E402
from engine.data.decode import _jpegroi, decode_bgr, roi_available  # noqa: E402
from engine.data.sampler import Sampler  # noqa: E402
from engine.data.sources import open_source  # noqa: E402
from engine.data.transforms import TrainTransform, resize_square, write_chw  # noqa: E402
from engine.data.worker import RingLayout, fill  # noqa: E402

# (key, row label): the stages in the order the worker runs them
STAGES = (
    ("read", "record read (LMDB + msgpack)"),
    ("geometry", "crop geometry (RNG, box, DCT scale)"),
    ("setup", "decoder setup (header, scale, columns)"),
    ("entropy", "entropy decode, rows down to the crop's last"),
    ("idct", "IDCT + upsampling of the window"),
    ("color", "colour conversion YCbCr -> BGR"),
    ("resize", "resize to S x S (bilinear)"),
    ("write", "flip + CHW write into the ring slot"),
    ("glue", "Python between the stages (fill() - the above)"),
    ("ipc", "IPC + bookkeeping (worker CPU - fill())"),
)
# decode_crop's `stop` values (engine/data/_jpegroi.c)
STOP_SETUP, STOP_ENTROPY, STOP_NOCOLOR, STOP_NONE = 1, 2, 3, 0


def loader_cpu(split: str, S: int, batch_size: int, batches: int, seed: int):
    """(worker CPU us/img, main process CPU us/img, wall img/s) of a one-worker Loader over
    `batches` batches of steady state: the ring is full at both ends, so the worker did exactly
    the consumed batches' work in between."""
    import psutil

    main_cpu = time.process_time
    with Loader(split, batch_size=batch_size, train=True, image_size=S, workers=1,
                seed=seed) as ld:
        it = ld.stream()
        next(it)
        workers = [c.pid for c in psutil.Process().children(recursive=True)]
        settle(workers)
        w0, m0, t0 = tree_cpu(workers), main_cpu(), time.perf_counter()
        n = 0
        for _ in range(batches):
            n += len(next(it)[0])
        wall = time.perf_counter() - t0
        m1 = main_cpu()
        settle(workers)
        w1 = tree_cpu(workers)
    return (w1 - w0) / n * 1e6, (m1 - m0) / n * 1e6, n / wall


def timer_cost() -> float:
    """Seconds one pair of thread_time() calls adds to an interval (subtracted per stage)."""
    clock = time.thread_time
    samples = []
    for _ in range(2000):
        t0 = clock()
        samples.append(clock() - t0)
    return statistics.median(samples)


def stage_times(source, tf: TrainTransform, indices: np.ndarray, S: int, slot: np.ndarray,
                labels: np.ndarray) -> Dict[str, float]:
    """CPU us per image of each in-process stage, of fill() and of the full decode (with its
    record read, as the ceiling is quoted in img/s of a process reading its files).

    The stages of one record are timed back to back, record after record; fill() and the full
    decode run on each batch-sized chunk right after its records' stages: load on the machine
    that changes during the round then weighs on every figure alike."""
    clock, cost = time.thread_time, timer_cost()
    acc = dict.fromkeys(("read", "geometry", "setup", "entropy", "nocolor", "decode", "resize",
                         "write", "fill", "ceiling"), 0.0)
    n, full = len(indices), 0
    B = len(slot)
    for k in range(0, n, B):
        part = indices[k:k + B]
        for j, i in enumerate(part):
            i = int(i)
            t0 = clock()
            data, _, _, (width, height) = source.read(i)
            t1 = clock()
            num, x0, y0, w, h, flip = tf.window(width, height, i, 0, S)
            t2 = clock()
            acc["read"] += t1 - t0
            acc["geometry"] += t2 - t1
            full += num == 8
            out = np.empty((h, w, 3), np.uint8)
            for key, stop in (("setup", STOP_SETUP), ("entropy", STOP_ENTROPY),
                              ("nocolor", STOP_NOCOLOR), ("decode", STOP_NONE)):
                t0 = clock()
                _jpegroi.decode_crop(data, num, x0, y0, w, h, out, True, stop)
                acc[key] += clock() - t0
            t0 = clock()
            img = resize_square(out, S)
            t1 = clock()
            write_chw(img, slot[j], flip)
            t2 = clock()
            acc["resize"] += t1 - t0
            acc["write"] += t2 - t1
        t0 = clock()
        fill(source, tf, part, 0, slot[:len(part)], labels[:len(part)])
        t1 = clock()
        for i in part:
            decode_bgr(source.read(int(i))[0])
        t2 = clock()
        acc["fill"] += t1 - t0
        acc["ceiling"] += t2 - t1
    us = {k: (v / n - (cost if k not in ("fill", "ceiling") else 0.0)) * 1e6
          for k, v in acc.items()}
    t = {"read": us["read"], "geometry": us["geometry"], "setup": us["setup"],
         "entropy": us["entropy"] - us["setup"], "idct": us["nocolor"] - us["entropy"],
         "color": us["decode"] - us["nocolor"], "decode": us["decode"],
         "resize": us["resize"], "write": us["write"], "fill": us["fill"],
         "ceiling": us["ceiling"], "full_scale_share": full / n}
    return t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_data_args(p)
    p.add_argument("--sizes", default="160,224", help="output sizes (comma list)")
    p.add_argument("--images", type=int, default=256, help="records timed per round")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loader-batches", type=int, default=6,
                   help="steady-state batches of the one-worker Loader per round and size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not roi_available():
        raise SystemExit("error: bench_stages times the ROI decoder, which is not built "
                         "(python setup.py build_ext --inplace)")
    cv2.setNumThreads(1)  # as in a loader worker
    raw, packed = sample_data(a.data, a.packed, imagenet_like=a.imagenet_like)
    split = os.path.join(packed, "train")
    source = open_source(split)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    order = Sampler(len(source), a.batch_size, shuffle=True, seed=a.seed).indices(0)
    indices = order[a.batch_size:a.batch_size + a.images]  # the loader's batches 1.. of epoch 0
    tf = TrainTransform(a.seed, use_roi=True)
    layout = RingLayout(1, a.batch_size, max(sizes))
    ring = layout.allocate()
    got: Dict[int, List[Dict[str, float]]] = {S: [] for S in sizes}
    for r in range(a.repeats):
        for S in sizes:
            slot, labels = layout.arrays(ring, 0, S)
            t = stage_times(source, tf, indices, S, slot, labels)
            t["worker"], t["main"], t["loader_img_s"] = loader_cpu(
                split, S, a.batch_size, a.loader_batches, a.seed)
            t["glue"] = t["fill"] - sum(t[k] for k in ("read", "geometry", "decode", "resize",
                                                       "write"))
            t["ipc"] = t["worker"] - t["fill"]
            got[S].append(t)
            log("repeat %d, %d px: fill %.0f us/img, worker %.0f, main %.0f, full decode %.0f"
                % (r, S, t["fill"], t["worker"], t["main"], t["ceiling"]))
    med = {S: {k: statistics.median(t[k] for t in got[S]) for k in got[S][0]} for S in sizes}
    rows = []
    for key, label in STAGES:
        row: List[Any] = [label]
        for S in sizes:
            row += [med[S][key], "%.0f%%" % (100 * med[S][key] / med[S]["worker"])]
        rows.append(row)
    for label, key in (("= one worker, CPU per image", "worker"),
                       ("main process, CPU per image", "main"),
                       ("full strict decode (the ceiling's unit)", "ceiling")):
        row = [label]
        for S in sizes:
            row += [med[S][key], "%.0f%%" % (100 * med[S][key] / med[S]["worker"])]
        rows.append(row)
    row = ["worker / ceiling, img per CPU-s"]
    for S in sizes:
        row += ["%.2fx" % (med[S]["ceiling"] / med[S]["worker"]), ""]
    rows.append(row)
    header: List[str] = ["stage (CPU us per image, medians)"]
    for S in sizes:
        header += ["%d px" % S, "share"]
    result = {
        "sizes": sizes, "images": len(indices), "repeats": a.repeats,
        "batch_size": a.batch_size, "data": show(raw),
        "stages_us": {str(S): {k: round(v, 1) for k, v in med[S].items()} for S in sizes},
        "worker_over_ceiling": {str(S): round(med[S]["ceiling"] / med[S]["worker"], 3)
                                for S in sizes},
    }
    finish(rows, header, result, "bench_stages: %s, %d records, one loader worker, ROI path"
           % (show(raw), len(indices)))


def markdown(results: Sequence[Dict[str, Any]]) -> List[str]:
    """BENCHMARKS.md lines for one or more results of this script (its JSON last lines)."""
    out: List[str] = []
    for r in results:
        sizes = [str(s) for s in r["sizes"]]
        st = r["stages_us"]
        header = ["stage, CPU us per image (%s, %d records)" % (r.get("data", "sample set"),
                                                                r["images"])]
        header += ["%s px" % s for s in sizes]
        rows: List[List[Any]] = [[label] + [st[s][key] for s in sizes] for key, label in STAGES]
        rows.append(["one worker, total"] + [st[s]["worker"] for s in sizes])
        rows.append(["main process"] + [st[s]["main"] for s in sizes])
        rows.append(["full strict decode"] + [st[s]["ceiling"] for s in sizes])
        rows.append(["worker rate / full-decode rate"] +
                    [r["worker_over_ceiling"][s] for s in sizes])
        if out:
            out.append("")
        out += md_table(header, rows)
    if results:
        out += ["", "The last two stages are residuals (a total minus the stages measured on "
                "their own): where one is negative, the machine's noise exceeded it."]
    return out


if __name__ == "__main__":
    main()
