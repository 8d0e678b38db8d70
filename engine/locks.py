"""Exclusive file locks that say who holds them.

`acquire(path)` takes an flock on `path` and writes a note into the file: the holder's pid, host
and start time, plus whatever progress it reports with `FileLock.note(...)`. Whoever finds the
lock taken reads that note, so a refusal names the holder, and a waiter tells a holder that is
working (its note changes) from one that is stuck. flock dies with its process: a killed holder
never blocks the next run, and the lock file itself stays (removing it would let a waiter and a
newcomer lock different inodes).

One call covers the three ways the engine waits: refuse at once (`timeout=0`: a second pack into
the same folder), wait while the holder makes progress (`timeout=T`: ranks of one node staging
the same split), and wait as long as it takes (`timeout=None`: one download per file per node).
A file system without flock support (Lustre mounted without `-o flock`, NFS without lockd) is a
one-line UserError naming the path, not a traceback.

Imports only the standard library and engine.errors, so engine.data may use it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from engine.errors import UserError, disk_error_message

__all__ = ["LockError", "Holder", "FileLock", "acquire", "flock_error_message"]

# flock's answers on a file system that does not do locking.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}
_NOTE_BYTES = 4096  # the note is read with one pread of this size


class LockError(UserError, RuntimeError):
    """A lock that is held by another process, or that this file system cannot take."""


@dataclass(frozen=True)
class Holder:
    """What the process holding a lock wrote into it (all None when it wrote nothing yet)."""

    pid: Optional[int] = None
    host: Optional[str] = None
    started: Optional[str] = None
    note: Dict[str, Any] = field(default_factory=dict)  # everything written, progress included

    def __str__(self) -> str:
        if self.pid is None:
            return "holder unknown"
        return "pid %s on host %s, started %s" % (self.pid, self.host or "?",
                                                 self.started or "?")


def flock_error_message(exc: OSError, path: str) -> str:
    """One line for an OSError from flock on `path`: a file system without lock support says
    what to do; anything else reads like any other error writing the file."""
    if exc.errno in _UNSUPPORTED:
        return ("cannot lock %s: its file system does not support file locks (%s). Use a "
                "folder on a local disk, or mount the shared file system with locking (NFS "
                "with lockd, Lustre with -o flock), then rerun"
                % (path, exc.strerror or errno.errorcode.get(exc.errno or 0, "?")))
    return disk_error_message(exc, path)


def _read_holder(fd: int) -> Holder:
    try:
        note = json.loads(os.pread(fd, _NOTE_BYTES, 0).decode().strip() or "{}")
    except (OSError, ValueError):
        return Holder()
    if not isinstance(note, dict):
        return Holder()
    return Holder(pid=note.get("pid"), host=note.get("host"), started=note.get("started"),
                  note=note)


class FileLock:
    """A held lock (from `acquire`); `release()` or leaving a `with` block lets it go."""

    def __init__(self, path: str, fd: int, waited: bool):
        self.path, self.fd = path, fd
        self.waited = waited  # another process held it when this one asked
        self._info = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._written = 0
        try:
            os.ftruncate(fd, 0)  # the last holder's note must not show through
        except OSError:
            pass
        self.note()

    def note(self, **progress: Any) -> None:
        """Publish the holder's note with `progress` (e.g. bytes_done=...) for waiters to read.

        Best effort: the lock holds without the note, only a waiter's message is poorer. The note
        is padded to the longest one written, so a waiter never reads a shorter note's tail of an
        older one, and it is never truncated while held, so a waiter never reads an empty file.
        """
        self._info.update(progress)
        data = json.dumps(self._info).encode()
        self._written = max(self._written, len(data), 256)
        try:
            os.pwrite(self.fd, data.ljust(self._written), 0)
        except OSError:
            pass

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing releases the flock
            self.fd = -1

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _try(fd: int, path: str, error: Callable[[str], BaseException]) -> bool:
    """Take the flock without blocking: True if taken, False if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        raise error(flock_error_message(exc, path)) from None


def _wait(fd: int, path: str, timeout: Optional[float], poll: float,
          error: Callable[[str], BaseException]) -> Optional[Holder]:
    """Wait for the flock; None once taken, else the holder that went `timeout` seconds without
    changing its note."""
    if timeout is None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return None
        except OSError as exc:
            raise error(flock_error_message(exc, path)) from None
    seen, since = None, time.monotonic()
    while True:
        if _try(fd, path, error):
            return None
        holder = _read_holder(fd)
        if holder.note != seen:  # progress, or another holder: the clock starts again
            seen, since = holder.note, time.monotonic()
        elif time.monotonic() - since > timeout:
            return holder
        time.sleep(poll)


def acquire(path: str, *, timeout: Optional[float] = 0.0, poll: float = 0.2,
            error: Callable[[str], BaseException] = LockError,
            refused: Optional[Callable[[Holder], str]] = None,
            on_wait: Optional[Callable[[Holder], None]] = None,
            mode: int = 0o644) -> FileLock:
    """An exclusive flock on `path` (created if missing), with this process's note in it.

    timeout: 0 refuses at once when another process holds the lock; T > 0 waits while the
    holder makes progress and refuses once its note has not changed for T seconds; None waits
    as long as it takes. A refusal raises `error(refused(holder))` (default: a LockError naming
    the holder); `on_wait(holder)` is called once when this process starts waiting. Failing to
    open or lock the file raises `error(<one line>)`.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    except OSError as exc:
        raise error(disk_error_message(exc, path)) from None
    try:
        if _try(fd, path, error):
            return FileLock(path, fd, waited=False)
        holder = _read_holder(fd)
        if timeout is not None and timeout <= 0:
            raise error(refused(holder) if refused else _refusal(path, holder))
        if on_wait is not None:
            on_wait(holder)
        stuck = _wait(fd, path, timeout, poll, error)
        if stuck is not None:
            raise error(refused(stuck) if refused else _refusal(path, stuck, timeout))
        return FileLock(path, fd, waited=True)
    except BaseException:
        os.close(fd)
        raise


def _refusal(path: str, holder: Holder, timeout: Optional[float] = None) -> str:
    if timeout:
        return ("%s is held by %s, which made no progress for %.0f s; stop that process (a "
                "killed one releases the lock by itself) and rerun" % (path, holder, timeout))
    return ("%s is held by another process (%s); wait for it to finish or stop it, then rerun"
            % (path, holder))
