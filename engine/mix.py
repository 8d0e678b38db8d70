"""Mixup and CutMix on the device, with soft targets and the matching cross-entropy.

Each batch's random choices (mixup or cutmix, lambda, the partner permutation, the box) come
from one numpy Generator seeded by (seed, step, rank), so a resumed run mixes exactly as the
uninterrupted one did, whatever the loader's worker count or timing.

The pixels never leave the device: the host draws a handful of numbers and sends the partner
permutation (N ints) and a row and a column weight vector (H + W floats); the device computes

    m = rows[:, None] * cols[None, :]
    mixed = x * (1 - m) + x[perm] * m

which is mixup when rows * cols is the constant 1 - lam, and CutMix when it is the 0/1 box.
Both are one graph with the same inputs, so the mixing can sit inside a traced step
(`mix_images`) without a retrace when the batch switches between the two. `mix_plan` draws a
batch's plan on the host; the train step (engine.steps) applies it with `mix_images` and
`mix_targets`.

Targets follow timm's Mixup: label smoothing is applied to the one-hot first (off value
smoothing / K, on value 1 - smoothing + smoothing / K), then the two smoothed targets are mixed
with the same lambda as the pixels; for CutMix lambda is the area share the box left to the
original image after clipping at the border.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import megengine as mge
import megengine.functional as F
import numpy as np

from engine.errors import ConfigError

# Keeps this stream apart from the loader's (seed, epoch, index) streams.
_STREAM = 0x6D6978  # "mix"


@dataclass
class MixPlan:
    """One batch's mixing, drawn on the host. `lam` weights the original sample's target."""

    kind: str                                   # "none" | "mixup" | "cutmix"
    lam: float
    perm: np.ndarray                            # int32 [N]: partner of sample i is perm[i]
    rows: np.ndarray                            # float32 [H]
    cols: np.ndarray                            # float32 [W]
    box: Optional[Tuple[int, int, int, int]]    # (y0, y1, x0, x1), half-open; CutMix only


def _check(mixup_alpha: float, cutmix_alpha: float, switch_prob: float) -> None:
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ConfigError("mixup_alpha and cutmix_alpha must be >= 0 (0 = off), got %r and %r"
                          % (mixup_alpha, cutmix_alpha))
    if not 0.0 <= switch_prob <= 1.0:
        raise ConfigError("switch_prob must be in [0, 1], got %r" % (switch_prob,))


def mix_rng(seed: int, step: int, rank: int = 0) -> np.random.Generator:
    """The Generator for one batch on one rank: a pure function of (seed, step, rank)."""
    return np.random.default_rng([int(seed), int(step), int(rank), _STREAM])


def cutmix_box(lam: float, height: int, width: int,
               rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """timm's rand_bbox: a box of side sqrt(1 - lam) of each dimension around a uniformly drawn
    centre, clipped to the image. Returns (y0, y1, x0, x1), half-open."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x0, x1 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return y0, y1, x0, x1


def mix_plan(batch_size: int, height: int, width: int, *, step: int, seed: int,
             mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5,
             rank: int = 0) -> MixPlan:
    """Draw one batch's mixing. With both alphas > 0, CutMix is chosen with `switch_prob`."""
    _check(mixup_alpha, cutmix_alpha, switch_prob)
    if batch_size < 1 or height < 1 or width < 1:
        raise ConfigError("batch and image sizes must be >= 1, got %r, %r, %r"
                          % (batch_size, height, width))
    rng = mix_rng(seed, step, rank)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        kind = "cutmix" if rng.random() < switch_prob else "mixup"
    elif mixup_alpha > 0:
        kind = "mixup"
    elif cutmix_alpha > 0:
        kind = "cutmix"
    else:
        kind = "none"
    perm = np.arange(batch_size, dtype=np.int32)
    if kind == "none":
        return MixPlan(kind, 1.0, perm, np.zeros(height, np.float32), np.zeros(width, np.float32),
                       None)
    perm = rng.permutation(batch_size).astype(np.int32)
    if kind == "mixup":
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        rows = np.full(height, 1.0 - lam, np.float32)
        return MixPlan(kind, lam, perm, rows, np.ones(width, np.float32), None)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
    y0, y1, x0, x1 = cutmix_box(lam, height, width, rng)
    # The clipped box may be smaller than asked: the targets follow the pixels actually pasted.
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    rows = np.zeros(height, np.float32)
    rows[y0:y1] = 1.0
    cols = np.zeros(width, np.float32)
    cols[x0:x1] = 1.0
    return MixPlan(kind, lam, perm, rows, cols, (y0, y1, x0, x1))


def mix_images(images: mge.Tensor, perm: mge.Tensor, rows: mge.Tensor,
               cols: mge.Tensor) -> mge.Tensor:
    """x * (1 - m) + x[perm] * m with m = rows (x) cols, for float images [N, C, H, W];
    traceable. Written so that m = 0 or 1 gives exactly x or x[perm] (CutMix copies pixels)."""
    m = rows.reshape(1, 1, -1, 1) * cols.reshape(1, 1, 1, -1)
    return images * (1.0 - m) + images[perm] * m


def smooth_one_hot(labels: mge.Tensor, num_classes: int, label_smoothing: float = 0.0) -> mge.Tensor:
    """float32 [N, K]: 1 - s + s/K on the label, s/K elsewhere (sums to 1)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError("label_smoothing must be in [0, 1), got %r" % (label_smoothing,))
    one_hot = F.nn.one_hot(labels.astype("int32"), int(num_classes)).astype("float32")
    if label_smoothing == 0:
        return one_hot
    off = label_smoothing / num_classes
    return one_hot * (1.0 - label_smoothing) + off


def mix_targets(labels: mge.Tensor, num_classes: int, lam: mge.Tensor, perm: mge.Tensor,
                label_smoothing: float = 0.0) -> mge.Tensor:
    """lam * smooth(y) + (1 - lam) * smooth(y[perm]); `lam` a float32 tensor; traceable."""
    y = smooth_one_hot(labels, num_classes, label_smoothing)
    return y * lam + y[perm] * (1.0 - lam)


def soft_cross_entropy(logits: mge.Tensor, targets: mge.Tensor) -> mge.Tensor:
    """Mean over the batch of -sum_k targets_k * log_softmax(logits)_k; traceable.

    With targets = smooth_one_hot(labels, K, s) it equals
    `F.nn.cross_entropy(logits, labels, label_smooth=s)`.
    """
    log_p = F.nn.logsoftmax(logits.astype("float32"), axis=1)
    return -(targets * log_p).sum(axis=1).mean()
