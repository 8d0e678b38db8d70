"""Parameter groups (no weight decay on norms and biases, found by module type) and LARS:
numpy reference for the update, zero-norm guard, traced == eager with a changing lr, and
state_dict round trips."""
import numpy as np
import pytest

import megengine as mge
import megengine.functional as F
import megengine.module as M
from megengine import jit
from megengine.autodiff import GradManager

from engine.errors import ConfigError
from engine.optim import LARS, no_decay_parameters, param_groups


# ------------------------------------------------------------------------------ param groups

def test_resnet50_exclusion_list_is_exactly_bn_and_biases():
    from engine.models import resnet50
    model = resnet50()
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(names) == 161
    excluded = sorted(names[id(p)] for p in no_decay_parameters(model))
    # Independent of the implementation: by the official layout's names, the BN layers are
    # bn1/bn2/bn3 and downsample.1, and the only bias outside BN is fc.bias (convs have none).
    expected = sorted(n for n in names.values()
                      if ".bn" in "." + n or "downsample.1." in n or n == "fc.bias")
    assert excluded == expected
    # 53 BN layers (1 stem + 16 blocks x 3 + 4 downsample) x (weight, bias) + fc.bias
    assert len(excluded) == 53 * 2 + 1 == 107

    groups = param_groups(model, 5e-5, no_wd_norm_bias=True)
    assert [len(g["params"]) for g in groups] == [54, 107]   # 53 conv weights + fc.weight
    assert [g["weight_decay"] for g in groups] == [5e-5, 0.0]
    assert [g["lars_exclude"] for g in groups] == [False, True]
    decayed = {names[id(p)] for p in groups[0]["params"]}
    assert all(n.endswith("conv1.weight") or n.endswith("conv2.weight") or n.endswith("conv3.weight")
               or "downsample.0." in n or n == "fc.weight" for n in decayed)


def test_without_flag_one_group_in_model_order():
    from engine.models import resnet18
    model = resnet18(num_classes=10)
    groups = param_groups(model, 1e-4, no_wd_norm_bias=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.parameters()]
    with pytest.raises(ConfigError):
        param_groups(model, -1.0, True)


class Net(M.Module):
    """Conv with bias, BN, LayerNorm, Linear: every kind of exempt parameter."""

    def __init__(self):
        super().__init__()
        self.conv = M.Conv2d(3, 4, 3, padding=1, bias=True)
        self.bn = M.BatchNorm2d(4)
        self.ln = M.LayerNorm(4)
        self.fc = M.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.ln(x))


def test_norm_types_and_all_biases_are_found():
    net = Net()
    names = {id(p): n for n, p in net.named_parameters()}
    got = sorted(names[id(p)] for p in no_decay_parameters(net))
    assert got == ["bn.bias", "bn.weight", "conv.bias", "fc.bias", "ln.bias", "ln.weight"]


# ------------------------------------------------------------------------------------- LARS

def lars_numpy(w, g, v, lr, momentum, wd, eta, eps, exclude):
    """One MLPerf-LARS step for one tensor (lars_optimizer.py compute_lr + momentum update)."""
    if exclude:
        scaled = lr
    else:
        wn, gn = np.linalg.norm(w), np.linalg.norm(g)
        trust = eta * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
        scaled = lr * trust
    if wd:
        g = g + wd * w
    v = momentum * v + scaled * g
    return w - v, v


def batch(seed):
    rng = np.random.default_rng(seed)
    return (mge.tensor(rng.standard_normal((4, 3, 6, 6)).astype("float32")),
            mge.tensor(rng.integers(0, 3, 4).astype("int32")))


def build(no_wd_norm_bias=True, **kw):
    mge.random.seed(0)
    net = Net()
    gm = GradManager().attach(net.parameters())
    opt = LARS(param_groups(net, 1e-2, no_wd_norm_bias), lr=0.5, momentum=0.9, eta=0.02, **kw)
    return net, gm, opt


def forward_backward(net, gm, x, y):
    with gm:
        loss = F.nn.cross_entropy(net(x), y)
        gm.backward(loss)
    return loss


