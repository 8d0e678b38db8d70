#!/usr/bin/env python3
"""Run the whole engine on the embedded sample set: make it, pack it, train a ResNet-18 on CPU,
evaluate, classify a photo. About 10 minutes on 2 cores. A script of engine calls, kept out
of the installed library."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import time  # noqa: E402
from typing import Any, Callable, Dict  # noqa: E402


def run_demo(out: str = "demo", classes: int = 10, train_per_class: int = 60,
             val_per_class: int = 20, image_size: int = 32, epochs: int = 3,
             batch_size: int = 32, learning_rate: float = 0.05, workers: int = 1,
             log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every stage, printing what it made and where; returns the figures."""
    from engine.config import TrainConfig
    from engine.data.pack import pack_imagenet
    from engine.data.sample import make_sample_imagenet
    from engine.evaluate import TestConfig, test
    from engine.inference import format_prediction, predict
    from engine.trainer import train

    t0 = time.time()
    raw, packed, run = (os.path.join(out, d) for d in ("sample", "packed", "run"))
    log("== 1/5 sample ImageNet (real photographs from scikit-image) -> %s" % raw)
    make_sample_imagenet(raw, classes=classes, train_per_class=train_per_class,
                         val_per_class=val_per_class, seed=0)
    log("== 2/5 pack into LMDB shards -> %s" % packed)
    pack_imagenet(raw, packed, workers=workers + 1, shard_size=500, log=log)
    log("== 3/5 train resnet18 at %d px for %d epochs on CPU -> %s" % (image_size, epochs, run))
    summary = train(TrainConfig(
        data=packed, arch="resnet18", batch_size=batch_size, save_dir=run,
        learning_rate=learning_rate, epochs=epochs, workers=workers, image_size=image_size,
        warmup_epochs=0.5, lr_schedule="cosine", seed=0, print_freq=5))
    ckpt = summary["checkpoint"]
    log("== 4/5 evaluate %s on %s" % (ckpt, os.path.join(packed, "val")))
    res = test(TestConfig(data=packed, arch="resnet18", model=ckpt, workers=workers,
                          batch_size=50, progress=False))
    chance = 100.0 / classes
    log("val top1 %.1f %% (chance %.1f %%, %.1fx), top5 %.1f %%"
        % (res["top1"], chance, res["top1"] / chance, res["top5"]))
    photo = _first_val_image(os.path.join(raw, "val"))
    log("== 5/5 classify %s" % photo)
    for rank, (_i, name, prob) in enumerate(predict("resnet18", ckpt, photo, topk=3)):
        log(format_prediction(rank, name, prob))
    curves = os.path.join(run, "curves.png")
    log("training curves: %s\nmetrics: %s\ndemo finished in %.0f s"
        % (curves, os.path.join(run, "metrics.jsonl"), time.time() - t0))
    return {"top1": res["top1"], "top5": res["top5"], "chance": chance, "checkpoint": ckpt,
            "curves": curves, "seconds": time.time() - t0}


def _first_val_image(val: str) -> str:
    cls = sorted(d for d in os.listdir(val) if not d.startswith("."))[0]
    return os.path.join(val, cls, sorted(os.listdir(os.path.join(val, cls)))[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="demo", help="folder for the data, shards and the run")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="loader processes")
    a = p.parse_args(argv)
    from engine.errors import run_tool

    def run() -> None:
        run_demo(a.out, epochs=a.epochs, image_size=a.image_size, workers=a.workers)

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
