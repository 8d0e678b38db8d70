"""`make gpu-check`: does this machine's MegEngine build run this engine correctly on its GPUs?
One PASS/FAIL line per check with its figures, exit status 1 if any check failed; a CPU machine
has nothing to check and exits 0.

The decisions are pure functions (which build a compute capability needs, what counts as "close
to eager", how a line is printed, the exit code), so they are tested on a CPU machine; the
runners below them gather the figures from MegEngine and the GPUs.

Build facts (MegEngine's own build scripts, scripts/whl/manylinux2014/build_wheel_common.sh and
CMakeLists.txt, at tags v1.13.0 and v1.13.4): the PyPI wheel is the cu101 build (CUDA 10.1,
cuDNN 7.6.3, kernels sm_52 sm_60 sm_61 sm_70 sm_75); cu111/cu112/cu114 add sm_80 sm_86; cu118
adds sm_89, and sm_90 only from v1.13.4. MegEngine refuses a GPU whose exact sm_XX is not among
its kernels when it creates the device ("... with CUDA capability sm_90 is not compatible with
the current MegEngine installation", src/core/impl/comp_node/cuda/comp_node.cpp), so PTX JIT
never gets a chance: the check here uses the same rule.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from engine.cli import option, parse
from engine.errors import UserError, run_tool

__all__ = ["BUILDS", "Build", "Check", "GpuCheckConfig", "INDEX_URL", "compare_losses",
           "compute_capability_check", "count_check", "describe_build", "exit_code",
           "format_check", "format_cuda_version", "format_cudnn_version", "kernel_sms", "main",
           "params_check", "required_builds", "run_all", "skip_check", "split_range", "summary",
           "visibility_check"]

#: MegEngine's own wheel index (its README's install command uses it with `pip -f`).
INDEX_URL = "https://www.megengine.org.cn/whl/mge.html"

#: float32 traced vs eager: same math, possibly other cuDNN algorithms.
FP32_RTOL = 1e-3
#: AMP (float16 convolutions) vs float32 eager.
AMP_RTOL = 2e-2


@dataclass(frozen=True)
class Build:
    sdk: str             # the SDK_NAME of MegEngine's build script, the wheel's "+<sdk>" label
    cuda: str
    cudnn: str
    sms: Tuple[int, ...]  # compute capabilities with compiled kernels (code=sm_XX)
    where: str


BUILDS: Tuple[Build, ...] = (
    Build("cu101", "10.1", "7.6.3", (52, 60, 61, 70, 75),
          "PyPI (`pip install megengine==1.13.x`) and " + INDEX_URL),
    Build("cu111", "11.1", "8.0.4", (61, 70, 75, 80, 86), INDEX_URL),
    Build("cu112", "11.2", "8.0.4", (61, 70, 75, 80, 86), INDEX_URL),
    Build("cu114", "11.4", "8.2.1", (61, 70, 75, 80, 86), INDEX_URL),
    Build("cu118", "11.8", "8.6.0", (61, 70, 75, 80, 86, 89), "1.13.0-1.13.3 at " + INDEX_URL),
    Build("cu118", "11.8", "8.6.0", (61, 70, 75, 80, 86, 89, 90), "1.13.4 at " + INDEX_URL),
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    skipped: bool = False
    figures: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- builds


def kernel_sms(gencode: str) -> List[int]:
    """Compute capabilities with compiled kernels in a `-gencode ...` string, in order.

    Only `code=sm_XX` counts, as in MegEngine's own device check; `code=compute_XX` is PTX.
    """
    return sorted({int(m) for m in re.findall(r"code=sm_(\d+)", gencode or "")})


def format_cuda_version(v: int) -> str:
    """MegEngine's CUDA number (major*1000 + minor*10) -> '10.1'."""
    return "%d.%d" % (v // 1000, (v % 1000) // 10) if v and v > 0 else "none"


def format_cudnn_version(v: int) -> str:
    """MegEngine's cuDNN number (major*1000 + minor*100 + patch) -> '7.6.3'."""
    return "%d.%d.%d" % (v // 1000, (v % 1000) // 100, v % 100) if v and v > 0 else "none"


def describe_build(version: str, cuda: int, cudnn: int, gencode: str) -> str:
    sms = kernel_sms(gencode)
    ptx = sorted({int(m) for m in re.findall(r"code=compute_(\d+)", gencode or "")})
    return "MegEngine %s, CUDA %s, cuDNN %s, kernels for %s%s" % (
        version, format_cuda_version(cuda), format_cudnn_version(cudnn),
        " ".join("sm_%d" % s for s in sms) or "no GPU",
        " (+PTX %s)" % " ".join("compute_%d" % p for p in ptx) if ptx else "")


def required_builds(cc: int) -> List[Build]:
    """The published MegEngine builds with kernels for compute capability `cc` (e.g. 90)."""
    return [b for b in BUILDS if cc in b.sms]


def _advice(cc: int) -> str:
    builds = required_builds(cc)
    if not builds:
        return ("no published MegEngine 1.13 build has sm_%d kernels; build MegEngine from source "
                "with -DMGE_CUDA_GENCODE including arch=compute_%d,code=sm_%d" % (cc, cc, cc))
    if builds[0].sdk == "cu101":
        return "any build works; the PyPI wheel (cu101) is the default"
    names = []
    for b in builds:
        label = "%s (CUDA %s, cuDNN %s; %s)" % (b.sdk, b.cuda, b.cudnn, b.where)
        if label not in names:
            names.append(label)
    return "needs " + " or ".join(names)


def compute_capability_check(device: int, name: str, cc: int, gencode: str) -> Check:
    sms = kernel_sms(gencode)
    ok = cc in sms
    detail = "gpu%d %s is sm_%d; installed kernels: %s; %s" % (
        device, name, cc, " ".join("sm_%d" % s for s in sms) or "none (a CPU-only build)",
        "supported" if ok else _advice(cc))
    return Check("compute capability gpu%d" % device, ok, detail,
                 figures={"device": device, "name": name, "sm": cc, "kernels": sms})


def visibility_check(megengine_gpus: int, driver_gpus: Optional[int]) -> Optional[Check]:
    """None when there is nothing to check (no GPU anywhere); else whether MegEngine sees them.

    `driver_gpus` is what nvidia-smi lists (None when it is not installed).
    """
    if megengine_gpus == 0 and not driver_gpus:
        return None
    ok = megengine_gpus > 0 and (driver_gpus is None or megengine_gpus == driver_gpus)
    detail = "MegEngine sees %d GPU(s)" % megengine_gpus
    if driver_gpus is not None:
        detail += ", nvidia-smi lists %d" % driver_gpus
    if not ok:
        detail += ("; check CUDA_VISIBLE_DEVICES and the driver (MegEngine's 'failed to load cuda "
                   "func' lines on import name what is missing)")
    return Check("GPUs visible", ok, detail,
                 figures={"megengine": megengine_gpus, "nvidia_smi": driver_gpus})


# ------------------------------------------------------------------------------- comparisons


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-6)


def compare_losses(name: str, reference: Sequence[float], candidate: Sequence[float],
                   rtol: float, skipped_updates: Sequence[bool] = ()) -> Check:
    """Losses of the same steps (same initial weights, same batches) against eager float32.

    Every loss must be finite and within `rtol` (relative) of the reference. After an AMP step
    whose update was skipped (overflow) the trajectories legitimately part, so only the losses
    up to and including that step are compared.
    """
    n = len(reference)
    if len(candidate) != n or n == 0:
        return Check(name, False, "got %d losses for %d reference steps" % (len(candidate), n))
    upto = n
    for i, s in enumerate(skipped_updates):
        if s:
            upto = i + 1
            break
    finite = all(math.isfinite(x) for x in candidate)
    worst = max(abs(c - r) / max(abs(r), 1e-6) for r, c in zip(reference[:upto], candidate[:upto]))
    ok = finite and all(_close(r, c, rtol) for r, c in zip(reference[:upto], candidate[:upto]))
    detail = "losses %s vs eager %s (max rel diff %.2e, tolerance %.0e)%s" % (
        " ".join("%.5f" % x for x in candidate), " ".join("%.5f" % x for x in reference), worst,
        rtol, "" if finite else "; NOT FINITE")
    if upto < n:
        detail += "; update %d skipped by the loss scaler, later steps not compared" % upto
    return Check(name, ok, detail, figures={"losses": list(candidate), "eager": list(reference),
                                            "max_rel_diff": worst})


def params_check(digests: Sequence[Optional[str]], steps: int) -> Check:
    """Data-parallel ranks must hold bit-identical parameters after the same steps."""
    ok = len(digests) >= 2 and None not in digests and len(set(digests)) == 1
    detail = "%d ranks, %d steps: parameter sha256 %s" % (
        len(digests), steps, " ".join((d or "missing")[:12] for d in digests))
    if not ok:
        detail += " differ" if None not in digests else " (a rank returned nothing)"
    return Check("ranks in sync", ok, detail, figures={"digests": list(digests)})


def split_range(n: int, world: int, rank: int) -> Tuple[int, int]:
    """Rank's contiguous share [start, stop) of n items: disjoint, covering, sizes differ by <= 1
    (no padding, so a val pass counts every image exactly once)."""
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError("need world >= 1, 0 <= rank < world, n >= 0")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def count_check(counts: Sequence[Optional[int]], expected: int) -> Check:
    """Each rank's all-reduced image count of a sharded val pass must be exactly `expected`."""
    ok = len(counts) >= 1 and all(c == expected for c in counts)
    return Check("val pass counts", ok, "all-reduced image count per rank %s, expected %d"
                 % (list(counts), expected), figures={"counts": list(counts),
                                                      "expected": expected})


# ---------------------------------------------------------------------------------- reporting


def format_check(c: Check) -> str:
    return "%s  %s: %s" % ("SKIP" if c.skipped else ("PASS" if c.ok else "FAIL"), c.name, c.detail)


def exit_code(checks: Sequence[Check]) -> int:
    """1 when any check failed (a skipped one does not count), else 0."""
    return 1 if any(not c.ok and not c.skipped for c in checks) else 0


def summary(checks: Sequence[Check]) -> str:
    passed = sum(c.ok and not c.skipped for c in checks)
    failed = sum(not c.ok and not c.skipped for c in checks)
    skipped = sum(c.skipped for c in checks)
    return "gpu-check: %d passed, %d failed, %d skipped" % (passed, failed, skipped)


def skip_check(name: str, why: str) -> Check:
    return Check(name, True, why, skipped=True)


# --------------------------------------------------------------------------------------------
# Runners: the only code here that touches MegEngine and the GPUs (exercised by `make gpu-check`
# on a GPU machine; a CPU machine stops at "nothing to check").
# --------------------------------------------------------------------------------------------


def build_info() -> Dict[str, Any]:
    """What the installed MegEngine was built with (no CUDA context is created)."""
    import megengine as mge
    from megengine.core._imperative_rt.common import get_supported_sm_versions

    dev = mge.device
    return {"version": mge.__version__, "cuda": int(dev.get_cuda_version()),
            "cudnn": int(dev.get_cudnn_version()), "gencode": str(get_supported_sm_versions()),
            "driver_cuda": int(dev.get_cuda_driver_version())}


def driver_gpu_count() -> Optional[int]:
    """GPUs nvidia-smi lists, or None without nvidia-smi."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _device_props(n: int) -> List[Tuple[str, int]]:
    import megengine as mge

    # cuDeviceGetAttribute via MegEngine's fork-safe path: the launcher can still fork later.
    out = []
    for i in range(n):
        p = mge.device.get_cuda_device_property(i)
        out.append((str(p.name), int(p.major) * 10 + int(p.minor)))
    return out


def run_conv_check() -> Check:
    """A 3x3 convolution forward and backward on gpu0, against the same on MegEngine's CPU."""
    import time

    import megengine as mge
    import megengine.functional as F
    import numpy as np
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


def run_step_checks(steps: int = 3, batch: int = 16, size: int = 112,
                    modes: Sequence[str] = ("trace", "amp")) -> List[Check]:
    import numpy as np

    from engine.models import get_model

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
    labels = rng.integers(0, 1000, (batch,)).astype(np.int32)
    state = get_model("resnet18").state_dict()
    eager, _ = step_losses("eager", state, images, labels, steps)
    out = []
    for mode in modes:
        losses, skips = step_losses(mode, state, images, labels, steps)
        name = "traced float32 step" if mode == "trace" else "traced AMP step"
        out.append(compare_losses(name, eager, losses, FP32_RTOL if mode == "trace" else AMP_RTOL,
                                  skips))
    return out


def _dist_worker(n_val: int, steps: int) -> Dict[str, Any]:
    """One rank: the engine's traced step with its gradients all-reduced through the engine's
    process-group seam (engine.dist.group), then a sharded val pass."""
    import hashlib

    import megengine as mge
    import megengine.optimizer as optim
    import numpy as np
    from megengine.autodiff import GradManager

    from engine.dist import group
    from engine.models import get_model
    from engine.steps import TrainStep

    rank, world = group.get_rank(), group.get_world_size()
    model = get_model("resnet18", num_classes=10)
    group.broadcast_module(model)
    gm = GradManager().attach(model.parameters(), callbacks=group.allreduce_callback())
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    step = TrainStep(model, gm, opt, trace=True)
    rng = np.random.default_rng(1000 + rank)  # each rank its own batches, as in training
    for _ in range(steps):
        x = mge.tensor(rng.integers(0, 256, (8, 3, 64, 64), dtype=np.uint8))
        y = mge.tensor(rng.integers(0, 10, (8,)).astype(np.int32))
        step(x, y).numpy()
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.numpy().tobytes())
    model.eval()
    start, stop = split_range(n_val, world, rank)
    seen = 0
    for i in range(start, stop, 8):
        k = min(8, stop - i)
        logits = model(mge.tensor(rng.normal(size=(k, 3, 64, 64)).astype(np.float32)))
        seen += int(logits.shape[0])
    total = group.all_reduce_sum([seen])
    return {"rank": rank, "digest": h.hexdigest(), "count": int(total[0])}


