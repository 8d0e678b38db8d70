"""The process group: this rank's place in it and the collectives the engine uses.

The one seam between the engine and `megengine.distributed`'s process group: every rank query,
broadcast and all-reduce the engine makes goes through these functions. Each is a no-op (or the
obvious single-process answer) when the process group was never initialised, so the trainer
reads the same in one process as in N. MegEngine is imported inside the functions, never at
module level. MegEngine's collectives need CUDA; on a CPU machine the test suite runs the
branches below `get_world_size() > 1` through the test-only backend in `engine.dist.cpu_backend`,
which stands in for exactly the MegEngine functions these reach (the gradient all-reduce under
`make_allreduce_cb`, the broadcast under `bcast_list_`, and `functional.all_reduce_sum`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

__all__ = ["get_rank", "get_world_size", "allreduce_callback", "broadcast_module",
           "broadcast_buffers", "all_reduce_sum"]


def _mge_dist() -> Any:
    import megengine.distributed as dist

    return dist


def get_rank() -> int:
    """This process's global rank; 0 when not distributed."""
    dist = _mge_dist()
    return dist.get_rank() if dist.is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the job; 1 when not distributed."""
    dist = _mge_dist()
    return dist.get_world_size() if dist.is_distributed() else 1


def allreduce_callback() -> Optional[Callable]:
    """GradManager callback that averages gradients across ranks; None in one process.

    "mean" (not "sum") keeps the loss scale and weight decay identical to a single-GPU run; the
    linear-scaling rule is applied to the learning rate instead (see trainer.scaled_lr).
    """
    return _mge_dist().make_allreduce_cb("mean") if get_world_size() > 1 else None


def broadcast_module(module: Any) -> None:
    """Copy rank 0's parameters and buffers (BN statistics) to every rank, in place."""
    if get_world_size() > 1:
        dist = _mge_dist()
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
        _mge_dist().bcast_list_(list(module.buffers()))


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
