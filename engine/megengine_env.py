"""What `import megengine` needs from the file system, checked before MegEngine is imported.

MegEngine 1.13 opens its persistent kernel cache while it is being imported: it creates the
cache folder and opens `cache.bin` in it for appending. The folder is `$MGE_FASTRUN_CACHE_DIR`,
else `<MGE_HOME>/persistent_cache`, where MGE_HOME defaults to `$XDG_CACHE_HOME/megengine`, else
`~/.cache/megengine` (`MGE_FASTRUN_CACHE_TYPE=MEMORY` keeps the cache in memory and writes
nothing). Where that folder cannot be written (a read-only file system, a path below a regular
file, no permission) the import itself dies with an OSError, in every tool and before any of
the engine's own checks. `cache_problem()` takes the same two steps first and says, in one line
naming the variable to set, why they failed; `guard_import(error)` raises that as `error` just
before the first `import megengine` of the process.

On a machine without a CUDA driver, MegEngine's CUDA stub prints a five-line banner ("info: +
Failed to load CUDA driver library ...") and "debug: failed to load cuda func: ..." lines
straight to file descriptor 2 the first times it looks for a GPU, and numpy then warns twice that
"the smallest subnormal ... is zero" (MegEngine's libraries set flush-to-zero). The tools keep
that out of their output unless ENGINE_VERBOSE=1 (`quiet_megengine()`): MegEngine's first device
queries run right after its import with descriptor 2 caught, and everything caught is written
back except those lines. On such a machine the stub also prints a line in every forked child
(its fork handler looks for a CUDA context), so descriptor 2 points to /dev/null for the instant
of each fork (os.register_at_fork; no Python code runs in that window).

This module imports neither MegEngine nor any of the engine, so the tools' runner
(engine.errors.run_tool) can use it.
"""
from __future__ import annotations

import errno
import importlib.abc
import os
import sys
import tempfile
import types
import warnings
from importlib.machinery import ModuleSpec
from typing import Any, Callable, List, Mapping, Optional, Sequence

__all__ = ["megengine_home", "cache_dir", "cache_problem", "guard_import", "verbose",
           "is_noise", "quiet_megengine"]

#: Starts of the lines MegEngine's CUDA stub prints on a machine without a CUDA driver.
NOISE = (b"debug: failed to load cuda func:", b"info: +")


def megengine_home(environ: Optional[Mapping[str, str]] = None) -> str:
    """MegEngine's home folder, by its own rule (megengine/hub/hub.py _get_megengine_home):
    also where megengine.hub keeps downloaded weights."""
    env = os.environ if environ is None else environ
    return os.path.expanduser(
        env.get("MGE_HOME", os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "megengine")))


def cache_dir(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The folder `import megengine` writes its kernel cache to, or None where it keeps it in
    memory (megengine/utils/persistent_cache.py)."""
    env = os.environ if environ is None else environ
    if env.get("MGE_FASTRUN_CACHE_TYPE") == "MEMORY":
        return None
    return env.get("MGE_FASTRUN_CACHE_DIR") or os.path.expanduser(
        os.path.join(megengine_home(env), "persistent_cache"))


def _why(exc: OSError, folder: str) -> str:
    if exc.errno == errno.ENOTDIR:
        return "a part of that path is a file, not a folder"
    if exc.errno == errno.EEXIST:
        return "%s is a file, not a folder" % (exc.filename or folder)
    return {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.ENOSPC: "the disk is full",
            errno.EDQUOT: "the disk quota is exceeded"}.get(exc.errno, exc.strerror or str(exc))


def cache_problem(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Why `import megengine` would fail to create its kernel cache, naming the variable to
    set; None where it would not. Creates what the import would create anyway, no more."""
    env = os.environ if environ is None else environ
    folder = cache_dir(env)
    if folder is None:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "cache.bin"), "a"):
            pass
    except OSError as exc:
        if env.get("MGE_FASTRUN_CACHE_DIR"):
            source, fix = "named by MGE_FASTRUN_CACHE_DIR", "MGE_FASTRUN_CACHE_DIR"
        else:
            source = ("under MGE_HOME" if "MGE_HOME" in env else
                      "under XDG_CACHE_HOME, as MGE_HOME is unset" if "XDG_CACHE_HOME" in env
                      else "under ~/.cache, as neither MGE_HOME nor XDG_CACHE_HOME is set")
            fix = "MGE_HOME"
        return ("MegEngine cannot create its kernel cache in %s (%s): %s, and `import megengine` "
                "fails without it; set %s to a writable folder (or MGE_FASTRUN_CACHE_TYPE=MEMORY "
                "to keep that cache in memory)" % (folder, source, _why(exc, folder), fix))
    return None


def verbose(environ: Optional[Mapping[str, str]] = None) -> bool:
    """ENGINE_VERBOSE set (and not 0): show what MegEngine and numpy print on a CPU machine."""
    env = os.environ if environ is None else environ
    return env.get("ENGINE_VERBOSE", "") not in ("", "0")


