#!/usr/bin/env python3
"""Copy packed shards (a split, or a pack's root with its splits) to a node-local folder,
verifying checksums. Rerun to resume; several ranks of one node may run it at once."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.stage import stage  # noqa: E402
from engine.errors import run_tool  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("src", metavar="SRC", help="packed split (OUT/train) or pack root (OUT)")
    p.add_argument("dst", metavar="DST", help="local folder (for a root: DST/<split>)")
    p.add_argument("--stall-timeout", type=float, default=600.0, metavar="S",
                   help="a waiting rank gives up if the copying one makes no progress for S "
                        "seconds (default 600)")
    a = p.parse_args(argv)
    def run() -> None:
        stage(a.src, a.dst, stall_timeout=a.stall_timeout)

    return run_tool(run, interrupted="interrupted; rerun to resume")


if __name__ == "__main__":
    sys.exit(main())
