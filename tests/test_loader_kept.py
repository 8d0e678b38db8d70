"""Kept batches: a batch is a read-only view into the loader's ring, valid until the next one is
requested. Keeping batches (list(loader)) warns once with the fix; copy=True hands out arrays of
their own; a write into the ring fails; converting each batch at once, as the trainer does, never
warns."""
import os
import time
import warnings

import numpy as np
import pytest

from helpers import make_imagenet
from engine.data import Loader
from engine.data.loader import KeptBatchWarning
from engine.data.pack import pack_imagenet


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = make_imagenet(str(tmp_path_factory.mktemp("kept") / "raw"), classes=3, train=8, val=2)
    out = str(tmp_path_factory.mktemp("kept") / "packed")
    pack_imagenet(root, out, workers=0, shard_size=10, progress=False, log=lambda s: None)
    return os.path.join(out, "train")


KW = dict(batch_size=4, train=True, image_size=32, seed=3)


def kept_warnings(record):
    return [w for w in record if issubclass(w.category, KeptBatchWarning)]


@pytest.mark.parametrize("workers", [0, 2])
def test_keeping_batches_warns_once_with_the_fix(split, workers):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Loader(split, workers=workers, **KW) as ld:
            batches = list(ld)
    assert len(batches) == len(ld) >= 3
    got = kept_warnings(record)
    assert len(got) == 1, [str(w.message) for w in record]
    text = str(got[0].message)
    assert "valid only until the next batch" in text and "copy=True" in text
    assert "np.array(images)" in text
    assert got[0].filename == __file__  # points at the caller's line


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_read_only_views(split, workers):
    with Loader(split, workers=workers, **KW) as ld:
        for images, labels in ld:
            with pytest.raises(ValueError, match="read-only"):
                images[0, 0, 0, 0] = 255
            with pytest.raises(ValueError, match="read-only"):
                labels[:] = 0
            with pytest.raises(ValueError):
                images.flags.writeable = True  # the ring underneath stays protected
            np.array(images)[0, 0, 0, 0] = 255  # a copy is the caller's to change
            break


@pytest.mark.parametrize("workers", [0, 2])
def test_copy_true_gives_batches_of_their_own_and_no_warning(split, workers):
    with Loader(split, workers=0, **KW) as ref:
        expected = [(np.array(x), np.array(y)) for x, y in ref]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Loader(split, workers=workers, copy=True, **KW) as ld:
            kept = list(ld)
    assert not kept_warnings(record)
    assert len(kept) == len(expected)
    for (x, y), (ex, ey) in zip(kept, expected):
        assert np.array_equal(x, ex) and np.array_equal(y, ey)
        assert x.flags.writeable and x.flags.owndata and y.flags.owndata


def test_kept_views_really_change_which_is_what_the_warning_is_about(split):
    with Loader(split, workers=0, **KW) as ref:
        expected = [np.array(y) for _, y in ref]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KeptBatchWarning)
        with Loader(split, workers=0, **KW) as ld:
            kept = [y for _, y in ld]
    assert not all(np.array_equal(a, b) for a, b in zip(kept, expected))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_trainers_way_never_warns(split, workers):
    """Converting each batch to tensors at once (trainer, evaluation), a loop variable left over
    from an earlier pass, breaking out and continuing: none of these is a kept batch."""
    import megengine as mge

    with Loader(split, workers=0, **KW) as ref:
        expected = [np.array(x) for x, _ in ref] + [np.array(x) for x, _ in ref]
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptBatchWarning)
        with Loader(split, workers=workers, **KW) as ld:
            tensors = []
            for images, labels in ld:
                tensors.append((mge.tensor(images), mge.tensor(labels)))
            for i, (images, labels) in enumerate(ld):  # `images` of the last pass still bound
                tensors.append((mge.tensor(images), mge.tensor(labels)))
                if i == 0:
                    break
            tensors += [(mge.tensor(x), mge.tensor(y)) for x, y in ld]
            stream = ld.stream(0)
            for _ in range(len(ld) + 1):
                images, labels = next(stream)
                mge.tensor(images)
    assert len(tensors) == len(expected)
    for (t, _), e in zip(tensors, expected):
        assert np.array_equal(t.numpy(), e)


def test_handing_out_costs_microseconds_not_a_copy(split):
    with Loader(split, workers=0, **KW) as ld:
        first = next(iter(ld))[0]
        assert first.base is not None and not first.flags.owndata  # a view
        del first
        from engine.data.worker import RingLayout

        layout = RingLayout(4, 256, 224)  # a real-size ring: 154 MB
        buf = layout.allocate()
        t0 = time.perf_counter()
        for i in range(2000):
            ld._hand_out(layout, buf, i % 4, 224, 256)
            ld._check_kept()
        per_batch = (time.perf_counter() - t0) / 2000
    # A copy of a 38 MB batch takes milliseconds; a hand-out is a few small objects.
    assert per_batch < 200e-6, per_batch
