"""`make gpu-check`: the ten-minute answer for the first GPU machine. Does this machine's
MegEngine build run this engine correctly, on every GPU, through the engine's own launch and
training path, and how fast?

Every check prints one PASS/FAIL (or SKIP) line as it completes, then comes a summary table, a
summary line and, as the last line, one JSON object with every figure; the exit status is 1 if
any check failed. Nothing can hang or end in a bare traceback: each stage runs in a child
process of its own (the parent never touches CUDA, so the engine's launcher can fork ranks
from a clean process) with a deadline, after which its whole process group is killed and its
checks FAIL with the reason; a stage that raises or dies (a CUDA error, a segfault) FAILs with
its last words, and its full output stays in the log folder. A CPU machine has nothing to
check and exits 0.

The stages, in order (engine.tools.gpu_check_stages has the code that touches the GPUs):
1. build: MegEngine's CUDA/cuDNN versions against the driver's CUDA version (`driver_check`),
   the GPUs MegEngine sees against nvidia-smi, and every GPU's compute capability against the
   build's kernels (`compute_capability_check`);
2. device: a convolution on gpu0 against the CPU, and the engine's train step (eager, traced,
   traced AMP) on ResNet-18 against eager float32;
3. nccl: an all-reduce on all visible GPUs through the engine's launch path, exact on every
   rank, and its bus bandwidth;
4. engine: `engine.trainer.train` on all GPUs on a small generated and packed set: traced AMP
   ResNet-50 steps whose weights are identical on every rank, an eval that counts every val
   image exactly once, a retrace at a second resolution (progressive resizing), and a run
   resumed from its mid-run checkpoint that equals the straight run;
5. bench (unless --no-bench): the same training path for ResNet-18 and ResNet-50 at 224 px
   with AMP: per-GPU img/s, the share of time waiting for data, and peak GPU memory.

This module owns the plan (which stages run, their deadlines, the checks skipped up front), the
whole run and the command line. The decisions are pure functions: which build a compute
capability needs and whether a driver runs a build in engine.tools.gpu_check_builds, what
counts as "close" in engine.tools.gpu_check_verdicts, how lines, the table and the JSON are
written and the exit code in engine.tools.gpu_check_report. The stage runner
(engine.tools.gpu_check_runner) takes its plan as an argument, so all of them are tested on a
CPU machine.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from engine.cli import option, parse
from engine.errors import UserError, run_tool
from engine.tools.gpu_check_report import (
    Check,
    exit_code,
    format_check,
    json_line,
    skip_check,
    summary,
    summary_table,
)
from engine.tools.gpu_check_runner import Stage, run_stage, run_stages

__all__ = ["GpuCheckConfig", "STAGES", "main", "plan", "run_all", "step_losses"]


# ---------------------------------------------------------------------------------- the plan

STAGES = "engine.tools.gpu_check_stages"


def plan(n_gpus: int, usable: bool, config: "GpuCheckConfig", work_dir: str,
         factor: float = 1.0) -> Tuple[List[Stage], List[Check]]:
    """The stages after the build stage, and the checks skipped up front (with the reason)."""
    skipped: List[Check] = []
    gpu_names = ("conv forward+backward", "traced float32 step", "traced AMP step")
    engine_names = ("engine: ranks in sync", "engine: val pass counts",
                    "engine: retrace at a second resolution", "engine: resume equals straight run")
    bench_names = tuple("bench %s %d px AMP" % (a, config.bench_size)
                        for a in ("resnet18", "resnet50"))
    if not usable:
        why = "skipped: MegEngine cannot use these GPUs (see above)"
        names = gpu_names + ("NCCL all-reduce exact", "NCCL all-reduce bandwidth") + \
            engine_names + (bench_names if config.bench else ())
        return [], [skip_check(n, why) for n in names]
    stages = [Stage("device", STAGES + ":device_stage", 240 * factor, gpu_names)]
    if n_gpus >= 2:
        stages.append(Stage("nccl", STAGES + ":nccl_stage", 180 * factor,
                            ("NCCL all-reduce exact", "NCCL all-reduce bandwidth"),
                            {"ngpus": n_gpus}))
    else:
        skipped += [skip_check(n, "skipped: needs 2 GPUs, this machine has 1")
                    for n in ("NCCL all-reduce exact", "NCCL all-reduce bandwidth")]
    stages.append(Stage("engine", STAGES + ":engine_stage", 480 * factor, engine_names,
                        {"ngpus": n_gpus, "work_dir": os.path.join(work_dir, "engine")}))
    if config.bench:
        for arch, name in zip(("resnet18", "resnet50"), bench_names):
            stages.append(Stage("bench-" + arch, STAGES + ":bench_stage", 240 * factor, (name,),
                                {"ngpus": n_gpus, "arch": arch, "batch": config.bench_batch,
                                 "size": config.bench_size, "steps": config.bench_steps,
                                 "warmup": config.bench_warmup,
                                 "work_dir": os.path.join(work_dir, "bench")}))
    return stages, skipped



# ------------------------------------------------------------------------------ the whole run


def step_losses(mode: str, state: Dict[str, Any], images: Any, labels: Any, steps: int,
                arch: str = "resnet18", num_classes: int = 1000) -> Tuple[List[float], List[bool]]:
    """Losses of `steps` training steps from the weights `state`, in mode eager | trace | amp;
    plus whether AMP skipped each update (engine.tools.gpu_check_stages.step_losses)."""
    from engine.tools import gpu_check_stages

    return gpu_check_stages.step_losses(mode, state, images, labels, steps, arch, num_classes)


@dataclass
class GpuCheckConfig:
    """The tool's options (engine.cli derives its parser from these fields)."""

    bench: bool = option(True, "also measure resnet18/resnet50 img/s, data-wait and peak "
                               "memory through the training path (--no-bench skips it)")
    bench_batch: int = option(128, "images per GPU per step")
    bench_size: int = option(224, "image size (pixels)")
    bench_steps: int = option(20, "timed steps per measurement")
    bench_warmup: int = option(5, "untimed steps first")
    log_dir: Optional[str] = option(None, "folder for each stage's full output and results "
                                          "(default: a new temporary folder, printed at the end)",
                                    metavar="DIR")
    deadline_factor: float = option(1.0, "multiply every stage's deadline (slow machines, "
                                         "first-time CUDA kernel caches)", metavar="X")


