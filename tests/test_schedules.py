"""LR schedules and progressive resolution: boundaries, continuity, warmup, FFCV's linear and
resolution rules, and the refusal of bad values."""
import math

import numpy as np
import pytest

from engine.errors import ConfigError
from engine.schedules import SCHEDULES, lr_at, resolution_at, step_milestones


def test_step_boundaries():
    kw = dict(base_lr=0.1, steps_per_epoch=10, epochs=90)
    assert [lr_at(s, **kw) for s in (0, 299, 300, 599, 600, 799, 800, 899)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4])


def test_linear_goes_straight_to_zero():
    kw = dict(base_lr=2.0, steps_per_epoch=10, epochs=10, schedule="linear")
    lrs = np.array([lr_at(s, **kw) for s in range(100)])
    assert lrs[0] == 2.0
    assert np.allclose(np.diff(lrs), -2.0 / 100)       # constant slope
    assert lrs[-1] == pytest.approx(2.0 / 100)          # reaches 0 at step 100 (after the run)
    assert lr_at(100, **kw) == 0.0 and lr_at(10_000, **kw) == 0.0


def test_linear_with_warmup_is_ffcvs_triangle():
    """FFCV: np.interp(epoch, [0, peak, epochs], [1e-4*lr, lr, 0]); ours starts at lr/warmup."""
    steps_per_epoch, epochs, peak, lr = 50, 16, 2, 1.7
    kw = dict(base_lr=lr, steps_per_epoch=steps_per_epoch, epochs=epochs, warmup_epochs=peak,
              schedule="linear")
    n, ramp = steps_per_epoch * epochs, peak * steps_per_epoch  # all steps, warmup steps
    ours = np.array([lr_at(s, **kw) for s in range(n)])
    ffcv = np.interp(np.arange(n) / steps_per_epoch, [0, peak, epochs], [1e-4 * lr, lr, 0])
    # Identical after the peak (the schedule is a line through (peak, lr) and (epochs, 0)) ...
    assert np.allclose(ours[ramp:], ffcv[ramp:])
    # ... and within one step's increment during the ramp (theirs starts at 1e-4 lr, ours at lr/100).
    assert np.max(np.abs(ours[:ramp] - ffcv[:ramp])) <= lr / ramp + 1e-9
    assert ours.max() == pytest.approx(lr)


def test_cosine_and_poly_values():
    kw = dict(base_lr=1.0, steps_per_epoch=10, epochs=10, warmup_epochs=1)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(55, schedule="cosine", **kw) == pytest.approx(0.5)
    # poly: (1 - t)^2 with t the fraction of the 90 post-warmup steps done
    for s in (10, 40, 55, 99):
        t = (s - 10) / 90
        assert lr_at(s, schedule="poly", **kw) == pytest.approx((1 - t) ** 2)
    # with an end lr, MLPerf's form (base - end) * (1 - t)^2 + end
    t = (55 - 10) / 90
    assert lr_at(55, schedule="poly", end_lr=1e-4, **kw) == pytest.approx(
        (1.0 - 1e-4) * (1 - t) ** 2 + 1e-4)
    assert lr_at(10_000, schedule="poly", end_lr=1e-4, **kw) == pytest.approx(1e-4)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_ramps_linearly_to_the_peak_and_is_continuous(schedule):
    kw = dict(base_lr=0.8, steps_per_epoch=20, epochs=30, warmup_epochs=2, schedule=schedule)
    lrs = np.array([lr_at(s, **kw) for s in range(600)])
    assert lrs[0] == pytest.approx(0.8 / 40)
    assert np.allclose(np.diff(lrs[:40]), 0.8 / 40)
    assert lrs[39] == pytest.approx(0.8) and lrs[40] == pytest.approx(0.8)
    assert np.all(lrs > 0)
    if schedule != "step":  # the decays are continuous: no jump bigger than a warmup increment
        assert np.max(np.abs(np.diff(lrs))) <= 0.8 / 40 + 1e-12
        assert np.all(np.diff(lrs[40:]) <= 1e-12)   # monotone after warmup


def test_bad_schedule_values_are_config_errors():
    kw = dict(base_lr=0.1, steps_per_epoch=10, epochs=10)
    with pytest.raises(ConfigError, match="step|cosine|linear|poly"):
        lr_at(0, schedule="onecycle", **kw)
    with pytest.raises(ConfigError):
        lr_at(0, warmup_epochs=11, **kw)
    with pytest.raises(ConfigError):
        lr_at(0, schedule="poly", end_lr=1.0, **kw)
    with pytest.raises(ValueError):  # ConfigError is a ValueError too
        lr_at(0, steps_per_epoch=0, base_lr=0.1, epochs=1)


# ------------------------------------------------------------------------ progressive resizing

def ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """ffcv-imagenet's train_imagenet.py get_resolution, as published."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


@pytest.mark.parametrize("start,end,epochs", [(11, 13, 16), (65, 76, 88), (0, 10, 12), (5, 5, 8)])
def test_resolution_equals_ffcvs_rule(start, end, epochs):
    for e in range(epochs + 2):
        assert resolution_at(e, 160, 192, start, end) == ffcv_get_resolution(e, 160, 192, end, start)


def test_resolution_boundaries_and_rounding():
    assert resolution_at(0, 128, 256, 4, 8) == 128
    assert resolution_at(4, 128, 256, 4, 8) == 128        # start_ramp itself is still start_res
    assert resolution_at(5, 128, 256, 4, 8) == 160        # 160 exactly
    assert resolution_at(6, 128, 256, 4, 8) == 192
    assert resolution_at(7, 128, 256, 4, 8) == 224
    assert resolution_at(8, 128, 256, 4, 8) == 256
    assert resolution_at(99, 128, 256, 4, 8) == 256
    sizes = [resolution_at(e, 128, 256, 4, 8) for e in range(12)]
    assert sizes == sorted(sizes)                         # never shrinks
    assert all(s % 32 == 0 for s in sizes)
    assert resolution_at(5, 160, 200, 4, 8, multiple=8) == 168   # 170 -> nearest multiple of 8


def test_resolution_bad_values():
    with pytest.raises(ConfigError):
        resolution_at(0, 192, 160, 1, 2)
    with pytest.raises(ConfigError):
        resolution_at(0, 160, 192, 3, 2)
    with pytest.raises(ConfigError):
        resolution_at(0, 160, 192, 1, 2, multiple=0)
