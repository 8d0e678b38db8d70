"""engine.steps on CPU: what a step leaves behind. A skipped AMP step leaves no BN statistics of
its overflowing forward pass; the EMA folded into the step equals the EMA as a graph of its
own; the fail-early probe at the largest size changes no weight, statistic, optimizer or EMA
state (a run with it equals a run without); and the trainer probes before its first step."""
import dataclasses

import megengine as mge
import megengine.functional as F
import megengine.module as M
import megengine.optimizer as optim
import numpy as np
import pytest
from helpers import make_imagenet
from megengine.autodiff import GradManager

from engine import steps
from engine.config import TrainConfig
from engine.ema import ModelEMA
from engine.errors import UserError
from engine.steps import EvalStep, TrainStep


class Tiny(M.Module):
    def __init__(self):
        super().__init__()
        self.conv = M.Conv2d(3, 4, 3, padding=1)
        self.bn = M.BatchNorm2d(4)
        self.fc = M.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.mean(F.relu(self.bn(self.conv(x))), axis=[2, 3]))


def _state(net, opt=None, ema=None):
    """Every number a step may change: weights and BN buffers, momentum, the EMA."""
    out = {k: np.array(v) for k, v in net.state_dict().items()}
    if opt is not None:
        for i, (k, v) in enumerate(sorted(opt.state_dict()["state"].items())):
            for name, t in sorted(v.items()):
                out["opt/%s/%s" % (k, name)] = np.array(t)
    if ema is not None:
        out.update({"ema/" + k: np.array(v) for k, v in ema.module.state_dict().items()})
        out["ema/updates"] = np.array(ema.updates)
    return out


def _assert_same(a, b, exact=True):
    assert sorted(a) == sorted(b)
    for k in a:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _batches(n=4, size=8, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (2, 3, size, size), dtype=np.uint8),
             np.array([0, 2], np.int32)) for _ in range(n)]


def _tiny_step(trace, amp=False, ema_decay=None, seed=0, **kw):
    mge.random.seed(seed)
    net = Tiny()
    net.train()
    gm = GradManager().attach(net.parameters())
    opt = optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ema = ModelEMA(net, ema_decay, trace=trace) if ema_decay else None
    return net, opt, ema, TrainStep(net, gm, opt, trace=trace, amp=amp, ema=ema, **kw)


# ---------------------------------------------------------------- a skipped AMP step

@pytest.mark.parametrize("trace", [False, True])
def test_a_skipped_amp_step_keeps_no_bn_statistics_of_its_forward(trace):
    """Before: the update was skipped but the running mean/var of the overflowing forward pass
    stayed (on a real overflow, statistics of a batch the model never trained on)."""
    net, opt, _, step = _tiny_step(trace, amp=True)
    xs = _batches()
    step(mge.tensor(xs[0][0]), mge.tensor(xs[0][1]))  # a normal step: statistics move
    assert not step.last_step_skipped
    before = _state(net, opt)
    step.scaler.scale_factor = 1e38  # the float16 gradients overflow
    step(mge.tensor(xs[1][0]), mge.tensor(xs[1][1]))
    assert step.last_step_skipped
    _assert_same(_state(net, opt), before)
    # and the next clean step moves them again, from where they were
    step.scaler.scale_factor = 16.0
    step(mge.tensor(xs[2][0]), mge.tensor(xs[2][1]))
    assert not step.last_step_skipped
    assert not np.array_equal(net.bn.running_mean.numpy(), before["bn.running_mean"])


# -------------------------------------------------------------------------- the EMA

@pytest.mark.parametrize("trace", [False, True])
def test_the_ema_folded_into_the_step_equals_the_ema_on_its_own(trace):
    xs = _batches(4)
    net_a, opt_a, ema_a, step_a = _tiny_step(trace, ema_decay=0.9)
    net_b, opt_b, ema_b, _ = _tiny_step(trace, ema_decay=0.9)
    step_b = TrainStep(net_b, GradManager().attach(net_b.parameters()), opt_b, trace=trace)
    for x, y in xs:
        step_a(mge.tensor(x), mge.tensor(y))
        step_b(mge.tensor(x), mge.tensor(y))
        ema_b.update(net_b)
    assert ema_a.updates == ema_b.updates == 4
    _assert_same(_state(net_a, opt_a, ema_a), _state(net_b, opt_b, ema_b), exact=False)
    # the average really moved away from both the start and the live weights
    w = ema_a.module.fc.weight.numpy()
    assert not np.allclose(w, net_a.fc.weight.numpy())


@pytest.mark.parametrize("trace", [False, True])
def test_a_skipped_amp_step_skips_the_folded_ema_too(trace):
    net, opt, ema, step = _tiny_step(trace, amp=True, ema_decay=0.9)
    xs = _batches(2)
    step(mge.tensor(xs[0][0]), mge.tensor(xs[0][1]))
    assert ema.updates == 1
    before = _state(net, opt, ema)
    step.scaler.scale_factor = 1e38
    step(mge.tensor(xs[1][0]), mge.tensor(xs[1][1]))
    assert step.last_step_skipped and ema.updates == 1
    _assert_same(_state(net, opt, ema), before)


# ------------------------------------------------------------------------- the probe