def run_all(*, bench: bool = GpuCheckConfig.bench, bench_batch: int = GpuCheckConfig.bench_batch,
            bench_size: int = GpuCheckConfig.bench_size,
            bench_steps: int = GpuCheckConfig.bench_steps,
            bench_warmup: int = GpuCheckConfig.bench_warmup,
            log_dir: Optional[str] = None, deadline_factor: float = 1.0,
            emit: Callable[[str], None] = print,
            build_stage: Optional[Stage] = None,
            stages: Optional[Sequence[Stage]] = None) -> int:
    """Run every check, printing one line each as it completes, then the summary table, the
    summary line and the JSON line; returns the exit code. `build_stage` and `stages` replace
    the default plan (the tests give their own)."""
    config = GpuCheckConfig(bench, bench_batch, bench_size, bench_steps, bench_warmup, log_dir,
                            deadline_factor)
    folder = log_dir or tempfile.mkdtemp(prefix="gpu-check-")
    os.makedirs(folder, exist_ok=True)
    work_dir = os.path.join(folder, "work")
    t0 = time.monotonic()
    checks: List[Check] = []
    build = build_stage or Stage("build", STAGES + ":build_stage", 90 * deadline_factor,
                                 ("GPUs visible", "CUDA driver vs build"))
    first = run_stage(build, folder)
    info = next((c.figures for c in first if c.name == "build"), {})
    if any(c.name == "build" and c.figures.get("nothing_to_check") for c in first):
        emit("gpu-check: no CUDA GPU on this machine, nothing to check (installed: %s)"
             % info.get("described", "?"))
        if log_dir is None:  # nothing worth keeping
            shutil.rmtree(folder, ignore_errors=True)
        emit(json_line([], build=info, nothing_to_check=True,
                       log_dir=folder if log_dir else None))
        return 0
    if info.get("described"):
        emit("installed: %s" % info["described"])
    for c in first:
        if c.name != "build":
            checks.append(c)
            emit(format_check(c))
    try:
        if stages is None:
            usable = bool(first) and all(c.ok for c in first if c.name != "build")
            stages, skipped = plan(int(info.get("megengine_gpus", 0)), usable, config, work_dir,
                                   deadline_factor)
            for c in skipped:
                checks.append(c)
                emit(format_check(c))
        run_stages(stages, folder, emit, checks)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)  # data and checkpoints; the logs stay
    emit("")
    for line in summary_table(checks).splitlines():
        emit(line)
    emit("%s in %.0f s; logs in %s" % (summary(checks), time.monotonic() - t0, folder))
    emit(json_line(checks, build=info, log_dir=folder, seconds=round(time.monotonic() - t0, 1)))
    return exit_code(checks)


# ---------------------------------------------------------------------------------- the tool

DESCRIPTION = ("Check that the installed MegEngine runs this engine on this machine's GPUs, "
               "through the engine's own launch and training path: one PASS/FAIL line per check "
               "(each stage has a deadline), a summary table and a JSON last line; exit status "
               "1 if any check failed. A CPU machine: nothing to check, exit 0.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    c = parse(GpuCheckConfig, argv, DESCRIPTION)

    def run() -> int:
        if c.bench_batch < 1 or c.bench_size < 32 or c.bench_steps < 1 or c.bench_warmup < 0:
            raise UserError("need --bench-batch >= 1, --bench-size >= 32, --bench-steps >= 1, "
                            "--bench-warmup >= 0")
        if not c.deadline_factor > 0:
            raise UserError("--deadline-factor must be > 0")
        try:
            return run_all(**dataclasses.asdict(c))
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must still end in the contract
            failed = Check("gpu-check", False, "the check itself failed: %s: %s"
                           % (type(exc).__name__, " ".join(str(exc).split())))
            print(format_check(failed))
            print(summary([failed]))
            print(json_line([failed]))
            return 1

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
