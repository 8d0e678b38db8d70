#!/usr/bin/env python
"""Classify one image: argparse -> engine.inference.predict -> the official output lines."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import run_tool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Print the top-k classes of one image, as the official MegEngine "
                    "inference.py does: '<k>: class = <name> with probability = <p> %'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-a", "--arch", default="resnet18", help="model name (engine.models.ARCHS)")
    p.add_argument("-m", "--model", default=None, metavar="PKL",
                   help="weights: path or URL to an official .pkl or an engine checkpoint (a "
                        "URL is downloaded once into the megengine.hub cache; names ending in "
                        "_<hex>.pkl are sha256-checked); default, 'none' or 'published': "
                        "MegEngine's published weights for --arch")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load --model without the allow-list of what weight files hold: only for "
                        "files you trust (unpickling runs whatever a file names)")
    p.add_argument("-i", "--image", required=True, help="image file (anything OpenCV reads)")
    p.add_argument("--topk", type=int, default=5, help="how many classes to print")
    p.add_argument("--image-size", type=int, default=None,
                   help="center-crop size (default: an engine checkpoint's training size, "
                        "else 224)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    def run() -> None:
        from engine.inference import format_prediction, predict

        top = predict(args.arch, args.model, args.image, topk=args.topk,
                      image_size=args.image_size, trusted=args.trust_pickle or None)
        for rank, (_index, name, prob) in enumerate(top):
            print(format_prediction(rank, name, prob))

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
