"""Where this node sits in a run: flags, torchrun-style and Slurm variables -> a `Cluster`.

Pure functions of their arguments and an environment mapping (tested with plain dicts); they
import nothing heavy, so the tools and `engine.config` resolve a layout without MegEngine.
Each source has its own reader (`_from_flags`, `_from_torchrun`, `_from_slurm`); the resolver
takes the node count and rank together from the first source that sets a count, and every other
field from the first source that sets it: flags > torchrun-style > Slurm > single-node defaults.
"""
from __future__ import annotations

import ipaddress
import itertools
import re
from dataclasses import dataclass
from typing import List, Mapping, Optional, TypeVar

from engine.dist.env import env_int, group_nodes, launcher_nodes, slurm_nodes, world_nodes
from engine.errors import UserError

__all__ = ["SOURCES", "Cluster", "resolve_cluster", "expand_nodelist", "is_loopback",
           "check_one_process_per_node", "resolve_ngpus"]

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


def _from_flags(num_nodes: Optional[int], node_rank: Optional[int], master_ip: Optional[str],
                master_port: Optional[int], ngpus: Optional[int]) -> _Said:
    """`--num-nodes --node-rank --master-ip --master-port --ngpus`."""
    return _Said(num_nodes, node_rank, master_ip, master_port, ngpus)


def _from_torchrun(env: Mapping[str, str]) -> _Said:
    """MASTER_ADDR, MASTER_PORT, NNODES + NODE_RANK (or GROUP_RANK), or WORLD_SIZE + RANK +
    LOCAL_WORLD_SIZE (node rank = RANK // LOCAL_WORLD_SIZE).

    The engine forks one process per GPU itself (MegEngine's launcher), so the external
    launcher should start one process per node; see `check_one_process_per_node`.
    """
    nodes, rank = launcher_nodes(env)
    if rank is None:
        rank = group_nodes(env)[1]
    if nodes is None:
        nodes, world_rank = world_nodes(env)
        rank = world_rank if rank is None else rank
    return _Said(nodes, rank, env.get("MASTER_ADDR") or None, env_int(env, "MASTER_PORT"))


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
    # Same on every node of the job, and different for two jobs sharing a node.
    port = None if job_id is None else 20000 + job_id % 20000
    gpus = env_int(env, "SLURM_GPUS_ON_NODE")
    if gpus is None and "CUDA_VISIBLE_DEVICES" in env:
        gpus = _count_visible(env["CUDA_VISIBLE_DEVICES"])
    return _Said(nodes, rank, master, port, gpus)


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
    wait forever for a server on their own machine).
    """
    said = {"flags": _from_flags(num_nodes, node_rank, master_ip, master_port, ngpus),
            "torchrun": _from_torchrun(env), "slurm": _from_slurm(env)}
    source = next((s for s, v in said.items() if v.nodes is not None), None)
    if source is None:
        source = "flags" if node_rank is not None or master_ip is not None else "default"
        nodes, nrank = 1, _or(0, node_rank)
    else:
        nodes, nrank = _or(1, said[source].nodes), _or(0, node_rank, said[source].rank)
    addr = _first(*(v.addr for v in said.values()))
    port = _or(0, *(v.port for v in said.values()))
    gpus = _first(*(v.gpus for v in said.values()))
    _check_layout(nodes, nrank, addr, port, gpus, source)
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


# ----------------------------------------------------------------------- processes per node

def check_one_process_per_node(env: Mapping[str, str]) -> None:
    """Refuse being started several times per node by torchrun or srun.

    MegEngine's launcher forks one process per GPU itself, so a second copy on the same node
    would take the same GPUs and ranks and hang at the rendezvous.
    """
    local = env_int(env, "LOCAL_WORLD_SIZE")
    if local is not None and local > 1:
        raise UserError(
            "LOCAL_WORLD_SIZE=%d: start one process per node (torchrun --nproc-per-node 1, or "
            "srun --ntasks-per-node 1); the engine launches one process per GPU itself" % local)
    # Set by srun for the job step it runs (not by sbatch/salloc, whose shell is one process).
    tasks = env.get("SLURM_STEP_TASKS_PER_NODE")
    if tasks:
        n = env_int({"v": tasks.split(",")[0]}, "v")
        if n is not None and n > 1:
            raise UserError(
                "Slurm runs %d tasks per node: use --ntasks-per-node=1; the engine launches one "
                "process per GPU itself" % n)


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
