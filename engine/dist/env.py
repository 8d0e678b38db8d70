"""The node count and node rank that a launcher states in the environment.

The one reader of these variables: the training launch (`engine.dist.cluster`) and the
multi-node packer (`engine.data.pack`) both read them here, so they accept the same spellings,
Slurm's "8(x2)" included. Each reader returns (node count, node rank), None where a variable is
unset; which source wins, and what a missing half means, is the caller's policy. A leaf: the
standard library and `engine.errors` only, never MegEngine.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Tuple

from engine.errors import UserError

__all__ = ["EnvError", "NodeVars", "env_int", "slurm_nodes", "slurm_array", "launcher_nodes",
           "group_nodes", "world_nodes"]

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
