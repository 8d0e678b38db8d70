"""Starting the ranks (`launch`), watching them, and bringing a failure back as one line.

`launch` forks one process per GPU (per CPU process with the test-only CPU backend, see
`engine.dist.cpu_backend`) and supervises them itself: each rank runs MegEngine's own
`launcher._run_wrapped` (or the CPU backend's counterpart), and the parent polls the ranks, so
that one failed rank stops the others on its node at once, and, through the heartbeat on node
0's rendezvous server (`engine.dist.rendezvous.NodeWatch`), every other node too.

Each rank runs inside RankEntry: a UserError is written to a small file in a per-launch folder
and the rank exits with status 2 (no traceback: it is not a bug); anything else is also written
and then re-raised, so its traceback still prints. The parent turns the earliest failure (that
record, or a rank killed by a signal) into one message naming the rank. MegEngine is imported
inside the functions that need it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from engine.atomic import atomic_write
from engine.dist import cpu_backend, group, net
from engine.dist.cluster import resolve_ngpus
from engine.dist.rendezvous import HEARTBEAT_TIMEOUT, RENDEZVOUS_TIMEOUT, NodeWatch, node_handshake, node_report
from engine.errors import UserError, describe_exit

__all__ = ["write_rank_error", "read_rank_error", "RankEntry", "RankFailed", "run_ranks",
           "gpu_count", "processes_per_node", "launch"]

_EXIT_USER_ERROR = 2
_EXIT_INTERRUPTED = 130


def write_rank_error(folder: str, rank: int, kind: str, message: str) -> str:
    """Record a rank's failure atomically (a reader never sees half a file)."""
    record = {"rank": rank, "kind": kind, "message": message, "time": time.time_ns()}
    return atomic_write(os.path.join(folder, "rank-%05d.json" % rank),
                        lambda f: f.write(json.dumps(record).encode()))


