#!/usr/bin/env python3
"""Training-step throughput per architecture and mode, with the input already on the device.

For each (arch, image size, mode) it builds the model, a GradManager and SGD (momentum 0.9,
wd 1e-4, as the trainer does) and the real step from engine.steps.TrainStep
(normalize on the device, forward, backward, optimizer update). The uint8 batch and the labels
are created once as device tensors, outside the timing, so no loader and no host->device copy
is measured: this is the model's ceiling, which bench_e2e compares the loader-fed loop against.

Modes: eager (no trace), trace (jit.trace, symbolic), amp (trace + mixed precision; CUDA only,
skipped with a note on CPU, where MegEngine's float16 gives nan). The first --warmup steps
(which compile the trace) are excluded; then --steps steps are timed with a full device sync
after every --sync-every steps, and the median of those timings gives img/s.

With --ema DECAY each (arch, size, mode) is also timed with the weights' moving average
(engine.ema.ModelEMA) updated after every step, two ways: "separate", the average as a graph of
its own run after each step (how the trainer updated it before the update was folded into the
step), and "folded", TrainStep(ema=...), the update inside the step's own graph (how the
trainer runs it now). The three are timed in interleaved rounds (one chunk of each per round),
and the EMA's cost per step is the median over the rounds of each variant's time minus the
plain step's in the same round; the JSON's "ema_cost" lists it.

Defaults depend on the device: on a CUDA GPU resnet18,resnet50 at batch 128 and 160, 192 and
224 px (the sizes of the sizing note in BENCHMARKS.md), 20 timed steps after 5 warm-up; on
CPU resnet18,resnet50 at batch 8, 64 px, 3 timed steps after 2 warm-up (a few minutes on 2
cores; the second warm-up step absorbs first-run allocation costs)."""
import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name, finish, log, md_table  # noqa: E402

import numpy as np  # noqa: E402

MODES = ("eager", "trace", "amp")

# (archs, batch size, image sizes, timed steps, warm-up steps, sync every)
GPU_DEFAULTS = ("resnet18,resnet50", 128, "160,192,224", 20, 5, 1)
CPU_DEFAULTS = ("resnet18,resnet50", 8, "64", 3, 2, 1)


