"""What `import megengine` needs from the file system, checked before MegEngine is imported.

MegEngine 1.13 opens its persistent kernel cache while it is being imported: it creates the
cache folder and opens `cache.bin` in it for appending. The folder is `$MGE_FASTRUN_CACHE_DIR`,
else `<MGE_HOME>/persistent_cache`, where MGE_HOME defaults to `$XDG_CACHE_HOME/megengine`, else
`~/.cache/megengine` (`MGE_FASTRUN_CACHE_TYPE=MEMORY` keeps the cache in memory and writes
nothing). Where that folder cannot be written (a read-only file system, a path below a regular
file, no permission) the import itself dies with an OSError, in every tool and before any of
the engine's own checks. `cache_problem()` takes the same two steps first and says, in one line
naming the variable to set, why they failed; `guard_import(error)` raises that as `error` just
before the first `import megengine` of the process. This module imports neither MegEngine nor
any of the engine, so the tools' runner (engine.errors.run_tool) can use it.
"""
from __future__ import annotations

import errno
import importlib.abc
import os
import sys
import types
from importlib.machinery import ModuleSpec
from typing import Callable, Mapping, Optional, Sequence

__all__ = ["megengine_home", "cache_dir", "cache_problem", "guard_import"]


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


class _CheckBeforeImport(importlib.abc.MetaPathFinder):
    """Checks the cache folder when `megengine` is about to be imported; finds nothing itself."""

    def __init__(self, error: Callable[[str], BaseException]):
        self.error = error

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[types.ModuleType] = None) -> Optional[ModuleSpec]:
        if fullname == "megengine":
            problem = cache_problem()
            if problem is not None:
                raise self.error(problem)  # out of the import statement that needs MegEngine
            sys.meta_path.remove(self)  # checked: the import proceeds, and later ones too
        return None


def guard_import(error: Callable[[str], BaseException]) -> None:
    """Have the first `import megengine` of this process raise `error(cache_problem())` where
    that import would fail on its cache. Each tool imports MegEngine in its own place, and only
    where it needs it (packing, staging and verifying never do, and a bad MGE_HOME must not stop
    them), so the tools' runner arms this instead of checking up front."""
    if "megengine" in sys.modules or any(isinstance(f, _CheckBeforeImport)
                                         for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _CheckBeforeImport(error))
