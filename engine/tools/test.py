"""Top-1 / top-5 of a model on a val set: TestConfig from the command line ->
engine.evaluate.test."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from engine.cli import parse
from engine.errors import run_tool
from engine.evaluate import TestConfig, test

DESCRIPTION = ("Evaluate a classifier on ImageNet val (resize to image-size/0.875, center crop). "
               "The last line reads 'top1 <x> top5 <y>' (percent).")


def main(argv: Optional[Sequence[str]] = None) -> int:
    config = parse(TestConfig, argv, DESCRIPTION)

    def run() -> None:
        result = test(config)
        print("Test %s on %d images: top1 %.3f top5 %.3f"
              % (config.arch, result.images, result.top1, result.top5))

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