def device_name() -> str:
    """'cuda: <GPU name>' or 'cpu: <CPU model>'."""
    from engine.steps import cuda_available

    if cuda_available():
        try:
            import megengine as mge

            props = mge.device.get_cuda_device_property(0)
            if getattr(props, "name", None):
                return "cuda: %s" % props.name
        except Exception:  # noqa: BLE001 - the name is cosmetic
            pass
        try:
            name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10).stdout.splitlines()
            if name:
                return "cuda: %s" % name[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
        return "cuda"
    return "cpu: %s (%d cores)" % (cpu_name(), os.cpu_count() or 0)


def sync() -> None:
    """Wait for every queued device operation (the optimizer update included)."""
    import megengine as mge

    if hasattr(mge, "_full_sync"):
        mge._full_sync()


EMA_VARIANTS = ("none", "separate", "folded")


class SeparateEMA:
    """A train step followed by the EMA update as a graph of its own (skipped with the step)."""

    def __init__(self, step, ema):
        self.step, self.ema = step, ema

    def __call__(self, images, labels):
        loss = self.step(images, labels)
        if not self.step.last_step_skipped:
            self.ema.update(self.step.model)
        return loss


def build_step(arch: str, mode: str, num_classes: int, ema: str = "none",
               ema_decay: float = 0.9999):
    """Model + GradManager + SGD + engine.steps train step, as engine.trainer builds them;
    `ema` says whether and how a ModelEMA follows the weights (see EMA_VARIANTS)."""
    import megengine.optimizer as optim
    from megengine.autodiff import GradManager

    from engine.ema import ModelEMA
    from engine.models import get_model
    from engine.steps import TrainStep

    model = get_model(arch, num_classes=num_classes)
    model.train()
    gm = GradManager().attach(model.parameters())
    opt = optim.SGD(model.parameters(), lr=0.0125, momentum=0.9, weight_decay=1e-4)
    trace = mode != "eager"
    average = ModelEMA(model, ema_decay, trace=trace) if ema != "none" else None
    step = TrainStep(model, gm, opt, trace=trace, amp=mode == "amp",
                     ema=average if ema == "folded" else None)
    return SeparateEMA(step, average) if ema == "separate" else step


def time_interleaved(built: Dict[str, Any], images, labels, *, steps: int, warmup: int,
                     sync_every: int):
    """Seconds per step of each timed chunk of `sync_every` steps (each ended by a full device
    sync; the `warmup` steps first are untimed), for several variants of a step at once, in
    rounds: each round times one chunk of each variant in turn, so a machine whose load drifts
    (other jobs, thermal limits) shifts every variant alike. Returns ({variant: seconds per
    step of each chunk}, {variant: last loss})."""
    for step in built.values():
        for _ in range(warmup):
            step(images, labels).numpy()
    sync()
    timings: Dict[str, List[float]] = {v: [] for v in built}
    losses: Dict[str, float] = {}
    done = 0
    while done < steps:
        k = min(sync_every, steps - done)
        for variant, step in built.items():
            t0 = time.perf_counter()
            for _ in range(k):
                loss = step(images, labels)
            loss.numpy()
            sync()
            timings[variant].append((time.perf_counter() - t0) / k)
            losses[variant] = float(loss.numpy())
        done += k
    return timings, losses


def paired_cost(timings: Dict[str, List[float]], variant: str) -> float:
    """ms per step that `variant` adds over "none": the median of the per-round differences
    (each round's two timings saw the same machine load)."""
    return statistics.median(a - b for a, b in zip(timings[variant], timings["none"])) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=None,
                   help="comma-separated, from engine.models.ARCHS (default resnet18,resnet50)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 on GPU, 8 on CPU")
    p.add_argument("--image-size", default=None,
                   help="pixels, or a comma list (default 160,192,224 GPU / 64 CPU)")
    p.add_argument("--modes", default="eager,trace,amp",
                   help="comma list of eager, trace, amp (amp is skipped on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU / 3 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first; the first compiles the trace (default 5 GPU / 2 CPU)")
    p.add_argument("--sync-every", type=int, default=None,
                   help="steps per timing, each ended by a full device sync (default 1)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="also time each step with an EMA of the weights, as a separate graph "
                        "and folded into the step; the JSON's ema_cost is ms/step over none")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from engine.models import ARCHS
    from engine.steps import cuda_available

    gpu = cuda_available()
    d_archs, d_bs, d_sizes, d_steps, d_warm, d_sync = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    archs = [x for x in (a.archs or d_archs).split(",") if x]
    sizes = [int(x) for x in str(a.image_size or d_sizes).split(",") if x]
    bs = a.batch_size or d_bs
    steps = a.steps if a.steps is not None else d_steps
    warmup = a.warmup if a.warmup is not None else d_warm
    sync_every = max(1, a.sync_every or d_sync)
    modes = [m for m in a.modes.split(",") if m]
    bad = [x for x in archs if x not in ARCHS] + [m for m in modes if m not in MODES]
    if bad:
        p.error("unknown arch/mode %s; archs: %s; modes: %s"
                % (", ".join(bad), ", ".join(ARCHS), ", ".join(MODES)))
    if steps < 1 or warmup < 0 or bs < 1 or any(s < 32 for s in sizes):
        p.error("need --steps >= 1, --warmup >= 0, --batch-size >= 1, --image-size >= 32")
    if a.ema is not None and not 0 < a.ema < 1:
        p.error("--ema must be in (0, 1)")
    variants = EMA_VARIANTS if a.ema is not None else ("none",)
    notes = []
    if "amp" in modes and not gpu:
        modes.remove("amp")
        notes.append("amp skipped: no CUDA GPU (MegEngine's CPU float16 gives nan)")
        log("bench_train: " + notes[-1])

    import megengine as mge

    device = device_name()
    rng = np.random.default_rng(a.seed)
    results, rows, ema_cost = [], [], []
    for size in sizes:
        # One batch per size, created once on the device, outside every timing.
        images = mge.tensor(rng.integers(0, 256, (bs, 3, size, size), dtype=np.uint8))
        labels = mge.tensor(rng.integers(0, a.num_classes, (bs,)).astype(np.int32))
        for arch in archs:
            for mode in modes:
                built = {}
                for variant in variants:
                    mge.random.seed(a.seed)
                    built[variant] = build_step(arch, mode, a.num_classes, variant,
                                                a.ema if a.ema is not None else 0.9999)
                timings, losses = time_interleaved(built, images, labels, steps=steps,
                                                   warmup=warmup, sync_every=sync_every)
                ms = {v: statistics.median(t) * 1e3 for v, t in timings.items()}
                for variant in variants:
                    per_step, loss, med = timings[variant], losses[variant], ms[variant] / 1e3
                    img_s = bs / med
                    label = mode if variant == "none" else "%s+ema %s" % (mode, variant)
                    log("%-10s %4d px %-20s %8.1f img/s  (%s ms/step, loss %.3f)"
                        % (arch, size, label, img_s,
                           ", ".join("%.0f" % (t * 1e3) for t in per_step), loss))
                    result = {"arch": arch, "mode": mode, "img_s": round(img_s, 2),
                              "batch_size": bs, "image_size": size,
                              "ms_per_step": round(med * 1e3, 2), "timed_steps": steps,
                              "loss_finite": bool(np.isfinite(loss))}
                    row = [arch, size, mode, img_s, med * 1e3]
                    if a.ema is not None:
                        result["ema"] = variant
                        row[3:3] = [variant]
                        row.append(paired_cost(timings, variant))
                    results.append(result)
                    rows.append(tuple(row))
                del built
                if a.ema is not None:
                    ema_cost.append({"arch": arch, "image_size": size, "mode": mode,
                                     "step_ms": round(ms["none"], 2),
                                     "separate_ms": round(paired_cost(timings, "separate"), 2),
                                     "folded_ms": round(paired_cost(timings, "folded"), 2)})
    header = ["arch", "px", "mode", "img/s (median)", "ms/step"]
    figures = {"device": device, "cuda": gpu, "batch_size": bs, "image_sizes": sizes,
               "steps": steps, "warmup": warmup, "sync_every": sync_every,
               "num_classes": a.num_classes, "notes": notes, "results": results}
    if a.ema is not None:
        header[3:3] = ["ema"]
        header.append("EMA ms/step")
        figures.update(ema_decay=a.ema, ema_cost=ema_cost)
    finish(rows, header, figures,
           "bench_train: batch %d on %s, input already on the device%s"
           % (bs, device, "; " + "; ".join(notes) if notes else ""))


def _mode_label(x: Dict[str, Any]) -> str:
    return x["mode"] if x.get("ema", "none") == "none" else "%s+ema %s" % (x["mode"], x["ema"])


def markdown(results: Sequence[Dict[str, Any]]) -> List[str]:
    """BENCHMARKS.md lines for one or more results of this script (its JSON last lines)."""
    out: List[str] = []
    for r in results:
        if out:
            out.append("")
        out += ["Device: %s. %d warm-up step(s) excluded, median of %d timed steps, full sync "
                "every %d step(s)." % (r["device"], r["warmup"], r["steps"], r["sync_every"]),
                ""]
        for n in r.get("notes", []):
            out += ["Note: " + n + ".", ""]
        out += md_table(["arch", "px", "mode", "batch", "img/s", "ms/step"],
                        [(x["arch"], x["image_size"], _mode_label(x), x["batch_size"],
                          x["img_s"], x["ms_per_step"]) for x in r["results"]])
    return out


if __name__ == "__main__":
    main()
