"""Ranks and nodes: the only package that knows them.

Everything else in the engine receives a rank, a world size and a local world size as plain
integers. The package owns:

- `env`: the node count and node rank a launcher states in the environment (Slurm, torchrun-
  style variables); a leaf that `engine.data` may import too;
- `cluster`: flags and those variables -> this node's `Cluster` layout, the GPU count per node,
  the one-process-per-node check (pure functions, no MegEngine);
- `rendezvous`: every node checks in with node 0 before any rank starts, with a deadline, and
  keeps a heartbeat through node 0's server while the run lasts (`NodeWatch`);
- `net`: the master port (free on node 0, the engine's server on the others) and the network
  interface the ranks use (MEGRAY_NET_DEVICE, NCCL_SOCKET_IFNAME from the route to node 0);
- `ranks`: `launch` (forks one process per GPU and supervises them: a failed rank, or a node
  gone silent, stops every node) and the relay that brings a rank's error back as one line;
- `group`: the process-group queries and collectives, the engine's one seam to
  `megengine.distributed`;
- `cpu_backend`: the test-only stand-in for those collectives on CPU, behind the switch
  `ENGINE_TEST_ONLY_CPU_COLLECTIVES`, so that multi-rank runs execute in the test suite.

The names below are what the rest of the engine uses; the parts of the rendezvous and of the
error relay are reached through their modules. Importing the package does not import MegEngine;
the functions that need it import it.
"""
from engine.dist.cluster import (
    Cluster,
    check_one_process_per_node,
    expand_nodelist,
    is_loopback,
    require_gpus,
    resolve_cluster,
    resolve_ngpus,
)
from engine.dist.cpu_backend import enabled as cpu_collectives
from engine.dist.group import (
    all_reduce_sum,
    allreduce_callback,
    broadcast_buffers,
    broadcast_module,
    get_rank,
    get_world_size,
)
from engine.dist.net import configure_interfaces
from engine.dist.ranks import gpu_count, launch, processes_per_node
from engine.dist.rendezvous import HEARTBEAT_TIMEOUT, RENDEZVOUS_TIMEOUT, node_report

__all__ = [
    "Cluster", "resolve_cluster", "resolve_ngpus", "expand_nodelist", "is_loopback",
    "check_one_process_per_node", "require_gpus",
    "RENDEZVOUS_TIMEOUT", "HEARTBEAT_TIMEOUT", "node_report", "gpu_count", "processes_per_node",
    "launch", "cpu_collectives", "configure_interfaces",
    "get_rank", "get_world_size", "allreduce_callback", "broadcast_module", "broadcast_buffers",
    "all_reduce_sum",
]
