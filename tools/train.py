#!/usr/bin/env python
"""Train an ImageNet classifier (MegEngine): argparse -> TrainConfig -> engine.trainer.train."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import run_tool  # noqa: E402  (light: MegEngine is imported only to train)

DESCRIPTION = ("Train a ResNet/ResNeXt on ImageNet with MegEngine: traced steps, optional AMP, one "
               "process per GPU. Writes config.json, checkpoint.pkl, metrics.jsonl and "
               "curves.png to the save dir.")


def build_parser():
    from engine.config import build_parser as build

    return build(DESCRIPTION)


def main(argv=None) -> int:
    from engine.config import config_from_argv

    configs: list = []
    status = run_tool(lambda: configs.append(config_from_argv(argv, DESCRIPTION)))
    if status:
        return status
    config = configs[0]

    def run() -> None:
        from engine.trainer import train

        summary = train(config)
        if summary is not None:  # None on nodes other than node 0
            top = ("  top1 %.3f  top5 %.3f" % (summary["top1"], summary["top5"])
                   if summary.get("top1") is not None else "")
            print("done: %d steps, loss %s%s, checkpoint %s"
                  % (summary["steps"], "%.4f" % summary["loss"] if summary["loss"] is not None
                     else "-", top, summary["checkpoint"]))

    # Ctrl-C: one line, no traceback; the last checkpoint (epoch end or --save-every) is intact.
    return run_tool(run, interrupted="interrupted; continue later with --resume %s"
                    % (config.save_dir or os.path.join("output", config.arch)))


if __name__ == "__main__":
    sys.exit(main())
