"""Mixup / CutMix on real photographs: numpy references for the pixels, targets that sum to 1,
CutMix lambda equal to the pasted area, determinism in (seed, step), traceability, and the
soft-target cross-entropy against MegEngine's label-smoothed cross_entropy."""
import numpy as np
import pytest

import megengine as mge
import megengine.functional as F
from megengine import jit

from engine.errors import ConfigError
from engine.mix import (cutmix_box, mix_images, mix_plan, mix_targets, smooth_one_hot,
                        soft_cross_entropy)

from helpers import crops

K = 7


def real_batch(n=6, h=40, w=56, seed=0):
    """Normalised float photos [n, 3, h, w] and labels."""
    imgs = np.stack(list(crops("chelsea", n // 2, seed, (h, w))) + list(crops("coffee", n - n // 2, seed, (h, w))))
    x = (imgs.transpose(0, 3, 1, 2).astype(np.float32) - 120.0) / 60.0
    labels = np.random.default_rng(seed).integers(0, K, n).astype(np.int32)
    return x, labels


def mix(x, labels, plan, label_smoothing=0.0):
    """A plan applied as the train step applies it (engine.steps): mixed pixels, soft targets."""
    perm = mge.tensor(plan.perm)
    imgs = mix_images(mge.tensor(x), perm, mge.tensor(plan.rows), mge.tensor(plan.cols))
    targets = mix_targets(mge.tensor(labels), K, mge.tensor(np.float32(plan.lam)), perm,
                          label_smoothing)
    return imgs, targets


def smoothed_np(labels, s):
    y = np.full((len(labels), K), s / K, np.float32)
    y[np.arange(len(labels)), labels] += 1 - s
    return y


def test_mixup_pixels_and_targets_equal_numpy():
    x, labels = real_batch()
    plan = mix_plan(6, 40, 56, step=3, seed=11, mixup_alpha=0.2, cutmix_alpha=0.0)
    imgs, targets = mix(x, labels, plan, label_smoothing=0.1)
    assert plan.kind == "mixup" and 0 < plan.lam < 1
    lam, perm = plan.lam, plan.perm
    assert sorted(perm) == list(range(6))
    np.testing.assert_allclose(imgs.numpy(), lam * x + (1 - lam) * x[perm], rtol=1e-5, atol=1e-5)
    y = smoothed_np(labels, 0.1)
    np.testing.assert_allclose(targets.numpy(), lam * y + (1 - lam) * y[perm], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(targets.numpy().sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("step", range(6))
def test_cutmix_box_area_matches_lambda(step):
    x, labels = real_batch(seed=step)
    plan = mix_plan(6, 40, 56, step=step, seed=5, mixup_alpha=0.0, cutmix_alpha=1.0)
    imgs, targets = mix(x, labels, plan, label_smoothing=0.0)
    assert plan.kind == "cutmix"
    y0, y1, x0, x1 = plan.box
    inside = np.zeros((40, 56), bool)
    inside[y0:y1, x0:x1] = True
    out, partner = imgs.numpy(), x[plan.perm]
    # pixels inside the box come from the partner, the rest are the original, exactly
    np.testing.assert_array_equal(out[:, :, inside], partner[:, :, inside])
    np.testing.assert_array_equal(out[:, :, ~inside], x[:, :, ~inside])
    # lambda is the original's share of the pixels (after clipping the box at the border)
    assert plan.lam == pytest.approx(1 - inside.sum() / inside.size)
    y = smoothed_np(labels, 0.0)
    np.testing.assert_allclose(targets.numpy(), plan.lam * y + (1 - plan.lam) * y[plan.perm],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(targets.numpy().sum(1), 1.0, rtol=1e-6)


def test_cutmix_box_is_clipped_at_the_border():
    """The box has side int(sqrt(1 - lam) * size) around a uniform centre, cut at the border, so
    near the edges it is smaller than asked; that is why lambda is recomputed from the area."""
    full, smaller = 0, 0
    for seed in range(100):
        y0, y1, x0, x1 = cutmix_box(0.5, 32, 32, np.random.default_rng(seed))
        assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 32
        area = (y1 - y0) * (x1 - x0)
        assert area <= 22 * 22                       # int(32 * sqrt(0.5)) = 22 per side
        full += area == 22 * 22
        smaller += area < 22 * 22
    assert full > 0 and smaller > 0


def test_same_seed_and_step_same_result_different_step_differs():
    x, labels = real_batch()
    kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0)
    a = mix(x, labels, mix_plan(6, 40, 56, step=42, seed=7, **kw), label_smoothing=0.1)
    b = mix(x, labels, mix_plan(6, 40, 56, step=42, seed=7, **kw), label_smoothing=0.1)
    c = mix(x, labels, mix_plan(6, 40, 56, step=43, seed=7, **kw), label_smoothing=0.1)
    d = mix(x, labels, mix_plan(6, 40, 56, step=42, seed=7, rank=1, **kw), label_smoothing=0.1)
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert not np.array_equal(a[1].numpy(), c[1].numpy())
    assert not np.array_equal(a[1].numpy(), d[1].numpy())


def test_switch_prob_picks_the_method():
    kinds = {mix_plan(4, 8, 8, step=s, seed=0, mixup_alpha=0.2, cutmix_alpha=1.0,
                      switch_prob=0.5).kind for s in range(40)}
    assert kinds == {"mixup", "cutmix"}
    assert {mix_plan(4, 8, 8, step=s, seed=0, mixup_alpha=0.2, cutmix_alpha=1.0,
                     switch_prob=1.0).kind for s in range(20)} == {"cutmix"}
    assert {mix_plan(4, 8, 8, step=s, seed=0, mixup_alpha=0.2, cutmix_alpha=1.0,
                     switch_prob=0.0).kind for s in range(20)} == {"mixup"}


def test_off_returns_images_and_smoothed_one_hot():
    x, labels = real_batch()
    plan = mix_plan(6, 40, 56, step=0, seed=0, mixup_alpha=0.0, cutmix_alpha=0.0)
    assert plan.kind == "none"
    imgs, targets = mix(x, labels, plan, label_smoothing=0.2)
    np.testing.assert_array_equal(imgs.numpy(), x)
    np.testing.assert_allclose(targets.numpy(), smoothed_np(labels, 0.2), rtol=1e-6)


def test_mixing_traces_as_one_graph_for_both_kinds():
    """Inside a traced step the same graph serves mixup and cutmix plans (no retrace)."""
    x, labels = real_batch()
    xt, lt = mge.tensor(x), mge.tensor(labels)

    def f(images, labels, perm, rows, cols, lam):
        return mix_images(images, perm, rows, cols), mix_targets(labels, K, lam, perm, 0.1)

    traced = jit.trace(f, symbolic=True)
    for step in range(6):
        plan = mix_plan(6, 40, 56, step=step, seed=3, mixup_alpha=0.2, cutmix_alpha=1.0)
        args = (mge.tensor(plan.perm), mge.tensor(plan.rows), mge.tensor(plan.cols),
                mge.tensor(np.float32(plan.lam)))
        got = traced(xt, lt, *args)
        want = f(xt, lt, *args)
        np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=1e-6, atol=1e-7)


def test_soft_cross_entropy_matches_megengine_label_smoothing_and_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, K)).astype(np.float32) * 3
    labels = rng.integers(0, K, 5).astype(np.int32)
    for s in (0.0, 0.1):
        ours = soft_cross_entropy(mge.tensor(logits), smooth_one_hot(mge.tensor(labels), K, s))
        ref = F.nn.cross_entropy(mge.tensor(logits), mge.tensor(labels), label_smooth=s)
        assert float(ours.item()) == pytest.approx(float(ref.item()), rel=1e-5)
    # mixed targets: numpy -sum(t * log_softmax)
    t = rng.dirichlet(np.ones(K), 5).astype(np.float32)
    log_p = logits - logits.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    want = -(t * log_p).sum(1).mean()
    assert float(soft_cross_entropy(mge.tensor(logits), mge.tensor(t)).item()) == pytest.approx(
        want, rel=1e-5)


def test_bad_values_are_config_errors():
    x, labels = real_batch()
    with pytest.raises(ConfigError):
        mix_plan(6, 40, 56, step=0, seed=0, mixup_alpha=-1, cutmix_alpha=0)
    with pytest.raises(ConfigError):
        mix_plan(6, 40, 56, step=0, seed=0, mixup_alpha=0.2, cutmix_alpha=0, switch_prob=2)
    plan = mix_plan(6, 40, 56, step=0, seed=0, mixup_alpha=0.2, cutmix_alpha=0.0)
    with pytest.raises(ConfigError):
        mix(x, labels, plan, label_smoothing=1.0)
    with pytest.raises(ConfigError):
        mix_plan(0, 40, 56, step=0, seed=0, mixup_alpha=0.2, cutmix_alpha=0.0)
