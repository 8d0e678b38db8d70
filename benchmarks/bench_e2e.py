#!/usr/bin/env python3
"""End to end: real training steps fed by the engine Loader vs the same model fed a fixed batch.

Both loops are the trainer's inner loop (engine/loop.py): `images, labels = next(batches)`,
`step(mge.tensor(images), mge.tensor(labels))`, a loss read every --sync-every steps. They use
the same traced step object; the only difference is where the batch comes from:
  loader     engine.data.Loader over the sample set (LMDB shards by default, --source raw for
             the JPEG folder), RandomResizedCrop + flip in worker processes;
  synthetic  one uint8 batch made once in host memory (the host->device copy is still paid, as
             in training), so the ratio loader/synthetic isolates what the input pipeline costs.
Reported: both img/s, their ratio, the data-wait fraction (time blocked in next(loader) / total
timed time), and the loader's capacity alone (no training) on the same warm workers.
Target: data-wait < 5 % whenever the loader's capacity exceeds the model's rate.

Defaults depend on the device: GPU resnet18 (the most input-hungry model), amp, batch 128,
224 px, 3 interleaved rounds of 50 timed steps per source; CPU resnet18, trace, batch 16, 32 px,
one round of 8 timed steps (the CPU model is so slow that the loader always keeps up: this checks
the machinery, not a GPU's appetite)."""
import argparse
import itertools
import os
import sys
import time
from typing import Any, Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
from bench_train import build_step, device_name, sync  # noqa: E402
from common import add_data_args, finish, log, md_table, sample_data, show  # noqa: E402

# (arch, mode, batch size, image size, timed steps, warm-up steps, sync every, repeats)
GPU_DEFAULTS = ("resnet18", "amp", 128, 224, 50, 5, 10, 3)
CPU_DEFAULTS = ("resnet18", "trace", 16, 32, 8, 2, 1, 1)


def warm_up(step, batches, warmup: int) -> None:
    """Untimed steps: compile the trace; for the loader, fork its workers and fill its ring."""
    import megengine as mge

    for _ in range(warmup):
        images, labels = next(batches)
        step(mge.tensor(images), mge.tensor(labels)).numpy()
    sync()


def timed_loop(step, batches, *, steps: int, sync_every: int):
    """(images, seconds, seconds blocked in next(batches)) over `steps` training steps."""
    import megengine as mge

    wait, n = 0.0, 0
    t0 = time.perf_counter()
    for i in range(steps):
        tw = time.perf_counter()
        images, labels = next(batches)
        wait += time.perf_counter() - tw
        loss = step(mge.tensor(images), mge.tensor(labels))
        n += len(labels)
        if (i + 1) % sync_every == 0:
            loss.numpy()  # as the trainer does at log time: the device catches up here
    loss.numpy()
    sync()
    return n, time.perf_counter() - t0, wait


