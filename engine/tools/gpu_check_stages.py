"""The stages of `engine.tools.gpu_check`: the code that touches MegEngine and the GPUs.

Each `*_stage` function runs in a child process of its own
(engine.tools.gpu_check_runner.run_stage gives it a deadline and turns its death into FAIL
lines) and returns a list of engine.tools.gpu_check_report.Check. The engine and bench stages
run `engine.trainer.train` itself, on every visible GPU, on a small set made by
engine.data.sample and packed by engine.data.pack; what they need to see inside the ranks (each
rank's parameters, its peak device memory) is recorded by `observe_ranks`, which wraps two of
the trainer's functions in this child process only and changes nothing they compute. The same
stages run on CPU with several ranks through the engine's test-only CPU collective backend
(engine.dist), which is how they are tested.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from engine.tools.gpu_check_builds import (
    build_info,
    compute_capability_check,
    describe_build,
    driver_check,
    driver_gpu_count,
    driver_version,
    visibility_check,
)
from engine.tools.gpu_check_report import Check, skip_check
from engine.tools.gpu_check_verdicts import (
    AMP_RTOL,
    FP32_RTOL,
    allreduce_check,
    compare_losses,
    count_check,
    equality_check,
    params_check,
)

__all__ = ["build_stage", "device_stage", "nccl_stage", "engine_stage", "bench_stage",
           "observe_ranks", "step_losses"]


# ---------------------------------------------------------------------------------- 1. build

def build_stage() -> List[Check]:
    """The build against the driver and the GPUs. Its first entry, "build", carries the build's
    figures for the report (it is not printed as a check); `nothing_to_check` when this
    machine has no GPU at all."""
    import megengine as mge

    info = build_info()
    n = int(mge.device.get_device_count("gpu"))
    info["megengine_gpus"] = n
    info["described"] = describe_build(info["version"], info["cuda"], info["cudnn"],
                                       info["gencode"])
    info["driver"] = driver_version()
    vis = visibility_check(n, driver_gpu_count())
    if vis is None:
        info["nothing_to_check"] = True
        return [Check("build", True, info["described"], figures=info)]
    out = [Check("build", True, info["described"], figures=info), vis,
           driver_check(info["cuda"], info["driver_cuda"], info["driver"])]
    for i in range(n):
        # cuDeviceGetAttribute through MegEngine's fork-safe path: no context is created.
        p = mge.device.get_cuda_device_property(i)
        out.append(compute_capability_check(i, str(p.name), int(p.major) * 10 + int(p.minor),
                                            info["gencode"]))
    return out


# --------------------------------------------------------------------------------- 2. device

def run_conv_check() -> Check:
    """A 3x3 convolution forward and backward on gpu0, against the same on MegEngine's CPU."""
    import megengine as mge
    import megengine.functional as F
    from megengine.autodiff import GradManager

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 64, 56, 56)).astype(np.float32)
    w = rng.normal(scale=0.05, size=(64, 64, 3, 3)).astype(np.float32)
    results = {}
    for dev in ("gpu0", "cpu0"):
        xt, wt = mge.tensor(x, device=dev), mge.Parameter(w, device=dev)
        gm = GradManager().attach([wt])
        t0 = time.perf_counter()
        with gm:
            y = F.conv2d(xt, wt, padding=1)
            gm.backward((y * y).mean())
        results[dev] = (y.numpy(), wt.grad.numpy(), time.perf_counter() - t0)
    (yg, gg, tg), (yc, gc, _) = results["gpu0"], results["cpu0"]
    ey = float(np.abs(yg - yc).max() / max(np.abs(yc).max(), 1e-6))
    eg = float(np.abs(gg - gc).max() / max(np.abs(gc).max(), 1e-6))
    # cuDNN may use TF32 on Ampere and later (10-bit mantissa): 1e-2 of the largest value.
    ok = bool(np.isfinite(yg).all() and np.isfinite(gg).all() and ey < 1e-2 and eg < 1e-2)
    return Check("conv forward+backward", ok,
                 "gpu0 vs CPU: output max rel err %.1e, weight grad %.1e (tolerance 1e-2); "
                 "first call %.2f s" % (ey, eg, tg),
                 figures={"out_rel_err": ey, "grad_rel_err": eg, "first_call_s": tg})