def run_distributed_checks(ngpus: int, n_val: int = 37, steps: int = 3) -> List[Check]:
    """2 processes (gpu0, gpu1) through MegEngine's launcher; the parent must not have created a
    CUDA context yet. n_val is odd on purpose: an even split would hide padding."""
    import megengine.distributed as dist

    world = min(ngpus, 2)
    try:
        results = dist.launcher(_dist_worker, n_gpus=world, world_size=world)(n_val, steps)
    except Exception as exc:  # noqa: BLE001 - a rank failed; its traceback is printed above
        msg = "the %d-process run failed: %s: %s" % (world, type(exc).__name__, exc)
        return [Check("ranks in sync", False, msg), Check("val pass counts", False, msg)]
    return [params_check([r and r["digest"] for r in results], steps),
            count_check([r and r["count"] for r in results], n_val)]


def step_seconds(step: Any, images: Any, labels: Any, steps: int,
                 warmup: int) -> Tuple[List[float], float]:
    """Seconds of each of `steps` steps, each ended by a full device sync (the first `warmup`
    steps, which compile the trace, untimed), and the last loss."""
    import time

    import megengine as mge

    def sync() -> None:  # every queued device operation, the optimizer update included
        if hasattr(mge, "_full_sync"):
            mge._full_sync()

    for _ in range(warmup):
        step(images, labels).numpy()
    sync()
    per_step = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(images, labels)
        loss.numpy()
        sync()
        per_step.append(time.perf_counter() - t0)
    return per_step, float(loss.numpy())


