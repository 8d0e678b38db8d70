"""Train an ImageNet classifier (MegEngine): TrainConfig from the command line (a recipe and
flags over its defaults) -> engine.trainer.train."""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from engine.config import TrainConfig, config_from_argv
from engine.errors import run_tool  # light: MegEngine is imported only to train

DESCRIPTION = ("Train a ResNet/ResNeXt on ImageNet with MegEngine: traced steps, optional AMP, one "
               "process per GPU. Writes config.json, checkpoint.pkl, metrics.jsonl and "
               "curves.png to the save dir.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    configs: List[TrainConfig] = []
    status = run_tool(lambda: configs.append(config_from_argv(argv, DESCRIPTION)))
    if status:
        return status
    config = configs[0]

    def run() -> None:
        from engine.trainer import train

        result = train(config)
        if result is not None:  # None on nodes other than node 0
            top = ""
            if result.top1 is not None and result.top5 is not None:
                top = "  top1 %.3f  top5 %.3f" % (result.top1, result.top5)
            print("done: %d steps, loss %s%s, checkpoint %s"
                  % (result.steps, "%.4f" % result.loss if result.loss is not None else "-",
                     top, result.checkpoint))

    # Ctrl-C: one line, no traceback; the last checkpoint (epoch end or --save-every) is intact.
    return run_tool(run, interrupted="interrupted; continue later with --resume %s"
                    % config.out_dir)


if __name__ == "__main__":
    sys.exit(main())
