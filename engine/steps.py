"""Step functions: on-device normalization, jit.trace (or eager) and mixed precision.

The trainer builds a `TrainStep` / `EvalStep` once and then only calls them with uint8 image
tensors. Whether the step is a compiled graph (`jit.trace(symbolic=True)`) or plain eager code,
and whether it runs under AMP, is decided here and nowhere else; the traced and eager versions
compute the same thing (tests/test_trainer.py checks the loss trajectories).

Two MegEngine 1.13 facts shape the code:
- `GradScaler.backward` inside a symbolic trace crashes the process (it reads a device value
  with `.numpy()` mid-graph; segfault verified on CPU), and `_check_non_finite(scale=...)` bakes
  the Python scale into the graph. So the AMP step is split in two traced graphs: forward +
  scaled backward + on-device unscale + overflow flag, then the optimizer update. The host reads
  the one-element flag between them (PyTorch's GradScaler syncs once per step the same way) and
  skips the update on overflow; the scale is fed in as a tensor so it can change without a retrace.
- float16 on MegEngine's CPU backend produces nan for real networks, so AMP is refused on
  machines without CUDA before any model is built (`require_amp_device`).

Every graph is compiled at graph optimisation level 1 (`compile_step`), not MegEngine's default
2, so that a resumed run computes bit for bit what the uninterrupted one does (see
`TRACE_OPT_LEVEL`).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import megengine as mge
import megengine.functional as F
import numpy as np
from megengine import amp as mge_amp
from megengine import jit
from megengine.autodiff import GradManager
from megengine.functional.math import _check_non_finite
from megengine.module import Module
from megengine.optimizer import Optimizer

from engine.errors import UserError
from engine.models.specs import MEAN_BGR, STD_BGR

AMP_CPU_MESSAGE = (
    "--amp needs a CUDA GPU: MegEngine's CPU backend computes float16 incorrectly (the loss "
    "becomes nan). Run without --amp on this machine."
)


def cuda_available() -> bool:
    return bool(mge.is_cuda_available())


def require_amp_device(amp: bool) -> None:
    """Refuse AMP up front when there is no GPU, instead of training into nan."""
    if amp and not cuda_available():
        raise UserError(AMP_CPU_MESSAGE)


# PyTorch's and basecls' starting scale. MegEngine's GradScaler defaults to 2**4, which
# under-uses float16's range: small gradients underflow to 0 for the thousands of steps the
# scale needs to grow (x2 per growth_interval=2000 clean steps) to 2**16.
INIT_SCALE = 2.0 ** 16


def make_grad_scaler() -> mge_amp.GradScaler:
    """The loss scaler for AMP steps, starting at 2**16."""
    return mge_amp.GradScaler(init_scale=INIT_SCALE)


class Normalize:
    """uint8 BGR [N,3,H,W] -> float32 (x - mean) / std, computed on the device.

    The constants are built once, so inside a traced step they are graph constants and in eager
    mode no host->device copy happens per step.
    """

    def __init__(self, mean: Sequence[float] = MEAN_BGR, std: Sequence[float] = STD_BGR):
        self.mean = mge.tensor(np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1))
        self.inv_std = mge.tensor((1.0 / np.asarray(std, dtype=np.float32)).reshape(1, 3, 1, 1))

    def __call__(self, images: mge.Tensor) -> mge.Tensor:
        return (images.astype("float32") - self.mean) * self.inv_std


# Level 2, MegEngine's default, adds global rewrites of the graph's arithmetic before it is
# compiled, and in MegEngine 1.13 what they produce depends on the tensors' values when the trace
# is recorded: a step traced while the momentum buffers are zero (step 0 of a fresh run) rounds
# the SGD update (momentum, weight decay) exactly as eager execution does, one traced while they
# are not (the first step after a resume) rounds it differently by about one unit in the last
# place, and small-batch BatchNorm amplifies that into visibly different weights within a few
# steps. Level 1 rounds as eager execution does whatever the values, so a resume is exact.
TRACE_OPT_LEVEL = 1


def compile_step(fn: Callable, trace: bool) -> Callable:
    """`fn` compiled with jit.trace(symbolic=True) at TRACE_OPT_LEVEL, or `fn` itself."""
    return jit.trace(fn, symbolic=True, opt_level=TRACE_OPT_LEVEL) if trace else fn


def parse_bytes(text: str) -> int:
    """'5GB', '512MB', '1.5 GiB', '1000000' -> bytes (powers of 1024, like megengine.dtr)."""
    t = str(text).strip().upper().replace(" ", "").replace("IB", "B")
    units = {"TB": 1 << 40, "GB": 1 << 30, "MB": 1 << 20, "KB": 1 << 10, "B": 1}
    for suffix, mult in units.items():
        if t.endswith(suffix):
            num = t[: -len(suffix)]
            break
    else:
        num, mult = t, 1
    try:
        value = float(num) * mult
    except ValueError:
        raise UserError("cannot read %r as a memory size; use e.g. 5GB or 512MB" % text) from None
    if value <= 0:
        raise UserError("memory size must be positive, got %r" % text)
    return int(value)


def dtr_threshold(spec: str) -> int:
    """Eviction threshold for DTR: 'auto' = 80 % of the default device's memory, or a size."""
    if spec == "auto":
        total, _free = mge.device.get_mem_status_bytes()
        return int(total * 0.8)
    return parse_bytes(spec)


