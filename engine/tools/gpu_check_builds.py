"""What a MegEngine build needs from this machine: the published builds (their CUDA and cuDNN
versions and the compute capabilities they have kernels for), the pure decisions against them
(which build a GPU needs, whether the driver runs the build's CUDA runtime, whether MegEngine
sees the GPUs nvidia-smi lists), and the probes that read the installed build and the driver
without creating a CUDA context.

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

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from engine.tools.gpu_check_report import Check

__all__ = ["BUILDS", "Build", "INDEX_URL", "MIN_DRIVER", "MINOR_COMPAT_DRIVER", "build_info",
           "compute_capability_check", "describe_build", "driver_check", "driver_gpu_count",
           "driver_version", "format_cuda_version", "format_cudnn_version", "kernel_sms",
           "required_builds", "visibility_check"]

#: MegEngine's own wheel index (its README's install command uses it with `pip -f`).
INDEX_URL = "https://www.megengine.org.cn/whl/mge.html"


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



# ------------------------------------------------------------------------------ the probes


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

