"""The architectures as data: block type, blocks per stage, groups and width per group.

engine.models.resnet builds networks from it; engine.models.weights reads it to name what a
checkpoint holds. Kept apart so that neither of those modules needs the other's code.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

__all__ = ["Spec", "SPECS", "ARCHS"]


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

#: Every architecture name accepted by :func:`get_model`, in a stable order.
ARCHS: Tuple[str, ...] = tuple(SPECS)
