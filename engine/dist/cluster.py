"""Where this node sits in a run: flags, torchrun-style and Slurm variables -> a `Cluster`.

Pure functions of their arguments and an environment mapping (tested with plain dicts); they
import nothing heavy, so the tools and `engine.config` resolve a layout without MegEngine.
Each source has its own reader (`_from_flags`, `_from_torchrun`, `_from_slurm`); the resolver
takes the node count and rank together from the first source that sets a count, and every other
field from the first source that sets it: flags > torchrun-style > Slurm > single-node defaults.
A layout that a source states only in part (a node count without this node's rank, a rank
without a count) is refused up front, naming the variable that is missing: guessing "node 0"
would make this machine wait for nodes that are not coming.

The Slurm-derived master port is `SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN`, 20000-29999:
every node of a job computes the same one without talking to the others, and it stays below
Linux's ephemeral range (32768-60999 by default), from which the kernel hands out the source
ports of outgoing connections (so a port there may be taken by any client at any time).
"""
from __future__ import annotations

import ipaddress
import itertools
import re
from dataclasses import dataclass
from typing import List, Mapping, Optional, TypeVar

from engine.dist.env import env_int, group_nodes, launcher_nodes, slurm_nodes, world_nodes
from engine.errors import UserError

__all__ = ["SOURCES", "SLURM_PORT_BASE", "SLURM_PORT_SPAN", "EPHEMERAL_PORTS", "Cluster",
           "resolve_cluster", "expand_nodelist", "is_loopback", "slurm_port",
           "check_one_process_per_node", "require_gpus", "resolve_ngpus"]

SOURCES = ("flags", "torchrun", "slurm", "default")

#: Linux's default ephemeral port range (net.ipv4.ip_local_port_range), inclusive.
EPHEMERAL_PORTS = (32768, 60999)
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000


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


# --------------------------------------------------------------------------- Slurm host lists

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


# ------------------------------------------------------------------- one reader per source

@dataclass(frozen=True)
class _Said:
    """What one source says about the layout; None where it says nothing."""

    nodes: Optional[int] = None
    rank: Optional[int] = None
    addr: Optional[str] = None
    port: Optional[int] = None
    gpus: Optional[int] = None
    # What to say when this source's layout is incomplete: a count > 1 without a rank (the
    # first), a rank without a count, no master address, no master port.
    no_rank: str = ""
    no_count: str = ""
    no_addr: str = ""
    no_port: str = ""


def _from_flags(num_nodes: Optional[int], node_rank: Optional[int], master_ip: Optional[str],
                master_port: Optional[int], ngpus: Optional[int]) -> _Said:
    """`--num-nodes --node-rank --master-ip --master-port --ngpus`."""
    return _Said(num_nodes, node_rank, master_ip, master_port, ngpus,
                 no_rank="--num-nodes %s also needs --node-rank, this machine's index (0 to %s)"
                 % (num_nodes, (num_nodes or 1) - 1),
                 no_addr="pass --master-ip (or set MASTER_ADDR, or run under Slurm)",
                 no_port="pass --master-port (or set MASTER_PORT)")


def _from_torchrun(env: Mapping[str, str]) -> _Said:
    """MASTER_ADDR, MASTER_PORT, NNODES + NODE_RANK (or GROUP_RANK), or WORLD_SIZE + RANK +
    LOCAL_WORLD_SIZE (node rank = RANK // LOCAL_WORLD_SIZE).

    The engine forks one process per GPU itself (MegEngine's launcher), so the external
    launcher should start one process per node; see `check_one_process_per_node`.
    """
    nodes, rank = launcher_nodes(env)
    if rank is None:
        rank = group_nodes(env)[1]
    said = "NNODES=%s" % nodes
    if nodes is None:
        nodes, world_rank = world_nodes(env)
        rank = world_rank if rank is None else rank
        said = "WORLD_SIZE=%s with LOCAL_WORLD_SIZE=%s" % (env_int(env, "WORLD_SIZE"),
                                                          env_int(env, "LOCAL_WORLD_SIZE") or 1)
    rank_vars = "NODE_RANK, GROUP_RANK" + (" or RANK" if said.startswith("WORLD") else "")
    return _Said(
        nodes, rank, env.get("MASTER_ADDR") or None, env_int(env, "MASTER_PORT"),
        no_rank="%s means %s nodes, but none of %s says which one this machine is: set "
                "NODE_RANK (0 to %s) on every node, or pass --node-rank"
                % (said, nodes, rank_vars, (nodes or 1) - 1),
        no_count="NODE_RANK=%s is set, but neither NNODES nor WORLD_SIZE says how many nodes "
                 "the run has: set NNODES, or pass --num-nodes" % rank,
        no_addr="MASTER_ADDR is not set: set it to node 0's address (or pass --master-ip)",
        no_port="MASTER_PORT is not set: set it to a free port on node 0 that every node uses "
                "(or pass --master-port)")