def enable_dtr(threshold_bytes: int) -> None:
    """Dynamic Tensor Rematerialization for eager steps (trades recompute for memory).

    Must run inside each launched worker (MegEngine#166), i.e. after dist.launcher forks.
    """
    mge.dtr.eviction_threshold = int(threshold_bytes)
    mge.dtr.enable()


class TrainStep:
    """One optimisation step: `loss = step(images_uint8, labels_int32[, mix])`.

    `loss` is a device tensor; reading it (`.item()`) synchronises, so the trainer only does that
    when it logs. With AMP, `last_step_skipped` tells whether the update was dropped because the
    scaled gradients overflowed.

    With `mix=True` (Mixup/CutMix), each call also takes the batch's plan from engine.mix as
    `mix=(perm, rows, cols, lam)` tensors: the mixing runs in the compiled graph on the
    normalised batch, and the loss is the soft-target cross-entropy (label smoothing applied to
    the one-hots before mixing). A batch left unmixed passes the identity plan, so every step
    runs the same graph.

    A compiled graph is built per input shape: progressive resizing changes the image size at
    epoch boundaries, and each size keeps its own trace (a handful over a run).
    """

    def __init__(
        self,
        model: Module,
        gm: GradManager,
        opt: Optimizer,
        *,
        trace: bool = True,
        amp: bool = False,
        scaler: Optional[mge_amp.GradScaler] = None,
        label_smoothing: float = 0.0,
        dtr_bytes: Optional[int] = None,
        mix: bool = False,
        num_classes: Optional[int] = None,
    ):
        self.model, self.gm, self.opt = model, gm, opt
        self.amp = amp
        self.scaler = scaler if scaler is not None else (make_grad_scaler() if amp else None)
        self.label_smoothing = float(label_smoothing)
        self.mix = bool(mix)
        if self.mix and not num_classes:
            raise ValueError("TrainStep(mix=True) needs num_classes for the soft targets")
        self.num_classes = num_classes
        self.normalize = Normalize()
        self.params = list(gm.attached_tensors())  # what backward writes .grad into
        self.last_step_skipped = False
        if dtr_bytes:
            # DTR runs eagerly: MegEngine documents and exercises DTR in imperative mode; the
            # static-graph DTR of a symbolic trace (jit.DTRConfig) is left untested there.
            trace = False
            enable_dtr(dtr_bytes)
        self.traced = bool(trace)
        self._graphs: Dict[Tuple[str, Tuple[int, ...]], Callable] = {}

    def _graph(self, name: str, shape: Tuple[int, ...]) -> Callable:
        key = (name, tuple(shape))
        fn = self._graphs.get(key)
        if fn is None:
            fn = self._graphs[key] = compile_step(getattr(self, name), self.traced)
        return fn

    def _loss(self, images: mge.Tensor, labels: mge.Tensor, mix: Tuple[mge.Tensor, ...]) -> mge.Tensor:
        x = self.normalize(images)
        if not mix:
            logits = self.model(x)
            return F.nn.cross_entropy(logits.astype("float32"), labels,
                                      label_smooth=self.label_smoothing)
        from engine.mix import mix_images, mix_targets, soft_cross_entropy

        num_classes = self.num_classes
        assert num_classes is not None  # __init__ refuses mix=True without num_classes
        perm, rows, cols, lam = mix
        logits = self.model(mix_images(x, perm, rows, cols))
        targets = mix_targets(labels, num_classes, lam, perm, self.label_smoothing)
        return soft_cross_entropy(logits, targets)

    # ---- float32: the whole step is one graph ----
    def _fp32_step(self, images: mge.Tensor, labels: mge.Tensor, *mix: mge.Tensor) -> mge.Tensor:
        with self.gm:
            loss = self._loss(images, labels, mix)
            self.gm.backward(loss)
        self.opt.step().clear_grad()
        return loss

    # ---- AMP: graph 1 = forward, scaled backward, unscale, overflow flag ----
    def _amp_backward(
        self, images: mge.Tensor, labels: mge.Tensor, scale: mge.Tensor, *mix: mge.Tensor
    ) -> Tuple[mge.Tensor, mge.Tensor]:
        with self.gm:
            with mge_amp.autocast(enabled=True):
                loss = self._loss(images, labels, mix)
            self.gm.backward(loss, dy=scale)
        inv = 1.0 / scale
        for p in self.params:
            if p.grad is not None:
                p.grad = p.grad * inv
        overflow = _check_non_finite([p.grad for p in self.params if p.grad is not None], 1.0)
        return loss, overflow

    # ---- AMP: graph 2 = the optimizer update, run only when the gradients are finite ----
    def _amp_update(self) -> None:
        self.opt.step().clear_grad()

    def __call__(self, images: mge.Tensor, labels: mge.Tensor,
                 mix: Optional[Sequence[mge.Tensor]] = None) -> mge.Tensor:
        if self.mix != (mix is not None):
            raise ValueError("this step was built with mix=%s; pass mix=(perm, rows, cols, lam) "
                             "exactly when it is True" % self.mix)
        extra = tuple(mix or ())
        if not self.amp:
            return self._graph("_fp32_step", images.shape)(images, labels, *extra)
        scaler = self.scaler
        assert scaler is not None  # __init__ makes one whenever amp is on
        scale = mge.tensor(np.float32(scaler.scale_factor))
        loss, overflow = self._graph("_amp_backward", images.shape)(images, labels, scale, *extra)
        skipped = bool(overflow.numpy())
        if skipped:
            self.opt.clear_grad()
        else:
            self._graph("_amp_update", ())()
        # Drive GradScaler's own bookkeeping so its state_dict stays the checkpoint format.
        scaler._found_non_finite = skipped
        scaler.update()
        self.last_step_skipped = skipped
        return loss


