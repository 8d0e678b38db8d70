"""Train an ImageNet classifier (MegEngine): TrainConfig from the command line (a recipe and
flags over its defaults) -> engine.trainer.train, and the exit status of engine.stop's table."""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from engine.config import TrainConfig, config_from_argv
from engine.errors import run_tool  # light: MegEngine is imported only to train

DESCRIPTION = ("Train a ResNet/ResNeXt on ImageNet with MegEngine: traced steps, optional AMP, one "
               "process per GPU. Writes config.json, checkpoints, metrics.jsonl and curves.png "
               "to the save dir; the same command continues the run there. SIGTERM/SIGUSR1 save "
               "and exit 75, Ctrl-C saves and exits 130.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    configs: List[TrainConfig] = []
    status = run_tool(lambda: configs.append(config_from_argv(argv, DESCRIPTION)))
    if status:
        return status
    config = configs[0]

    def run() -> int:
        from engine import stop
        from engine.trainer import train

        try:
            result = train(config)
        except stop.StopNow as exc:  # a second signal: out at once, the last checkpoint intact
            print("stopped at once by a second %s: nothing more was saved; %s"
                  % (stop.name(exc.signum), _where_it_continues(config)), file=sys.stderr)
            return exc.status
        except KeyboardInterrupt:  # Ctrl-C before the run started
            print("interrupted before training began; %s" % _where_it_continues(config),
                  file=sys.stderr)
            return stop.EXIT_INTERRUPTED
        if result is None:  # nodes other than node 0
            if stop.agreed():
                print("stopped with the run after %s: node 0 saved the checkpoint (its status is "
                      "the run's)" % stop.name(stop.agreed()), file=sys.stderr)
            return 0
        if result.stopped:
            how = ("interrupted (Ctrl-C)" if result.stopped == "SIGINT"
                   else "stopped by %s" % result.stopped)
            saved = ("saved %s" % result.checkpoint if result.checkpoint else
                     "no step was done since %s" % result.resumed_from if result.resumed_from
                     else "nothing was saved")
            print("%s after step %d: %s; rerun the same command to continue (exit status %d)"
                  % (how, result.steps, saved, result.exit_status), file=sys.stderr)
            return result.exit_status
        top = ""
        if result.top1 is not None and result.top5 is not None:
            top = "  top1 %.3f  top5 %.3f" % (result.top1, result.top5)
        print("done: %d steps, loss %s%s, checkpoint %s"
              % (result.steps, "%.4f" % result.loss if result.loss is not None else "-",
                 top, result.checkpoint))
        return 0

    return run_tool(run)


def _where_it_continues(config: TrainConfig) -> str:
    """What a rerun of the same command continues from, as the save dir holds it now."""
    from engine.checkpoint import file_in

    found = file_in(config.out_dir)
    if found:
        return "the last checkpoint, %s, is intact: rerun the same command to continue" % found
    return "no checkpoint was saved yet: rerunning the same command starts the run again"


if __name__ == "__main__":
    sys.exit(main())
