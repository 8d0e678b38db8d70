"""Copy packed shards to a node-local folder, verifying checksums: StageConfig from the command
line -> engine.data.stage.stage."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from engine.cli import parse
from engine.data.stage import StageConfig, stage
from engine.errors import run_tool

DESCRIPTION = ("Copy packed shards (a split, or a pack's root with its splits) to a node-local "
               "folder, verifying checksums. Rerun to resume; several ranks of one node may run "
               "it at once.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    c = parse(StageConfig, argv, DESCRIPTION)

    def run() -> None:
        stage(c.src, c.dst, stall_timeout=c.stall_timeout)

    return run_tool(run, interrupted="interrupted; rerun to resume")


if __name__ == "__main__":
    sys.exit(main())
