"""Make a small ImageNet-layout folder of real photos (for demos, tests and benchmarks):
SampleConfig from the command line -> engine.data.sample.make_sample_imagenet."""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence

from engine.cli import parse
from engine.data.sample import MARKER, SampleConfig, make_sample_imagenet
from engine.errors import UserError, run_tool

DESCRIPTION = ("Write OUT/train/<wnid>/<wnid>_<k>.JPEG and OUT/val/<wnid>/<wnid>_val_<k>.JPEG: each "
               "class is a different real photo shipped with scikit-image, each sample a random "
               "crop/flip/colour change of it (long side 400-500 px, JPEG quality 75-95). The same "
               "seed gives byte-identical files.")
EPILOG = ("OUT must be missing, empty, or a sample set made earlier by this tool (it has OUT/%s): a "
          "previous set's train/ and val/ are replaced. Any other non-empty folder is refused, so "
          "nothing of yours is overwritten." % MARKER)


def main(argv: Optional[Sequence[str]] = None) -> int:
    c = parse(SampleConfig, argv, DESCRIPTION, EPILOG)

    def run() -> None:
        try:
            s = make_sample_imagenet(**dataclasses.asdict(c))
        except (ValueError, FileExistsError, NotADirectoryError) as exc:  # bad arguments or OUT
            raise UserError(str(exc)) from None
        counts = ", ".join("%d %s" % (n, split) for split, n in s["counts"].items())
        print("made %d classes (%s images), %.1f MiB of JPEG in %.1f s -> %s"
              % (len(s["classes"]), counts, s["bytes"] / 2**20, s["seconds"], s["out"]))
        for i, wnid in enumerate(s["classes"]):
            print("  label %3d  %s  %s" % (i, wnid, s["sources"][wnid]))

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
