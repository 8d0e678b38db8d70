"""Evaluation: building a model from a weights source, the eval loop, and what tools/test.py
runs (single-image inference is engine/inference.py).

Both accept the same weight sources: None (MegEngine's published weights for --arch), a path
or URL to an official bare state dict, an official train.py checkpoint ({"state_dict": ...}),
or an engine checkpoint (which also records the architecture and the class list).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import megengine as mge
import numpy as np

from engine import dist
from engine.errors import UserError
from engine.imagenet_classes import imagenet_wnids
from engine.steps import EvalStep

# --------------------------------------------------------------------------------------------
# Building a model from a weights source
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: Any                      # the megengine Module, in eval mode
    arch: str
    num_classes: int
    classes: Optional[List[str]]    # WNIDs in label order when known
    source: str                     # what was loaded, for messages
    image_size: int = 224           # the crop size it was trained at (engine checkpoints)


def _one_line(text: str) -> str:
    """Multi-line library messages -> one line, for the tools' `error: ...` output."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    out = parts[0] if parts else ""
    for prev, nxt in zip(parts, parts[1:]):
        glue = " " if prev.endswith((":", " at")) or nxt.startswith(("(", "/")) else "; "
        out += glue + nxt
    return out


def load_model(arch: str, source: Optional[str], trusted: Optional[bool] = None) -> LoadedModel:
    """Build `arch` and load weights from `source` (None, "none" or "published" = published
    weights; a URL is fetched once per node into the cache by engine.models.weights.fetch).

    Files are unpickled with engine.models.weights' allow-list unless `trusted` (None =
    $ENGINE_TRUST_PICKLE). A checkpoint of another architecture or class count is a UserError
    that names both sides.
    """
    from engine.models import load_model

    try:
        loaded = load_model(arch, source, trusted=trusted)
    except (UserError, ValueError) as exc:  # ValueError: an unknown arch from engine.models
        raise UserError(_one_line(str(exc))) from None
    classes: Optional[List[str]] = None
    if loaded.config.get("classes"):
        classes = list(loaded.config["classes"])
        if len(classes) != loaded.num_classes:
            raise UserError("%s is inconsistent: it lists %d classes but fc has %d outputs"
                            % (source, len(classes), loaded.num_classes))
    elif loaded.num_classes == 1000:
        classes = imagenet_wnids()  # official weights: labels are the sorted ImageNet WNIDs
    loaded.model.eval()
    return LoadedModel(loaded.model, arch, loaded.num_classes, classes, loaded.source,
                       int(loaded.config.get("image_size") or 224))


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
    """Top-1 / top-5 (percent) and mean loss over this rank's shard, summed over all ranks.

    Val shares are exact (the Sampler does not pad them), so ranks may run different numbers
    of batches, or none: every rank still makes exactly one all-reduce, at the end, and the
    totals count each image once.
    """
    stats = []
    n = 0
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, total=len(loader), desc="eval", unit="batch", leave=False)
    for images, labels in it:
        if label_map is not None:
            labels = label_map[labels]
        stats.append(eval_step(mge.tensor(images), mge.tensor(labels.astype(np.int32))))
        n += len(labels)
    # One host sync at the end: the device works through the batches asynchronously.
    local = np.sum([s.numpy() for s in stats], axis=0) if stats else np.zeros(3)
    loss_sum, c1, c5, total = dist.all_reduce_sum([*local, n])
    if total == 0:
        raise UserError("the validation set is empty")
    return {
        "top1": 100.0 * c1 / total,
        "top5": 100.0 * c5 / total,
        "loss": loss_sum / total,
        "images": int(total),
    }


def val_folder(data: str) -> str:
    """tools/test.py --data: ROOT (then ROOT/val) or the val split folder itself."""
    if not os.path.isdir(data):
        raise UserError("--data: no such folder: %s" % data)
    sub = os.path.join(data, "val")
    return sub if os.path.isdir(sub) else data


@dataclass
class TestConfig:
    data: str
    arch: str = "resnet18"
    model: Optional[str] = None       # path or URL; None = published weights
    trust_pickle: bool = False        # unpickle --model without the allow-list (trusted files)
    ngpus: Optional[int] = None
    batch_size: int = 100             # per GPU, as the official test.py
    workers: Optional[int] = None
    image_size: Optional[int] = None  # None = the checkpoint's training size, else 224
    trace: bool = True
    progress: bool = True


def test(config: TestConfig) -> Dict[str, float]:
    """Evaluate a model on a val set; returns {"top1", "top5", "loss", "images"} (rank 0's)."""
    source = val_folder(config.data)
    if config.model is not None and config.model.lower() != "none" and not (
            os.path.exists(config.model) or "://" in config.model):
        raise UserError("--model: no such file: %s" % config.model)
    if config.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    from engine.models import prefetch_weights

    ngpus = dist.processes_per_node(config.ngpus)
    if ngpus > 1:
        # Download (and verify) once here, then every rank reads the same local file: ranks
        # fetching on their own would race on the cache file.
        wanted = config.model if config.model and config.model.lower() != "none" else "published"
        local = prefetch_weights(wanted, config.arch)
        if wanted != "published":
            config = dataclasses.replace(config, model=local)
    return dist.launch(_test_worker, config, source, ngpus=ngpus)


def _test_worker(config: TestConfig, source: str) -> Dict[str, float]:
    from engine.data import Loader

    loaded = load_model(config.arch, config.model, trusted=config.trust_pickle or None)
    try:
        loader = Loader(
            source, batch_size=config.batch_size, train=False,
            image_size=config.image_size or loaded.image_size,
            workers=config.workers, rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_world_size=dist.get_world_size(),  # test runs on one node
        )
    except (ValueError, OSError) as exc:  # no meta.json, empty folders, ...
        raise UserError("--data %s: %s" % (config.data, exc)) from None
    try:
        label_map = label_map_for(loaded.classes, loaded.num_classes, loader.classes)
        step = EvalStep(loaded.model, num_classes=loaded.num_classes, trace=config.trace)
        return run_eval(step, loader, label_map, progress=config.progress and dist.get_rank() == 0)
    finally:
        loader.close()
