"""The train and val transforms: crop geometry, per-sample randomness, and the objects that turn
a record's JPEG bytes, or a raw record's BGR pixels, into one uint8 CHW sample.

The geometry follows MegEngine's (and torchvision's) RandomResizedCrop, Resize and CenterCrop
exactly, so that evaluation matches the official pipeline pixel for pixel. `TrainTransform` and
`ValTransform` are what the Loader's workers run per sample, what bench_decode times, and (the
val one) what single-image inference applies: one implementation for all three.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import cv2
import numpy as np

from engine.data.decode import decode_bgr, decode_crop, jpeg_size, pick_scale, scaled_dim, sniff

# A record's image as the transforms take it: encoded bytes, or uint8 HxWx3 BGR pixels (a raw
# record), which are cropped without decoding.
Image = Union[bytes, np.ndarray]

__all__ = ["Image", "SampleRNG", "sample_rng", "random_resized_crop", "resize_shorter", "center_crop",
           "val_resize", "resize_square", "write_chw", "TrainTransform", "ValTransform",
           "Transform"]


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


def resize_square(img: np.ndarray, S: int) -> np.ndarray:
    """img resized to S x S (bilinear), or img itself when it already is."""
    if img.shape[0] != S or img.shape[1] != S:
        return cv2.resize(img, (S, S), interpolation=cv2.INTER_LINEAR)
    return img


def write_chw(img: np.ndarray, out: np.ndarray, flip: bool = False) -> None:
    """Write an HWC BGR image, mirrored left-right when `flip`, into out's three planes."""
    if flip:
        img = cv2.flip(img, 1)
    cv2.split(img, [out[0], out[1], out[2]])  # 3x cheaper than a numpy transpose


def _to_chw(img: np.ndarray, out: np.ndarray, flip: bool = False) -> None:
    """Resize to out's S x S when needed, flip, and write HWC BGR into out's three planes."""
    write_chw(resize_square(img, out.shape[-1]), out, flip)


class TrainTransform:
    """JPEG bytes -> RandomResizedCrop (area 0.08-1, ratio 3/4-4/3) + horizontal flip, written
    into `out` (uint8 [3, S, S]; S is out's size, so one object serves every resolution).

    Every random choice comes from sample_rng(seed, epoch, index). JPEGs decode only the crop
    window (with the ROI decoder) at the smallest DCT scale that keeps it at least S x S, with
    the fast integer IDCT: augmentation does not need the last grey level.

    Raw pixels (a version-2 record) are cropped with the same random_resized_crop draws and
    flip, at full resolution (`crop_full`): no decode, and no DCT scaling either.

    The steps (window, decode_crop, resize_square, write_chw) are public so that
    benchmarks/bench_stages.py can time each on the same records.
    """

    def __init__(self, seed: int, use_roi: bool = True):
        self.seed = seed
        self.use_roi = use_roi

    def __call__(self, data: Image, index: int, epoch: int, out: np.ndarray,
                 size: Optional[Tuple[int, int]] = None) -> None:
        """`size`: the JPEG's (width, height) when known (packed records), else probed."""
        S = out.shape[-1]
        if isinstance(data, np.ndarray):
            crop, flip = self.crop_full(data, index, epoch)
        elif size is not None or sniff(data) == "jpeg":
            width, height = size or jpeg_size(data)
            num, x0, y0, w, h, flip = self.window(width, height, index, epoch, S)
            crop = decode_crop(data, num, x0, y0, w, h, self.use_roi, fast_dct=True)
        else:  # PNG etc. in a raw folder: full decode, same geometry
            crop, flip = self.crop_full(decode_bgr(data, fast_dct=True), index, epoch)
        _to_chw(crop, out, flip)

    def crop_full(self, full: np.ndarray, index: int, epoch: int) -> Tuple[np.ndarray, bool]:
        """(crop view, flip) of sample `index` from a whole decoded HxWx3 image: the draws of
        window(), at scale 8/8."""
        rng = sample_rng(self.seed, epoch, index)
        x, y, w, h = random_resized_crop(full.shape[0], full.shape[1], rng)
        return full[y:y + h, x:x + w], rng.random() < 0.5

    def window(self, width: int, height: int, index: int, epoch: int, S: int
               ) -> Tuple[int, int, int, int, int, bool]:
        """(num, x0, y0, w, h, flip) of sample `index`: the DCT scale num/8, the crop's window
        in the image scaled by it (its edges rounded outwards), and the flip."""
        rng = sample_rng(self.seed, epoch, index)
        x, y, w, h = random_resized_crop(height, width, rng)
        num = pick_scale(w, h, S, S)
        x0, y0 = x * num // 8, y * num // 8
        x1 = min(scaled_dim(width, num), -(-(x + w) * num // 8))
        y1 = min(scaled_dim(height, num), -(-(y + h) * num // 8))
        return num, x0, y0, x1 - x0, y1 - y0, rng.random() < 0.5


class ValTransform:
    """JPEG bytes (or a decoded BGR image, or a raw record's pixels) -> resize the shorter side
    to round(S / crop_ratio), center-crop S x S: the official val transform (256 -> 224 at the
    standard 0.875). A raw record holds the exact full decode, so it gives the very same output
    as its JPEG."""

    def __init__(self, crop_ratio: float = 0.875, use_roi: bool = True):
        self.crop_ratio = crop_ratio
        self.use_roi = use_roi

    def __call__(self, data: Image, index: int, epoch: int, out: np.ndarray,
                 size: Optional[Tuple[int, int]] = None) -> None:
        """Same signature as TrainTransform (index and epoch are unused: val is deterministic)."""
        if isinstance(data, np.ndarray):
            img = data
        elif size is not None or sniff(data) == "jpeg":
            width, height = size or jpeg_size(data)
            img = decode_crop(data, 8, 0, 0, width, height, self.use_roi)
        else:
            img = decode_bgr(data)
        _to_chw(self.crop(img, out.shape[-1]), out)

    def crop(self, img: np.ndarray, S: int) -> np.ndarray:
        """A decoded HWC image -> its resized, center-cropped S x S HWC view."""
        h, w = img.shape[:2]
        th, tw = resize_shorter(h, w, val_resize(S, self.crop_ratio))
        if (th, tw) != (h, w):
            img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_LINEAR)
        if th < S or tw < S:  # only for a crop ratio above 1; keep it defined
            img = cv2.resize(img, (max(tw, S), max(th, S)), interpolation=cv2.INTER_LINEAR)
            th, tw = img.shape[:2]
        x, y = center_crop(th, tw, S)
        return img[y:y + S, x:x + S]


Transform = Union[TrainTransform, ValTransform]