def loader_capacity(batches, seconds: float) -> float:
    """img/s of the loader alone (batches taken as fast as they come)."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(batches)[1])
    return n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--source", choices=("packed", "raw"), default="packed",
                   help="read LMDB shards (default) or the raw JPEG folder")
    p.add_argument("--arch", default=None, help="default resnet18")
    p.add_argument("--mode", choices=("eager", "trace", "amp"), default=None,
                   help="default amp on GPU, trace on CPU (amp needs CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 GPU / 16 CPU")
    p.add_argument("--image-size", type=int, default=None, help="default 224 GPU / 32 CPU")
    p.add_argument("--workers", type=int, default=None,
                   help="loader processes (default: the Loader's, physical cores - 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50 GPU / 8 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 GPU / 2 CPU)")
    p.add_argument("--sync-every", type=int, default=None,
                   help="read the loss every N steps, as the trainer's print_freq (default 10 "
                        "GPU / 1 CPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved synthetic/loader rounds of --steps each, summed (default "
                        "3 GPU / 1 CPU)")
    p.add_argument("--loader-seconds", type=float, default=3.0,
                   help="how long to measure the loader alone (0 = skip)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from engine.data import Loader
    from engine.steps import cuda_available

    gpu = cuda_available()
    d_arch, d_mode, d_bs, d_size, d_steps, d_warm, d_sync, d_rep = (GPU_DEFAULTS if gpu
                                                                    else CPU_DEFAULTS)
    arch, mode = a.arch or d_arch, a.mode or d_mode
    bs, size = a.batch_size or d_bs, a.image_size or d_size
    steps = a.steps if a.steps is not None else d_steps
    warmup = max(1, a.warmup if a.warmup is not None else d_warm)
    sync_every = max(1, a.sync_every or d_sync)
    a.repeats = max(1, a.repeats or d_rep)
    if mode == "amp" and not gpu:
        p.error("--mode amp needs a CUDA GPU (MegEngine's CPU float16 gives nan); use trace")

    raw, packed = sample_data(a.data, a.packed, need_packed=a.source == "packed",
                              imagenet_like=a.imagenet_like)
    train_dir = os.path.join(packed if a.source == "packed" else raw, "train")
    loader = Loader(train_dir, batch_size=bs, train=True, image_size=size, workers=a.workers,
                    seed=a.seed)
    if len(loader) == 0:
        p.error("%s has fewer images than one batch (%d)" % (train_dir, bs))
    num_classes = loader.num_classes

    import megengine as mge

    mge.random.seed(a.seed)
    step = build_step(arch, mode, num_classes)
    rng = np.random.default_rng(a.seed)
    fixed = (rng.integers(0, 256, (bs, 3, size, size), dtype=np.uint8),
             rng.integers(0, num_classes, (bs,)).astype(np.int32))

    sources = {"synthetic": itertools.repeat(fixed), "loader": loader.stream()}
    totals = {k: [0, 0.0, 0.0] for k in sources}  # images, seconds, seconds waiting
    for name, batches in sources.items():
        warm_up(step, batches, warmup)
    for r in range(a.repeats):  # interleaved, alternating order: drift hits both alike
        for name in (["synthetic", "loader"] if r % 2 == 0 else ["loader", "synthetic"]):
            batches = sources[name]
            n, secs, wait = timed_loop(step, batches, steps=steps, sync_every=sync_every)
            totals[name] = [t + x for t, x in zip(totals[name], (n, secs, wait))]
            log("repeat %d %-9s %.2f img/s (data-wait %.3f)" % (r, name, n / secs, wait / secs))
    (syn_n, syn_t, syn_w), (ld_n, ld_t, ld_w) = totals["synthetic"], totals["loader"]
    syn_rate, syn_wait = syn_n / syn_t, syn_w / syn_t
    ld_rate, ld_wait = ld_n / ld_t, ld_w / ld_t
    batches = sources["loader"]
    capacity = loader_capacity(batches, a.loader_seconds) if a.loader_seconds > 0 else None
    if capacity is not None:
        log("loader alone: %.1f img/s" % capacity)
    workers = loader.workers
    loader.close()

    ratio = ld_rate / syn_rate
    applies = capacity is None or capacity > syn_rate
    rows = [("synthetic batch (fixed, host memory)", syn_rate, syn_wait, "1.00"),
            ("engine Loader (%s, %d workers)" % (a.source, workers), ld_rate, ld_wait,
             "%.2f" % ratio)]
    if capacity is not None:
        rows.append(("engine Loader alone (no training)", capacity, "-", "-"))
    device = device_name()
    finish(rows, ["%s %s, batch %d, %d px" % (arch, mode, bs, size), "img/s", "data-wait",
                  "x synthetic"],
           {"loader_train_img_s": round(ld_rate, 2), "synthetic_train_img_s": round(syn_rate, 2),
            "ratio": round(ratio, 4), "data_wait_fraction": round(ld_wait, 4),
            "synthetic_data_wait_fraction": round(syn_wait, 4),
            "loader_capacity_img_s": round(capacity, 1) if capacity is not None else None,
            "target_data_wait": 0.05, "target_applies": applies,
            "target_met": (ld_wait < 0.05) if applies else None,
            "arch": arch, "mode": mode, "batch_size": bs, "image_size": size,
            "workers": workers, "steps": steps, "repeats": a.repeats, "warmup": warmup,
            "sync_every": sync_every,
            "source": a.source, "device": device, "cuda": gpu, "data": show(train_dir)},
           "bench_e2e: %s on %s (%s)" % (show(train_dir), device, "data-wait target < 5 %"))


def markdown(results: Sequence[Dict[str, Any]]) -> List[str]:
    """BENCHMARKS.md lines for one or more results of this script (its JSON last lines)."""
    out: List[str] = []
    for r in results:
        if out:
            out.append("")
        rows = [("synthetic batch (same loop, fixed batch)", r["synthetic_train_img_s"],
                 r["synthetic_data_wait_fraction"], 1.0),
                ("engine Loader (%s, %d workers)" % (r["source"], r["workers"]),
                 r["loader_train_img_s"], r["data_wait_fraction"], r["ratio"]),
                ("engine Loader alone, no training", r.get("loader_capacity_img_s"), None, None)]
        if r.get("target_met") is None:
            verdict = "not applicable (the loader alone is slower than the model)"
        else:
            verdict = "**met**" if r["target_met"] else "**missed**"
        out += ["%s %s, batch %d, %d px on %s; %d x %d timed steps per source, interleaved."
                % (r["arch"], r["mode"], r["batch_size"], r["image_size"], r["device"],
                   r.get("repeats", 1), r["steps"]), ""]
        out += md_table(["input", "train img/s", "data-wait", "x synthetic"], rows)
        out += ["", "Target: data-wait < 5 %% whenever the loader alone is faster than the "
                "model: %s (data-wait %.1f %%)." % (verdict, 100 * r["data_wait_fraction"])]
    return out


if __name__ == "__main__":
    main()
