"""A Loader's worker processes, seen from the main process: starting them (forked, a pipe each),
handing them chunks, collecting their replies, stopping them, and reporting by name a worker
that dies, fails or makes no progress.

Each worker has its own pipes, so no lock is shared between workers: a worker killed or stopped
at any moment cannot block the others or `close()`. The main process waits on the pipes and the
workers' exit sentinels together, so a dead worker is reported at once, and a worker that makes
no progress for `timeout` seconds (stopped, or stuck in a read) is reported by name, with the
batch it was decoding. What a worker runs is engine.data.worker's; which batch goes to which
slot is the Loader's.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import time
from multiprocessing.connection import wait as wait_ready
from typing import Any, Callable, Deque, List, Tuple

import cv2

from engine.data import shards
from engine.data.forking import start_process
from engine.data.worker import Replacement, Task, worker_main
from engine.errors import describe_exit

__all__ = ["PER_WORKER", "Supervisor"]

# Chunks a worker may hold at once: one decoding, one waiting, so it never idles between them.
PER_WORKER = 2


class Supervisor:
    """The worker processes of one Loader: each one's process, pipe, and the global batch
    numbers of the chunks it holds, oldest first.

    `describe(global_batch)` says where a failed worker was, e.g. " while decoding batch B of
    epoch E (records in ...)". Any failure stops every worker before it is raised.
    """

    def __init__(self, describe: Callable[[int], str]):
        self._describe = describe
        self.timeout = 0.0
        self.procs: List[Any] = []
        self._conns: List[Any] = []
        self._held_by: List[Deque[int]] = []
        self._progress: List[float] = []  # when each worker last made progress

    def start(self, count: int, args: Tuple[Any, ...], timeout: float) -> None:
        """Fork `count` workers running worker_main(wid, pipe, *args)."""
        self.timeout = timeout
        # fork: workers inherit the ring's mapping, and an unguarded user script is not
        # re-imported as it would be under spawn/forkserver. No LMDB environment may cross the
        # fork: this process closes its own (its readers reopen them lazily) and each worker
        # opens its own on first read.
        shards.close_all_envs()
        ctx = mp.get_context("fork")
        # One core per worker, so OpenCV must run single-threaded there. A child cannot change
        # that itself: cv2.setNumThreads after fork waits on pool threads that only exist in the
        # parent, forever. So the parent drops to one thread (stopping its pool) while forking.
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            for wid in range(count):
                mine, theirs = ctx.Pipe(duplex=True)
                p = ctx.Process(target=worker_main, name="engine-loader-%d" % wid, daemon=True,
                                args=(wid, theirs) + tuple(args))
                try:  # Ctrl-C can reach neither the fork nor the child's start
                    start_process(p)
                finally:
                    theirs.close()
                    if p.pid is not None:  # started, even if Ctrl-C came during the fork
                        self.procs.append(p)
                        self._conns.append(mine)
        except BaseException:
            cv2.setNumThreads(cv_threads)
            self.close()
            raise
        cv2.setNumThreads(cv_threads)
        self._held_by = [collections.deque() for _ in self.procs]
        self._progress = [time.monotonic()] * len(self.procs)

    def dispatch(self, pending: Deque[Task]) -> None:
        """Hand out the chunks of `pending`, oldest first, to the least busy workers, while one
        holds fewer than PER_WORKER."""
        while pending:
            wid = min(range(len(self.procs)), key=lambda w: len(self._held_by[w]))
            if len(self._held_by[wid]) >= PER_WORKER:
                break
            task = pending.popleft()
            if not self._held_by[wid]:
                self._progress[wid] = time.monotonic()  # idle until now: the clock starts here
            try:
                self._conns[wid].send(task)
            except OSError:  # a broken pipe: the worker died since the last look
                self.procs[wid].join(1.0)  # its exit code names the cause
                self._check()
                self._fail("loader worker %d (pid %d) closed its pipe%s"
                           % (wid, self.procs[wid].pid, self._where(wid)))
            self._held_by[wid].append(task[0])

    def receive(self, wait: bool, strict: bool = True) -> List[Tuple[int, List[Replacement]]]:
        """The finished chunks, as (global batch, replacements); raise for a dead, failed or
        stalled worker (a worker's own error only when `strict`)."""
        sentinels = {p.sentinel: wid for wid, p in enumerate(self.procs)}
        conns = {id(c): wid for wid, c in enumerate(self._conns)}
        ready = wait_ready(list(self._conns) + list(sentinels), timeout=0.2 if wait else 0)
        done = []
        for obj in ready:
            if isinstance(obj, int):
                continue  # an exit sentinel: checked below, after the pipes are drained
            wid = conns[id(obj)]
            try:
                global_batch, failures, error = self._conns[wid].recv()  # obj is this pipe
            except (EOFError, OSError):
                continue  # the worker is gone: its sentinel reports why
            self._held_by[wid].popleft()
            self._progress[wid] = time.monotonic()
            if error is not None and strict:
                self.close()
                if isinstance(error, BaseException):
                    raise error
                raise RuntimeError(error)
            done.append((global_batch, failures))
        self._check()
        return done

    def drain(self) -> None:
        """Wait until every chunk handed out is back, whatever its outcome: its slot may then
        be given to another batch."""
        while any(self._held_by):
            self.receive(wait=True, strict=False)

    def _check(self) -> None:
        now = time.monotonic()
        for wid, p in enumerate(self.procs):
            if p.exitcode is not None:
                self._fail("loader worker %d (pid %d) %s%s"
                           % (wid, p.pid, describe_exit(p.exitcode), self._where(wid)))
            if self._held_by[wid] and now - self._progress[wid] > self.timeout:
                self._fail("loader worker %d (pid %d) made no progress for %.0f s%s%s; it may be "
                           "stopped or stuck in a read (raise Loader(timeout=...) if records "
                           "are legitimately this slow)"
                           % (wid, p.pid, now - self._progress[wid], self._state(p.pid),
                              self._where(wid)))

    def _where(self, wid: int) -> str:
        return self._describe(self._held_by[wid][0]) if self._held_by[wid] else ""

    @staticmethod
    def _state(pid: int) -> str:
        try:
            import psutil

            status = psutil.Process(pid).status()
        except Exception:  # noqa: BLE001 - only decorates the message
            return ""
        return {"stopped": " (it is stopped: SIGSTOP or a debugger)",
                "disk-sleep": " (it is blocked in I/O: a hung file system?)"}.get(status, "")

    def _fail(self, message: str) -> None:
        self.close()
        raise RuntimeError(message)

    def close(self) -> None:
        """Stop the workers. Never blocks on a dead or stopped one: live ones get a second to
        finish their chunk, then everything still running is killed."""
        procs, conns = self.procs, self._conns
        self.procs, self._conns = [], []
        for conn in conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 1.0
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.exitcode is None:
                p.kill()  # SIGKILL also ends a stopped process
                p.join(5)
        for conn in conns:
            conn.close()
        self._held_by = []
