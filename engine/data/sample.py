"""A small, real-photo, ImageNet-shaped data set for demos, tests and benchmarks.

``make_sample_imagenet(out)`` writes::

    out/train/<wnid>/<wnid>_<k>.JPEG        k = 1 .. train_per_class
    out/val/<wnid>/<wnid>_val_<k>.JPEG      k = 1 .. val_per_class
    out/sample_imagenet.json                what was made (written first, rewritten when done)

It lives in the library, not in tools/, because users call it too: it is how a new machine,
container or CI job gets real JPEGs to check the loader, the packer and a training run end to
end without ImageNet (`python -c "from engine.data.sample import make_sample_imagenet; ..."`),
and the benchmarks and tests share it. It needs only numpy, OpenCV and, at call time,
scikit-image.

Val is sorted into class folders (as the official MegEngine reference expects), not the flat
``ILSVRC2012_val_*.JPEG`` folder of the real download. Labels are the sorted WNIDs, as for
ImageNet.

Every class is one of the real photographs that scikit-image ships inside its wheel (no network):
each sample is a random crop (scale, aspect ratio, position), a random horizontal flip and a
random colour change (per-channel gains, brightness, contrast) of that class's photo, saved as a
JPEG of ImageNet-like size (long side 400-500 px, aspect mostly 3/4 .. 4/3) at quality 75-95.
When more classes are asked for than there are photos, further classes reuse the photos in a
transformed form a classifier can tell apart (upside-down + hue rotated for colour photos,
upside-down / rotated + tinted for grayscale ones; the third variant is also a photographic
negative); the most classes is ``max_classes()``.

Output is a pure function of the arguments: sample ``k`` of class ``c`` in split ``s`` draws its
randomness from ``numpy.random.default_rng([seed, s, c, k])`` and is encoded with
``cv2.imencode``, so the same seed gives byte-identical files (given the same OpenCV and
scikit-image), and growing ``train_per_class`` keeps the files already there unchanged.

Bad arguments and a folder that is not free to write raise UserError subclasses (ConfigError,
ForeignFolderError, SampleSourceError), so a tool prints one `error:` line. This module imports
neither MegEngine nor (until called) scikit-image.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import MISSING, dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple, TypedDict

import numpy as np

from engine.atomic import atomic_write
from engine.cli import option
from engine.errors import ConfigError, UserError

__all__ = ["SampleConfig", "make_sample_imagenet", "max_classes", "class_specs", "MARKER",
           "ForeignFolderError", "SampleSourceError"]

MARKER = "sample_imagenet.json"
_MARKER_FORMAT = "engine-sample-imagenet"

#: Long side of a written image is drawn from this closed range (pixels).
LONG_SIDE = (400, 500)
# The imagenet_like mode: ImageNet's files are ~110 KB on average at a ~500 px long side. Smooth
# photos resized from crops compress to a third of that, which flatters the decoder (decode time
# follows the entropy-coded bytes), so that mode adds sensor-like grain and encodes at high
# quality. Grain sigma in grey levels (luma; chroma gets half).
IMAGENET_LIKE_LONG_SIDE = (450, 500)
IMAGENET_LIKE_QUALITY = (93, 97)
IMAGENET_LIKE_GRAIN = (5.0, 9.0)
#: JPEG quality is drawn from this closed range.
QUALITY = (75, 95)

# (name, loader attribute in skimage.data, is_colour, ImageNet WNID used for the plain photo)
# Order matters: the first N classes are used for --classes N, most distinct photos first.
_PHOTOS: List[Tuple[str, str, bool, str]] = [
    ("chelsea", "chelsea", True, "n02123045"),                # tabby cat
    ("coffee", "coffee", True, "n07920052"),                  # espresso
    ("astronaut", "astronaut", True, "n03763968"),            # military uniform
    ("rocket", "rocket", True, "n04008634"),                  # projectile, missile
    ("motorcycle", "stereo_motorcycle", True, "n03785016"),   # moped
    ("immunohistochemistry", "immunohistochemistry", True, "n03920288"),  # Petri dish
    ("hubble_deep_field", "hubble_deep_field", True, "n04044716"),        # radio telescope
    ("retina", "retina", True, "n03692522"),                  # loupe
    ("camera", "camera", False, "n04069434"),                 # reflex camera
    ("coins", "coins", False, "n03935335"),                   # piggy bank
    ("grass", "grass", False, "n03649909"),                   # lawn mower
    ("brick", "brick", False, "n04326547"),                   # stone wall
    ("moon", "moon", False, "n03956157"),                     # planetarium
    ("clock", "clock", False, "n02708093"),                   # analog clock
    ("gravel", "gravel", False, "n02894605"),                 # breakwater
    ("cell", "cell", False, "n03530642"),                     # honeycomb
    ("page", "page", False, "n03291819"),                     # envelope
]

# WNIDs (real ImageNet-1k classes) for the transformed variants, in order of use.
_VARIANT_WNIDS: List[str] = [
    "n01806143", "n01818515", "n01843383", "n01910747", "n01944390", "n01984695",
    "n02007558", "n02056570", "n02085620", "n02099601", "n02110341", "n02114367",
    "n02119022", "n02129165", "n02129604", "n02165456", "n02206856", "n02279972",
    "n02317335", "n02391049", "n02480855", "n02504458", "n02510455", "n02676566",
    "n02690373", "n02782093", "n02814860", "n02980441", "n03028079", "n03272010",
    "n03452741", "n03594945", "n03673027", "n04285008",
]

# Variant 0 is the photo as is. Colour photos: variants rotate the hue (degrees); grayscale
# photos: variants tint (BGR gains). Geometry: 'vflip' (upside down) or 'rot90' (clockwise);
# the random augmentation only ever flips horizontally, so both stay distinct from the original.
class _Variant(NamedTuple):
    geometry: Optional[str]  # None, 'vflip' or 'rot90'
    hue: int  # degrees, colour photos
    tint: Optional[Tuple[float, float, float]]  # BGR gains, grayscale photos
    negative: bool = False


_VARIANTS: List[_Variant] = [
    _Variant(geometry=None, hue=0, tint=None),
    _Variant(geometry="vflip", hue=120, tint=(0.45, 0.75, 1.0)),   # warm sepia
    _Variant(geometry="rot90", hue=240, tint=(1.0, 0.8, 0.4), negative=True),  # cold blue
]


class ClassSpec(TypedDict):
    """One row of the class table (see class_specs)."""

    wnid: str  # the ImageNet WNID the class is filed under
    photo: str  # the scikit-image photo's name (_PHOTOS)
    variant: int  # index into _VARIANTS; 0 = the photo as is
    description: str

_MAX_SOURCE_SIDE = 900  # photos larger than this are shrunk once (speed; crops are ~500 px)


class ForeignFolderError(UserError, FileExistsError):
    """The output folder holds files that are not a sample set; nothing is written there."""


class SampleSourceError(UserError, RuntimeError):
    """scikit-image, or the photos that ship inside its wheel, cannot be loaded."""


def max_classes() -> int:
    """Most classes ``make_sample_imagenet`` can make distinct from each other."""
    return len(_PHOTOS) * len(_VARIANTS)


def class_specs(classes: int) -> List[ClassSpec]:
    """The first ``classes`` class definitions, in generation order (not label order).

    Each is ``{"wnid", "photo", "variant", "description"}``. Raises ConfigError (a ValueError)
    when ``classes`` is not in ``1 .. max_classes()``.
    """
    if not isinstance(classes, (int, np.integer)) or isinstance(classes, bool) or classes < 1:
        raise ConfigError(f"classes must be a positive integer, got {classes!r}")
    if classes > max_classes():
        raise ConfigError(
            f"classes={classes} is more than this generator can make distinct: the maximum is "
            f"{max_classes()} ({len(_PHOTOS)} scikit-image photos x {len(_VARIANTS)} variants); "
            f"use classes <= {max_classes()}"
        )
    specs: List[ClassSpec] = []
    for c in range(classes):
        v, p = divmod(c, len(_PHOTOS))
        name, _, colour, wnid = _PHOTOS[p]
        if v > 0:
            wnid = _VARIANT_WNIDS[(v - 1) * len(_PHOTOS) + p]
        var = _VARIANTS[v]
        if v == 0:
            desc = name
        else:
            neg = ", negative" if var.negative else ""
            change = f"hue +{var.hue} deg" if colour else f"tint BGR {var.tint}"
            desc = f"{name} ({var.geometry}{neg}, {change})"
        specs.append(ClassSpec(wnid=wnid, photo=name, variant=v, description=desc))
    return specs


def _load_photo(name: str) -> np.ndarray:
    """The named scikit-image photo as uint8 BGR, long side <= _MAX_SOURCE_SIDE."""
    import cv2

    try:
        import skimage.data as skdata
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SampleSourceError(
            "make_sample_imagenet needs scikit-image for its source photos; "
            "install it with `pip install scikit-image` (or `pip install -e .[dev]`)"
        ) from exc
    attr = {n: a for n, a, _, _ in _PHOTOS}[name]
    try:
        img = getattr(skdata, attr)()
    except Exception as exc:
        raise SampleSourceError(
            f"scikit-image could not load its bundled photo {attr!r} ({type(exc).__name__}: "
            f"{exc}); this generator needs the photos that ship inside the scikit-image wheel"
        ) from exc
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise SampleSourceError(f"scikit-image photo {attr!r} is {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGR)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    long_side = max(img.shape[:2])
    if long_side > _MAX_SOURCE_SIDE:
        s = _MAX_SOURCE_SIDE / long_side
        img = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)),
                         interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)


def _class_base(photo: np.ndarray, colour: bool, variant: int) -> np.ndarray:
    """The class's source image: the photo with the variant's fixed transform applied."""
    import cv2

    var = _VARIANTS[variant]
    img = photo
    if var.geometry == "vflip":
        img = cv2.flip(img, 0)
    elif var.geometry == "rot90":
        img = cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
    if variant and colour:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)  # H in 0..179 (2 degrees per step)
        h = hsv[:, :, 0].astype(np.int16) + var.hue // 2
        hsv[:, :, 0] = (h % 180).astype(np.uint8)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if var.negative:
        img = 255 - img
    if variant and not colour:
        gains = np.asarray(var.tint, np.float32)
        img = np.clip(img.astype(np.float32) * gains + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def _render(base: np.ndarray, rng: np.random.Generator,
            imagenet_like: bool = False) -> Tuple[bytes, int, int]:
    """One random sample of a class: crop, resize, flip, colour change, JPEG. -> (bytes, h, w)."""
    import cv2

    # Output size: ImageNet-like long side and aspect ratio (mostly 3/4..4/3, sometimes wider).
    sides = IMAGENET_LIKE_LONG_SIDE if imagenet_like else LONG_SIDE
    long_side = int(rng.integers(sides[0], sides[1] + 1))
    if rng.random() < 0.85:
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    else:
        aspect = float(np.exp(rng.uniform(np.log(1 / 2), np.log(2))))  # w / h
    if aspect >= 1:
        out_w, out_h = long_side, max(1, round(long_side / aspect))
    else:
        out_w, out_h = max(1, round(long_side * aspect)), long_side

    # Crop of the same aspect ratio: 35%..100% of the largest such crop's area, anywhere.
    bh, bw = base.shape[:2]
    full_w = min(bw, bh * aspect)
    scale = float(np.sqrt(rng.uniform(0.35, 1.0)))
    cw = max(8, int(round(full_w * scale)))
    ch = max(8, int(round(cw / aspect)))
    cw, ch = min(cw, bw), min(ch, bh)
    x0 = int(rng.integers(0, bw - cw + 1))
    y0 = int(rng.integers(0, bh - ch + 1))
    crop = base[y0:y0 + ch, x0:x0 + cw]
    interp = cv2.INTER_AREA if cw > out_w else cv2.INTER_LINEAR
    img = cv2.resize(crop, (out_w, out_h), interpolation=interp)
    if rng.random() < 0.5:
        img = cv2.flip(img, 1)

    # Colour: per-channel gains, contrast around the mean, brightness shift (one LUT per channel).
    gains = rng.uniform(0.85, 1.15, size=3)
    contrast = rng.uniform(0.75, 1.25)
    brightness = rng.uniform(-20.0, 20.0)
    mean = np.asarray(cv2.mean(img)[:3])
    v = np.arange(256, dtype=np.float64)[:, None]
    lut = (v - mean) * (contrast * gains) + mean * gains + brightness + 0.5
    lut = np.clip(lut, 0, 255).astype(np.uint8).reshape(256, 1, 3)
    img = cv2.LUT(img, lut)

    qualities = IMAGENET_LIKE_QUALITY if imagenet_like else QUALITY
    quality = int(rng.integers(qualities[0], qualities[1] + 1))
    if imagenet_like:  # drawn last, so the default mode's files stay byte-identical
        sigma = float(rng.uniform(*IMAGENET_LIKE_GRAIN))
        h, w = img.shape[:2]
        grain = rng.normal(0.0, sigma, (h, w, 1)) + rng.normal(0.0, sigma / 2, (h, w, 3))
        img = np.clip(img + grain + 0.5, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".JPEG", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 BGR
        raise RuntimeError("cv2.imencode failed to encode a JPEG")
    return buf.tobytes(), out_h, out_w


def _read_marker(out: str) -> Optional[dict]:
    path = os.path.join(out, MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == _MARKER_FORMAT else None


def _prepare_out(out: str) -> None:
    """Create ``out``, or clear a previous sample set there; refuse any other non-empty folder."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out!r} exists and is not a folder; pass a folder path")
    if not os.path.isdir(out):
        os.makedirs(out)
        return
    entries = os.listdir(out)
    if not entries:
        return
    if _read_marker(out) is None:
        raise ForeignFolderError(
            f"refusing to write into {out!r}: it is not empty and is not a sample set made by "
            f"make_sample_imagenet (no valid {MARKER}); pass a new or empty folder, or delete "
            f"its contents first"
        )
    # A previous sample set (complete or interrupted): replace what this generator owns.
    for name in ("train", "val"):
        p = os.path.join(out, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)


