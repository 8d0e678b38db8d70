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

A step dropped for overflow leaves no trace: the update does not run, and the BN running
statistics that its forward pass moved are put back (the first graph returns their values from
before the step). The weights' moving average (`ema=`) is folded into the update graph, so it
costs no graph launch and no host wait of its own. `fail_early` runs the largest step of the
schedule once before the first one, so an out-of-memory or a shape problem shows in the first
minute instead of at the end of a progressive-resizing ramp.

Every graph is compiled at graph optimisation level 1 (engine.tracing.compile_step), not
MegEngine's default 2, so that a resumed run computes bit for bit what the uninterrupted one
does (see `engine.tracing.TRACE_OPT_LEVEL`).
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import megengine as mge
import megengine.functional as F
import numpy as np
from megengine import amp as mge_amp
from megengine.autodiff import GradManager
from megengine.functional.math import _check_non_finite
from megengine.module import Module
from megengine.optimizer import Optimizer

from engine.errors import UserError
from engine.models.specs import MEAN_BGR, STD_BGR
from engine.tracing import compile_step

if TYPE_CHECKING:
    from engine.ema import ModelEMA

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
        value = float("nan")
    if not math.isfinite(value):  # float() also reads "nan" and "inf"
        raise UserError("cannot read %r as a memory size; use e.g. 5GB or 512MB" % text)
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

    With `ema` (an engine.ema.ModelEMA of `model`), every update that runs also folds the new
    weights into the average, inside the same graph; a skipped AMP update skips it too.
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
        ema: Optional["ModelEMA"] = None,
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
        self.buffers = list(model.buffers())  # BN running statistics, moved by each forward
        self.ema = ema
        self._ema_update = ema.update_fn(model) if ema is not None else None
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

    def _update(self, decay: Sequence[mge.Tensor]) -> None:
        """The optimizer step, then the EMA update with `decay` = (d, 1 - d) when there is one."""
        self.opt.step().clear_grad()
        if self._ema_update is not None:
            self._ema_update(*decay)

    def _decay_inputs(self) -> Tuple[mge.Tensor, ...]:
        """(d, 1 - d) of the EMA update about to run, as graph inputs; () without an EMA."""
        if self.ema is None:
            return ()
        d = self.ema.next_decay()
        return mge.tensor(np.float32(d)), mge.tensor(np.float32(1.0 - d))

    def _restore_buffers(self, before: Sequence[mge.Tensor]) -> None:
        for buf, old in zip(self.buffers, before):
            buf[...] = old

    # ---- float32: the whole step is one graph ----
    def _fp32_step(self, images: mge.Tensor, labels: mge.Tensor, *rest: mge.Tensor) -> mge.Tensor:
        k = 2 if self.ema is not None else 0  # rest = EMA decay inputs, then the mix plan
        with self.gm:
            loss = self._loss(images, labels, rest[k:])
            self.gm.backward(loss)
        self._update(rest[:k])
        return loss

    # ---- float32 forward and backward only, no update: `fail_early`'s probe ----
    def _fp32_backward(self, images: mge.Tensor, labels: mge.Tensor,
                       *mix: mge.Tensor) -> List[mge.Tensor]:
        before = [F.copy(b) for b in self.buffers]
        with self.gm:
            loss = self._loss(images, labels, mix)
            self.gm.backward(loss)
        return [loss, *before]

    # ---- AMP: graph 1 = forward, scaled backward, unscale, overflow flag ----
    def _amp_backward(
        self, images: mge.Tensor, labels: mge.Tensor, scale: mge.Tensor, *mix: mge.Tensor
    ) -> List[mge.Tensor]:
        """[loss, overflow flag, *BN buffers as they were before this forward pass]."""
        before = [F.copy(b) for b in self.buffers]
        with self.gm:
            with mge_amp.autocast(enabled=True):
                loss = self._loss(images, labels, mix)
            self.gm.backward(loss, dy=scale)
        inv = 1.0 / scale
        for p in self.params:
            if p.grad is not None:
                p.grad = p.grad * inv
        overflow = _check_non_finite([p.grad for p in self.params if p.grad is not None], 1.0)
        return [loss, overflow, *before]

    # ---- AMP: graph 2 = the optimizer (and EMA) update, run only when the gradients are finite
    def _amp_update(self, *decay: mge.Tensor) -> None:
        self._update(decay)

    def __call__(self, images: mge.Tensor, labels: mge.Tensor,
                 mix: Optional[Sequence[mge.Tensor]] = None) -> mge.Tensor:
        if self.mix != (mix is not None):
            raise ValueError("this step was built with mix=%s; pass mix=(perm, rows, cols, lam) "
                             "exactly when it is True" % self.mix)
        extra = tuple(mix or ())
        if not self.amp:
            return self._graph("_fp32_step", images.shape)(images, labels,
                                                           *self._decay_inputs(), *extra)
        scaler = self.scaler
        assert scaler is not None  # __init__ makes one whenever amp is on
        scale = mge.tensor(np.float32(scaler.scale_factor))
        loss, overflow, *before = self._graph("_amp_backward", images.shape)(
            images, labels, scale, *extra)
        skipped = bool(overflow.numpy())
        if skipped:
            # Nothing of this step may stay: no update, and the BN statistics its forward
            # pass moved go back to what they were.
            self.opt.clear_grad()
            self._restore_buffers(before)
        else:
            self._graph("_amp_update", ())(*self._decay_inputs())
        # Drive GradScaler's own bookkeeping so its state_dict stays the checkpoint format.
        scaler._found_non_finite = skipped
        scaler.update()
        self.last_step_skipped = skipped
        return loss


    def probe(self, batch_size: int, size: int) -> None:
        """One forward and backward of a `batch_size` x `size` px batch that changes nothing:
        no update runs (weights, optimizer state, loss scale and EMA untouched), the BN
        statistics are restored and the gradients cleared. Under AMP it is the step's own first
        graph, kept for when training reaches that size; the float32 probe graph is dropped
        after (the step's graph includes the update), so it holds no memory afterwards."""
        images = mge.tensor(np.zeros((batch_size, 3, size, size), np.uint8))
        labels = mge.tensor(np.zeros((batch_size,), np.int32))
        mix: Tuple[mge.Tensor, ...] = ()
        if self.mix:  # the identity plan (no mixing), as for an unmixed batch
            mix = (mge.tensor(np.arange(batch_size, dtype=np.int32)),
                   mge.tensor(np.zeros(size, np.float32)), mge.tensor(np.zeros(size, np.float32)),
                   mge.tensor(np.float32(1.0)))
        if self.amp:
            assert self.scaler is not None
            scale = mge.tensor(np.float32(self.scaler.scale_factor))
            loss, _overflow, *before = self._graph("_amp_backward", images.shape)(
                images, labels, scale, *mix)
        else:
            loss, *before = self._graph("_fp32_backward", images.shape)(images, labels, *mix)
            del self._graphs[("_fp32_backward", tuple(images.shape))]
        loss.numpy()  # waits for the device: an out-of-memory surfaces here
        self.opt.clear_grad()
        self._restore_buffers(before)


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


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "out of memory" in text or "memalloc" in text or "bad_alloc" in text


