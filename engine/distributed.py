"""The only module that knows about ranks.

Everything here is a thin wrapper over `megengine.distributed`, and every function is a no-op
(or the obvious single-process answer) when the process group was never initialised, so the
trainer reads the same in one process as in N. Multi-GPU needs CUDA: MegEngine's launcher and
process groups refuse the CPU backend, so nothing below the `world_size() > 1` branches runs in
CPU-only tests.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

import megengine as mge
import megengine.distributed as dist
from megengine.distributed.functional import all_reduce_sum as _all_reduce_sum


def get_rank() -> int:
    """This process's global rank; 0 when not distributed."""
    return dist.get_rank() if dist.is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the job; 1 when not distributed."""
    return dist.get_world_size() if dist.is_distributed() else 1


def is_main() -> bool:
    """True on the one process that logs and writes files (global rank 0)."""
    return get_rank() == 0


def gpu_count() -> int:
    """GPUs visible on this node, without creating a CUDA context.

    The launcher's children fail if CUDA was initialised in the parent ("cuda env is set before
    the forked thread starts"), so this must stay a query, never a tensor allocation.
    """
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
        raise ValueError("multi-node runs need an explicit --master-port that every node uses")
    results = dist.launcher(
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
    return dist.make_allreduce_cb("mean") if get_world_size() > 1 else None


def broadcast_module(module: "mge.module.Module") -> None:
    """Copy rank 0's parameters and buffers (BN statistics) to every rank, in place."""
    if get_world_size() > 1:
        dist.bcast_list_(list(module.parameters()))
        dist.bcast_list_(list(module.buffers()))


def barrier() -> None:
    """Wait for every rank (e.g. before others read a checkpoint rank 0 just wrote)."""
    if get_world_size() > 1:
        dist.group_barrier()


def all_reduce_sum(values: Sequence[float]) -> np.ndarray:
    """Sum a small vector of host numbers across ranks (eval counts); identity in one process."""
    arr = np.asarray(values, dtype=np.float64)
    if get_world_size() == 1:
        return arr
    # float32 on device: counts up to 2**24 are exact, far more than one rank's val shard.
    t = _all_reduce_sum(mge.tensor(arr.astype(np.float32)))
    return t.numpy().astype(np.float64)


__all__ = [
    "get_rank",
    "get_world_size",
    "is_main",
    "gpu_count",
    "launch",
    "allreduce_callback",
    "broadcast_module",
    "barrier",
    "all_reduce_sum",
]
