"""Checkpoints: atomic save, tolerant load, and reading weights from any supported source.

Files are plain pickles (`megengine.save` is `pickle.dump`), so they load with or without
MegEngine. An engine checkpoint is a dict::

    {"format": "engine-checkpoint", "version": 2,
     "step": int,             # global optimisation steps done: the whole position
     "steps_per_epoch": int,  # what `step` was counted in (epoch = step // steps_per_epoch)
     "state_dict": {...},     # model weights, the key official test.py/inference.py read too
     "optimizer": {...}, "scaler": {...} | None, "ema": {...} (when the run keeps one),
     "config": {...},         # TrainConfig as a dict; arch, num_classes, classes, image_size
     "metrics": {...}}        # best top-1 so far etc.

Version 1 stored the position as "epoch" plus the loader's {"epoch", "position"}; the trainer
still resumes those.

The official published weights are bare state dicts; official train.py checkpoints are
{"epoch", "state_dict"}. `read_weights` accepts all three.

Loading is safe by default: a checkpoint is a pickle, so it is read with the allow-list of
engine.models.weights.unpickle (containers, numbers, strings, numpy arrays, MegEngine tensors);
anything else is refused with a one-line UnsafePickleError naming the global. `trusted=True` or
ENGINE_TRUST_PICKLE=1 reads a trusted file as a plain pickle.
"""
from __future__ import annotations

import glob
import os
import pickle
from typing import Any, Dict, Mapping, Optional

from megengine import Tensor

from engine.atomic import TMP_PREFIX, atomic_write
from engine.errors import UserError
from engine.models import weights

FORMAT = weights.ENGINE_CHECKPOINT_FORMAT
VERSION = 2
LATEST = "checkpoint.pkl"  # the official train.py's name; always the newest state of a run


def save_checkpoint(obj: Mapping[str, Any], path: str) -> str:
    """Write `obj` to `path` atomically: temp file in the same folder, fsync, rename, fsync dir.

    A crash or kill -9 at any moment leaves either the previous file or the new one under
    `path`, never a truncated one; a stray temp file may remain and is ignored by loads.
    """
    host = _to_host(obj)
    return atomic_write(path, lambda f: pickle.dump(host, f, protocol=pickle.HIGHEST_PROTOCOL))


def _to_host(obj: Any) -> Any:
    """Tensors -> numpy, so a file never needs a device (or MegEngine) to load."""
    if isinstance(obj, dict):  # dict and OrderedDict both rebuild from pairs
        return obj.__class__((k, _to_host(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    if isinstance(obj, Tensor):
        return obj.numpy()
    return obj


def load_checkpoint(path: str, *, trusted: Optional[bool] = None) -> Dict[str, Any]:
    """Unpickle a checkpoint or weight file (safely unless `trusted`; None = $ENGINE_TRUST_PICKLE).

    A missing, unreadable or unsafe file is a one-line UserError.
    """
    return weights.read_file(path, trusted=trusted, what="checkpoint")


def find_latest(save_dir: str) -> Optional[str]:
    """The newest complete checkpoint in a save dir, or None. Temp files are never returned."""
    path = os.path.join(save_dir, LATEST)
    return path if os.path.isfile(path) else None


def resolve_resume(resume: str) -> str:
    """`--resume` takes a checkpoint file or a save dir (meaning its latest checkpoint)."""
    if os.path.isdir(resume):
        latest = find_latest(resume)
        if latest is None:
            raise UserError(
                "nothing to resume in %s: it has no %s (was any epoch or --save-every step "
                "reached?)" % (resume, LATEST)
            )
        return latest
    if not os.path.exists(resume):
        raise UserError("--resume: no such file or folder: %s" % resume)
    return resume


def clean_temp_files(save_dir: str) -> None:
    """Remove temp files left by a save that was killed; called when a run (re)starts."""
    for p in glob.glob(os.path.join(save_dir, TMP_PREFIX + "*")):
        try:
            os.unlink(p)
        except OSError:
            pass


def is_engine_checkpoint(obj: Mapping[str, Any]) -> bool:
    return obj.get("format") == FORMAT


def is_url(s: str) -> bool:
    return weights.is_url(s)


def read_weights(source: str, *, trusted: Optional[bool] = None) -> Dict[str, Any]:
    """Load a weights source: a local file, or a URL fetched into megengine.hub's cache.

    URLs go through engine.models.weights.fetch: one download per node under a lock, temp file
    + rename, and the sha256 prefix a published name carries checked, so a rank never unpickles
    a half-written or damaged download. Read safely unless `trusted` (see load_checkpoint).
    """
    return weights.read(source, trusted=trusted)
