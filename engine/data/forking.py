"""Forked worker processes that a Ctrl-C cannot cut into, and Ctrl-C deferred to safe points.

A terminal's Ctrl-C sends SIGINT to the whole process group: the main process and every worker.
The workers leave the decision to the main process, which stops them. Three windows used to let
an interrupt through as something else:

- a child interrupted between the fork and its first line (where it starts ignoring SIGINT)
  died with multiprocessing's "Process <name>:" banner and a KeyboardInterrupt traceback, and
  the parent then saw a worker that "exited with status 1";
- a parent interrupted inside os.fork() raised KeyboardInterrupt within the at-fork hooks (logging
  takes and releases its lock there), where Python prints "Exception ignored" and drops it: the
  run carried on as if nothing had been pressed;
- a parent interrupted while stopping its workers left the cleanup half done.

A scheduler's stop signals (SIGTERM at the time limit or on preemption, SIGUSR1 with Slurm's
`--signal`) likewise reach every process of the job, and are likewise the main process's to act on.

`start_process` forks with SIGINT, SIGTERM and SIGUSR1 blocked, so the child begins with them
blocked and `ignore_stop_signals` (the child's first call) turns them off for good before
unblocking; the parent keeps any pending
interrupt and receives it once the fork is complete. `DeferredInterrupt` replaces the parent's
KeyboardInterrupt-raising handler by one that only notes the interrupt; the caller raises it
with `check()` where nothing can swallow it, and at the latest when the block ends.

Standard library only, so engine.data may use it.
"""
from __future__ import annotations

import atexit
import signal
import threading
import weakref
from types import FrameType, TracebackType
from typing import Any, Optional, Type

__all__ = ["DeferredInterrupt", "start_process", "ignore_stop_signals"]

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
_started: "weakref.WeakSet[Any]" = weakref.WeakSet()  # children of start_process, for the exit
_exit_hook = False


class DeferredInterrupt:
    """Within `with DeferredInterrupt() as intr:` Ctrl-C only sets `intr.hit`; `intr.check()`
    raises KeyboardInterrupt if it was pressed, and so does leaving the block (unless another
    exception is already on its way out, which then wins: it happened first and says more).

    Nested blocks defer to the outermost one. Outside the main thread (where Python delivers no
    signals) it does nothing.
    """

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None
        self._installed = False

    def _note(self, signum: int, frame: Optional[FrameType]) -> None:
        self.hit = True

    def __enter__(self) -> "DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGINT)
            if not isinstance(getattr(current, "__self__", None), DeferredInterrupt):
                self._old = current
                signal.signal(signal.SIGINT, self._note)
                self._installed = True
        return self

    def check(self) -> None:
        """Raise KeyboardInterrupt now if Ctrl-C was pressed since the block began."""
        if self.hit:
            self.hit = False
            raise KeyboardInterrupt

    def __exit__(self, typ: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if self._installed:
            # None: a handler installed from C that Python cannot restore; the default is the
            # closest thing.
            signal.signal(signal.SIGINT, signal.default_int_handler if self._old is None
                          else self._old)
            self._installed = False
        if typ is None:
            self.check()


def start_process(proc: Any) -> None:
    """`proc.start()` for a fork-context multiprocessing Process whose target calls
    `ignore_stop_signals()` first: an interrupt or stop signal during the fork reaches the parent
    (an interrupt as a KeyboardInterrupt once the fork is complete), never the child."""
    with DeferredInterrupt():
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    global _exit_hook
    _started.add(proc)
    if not _exit_hook:  # registered after multiprocessing's own exit handler, so it runs first
        atexit.register(_kill_at_exit)
        _exit_hook = True


def _kill_at_exit() -> None:
    """At exit, SIGKILL this process's children that start_process started and nobody stopped
    (a loader that was never closed). multiprocessing's own exit handler would send them SIGTERM,
    which they ignore, and then wait for them for ever."""
    for proc in list(_started):
        try:
            if proc.is_alive():  # raises in a forked child for its parent's processes
                proc.kill()
                proc.join(5)
        except (AssertionError, OSError, ValueError):
            pass


def ignore_stop_signals() -> None:
    """In a child started by `start_process`: ignore SIGINT, SIGTERM and SIGUSR1 from now on (one
    that arrived since the fork is discarded), then unblock them. The child still dies with its
    parent (its parent-death signal) and when the parent stops it."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
