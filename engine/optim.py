"""Optimizer side of the recipe: which parameters get weight decay, and LARS.

`param_groups(model, weight_decay, no_wd_norm_bias)` returns groups for any
megengine.optimizer.Optimizer. With `no_wd_norm_bias`, the parameters of normalisation layers
(found by module type: BatchNorm, SyncBatchNorm, GroupNorm, LayerNorm, InstanceNorm, ...) and
every module's `bias` go to a second group with weight_decay 0, marked `lars_exclude=True`.
That is FFCV's "weight decay on all non-batchnorm parameters" plus biases, torchvision's
`--norm-weight-decay 0.0` (+ `--bias-weight-decay 0`), and MLPerf's LARS `skip_list`
(['batch_normalization', 'bias']).

`LARS` follows the MLPerf ResNet reference (mlcommons/training,
image_classification/tensorflow2/lars_optimizer.py): for each parameter tensor w with gradient g,

    trust  = eta * ||w|| / (||g|| + wd * ||w|| + epsilon)   (1 where ||w|| or ||g|| is 0)
    v      = momentum * v + lr * trust * (g + wd * w)
    w      = w - v

and for a group marked `lars_exclude`: trust = 1 and no decay beyond the group's own
weight_decay (0 from `param_groups`), i.e. plain heavy-ball momentum. Note that the velocity
carries the learning rate (TF's apply_momentum form), unlike MegEngine's SGD where
v = m * v + g and w -= lr * v; the two agree while lr is constant.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Set, Union

import megengine.functional as F
import megengine.module as M
from megengine import tensor
from megengine.module import Module
from megengine.module.batchnorm import _BatchNorm
from megengine.optimizer import Optimizer
from megengine.tensor import Parameter

from engine.errors import ConfigError

# Normalisation layers by type; every parameter they own is a scale or shift.
NORM_TYPES = tuple(t for t in (
    _BatchNorm, getattr(M, "GroupNorm", None), getattr(M, "LayerNorm", None),
    getattr(M, "InstanceNorm", None), getattr(M, "GeneralNorm", None),
) if t is not None)


def no_decay_parameters(model: Module) -> List[Parameter]:
    """Norm-layer parameters and all biases, in `model.parameters()` order."""
    chosen: Set[int] = set()
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            chosen.update(id(p) for p in module.parameters(recursive=False))
        bias = getattr(module, "bias", None)
        if isinstance(bias, Parameter):
            chosen.add(id(bias))
    return [p for p in model.parameters() if id(p) in chosen]


def param_groups(model: Module, weight_decay: float, no_wd_norm_bias: bool) -> List[Dict[str, Any]]:
    """Groups for an optimizer: one group with `weight_decay`, or with `no_wd_norm_bias` two:
    [decayed parameters, norm parameters + biases with weight_decay 0 and lars_exclude=True].

    Without the flag the single group is exactly `model.parameters()` in order, so checkpoints of
    runs built with `SGD(model.parameters(), ...)` keep loading.
    """
    if weight_decay < 0:
        raise ConfigError("weight_decay must be >= 0, got %r" % (weight_decay,))
    params = list(model.parameters())
    if not no_wd_norm_bias:
        return [{"params": params, "weight_decay": float(weight_decay)}]
    skip = {id(p) for p in no_decay_parameters(model)}
    decayed = [p for p in params if id(p) not in skip]
    exempt = [p for p in params if id(p) in skip]
    groups = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": float(weight_decay), "lars_exclude": False})
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0, "lars_exclude": True})
    return groups


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling with momentum (MLPerf ResNet form; see module docs).

    Works inside `jit.trace(symbolic=True)` like MegEngine's SGD: every hyper-parameter enters
    the graph as a tensor built from the group's current value on each call, norms and the
    zero-norm guards are tensor ops (`F.where`), and nothing reads a device value back, so the
    trainer may change `param_group["lr"]` every step without a retrace.
    """

    def __init__(
        self,
        params: Union[Iterable[Parameter], Iterable[Dict[str, Any]]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        epsilon: float = 0.0,
    ):
        if lr < 0:
            raise ConfigError("LARS lr must be >= 0, got %r" % (lr,))
        if not 0 <= momentum < 1:
            raise ConfigError("LARS momentum must be in [0, 1), got %r" % (momentum,))
        if weight_decay < 0:
            raise ConfigError("LARS weight_decay must be >= 0, got %r" % (weight_decay,))
        if eta <= 0:
            raise ConfigError("LARS eta (trust coefficient) must be > 0, got %r" % (eta,))
        if epsilon < 0:
            raise ConfigError("LARS epsilon must be >= 0, got %r" % (epsilon,))
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        epsilon=epsilon, lars_exclude=False)
        super().__init__(params, defaults)
        # As in SGD: no implicit Python-scalar conversion inside step(); constants are tensors.
        self._disable_type_convert = True

    def _create_state(self, param_group: Dict[str, Any]) -> None:
        for param in param_group["params"]:
            self._add_state(param, "momentum_buffer")

    def _updates(self, param_group: Dict[str, Any]) -> None:
        lr = tensor(param_group["lr"], dtype="float32")
        momentum = tensor(param_group["momentum"], dtype="float32")
        wd_value = float(param_group["weight_decay"])
        wd = tensor(wd_value, dtype="float32")
        eta = tensor(param_group["eta"], dtype="float32")
        eps = tensor(param_group["epsilon"], dtype="float32")
        zero = tensor(0.0, dtype="float32")
        one = tensor(1.0, dtype="float32")
        adapt = not param_group["lars_exclude"]

        for param in param_group["params"]:
            if param.grad is None:
                continue
            grad = param.grad
            if adapt:
                w_norm = F.sqrt((param * param).sum())
                g_norm = F.sqrt((grad * grad).sum())
                ratio = eta * w_norm / (g_norm + wd * w_norm + eps)
                # Where a norm is 0 the ratio is 0/0 or 0: fall back to 1 (MLPerf's rule).
                trust = F.where(w_norm > zero, F.where(g_norm > zero, ratio, one), one)
                scaled_lr = lr * trust
            else:
                scaled_lr = lr
            if wd_value != 0.0:
                grad = grad + param * wd
            v = self._state[param]["momentum_buffer"]
            v *= momentum
            v += grad * scaled_lr
            param -= v
