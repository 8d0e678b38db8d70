#!/usr/bin/env python
"""Train an ImageNet classifier (MegEngine): argparse -> TrainConfig -> engine.trainer.train."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import UserError  # noqa: E402  (light: MegEngine is imported only to train)

DESCRIPTION = ("Train a ResNet/ResNeXt on ImageNet with MegEngine: traced steps, optional AMP, one "
               "process per GPU. Writes config.json, checkpoint.pkl, metrics.jsonl and "
               "curves.png to the save dir.")


def build_parser():
    from engine.config import build_parser as build

    return build(DESCRIPTION)


def main(argv=None) -> int:
    from engine.config import config_from_argv

    try:
        config = config_from_argv(argv, DESCRIPTION)
        from engine.trainer import train

        summary = train(config)
    except UserError as exc:
        print("error: %s" % " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # One line, no traceback; the last checkpoint (epoch end or --save-every) is intact.
        print("interrupted; continue later with --resume %s"
              % (config.save_dir or os.path.join("output", config.arch)), file=sys.stderr)
        return 130
    if summary is not None:  # None on nodes other than node 0
        top = ("  top1 %.3f  top5 %.3f" % (summary["top1"], summary["top5"])
               if summary.get("top1") is not None else "")
        print("done: %d steps, loss %s%s, checkpoint %s"
              % (summary["steps"], "%.4f" % summary["loss"] if summary["loss"] is not None
                 else "-", top, summary["checkpoint"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