def train_step(arch: str, mode: str, num_classes: int, state: Optional[Dict[str, Any]] = None,
               lr: float = 0.01) -> Any:
    """engine.steps.TrainStep (the trainer's own step) in mode eager | trace | amp, on a fresh
    `arch` (with the weights `state`, if given), a GradManager and SGD as the trainer uses."""
    import megengine.optimizer as optim
    from megengine.autodiff import GradManager

    from engine.models import get_model, load_weights
    from engine.steps import TrainStep

    model = get_model(arch, num_classes=num_classes)
    if state is not None:
        load_weights(model, state, strict=True)
    model.train()
    gm = GradManager().attach(model.parameters())
    opt = optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    return TrainStep(model, gm, opt, trace=mode != "eager", amp=mode == "amp")


def step_losses(mode: str, state: Dict[str, Any], images: Any, labels: Any, steps: int,
                arch: str = "resnet18", num_classes: int = 1000) -> Tuple[List[float], List[bool]]:
    """Losses of `steps` training steps from the weights `state`, in mode eager | trace | amp;
    plus whether AMP skipped each update."""
    import megengine as mge

    step = train_step(arch, mode, num_classes, state)
    x, y = mge.tensor(images), mge.tensor(labels)
    losses, skips = [], []
    for _ in range(steps):
        losses.append(float(step(x, y).numpy()))
        skips.append(bool(step.last_step_skipped))
    return losses, skips


def device_stage(steps: int = 3, batch: int = 16, size: int = 112) -> List[Check]:
    """gpu0: a convolution against the CPU, the traced and AMP steps against eager float32."""
    from engine.models import get_model

    out = [run_conv_check()]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
    labels = rng.integers(0, 1000, (batch,)).astype(np.int32)
    state = get_model("resnet18").state_dict()
    eager, _ = step_losses("eager", state, images, labels, steps)
    for mode, name, rtol in (("trace", "traced float32 step", FP32_RTOL),
                             ("amp", "traced AMP step", AMP_RTOL)):
        losses, skips = step_losses(mode, state, images, labels, steps)
        out.append(compare_losses(name, eager, losses, rtol, skips))
    return out


# ----------------------------------------------------------------------------------- 3. NCCL

def _allreduce_rank(size_mb: float, iters: int) -> Dict[str, Any]:
    """One rank: an all-reduce whose exact sum is known, then the timing of a large one."""
    import megengine as mge
    from megengine.distributed.functional import all_reduce_sum

    from engine.dist import group

    rank, world = group.get_rank(), group.get_world_size()
    base = (np.arange(1_000_003) % 97).astype(np.float32)  # odd length, exact in float32
    got = all_reduce_sum(mge.tensor(base * (rank + 1))).numpy()
    err = float(np.abs(got - base * (world * (world + 1) / 2)).max())
    wrong, err_sum = group.all_reduce_sum([0.0 if err == 0 else 1.0, err])
    x = mge.tensor(np.ones(max(1, int(size_mb * 2 ** 20 / 4)), np.float32))
    for _ in range(3):
        all_reduce_sum(x)
    mge._full_sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        y = all_reduce_sum(x)
    y.numpy()
    mge._full_sync()
    seconds = (time.perf_counter() - t0) / iters
    algbw = x.size * 4 / seconds / 1e9
    return {"world": world, "wrong": int(wrong), "max_err": float(err_sum),
            "busbw_gbs": algbw * 2 * (world - 1) / world}


def nccl_stage(ngpus: int, size_mb: float = 256.0, iters: int = 10,
               min_busbw_gbs: Optional[float] = 2.0) -> List[Check]:
    """The all-reduce on `ngpus` ranks forked by the engine's launch path."""
    from engine import dist

    if getattr(dist, "cpu_collectives", lambda: False)():
        min_busbw_gbs = None  # the test backend's host sums say nothing about NVLink
    r = dist.launch(_allreduce_rank, size_mb, iters, ngpus=ngpus)
    return allreduce_check(r["world"], r["wrong"], r["max_err"], r["busbw_gbs"], size_mb,
                           min_busbw_gbs)


# -------------------------------------------------------------- the training path, observed

_OBSERVED: Dict[str, Optional[str]] = {"dir": None}


