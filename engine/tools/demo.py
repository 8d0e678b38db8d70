"""The demo: DemoConfig from the command line -> run_demo, a script of engine calls that runs
every stage on the embedded sample set.

Its last step classifies the first val photo (the first file of the first class folder, whatever
the model makes of it) and says beside the prediction what the photo really shows and whether
the model got it right, with the model's val accuracy for context. `val_grid` saves the first
photos of every val class (in file order, never chosen by outcome) with their predictions and
true classes as one PNG.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from engine.cli import option, parse
from engine.errors import run_tool

DESCRIPTION = ("Run the whole engine on the embedded sample set: make it, pack it, train a "
               "ResNet-18 on CPU, evaluate, classify a photo and show it beside its true class, "
               "with a grid of val predictions. About 3 minutes on 2 cores once installed.")


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
    grid_per_class: int = 2  # val photos of each class in the predictions grid


@dataclass
class Prediction:
    """What the model says about one photo, beside what the photo is."""

    path: str
    true_class: str     # the name of its folder's class
    predicted: str      # the top-1 name
    probability: float  # of the top-1, 0..1
    top: List[str]      # names, most probable first
    probabilities: List[float]

    @property
    def correct(self) -> bool:
        return self.predicted == self.true_class

    @property
    def true_rank(self) -> int:
        """1 when the top-1 is right; where the true class came otherwise."""
        return self.top.index(self.true_class) + 1


@dataclass
class DemoResult:
    top1: float
    top5: float
    chance: float      # top-1 of guessing, percent
    checkpoint: str
    curves: str        # the training curves' PNG
    seconds: float
    photo: Prediction  # the classified photo
    grid: str          # the PNG of val predictions
    grid_right: int    # how many of its photos the model got right
    grid_total: int


def run_demo(c: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Run every stage, printing what it made and where."""
    from engine.config import TrainConfig
    from engine.data.pack import pack_imagenet
    from engine.data.sample import make_sample_imagenet
    from engine.evaluate import TestConfig, test
    from engine.inference import format_prediction
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
    val = os.path.join(raw, "val")
    photos = grid_photos(val, c.grid_per_class)  # the first photo of the first class first
    preds = classify(ckpt, photos)
    photo = preds[0]
    log("== 5/5 classify %s (the first val photo)" % photo.path)
    for rank in range(min(3, len(photo.top))):
        log(format_prediction(rank, photo.top[rank], photo.probabilities[rank]))
    log(verdict(photo, res.top1, res.images))
    grid = val_grid(preds, os.path.join(run, "val_predictions.png"), res.top1,
                    columns=2 * c.grid_per_class)  # two classes a row
    right = sum(p.correct for p in preds)
    log("predictions on the first %d val photo(s) of each class, %d of %d right: %s"
        % (c.grid_per_class, right, len(preds), grid))
    curves = os.path.join(run, "curves.png")
    log("training curves: %s\nmetrics: %s\ndemo finished in %.0f s"
        % (curves, os.path.join(run, "metrics.jsonl"), time.time() - t0))
    return DemoResult(res.top1, res.top5, chance, ckpt, curves, time.time() - t0, photo, grid,
                      right, len(preds))


def verdict(p: Prediction, val_top1: float, val_images: int) -> str:
    """One line: the photo's true class, whether the top-1 is right, and the val accuracy."""
    context = "The model is right on %.1f %% of val (%d photos)." % (val_top1, val_images)
    if p.correct:
        return "right: the top-1 is the photo's true class, %s. %s" % (p.true_class, context)
    return ("wrong: the photo's true class is %s, ranked %d of %d by the model, whose top-1 is "
            "%s. %s" % (p.true_class, p.true_rank, len(p.top), p.predicted, context))