class EvalStep:
    """`stats = step(images_uint8, labels_int32)` -> device tensor [loss_sum, correct@1, correct@k].

    Sums (not means) so that batches of different sizes, and shards on different ranks, add up
    exactly. k is 5, or the number of classes when there are fewer than 5.
    """

    def __init__(self, model: Module, *, num_classes: int, trace: bool = True, amp: bool = False):
        self.model = model
        self.amp = amp
        self.k = min(5, int(num_classes))
        self.normalize = Normalize()
        self.traced = bool(trace)
        self._graphs: Dict[Tuple[int, ...], Callable] = {}

    def _eval(self, images: mge.Tensor, labels: mge.Tensor) -> mge.Tensor:
        with mge_amp.autocast(enabled=self.amp):
            logits = self.model(self.normalize(images))
        logits = logits.astype("float32")
        n = logits.shape[0]
        loss = F.nn.cross_entropy(logits, labels) * n
        acc1, acck = F.topk_accuracy(logits, labels, topk=(1, self.k))
        return F.concat([v.reshape(1) for v in (loss, acc1 * n, acck * n)])

    def __call__(self, images: mge.Tensor, labels: mge.Tensor) -> mge.Tensor:
        fn = self._graphs.get(tuple(images.shape))
        if fn is None:  # one graph per batch shape (the last val batch is usually smaller)
            fn = self._graphs[tuple(images.shape)] = compile_step(self._eval, self.traced)
        return fn(images, labels)


class PredictStep:
    """`probs = step(images_uint8)` -> softmax probabilities [N, num_classes] (inference)."""

    def __init__(self, model: Module, *, trace: bool = False):
        self.model = model
        self.normalize = Normalize()
        self._step = compile_step(self._predict, trace)

    def _predict(self, images: mge.Tensor) -> mge.Tensor:
        return F.softmax(self.model(self.normalize(images)).astype("float32"), axis=1)

    def __call__(self, images: mge.Tensor) -> mge.Tensor:
        return self._step(images)
