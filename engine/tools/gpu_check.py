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

The decisions are pure functions (which build a compute capability needs, whether a driver runs
a build, what counts as "close", how lines, the table and the JSON are written, the exit code)
and the stage runner takes its plan as an argument, so both are tested on a CPU machine.

Build facts (MegEngine's own build scripts, scripts/whl/manylinux2014/build_wheel_common.sh and
CMakeLists.txt, at tags v1.13.0 and v1.13.4): the PyPI wheel is the cu101 build (CUDA 10.1,
cuDNN 7.6.3, kernels sm_52 sm_60 sm_61 sm_70 sm_75); cu111/cu112/cu114 add sm_80 sm_86; cu118
adds sm_89, and sm_90 only from v1.13.4. MegEngine refuses a GPU whose exact sm_XX is not among
its kernels when it creates the device ("... with CUDA capability sm_90 is not compatible with
the current MegEngine installation", src/core/impl/comp_node/cuda/comp_node.cpp), so PTX JIT
never gets a chance: the check here uses the same rule. The wheels bundle the CUDA runtime, so
the driver must support that runtime's version: a newer major version always does; within CUDA
11, NVIDIA's minor-version compatibility lets an older 11.x driver (>= 450.80.02) run a newer
11.x runtime's compiled kernels; CUDA 10 has no such compatibility.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from engine.cli import option, parse
from engine.errors import UserError, run_tool

__all__ = ["BUILDS", "Build", "Check", "GpuCheckConfig", "INDEX_URL", "Stage", "compare_losses",
           "compute_capability_check", "count_check", "describe_build", "driver_check",
           "exit_code", "format_check", "format_cuda_version", "format_cudnn_version",
           "json_line", "kernel_sms", "main", "params_check", "plan", "required_builds",
           "run_all", "run_stage", "run_stages", "skip_check", "split_range", "summary",
           "summary_table", "visibility_check", "build_info", "driver_gpu_count", "step_losses",
           "allreduce_check", "equality_check"]

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

#: The oldest Linux driver of each CUDA toolkit (NVIDIA's CUDA release notes, table 3).
MIN_DRIVER = {"10.1": "418.39", "11.1": "455.23", "11.2": "460.27.03", "11.4": "470.42.01",
              "11.8": "520.61.05"}
#: The oldest driver with CUDA 11's minor-version compatibility.
MINOR_COMPAT_DRIVER = "450.80.02"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    skipped: bool = False
    figures: Dict[str, Any] = field(default_factory=dict)
    seconds: Optional[float] = None  # the stage's wall time, for the summary table

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("pass" if self.ok else "fail")

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.figures:
            out["figures"] = self.figures
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 1)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Check":
        return cls(str(d["name"]), d["status"] != "fail", str(d.get("detail", "")),
                   skipped=d["status"] == "skip", figures=dict(d.get("figures") or {}))


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


def _version_tuple(text: Optional[str]) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text or ""))


def driver_check(build_cuda: int, driver_cuda: int,
                 driver_version: Optional[str] = None) -> Check:
    """Can this driver run the build's CUDA runtime? `build_cuda` and `driver_cuda` are
    MegEngine's numbers (major*1000 + minor*10: get_cuda_version, get_cuda_driver_version);
    `driver_version` is the driver's own (nvidia-smi), when known."""
    build, drv = format_cuda_version(build_cuda), format_cuda_version(driver_cuda)
    figures = {"build_cuda": build, "driver_cuda": drv, "driver": driver_version}
    said = " (driver %s)" % driver_version if driver_version else ""
    if build_cuda <= 0:
        return Check("CUDA driver vs build", False, "this MegEngine build has no CUDA (%s): "
                     "install a CUDA build (see compute capability below)" % build,
                     figures=figures)
    if driver_cuda <= 0:
        return Check("CUDA driver vs build", False,
                     "no CUDA driver answered (libcuda.so not found or not loadable): install the "
                     "NVIDIA driver, at least %s for CUDA %s" % (MIN_DRIVER.get(build, "?"),
                                                                   build), figures=figures)
    b_major, b_minor = build_cuda // 1000, (build_cuda % 1000) // 10
    d_major, d_minor = driver_cuda // 1000, (driver_cuda % 1000) // 10
    head = "the driver supports CUDA %s%s, the build's runtime is CUDA %s" % (drv, said, build)
    if (d_major, d_minor) >= (b_major, b_minor):
        return Check("CUDA driver vs build", True, head + ": supported", figures=figures)
    if d_major == b_major and b_major >= 11:
        ok = not driver_version or _version_tuple(driver_version) >= _version_tuple(
            MINOR_COMPAT_DRIVER)
        return Check("CUDA driver vs build", ok, head + (
            ": runs through CUDA 11 minor-version compatibility (compiled kernels only, no PTX "
            "JIT)" if ok else ": CUDA 11 minor-version compatibility needs driver >= %s; "
            "update the driver" % MINOR_COMPAT_DRIVER), figures=figures)
    return Check("CUDA driver vs build", False, head + (
        ": too old; update the driver to >= %s (CUDA %s), or install a MegEngine build for CUDA "
        "<= %s" % (MIN_DRIVER.get(build, "the CUDA %s driver" % build), build, drv)),
        figures=figures)


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