def observe_ranks(dump_dir: str) -> None:
    """In this process and the ranks it forks from now on: after each rank's training, write
    its parameter digest and peak device memory to dump_dir/rank-R.json. Wraps engine.loop's
    `_model_and_optimizer` (to keep the model) and `run_rank` (to write when it returns), once;
    what they compute is unchanged."""
    from engine import dist, loop

    first = _OBSERVED["dir"] is None
    _OBSERVED["dir"] = dump_dir
    if not first:
        return
    models: List[Any] = []
    real_model, real_worker = loop._model_and_optimizer, loop.run_rank

    def model_and_optimizer(*args: Any, **kwargs: Any) -> Any:
        out = real_model(*args, **kwargs)
        models.append(out[0])
        return out

    def worker(cfg: Any, sources: Sequence[Any] = (), start: Any = None) -> Any:
        result = real_worker(cfg, sources, start)
        h = hashlib.sha256()
        for name, p in models[-1].named_parameters():
            h.update(name.encode())
            h.update(np.ascontiguousarray(p.numpy()).tobytes())
        rank = dist.get_rank()
        record: Dict[str, Any] = {"rank": rank, "digest": h.hexdigest()}
        try:
            import megengine as mge

            if mge.is_cuda_available():
                record["peak_allocated"] = int(mge.device.get_max_allocated_memory())
                record["peak_reserved"] = int(mge.device.get_max_reserved_memory())
        except Exception:  # noqa: BLE001 - the figure is optional
            pass
        folder = _OBSERVED["dir"]
        assert folder is not None
        with open(os.path.join(folder, "rank-%d.json" % rank), "w") as f:
            json.dump(record, f)
        return result

    loop._model_and_optimizer = model_and_optimizer
    loop.run_rank = worker


def _rank_records(dump_dir: str) -> List[Dict[str, Any]]:
    out = []
    for path in sorted(glob.glob(os.path.join(dump_dir, "rank-*.json"))):
        with open(path) as f:
            out.append(json.load(f))
    return sorted(out, key=lambda r: r["rank"])


def _make_set(root: str, classes: int, train_per_class: int, val_per_class: int,
              workers: Optional[int]) -> str:
    """A generated ImageNet-layout set, packed; reused when an earlier stage made it."""
    from engine.data import shards
    from engine.data.pack import pack_imagenet
    from engine.data.sample import make_sample_imagenet

    packed = os.path.join(root, "packed")
    if all(os.path.exists(os.path.join(packed, split, shards.META_FILE))
           for split in ("train", "val")):  # meta.json is written last: the pack is complete
        return packed
    raw = os.path.join(root, "raw")
    make_sample_imagenet(raw, classes=classes, train_per_class=train_per_class,
                         val_per_class=val_per_class, seed=0)
    pack_imagenet(raw, packed, workers=workers, progress=False, log=lambda *a, **k: None,
                  env={})
    return packed


def _metrics(save_dir: str) -> List[Dict[str, Any]]:
    from engine.metrics import read_jsonl

    return read_jsonl(os.path.join(save_dir, "metrics.jsonl"))


def _max_rel_diff(a: Dict[str, Any], b: Dict[str, Any]) -> float:
    worst = 0.0
    for k in a:
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        if x.shape != y.shape:
            return math.inf
        scale = max(float(np.abs(x).max()) if x.size else 0.0, 1e-12)
        worst = max(worst, float(np.abs(x - y).max()) / scale if x.size else 0.0)
    return worst


# --------------------------------------------------------------------------------- 4. engine

