"""The packer's worker processes: forked processes that pack shard jobs one after another,
watched through a pipe each.

Self-managed rather than a multiprocessing.Pool, which silently replaces a killed worker and
waits forever for its task. A worker's death is an end-of-file on its pipe, seen within one
poll; the pack then stops the others, removes their partial shards and names the shard that was
lost. A worker that has appended all its records says so and gives its core to the next shard
while it finishes (checksum, disk). Workers die with the packer (PR_SET_PDEATHSIG) and leave
Ctrl-C to it: they start with SIGINT blocked and ignore it, and the packer acts on it only
between its own steps (see engine.data.forking), then stops them.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import multiprocessing.connection  # noqa: F401  (mp.connection.wait)
import os
import signal
import sys
import traceback
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

from engine.data import shards
from engine.data.forking import DeferredInterrupt, ignore_stop_signals, start_process
from engine.data.plan import PackError
from engine.errors import UserError, describe_exit

__all__ = ["run", "count", "Target"]

# What to do when the out-of-memory killer takes a packing worker (each decodes one image at a
# time, so only fewer of them use less memory).
MEMORY_FIX = "pack with fewer --workers"

# Files processed, shared with the forked workers so the progress bar moves per file.
_progress_counter = None


def count(n: int) -> None:
    """Add n files to the shared progress counter (in a worker; a no-op elsewhere)."""
    if _progress_counter is not None:
        with _progress_counter.get_lock():
            _progress_counter.value += n


def _die_with_parent() -> None:
    """Ask Linux to kill this worker if the packer dies (kill -9, OOM): an orphan would hold its
    shard's lock and keep writing after the user believes the pack has stopped."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _keep_freed_heap() -> None:
    """Let this worker's malloc keep what it frees (glibc; elsewhere nothing happens).

    Each file's bytes, record and LMDB pages are ~100 KB blocks freed right after use; glibc
    hands the top of its heap back to the kernel, and the next file faults the same pages in
    again, zeroed. Measured with a worker per shard: 54 page faults per file before, 26 after,
    and about 0.1 ms less CPU per file. The worker's memory stays its peak heap use, a few MB."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: keep up to 64 MB of freed heap
    mallopt(-3, 8 << 20)   # M_MMAP_THRESHOLD: blocks below 8 MB come from the heap


def _worker(target, job: Dict[str, Any], conn, jobs, counter, parent: int) -> None:
    global _progress_counter
    ignore_stop_signals()  # Ctrl-C and SIGTERM are the packer's to handle: it stops the workers
    _die_with_parent()
    if os.getppid() != parent:  # the packer died before the line above took effect
        os._exit(1)
    _progress_counter = counter
    # The packer's heap (a plan of a million files) is shared copy-on-write: keep this
    # process's collector off it, or each full collection would walk and copy all of it.
    gc.freeze()
    _keep_freed_heap()
    try:
        while True:
            conn.send(("ok", target(job, lambda: conn.send(("records_done", None)))))
            try:
                job = jobs.recv()  # the next shard, or None: no more work
            except EOFError:
                break
            if job is None:
                break
        code = 0
    except UserError as exc:
        conn.send(("user", str(exc)))
        code = 2
    except BaseException:
        conn.send(("bug", traceback.format_exc()))
        code = 1
    conn.close()
    sys.exit(code)


class _Proc:
    """A packing worker: its process, the pipe it reports on, the pipe it takes jobs from, the
    job it holds (None while idle) and the last one it held."""

    __slots__ = ("proc", "recv", "jobs", "job", "last")

    def __init__(self, proc: Any, recv: Any, jobs: Any, job: Dict[str, Any]):
        self.proc, self.recv, self.jobs = proc, recv, jobs
        self.job: Optional[Dict[str, Any]] = job
        self.last: Dict[str, Any] = job


def _remove_partial(dst: str, k: int) -> None:
    tmp = os.path.join(dst, shards.shard_name(k)) + ".tmp"
    for f in (tmp, tmp + "-lock"):
        try:
            os.remove(f)
        except OSError:
            pass


def _stop(procs: Iterable[_Proc]) -> None:
    """Stop the workers still running and remove the partial shards of the jobs they hold.
    SIGKILL: the workers leave the stop signals to the packer, and what they leave half-written
    is removed here."""
    procs = list(procs)
    for w in procs:
        if w.proc.pid is not None and w.proc.is_alive():
            w.proc.kill()
    for w in procs:
        if w.proc.pid is not None:
            w.proc.join(5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(5)
        w.recv.close()
        w.jobs.close()
        if w.job is not None:
            _remove_partial(w.job["dst"], w.job["k"])


Target = Callable[[Dict[str, Any], Callable[[], None]], Dict[str, Any]]


def run(target: Target, jobs: List[Dict[str, Any]], workers: int, counter,
        on_progress: Callable[[], None]) -> Dict[int, Dict[str, Any]]:
    """Run `target(job, records_done)` for each of `jobs` in forked processes, a shard at a time.

    Up to `workers` of them decode at a time: a target calls records_done() when what is left
    of its job is mostly waiting for the disk, and the next job then starts; at most `workers`
    such finishing jobs run besides, so never more than 2 * workers processes in all. A worker
    whose job is done takes the next one: a process per shard cost ~25 ms of CPU each (the
    fork, copy-on-write faults of the packer's heap, a fresh heap, the exit), 1/8 of the
    packing time of a 200-file shard.

    Self-managed rather than a multiprocessing.Pool: a Pool silently replaces a worker that was
    killed and waits forever for its task. Here each worker holds the write end of a pipe, so
    its death is an end-of-file seen within one poll; the pack then stops the others, removes
    their partial shards and reports the shard that was lost. Finished shards keep their markers.
    """
    state = _Workers(target, counter)
    pending = list(jobs)
    shards.close_all_envs()  # a child must not inherit an open LMDB environment
    # Ctrl-C is noted and raised at the checks below, never inside a fork or the cleanup (see
    # engine.data.forking); the wait's timeout bounds how long it takes to be acted on.
    with DeferredInterrupt() as interrupt:
        try:
            while pending or state.running:
                while (pending and len(state.running) - len(state.finishing) < workers
                       and len(state.running) < 2 * workers):
                    interrupt.check()
                    state.give(pending.pop(0))
                ready = mp.connection.wait([w.recv for w in state.procs], timeout=0.2)
                interrupt.check()
                for w in list(state.procs):
                    if w.recv in ready:
                        state.receive(w)
                on_progress()
            state.release()
        finally:
            _stop(state.procs)
    return state.markers


class _Workers:
    """run()'s workers: who holds which job, who is idle, the markers received so far."""

    def __init__(self, target: Target, counter) -> None:
        self.target, self.counter = target, counter
        self.ctx = mp.get_context("fork")
        self.procs: List[_Proc] = []
        self.idle: List[_Proc] = []
        self.running: Dict[int, _Proc] = {}  # by the shard index of the job each holds
        self.finishing: Set[int] = set()  # jobs whose records are done, result not yet received
        self.markers: Dict[int, Dict[str, Any]] = {}

    def give(self, job: Dict[str, Any]) -> None:
        """Hand `job` to an idle worker, or to a new one."""
        if self.idle:
            w = self.idle.pop()
            w.job = w.last = job
            self.running[job["k"]] = w
            try:
                w.jobs.send(job)
            except OSError:  # it died idle: its end of file names this job
                pass
            return
        recv, send = self.ctx.Pipe(duplex=False)
        jobs_recv, jobs_send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_worker, args=(self.target, job, send, jobs_recv,
                                                      self.counter, os.getpid()),
                                name="pack-%s" % shards.shard_name(job["k"]), daemon=True)
        w = _Proc(proc, recv, jobs_send, job)
        self.procs.append(w)
        self.running[job["k"]] = w
        try:
            start_process(proc)
        finally:
            send.close()  # only the child holds the write end: its death is EOF
            jobs_recv.close()

    def receive(self, w: _Proc) -> None:
        """Take what worker `w` reported; a failure, or its death, is raised as the error that
        names its shard (none, for a worker that died idle)."""
        try:
            kind, payload = w.recv.recv()
        except (EOFError, OSError):
            kind, payload = "lost", None
        job = w.job if w.job is not None else w.last
        was_busy = w.job is not None
        k = job["k"]
        if kind == "records_done":
            self.finishing.add(k)
            return
        if was_busy:
            del self.running[k]
        self.finishing.discard(k)
        if kind == "ok":
            self.markers[k] = payload
            w.job = None
            self.idle.append(w)
            return
        w.proc.join(10)
        w.recv.close()
        w.jobs.close()
        self.procs.remove(w)
        if w in self.idle:
            self.idle.remove(w)
        where = "%s/%s" % (os.path.basename(job["dst"]), shards.shard_name(k))
        if kind == "user":
            raise PackError(payload)
        if kind == "bug":
            raise RuntimeError("the worker packing %s failed:\n%s" % (where, payload))
        # Idle, it held no shard: its last one is finished and kept, and naming it as the one
        # being packed would send the user after a shard that is fine.
        who = ("the worker packing %s" % where if was_busy else
               "an idle packing worker (its last shard, %s, is finished and kept)" % where)
        raise PackError(
            "%s (pid %s) %s; the other workers were stopped. "
            "Rerun the same command to resume (finished shards are kept)"
            % (who, w.proc.pid, describe_exit(w.proc.exitcode, MEMORY_FIX)))

    def release(self) -> None:
        """Every job done: let the idle workers exit. None, not the end of the pipe, since
        workers forked later hold copies of its write end."""
        for w in self.procs:
            try:
                w.jobs.send(None)
            except OSError:
                pass
        for w in self.procs:
            w.proc.join(10)
