"""The architectures as data (block type, blocks per stage, groups and width per group), and
the input every model here expects (BGR pixels normalized by :data:`MEAN_BGR` and :data:`STD_BGR`).

engine.models.resnet builds networks from it; engine.models.weights reads it to name what a
checkpoint holds; the train, eval and predict steps normalize with it. Kept apart, and free of
MegEngine, so that none of those modules needs another's code.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

__all__ = ["Spec", "SPECS", "ARCHS", "MEAN_BGR", "STD_BGR"]

#: Per-channel mean and std, BGR order, on the 0..255 scale: the values MegEngine's published
#: ResNet weights were trained with (the loader yields uint8 BGR; the step normalizes on device).
MEAN_BGR: Tuple[float, float, float] = (103.530, 116.280, 123.675)
STD_BGR: Tuple[float, float, float] = (57.375, 57.120, 58.395)


class Spec(NamedTuple):
    block: str  # "BasicBlock" or "Bottleneck"
    layers: Tuple[int, int, int, int]
    groups: int
    width_per_group: int


#: Each architecture's definition.
SPECS: Dict[str, Spec] = {
    "resnet18": Spec("BasicBlock", (2, 2, 2, 2), 1, 64),
    "resnet34": Spec("BasicBlock", (3, 4, 6, 3), 1, 64),
    "resnet50": Spec("Bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": Spec("Bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": Spec("Bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": Spec("Bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": Spec("Bottleneck", (3, 4, 23, 3), 32, 8),
    # torchvision's definition: the bottleneck is twice as wide, the block outputs are not.
    "wide_resnet50_2": Spec("Bottleneck", (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": Spec("Bottleneck", (3, 4, 23, 3), 1, 128),
}

#: Every architecture name accepted by :func:`get_model`, in a stable order: the one list of
#: them (engine.models, its constructors and hubconf.py follow it).
ARCHS: Tuple[str, ...] = tuple(SPECS)
