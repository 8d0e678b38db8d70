"""The demo: DemoConfig from the command line -> run_demo, a script of engine calls that runs
every stage on the embedded sample set."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from engine.cli import option, parse
from engine.errors import run_tool

DESCRIPTION = ("Run the whole engine on the embedded sample set: make it, pack it, train a "
               "ResNet-18 on CPU, evaluate, classify a photo. About 10 minutes on 2 cores.")


@dataclass
class DemoConfig:
    out: str = option("demo", "folder for the data, shards and the run")
    epochs: int = option(3, "training epochs")
    image_size: int = option(32, "train and val crop size")
    workers: int = option(1, "loader processes")
    # not flags: the sample set and the run the demo is sized for
    classes: int = 10
    train_per_class: int = 60
    val_per_class: int = 20
    batch_size: int = 32
    learning_rate: float = 0.05


@dataclass
class DemoResult:
    top1: float
    top5: float
    chance: float      # top-1 of guessing, percent
    checkpoint: str
    curves: str        # the training curves' PNG
    seconds: float


def run_demo(c: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Run every stage, printing what it made and where."""
    from engine.config import TrainConfig
    from engine.data.pack import pack_imagenet
    from engine.data.sample import make_sample_imagenet
    from engine.evaluate import TestConfig, test
    from engine.inference import format_prediction, predict
    from engine.trainer import train

    t0 = time.time()
    raw, packed, run = (os.path.join(c.out, d) for d in ("sample", "packed", "run"))
    log("== 1/5 sample ImageNet (real photographs from scikit-image) -> %s" % raw)
    make_sample_imagenet(raw, classes=c.classes, train_per_class=c.train_per_class,
                         val_per_class=c.val_per_class, seed=0)
    log("== 2/5 pack into LMDB shards -> %s" % packed)
    pack_imagenet(raw, packed, workers=c.workers + 1, shard_size=500, log=log)
    log("== 3/5 train resnet18 at %d px for %d epochs on CPU -> %s" % (c.image_size, c.epochs, run))
    trained = train(TrainConfig(
        data=packed, arch="resnet18", batch_size=c.batch_size, save_dir=run,
        learning_rate=c.learning_rate, epochs=c.epochs, workers=c.workers,
        image_size=c.image_size, warmup_epochs=0.5, lr_schedule="cosine", seed=0, print_freq=5,
        replace=True))  # each demo trains anew; an earlier demo's run moves to replaced-<time>/
    assert trained is not None and trained.checkpoint  # one process: rank 0, which saves
    ckpt = trained.checkpoint
    log("== 4/5 evaluate %s on %s" % (ckpt, os.path.join(packed, "val")))
    res = test(TestConfig(data=packed, arch="resnet18", model=ckpt, workers=c.workers,
                          batch_size=50, progress=False))
    chance = 100.0 / c.classes
    log("val top1 %.1f %% (chance %.1f %%, %.1fx), top5 %.1f %%"
        % (res.top1, chance, res.top1 / chance, res.top5))
    photo = _first_val_image(os.path.join(raw, "val"))
    log("== 5/5 classify %s" % photo)
    for rank, (_i, name, prob) in enumerate(predict("resnet18", ckpt, photo, topk=3)):
        log(format_prediction(rank, name, prob))
    curves = os.path.join(run, "curves.png")
    log("training curves: %s\nmetrics: %s\ndemo finished in %.0f s"
        % (curves, os.path.join(run, "metrics.jsonl"), time.time() - t0))
    return DemoResult(res.top1, res.top5, chance, ckpt, curves, time.time() - t0)


def _first_val_image(val: str) -> str:
    cls = sorted(d for d in os.listdir(val) if not d.startswith("."))[0]
    return os.path.join(val, cls, sorted(os.listdir(os.path.join(val, cls)))[0])


def main(argv: Optional[Sequence[str]] = None) -> int:
    config = parse(DemoConfig, argv, DESCRIPTION)

    def run() -> None:
        run_demo(config)

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
