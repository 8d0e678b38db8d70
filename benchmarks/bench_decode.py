#!/usr/bin/env python3
"""Per-image decode cost on one core, on the same JPEG bytes (in memory, no I/O):
full decodes by libjpeg-turbo, OpenCV and Pillow; the engine's train path (DCT-scaled decode,
crop window, resize, flip, CHW write) with and without the ROI decoder; and the val path.
Every path runs once per round, the rounds interleaved, and each figure is its median."""
import argparse
import io
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_data_args, finish, image_files, md_escape, md_table, mean_file_kb,  # noqa: E402
                    read_all, sample_data, show)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from engine.data.decode import (decode_bgr, decode_crop, jpeg_info, jpeg_size, pick_scale,  # noqa: E402
                                roi_available)
from engine.data.transforms import TrainTransform, ValTransform  # noqa: E402
from engine.data.transforms import random_resized_crop, sample_rng  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_data_args(p, packed=False)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--limit", type=int, default=600, help="images to use (default 600)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    cv2.setNumThreads(1)
    data, _ = sample_data(a.data, need_packed=False, imagenet_like=a.imagenet_like)
    files = image_files(os.path.join(data, "train"))[: a.limit]
    blobs = read_all(files)
    S = a.image_size
    out = np.empty((3, S, S), np.uint8)

    def pil(i, b):
        from PIL import Image

        np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))

    def scaled(i, b):  # the DCT scale the train crop allows, whole image
        info = jpeg_info(b)
        x, y, w, h = random_resized_crop(info.height, info.width, sample_rng(0, 0, i))
        num = pick_scale(w, h, S, S)
        decode_bgr(b, None if num == 8 else (num, 8), info)

    def roi_full(i, b):
        w, h = jpeg_size(b)
        decode_crop(b, 8, 0, 0, w, h)

    train = TrainTransform(0, use_roi=False)
    train_roi = TrainTransform(0, use_roi=True)
    val = ValTransform(use_roi=False)
    val_roi = ValTransform(use_roi=True)
    paths = {
        "cv2_imdecode_full": lambda i, b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
        "pil_full": pil,
        "turbojpeg_full": lambda i, b: decode_bgr(b),
        "turbojpeg_dct_scaled": scaled,
        "train_full_decode_crop_resize": lambda i, b: train(b, i, 0, out),
        "val_resize_center_crop": lambda i, b: val(b, i, 0, out),
    }
    if roi_available():
        paths["roi_decoder_full"] = roi_full
        paths["train_roi_decode_resize"] = lambda i, b: train_roi(b, i, 0, out)
        paths["val_roi_resize_center_crop"] = lambda i, b: val_roi(b, i, 0, out)
    rounds: Dict[str, List[float]] = {k: [] for k in paths}
    for _ in range(a.repeats):  # interleaved: every path once per round
        for name, fn in paths.items():
            t0 = time.perf_counter()
            for i, b in enumerate(blobs):
                fn(i, b)
            rounds[name].append(len(blobs) / (time.perf_counter() - t0))
    results = {k: statistics.median(v) for k, v in rounds.items()}
    base = results["turbojpeg_full"]
    rows = [(k, v, "%.2f" % (v / base)) for k, v in results.items()]
    finish(rows, ["one core, %d JPEGs, %d px" % (len(blobs), S), "img/s (median)", "x turbojpeg full"],
           dict({k: round(v, 1) for k, v in results.items()}, image_size=S, images=len(blobs),
                roi=roi_available(), data=show(data), mean_file_kb=round(mean_file_kb(files), 1)),
           "bench_decode: %s" % show(data))


# (result key, what it measures), in the order of the table
ROWS = [
    ("cv2_imdecode_full", "OpenCV cv2.imdecode, full image"),
    ("pil_full", "Pillow, full image"),
    ("turbojpeg_full", "libjpeg-turbo (PyTurboJPEG), full image"),
    ("turbojpeg_dct_scaled", "libjpeg-turbo, DCT-scaled for the train crop"),
    ("roi_decoder_full", "engine ROI decoder, full image"),
    ("train_full_decode_crop_resize", "train path: full decode + crop + resize + flip"),
    ("train_roi_decode_resize", "train path: ROI (+DCT) decode + resize + flip"),
    ("val_resize_center_crop", "val path: decode + resize + center crop"),
    ("val_roi_resize_center_crop", "val path with the engine decoder"),
]


def markdown(results: Sequence[Dict[str, Any]]) -> List[str]:
    """BENCHMARKS.md lines for one or more results of this script (its JSON last lines)."""
    out: List[str] = []
    for r in results:
        base = r.get("turbojpeg_full")
        kb = r.get("mean_file_kb")
        rows = [(label, r[key], r[key] / base if base else None) for key, label in ROWS
                if r.get(key)]
        if out:
            out.append("")
        out += ["One core, %d JPEGs of %s%s, %d px output."
                % (r["images"], md_escape(r.get("data", "the sample set")),
                   " (mean %.0f KB)" % kb if kb else "", r["image_size"]), ""]
        out += md_table(["path", "img/s", "x turbojpeg full"], rows)
    return out


if __name__ == "__main__":
    main()
