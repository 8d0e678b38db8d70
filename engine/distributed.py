"""The only module that knows about ranks.

Two halves:
- Launch resolution (`resolve_cluster`, `expand_nodelist`): pure functions of flags and an
  environment mapping (Slurm, torchrun-style variables). They import nothing heavy, so
  `engine.data` and the tools can use them; MegEngine is imported lazily inside the functions
  that need it and never at module level.
- Thin wrappers over `megengine.distributed`. Every one is a no-op (or the obvious
  single-process answer) when the process group was never initialised, so the trainer reads the
  same in one process as in N. Multi-GPU needs CUDA: MegEngine's launcher and process groups
  refuse the CPU backend, so nothing below the `get_world_size() > 1` branches runs in CPU-only
  tests.
"""
from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import socket
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from engine.errors import UserError

# ============================================================================================
# Launch resolution: flags > torchrun-style env > Slurm env > single-node defaults
# ============================================================================================

SOURCES = ("flags", "torchrun", "slurm", "default")


@dataclass(frozen=True)
class Cluster:
    """Where this node sits in a (possibly multi-node) run.

    `master_port` 0 means "any free port", which only a single node may use. `gpus_per_node`
    is None when nothing said how many GPUs to use (the trainer then uses every visible one).
    `source` says where the node count and rank came from.
    """

    num_nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    gpus_per_node: Optional[int]
    source: str

    @property
    def multi_node(self) -> bool:
        return self.num_nodes > 1


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand a Slurm compressed host list: 'gpu[01-03,07]' -> gpu01 gpu02 gpu03 gpu07.

    Handles several comma-separated groups ('a[1-2],b3'), zero padding ('node-[008-010]'
    keeps three digits) and several bracket groups in one name ('r[1-2]n[1-2]').
    """
    hosts: List[str] = []
    for item in _split_top_level(nodelist.strip()):
        parts = re.split(r"(\[[^\]]*\])", item)
        choices = []
        for part in parts:
            if part.startswith("["):
                choices.append(_expand_range(part[1:-1], nodelist))
            elif part:
                choices.append([part])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise UserError("SLURM_JOB_NODELIST is empty")
    return hosts


def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside [...]."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise UserError("cannot parse SLURM_JOB_NODELIST %r: unbalanced brackets" % text)
    out.append(text[start:])
    return [s for s in out if s]


def _expand_range(spec: str, whole: str) -> List[str]:
    out: List[str] = []
    for piece in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", piece.strip())
        if not m:
            raise UserError("cannot parse SLURM_JOB_NODELIST %r: bad range %r" % (whole, piece))
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo)  # Slurm keeps the zero padding of the lower bound
        if int(hi) < int(lo):
            raise UserError("cannot parse SLURM_JOB_NODELIST %r: range %r runs backwards"
                            % (whole, piece))
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    # Slurm writes some counts as "8(x2)" (per-node value, repeated); the value is what we want.
    m = re.fullmatch(r"\s*(-?\d+)(\(x\d+\))?\s*", raw)
    if not m:
        raise UserError("environment variable %s=%r is not an integer" % (name, raw))
    return int(m.group(1))


def _count_visible(devices: str) -> Optional[int]:
    devices = devices.strip()
    if devices in ("", "NoDevFiles"):
        return 0
    return len([d for d in devices.split(",") if d.strip()])


def is_loopback(addr: str) -> bool:
    """True for 'localhost', 127.x.y.z and ::1: an address that means "this machine"."""
    a = addr.strip().lower()
    if a in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(a.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_cluster(
    env: Mapping[str, str],
    *,
    num_nodes: Optional[int] = None,
    node_rank: Optional[int] = None,
    master_ip: Optional[str] = None,
    master_port: Optional[int] = None,
    ngpus: Optional[int] = None,
) -> Cluster:
    """Resolve the node layout from explicit flags, then torchrun-style, then Slurm variables.

    Each field comes from the first of these that sets it:
    - flags (`--num-nodes --node-rank --master-ip --master-port --ngpus`);
    - torchrun-style: MASTER_ADDR, MASTER_PORT, NNODES + NODE_RANK (or GROUP_RANK), or
      WORLD_SIZE + RANK + LOCAL_WORLD_SIZE (node rank = RANK // LOCAL_WORLD_SIZE). The engine
      forks one process per GPU itself (MegEngine's launcher), so the external launcher should
      start one process per node; see `check_one_process_per_node`;
    - Slurm: SLURM_NNODES (or SLURM_JOB_NUM_NODES), SLURM_NODEID, the first host of
      SLURM_JOB_NODELIST as master, SLURM_GPUS_ON_NODE or CUDA_VISIBLE_DEVICES as GPUs, and a
      port derived from SLURM_JOB_ID so every node of the job computes the same one;
    - defaults: one node, localhost, any free port.

    Raises UserError for values that cannot work: a node rank out of range, a multi-node run
    without a master address or port, or a loopback master address (the other nodes would
    wait forever for a server on their own machine).
    """
    torch_nodes = _env_int(env, "NNODES")
    torch_rank = _env_int(env, "NODE_RANK")
    if torch_rank is None:
        torch_rank = _env_int(env, "GROUP_RANK")
    world, rank, local_world = (_env_int(env, n) for n in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"))
    if torch_nodes is None and world is not None:
        per = local_world or 1
        if world % per:
            raise UserError("WORLD_SIZE=%d is not a multiple of LOCAL_WORLD_SIZE=%d"
                            % (world, per))
        torch_nodes = world // per
        if torch_rank is None and rank is not None:
            torch_rank = rank // per

    slurm_nodes = _env_int(env, "SLURM_NNODES")
    if slurm_nodes is None:
        slurm_nodes = _env_int(env, "SLURM_JOB_NUM_NODES")
    slurm_rank = _env_int(env, "SLURM_NODEID")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    has_slurm = slurm_nodes is not None

    def first(*values):
        for v in values:
            if v is not None:
                return v
        return None

    # The node count and rank travel together: never mix a count from one source with a
    # rank from another.
    if num_nodes is not None:
        source = "flags"
        nodes, nrank = num_nodes, first(node_rank, 0)
    elif torch_nodes is not None:
        source = "torchrun"
        nodes, nrank = torch_nodes, first(node_rank, torch_rank, 0)
    elif slurm_nodes is not None:  # i.e. has_slurm
        source = "slurm"
        nodes, nrank = slurm_nodes, first(node_rank, slurm_rank, 0)
    else:
        source = "flags" if node_rank is not None or master_ip is not None else "default"
        nodes, nrank = 1, first(node_rank, 0)

    slurm_master = expand_nodelist(nodelist)[0] if (has_slurm and nodelist) else None
    addr = first(master_ip, env.get("MASTER_ADDR") or None, slurm_master)
    slurm_port = None
    job_id = _env_int(env, "SLURM_JOB_ID") if has_slurm else None
    if job_id is not None:
        # Same on every node of the job, and different for two jobs sharing a node.
        slurm_port = 20000 + job_id % 20000
    port = first(master_port, _env_int(env, "MASTER_PORT"), slurm_port, 0)

    gpus = ngpus
    if gpus is None and has_slurm:
        gpus = _env_int(env, "SLURM_GPUS_ON_NODE")
        if gpus is None and "CUDA_VISIBLE_DEVICES" in env:
            gpus = _count_visible(env["CUDA_VISIBLE_DEVICES"])

    if nodes < 1:
        raise UserError("the number of nodes must be >= 1 (got %d from %s)" % (nodes, source))
    if not 0 <= nrank < nodes:
        raise UserError("node rank %d is out of range for %d node(s) (from %s): it must be in "
                        "[0, %d)" % (nrank, nodes, source, nodes))
    if not 0 <= port < 65536:
        raise UserError("master port %d is not a TCP port (0-65535)" % port)
    if gpus is not None and gpus < 0:
        raise UserError("--ngpus must be >= 0 (got %d)" % gpus)
    if nodes > 1:
        if addr is None:
            raise UserError(
                "a %d-node run needs the address of node 0: pass --master-ip (or set "
                "MASTER_ADDR, or run under Slurm)" % nodes)
        if is_loopback(addr):
            raise UserError(
                "--master-ip %s is this machine's loopback address, which the other nodes "
                "cannot reach: pass node 0's hostname or IP as every node sees it" % addr)
        if port == 0:
            raise UserError(
                "a %d-node run needs a fixed rendezvous port that every node uses: pass "
                "--master-port (or set MASTER_PORT)" % nodes)
    return Cluster(num_nodes=int(nodes), node_rank=int(nrank),
                   master_addr=addr if addr is not None else "localhost",
                   master_port=int(port), gpus_per_node=gpus, source=source)


def check_one_process_per_node(env: Mapping[str, str]) -> None:
    """Refuse being started several times per node by torchrun or srun.

    MegEngine's launcher forks one process per GPU itself, so a second copy on the same node
    would take the same GPUs and ranks and hang at the rendezvous.
    """
    local = _env_int(env, "LOCAL_WORLD_SIZE")
    if local is not None and local > 1:
        raise UserError(
            "LOCAL_WORLD_SIZE=%d: start one process per node (torchrun --nproc-per-node 1, or "
            "srun --ntasks-per-node 1); the engine launches one process per GPU itself" % local)
    # Set by srun for the job step it runs (not by sbatch/salloc, whose shell is one process).
    tasks = env.get("SLURM_STEP_TASKS_PER_NODE")
    if tasks:
        n = _env_int({"v": tasks.split(",")[0]}, "v")
        if n is not None and n > 1:
            raise UserError(
                "Slurm runs %d tasks per node: use --ntasks-per-node=1; the engine launches one "
                "process per GPU itself" % n)


# ============================================================================================
# Node rendezvous: every node checks in before any rank starts, with a deadline
# ============================================================================================
#
# MegEngine's own rendezvous never gives up: its client retries the master forever (a node
# given --master-ip localhost waits for a server on itself), and nodes that disagree on the
# GPU count compute different world sizes and wait forever in the first barrier. So before the
# launcher forks any rank, the parent process of every node reports to the rendezvous server
# on node 0 (MegEngine's own XML-RPC server, through its user_set/user_get store): its GPU
# count, node count, any error found in its own checks (a missing --resume file, say), and a
# fingerprint of the checkpoint it would resume. Node 0 compares the reports and publishes one
# verdict; every node then starts its ranks or stops with the same one-line error. Each wait has
# a deadline, after which the message says which node did not arrive.

RENDEZVOUS_TIMEOUT = 600.0  # seconds; nodes of one Slurm job start within seconds of each other


def file_fingerprint(path: str) -> str:
    """Size and content hash of a file: equal on two nodes only for the same checkpoint."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return "%d bytes, sha1 %s" % (os.path.getsize(path), h.hexdigest()[:16])


def node_report(*, num_nodes: int, ngpus: Optional[int], error: Optional[str] = None,
                resume: Optional[str] = None) -> Dict[str, Any]:
    """What one node tells the others at the rendezvous."""
    return {"num_nodes": int(num_nodes), "ngpus": ngpus, "error": error,
            "resume": file_fingerprint(resume) if resume and error is None else None}


def check_node_reports(reports: Mapping[int, Mapping[str, Any]]) -> Optional[str]:
    """The first problem among all nodes' reports, as one line; None when they agree."""
    for k in sorted(reports):
        if reports[k].get("error"):
            return "node %d: %s" % (k, reports[k]["error"])
    base = reports[0]
    for k in sorted(reports):
        r = reports[k]
        if r["num_nodes"] != base["num_nodes"]:
            return ("node %d was started for %d nodes but node 0 for %d: give every node the "
                    "same --num-nodes" % (k, r["num_nodes"], base["num_nodes"]))
        if r["ngpus"] != base["ngpus"]:
            return ("node %d runs %s GPU processes but node 0 runs %s: every node must use the "
                    "same number (pass the same --ngpus everywhere)" % (k, r["ngpus"], base["ngpus"]))
        if r.get("resume") != base.get("resume"):
            return ("the --resume checkpoint differs between nodes: node %d has %s, node 0 has "
                    "%s; copy node 0's checkpoint to every node (or keep the save dir on shared "
                    "storage)" % (k, r.get("resume"), base.get("resume")))
    return None


class _TimeoutTransport(xmlrpc.client.Transport):
    def __init__(self, timeout: float):
        super().__init__()
        self._timeout = max(0.1, timeout)

    def make_connection(self, host):
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


def _call(addr: str, port: int, deadline: float, method: str, *args: Any) -> Any:
    """One XML-RPC call to the rendezvous server, retried while it is not up yet, never past
    the deadline (socket.timeout / ConnectionError when the time is up)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline passed")
        proxy = xmlrpc.client.ServerProxy("http://%s:%d" % (addr, port), allow_none=True,
                                          transport=_TimeoutTransport(left))
        try:
            return getattr(proxy, method)(*args)
        except socket.timeout:
            raise
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, socket.gaierror):
                raise UserError("cannot resolve the master address %r: %s" % (addr, exc)) from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


VERDICT_MARGIN_S = 30.0


def node_handshake(addr: str, port: int, node_rank: int, num_nodes: int,
                   report: Mapping[str, Any], timeout: float = RENDEZVOUS_TIMEOUT) -> None:
    """Meet the other nodes at `addr:port` before launching; raise UserError on any problem.

    Node 0 collects every node's report and publishes the verdict; the others publish theirs
    and wait for it. Every wait ends after `timeout` seconds with a message naming what was
    missing, so a wrong address, a node that never started or a node with another GPU count
    is an error on every node instead of a hang.
    """
    deadline = time.monotonic() + timeout
    where = "%s:%d" % (addr, port)
    key = "engine/rendezvous/node/%d"
    try:
        _call(addr, port, deadline, "user_set", key % node_rank, json.dumps(dict(report)))
    except socket.timeout:
        raise UserError(
            "node %d could not reach the rendezvous server at %s within %.0f s: is node 0 "
            "running, is --master-ip node 0's address as this node sees it, and is port %d "
            "open between the nodes?" % (node_rank, where, timeout, port)) from None
    if node_rank == 0:
        reports: Dict[int, Mapping[str, Any]] = {0: dict(report)}
        verdict = None
        for k in range(1, num_nodes):
            try:
                reports[k] = json.loads(_call(addr, port, deadline, "user_get", key % k))
            except socket.timeout:
                verdict = ("node %d did not reach the rendezvous at %s within %.0f s: check that "
                           "it was started with --num-nodes %d, --node-rank %d and the same "
                           "--master-ip/--master-port, and that it can reach this machine"
                           % (k, where, timeout, num_nodes, k))
                break
        verdict = verdict or check_node_reports(reports)
        # Published even when some node is missing, so that the nodes that did arrive stop too.
        _call(addr, port, time.monotonic() + 30, "user_set", "engine/rendezvous/verdict",
              verdict or "")
        if verdict:
            # This process exits next, and the server with it: first let the nodes that
            # arrived read the verdict (bounded: a node may have died meanwhile).
            ack_deadline = time.monotonic() + 30
            for k in sorted(reports):
                if k:
                    try:
                        _call(addr, port, ack_deadline, "user_get", "engine/rendezvous/ack/%d" % k)
                    except socket.timeout:
                        break
    else:
        # Node 0 publishes its verdict at its own deadline at the latest, and it may have started
        # later than this node: wait that long plus a margin, or a slow node 0 would turn its
        # precise message ("node 2 did not arrive") into this node's vague one.
        try:
            verdict = _call(addr, port, deadline + VERDICT_MARGIN_S, "user_get",
                            "engine/rendezvous/verdict")
        except socket.timeout:
            raise UserError("node 0 did not complete the rendezvous at %s within %.0f s (another "
                            "node may be missing or still starting)"
                            % (where, timeout + VERDICT_MARGIN_S)) from None
        if verdict:
            try:
                _call(addr, port, time.monotonic() + 10, "user_set",
                      "engine/rendezvous/ack/%d" % node_rank, True)
            except (socket.timeout, UserError):
                pass
    if verdict:
        raise UserError(verdict)


# ============================================================================================
# Errors inside rank processes reach the parent as one line
# ============================================================================================
#
# MegEngine's launcher only reports "subprocess N exit with code 1". So each rank runs inside
# RankEntry: a UserError is written to a small file in a per-launch folder and the rank exits
# with status 2 (no traceback: it is not a bug); anything else is also written and then
# re-raised, so its traceback still prints. When the launcher fails, the parent reads the
# earliest message and raises it.

_EXIT_USER_ERROR = 2
_EXIT_INTERRUPTED = 130


def write_rank_error(folder: str, rank: int, kind: str, message: str) -> str:
    """Record a rank's failure atomically (a reader never sees half a file)."""
    path = os.path.join(folder, "rank-%05d.json" % rank)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump({"rank": rank, "kind": kind, "message": message, "time": time.time_ns()}, f)
    os.replace(tmp, path)
    return path


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
            write_rank_error(self.error_dir, get_rank(), "user", " ".join(str(exc).split()))
            raise SystemExit(_EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            raise SystemExit(_EXIT_INTERRUPTED) from None  # the parent reports Ctrl-C once
        except Exception as exc:
            write_rank_error(self.error_dir, get_rank(), "bug",
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


# ============================================================================================
# Process-group wrappers (MegEngine imported lazily)
# ============================================================================================


def _dist():
    import megengine.distributed as dist

    return dist


def get_rank() -> int:
    """This process's global rank; 0 when not distributed."""
    dist = _dist()
    return dist.get_rank() if dist.is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the job; 1 when not distributed."""
    dist = _dist()
    return dist.get_world_size() if dist.is_distributed() else 1


def is_main() -> bool:
    """True on the one process that logs and writes files (global rank 0)."""
    return get_rank() == 0


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
    dist = _dist()

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


def allreduce_callback() -> Optional[Callable]:
    """GradManager callback that averages gradients across ranks; None in one process.

    "mean" (not "sum") keeps the loss scale and weight decay identical to a single-GPU run; the
    linear-scaling rule is applied to the learning rate instead (see trainer.scaled_lr).
    """
    return _dist().make_allreduce_cb("mean") if get_world_size() > 1 else None


def broadcast_module(module: Any) -> None:
    """Copy rank 0's parameters and buffers (BN statistics) to every rank, in place."""
    if get_world_size() > 1:
        dist = _dist()
        dist.bcast_list_(list(module.parameters()))
        dist.bcast_list_(list(module.buffers()))


def broadcast_buffers(module: Any) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank, in place.

    Plain BN updates its running statistics from each rank's own batches, so after training
    steps every rank holds different ones; evaluating with them would score N slightly
    different models. Called before each evaluation so that every rank scores rank 0's model,
    the one the checkpoint saves.
    """
    if get_world_size() > 1:
        _dist().bcast_list_(list(module.buffers()))


def all_reduce_sum(values: Sequence[float]) -> np.ndarray:
    """Sum a small vector of host numbers across ranks (eval counts); identity in one process."""
    arr = np.asarray(values, dtype=np.float64)
    if get_world_size() == 1:
        return arr
    import megengine as mge
    from megengine.distributed.functional import all_reduce_sum as _all_reduce_sum

    # float32 on device: counts up to 2**24 are exact, far more than one rank's val shard.
    t = _all_reduce_sum(mge.tensor(arr.astype(np.float32)))
    return t.numpy().astype(np.float64)


__all__ = [
    "Cluster",
    "resolve_cluster",
    "resolve_ngpus",
    "expand_nodelist",
    "is_loopback",
    "check_one_process_per_node",
    "get_rank",
    "get_world_size",
    "is_main",
    "gpu_count",
    "launch",
    "node_report",
    "check_node_reports",
    "node_handshake",
    "run_ranks",
    "RankEntry",
    "allreduce_callback",
    "broadcast_module",
    "broadcast_buffers",
    "all_reduce_sum",
]


def resolve_ngpus(requested: Optional[int], available: int, num_nodes: int = 1) -> int:
    """Processes per node. CPU-only machines run one process (MegEngine's distributed
    backend is CUDA-only), so asking for more there is an error, not a silent downgrade."""
    if available == 0:
        if requested not in (None, 0, 1) or num_nodes > 1:
            raise UserError(
                "no CUDA GPU is visible, so training runs as one CPU process; multi-GPU and "
                "multi-node need CUDA (got --ngpus %s, --num-nodes %d)" % (requested, num_nodes)
            )
        return 1
    if requested is None or requested == 0:
        return available
    if requested > available:
        raise UserError("--ngpus %d but only %d GPUs are visible" % (requested, available))
    return requested
