"""Image-label pairing, checked on the pixels themselves.

Every image of the tiny data set below is one flat colour, unique to that image, from a grid of
well-separated colours. A flat image stays flat through JPEG, RandomResizedCrop (any scale),
DCT scaling, resize and flip, so the colour of a yielded image names the file it came from, and
that file's class is the label the loader must yield next to it. This catches what label-only
or pixel-only tests cannot: an image paired with a neighbour's label, a slot holding a stale or
half-written batch, a sample read twice or never, whatever the worker count, rank or epoch.
"""
import itertools
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pytest

from engine.data import Loader
from engine.data.pack import pack_imagenet

CLASSES = 3
TRAIN_PER_CLASS = 8   # 24 train images: 12 per rank at world_size 2, 3 full batches of 4
VAL_PER_CLASS = 3
BATCH = 4
SIZE = 32
EPOCHS = 3
# Channel levels 50 apart, away from 0 and 255 so that no channel clips in the YCbCr round trip;
# JPEG moves a flat colour by a few levels at most, far below the 25 needed to be mistaken.
LEVELS = (20, 70, 120, 170, 220)
GRID = np.array(list(itertools.product(LEVELS, repeat=3)), np.float64)  # 125 BGR colours
SHAPES = ((90, 120), (120, 90), (100, 100), (75, 140), (140, 75))  # (h, w), crops vary


def make_coloured_imagenet(root: str) -> Dict[int, int]:
    """root/{train,val}/<wnid>/*.JPEG, each image flat in its own GRID colour.

    Returns {colour id: label}; label c is the c-th wnid in sorted order, as the loader
    assigns it."""
    label_of: Dict[int, int] = {}
    # Spread the ids over the grid so that consecutive files are far apart in colour.
    ids = iter(np.random.default_rng(0).permutation(len(GRID)).tolist())
    n = 0
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            wnid = "n%08d" % (c + 1)
            folder = os.path.join(root, split, wnid)
            os.makedirs(folder, exist_ok=True)
            for k in range(per_class):
                cid = next(ids)
                h, w = SHAPES[n % len(SHAPES)]
                n += 1
                img = np.empty((h, w, 3), np.uint8)
                img[:] = GRID[cid].astype(np.uint8)
                ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
                assert ok
                with open(os.path.join(folder, "%s_%d.JPEG" % (wnid, k)), "wb") as f:
                    f.write(buf.tobytes())
                label_of[cid] = c
    return label_of


def colour_ids(images: np.ndarray) -> List[int]:
    """The GRID colour id of each uint8 [N,3,H,W] BGR image; fails on a non-flat image."""
    out = []
    for img in images:
        pixels = img.reshape(3, -1).T.astype(np.float64)
        spread = np.abs(pixels - pixels.mean(0)).max()
        # A flat source stays flat; a spread means two images were mixed in one slot.
        assert spread <= 8, "image is not flat (max deviation %.0f levels)" % spread
        d = np.abs(GRID - pixels.mean(0)).max(1)
        cid = int(d.argmin())
        assert d[cid] <= 12, "colour %s is on no grid point" % pixels.mean(0).round()
        out.append(cid)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Tuple[str, str, Dict[int, int]]:
    root = str(tmp_path_factory.mktemp("pairing"))
    raw = os.path.join(root, "raw")
    label_of = make_coloured_imagenet(raw)
    packed = os.path.join(root, "packed")
    # Small shards: global indices span several shard files, as on ImageNet.
    pack_imagenet(raw, packed, workers=1, shard_size=5, progress=False, log=lambda *a: None)
    return raw, packed, label_of


def split_ids(label_of: Dict[int, int], split: str) -> List[int]:
    """Colour ids of a split, in the order make_coloured_imagenet wrote them."""
    n_train = CLASSES * TRAIN_PER_CLASS
    ids = list(label_of)  # insertion order: train first, then val
    return ids[:n_train] if split == "train" else ids[n_train:]


def check_batch(images: np.ndarray, labels: np.ndarray, label_of: Dict[int, int]) -> List[int]:
    assert images.dtype == np.uint8 and images.shape[1:] == (3, SIZE, SIZE)
    assert labels.dtype == np.int32 and len(labels) == len(images)
    ids = colour_ids(images)
    got = labels.tolist()
    want = [label_of[i] for i in ids]
    assert got == want, "labels %s yielded with images of classes %s" % (got, want)
    return ids


@pytest.mark.parametrize("source", ["packed", "raw"])
@pytest.mark.parametrize("workers", [0, 2])
def test_train_pairs_every_image_with_its_label(data, source, workers):
    raw, packed, label_of = data
    split = os.path.join(packed if source == "packed" else raw, "train")
    train_ids = split_ids(label_of, "train")
    loaders = [Loader(split, batch_size=BATCH, train=True, image_size=SIZE, workers=workers,
                      seed=3, rank=r, world_size=2) for r in range(2)]
    try:
        orders = []
        for epoch in range(EPOCHS):
            seen: List[int] = []
            for ld in loaders:
                assert ld.epoch == epoch
                for images, labels in ld:
                    seen += check_batch(images, labels, label_of)
            # The two ranks' shares are disjoint and together the whole split, once each.
            assert sorted(seen) == sorted(train_ids), "epoch %d" % epoch
            orders.append(seen)
        assert orders[0] != orders[1]  # reshuffled every epoch
    finally:
        for ld in loaders:
            ld.close()


@pytest.mark.parametrize("source", ["packed", "raw"])
def test_train_order_does_not_depend_on_workers(data, source):
    """The same (seed, epoch, rank) yields the same files with 0 or 2 workers. (Packed and raw
    orders differ: the packer shuffles the train records once, so index i is another file.)"""
    raw, packed, label_of = data

    def ids(split: str, workers: int) -> List[int]:
        with Loader(os.path.join(split, "train"), batch_size=BATCH, train=True, image_size=SIZE,
                    workers=workers, seed=5, rank=1, world_size=2) as ld:
            return [i for images, labels in ld for i in check_batch(images, labels, label_of)]

    root = packed if source == "packed" else raw
    reference = ids(root, 0)
    assert len(reference) == CLASSES * TRAIN_PER_CLASS // 2
    assert ids(root, 2) == reference


@pytest.mark.parametrize("source", ["packed", "raw"])
@pytest.mark.parametrize("workers", [0, 2])
def test_val_pairs_every_image_in_record_order(data, source, workers):
    raw, packed, label_of = data
    split = os.path.join(packed if source == "packed" else raw, "val")
    seen: List[int] = []
    for rank in range(2):  # exact split: rank 0 takes the first half, rank 1 the rest
        with Loader(split, batch_size=BATCH, train=False, image_size=SIZE, workers=workers,
                    rank=rank, world_size=2) as ld:
            for images, labels in ld:
                seen += check_batch(images, labels, label_of)
    # Record order is sorted class folders, then sorted file names: the order written above.
    assert seen == split_ids(label_of, "val")