def grid_photos(val: str, per_class: int) -> List[str]:
    """The first `per_class` files of every class folder of `val`, in sorted order: chosen by
    name only, so the grid shows the model as it is."""
    photos = []
    for cls in sorted(d for d in os.listdir(val) if not d.startswith(".")):
        files = sorted(f for f in os.listdir(os.path.join(val, cls)) if not f.startswith("."))
        photos += [os.path.join(val, cls, f) for f in files[:per_class]]
    return photos


def classify(checkpoint: str, photos: Sequence[str], arch: str = "resnet18") -> List[Prediction]:
    """Each photo's prediction by the engine checkpoint (inference's own transform, as its run
    evaluated), beside its true class: the name of its class folder."""
    import megengine as mge
    import numpy as np

    from engine.config import eval_transform
    from engine.inference import class_names, read_image, resize_center_crop
    from engine.models import load_model
    from engine.steps import PredictStep

    loaded = load_model(arch, checkpoint)
    names = class_names(loaded)
    classes = loaded.classes or []
    size, ratio = eval_transform(loaded.config)
    batch = np.concatenate([resize_center_crop(read_image(p), size, ratio) for p in photos])
    probs = PredictStep(loaded.model)(mge.tensor(batch)).numpy()
    out = []
    for path, pr in zip(photos, probs):
        folder = os.path.basename(os.path.dirname(path))
        true = names[classes.index(folder)] if folder in classes else folder
        order = np.argsort(-pr, kind="stable")
        out.append(Prediction(path, true, names[order[0]], float(pr[order[0]]),
                              [names[i] for i in order], [float(pr[i]) for i in order]))
    return out


def val_grid(preds: Sequence[Prediction], png: str, val_top1: Optional[float] = None,
             tile: int = 128, columns: int = 4) -> str:
    """A PNG of the photos with their top-1 (green when right, red when wrong) and true class
    under each, and the share right in its title. Drawn with OpenCV, which the loader needs
    anyway; written atomically."""
    import cv2
    import numpy as np

    from engine.atomic import atomic_write
    from engine.data.transforms import ValTransform

    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.38
    strip, head = 30, 36
    columns = max(1, min(columns, len(preds)))
    rows = math.ceil(len(preds) / columns)
    canvas = np.full((head + rows * (tile + strip), columns * tile, 3), 255, np.uint8)
    right = sum(p.correct for p in preds)
    title = ["%d of %d right%s" % (right, len(preds), "; val top-1 %.1f %%" % val_top1
                                   if val_top1 is not None else ""),
             "the first photos of each class, in file order"]
    for i, line in enumerate(title):
        cv2.putText(canvas, line, (4, 14 + 15 * i), font, scale, (0, 0, 0), 1, cv2.LINE_AA)

    def fit(text: str, keep: str = "") -> str:
        width = int(tile / (19 * scale)) - len(keep)  # glyphs are about 19 px at scale 1
        text = text.replace("_", " ")
        return (text if len(text) <= width else text[:width - 1] + ".") + keep

    for i, p in enumerate(preds):
        y, x = head + (i // columns) * (tile + strip), (i % columns) * tile
        img = cv2.imread(p.path, cv2.IMREAD_COLOR)
        if img is not None:
            canvas[y:y + tile, x:x + tile] = ValTransform(crop_ratio=1.0).crop(img, tile)
        colour = (0, 140, 0) if p.correct else (0, 0, 200)  # BGR
        cv2.putText(canvas, fit(p.predicted, " %.0f%%" % (100 * p.probability)),
                    (x + 3, y + tile + 12), font, scale, colour, 1, cv2.LINE_AA)
        cv2.putText(canvas, fit("true: " + p.true_class), (x + 3, y + tile + 25), font, scale,
                    (60, 60, 60), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", canvas)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    atomic_write(png, lambda f: f.write(buf.tobytes()))
    return png


def main(argv: Optional[Sequence[str]] = None) -> int:
    config = parse(DemoConfig, argv, DESCRIPTION)

    def run() -> None:
        run_demo(config)

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
