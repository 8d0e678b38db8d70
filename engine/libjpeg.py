"""Where libjpeg-turbo is on this machine: the runtime library PyTurboJPEG loads
(libturbojpeg.so), and the headers and library the optional ROI decoder builds against
(jpeglib.h, libjpeg.so).

One rule for the three users: the loader's decoder (engine.data.decode), setup.py (which builds
the ROI decoder where the headers are and skips it with one line where they are not) and
tools/bootstrap.sh (which installs with apt-get only as root, and otherwise uses what is
there). The places a user's own copy lives come first, in this order:

    TURBOJPEG_LIB                 the library file itself, or a folder (or prefix) holding it
    CONDA_PREFIX                  an active conda environment (conda-forge's libjpeg-turbo)
    EBROOTLIBJPEGMINTURBO         an EasyBuild module (`module load libjpeg-turbo`)
    LD_LIBRARY_PATH, LIBRARY_PATH what a module system or the user put there
                                  (headers: CPATH, C_INCLUDE_PATH)

then the system's (the linker cache, /usr/lib/<arch>, /usr/lib64, /usr/local, /opt/libjpeg-turbo).

Only the standard library is imported, so bootstrap can run this file with any Python before
the virtualenv exists: `python engine/libjpeg.py` prints what it finds as shell assignments.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from typing import List, Mapping, NamedTuple, Optional, Tuple

__all__ = ["Found", "search_dirs", "find_runtime", "find_headers", "report"]

RUNTIME_NAMES = ("libturbojpeg.so.0", "libturbojpeg.so")
LINK_NAMES = ("libjpeg.so", "libjpeg.so.62", "libjpeg.so.8")
HEADER = "jpeglib.h"

SYSTEM_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                   "/usr/lib", "/usr/local/lib", "/usr/local/lib64", "/opt/libjpeg-turbo/lib64",
                   "/opt/libjpeg-turbo/lib")
SYSTEM_INCLUDE_DIRS = ("/usr/include", "/usr/local/include", "/opt/libjpeg-turbo/include")

# The package names each system's manager knows them by, for the advice.
HOW_TO_GET = ("apt-get install libturbojpeg0 libjpeg62-turbo-dev (as root), "
              "conda install -c conda-forge libjpeg-turbo (no root; then activate the "
              "environment), `module load libjpeg-turbo` where a module system has it, or "
              "TURBOJPEG_LIB=<the library or its prefix> for a copy of your own")


class Found(NamedTuple):
    path: str    # the library file (runtime), or the include folder (headers)
    source: str  # where it was found: a variable's name, or "the system"
    lib_dir: Optional[str] = None  # headers: the folder of libjpeg.so to link against


def _split(value: Optional[str]) -> List[str]:
    return [d for d in (value or "").split(os.pathsep) if d]


def _prefix_libs(prefix: str) -> List[str]:
    return [prefix, os.path.join(prefix, "lib"), os.path.join(prefix, "lib64")]


def search_dirs(env: Optional[Mapping[str, str]] = None,
                system: bool = True) -> List[Tuple[str, str]]:
    """(library folder, where it came from) in search order (see the module's docstring); with
    `system` False, only the folders the environment names."""
    env = os.environ if env is None else env
    out: List[Tuple[str, str]] = []
    explicit = env.get("TURBOJPEG_LIB")
    if explicit:
        if os.path.isfile(explicit):
            out.append((os.path.dirname(os.path.abspath(explicit)), "TURBOJPEG_LIB"))
        else:
            out += [(d, "TURBOJPEG_LIB") for d in _prefix_libs(explicit)]
    for var in ("CONDA_PREFIX", "EBROOTLIBJPEGMINTURBO"):
        if env.get(var):
            out += [(d, var) for d in _prefix_libs(env[var])[1:]]
    for var in ("LD_LIBRARY_PATH", "LIBRARY_PATH"):
        out += [(d, var) for d in _split(env.get(var))]
    if system:
        out += [(d, "the system") for d in _ldconfig_dirs() + list(SYSTEM_LIB_DIRS)]
    seen, unique = set(), []
    for d, source in out:
        if d not in seen:
            seen.add(d)
            unique.append((d, source))
    return unique


def _ldconfig_dirs() -> List[str]:
    """The folders of libturbojpeg and libjpeg in the dynamic linker's cache."""
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            text = subprocess.run([ldconfig, "-p"], capture_output=True, text=True,
                                  timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        dirs = []
        for line in text.splitlines():
            if ("libturbojpeg.so" in line or "libjpeg.so" in line) and "=>" in line:
                d = os.path.dirname(line.split("=>", 1)[1].strip())
                if d not in dirs:
                    dirs.append(d)
        return dirs
    return []


def find_runtime(env: Optional[Mapping[str, str]] = None,
                 system: bool = True) -> Optional[Found]:
    """The libturbojpeg shared library PyTurboJPEG should load, or None; with `system` False,
    only a copy the environment points to (no linker-cache lookup, which costs a subprocess)."""
    env = os.environ if env is None else env
    explicit = env.get("TURBOJPEG_LIB")
    if explicit and os.path.isfile(explicit):
        return Found(os.path.abspath(explicit), "TURBOJPEG_LIB")
    for d, source in search_dirs(env, system):
        for name in RUNTIME_NAMES:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return Found(path, source)
    return None


def _has_link_lib(d: str) -> bool:
    return any(os.path.exists(os.path.join(d, n)) for n in LINK_NAMES) or bool(
        glob.glob(os.path.join(d, "libjpeg.so.*")))


def find_headers(env: Optional[Mapping[str, str]] = None) -> Optional[Found]:
    """The include folder holding jpeglib.h, with the folder of a libjpeg to link against
    beside it (None: the compiler's default), or None when there are no headers."""
    env = os.environ if env is None else env
    libs = search_dirs(env)
    candidates: List[Tuple[str, str]] = []
    for d, source in libs:
        if source != "the system":  # a prefix's lib -> its include
            candidates.append((os.path.join(os.path.dirname(d.rstrip("/")), "include"), source))
    for var in ("CPATH", "C_INCLUDE_PATH"):
        candidates += [(d, var) for d in _split(env.get(var))]
    candidates += [(d, "the system") for d in SYSTEM_INCLUDE_DIRS]
    for inc, source in candidates:
        if not os.path.isfile(os.path.join(inc, HEADER)):
            continue
        if source == "the system":
            return Found(inc, source)
        prefix_lib = [d for d, s in libs if s == source and _has_link_lib(d)]
        if prefix_lib:
            return Found(inc, source, prefix_lib[0])
        sibling = [d for d in _prefix_libs(os.path.dirname(inc.rstrip("/")))[1:]
                   if _has_link_lib(d)]
        return Found(inc, source, sibling[0] if sibling else None)
    return None


def report(env: Optional[Mapping[str, str]] = None) -> str:
    """What was found, as shell assignments (tools/bootstrap.sh reads them)."""
    rt, hd = find_runtime(env), find_headers(env)

    def q(v: Optional[str]) -> str:
        return "'%s'" % (v or "").replace("'", "'\\''")

    return "\n".join([
        "jpeg_runtime=%s" % q(rt.path if rt else None),
        "jpeg_runtime_from=%s" % q(rt.source if rt else None),
        "jpeg_include=%s" % q(hd.path if hd else None),
        "jpeg_include_from=%s" % q(hd.source if hd else None),
        "jpeg_link_dir=%s" % q(hd.lib_dir if hd else None),
    ])


if __name__ == "__main__":
    print(report())
    sys.exit(0)