def params_check(digests: Sequence[Optional[str]], steps: int, name: str = "ranks in sync"
                 ) -> Check:
    """Data-parallel ranks must hold bit-identical parameters after the same steps."""
    ok = len(digests) >= 2 and None not in digests and len(set(digests)) == 1
    detail = "%d ranks, %d steps: parameter sha256 %s" % (
        len(digests), steps, " ".join((d or "missing")[:12] for d in digests))
    if not ok:
        detail += " differ" if None not in digests and len(digests) >= 2 else \
            " (a rank returned nothing, or only one rank ran)"
    return Check(name, ok, detail, figures={"digests": list(digests)})


def split_range(n: int, world: int, rank: int) -> Tuple[int, int]:
    """Rank's contiguous share [start, stop) of n items: disjoint, covering, sizes differ by <= 1
    (no padding, so a val pass counts every image exactly once)."""
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError("need world >= 1, 0 <= rank < world, n >= 0")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def count_check(counts: Sequence[Optional[int]], expected: int,
                name: str = "val pass counts") -> Check:
    """Each all-reduced image count of a sharded val pass must be exactly `expected`."""
    ok = len(counts) >= 1 and all(c == expected for c in counts)
    return Check(name, ok, "all-reduced image count %s, expected %d" % (list(counts), expected),
                 figures={"counts": list(counts), "expected": expected})


def allreduce_check(world: int, wrong_ranks: int, max_err: float, busbw_gbs: Optional[float],
                    size_mb: float, min_busbw_gbs: Optional[float]) -> List[Check]:
    """The all-reduce's verdicts: exact on every rank, and a bus bandwidth above the floor that
    a working peer-to-peer/NVLink path clears (None: no floor, e.g. the CPU test backend)."""
    exact = Check("NCCL all-reduce exact", wrong_ranks == 0 and world >= 2,
                  "%d ranks: %s (max abs error %.3g)" % (
                      world, "every rank got the exact sum" if wrong_ranks == 0 else
                      "%d rank(s) got a wrong sum" % wrong_ranks, max_err),
                  figures={"world": world, "wrong_ranks": wrong_ranks, "max_err": max_err})
    if busbw_gbs is None:
        return [exact, Check("NCCL all-reduce bandwidth", False, "no timing came back")]
    ok = min_busbw_gbs is None or busbw_gbs >= min_busbw_gbs
    detail = "%.1f GB/s bus bandwidth, %.0f MB float32 across %d GPUs" % (busbw_gbs, size_mb,
                                                                        world)
    if min_busbw_gbs is not None and not ok:
        detail += ("; below %.0f GB/s: the GPUs talk through the host or sockets (check "
                   "nvidia-smi topo -m, NCCL_P2P_DISABLE, NCCL_SHM_DISABLE)" % min_busbw_gbs)
    return [exact, Check("NCCL all-reduce bandwidth", ok, detail,
                         figures={"busbw_gbs": round(busbw_gbs, 2), "size_mb": size_mb})]


def equality_check(name: str, worst: Optional[float], tolerance: float, what: str) -> Check:
    """Two runs that must agree: `worst` is the largest relative difference found (None: one
    run is missing)."""
    if worst is None:
        return Check(name, False, "%s: nothing to compare (a run wrote no checkpoint)" % what)
    ok = math.isfinite(worst) and worst <= tolerance
    return Check(name, ok, "%s: max relative difference %.2e (tolerance %.0e)" % (what, worst,
                                                                               tolerance),
                 figures={"max_rel_diff": worst, "tolerance": tolerance})


# ---------------------------------------------------------------------------------- reporting


def format_check(c: Check) -> str:
    return "%s  %s: %s" % (c.status.upper(), c.name, c.detail)


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


def _headline(c: Check, width: int) -> str:
    text = c.detail if len(c.detail) <= width else c.detail[:width - 3] + "..."
    return text


