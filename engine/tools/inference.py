"""Classify one image: InferenceConfig from the command line -> engine.inference.predict -> the
official output lines."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from engine.cli import parse
from engine.errors import run_tool
from engine.inference import InferenceConfig, format_prediction, predict

DESCRIPTION = ("Print the top-k classes of one image, as the official MegEngine inference.py does: "
               "'<k>: class = <name> with probability = <p> %'.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    c = parse(InferenceConfig, argv, DESCRIPTION)

    def run() -> None:
        top = predict(c.arch, c.model, c.image, topk=c.topk, image_size=c.image_size,
                      trusted=c.trust_pickle or None, ema=c.ema)
        for rank, (_index, name, prob) in enumerate(top):
            print(format_prediction(rank, name, prob))

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
