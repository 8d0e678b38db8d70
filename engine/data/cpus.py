"""How many CPUs this process may really use, and how many loader workers that buys.

A node runs one trainer process per GPU, each with its own loader, so a loader that sizes itself
as if it were alone (cores - 1 workers) oversubscribes an 8-GPU node eightfold. The policy:

    usable cores = CPUs in this process's affinity mask, capped by the container's CPU quota
                   (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us / cpu.cfs_period_us`)
    workers      = max(1, usable cores // local_world_size - 1)

`local_world_size` is the number of loaders sharing the machine (the trainer passes its
processes per node). The "- 1" leaves each rank's main process a core to feed its GPU; at least
one worker is kept because decoding in a worker overlaps with the main process's waits on the
device, which decoding inline cannot.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Set

__all__ = ["cgroup_cpu_limit", "usable_cores", "default_workers"]

CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: str = CGROUP_ROOT) -> Optional[float]:
    """The container's CPU quota in CPUs (e.g. 3.5), or None when there is none.

    cgroup v2: `<root>/cpu.max` holds "QUOTA PERIOD" or "max PERIOD". cgroup v1:
    `<root>/cpu/cpu.cfs_quota_us` (-1 = unlimited) over `<root>/cpu/cpu.cfs_period_us`
    (also tried under `cpu,cpuacct/`, where some distributions mount it).
    """
    v2 = _read(os.path.join(root, "cpu.max"))
    if v2:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            try:
                quota, period = int(parts[0]), int(parts[1])
            except ValueError:
                return None
            return quota / period if quota > 0 and period > 0 else None
        return None
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota_text = _read(os.path.join(root, sub, "cpu.cfs_quota_us"))
        period_text = _read(os.path.join(root, sub, "cpu.cfs_period_us"))
        if quota_text is not None and period_text is not None:
            try:
                q, p = int(quota_text), int(period_text)
            except ValueError:
                return None
            return q / p if q > 0 and p > 0 else None
    return None


def usable_cores(affinity: Optional[Set[int]] = None, cgroup_root: str = CGROUP_ROOT) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # not Linux
            affinity = set(range(os.cpu_count() or 1))
    cores = max(1, len(affinity))
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        # A quota of 3.5 CPUs can keep 4 processes 87% busy: round up, never below one.
        cores = min(cores, max(1, math.ceil(limit)))
    return cores


def default_workers(local_world_size: int = 1, cores: Optional[int] = None) -> int:
    """Loader workers per process when `local_world_size` loaders share the machine."""
    if local_world_size < 1:
        raise ValueError("local_world_size must be >= 1 (got %d)" % local_world_size)
    cores = usable_cores() if cores is None else cores
    return max(1, cores // local_world_size - 1)
