#!/usr/bin/env python3
"""Run the whole engine on the embedded sample set: make it, pack it, train a ResNet-18 on CPU,
evaluate, classify a photo. About 10 minutes on 2 cores."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="demo", help="folder for the data, shards and the run")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="loader processes")
    a = p.parse_args(argv)
    from engine.demo import run_demo
    from engine.errors import UserError

    try:
        run_demo(a.out, epochs=a.epochs, image_size=a.image_size, workers=a.workers)
    except UserError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
