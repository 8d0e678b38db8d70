"""Atomic file replacement: readers see the old file or the complete new one, never a part.

Files written here get the mode the process's umask gives any other new file (0644 under umask
022, 0640 under 027), so a pack or a run written by one user is readable by the teammates the
umask lets in, as a file made by `open(path, "w")` would be.
"""
from __future__ import annotations

import os
import secrets
from typing import IO, Callable, Tuple

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


def _create_temp(folder: str, name: str) -> Tuple[int, str]:
    """A new, empty hidden file beside `name` in `folder`: (fd, path).

    Created with mode 0666 for the kernel to apply the umask (and a default ACL of the folder)
    to, exactly as for any other new file; tempfile.mkstemp would force 0600 whatever the
    umask. O_EXCL makes the random name ours alone."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        path = os.path.join(folder, "%s%s.%s" % (TMP_PREFIX, name, secrets.token_hex(4)))
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue


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
    fd, tmp = _create_temp(folder, os.path.basename(path))
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
