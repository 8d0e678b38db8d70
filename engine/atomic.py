"""Atomic file replacement: readers see the old file or the complete new one, never a part."""
from __future__ import annotations

import os
import tempfile
from typing import IO, Callable

__all__ = ["TMP_PREFIX", "atomic_write", "fsync_dir"]

TMP_PREFIX = ".tmp-"  # partial files start with this (hidden); loaders never pick them up


def fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (it lives in the directory's metadata)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic


def atomic_write(path: str, write: Callable[[IO[bytes]], object], durable: bool = True) -> str:
    """Call write(f) on a temp file beside `path`, fsync it, rename it over `path` (whatever
    write returns, e.g. f.write's byte count, is ignored).

    A crash or kill -9 at any moment leaves the previous file (or none) under `path`; the temp
    file is removed on an exception and, after a kill, is a hidden TMP_PREFIX file.
    durable=False skips the two fsyncs: still never a partial file after a crash of the
    process, but a power loss may lose the file. For many small files that can be regenerated,
    where an fsync each would dominate the time.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(folder)
    return path
