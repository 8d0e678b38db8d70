#!/usr/bin/env python
"""Make a small ImageNet-layout folder of real photos (for demos, tests and benchmarks)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.sample import MARKER, make_sample_imagenet, max_classes  # noqa: E402
from engine.errors import run_tool  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Write OUT/train/<wnid>/<wnid>_<k>.JPEG and OUT/val/<wnid>/<wnid>_val_<k>.JPEG: each "
            "class is a different real photo shipped with scikit-image, each sample a random "
            "crop/flip/colour change of it (long side 400-500 px, JPEG quality 75-95). The same "
            "seed gives byte-identical files."
        ),
        epilog=(
            f"OUT must be missing, empty, or a sample set made earlier by this tool (it has "
            f"OUT/{MARKER}): a previous set's train/ and val/ are replaced. Any other non-empty "
            f"folder is refused, so nothing of yours is overwritten."
        ),
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--classes", type=int, default=10,
                        help=f"number of classes, 1..{max_classes()} (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=100,
                        help="train images per class (default: %(default)s)")
    parser.add_argument("--val-per-class", type=int, default=20,
                        help="val images per class, 0 for no val/ (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--imagenet-like", action="store_true",
                        help="files with ImageNet's statistics (~100-110 KB mean, long side "
                             "450-500 px: high quality plus sensor-like grain) instead of the "
                             "smooth ~35 KB default; use it for loader and packer figures")
    args = parser.parse_args(argv)
    made: list = []
    status = run_tool(lambda: made.append(make_sample_imagenet(
        args.out, classes=args.classes, train_per_class=args.train_per_class,
        val_per_class=args.val_per_class, seed=args.seed, imagenet_like=args.imagenet_like)))
    if status:
        return status
    s = made[0]
    counts = ", ".join(f"{n} {split}" for split, n in s["counts"].items())
    print(f"made {len(s['classes'])} classes ({counts} images), "
          f"{s['bytes'] / 2**20:.1f} MiB of JPEG in {s['seconds']:.1f} s -> {s['out']}")
    for i, wnid in enumerate(s["classes"]):
        print(f"  label {i:3d}  {wnid}  {s['sources'][wnid]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
