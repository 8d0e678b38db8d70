"""Evaluation: the eval loop (the trainer's per-epoch eval and tools/test.py share it), how a
data set's labels index a model's outputs, and what tools/test.py runs.

The model comes from engine.models.load_model, as single-image inference's (engine/inference.py)
does: the same weight sources, the same checks. tools/test.py evaluates an engine checkpoint the
way its run did: with the run's architecture, crop size and resize ratio (engine.config's
eval_transform), each overridable, and its live or, with --ema, its averaged weights. An image
that does not decode is skipped and counted, never replaced by another (that would score one
image twice); the counts are summed over the ranks like the scores.

MegEngine is imported inside the functions that run a model, so that building the tool's parser
(TestConfig) does not import it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import MISSING, dataclass
from typing import Any, Dict, Optional, Sequence

import numpy as np

from engine import cli, dist
from engine.cli import DEFAULT_ARCH, option
from engine.config import eval_transform
from engine.errors import UserError


def label_map_for(model_classes: Optional[Sequence[str]], model_num_classes: int,
                  data_classes: Sequence[str]) -> Optional[np.ndarray]:
    """How the data's labels index the model's outputs; None when they are the same.

    A data set with a subset of the model's classes (e.g. a 10-class sample of ImageNet scored
    by a 1000-class model) is remapped by WNID; anything else that does not line up is an error.
    """
    data_classes = list(data_classes)
    if model_classes is None:
        if len(data_classes) != model_num_classes:
            raise UserError(
                "class count mismatch: the model has %d outputs but the data has %d classes"
                % (model_num_classes, len(data_classes))
            )
        return None
    model_classes = list(model_classes)
    if model_classes == data_classes:
        return None
    index = {w: i for i, w in enumerate(model_classes)}
    missing = [w for w in data_classes if w not in index]
    if missing:
        raise UserError(
            "class mismatch: the model was trained on %d classes, the data has %d; %d data "
            "classes are unknown to the model (e.g. %s)"
            % (len(model_classes), len(data_classes), len(missing), ", ".join(missing[:3]))
        )
    return np.asarray([index[w] for w in data_classes], dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Evaluation loop (shared by the trainer's per-epoch eval and tools/test.py)
# --------------------------------------------------------------------------------------------


def run_eval(eval_step, loader, label_map: Optional[np.ndarray] = None,
             progress: bool = False) -> Dict[str, float]:
    """Top-1 / top-5 (percent) and mean loss over this rank's shard, summed over all ranks,
    and how many images were scored and how many skipped as undecodable (a loader made with
    skip_undecodable=True; its batches may then be short, or empty).

    Val shares are exact (the Sampler does not pad them), so ranks may run different numbers
    of batches, or none: every rank still makes exactly one all-reduce, at the end, and the
    totals count each image once.
    """
    import megengine as mge

    stats = []
    n = 0
    skipped_before = getattr(loader, "num_skipped", 0)
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, total=len(loader), desc="eval", unit="batch", leave=False)
    for images, labels in it:
        if len(labels) == 0:  # every image of the batch was skipped
            continue
        if label_map is not None:
            labels = label_map[labels]
        stats.append(eval_step(mge.tensor(images), mge.tensor(labels.astype(np.int32))))
        n += len(labels)
    skipped = getattr(loader, "num_skipped", 0) - skipped_before
    # One host sync at the end: the device works through the batches asynchronously.
    local = np.sum([s.numpy() for s in stats], axis=0) if stats else np.zeros(3)
    loss_sum, c1, c5, total, skipped = dist.all_reduce_sum([*local, n, skipped])
    if total == 0:
        raise UserError("no image of the validation set could be decoded (%d undecodable files "
                        "skipped)" % skipped if skipped else "the validation set is empty")
    return {
        "top1": 100.0 * c1 / total,
        "top5": 100.0 * c5 / total,
        "loss": loss_sum / total,
        "images": int(total),
        "skipped": int(round(skipped)),
    }


def val_folder(data: str) -> str:
    """tools/test.py --data: ROOT (then ROOT/val) or the val split folder itself."""
    if not os.path.isdir(data):
        raise UserError("--data: no such folder: %s" % data)
    sub = os.path.join(data, "val")
    return sub if os.path.isdir(sub) else data


@dataclass
class TestConfig:
    """tools/test.py's options (engine.cli derives its parser from these fields)."""

    data: str = option(MISSING, "ROOT (its val/ is used) or a val split folder: packed or raw",
                       "-d", "--data", metavar="DIR")
    arch: Optional[str] = cli.model_arch_option()
    model: Optional[str] = cli.model_option()
    ema: bool = option(False, "evaluate an engine checkpoint's moving average of the weights (a "
                              "run with --ema-decay) instead of its live weights")
    trust_pickle: bool = cli.trust_pickle_option()
    ngpus: Optional[int] = option(None, "GPUs to use; default: all visible (CPU: 1 process)",
                                  "-n", "--ngpus")
    batch_size: int = cli.batch_size_option(100)  # as the official test.py
    workers: Optional[int] = option(None, "loader processes", "-j", "--workers")
    image_size: Optional[int] = cli.eval_size_option()
    val_resize_ratio: Optional[float] = option(
        None, "resize the shorter side to image-size / ratio, then center-crop (default: an "
              "engine checkpoint's run's, else 0.875)")
    progress: bool = option(True, "progress bar")
    trace: bool = True  # not a flag: compile the eval step (callers may run it eagerly)


