"""Stopping a run on request: SIGTERM, SIGUSR1 and Ctrl-C (SIGINT) let the current step finish,
every rank stops after the same step, one checkpoint of that step is saved, and the process exits
with a status that a requeue script can test:

======  ==================================================================================
status  meaning
======  ==================================================================================
0       the run is complete
75      stopped by SIGTERM or SIGUSR1 after saving its step (EX_TEMPFAIL, "try again"):
        rerun the same command to continue
130     stopped by Ctrl-C (SIGINT), after saving its step when a step was done
128+N   a second signal N arrived: the process stopped at once and saved nothing more; the
        previous checkpoint is intact (writes are atomic), so a rerun continues from it
2       an error (a diverged run, bad data, a full disk at a checkpoint): see the message
======  ==================================================================================

In a multi-node run these are node 0's statuses (its rank 0 writes the checkpoint); the other
nodes exit 0 after a stop, a few seconds before node 0, so that ``srun --kill-on-bad-exit``
never ends node 0 before its status is out.

Who handles the signals. The process that calls ``train()`` installs the handlers
(:func:`handling`) for itself and for the rank processes it forks: a request is written into a
small shared memory block that the ranks inherit, so a signal sent to that process alone (``kill
PID``) reaches every rank of the node, and one sent to every process at once (Slurm signals every
process of a job step, a terminal's Ctrl-C the whole process group) counts once. Forked ranks
(:func:`in_rank`) and the loader's workers ignore the signals themselves. The ranks agree on the
step through the engine's all-reduce (``engine.dist.group``, by ``metrics.TrainLog.interval``):
every rank passes its :func:`code` at the same log steps and stops when the sum is non-zero, so
the agreement works for any number of ranks and never waits for a rank that is not there. A
single process also checks after every step.

A second signal raises :class:`StopNow` at once (in the ranks too: the parent signals them with
SIGUSR2), wherever the process is, a checkpoint write included; the write's temp file is removed
and the previous checkpoint stays as it was.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import signal
import struct
import sys
import threading
from typing import Any, Dict, Iterator, Optional

__all__ = ["EXIT_STOPPED", "EXIT_INTERRUPTED", "SIGNALS", "StopNow", "handling", "in_rank",
           "requested", "code", "decode", "exit_status", "agreed", "note_agreed", "reset"]

EXIT_STOPPED = 75       # sysexits.h EX_TEMPFAIL: a temporary failure, the invoker may retry
EXIT_INTERRUPTED = 130  # Ctrl-C, as every tool of the engine
NODE_EXIT_GRACE_S = 3.0  # multi-node: node 0 exits this long after the others (see train())
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_ABORT = signal.SIGUSR2  # parent -> ranks: a second signal arrived, stop at once

# The shared block: [first signal, second signal, agreed stop] as int32, inherited by forks.
_FORMAT = "3i"
_block = mmap.mmap(-1, struct.calcsize(_FORMAT))
_owner: Optional[int] = None  # pid of the process whose handlers are installed
_forks_ranks = False          # whether that process has forked ranks to tell


class StopNow(KeyboardInterrupt):
    """A second stop signal: leave at once (a KeyboardInterrupt, so every Ctrl-C cleanup path,
    the loader's included, runs)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def status(self) -> int:
        return 128 + self.signum


def _get() -> list:
    return list(struct.unpack_from(_FORMAT, _block, 0))


def _set(index: int, value: int) -> None:
    struct.pack_into("i", _block, 4 * index, int(value))


def reset() -> None:
    """Forget earlier requests (a new run in this process)."""
    struct.pack_into(_FORMAT, _block, 0, 0, 0, 0)


def requested() -> int:
    """The signal number of the first stop request, 0 when none."""
    return _get()[0]


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "signal %d" % signum


def code(world_size: int) -> float:
    """This rank's stop code for the all-reduce: 0 none, 1 SIGTERM/SIGUSR1, world_size + 1
    Ctrl-C, so that the sum says whether any rank stops and whether any stops for a Ctrl-C."""
    sig = requested()
    if not sig:
        return 0.0
    return float(world_size + 1) if sig == signal.SIGINT else 1.0


def decode(total: float, world_size: int) -> int:
    """The signal an agreed stop code sum stands for (SIGINT or SIGTERM), 0 for none; this
    process's own request when it has one."""
    if total <= 0:
        return 0
    if requested():
        return requested()
    return int(signal.SIGINT) if total > world_size else int(signal.SIGTERM)


def note_agreed(signum: int) -> None:
    """Record in the shared block that the ranks stopped for `signum` (read by the parent)."""
    _set(2, signum)


def agreed() -> int:
    """The signal the ranks of this node stopped for, 0 when they did not stop early."""
    return _get()[2]


def exit_status(signum: int) -> int:
    """The documented status of node 0 for a run stopped by `signum` after saving (0: not
    stopped)."""
    if not signum:
        return 0
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_STOPPED


def _handler(signum: int, frame: Any) -> None:
    if os.getpid() != _owner:
        # A helper process forked while the handlers were installed (MegEngine's rendezvous
        # server, say), not a rank: the signal keeps its default meaning there.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    first, second, _ = _get()
    if not first:
        _set(0, signum)
        print("%s: stopping after the current step; its checkpoint is saved, then the run exits "
              "with status %d (a second signal stops at once, saving nothing more)"
              % (name(signum), exit_status(signum)), file=sys.stderr, flush=True)
        return
    if not second:
        _set(1, signum)
        if _forks_ranks:
            _abort_ranks()
    raise StopNow(signum)


def _abort_ranks() -> None:
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.pid is not None:
            try:
                os.kill(child.pid, _ABORT)
            except OSError:
                pass


def _abort_in_rank(signum: int, frame: Any) -> None:
    second = _get()[1]
    if second:
        raise StopNow(second)


@contextlib.contextmanager
def handling(ranks: bool = False) -> Iterator[None]:
    """Install the stop handlers for the duration of a run (main thread only; elsewhere the
    signals keep their meaning), restoring the previous ones after it. `ranks`: this process
    forks rank processes, which a second signal must reach."""
    global _owner, _forks_ranks
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reset()
    previous: Dict[int, Any] = {sig: signal.getsignal(sig) for sig in SIGNALS}
    saved = _owner, _forks_ranks
    _owner, _forks_ranks = os.getpid(), ranks
    try:
        for sig in SIGNALS:
            signal.signal(sig, _handler)
        yield
    finally:
        for signum, h in previous.items():
            signal.signal(signum, h)
        _owner, _forks_ranks = saved


def in_rank() -> None:
    """Called first thing in a rank: a rank forked by the process that handles the signals
    leaves them to it and only listens for its call to stop at once."""
    if _owner is None or _owner == os.getpid():
        return
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(_ABORT, _abort_in_rank)


def end_ranks(timeout: float = 3.0) -> None:
    """After a second signal: give the forked ranks `timeout` seconds to stop, then kill them
    (a rank blocked in a collective never returns to Python)."""
    import multiprocessing
    import time

    deadline = time.monotonic() + timeout
    children = multiprocessing.active_children()
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.exitcode is None:
            child.kill()
            child.join(5)
