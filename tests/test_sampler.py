"""Sampler: training shares are equal (padded), evaluation shares are exact (no duplicates)."""
import numpy as np
import pytest

from engine.data.sampler import Sampler


def shares(n, world, bs=7, **kw):
    return [Sampler(n, bs, rank=r, world_size=world, **kw) for r in range(world)]


@pytest.mark.parametrize("n, world", [(50000, 3), (50000, 7), (50000, 8), (14, 3), (5, 5),
                                      (3, 8), (1, 4)])
def test_eval_shares_are_exact_contiguous_and_balanced(n, world):
    ss = shares(n, world, shuffle=False, drop_last=False)
    idx = [s.indices(0) for s in ss]
    everything = np.concatenate(idx)
    assert len(everything) == n                        # 50,000 images count 50,000 times
    np.testing.assert_array_equal(everything, np.arange(n))  # disjoint, contiguous, in order
    sizes = [len(i) for i in idx]
    assert max(sizes) - min(sizes) <= 1
    for s, i in zip(ss, idx):
        batches = [s.batch(0, b) for b in range(len(s))]
        assert len(s) == -(-len(i) // 7)               # 0 batches for an empty share
        if batches:
            np.testing.assert_array_equal(np.concatenate(batches), i)


def test_eval_ranks_may_differ_in_batch_count():
    ss = shares(15, 4, bs=4, shuffle=False, drop_last=False)   # 3, 4, 4, 4 images
    assert [len(s.indices(0)) for s in ss] == [3, 4, 4, 4]
    ss = shares(17, 4, bs=2, shuffle=False, drop_last=False)   # 4, 4, 4, 5 images
    assert [len(s) for s in ss] == [2, 2, 2, 3]


def test_more_ranks_than_images():
    ss = shares(2, 5, shuffle=False, drop_last=False)
    assert [len(s) for s in ss] == [0, 0, 1, 0, 1]
    assert sorted(np.concatenate([s.indices(0) for s in ss]).tolist()) == [0, 1]
    with pytest.raises(IndexError):
        ss[0].batch(0, 0)  # a rank with no images has no batch 0


@pytest.mark.parametrize("n, world, drop", [(103, 4, True), (103, 4, False), (10, 3, False),
                                            (3, 8, False), (1, 4, False)])
def test_training_shares_are_equal_and_cover_everything(n, world, drop):
    ss = shares(n, world, bs=1 if n < world else 5, shuffle=True, seed=1, drop_last=drop)
    assert len({len(s) for s in ss}) == 1               # same batch count: no allreduce hang
    idx = [s.indices(3) for s in ss]
    assert len({len(i) for i in idx}) == 1
    assert set(np.concatenate(idx)) == set(range(n))


def test_explicit_pad_overrides_the_default():
    ss = shares(14, 3, shuffle=False, drop_last=False, pad=True)
    assert [len(s.indices(0)) for s in ss] == [5, 5, 5]  # 14 padded to 15
    assert [len(s.indices(0)) for s in shares(14, 3, shuffle=True, pad=False)] == [4, 5, 5]


def test_order_depends_only_on_seed_and_epoch():
    a = Sampler(100, 8, shuffle=True, seed=3).indices(2)
    b = Sampler(100, 8, shuffle=True, seed=3).indices(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, Sampler(100, 8, shuffle=True, seed=3).indices(1))
