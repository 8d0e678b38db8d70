"""Exponential moving average (EMA) of a model's weights, kept on the device.

`ema = ModelEMA(model)` holds `ema.module`, a deep copy of the model that never trains: after
every optimizer step `ema.update(model)` moves each of its parameters towards the live one,

    ema = d * ema + (1 - d) * param,    d = min(decay, (1 + t) / (10 + t)) with warmup, else decay

where t counts the updates done so far (the warmup of TensorFlow's ExponentialMovingAverage
`num_updates`, also used by timm's ModelEma), and copies the buffers (BatchNorm running
statistics) as they are, since averaging statistics of weights that no longer exist buys
nothing.

Why a separate module rather than swapping the averaged weights into the live model for eval: a
traced eval step closes over the tensors of the module it was traced with, so swapping values
in and out would mean two full weight copies per eval and a fragile dance around the training
graph. A second module with its own eval step (`EvalStep(ema.module, ...)`) costs one
extra copy of the weights and nothing per eval.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Tuple

import megengine as mge
import numpy as np
from megengine.module import Module

from engine.errors import ConfigError
from engine.tracing import compile_step


def ema_decay_at(updates: int, decay: float, warmup: bool = True) -> float:
    """The decay used by update number `updates` (0-based)."""
    if not warmup:
        return float(decay)
    return float(min(decay, (1.0 + updates) / (10.0 + updates)))


class ModelEMA:
    """EMA of `model`'s parameters, with buffers copied; see the module docstring.

    Call `update(model)` after each optimizer step that changed the weights (skip it when an
    AMP step was dropped for overflow), or hand the EMA to `engine.steps.TrainStep(ema=...)`,
    which runs the same update inside its own step graph (the trainer does). Evaluate with
    `ema.module` (already in eval mode). `trace=True` compiles `update` into one graph (one
    launch instead of three per tensor).
    """

    def __init__(self, model: Module, decay: float = 0.9999, warmup: bool = True,
                 trace: bool = True):
        if not 0.0 <= float(decay) < 1.0:
            raise ConfigError("ema decay must be in [0, 1), got %r" % (decay,))
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.module = copy.deepcopy(model)
        self.module.eval()
        self._trace = bool(trace)
        self._bound: Any = None  # the model whose tensors the (traced) update closes over
        self._fn: Callable[..., None] = lambda *a: None

    # ---- pairing: which tensor of the copy follows which tensor of the live model ----
    def _pairs(self, model: Module) -> Tuple[List[Tuple[Any, Any]], List[Tuple[Any, Any]]]:
        mine_p, live_p = dict(self.module.named_parameters()), dict(model.named_parameters())
        mine_b, live_b = dict(self.module.named_buffers()), dict(model.named_buffers())
        if mine_p.keys() != live_p.keys() or mine_b.keys() != live_b.keys():
            raise ConfigError("ModelEMA.update: the model has other parameters or buffers than "
                              "the one the EMA was made from")
        return ([(mine_p[k], live_p[k]) for k in mine_p], [(mine_b[k], live_b[k]) for k in mine_b])

    def update_fn(self, model: Module) -> Callable[[mge.Tensor, mge.Tensor], None]:
        """The update as plain tensor code, `fn(d, 1 - d)`, for a caller to run inside its own
        compiled graph (engine.steps.TrainStep folds it into the training step); pair it with
        `next_decay()` for the decay of each update."""
        params, buffers = self._pairs(model)

        def update(d: mge.Tensor, one_minus_d: mge.Tensor) -> None:
            # In-place tensor arithmetic, like the optimizers, so a traced graph writes the
            # EMA tensors directly and the decay arrives as an input (no retrace per value).
            for mine, live in params:
                mine *= d
                mine += live.detach() * one_minus_d
            for mine, live in buffers:
                mine[...] = live.detach()

        return update

    def next_decay(self) -> float:
        """The decay of the next update, which this counts as done."""
        d = ema_decay_at(self.updates, self.decay, self.warmup)
        self.updates += 1
        return d

    def _bind(self, model: Module) -> None:
        update = self.update_fn(model)
        # compiled like the train step, so that a resumed EMA averages bit for bit as before
        self._fn = compile_step(update, self._trace)
        self._bound = model

    def update(self, model: Module) -> float:
        """Fold the model's current weights into the average, as a graph of its own; returns
        the decay used."""
        if self._bound is not model:
            self._bind(model)
        d = self.next_decay()
        self._fn(mge.tensor(np.float32(d)), mge.tensor(np.float32(1.0 - d)))
        return d

    # ---- checkpoints ----
    def state_dict(self) -> Dict[str, Any]:
        """Plain Python/numpy: {"decay", "warmup", "updates", "state_dict"}."""
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "state_dict": OrderedDict(self.module.state_dict())}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = {"decay", "warmup", "updates", "state_dict"} - set(state)
        if missing:
            raise ConfigError("EMA state lacks %s; was it written by ModelEMA.state_dict()?"
                              % ", ".join(sorted(missing)))
        self.module.load_state_dict(state["state_dict"], strict=True)
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.updates = int(state["updates"])
