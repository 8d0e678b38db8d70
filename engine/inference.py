"""Single-image inference: what tools/inference.py runs (the official inference.py's job).

The image goes through the Loader's own val transform (engine.data.transforms.ValTransform), at
the crop size and resize ratio an engine checkpoint's run evaluated with (as tools/test.py), so a
prediction sees exactly the pixels an evaluation of the same file would. MegEngine is imported
by `predict`, so that building the tool's parser (InferenceConfig) does not import it.
"""
from __future__ import annotations

import os
from dataclasses import MISSING, dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

import cv2
import numpy as np

from engine import cli
from engine.cli import option
from engine.config import eval_transform
from engine.data.transforms import ValTransform
from engine.errors import UserError
from engine.imagenet_classes import imagenet_names, imagenet_wnids

if TYPE_CHECKING:
    from engine.models import LoadedModel

__all__ = ["InferenceConfig", "read_image", "resize_center_crop", "preprocess", "class_names",
           "predict", "format_prediction"]


def read_image(path: str) -> np.ndarray:
    """cv2 BGR decode, as the official inference.py; a missing or undecodable file is a UserError."""
    if not os.path.isfile(path):
        raise UserError("--image: no such file: %s" % path)
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise UserError("--image: cannot decode %s (not an image OpenCV can read)" % path)
    return img


def resize_center_crop(img: np.ndarray, image_size: int = 224,
                       crop_ratio: float = 0.875) -> np.ndarray:
    """The official val transform, as uint8: short side to round(size / crop_ratio) (256 for
    224), center crop; returns [1, 3, size, size]. Normalization happens in the step on the
    device.

    Same arithmetic as megengine.data.transform.Resize / CenterCrop (long side truncated, crop
    offset rounded) via engine.data.transforms, so it matches the official inference.py and
    the Loader's val path.
    """
    img = ValTransform(crop_ratio).crop(img, image_size)  # the Loader's val path, same arithmetic
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])


def preprocess(path: str, image_size: int = 224) -> np.ndarray:
    """read_image + resize_center_crop."""
    return resize_center_crop(read_image(path), image_size)


def class_names(loaded: "LoadedModel") -> List[str]:
    """ImageNet names for 1000-class ImageNet models, else the checkpoint's class list."""
    if loaded.num_classes == 1000 and (loaded.classes is None or loaded.classes == imagenet_wnids()):
        return imagenet_names()
    if loaded.classes is not None:
        # A subset of ImageNet (e.g. the sample set): show the WNIDs' ImageNet names.
        known = dict(zip(imagenet_wnids(), imagenet_names()))
        return [known.get(c, c) for c in loaded.classes]
    return ["class_%d" % i for i in range(loaded.num_classes)]


@dataclass
class InferenceConfig:
    """tools/inference.py's options (engine.cli derives its parser from these fields)."""

    image: str = option(MISSING, "image file (anything OpenCV reads)", "-i", "--image")
    arch: Optional[str] = cli.model_arch_option()
    model: Optional[str] = cli.model_option()
    ema: bool = option(False, "use an engine checkpoint's moving average of the weights (a run "
                              "with --ema-decay) instead of its live weights")
    trust_pickle: bool = cli.trust_pickle_option()
    topk: int = option(5, "how many classes to print")
    image_size: Optional[int] = cli.eval_size_option()


def predict(arch: Optional[str], model: Optional[str], image: str,
            topk: int = InferenceConfig.topk, image_size: Optional[int] = None,
            trusted: Optional[bool] = None, ema: bool = False) -> List[Tuple[int, str, float]]:
    """Top-k (class index, name, probability) for one image, most probable first.

    arch None = the one an engine checkpoint records, else resnet18; image_size None = the size
    an engine checkpoint's run evaluated at (also its resize ratio), else 224; ema = the
    checkpoint's moving average of the weights.
    """
    import megengine as mge

    from engine.models import load_model
    from engine.steps import PredictStep

    if topk < 1:
        raise UserError("--topk must be >= 1")
    img = read_image(image)  # a bad path fails before the (slow) model load
    loaded = load_model(arch, model, trusted=trusted, ema=ema)
    run_size, ratio = eval_transform(loaded.config)
    batch = resize_center_crop(img, image_size or run_size, ratio)
    probs = PredictStep(loaded.model)(mge.tensor(batch)).numpy()[0]
    names = class_names(loaded)
    order = np.argsort(-probs, kind="stable")[: min(topk, len(probs))]
    return [(int(i), names[i], float(probs[i])) for i in order]


def format_prediction(rank: int, name: str, prob: float) -> str:
    """The official inference.py line."""
    return "{}: class = {:20s} with probability = {:4.1f} %".format(rank, name, 100 * prob)