def _check_counts(train_per_class: int, val_per_class: int, seed: int) -> None:
    for name, value, low in (("train_per_class", train_per_class, 1),
                             ("val_per_class", val_per_class, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


def _write_images(out: str, specs: List[ClassSpec], splits: List[Tuple[str, int, int, str]],
                  seed: int, imagenet_like: bool) -> Tuple[Dict[str, int], int]:
    """Render and write every image; (images per split, total JPEG bytes).

    `splits` holds (name, id in the seed, images per class, file name pattern)."""
    colour_of = {n: c for n, _, c, _ in _PHOTOS}
    photos: Dict[str, np.ndarray] = {}
    counts = {name: 0 for name, *_ in splits}
    total_bytes = 0
    for c, spec in enumerate(specs):
        name = spec["photo"]
        if name not in photos:
            photos[name] = _load_photo(name)
        base = _class_base(photos[name], colour_of[name], spec["variant"])
        for split, split_id, n, pattern in splits:
            d = os.path.join(out, split, spec["wnid"])
            os.makedirs(d, exist_ok=True)
            for k in range(1, n + 1):
                rng = np.random.default_rng([seed, split_id, c, k])
                data, _, _ = _render(base, rng, imagenet_like)
                # Not fsynced one by one: the set is regenerated byte for byte on a rerun.
                atomic_write(os.path.join(d, pattern.format(w=spec["wnid"], k=k)),
                             lambda f: f.write(data), durable=False)
                counts[split] += 1
                total_bytes += len(data)
    return counts, total_bytes


@dataclass
class SampleConfig:
    """tools/make_sample_imagenet.py's options (engine.cli derives its parser from these
    fields); the defaults of make_sample_imagenet() are theirs."""

    out: str = option(MISSING, "output folder", "--out")
    classes: int = option(10, lambda: "number of classes, 1..%d" % max_classes())
    train_per_class: int = option(100, "train images per class")
    val_per_class: int = option(20, "val images per class, 0 for no val/")
    seed: int = option(0, "random seed")
    imagenet_like: bool = option(False, "files with ImageNet's statistics (~100-110 KB mean, "
                                        "long side 450-500 px: high quality plus sensor-like "
                                        "grain) instead of the smooth ~35 KB default; use it for "
                                        "loader and packer figures")


def make_sample_imagenet(
    out: str,
    classes: int = SampleConfig.classes,
    train_per_class: int = SampleConfig.train_per_class,
    val_per_class: int = SampleConfig.val_per_class,
    seed: int = SampleConfig.seed,
    imagenet_like: bool = False,
) -> dict:
    """Write a small ImageNet-layout folder of real photos and return a summary.

    Layout: ``out/train/<wnid>/<wnid>_<k>.JPEG`` and ``out/val/<wnid>/<wnid>_val_<k>.JPEG``
    (k counts from 1), plus ``out/sample_imagenet.json`` describing the set. Each class is a
    different scikit-image photo (or, beyond the photos, a distinct transformed version of one);
    the samples of a class are random crops / flips / colour changes of it (see module doc).

    ``out`` must be missing, empty, or a previous sample set: a previous set's ``train/`` and
    ``val/`` are replaced (other files there are left alone); any other non-empty folder raises
    ForeignFolderError (a FileExistsError). Files are written atomically (temp name + rename),
    so a folder never holds a half-written JPEG under its final name.

    Args:
        out: the folder to write.
        classes: number of classes, 1 .. ``max_classes()`` (ConfigError otherwise).
        train_per_class: train images per class (>= 1).
        val_per_class: val images per class (>= 0; 0 writes no ``val/``).
        seed: the seed; the same arguments give byte-identical files.
        imagenet_like: files with ImageNet's statistics (~100-110 KB mean at a 450-500 px long
            side: high JPEG quality plus sensor-like grain) instead of the smooth ~35 KB ones;
            decode time follows the compressed bytes, so loader figures should be quoted on both.

    Returns:
        dict with ``out``, ``classes`` (WNIDs in label order), ``sources`` (WNID -> photo
        description), ``counts`` ({"train": n, "val": n}), ``bytes`` (total JPEG bytes),
        ``seconds``, ``seed``, ``train_per_class``, ``val_per_class``.
    """
    specs = class_specs(classes)
    _check_counts(train_per_class, val_per_class, seed)
    out = os.fspath(out)

    t0 = time.perf_counter()
    _prepare_out(out)
    wnids = sorted(s["wnid"] for s in specs)
    assert len(set(wnids)) == len(wnids), "duplicate WNID in the class table"
    summary = {
        "format": _MARKER_FORMAT,
        "version": 1,
        "complete": False,
        "out": os.path.abspath(out),
        "seed": int(seed),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "imagenet_like": bool(imagenet_like),
        "classes": wnids,
        "sources": {s["wnid"]: s["description"] for s in specs},
    }
    marker = os.path.join(out, MARKER)
    atomic_write(marker, lambda f: f.write(json.dumps(summary, indent=1).encode()))

    splits = [("train", 0, int(train_per_class), "{w}_{k}.JPEG")]
    if val_per_class > 0:
        splits.append(("val", 1, int(val_per_class), "{w}_val_{k}.JPEG"))
    counts, total_bytes = _write_images(out, specs, splits, int(seed), imagenet_like)

    summary.update(complete=True, counts=counts, bytes=total_bytes,
                   seconds=round(time.perf_counter() - t0, 3))
    # The marker file itself keeps no timing, so reruns leave it byte-identical too.
    on_disk = {k: v for k, v in summary.items() if k != "seconds"}
    atomic_write(marker, lambda f: f.write(json.dumps(on_disk, indent=1).encode()))
    result = {k: v for k, v in summary.items() if k not in ("format", "version", "complete")}
    return result