@pytest.mark.parametrize("no_wd_norm_bias", [True, False])
def test_lars_steps_equal_numpy_reference(no_wd_norm_bias):
    net, gm, opt = build(no_wd_norm_bias, epsilon=1e-7)
    params = [p for g in opt.param_groups for p in g["params"]]
    exclude = {id(p): g["lars_exclude"] for g in opt.param_groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    w = {id(p): p.numpy().copy() for p in params}
    v = {id(p): np.zeros_like(w[id(p)]) for p in params}
    plain_w, plain_v = dict(w), dict(v)   # the same steps without the trust ratio
    for step, lr in enumerate([0.5, 0.2, 0.35]):
        for group in opt.param_groups:
            group["lr"] = lr
        forward_backward(net, gm, *batch(step))
        grads = {id(p): p.grad.numpy().copy() for p in params}
        opt.step().clear_grad()
        for p in params:
            w[id(p)], v[id(p)] = lars_numpy(w[id(p)], grads[id(p)], v[id(p)], lr, 0.9, wd[id(p)],
                                            0.02, 1e-7, exclude[id(p)])
            plain_w[id(p)], plain_v[id(p)] = lars_numpy(plain_w[id(p)], grads[id(p)], plain_v[id(p)],
                                                        lr, 0.9, wd[id(p)], 0.02, 1e-7, True)
    for p in params:
        np.testing.assert_allclose(p.numpy(), w[id(p)], rtol=1e-5, atol=1e-6)
    # the trust ratio really shaped the step: momentum SGD without it lands elsewhere
    conv = dict(net.named_parameters())["conv.weight"]
    assert not np.allclose(conv.numpy(), plain_w[id(conv)], rtol=1e-2, atol=1e-3)


def test_zero_weight_uses_trust_one():
    """A tensor whose norm is 0 (here a zero-initialised bias under LARS) steps with trust 1."""
    net, gm, opt = build(no_wd_norm_bias=False)
    bias = dict(net.named_parameters())["fc.bias"]
    assert np.all(bias.numpy() == 0)
    forward_backward(net, gm, *batch(0))
    g = bias.grad.numpy().copy()
    opt.step().clear_grad()
    np.testing.assert_allclose(bias.numpy(), -0.5 * g, rtol=1e-6, atol=1e-8)
    assert np.all(np.isfinite(bias.numpy()))


def test_lars_traced_equals_eager_with_changing_lr():
    results = []
    for trace in (False, True):
        net, gm, opt = build()

        def step(x, y):
            loss = forward_backward(net, gm, x, y)
            opt.step().clear_grad()
            return loss

        fn = jit.trace(step, symbolic=True) if trace else step
        losses = []
        for i, lr in enumerate([0.5, 0.5, 0.05, 0.8, 0.0, 0.3]):
            for group in opt.param_groups:
                group["lr"] = lr
            losses.append(float(fn(*batch(i)).item()))
        results.append((losses, {n: p.numpy() for n, p in net.named_parameters()}))
    (eager_losses, eager_w), (traced_losses, traced_w) = results
    np.testing.assert_allclose(traced_losses, eager_losses, rtol=1e-5)
    for n in eager_w:
        np.testing.assert_allclose(traced_w[n], eager_w[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_lars_state_dict_round_trip():
    net, gm, opt = build()
    for i in range(2):
        forward_backward(net, gm, *batch(i))
        opt.step().clear_grad()
    state = opt.state_dict()
    weights = {n: p.numpy().copy() for n, p in net.named_parameters()}
    assert [g["lars_exclude"] for g in state["param_groups"]] == [False, True]
    assert all(set(s) == {"momentum_buffer"} for s in state["state"].values())

    net2, gm2, opt2 = build()
    net2.load_state_dict(weights, strict=False)
    opt2.load_state_dict(state)
    for a, b in zip(opt.param_groups, opt2.param_groups):
        assert {k: v for k, v in a.items() if k != "params"} == {k: v for k, v in b.items() if k != "params"}
    for (n1, p1), (n2, p2) in zip(net.named_parameters(), net2.named_parameters()):
        np.testing.assert_array_equal(opt._state[p1]["momentum_buffer"].numpy(),
                                      opt2._state[p2]["momentum_buffer"].numpy())
    # both continue identically (the BN running stats are not part of this comparison:
    # train-mode BN normalises with batch statistics)
    for o, (n_, g_) in ((opt, (net, gm)), (opt2, (net2, gm2))):
        forward_backward(n_, g_, *batch(9))
        o.step().clear_grad()
    for (n1, p1), (_, p2) in zip(net.named_parameters(), net2.named_parameters()):
        np.testing.assert_allclose(p1.numpy(), p2.numpy(), rtol=1e-6, atol=1e-7, err_msg=n1)


def test_lars_bad_values():
    net = Net()
    for kw in (dict(lr=-1), dict(lr=0.1, momentum=1.0), dict(lr=0.1, eta=0.0),
               dict(lr=0.1, weight_decay=-1), dict(lr=0.1, epsilon=-1)):
        with pytest.raises(ConfigError):
            LARS(net.parameters(), **kw)