def _from_slurm(env: Mapping[str, str]) -> _Said:
    """SLURM_NNODES (or SLURM_JOB_NUM_NODES), SLURM_NODEID, the first host of
    SLURM_JOB_NODELIST as master, SLURM_GPUS_ON_NODE or CUDA_VISIBLE_DEVICES as GPUs, and a port
    derived from SLURM_JOB_ID so every node of the job computes the same one. Nothing outside a
    Slurm allocation (no node count)."""
    nodes, rank = slurm_nodes(env)
    if nodes is None:
        return _Said()
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    master = expand_nodelist(nodelist)[0] if nodelist else None
    job_id = env_int(env, "SLURM_JOB_ID")
    port = None if job_id is None else slurm_port(job_id)
    gpus = env_int(env, "SLURM_GPUS_ON_NODE")
    if gpus is None and "CUDA_VISIBLE_DEVICES" in env:
        gpus = _count_visible(env["CUDA_VISIBLE_DEVICES"])
    return _Said(
        nodes, rank, master, port, gpus,
        no_rank="SLURM_NNODES=%d but SLURM_NODEID is not set, so nothing says which node this "
                "is: start the run with srun --ntasks-per-node=1 (which sets it), or pass "
                "--node-rank" % nodes,
        no_addr="SLURM_JOB_NODELIST is not set, so node 0 is unknown: set MASTER_ADDR (or "
                "pass --master-ip)",
        no_port="SLURM_JOB_ID is not set, so no port can be derived: set MASTER_PORT (or pass "
                "--master-port)")


def slurm_port(job_id: int) -> int:
    """The master port of Slurm job `job_id`: the same on every node of the job, different for
    jobs whose ids differ by less than SLURM_PORT_SPAN, and below the ephemeral range."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


# ------------------------------------------------------------------------------ the resolver

_T = TypeVar("_T")


def _first(*values: Optional[_T]) -> Optional[_T]:
    return next((v for v in values if v is not None), None)


def _or(default: _T, *values: Optional[_T]) -> _T:
    found = _first(*values)
    return default if found is None else found


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

    The node count and rank travel together: both come from the first source that sets a
    count (a rank flag still wins), never a count from one source with a rank from another.
    Every other field comes from the first source that sets it; without any, one node on
    localhost with any free port.

    Raises UserError for values that cannot work: a node rank out of range, a multi-node run
    without a master address or port, or a loopback master address (the other nodes would
    wait forever for a server on their own machine), and for a layout stated in part: a node
    count without this node's rank, or (torchrun-style) a node rank without a count. Each
    message names the variable or flag that is missing.
    """
    said = {"flags": _from_flags(num_nodes, node_rank, master_ip, master_port, ngpus),
            "torchrun": _from_torchrun(env), "slurm": _from_slurm(env)}
    source = next((s for s, v in said.items() if v.nodes is not None), None)
    if source is None:
        stray = said["torchrun"].rank
        if node_rank is None and stray:  # NODE_RANK=1 alone: one of several nodes, but which?
            raise UserError(said["torchrun"].no_count)
        source = "flags" if node_rank is not None or master_ip is not None else "default"
        nodes, nrank = 1, _or(0, node_rank)
        rank_known = True
    else:
        nodes = _or(1, said[source].nodes)
        rank = _first(node_rank, said[source].rank)
        nrank, rank_known = _or(0, rank), rank is not None
    addr = _first(*(v.addr for v in said.values()))
    port = _or(0, *(v.port for v in said.values()))
    gpus = _first(*(v.gpus for v in said.values()))
    _check_layout(nodes, nrank, addr, port, gpus, source)
    if nodes > 1:
        _check_complete(said, source, rank_known, addr, port)
    return Cluster(num_nodes=int(nodes), node_rank=int(nrank),
                   master_addr=addr if addr is not None else "localhost",
                   master_port=int(port), gpus_per_node=gpus, source=source)