@dataclass
class TestResult:
    """Top-1 / top-5 (percent) and mean loss over `images` validation images (`skipped` more
    did not decode), and how they were evaluated."""

    top1: float
    top5: float
    loss: float
    images: int
    skipped: int = 0
    arch: str = DEFAULT_ARCH
    image_size: int = 224       # the center crop
    crop_ratio: float = 0.875   # its share of the resized shorter side
    ema: bool = False           # the checkpoint's moving average, not its live weights


def test(config: TestConfig) -> TestResult:
    """Evaluate a model on a val set; returns rank 0's result (the sums are over all ranks)."""
    source = val_folder(config.data)
    if config.model is not None and config.model.lower() != "none" and not (
            os.path.exists(config.model) or "://" in config.model):
        raise UserError("--model: no such file: %s" % config.model)
    if config.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if config.val_resize_ratio is not None and not 0 < config.val_resize_ratio <= 1:
        raise UserError("--val-resize-ratio must be in (0, 1]")
    from engine.models import prefetch_weights

    ngpus = dist.processes_per_node(config.ngpus)
    if ngpus > 1:
        # Download (and verify) once here, then every rank reads the same local file: ranks
        # fetching on their own would race on the cache file.
        wanted = config.model if config.model and config.model.lower() != "none" else "published"
        local = prefetch_weights(wanted, config.arch or DEFAULT_ARCH)
        if wanted != "published":
            config = dataclasses.replace(config, model=local)
    return TestResult(**dist.launch(_test_worker, config, source, ngpus=ngpus))


def _test_worker(config: TestConfig, source: str) -> Dict[str, Any]:
    from engine.data import Loader
    from engine.models import load_model
    from engine.steps import EvalStep

    loaded = load_model(config.arch, config.model, trusted=config.trust_pickle or None,
                        ema=config.ema)
    run_size, run_ratio = eval_transform(loaded.config)
    size = config.image_size or run_size
    ratio = config.val_resize_ratio or run_ratio
    try:
        loader = Loader(
            source, batch_size=config.batch_size, train=False, image_size=size,
            crop_ratio=ratio, skip_undecodable=True, workers=config.workers,
            rank=dist.get_rank(), world_size=dist.get_world_size(),
            local_world_size=dist.get_world_size(),  # test runs on one node
        )
    except (ValueError, OSError) as exc:  # no meta.json, empty folders, ...
        raise UserError("--data %s: %s" % (config.data, exc)) from None
    try:
        label_map = label_map_for(loaded.classes, loaded.num_classes, loader.classes)
        step = EvalStep(loaded.model, num_classes=loaded.num_classes, trace=config.trace)
        result: Dict[str, Any] = dict(run_eval(step, loader, label_map,
                                               progress=config.progress and dist.get_rank() == 0))
    finally:
        loader.close()
    result.update(arch=loaded.arch, image_size=size, crop_ratio=ratio, ema=config.ema)
    return result
