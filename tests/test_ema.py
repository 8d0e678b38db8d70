"""ModelEMA: equals a numpy EMA over real training steps (with and without warmup, eager and
traced), copies BN statistics, round-trips through state_dict, evaluates with its own step."""
import numpy as np
import pytest

import megengine as mge
import megengine.functional as F
import megengine.module as M
import megengine.optimizer as optim
from megengine.autodiff import GradManager

from engine.ema import ModelEMA, ema_decay_at
from engine.errors import ConfigError


class Tiny(M.Module):
    def __init__(self):
        super().__init__()
        self.conv = M.Conv2d(3, 4, 3, padding=1)
        self.bn = M.BatchNorm2d(4)
        self.fc = M.Linear(4, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(F.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make(seed=0):
    mge.random.seed(seed)
    model = Tiny()
    gm = GradManager().attach(model.parameters())
    opt = optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    return model, gm, opt


def train_step(model, gm, opt, rng):
    x = mge.tensor(rng.standard_normal((4, 3, 8, 8)).astype("float32"))
    y = mge.tensor(rng.integers(0, 5, 4).astype("int32"))
    with gm:
        loss = F.nn.cross_entropy(model(x), y)
        gm.backward(loss)
    opt.step().clear_grad()


def snapshot(model):
    return {k: v.numpy().copy() for k, v in model.named_parameters()}


def test_decay_warmup_formula():
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(10, 0.9999) == pytest.approx(11 / 20)
    assert ema_decay_at(10**6, 0.9999) == 0.9999
    assert ema_decay_at(0, 0.9999, warmup=False) == 0.9999


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("trace", [False, True])
def test_ema_equals_numpy_reference(warmup, trace):
    model, gm, opt = make()
    ema = ModelEMA(model, decay=0.8, warmup=warmup, trace=trace)
    ref = snapshot(model)
    rng = np.random.default_rng(1)
    for t in range(5):
        train_step(model, gm, opt, rng)
        d = ema.update(model)
        expected_d = min(0.8, (1 + t) / (10 + t)) if warmup else 0.8
        assert d == pytest.approx(expected_d)
        live = snapshot(model)
        for k in ref:
            ref[k] = np.float32(d) * ref[k] + np.float32(1 - d) * live[k]
    got = snapshot(ema.module)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
        assert not np.allclose(got[k], snapshot(model)[k])  # it really lags the live weights
    # buffers (BN running stats) are copies of the live model's, not averages
    live_buffers = dict(model.named_buffers())
    for k, v in ema.module.named_buffers():
        np.testing.assert_array_equal(v.numpy(), live_buffers[k].numpy())
    assert not np.allclose(live_buffers["bn.running_var"].numpy(), 1.0)  # stats did move
    assert ema.updates == 5


def test_state_dict_round_trip_and_continues_identically():
    model, gm, opt = make()
    a = ModelEMA(model, decay=0.9, trace=True)
    rng = np.random.default_rng(2)
    for _ in range(3):
        train_step(model, gm, opt, rng)
        a.update(model)
    state = a.state_dict()
    assert state["updates"] == 3 and state["decay"] == 0.9 and state["warmup"] is True
    assert all(isinstance(v, np.ndarray) for v in state["state_dict"].values())

    b = ModelEMA(model, decay=0.5, warmup=False, trace=True)
    b.update(model)            # bind the traced update before loading: it must follow the load
    b.load_state_dict(state)
    assert (b.decay, b.warmup, b.updates) == (0.9, True, 3)
    for k, v in snapshot(b.module).items():
        np.testing.assert_array_equal(v, snapshot(a.module)[k])
    train_step(model, gm, opt, rng)
    assert a.update(model) == b.update(model) == pytest.approx(4 / 13)
    for k, v in snapshot(b.module).items():
        np.testing.assert_allclose(v, snapshot(a.module)[k], rtol=1e-6, atol=1e-7)


def test_ema_module_is_separate_and_in_eval_mode():
    model, gm, opt = make()
    ema = ModelEMA(model)
    assert not ema.module.training and model.training
    live = dict(model.named_parameters())
    assert all(p is not live[k] for k, p in ema.module.named_parameters())
    # the EMA copy evaluates with its own traced step, independent of the live model's
    from engine.steps import EvalStep
    step = EvalStep(ema.module, num_classes=5, trace=True)
    images = mge.tensor(np.random.default_rng(3).integers(0, 255, (2, 3, 8, 8)).astype("uint8"))
    labels = mge.tensor(np.array([0, 1], dtype="int32"))
    first = step(images, labels).numpy()
    train_step(model, gm, opt, np.random.default_rng(4))
    ema.update(model)
    assert not np.allclose(step(images, labels).numpy(), first)  # eval sees the updated EMA


def test_bad_values():
    model, _, _ = make()
    with pytest.raises(ConfigError):
        ModelEMA(model, decay=1.0)
    ema = ModelEMA(model)
    with pytest.raises(ConfigError):
        ema.load_state_dict({"decay": 0.9})
    with pytest.raises(ConfigError):
        ema.update(M.Linear(2, 2))
