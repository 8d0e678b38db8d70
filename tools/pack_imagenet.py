#!/usr/bin/env python3
"""Pack an ImageNet folder (ROOT/train/<wnid>/*.JPEG, ROOT/val/<wnid>/*.JPEG) into LMDB shards."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.pack import PackError, default_workers, pack_imagenet  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Rerunning with the same arguments resumes an interrupted pack; a finished split "
               "is left alone. Output: OUT/<split>/shard-NNNNN.lmdb + meta.json (written last).")
    p.add_argument("--data", required=True, metavar="ROOT", help="ImageNet root folder")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--splits", default="train,val", help="comma-separated (default: train,val)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: all cores, %d here)" % default_workers())
    p.add_argument("--shard-size", type=int, default=5000, help="files per shard (default 5000)")
    p.add_argument("--max-side", type=int, default=None,
                   help="re-encode images whose long side exceeds this (default: keep all)")
    p.add_argument("--seed", type=int, default=0, help="train record order (default 0)")
    p.add_argument("--strict", action="store_true",
                   help="exit non-zero if any file had to be skipped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        pack_imagenet(a.data, a.out, splits=[s for s in a.splits.split(",") if s],
                      workers=a.workers, shard_size=a.shard_size, max_side=a.max_side,
                      seed=a.seed, strict=a.strict, progress=not a.quiet)
    except PackError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