def run_bench(archs: Sequence[str], modes: Sequence[str], batch: int, size: int, steps: int,
              warmup: int) -> List[Check]:
    """img/s of the engine's train step per (arch, mode), the input already on the device."""
    import statistics

    import megengine as mge
    import numpy as np

    rng = np.random.default_rng(0)
    images = mge.tensor(rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8))
    labels = mge.tensor(rng.integers(0, 1000, (batch,)).astype(np.int32))
    out = []
    for arch in archs:
        for mode in modes:
            name = "bench %s %s" % (arch, "float32" if mode == "trace" else mode)
            try:
                step = train_step(arch, mode, 1000, lr=0.0125)
                per_step, loss = step_seconds(step, images, labels, steps, warmup)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report, go on
                out.append(Check(name, False, "%s: %s" % (type(exc).__name__, exc)))
                continue
            img_s = batch / statistics.median(per_step)
            ok = math.isfinite(loss)
            out.append(Check(name, ok, "%.0f img/s (batch %d, %d px, median of %d steps), loss "
                             "%.3f" % (img_s, batch, size, steps, loss),
                             figures={"arch": arch, "mode": mode, "img_s": round(img_s, 1),
                                      "batch": batch, "image_size": size}))
            del step
    return out


@dataclass
class GpuCheckConfig:
    """The tool's options (engine.cli derives its parser from these fields)."""

    bench: bool = option(True, "also measure resnet18/resnet50 img/s (--no-bench skips it)")
    bench_batch: int = option(128, "images per step")
    bench_size: int = option(224, "image size (pixels)")
    bench_steps: int = option(20, "timed steps per measurement")
    bench_warmup: int = option(5, "untimed steps first")