def is_noise(line: bytes) -> bool:
    """Whether a line of output is MegEngine's CUDA-probing noise (see NOISE)."""
    return line.lstrip(b"\r").startswith(NOISE)


def _caught(fn: Callable[[], Any]) -> bytes:
    """Run fn() with file descriptor 2 caught; write back what it printed, less the noise
    lines, and return the noise."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to keep clean
        fn()
        return b""
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            fn()
        finally:
            try:
                sys.stderr.flush()
            except ValueError:
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().splitlines(keepends=True)
    kept = b"".join(line for line in lines if not is_noise(line))
    if kept:
        os.write(2, kept)
    return b"".join(line for line in lines if is_noise(line))


def _probe_devices(mge: types.ModuleType) -> None:
    """MegEngine's first device queries, which print the CUDA stub's lines on a CPU machine:
    the GPU count (a query, never a CUDA context: the launcher's children need none in the
    parent) and, once the stub has shown there is no driver, the default device's kind."""
    global _quiet_noise
    noise = _caught(lambda: mge.device.get_device_count("gpu"))
    if b"failed to load cuda func" in noise:
        _caught(mge.device.what_is_xpu)
    _quiet_noise = noise


_quiet = {"armed": False, "probed": False}
_quiet_noise = b""  # what the stub printed on the first query: it has no CUDA driver


_fork_saved: List[int] = []


def _before_fork() -> None:
    """Descriptor 2 to /dev/null for the fork itself: the CUDA stub's fork handler prints
    "failed to load cuda func: cuCtxGetCurrent" in every child a CPU machine forks (loader and
    packing workers, ranks). Only native fork handlers run in this window: no Python code."""
    try:
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    os.dup2(null, 2)
    os.close(null)
    _fork_saved.append(saved)


def _after_fork() -> None:
    if _fork_saved:
        saved = _fork_saved.pop()
        os.dup2(saved, 2)
        os.close(saved)


def _after_import(mge: types.ModuleType) -> None:
    if _quiet["armed"] and not _quiet["probed"]:
        _quiet["probed"] = True
        _probe_devices(mge)
        if b"failed to load cuda func" in _quiet_noise:
            os.register_at_fork(before=_before_fork, after_in_parent=_after_fork,
                                after_in_child=_after_fork)


def quiet_megengine(environ: Optional[Mapping[str, str]] = None) -> None:
    """Unless ENGINE_VERBOSE=1: keep MegEngine's CUDA-probing lines and numpy's two subnormal
    warnings out of this process's output (see the module's docstring). MegEngine is not
    imported here: its device queries run right after its first import, or now if it is
    imported already."""
    if verbose(environ) or _quiet["armed"]:
        return
    _quiet["armed"] = True
    warnings.filterwarnings("ignore", message="The value of the smallest subnormal for",
                            category=UserWarning)
    if "megengine" in sys.modules:
        _after_import(sys.modules["megengine"])
    elif not any(isinstance(f, _CheckBeforeImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckBeforeImport(None))


class _CheckBeforeImport(importlib.abc.MetaPathFinder):
    """On the first `import megengine`: checks the cache folder (when given an error to raise),
    and has the import run MegEngine's first device queries quietly once it is done. Finds
    nothing itself."""

    def __init__(self, error: Optional[Callable[[str], BaseException]]):
        self.error = error

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[types.ModuleType] = None) -> Optional[ModuleSpec]:
        if fullname != "megengine":
            return None
        if self.error is not None:
            problem = cache_problem()
            if problem is not None:
                raise self.error(problem)  # out of the import statement that needs MegEngine
        sys.meta_path.remove(self)  # checked: the import proceeds, and later ones too
        if not _quiet["armed"]:
            return None
        spec = _find_elsewhere(fullname, path, target)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            del loader.exec_module  # back to the class's
            run(module)
            _after_import(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _find_elsewhere(fullname: str, path: Optional[Sequence[str]],
                    target: Optional[types.ModuleType]) -> Optional[ModuleSpec]:
    finders: List[Any] = [f for f in sys.meta_path if not isinstance(f, _CheckBeforeImport)]
    for finder in finders:
        find = getattr(finder, "find_spec", None)
        spec = find(fullname, path, target) if find is not None else None
        if spec is not None:
            return spec
    return None


def guard_import(error: Callable[[str], BaseException]) -> None:
    """Have the first `import megengine` of this process raise `error(cache_problem())` where
    that import would fail on its cache. Each tool imports MegEngine in its own place, and only
    where it needs it (packing, staging and verifying never do, and a bad MGE_HOME must not stop
    them), so the tools' runner arms this instead of checking up front."""
    if "megengine" in sys.modules:
        return
    for f in sys.meta_path:
        if isinstance(f, _CheckBeforeImport):
            f.error = error
            return
    sys.meta_path.insert(0, _CheckBeforeImport(error))