def engine_stage(ngpus: int, work_dir: str, arch: str = "resnet50", amp: bool = True,
                 batch: int = 8, sizes: Sequence[int] = (128, 160), classes: int = 3,
                 val_per_class: int = 7, workers: Optional[int] = None) -> List[Check]:
    """engine.trainer.train on `ngpus` ranks: 2 epochs (epoch 0 at sizes[0], epoch 1 at
    sizes[1], so the step retraces), an eval after each, then the same run stopped after
    epoch 0 and resumed. The val set (classes x val_per_class, 21 by default) does not divide
    among the ranks, so a padded or dropped share shows in the counts."""
    from engine.config import TrainConfig
    from engine.models.weights import read_file
    from engine.trainer import train

    dumps = {k: os.path.join(work_dir, "ranks-" + k) for k in ("straight", "resumed")}
    for d in dumps.values():
        os.makedirs(d, exist_ok=True)
    per_class = -(-2 * batch * ngpus // classes)  # two steps per epoch
    data = _make_set(os.path.join(work_dir, "data"), classes, per_class, val_per_class, workers)
    n_val = classes * val_per_class
    small, large = sizes
    base: Dict[str, Any] = dict(data=data, arch=arch, batch_size=batch, ngpus=ngpus, amp=amp, trace=True,
                epochs=2, min_res=small, max_res=large, start_ramp=0, end_ramp=1,
                val_image_size=large, print_freq=1, progress=False, learning_rate=0.01,
                workers=workers, seed=0)
    observe_ranks(dumps["straight"])
    straight = train(TrainConfig(save_dir=os.path.join(work_dir, "straight"), **base))
    assert straight is not None  # this is node 0
    spe = straight.steps // 2
    digests = [r["digest"] for r in _rank_records(dumps["straight"])]
    if ngpus >= 2:
        out = [params_check(digests, straight.steps, "engine: ranks in sync")]
    else:
        out = [skip_check("engine: ranks in sync", "skipped: one GPU, one rank")]
    records = _metrics(straight.save_dir)
    counts = [int(r["images"]) for r in records if r["kind"] == "eval"]
    out.append(count_check(counts, n_val, "engine: val pass counts"))
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    finite = bool(losses) and all(x is not None and math.isfinite(x) for x in losses)
    out.append(Check("engine: retrace at a second resolution",
                     finite and len(losses) == 2 * spe and small != large,
                     "epoch 0 at %d px, epoch 1 at %d px, eval at %d px: %d steps, losses %s"
                     % (small, large, large, len(losses),
                        " ".join("%.4f" % x if x is not None else "none" for x in losses)),
                     figures={"sizes": [small, large], "losses": losses}))
    observe_ranks(dumps["resumed"])
    resumed_dir = os.path.join(work_dir, "resumed")
    train(TrainConfig(save_dir=resumed_dir, max_steps=spe, **base))
    resumed = train(TrainConfig(save_dir=resumed_dir, resume=resumed_dir, **base))
    worst = None
    if straight.checkpoint and resumed is not None and resumed.checkpoint:
        worst = _max_rel_diff(read_file(straight.checkpoint)["state_dict"],
                              read_file(resumed.checkpoint)["state_dict"])
    out.append(equality_check(
        "engine: resume equals straight run", worst, AMP_RTOL / 2 if amp else 1e-5,
        "%d steps straight vs %d + resume from the epoch-0 checkpoint to %d"
        % (straight.steps, spe, straight.steps)))
    return out


# ---------------------------------------------------------------------------------- 5. bench

def bench_stage(ngpus: int, arch: str, batch: int, size: int, steps: int, warmup: int,
                work_dir: str, amp: bool = True, workers: Optional[int] = None) -> List[Check]:
    """The training path's speed: per-GPU img/s and data-wait over `steps` steps after
    `warmup`, and each rank's peak device memory. Two steps per epoch, one metrics record per
    step; only epoch-end records are timed (the first step of an epoch also holds the
    previous epoch's checkpoint and the loader's restart)."""
    from engine.config import TrainConfig
    from engine.trainer import train

    name = "bench %s %d px %s" % (arch, size, "AMP" if amp else "float32")
    classes = 8
    per_class = -(-2 * batch * ngpus // classes)
    data = _make_set(os.path.join(work_dir, "data-%d" % (batch * ngpus)), classes, per_class, 1,
                     workers)
    dump = os.path.join(work_dir, "ranks-" + arch)
    os.makedirs(dump, exist_ok=True)
    observe_ranks(dump)
    save_dir = os.path.join(work_dir, "run-" + arch)
    total = warmup + steps
    result = train(TrainConfig(data=data, arch=arch, batch_size=batch, ngpus=ngpus, amp=amp,
                               trace=True, image_size=size, epochs=total, max_steps=total,
                               print_freq=1, evaluate=False, progress=False, workers=workers,
                               save_dir=save_dir, seed=0))
    assert result is not None
    spe = classes * per_class // (batch * result.world_size)
    records = [r for r in _metrics(save_dir) if r["kind"] == "train"]
    timed = [r for r in records if r["step"] > warmup and r["step"] % spe == 0]
    world = result.world_size
    if not timed:
        return [Check(name, False, "no timed step came back (%d records)" % len(records))]
    per_gpu = statistics.median(r["img_s"] for r in timed) / world
    wait = statistics.median(r["data_wait"] for r in timed)
    ranks = _rank_records(dump)
    peak = max((r.get("peak_allocated", 0) for r in ranks), default=0)
    reserved = max((r.get("peak_reserved", 0) for r in ranks), default=0)
    finite = all(r["loss"] is not None and math.isfinite(r["loss"]) for r in records)
    detail = "%.0f img/s per GPU (%d GPU(s), batch %d per GPU, median of %d steps), data-wait " \
             "%.0f %%, peak memory %s" % (
                 per_gpu, world, batch, len(timed), 100 * wait,
                 "%.1f GB allocated / %.1f GB reserved" % (peak / 1e9, reserved / 1e9)
                 if peak else "not reported (no CUDA)")
    if not finite:
        detail += "; the loss is NOT FINITE"
    return [Check(name, per_gpu > 0 and finite, detail,
                  figures={"arch": arch, "image_size": size, "amp": amp, "gpus": world,
                           "batch_per_gpu": batch, "img_s_per_gpu": round(per_gpu, 1),
                           "data_wait": round(wait, 4), "peak_allocated_bytes": peak,
                           "peak_reserved_bytes": reserved, "timed_steps": len(timed)})]
