#!/usr/bin/env python3
"""Pack an ImageNet folder (ROOT/train/<wnid>/*.JPEG, ROOT/val/<wnid>/*.JPEG) into LMDB shards."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.pack import pack_imagenet, pack_workers  # noqa: E402
from engine.data.plan import merge_pack  # noqa: E402
from engine.errors import run_tool  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Rerunning with the same arguments resumes an interrupted pack; a finished split "
               "is left alone. Output: OUT/<split>/shard-NNNNN.lmdb + plan.json (written first) "
               "+ meta.json (written last). Several nodes: run the same command on each with "
               "--num-nodes N --node-rank r (or under Slurm/torchrun, which set them); the last "
               "node to finish writes meta.json, or run --merge.")
    p.add_argument("--data", metavar="ROOT", help="ImageNet root folder (not needed with --merge)")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--splits", default=None, help="comma-separated (default: train,val; with "
                   "--merge: every split that has a plan.json)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: every usable core, %d here)" % pack_workers())
    p.add_argument("--shard-size", type=int, default=5000, help="files per shard (default 5000)")
    p.add_argument("--max-side", type=int, default=None,
                   help="re-encode images whose long side exceeds this (default: keep all)")
    p.add_argument("--seed", type=int, default=0, help="train record order (default 0)")
    p.add_argument("--strict", action="store_true",
                   help="exit non-zero if any file had to be skipped")
    p.add_argument("--num-nodes", type=int, default=None,
                   help="machines packing into one shared --out (default: from SLURM_* / "
                        "NNODES / GROUP_RANK, else 1)")
    p.add_argument("--node-rank", type=int, default=None, help="this machine's rank, 0..N-1")
    p.add_argument("--merge", action="store_true",
                   help="only write meta.json from the shards all nodes packed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    splits = [s for s in a.splits.split(",") if s] if a.splits is not None else None
    if not a.merge and a.data is None:
        p.error("--data is required (except with --merge)")

    def run() -> None:
        if a.merge:
            merge_pack(a.out, splits)
        else:
            pack_imagenet(a.data, a.out, splits=splits or ["train", "val"], workers=a.workers,
                          shard_size=a.shard_size, max_side=a.max_side, seed=a.seed,
                          strict=a.strict, progress=not a.quiet, num_nodes=a.num_nodes,
                          node_rank=a.node_rank)

    return run_tool(run, interrupted="interrupted; rerun to resume")


if __name__ == "__main__":
    sys.exit(main())
