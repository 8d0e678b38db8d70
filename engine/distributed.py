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

import ipaddress
import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence

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
    out = []
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
    elif has_slurm:
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
) -> Any:
    """Run `fn(*args)` on `ngpus` processes per node and return global rank 0's result.

    With one process in total it is a plain call in this process (no fork, no process group),
    which is how every CPU run and every test goes. Otherwise it is exactly MegEngine's
    `dist.launcher`: one process per GPU, ranks `node_rank*ngpus ...`, rank 0's node hosts the
    rendezvous server on `master_port` (0 picks a free port, allowed only on a single node).
    On nodes other than rank 0's the return value is None.
    """
    world = ngpus * num_nodes
    if world <= 1:
        return fn(*args)
    if num_nodes > 1 and master_port == 0:
        raise UserError("multi-node runs need an explicit --master-port that every node uses")
    results = _dist().launcher(
        fn,
        n_gpus=ngpus,
        world_size=world,
        rank_start=node_rank * ngpus,
        master_ip=master_ip,
        port=master_port,
    )(*args)
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


def barrier() -> None:
    """Wait for every rank (e.g. before others read a checkpoint rank 0 just wrote)."""
    if get_world_size() > 1:
        _dist().group_barrier()


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
    "expand_nodelist",
    "is_loopback",
    "check_one_process_per_node",
    "get_rank",
    "get_world_size",
    "is_main",
    "gpu_count",
    "launch",
    "allreduce_callback",
    "broadcast_module",
    "broadcast_buffers",
    "barrier",
    "all_reduce_sum",
]
