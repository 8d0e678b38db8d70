"""Golden values of the engine's randomness: the sample order and the train-time crop and flip.

These literals were computed once from the code (engine/data/sampler.py,
engine/data/transforms.py) and written here by hand, which is the point of golden values: the
other tests check properties (a permutation, a crop inside the image, ...) that a different
but valid random stream also satisfies, so a silent change of the RNG, of its seeding or of the
order of the draws would pass them and change every training run without anyone noticing. If a
change of randomness is intended, update these values in the same commit and say so in its
message (runs before and after it are then not comparable sample for sample).
"""
from engine.data.sampler import Sampler
from engine.data.transforms import random_resized_crop, sample_rng

# Sampler(num_samples=1000, batch_size=8, shuffle=True, seed=0).indices(0)[:16]
SAMPLER_SEED0_EPOCH0_FIRST16 = [459, 206, 222, 162, 711, 814, 350, 890,
                                518, 264, 683, 674, 511, 391, 329, 325]

# random_resized_crop(height=375, width=500, sample_rng(0, 0, i)) -> (x, y, w, h), then the
# loader's flip decision, rng.random() < 0.5, drawn from the same rng right after the crop.
CROP_500x375 = {
    0: ((207, 26, 170, 220), True),
    1: ((33, 92, 353, 265), False),
    2: ((123, 14, 350, 360), False),
    3: ((231, 162, 255, 201), True),
}


def test_sampler_order_seed0_epoch0():
    s = Sampler(num_samples=1000, batch_size=8, shuffle=True, seed=0)
    assert s.indices(0)[:16].tolist() == SAMPLER_SEED0_EPOCH0_FIRST16


def test_sampler_order_is_dealt_round_robin_to_ranks():
    """Rank r of 2 takes every other index of the same epoch order, starting at r."""
    ranks = [Sampler(num_samples=1000, batch_size=8, shuffle=True, seed=0, rank=r,
                     world_size=2).indices(0)[:8].tolist() for r in range(2)]
    assert ranks == [SAMPLER_SEED0_EPOCH0_FIRST16[0::2], SAMPLER_SEED0_EPOCH0_FIRST16[1::2]]


def test_crop_and_flip_of_sample_seed0_epoch0_index0():
    rng = sample_rng(0, 0, 0)
    box = random_resized_crop(375, 500, rng)
    flip = rng.random() < 0.5
    assert box == (207, 26, 170, 220)
    assert flip is True


def test_crop_and_flip_of_the_next_samples():
    """Indices 1-3 as well: both flip outcomes occur, and neighbouring indices differ."""
    for index, (box, flip) in CROP_500x375.items():
        rng = sample_rng(0, 0, index)
        assert random_resized_crop(375, 500, rng) == box, index
        assert (rng.random() < 0.5) is flip, index
