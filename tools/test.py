#!/usr/bin/env python
"""Top-1 / top-5 of a model on a val set: argparse -> TestConfig -> engine.evaluate.test."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import run_tool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate a classifier on ImageNet val (resize to image-size/0.875, center "
                    "crop). The last line reads 'top1 <x> top5 <y>' (percent).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-d", "--data", required=True, metavar="DIR",
                   help="ROOT (its val/ is used) or a val split folder: packed or raw")
    p.add_argument("-a", "--arch", default="resnet18", help="model name (engine.models.ARCHS)")
    p.add_argument("-m", "--model", default=None, metavar="PKL",
                   help="weights: path or URL to an official .pkl or an engine checkpoint (a "
                        "URL is downloaded once into the megengine.hub cache; names ending in "
                        "_<hex>.pkl are sha256-checked); default, 'none' or 'published': "
                        "MegEngine's published weights for --arch")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load --model without the allow-list of what weight files hold: only for "
                        "files you trust (unpickling runs whatever a file names)")
    p.add_argument("-n", "--ngpus", type=int, default=None,
                   help="GPUs to use; default: all visible (CPU: 1 process)")
    p.add_argument("-b", "--batch-size", type=int, default=100, help="images per GPU per step")
    p.add_argument("-j", "--workers", type=int, default=None, help="loader processes")
    p.add_argument("--image-size", type=int, default=None,
                   help="center-crop size (default: an engine checkpoint's training size, "
                        "else 224)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    def run() -> None:
        from engine.evaluate import TestConfig, test

        result = test(TestConfig(**vars(args)))
        print("Test %s on %d images: top1 %.3f top5 %.3f"
              % (args.arch, result["images"], result["top1"], result["top5"]))

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
