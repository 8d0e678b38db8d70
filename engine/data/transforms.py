"""Crop geometry and per-sample randomness: pure functions of (image size, rng).

The geometry follows MegEngine's (and torchvision's) RandomResizedCrop, Resize and CenterCrop
exactly, so that evaluation matches the official pipeline pixel for pixel.
"""
from __future__ import annotations

import math
from typing import Tuple

__all__ = ["SampleRNG", "sample_rng", "random_resized_crop", "resize_shorter", "center_crop",
           "val_resize"]


_MASK = (1 << 64) - 1


class SampleRNG:
    """SplitMix64: a tiny, fast, well-mixed generator for the handful of draws a sample needs.

    Seeding random.Random costs ~13 us (it fills a 624-word state); this costs nothing, which
    matters at a thousand samples per second per core.
    """

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK

    def next64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def random(self) -> float:
        """Uniform in [0, 1)."""
        return (self.next64() >> 11) * (1.0 / (1 << 53))

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()

    def randint(self, a: int, b: int) -> int:
        """Uniform integer in [a, b] (inclusive, as random.randint)."""
        return a + self.next64() % (b - a + 1)


def sample_rng(seed: int, epoch: int, index: int) -> SampleRNG:
    """The RNG of every random choice for sample `index` in `epoch`.

    A function of (seed, epoch, index) only, so the output never depends on the number of
    workers, on which worker decodes the sample, or on timing. The three are hashed together
    (one SplitMix64 step each) so that nearby (epoch, index) pairs give unrelated streams.
    """
    h = SampleRNG(seed)
    h = SampleRNG(h.next64() ^ (epoch & _MASK))
    h = SampleRNG(h.next64() ^ (index & _MASK))
    return SampleRNG(h.next64())


def random_resized_crop(height: int, width: int, rng: SampleRNG,
                        scale: Tuple[float, float] = (0.08, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(x, y, w, h) of a crop covering scale of the area with aspect ratio in ratio."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height  # fallback: the central crop of the nearest allowed ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_shorter(height: int, width: int, size: int) -> Tuple[int, int]:
    """(h, w) after resizing the shorter side to size; the longer side is truncated, as
    MegEngine's Resize(int) does."""
    if min(height, width) == size:
        return height, width
    if height < width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop(height: int, width: int, size: int) -> Tuple[int, int]:
    """(x, y) offset of a size x size center crop (MegEngine's CenterCrop rounding)."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def val_resize(image_size: int, crop_ratio: float = 0.875) -> int:
    """Shorter side before the center crop: 256 for 224 at the standard 0.875 crop ratio."""
    return int(round(image_size / crop_ratio))