@pytest.mark.parametrize("trace, amp, mix, ema_decay", [
    (False, False, False, None),
    (True, False, False, 0.9),
    (True, False, True, None),
    (True, True, False, 0.9),
])
def test_a_run_with_the_probe_equals_a_run_without(trace, amp, mix, ema_decay):
    xs = _batches(3)
    kw = dict(mix=True, num_classes=3) if mix else {}

    def run(probe):
        net, opt, ema, step = _tiny_step(trace, amp=amp, ema_decay=ema_decay, **kw)
        if probe:
            start = _state(net, opt, ema)
            step.probe(4, 16)  # a larger batch and size than the run's
            _assert_same(_state(net, opt, ema), start)
            assert all(p.grad is None for p in net.parameters())
        losses = []
        for x, y in xs:
            extra = ((mge.tensor(np.array([1, 0], np.int32)), mge.tensor(np.ones(8, np.float32)),
                      mge.tensor(np.ones(8, np.float32)), mge.tensor(np.float32(0.5)))
                     if mix else None)
            losses.append(float(step(mge.tensor(x), mge.tensor(y), extra).item()))
        return losses, _state(net, opt, ema)

    with_probe, without = run(True), run(False)
    assert with_probe[0] == without[0]
    _assert_same(with_probe[1], without[1])


def test_the_probe_of_a_resnet_changes_nothing():
    """ResNet-18 (53 BN buffers), traced: probed at 64 px, then trained at 32 px."""
    from engine.models import get_model

    rng = np.random.default_rng(0)
    xs = [(rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), np.array([0, 1], np.int32))
          for _ in range(2)]

    def run(probe):
        mge.random.seed(0)
        net = get_model("resnet18", num_classes=3)
        net.train()
        opt = optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        step = TrainStep(net, GradManager().attach(net.parameters()), opt, trace=True)
        evals = [(net, EvalStep(net, num_classes=3, trace=True))]
        if probe:
            note = steps.fail_early(step, evals, batch_size=2, train_size=64, eval_size=48)
            assert "forward and backward at 64 px" in note and "eval batch(es) at 48 px" in note
            assert net.training
        for x, y in xs:
            step(mge.tensor(x), mge.tensor(y))
        return _state(net, opt)

    _assert_same(run(True), run(False))


def test_an_out_of_memory_in_the_probe_is_one_line_saying_what_to_change():
    class Full(TrainStep):
        def probe(self, batch_size, size):
            raise RuntimeError("MegBrain core throws exception: out of memory\n  at ...")

    net = Tiny()
    opt = optim.SGD(net.parameters(), lr=0.1)
    step = Full(net, GradManager().attach(net.parameters()), opt, trace=False)
    with pytest.raises(UserError) as info:
        steps.fail_early(step, [], batch_size=256, train_size=288, eval_size=None)
    text = str(info.value)
    assert "a training step at 288 px with 256 images per GPU does not fit" in text
    assert "--batch-size" in text and "\n" not in text

    class Bug(TrainStep):
        def probe(self, batch_size, size):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        steps.fail_early(Bug(net, GradManager().attach(net.parameters()), opt, trace=False), [],
                         batch_size=2, train_size=64, eval_size=None)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagenet(str(tmp_path_factory.mktemp("d") / "inet"), classes=3, train=6, val=2)


def test_the_trainer_probes_the_largest_sizes_before_the_first_step(data_root, tmp_path, capfd):
    """Progressive resizing from 32 px to 64 px, reached only at epoch 9: before, the first
    64 px step ran there; now it runs before step 1 (and the eval size with it)."""
    from engine.trainer import train

    cfg = TrainConfig(data=data_root, batch_size=4, workers=0, save_dir=str(tmp_path / "p"),
                      print_freq=1, progress=False, epochs=10, max_steps=1, min_res=32,
                      max_res=64, start_ramp=1, end_ramp=9, val_image_size=48, trace=False)
    assert cfg.finalized().train_size_at(0) == 32
    train(cfg)
    err = capfd.readouterr().err
    assert "fail-early check: one forward and backward at 64 px and 1 eval batch(es) at 48 px" \
        in err


def test_a_rank_other_than_0_copies_no_state_to_the_host_at_a_save(data_root, tmp_path,
                                                                  monkeypatch):
    """Only rank 0 writes the checkpoint, so only rank 0 may pay for the device-to-host copy of
    the weights and optimizer state (the loop as rank 1 of 2, communication stubbed out)."""
    import megengine.module as M
    import megengine.optimizer as optim

    from engine import dist
    from engine.trainer import train

    copies = []
    real_module, real_opt = M.Module.state_dict, optim.Optimizer.state_dict
    monkeypatch.setattr(M.Module, "state_dict",
                        lambda self, *a, **k: copies.append("model") or real_module(self, *a, **k))
    monkeypatch.setattr(optim.Optimizer, "state_dict",
                        lambda self, *a, **k: copies.append("opt") or real_opt(self, *a, **k))
    for name, value in (("get_rank", lambda: 1), ("get_world_size", lambda: 2),
                        ("allreduce_callback", lambda: None),
                        ("broadcast_module", lambda module: None),
                        ("broadcast_buffers", lambda module: None),
                        ("all_reduce_sum", lambda v: np.asarray(v, np.float64))):
        monkeypatch.setattr(dist, name, value)
    cfg = TrainConfig(data=data_root, batch_size=2, image_size=32, workers=0, trace=False,
                      save_dir=str(tmp_path / "r1"), print_freq=1, progress=False, epochs=1,
                      max_steps=2, save_every=1, evaluate=False)
    assert train(cfg).checkpoint is None
    assert copies == []
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    train(dataclasses.replace(cfg, save_dir=str(tmp_path / "r0")))
    assert "model" in copies and copies.count("opt") == 2  # the saves at steps 1 and 2
