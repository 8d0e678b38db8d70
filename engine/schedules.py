"""Schedules as pure functions of where the run is: the learning rate per global step and the
training resolution per epoch.

Being pure functions of (step | epoch) and the run's fixed settings, they need no state in a
checkpoint: a resumed run recomputes the same values from its step counter.

LR schedules (all with the same optional linear warmup, multiplied onto the schedule's value):

- "step":   x0.1 at epochs 30/60/80, scaled to the run length (the recipe of the MegEngine 0.x
            train.py behind the published weights).
- "cosine": half a cosine from base_lr at the end of warmup to end_lr (0 by default).
- "linear": a straight line from base_lr at the end of warmup to end_lr. With a short warmup
            this is FFCV's "cyclic" (triangular) schedule: `np.interp([epoch], [0,
            lr_peak_epoch, epochs], [1e-4 * lr, lr, 0])` in ffcv-imagenet's train_imagenet.py.
- "poly":   MLPerf's polynomial decay, power 2, to end_lr: `PolynomialDecay(initial_learning_rate,
            decay_steps, end_learning_rate, power=2.0)` after warmup in
            mlcommons/training image_classification/tensorflow2/lars_util.py.

Warmup here starts at base_lr / warmup_steps rather than 0 (a step at lr 0 does no work), so it
differs from MLPerf's `initial_learning_rate * step / warmup_steps` by one step.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from typing import List

import numpy as np

from engine.errors import ConfigError

SCHEDULES = ("step", "cosine", "linear", "poly")
POLY_POWER = 2.0


def step_milestones(epochs: int) -> List[float]:
    """Epochs at which the step schedule multiplies the LR by 0.1.

    The reference recipe decays at 30/60/80 for its 90-100 epoch runs; other lengths scale
    those proportionally (from 90 below, from 100 above, so the function is continuous), so a
    5-epoch run still decays at 1.67/3.33/4.44.
    """
    base = [30.0, 60.0, 80.0]
    if 90 <= epochs <= 100:
        return base
    ref = 90.0 if epochs < 90 else 100.0
    return [m * epochs / ref for m in base]


def lr_at(
    step: int,
    *,
    base_lr: float,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float = 0.0,
    schedule: str = "step",
    end_lr: float = 0.0,
) -> float:
    """Learning rate for global step `step` (0-based); call it before every step.

    Warmup is linear from base_lr/warmup_steps (not 0, which would waste the first step) up to
    the schedule's value. Step: x0.1 at each milestone (in steps). Cosine, linear and poly
    decay from base_lr at the end of warmup to `end_lr` at the last step + 1 (the last step
    itself still trains at a small positive rate); `end_lr` does not apply to "step".
    """
    if schedule not in SCHEDULES:
        raise ConfigError("unknown lr schedule %r; choose from %s" % (schedule, "|".join(SCHEDULES)))
    if steps_per_epoch < 1 or epochs < 1:
        raise ConfigError("steps_per_epoch and epochs must be >= 1, got %d and %d"
                          % (steps_per_epoch, epochs))
    if not 0 <= warmup_epochs <= epochs:
        raise ConfigError("warmup_epochs must be in [0, epochs=%d], got %r" % (epochs, warmup_epochs))
    if not 0 <= end_lr <= base_lr:
        raise ConfigError("end_lr must be in [0, base_lr=%g], got %r" % (base_lr, end_lr))
    total = max(1, epochs * steps_per_epoch)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if schedule == "step":
        bounds = [int(round(m * steps_per_epoch)) for m in step_milestones(epochs)]
        lr = base_lr * 0.1 ** bisect_right(bounds, step)
    else:
        # Fraction of the decay phase done; 0 during warmup so warmup ramps up to base_lr.
        t = min(max(step - warmup, 0) / max(1, total - warmup), 1.0)
        if schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * t))
        elif schedule == "linear":
            shape = 1.0 - t
        else:  # poly
            shape = (1.0 - t) ** POLY_POWER
        lr = end_lr + (base_lr - end_lr) * shape
    if step < warmup:
        lr *= (step + 1) / warmup
    return lr


def resolution_at(
    epoch: int,
    start_res: int,
    end_res: int,
    start_ramp: int,
    end_ramp: int,
    multiple: int = 32,
) -> int:
    """Training image size for `epoch` under FFCV-style progressive resizing.

    Same rule as ffcv-imagenet's `get_resolution`: `start_res` up to and including epoch
    `start_ramp`, `end_res` from epoch `end_ramp` on, and in between the linear interpolation
    rounded to the nearest multiple of `multiple` (numpy rounding: halves go to even).
    Call it at the start of every epoch and give the loader the result.
    """
    if start_res < 1 or end_res < 1 or multiple < 1:
        raise ConfigError("resolutions and multiple must be >= 1, got %r, %r, %r"
                          % (start_res, end_res, multiple))
    if start_res > end_res:
        raise ConfigError("progressive resizing grows the image: min_res %d > max_res %d"
                          % (start_res, end_res))
    if not 0 <= start_ramp <= end_ramp:
        raise ConfigError("need 0 <= start_ramp <= end_ramp, got %r and %r" % (start_ramp, end_ramp))
    if epoch <= start_ramp:
        return int(start_res)
    if epoch >= end_ramp:
        return int(end_res)
    interp = float(np.interp(epoch, [start_ramp, end_ramp], [start_res, end_res]))
    return int(np.round(interp / multiple)) * multiple
