"""The node count and node rank that a launcher states in the environment.

The one reader of these variables: the training launch (`engine.dist.cluster`) and the
multi-node packer (`resolve_nodes` here, for `engine.data.pack`) both read them here, so they accept the same spellings,
Slurm's "8(x2)" included. Each reader returns (node count, node rank), None where a variable is
unset; which source wins, and what a missing half means, is the caller's policy. A leaf: the
standard library and `engine.errors` only, never MegEngine.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Tuple, Type

from engine.errors import UserError

__all__ = ["EnvError", "NodeVars", "env_int", "slurm_nodes", "slurm_array", "launcher_nodes",
           "group_nodes", "world_nodes", "resolve_nodes"]

#: (node count, node rank) as one source states them; None where it says nothing.
NodeVars = Tuple[Optional[int], Optional[int]]


class EnvError(UserError):
    """An environment variable that should hold an integer (or counts that do not fit)."""


def env_int(env: Mapping[str, str], name: str) -> Optional[int]:
    """The integer in `env[name]`; None when unset or empty."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    # Slurm writes some counts as "8(x2)" (per-node value, repeated); the value is what we want.
    m = re.fullmatch(r"\s*(-?\d+)(\(x\d+\))?\s*", raw)
    if not m:
        raise EnvError("environment variable %s=%r is not an integer" % (name, raw))
    return int(m.group(1))


def slurm_nodes(env: Mapping[str, str]) -> NodeVars:
    """A Slurm allocation: SLURM_NNODES (or SLURM_JOB_NUM_NODES) and SLURM_NODEID."""
    count = env_int(env, "SLURM_NNODES")
    if count is None:
        count = env_int(env, "SLURM_JOB_NUM_NODES")
    return count, env_int(env, "SLURM_NODEID")


def slurm_array(env: Mapping[str, str]) -> NodeVars:
    """A Slurm job array, one task per node: SLURM_ARRAY_TASK_COUNT, and SLURM_ARRAY_TASK_ID
    counted from SLURM_ARRAY_TASK_MIN (an --array=1-4 job's tasks are nodes 0..3)."""
    count, task = env_int(env, "SLURM_ARRAY_TASK_COUNT"), env_int(env, "SLURM_ARRAY_TASK_ID")
    if count is None or task is None:
        return count, None  # a task index means nothing without the count
    return count, task - (env_int(env, "SLURM_ARRAY_TASK_MIN") or 0)


def launcher_nodes(env: Mapping[str, str]) -> NodeVars:
    """A launcher's NNODES and NODE_RANK."""
    return env_int(env, "NNODES"), env_int(env, "NODE_RANK")


def group_nodes(env: Mapping[str, str]) -> NodeVars:
    """torchrun's agent group: GROUP_WORLD_SIZE and GROUP_RANK (the node's index)."""
    return env_int(env, "GROUP_WORLD_SIZE"), env_int(env, "GROUP_RANK")


def world_nodes(env: Mapping[str, str]) -> NodeVars:
    """Nodes from process counts: WORLD_SIZE // LOCAL_WORLD_SIZE nodes, this one
    RANK // LOCAL_WORLD_SIZE (LOCAL_WORLD_SIZE 1 when unset)."""
    world, rank, local = (env_int(env, n) for n in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"))
    if world is None:
        return None, None
    per = local or 1
    if world % per:
        raise EnvError("WORLD_SIZE=%d is not a multiple of LOCAL_WORLD_SIZE=%d" % (world, per))
    return world // per, None if rank is None else rank // per


def resolve_nodes(num_nodes: Optional[int], node_rank: Optional[int], env: Mapping[str, str],
                  *, error: Type[UserError]) -> Tuple[int, int, str]:
    """(number of nodes, this node's rank, where that came from) for a multi-node pack: the
    packer's sources and policy (the trainer's are engine.dist.cluster's). A bad layout raises
    `error` (the packer's PackError), which must not be an EnvError.

    Explicit flags win; else a Slurm array (SLURM_ARRAY_TASK_COUNT + SLURM_ARRAY_TASK_ID, minus
    SLURM_ARRAY_TASK_MIN), a Slurm allocation (SLURM_NNODES or SLURM_JOB_NUM_NODES, +
    SLURM_NODEID), a launcher's NNODES + NODE_RANK, or torchrun's GROUP_RANK (with NNODES or
    GROUP_WORLD_SIZE); else one node. The variables are read as the trainer reads them
    (engine.dist.env, Slurm's "8(x2)" included). A pure function of its arguments, so it is
    tested with plain dicts.
    """
    if num_nodes is not None or node_rank is not None:
        if num_nodes is None or node_rank is None:
            raise error("--num-nodes and --node-rank go together (got only %s)"
                        % ("--num-nodes" if node_rank is None else "--node-rank"))
        return _check_nodes(num_nodes, node_rank, "--num-nodes/--node-rank", error)
    try:
        count, task = slurm_array(env)
        if count is not None and task is not None:
            return _check_nodes(count, task,
                                "SLURM_ARRAY_TASK_COUNT/SLURM_ARRAY_TASK_ID (use --array=0-%d)"
                                % (count - 1), error)
        # One source at a time: the variables of the sources after the one that applies are
        # never read, so a stray value there cannot fail the pack.
        for source, read in (("SLURM_NNODES/SLURM_NODEID", slurm_nodes),
                             ("NNODES/NODE_RANK", launcher_nodes)):
            n, r = read(env)
            if n is not None and r is not None:
                return _check_nodes(n, r, source, error)
        group_size, group = group_nodes(env)
        if group is not None:
            n = launcher_nodes(env)[0]
            n = group_size if n is None else n
            if n is None:
                raise error("GROUP_RANK is set but neither NNODES nor GROUP_WORLD_SIZE is; "
                            "pass --num-nodes and --node-rank")
            return _check_nodes(n, group, "GROUP_RANK", error)
    except EnvError as exc:
        raise error("%s; pass --num-nodes and --node-rank instead" % exc) from None
    return 1, 0, "single node"


def _check_nodes(n: int, r: int, source: str, error: Type[UserError]) -> Tuple[int, int, str]:
    if n < 1:
        raise error("the number of nodes must be at least 1 (got %d from %s)" % (n, source))
    if not 0 <= r < n:
        raise error("node rank %d is outside 0..%d (from %s)" % (r, n - 1, source))
    return n, r, source