def _rank_errors(folder: str) -> List[Tuple[int, int, str, str]]:
    """(time, rank, kind, message) of every recorded failure."""
    found: List[Tuple[int, int, str, str]] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        if not (name.startswith("rank-") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                e = json.load(f)
            found.append((int(e["time"]), int(e["rank"]), str(e["kind"]), str(e["message"])))
        except (OSError, ValueError, KeyError):
            continue
    return found


def read_rank_error(folder: str) -> Optional[Tuple[int, str, str]]:
    """(rank, kind, message) of the earliest recorded failure, or None."""
    found = _rank_errors(folder)
    if not found:
        return None
    _, rank, kind, message = min(found)
    return rank, kind, message


class RankEntry:
    """What each launched rank runs: `fn(*args)`, with its failure recorded for the parent."""

    def __init__(self, fn: Callable[..., Any], error_dir: str):
        self.fn = fn
        self.error_dir = error_dir

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.fn(*args, **kwargs)
        except UserError as exc:
            write_rank_error(self.error_dir, group.get_rank(), "user", " ".join(str(exc).split()))
            raise SystemExit(_EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            raise SystemExit(_EXIT_INTERRUPTED) from None  # the parent reports Ctrl-C once
        except Exception as exc:
            write_rank_error(self.error_dir, group.get_rank(), "bug",
                             "%s: %s" % (type(exc).__name__, " ".join(str(exc).split())))
            raise


class RankFailed(RuntimeError):
    """A rank failed with a bug; its traceback was printed by that rank."""


def run_ranks(start: Callable[[Callable[..., Any]], Any], fn: Callable[..., Any]) -> Any:
    """`start(RankEntry(fn, folder))` (a launcher), turning a rank's failure into its message.

    A UserError in any rank becomes a UserError "rank N: <message>" here; another exception
    becomes a RuntimeError naming the rank (its traceback was printed by the rank). A launcher
    that already raised the final message (a UserError or RankFailed) is passed through.
    """
    folder = tempfile.mkdtemp(prefix="engine-ranks-")
    try:
        try:
            return start(RankEntry(fn, folder))
        except (KeyboardInterrupt, UserError, RankFailed):
            raise
        except Exception:
            first = read_rank_error(folder)
            if first is None:
                raise
            rank, kind, message = first
            if kind == "user":
                raise UserError("rank %d: %s" % (rank, message)) from None
            raise RankFailed("rank %d failed with %s (its traceback is above)"
                             % (rank, message)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def gpu_count() -> int:
    """GPUs visible on this node, without creating a CUDA context.

    The launcher's children fail if CUDA was initialised in the parent ("cuda env is set before
    the forked thread starts"), so this must stay a query, never a tensor allocation.
    """
    import megengine as mge

    return int(mge.device.get_device_count("gpu"))


def processes_per_node(requested: Optional[int], num_nodes: int = 1) -> int:
    """Rank processes per node: `cluster.resolve_ngpus` over the visible GPUs, or, with the
    test-only CPU backend switched on (and no GPU visible), `requested` CPU processes."""
    gpus = gpu_count()
    if cpu_backend.enabled():
        cpu_backend.check_cpu_only(gpus)
        return max(1, requested or 1)
    return resolve_ngpus(requested, gpus, num_nodes)


# ------------------------------------------------------------------ forking and supervising

_STOP_GRACE_S = 5.0  # how long reaping killed ranks may take


def _die_with_parent() -> None:
    """Linux: this rank is killed when the node's launching process dies, so ranks never wait
    forever in a collective for a supervisor that is gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def _rank_main(cpu: bool, parent: int, entry: Callable[..., Any], multi_machine: bool,
               master_ip: str, port: int, world: int, rank: int, dev: int, args: Sequence[Any],
               queue: Any, machine_ranks: List[int]) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    if cpu:
        cpu_backend.run_rank(entry, multi_machine, master_ip, port, world, rank, dev, args,
                             queue, machine_ranks)
    else:
        from megengine.distributed.launcher import _run_wrapped

        # What MegEngine's launcher runs in each rank: init_process_group (NCCL), barriers,
        # the result queue.
        _run_wrapped(entry, multi_machine, master_ip, port, world, rank, dev, "xpu", args, {},
                     "nccl", queue, machine_ranks)


def _start_server(port: int) -> Tuple[Any, int]:
    """MegEngine's rendezvous server on this node (node 0): (server, its port)."""
    from megengine.distributed.server import Server

    # Its process inherits SIGINT ignored: Ctrl-C is this process's to report (once), and the
    # server ends with it.
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave the handlers alone
        previous = None
    try:
        server = Server(port)
    except OSError as exc:
        raise UserError("cannot start the rendezvous server on port %d: %s; pass another "
                        "--master-port (the same on every node)"
                        % (port, exc.strerror or exc)) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return server, int(server.py_server_port)


def _stop_ranks(procs: Sequence[Any]) -> None:
    """SIGKILL every rank still running and reap them all. Not SIGTERM: the ranks leave the stop
    signals to this process (engine.stop), and a rank blocked in a collective would not run a
    handler anyway; a checkpoint write cut short leaves only a temp file, removed at the next
    start."""
    for p in procs:
        if p.exitcode is None:
            p.kill()
    deadline = time.monotonic() + _STOP_GRACE_S
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))


def _failure(folder: str, exits: Mapping[int, Tuple[int, int]], where: str) -> Tuple[bool, str]:
    """(is a bug, message) of the earliest failure: a rank's record, or a rank that died
    without one (a signal, or an exit status), as of when the supervisor saw it exit.
    `exits` maps rank -> (exit code, time seen, ns); `where` names the node, or is empty."""
    events: List[Tuple[int, int, str, str]] = list(_rank_errors(folder))
    recorded = {rank for _, rank, _, _ in events}
    for rank, (code, seen) in exits.items():
        if rank in recorded:
            continue
        events.append((seen, rank, "exit", describe_exit(code)))
    _, rank, kind, message = min(events)
    if kind == "bug":
        return True, "rank %d%s failed with %s" % (rank, where, message)
    if kind == "exit":
        return False, "rank %d%s %s" % (rank, where, message)
    return False, "rank %d%s: %s" % (rank, where, message)


def _supervise(procs: Sequence[Any], queue: Any, folder: str, rank_start: int,
               watch: Optional[NodeWatch]) -> List[Any]:
    """Wait for this node's ranks; the first failure here or anywhere stops them all.

    Returns the ranks' results in local order. Raises UserError (a rank's user error, a rank
    killed, another node's failure) or RankFailed (a bug in a rank on this node).
    """
    from multiprocessing.connection import wait

    results: Dict[int, Any] = {}
    exits: Dict[int, Tuple[int, int]] = {}
    where = " (node %d)" % watch.node if watch is not None else ""

    def drain() -> None:
        while True:
            try:
                dev, ret = queue.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty, or a queue torn down by a failure
                return
            results[dev] = ret

    try:
        while True:
            wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.2)
            drain()
            for i, p in enumerate(procs):
                if p.exitcode not in (0, None) and rank_start + i not in exits:
                    exits[rank_start + i] = (p.exitcode, time.time_ns())
            if exits and all(code == _EXIT_INTERRUPTED for code, _ in exits.values()) \
                    and not _rank_errors(folder):
                # Ctrl-C reaches the ranks with the parent (one process group); a rank may
                # report it first.
                raise KeyboardInterrupt
            if exits:
                bug, message = _failure(folder, exits, where)
                if watch is None:
                    raise (RankFailed if bug else UserError)(
                        message + (" (its traceback is above)" if bug else ""))
                # Tell node 0 first, so the other nodes stop while this one stops its ranks.
                told = message + (" (its traceback is in node %d's output)" % watch.node
                                  if bug else "")
                watch.report(told)
                _stop_ranks(procs)
                shown = watch.verdict(told)
                watch.close()
                if shown != told:  # the run's first failure happened elsewhere
                    raise UserError(shown)
                raise (RankFailed if bug else UserError)(
                    message + (" (its traceback is above)" if bug else ""))
            if all(p.exitcode == 0 for p in procs):
                drain()
                if watch is not None:
                    watch.finish()
                return [results.get(i) for i in range(len(procs))]
            stop = watch.stop if watch is not None else None
            if stop is not None:
                _stop_ranks(procs)
                watch.close()  # type: ignore[union-attr]
                raise UserError(stop)
    except KeyboardInterrupt:
        if watch is not None:
            watch.report("node %d was interrupted (Ctrl-C)" % watch.node)
        raise
    finally:
        _stop_ranks(procs)