def run_all(*, bench: bool = GpuCheckConfig.bench, bench_batch: int = GpuCheckConfig.bench_batch,
            bench_size: int = GpuCheckConfig.bench_size,
            bench_steps: int = GpuCheckConfig.bench_steps,
            bench_warmup: int = GpuCheckConfig.bench_warmup, emit=print) -> int:
    """Run every check, printing one line each as it completes; returns the exit code."""
    import json

    import megengine as mge

    info = build_info()
    build = describe_build(info["version"], info["cuda"], info["cudnn"], info["gencode"])
    n = int(mge.device.get_device_count("gpu"))
    vis = visibility_check(n, driver_gpu_count())
    if vis is None:
        emit("gpu-check: no CUDA GPU on this machine, nothing to check (installed: %s)" % build)
        return 0
    emit("installed: %s" % build)
    checks: List[Check] = []

    def record(c: Check) -> None:
        checks.append(c)
        emit(format_check(c))

    record(vis)
    usable = vis.ok
    if n:
        for i, (name, cc) in enumerate(_device_props(n)):
            c = compute_capability_check(i, name, cc, info["gencode"])
            record(c)
            usable = usable and c.ok
    gpu_checks = ["conv forward+backward", "traced float32 step", "traced AMP step"]
    if not usable:
        for name in gpu_checks + ["ranks in sync", "val pass counts"]:
            record(skip_check(name, "skipped: MegEngine cannot use these GPUs (see above)"))
    else:
        # Before any tensor exists in this process: the launcher's children need a CUDA-free
        # parent.
        if n >= 2:
            for c in run_distributed_checks(n):
                record(c)
        else:
            for name in ("ranks in sync", "val pass counts"):
                record(skip_check(name, "skipped: needs 2 GPUs, this machine has 1"))
        record(run_conv_check())
        for c in run_step_checks():
            record(c)
        if bench:
            for c in run_bench(("resnet18", "resnet50"), ("trace", "amp"), bench_batch,
                               bench_size, bench_steps, bench_warmup):
                record(c)
    emit(summary(checks))
    emit(json.dumps({"build": info, "checks": [
        {"name": c.name, "status": "skip" if c.skipped else ("pass" if c.ok else "fail"),
         "detail": c.detail, **({"figures": c.figures} if c.figures else {})} for c in checks]},
        default=str))
    return exit_code(checks)


# ---------------------------------------------------------------------------------- the tool

DESCRIPTION = ("Check that the installed MegEngine runs this engine on this machine's GPUs: one "
               "PASS/FAIL line per check with its figures, exit status 1 if any check failed. A "
               "CPU machine: nothing to check, exit 0.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    c = parse(GpuCheckConfig, argv, DESCRIPTION)

    def run() -> int:
        if c.bench_batch < 1 or c.bench_size < 32 or c.bench_steps < 1 or c.bench_warmup < 0:
            raise UserError("need --bench-batch >= 1, --bench-size >= 32, --bench-steps >= 1, "
                            "--bench-warmup >= 0")
        return run_all(**dataclasses.asdict(c))

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