def fail_early(train_step: TrainStep, evals: Sequence[Tuple[Module, EvalStep]], *,
               batch_size: int, train_size: Optional[int], eval_size: Optional[int]) -> str:
    """Before the first step: one forward and backward at `train_size` (the largest training
    size of the schedule; None when the first step already runs at it) and one eval batch at
    `eval_size` (None without evaluation) with each eval step, so that an out-of-memory or a
    shape problem at those sizes shows now. Changes no weight, statistic or optimizer state
    (see TrainStep.probe; eval-mode forward passes change nothing). Returns the summary line;
    an out-of-memory is a UserError that says which size did not fit and what to change."""
    t0 = time.perf_counter()
    done = []
    try:
        if train_size is not None:
            what = "a training step at %d px" % train_size
            train_step.model.train()
            train_step.probe(batch_size, train_size)
            done.append("one forward and backward at %d px" % train_size)
        if eval_size is not None and evals:
            what = "an eval batch at %d px" % eval_size
            images = mge.tensor(np.zeros((batch_size, 3, eval_size, eval_size), np.uint8))
            labels = mge.tensor(np.zeros((batch_size,), np.int32))
            for net, eval_step in evals:
                net.eval()
                eval_step(images, labels).numpy()
            done.append("%d eval batch(es) at %d px" % (len(evals), eval_size))
    except RuntimeError as exc:
        if not _is_out_of_memory(exc):
            raise
        raise UserError(
            "%s with %d images per GPU does not fit in memory (%s): lower --batch-size or the "
            "image size (--image-size, --max-res, --val-image-size), or pass --dtr"
            % (what, batch_size, " ".join(str(exc).split())[:200])) from None
    finally:
        train_step.model.train()
    if not done:
        return ""
    return "fail-early check: %s ran in %.1f s (batch %d)" % (
        " and ".join(done), time.perf_counter() - t0, batch_size)