def launch(
    fn: Callable[..., Any],
    *args: Any,
    ngpus: int,
    num_nodes: int = 1,
    node_rank: int = 0,
    master_ip: str = "localhost",
    master_port: int = 0,
    report: Optional[Mapping[str, Any]] = None,
    rendezvous_timeout: float = RENDEZVOUS_TIMEOUT,
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
) -> Any:
    """Run `fn(*args)` on `ngpus` processes per node and return global rank 0's result.

    With one process in total it is a plain call in this process (no fork, no process group),
    which is how every CPU run goes. Otherwise ranks `node_rank*ngpus ...` are forked here
    (one per GPU; CPU processes with the test-only CPU backend) and supervised; node 0 hosts
    MegEngine's rendezvous server on `master_port` (0 picks a free port, allowed only on a
    single node). Multi-node runs first meet at `node_handshake` with this node's `report`
    (see `node_report`), then keep a heartbeat through node 0's server: a node silent for
    `heartbeat_timeout` seconds, or a failed rank anywhere, stops every node with one message.
    A rank's UserError comes back here as a UserError naming the rank.
    On nodes other than rank 0's the return value is None.
    """
    report = dict(report) if report is not None else node_report(num_nodes=num_nodes,
                                                                 ngpus=ngpus)
    if num_nodes == 1 and report.get("error"):
        raise UserError(report["error"])
    world = ngpus * num_nodes
    if world <= 1 and num_nodes == 1:
        return fn(*args)
    if num_nodes > 1 and master_port == 0:
        raise UserError("multi-node runs need an explicit --master-port that every node uses")
    if node_rank == 0:
        net.check_master_port(master_port)  # before MegEngine's server fails on it
    cpu = cpu_backend.enabled()
    multi = num_nodes > 1
    rank_start = node_rank * ngpus

    def start(entry: Callable[..., Any]) -> List[Any]:
        import multiprocessing as mp

        server, port = _start_server(master_port) if node_rank == 0 else (None, master_port)
        addr = "localhost" if node_rank == 0 else master_ip
        if multi:
            node_handshake(addr, port, node_rank, num_nodes, report, rendezvous_timeout)
        ctx = mp.get_context("fork")
        queue = ctx.Queue(ngpus)
        machine_ranks = [rank_start + i for i in range(ngpus)]
        procs = [ctx.Process(target=_rank_main, name="engine-rank-%d" % (rank_start + i),
                             args=(cpu, os.getpid(), entry, multi, master_ip, port, world,
                                   rank_start + i, i, args, queue, machine_ranks))
                 for i in range(ngpus)]
        for p in procs:
            p.start()
        # The heartbeat's threads start after the fork: a child must not inherit them.
        watch = NodeWatch(addr, port, node_rank, num_nodes, heartbeat_timeout) if multi else None
        if watch is not None:
            watch.start()
        try:
            return _supervise(procs, queue, getattr(entry, "error_dir", ""), rank_start, watch)
        finally:
            del server  # node 0's server lives until here (its process ends with this one)

    results = run_ranks(start, fn)
    return results[0] if node_rank == 0 else None