def _check_layout(nodes: int, nrank: int, addr: Optional[str], port: int, gpus: Optional[int],
                  source: str) -> None:
    if nodes < 1:
        raise UserError("the number of nodes must be >= 1 (got %d from %s)" % (nodes, source))
    if not 0 <= nrank < nodes:
        raise UserError("node rank %d is out of range for %d node(s) (from %s): it must be in "
                        "[0, %d)" % (nrank, nodes, source, nodes))
    if not 0 <= port < 65536:
        raise UserError("master port %d is not a TCP port (0-65535)" % port)
    if gpus is not None and gpus < 0:
        raise UserError("--ngpus must be >= 0 (got %d)" % gpus)
    if nodes > 1 and addr is not None and is_loopback(addr):
        raise UserError(
            "--master-ip %s is this machine's loopback address, which the other nodes "
            "cannot reach: pass node 0's hostname or IP as every node sees it" % addr)


def _check_complete(said: Mapping[str, _Said], source: str, rank_known: bool,
                    addr: Optional[str], port: int) -> None:
    """A multi-node layout needs this node's rank, node 0's address and a fixed port; each
    refusal names what the source that set the node count lacks."""
    nodes = said[source].nodes
    if addr is None:
        raise UserError("a %s-node run needs the address of node 0: %s" % (nodes,
                                                                          said[source].no_addr))
    if port == 0:
        raise UserError("a %s-node run needs a fixed rendezvous port that every node uses: %s"
                        % (nodes, said[source].no_port))
    if not rank_known:
        raise UserError(said[source].no_rank)


# ----------------------------------------------------------------------- processes per node

def check_one_process_per_node(env: Mapping[str, str]) -> None:
    """Refuse being started several times per node by torchrun, srun or mpirun, whatever the
    node count.

    MegEngine's launcher forks one process per GPU itself, so N copies on one node would each
    take every GPU and the same ranks: on one node, N runs writing one save dir; on several,
    a hang at the rendezvous.
    """
    local = env_int(env, "LOCAL_WORLD_SIZE")
    if local is not None and local > 1:
        raise UserError(
            "LOCAL_WORLD_SIZE=%d: start one process per node (torchrun --nproc-per-node 1, or "
            "srun --ntasks-per-node 1); the engine launches one process per GPU itself" % local)
    # Set by srun for the job step it runs (not by sbatch/salloc, whose shell is one process):
    # a comma list of per-node counts, each possibly "N(xK)" (K nodes with N tasks).
    tasks = env.get("SLURM_STEP_TASKS_PER_NODE")
    if tasks:
        counts = [env_int({"SLURM_STEP_TASKS_PER_NODE": part}, "SLURM_STEP_TASKS_PER_NODE")
                  for part in tasks.split(",")]
        n = max((c for c in counts if c is not None), default=1)
        if n > 1:
            raise UserError(
                "Slurm runs %d tasks per node (SLURM_STEP_TASKS_PER_NODE=%s): use srun "
                "--ntasks-per-node=1; the engine launches one process per GPU itself"
                % (n, tasks))
    for name, launcher in (("OMPI_COMM_WORLD_LOCAL_SIZE", "mpirun -npernode 1"),
                           ("MPI_LOCALNRANKS", "mpiexec -ppn 1")):
        local = env_int(env, name)
        if local is not None and local > 1:
            raise UserError(
                "%s=%d: start one process per node (%s); the engine launches one process per "
                "GPU itself" % (name, local, launcher))


def require_gpus(requested: Optional[int], available: int, num_nodes: int = 1) -> None:
    """Refuse a multi-GPU or multi-node run on a machine without a CUDA GPU.

    This machine decides it alone, so the trainer calls it before any rendezvous: a CPU node of
    a multi-node run says so at once instead of waiting for the other nodes first.
    """
    if available == 0 and (requested not in (None, 0, 1) or num_nodes > 1):
        raise UserError(
            "no CUDA GPU is visible on this machine, so training runs as one CPU process; "
            "multi-GPU and multi-node need CUDA (got --ngpus %s, %d node(s))"
            % (requested, num_nodes))


def resolve_ngpus(requested: Optional[int], available: int, num_nodes: int = 1) -> int:
    """Processes per node. CPU-only machines run one process (MegEngine's distributed
    backend is CUDA-only), so asking for more there is an error, not a silent downgrade."""
    if available == 0:
        require_gpus(requested, available, num_nodes)
        return 1
    if requested is None or requested == 0:
        return available
    if requested > available:
        raise UserError("--ngpus %d but only %d GPUs are visible" % (requested, available))
    return requested
