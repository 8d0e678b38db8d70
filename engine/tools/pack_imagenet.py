"""Pack an ImageNet folder (ROOT/train/<wnid>/*.JPEG, ROOT/val/<wnid>/*.JPEG) into LMDB shards:
PackConfig from the command line -> engine.data.pack.pack_imagenet (or engine.data.merge.merge_pack)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from engine.cli import parse
from engine.data.merge import merge_pack
from engine.data.pack import PackConfig, pack_imagenet
from engine.errors import UserError, run_tool

DESCRIPTION = ("Pack an ImageNet folder (ROOT/train/<wnid>/*.JPEG, ROOT/val/<wnid>/*.JPEG) into "
               "LMDB shards.")
EPILOG = ("Rerunning with the same arguments resumes an interrupted pack; a finished split is left "
          "alone once each shard file is found at its recorded size (if one is not, the rerun "
          "says which and stops: add --repair to repack only the shards that fail "
          "verification). Output: OUT/<split>/shard-NNNNN.lmdb + plan.json (written first) + meta.json "
          "(written last). Several nodes: run the same command on each with --num-nodes N "
          "--node-rank r (or under Slurm/torchrun, which set them); the last node to finish "
          "writes meta.json, or run --merge.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    c = parse(PackConfig, argv, DESCRIPTION, EPILOG)

    def run() -> None:
        splits = c.split_list()
        if c.merge:
            if c.repair:
                raise UserError("--repair packs shards again, so it needs --data, not --merge")
            merge_pack(c.out, splits)
            return
        if c.data is None:
            raise UserError("--data is required (except with --merge)")
        pack_imagenet(c.data, c.out, splits=splits or ["train", "val"], workers=c.workers,
                      shard_size=c.shard_size, max_side=c.max_side, seed=c.seed, strict=c.strict,
                      progress=not c.quiet, num_nodes=c.num_nodes, node_rank=c.node_rank,
                      repair=c.repair, raw_fraction=c.raw_fraction,
                      jpeg_quality=c.jpeg_quality, restart_markers=c.restart_markers)

    return run_tool(run, interrupted="interrupted; rerun to resume")


if __name__ == "__main__":
    sys.exit(main())
