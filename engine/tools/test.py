"""Top-1 / top-5 of a model on a val set: TestConfig from the command line ->
engine.evaluate.test."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from engine.cli import parse
from engine.errors import run_tool
from engine.evaluate import TestConfig, test

DESCRIPTION = ("Evaluate a classifier on ImageNet val (resize the shorter side to image-size / "
               "ratio, center crop), an engine checkpoint as its run evaluated. Files that do not "
               "decode are skipped and counted. The last line reads 'top1 <x> top5 <y>' "
               "(percent).")


def main(argv: Optional[Sequence[str]] = None) -> int:
    config = parse(TestConfig, argv, DESCRIPTION)

    def run() -> None:
        result = test(config)
        skipped = (" (%d undecodable file%s skipped)"
                   % (result.skipped, "" if result.skipped == 1 else "s")) if result.skipped else ""
        print("Test %s%s at %d px (crop ratio %g) on %d images%s: top1 %.3f top5 %.3f"
              % (result.arch, " EMA" if result.ema else "", result.image_size, result.crop_ratio,
                 result.images, skipped, result.top1, result.top5))

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
