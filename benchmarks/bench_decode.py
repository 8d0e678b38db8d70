#!/usr/bin/env python3
"""Per-image decode cost on one core, on the same JPEG bytes (in memory, no I/O):
full decodes by libjpeg-turbo, OpenCV and Pillow; the engine's train path (DCT-scaled decode,
crop window, resize, flip, CHW write) with and without the ROI decoder; and the val path."""
import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_data_args, finish, image_files, rate, read_all, sample_data  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from engine.data.decode import (decode_bgr, decode_crop, jpeg_info, jpeg_size, pick_scale,  # noqa: E402
                                roi_available)
from engine.data.loader import _Decoder  # noqa: E402
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
    blobs = read_all(image_files(os.path.join(data, "train"))[: a.limit])
    S = a.image_size
    out = np.empty((3, S, S), np.uint8)

    def loop(fn):
        def run():
            for i, b in enumerate(blobs):
                fn(i, b)
            return len(blobs)
        return rate(run, repeats=a.repeats)[0]

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

    train = _Decoder(True, S, 0, use_roi=False)
    train_roi = _Decoder(True, S, 0, use_roi=True)
    val = _Decoder(False, S, 0, use_roi=False)
    val_roi = _Decoder(False, S, 0, use_roi=True)
    results = {
        "cv2_imdecode_full": loop(lambda i, b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)),
        "pil_full": loop(pil),
        "turbojpeg_full": loop(lambda i, b: decode_bgr(b)),
        "turbojpeg_dct_scaled": loop(scaled),
        "train_full_decode_crop_resize": loop(lambda i, b: train(b, i, 0, out)),
        "val_resize_center_crop": loop(lambda i, b: val(b, i, 0, out)),
    }
    if roi_available():
        results["roi_decoder_full"] = loop(roi_full)
        results["train_roi_decode_resize"] = loop(lambda i, b: train_roi(b, i, 0, out))
        results["val_roi_resize_center_crop"] = loop(lambda i, b: val_roi(b, i, 0, out))
    base = results["turbojpeg_full"]
    rows = [(k, v, "%.2f" % (v / base)) for k, v in results.items()]
    finish(rows, ["one core, %d JPEGs, %d px" % (len(blobs), S), "img/s (median)", "x turbojpeg full"],
           dict({k: round(v, 1) for k, v in results.items()}, image_size=S, images=len(blobs),
                roi=roi_available()),
           "bench_decode: %s" % data)


if __name__ == "__main__":
    main()