def summary_table(checks: Sequence[Check], width: int = 72) -> str:
    """The table after the check lines: one row per check (status, stage seconds, detail)."""
    rows = [("check", "status", "s", "detail")]
    rows += [(c.name, c.status.upper(), "-" if c.seconds is None else "%.0f" % c.seconds,
              _headline(c, width)) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["%s  %s  %s  %s" % (r[0].ljust(widths[0]), r[1].ljust(widths[1]),
                                 r[2].rjust(widths[2]), r[3]) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def json_line(checks: Sequence[Check], **extra: Any) -> str:
    """The last line: every check with its figures, and `extra` (the build, the log folder)."""
    return json.dumps({"checks": [c.to_json() for c in checks],
                       "passed": sum(c.ok and not c.skipped for c in checks),
                       "failed": sum(not c.ok and not c.skipped for c in checks),
                       "exit_code": exit_code(checks), **extra}, default=str, sort_keys=True)


# ------------------------------------------------------------------- stages, with deadlines


@dataclass(frozen=True)
class Stage:
    """One child process: `target` ("module:function") called with `kwargs`, returning a list
    of Check; `names` are the checks it answers for, which FAIL with the reason when it dies
    or runs past `deadline` seconds."""

    name: str
    target: str
    deadline: float
    names: Tuple[str, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


_KILL_GRACE_S = 5.0
_CRASH = "stage %s"  # the one check of a stage function that raised


def _engine_root() -> str:
    import engine

    return os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))


def _last_words(log_path: str, limit: int = 300) -> str:
    """The last line of a stage's output that says something (MegEngine's CUDA-loading notes
    and blank lines skipped), shortened to `limit` characters."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines()[-200:]]
    except OSError:
        return ""
    said = [ln for ln in lines if ln and not ln.startswith(("debug:", "info:", "warning:"))]
    text = said[-1] if said else ""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _kill_group(proc: "subprocess.Popen[bytes]") -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(_KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage: Stage, log_dir: str) -> List[Check]:
    """Run `stage` in a child process (its own process group, so the ranks it forks go with
    it) and return its checks; a stage past its deadline is killed, and one that dies or
    returns nothing FAILs every check it answers for, naming the cause and its log file."""
    out_path = os.path.join(log_dir, "%s.json" % stage.name)
    log_path = os.path.join(log_dir, "%s.log" % stage.name)
    code = ("import sys; from engine.tools.gpu_check import run_stage_child; "
            "sys.exit(run_stage_child(sys.argv[1:]))")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_engine_root()] + [p for p in env.get(
        "PYTHONPATH", "").split(os.pathsep) if p])
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, stage.target, json.dumps(
            dict(stage.kwargs)), out_path], stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        try:
            status = proc.wait(stage.deadline)
            why = None
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status, why = None, "no answer within its %.0f s deadline: killed" % stage.deadline
        except BaseException:  # Ctrl-C: take the stage's processes down with this one
            _kill_group(proc)
            raise
    if status is not None:
        _kill_group(proc)  # ranks or servers the stage left behind
    seconds = time.monotonic() - t0
    checks: List[Check] = []
    if why is None:
        try:
            with open(out_path) as f:
                checks = [Check.from_json(d) for d in json.load(f)]
        except (OSError, ValueError, KeyError):
            checks = []
        if not checks:
            if status is not None and status < 0:
                why = "died with signal %s" % signal.Signals(-status).name
            else:
                why = "exited with status %s and no result" % status
    if why is not None:
        words = _last_words(log_path)
        reason = "stage %s %s%s (log: %s)" % (stage.name, why, "; last output: " + words
                                              if words else "", log_path)
        answered = {c.name for c in checks}
        checks += [Check(n, False, reason) for n in stage.names if n not in answered]
    crash = next((c for c in checks if c.name == _CRASH % stage.target.partition(":")[2]), None)
    if crash is not None and stage.names:
        # The stage raised: each check it answers for fails with the exception's line.
        checks = [Check(n, False, crash.detail) for n in stage.names]
    for c in checks:
        c.seconds = seconds
    return checks


def run_stage_child(argv: Sequence[str]) -> int:
    """The child's side of `run_stage`: call the target, write its checks as JSON. An exception
    is one FAIL check (its traceback goes to the stage's log)."""
    import importlib
    import traceback

    target, kwargs, out_path = argv[0], json.loads(argv[1]), argv[2]
    module, _, name = target.partition(":")
    try:
        checks = list(getattr(importlib.import_module(module), name)(**kwargs))
    except BaseException as exc:  # noqa: BLE001 - everything becomes a FAIL line
        traceback.print_exc()
        label = "" if isinstance(exc, UserError) else type(exc).__name__ + ": "
        checks = [Check(_CRASH % name, False, "%s%s" % (label, " ".join(str(exc).split())
                                                       or repr(exc)))]
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump([c.to_json() for c in checks], f, default=str)
    os.replace(tmp, out_path)
    return 0


def run_stages(stages: Sequence[Stage], log_dir: str, emit: Callable[[str], None] = print,
               checks: Optional[List[Check]] = None) -> List[Check]:
    """Run each stage in turn, printing each check's line as its stage completes."""
    out = [] if checks is None else checks
    for stage in stages:
        for c in run_stage(stage, log_dir):
            out.append(c)
            emit(format_check(c))
    return out


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


def build_info() -> Dict[str, Any]:
    """What the installed MegEngine was built with (no CUDA context is created)."""
    import megengine as mge
    from megengine.core._imperative_rt.common import get_supported_sm_versions

    dev = mge.device
    return {"version": mge.__version__, "cuda": int(dev.get_cuda_version()),
            "cudnn": int(dev.get_cudnn_version()), "gencode": str(get_supported_sm_versions()),
            "driver_cuda": int(dev.get_cuda_driver_version())}


def _nvidia_smi(*args: str) -> Optional[str]:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def driver_gpu_count() -> Optional[int]:
    """GPUs nvidia-smi lists, or None without nvidia-smi."""
    out = _nvidia_smi("-L")
    return None if out is None else sum(1 for ln in out.splitlines() if ln.startswith("GPU "))


def driver_version() -> Optional[str]:
    out = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
    return out.splitlines()[0].strip() if out and out.strip() else None


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
