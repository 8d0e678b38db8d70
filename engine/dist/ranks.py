"""Starting the ranks (`launch`) and bringing a rank's error back to the parent as one line.

MegEngine's launcher only reports "subprocess N exit with code 1". So each rank runs inside
RankEntry: a UserError is written to a small file in a per-launch folder and the rank exits
with status 2 (no traceback: it is not a bug); anything else is also written and then
re-raised, so its traceback still prints. When the launcher fails, the parent reads the
earliest message and raises it. MegEngine is imported inside the functions that need it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, List, Mapping, Optional, Tuple

from engine.atomic import atomic_write
from engine.dist import group, net
from engine.dist.rendezvous import RENDEZVOUS_TIMEOUT, node_handshake, node_report
from engine.errors import UserError

__all__ = ["write_rank_error", "read_rank_error", "RankEntry", "run_ranks", "gpu_count",
           "launch"]

_EXIT_USER_ERROR = 2
_EXIT_INTERRUPTED = 130


def write_rank_error(folder: str, rank: int, kind: str, message: str) -> str:
    """Record a rank's failure atomically (a reader never sees half a file)."""
    record = {"rank": rank, "kind": kind, "message": message, "time": time.time_ns()}
    return atomic_write(os.path.join(folder, "rank-%05d.json" % rank),
                        lambda f: f.write(json.dumps(record).encode()))


def read_rank_error(folder: str) -> Optional[Tuple[int, str, str]]:
    """(rank, kind, message) of the earliest recorded failure, or None."""
    found = []
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    for name in names:
        if not (name.startswith("rank-") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                e = json.load(f)
            found.append((int(e["time"]), int(e["rank"]), str(e["kind"]), str(e["message"])))
        except (OSError, ValueError, KeyError):
            continue
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


def run_ranks(start: Callable[[Callable[..., Any]], Any], fn: Callable[..., Any]) -> Any:
    """`start(RankEntry(fn, folder))` (a launcher), turning a rank's failure into its message.

    A UserError in any rank becomes a UserError "rank N: <message>" here; another exception
    becomes a RuntimeError naming the rank (its traceback was printed by the rank).
    """
    folder = tempfile.mkdtemp(prefix="engine-ranks-")
    try:
        try:
            return start(RankEntry(fn, folder))
        except KeyboardInterrupt:
            raise
        except Exception:
            first = read_rank_error(folder)
            if first is None:
                raise
            rank, kind, message = first
            if kind == "user":
                raise UserError("rank %d: %s" % (rank, message)) from None
            raise RuntimeError("rank %d failed with %s (its traceback is above)"
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
) -> Any:
    """Run `fn(*args)` on `ngpus` processes per node and return global rank 0's result.

    With one process in total it is a plain call in this process (no fork, no process group),
    which is how every CPU run and every test goes. Otherwise it is MegEngine's
    `dist.launcher`: one process per GPU, ranks `node_rank*ngpus ...`, rank 0's node hosts the
    rendezvous server on `master_port` (0 picks a free port, allowed only on a single node).
    Multi-node runs first meet at `node_handshake` with this node's `report` (see
    `node_report`). A rank's UserError comes back here as a UserError naming the rank.
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
    import megengine.distributed as dist

    def start(entry: Callable[..., Any]) -> List[Any]:
        if num_nodes > 1 and node_rank != 0:
            node_handshake(master_ip, master_port, node_rank, num_nodes, report,
                           rendezvous_timeout)
        if num_nodes > 1 and node_rank == 0 and report.get("error"):
            # No ranks will start here, but the other nodes must still hear why.
            from megengine.distributed.server import Server

            server = Server(master_port)  # noqa: F841  (serves until this process exits)
            node_handshake("localhost", master_port, 0, num_nodes, report, rendezvous_timeout)
        # On node 0 this starts MegEngine's rendezvous server (rank_start == 0).
        runner = dist.launcher(entry, n_gpus=ngpus, world_size=world,
                               rank_start=node_rank * ngpus, master_ip=master_ip,
                               port=master_port)
        if num_nodes > 1 and node_rank == 0:
            node_handshake("localhost", runner.port, 0, num_nodes, report, rendezvous_timeout)
        return runner(*args)

    results = run_ranks(start, fn)
    return results[0] if node_rank == 0 else None
