"""Ranks and nodes: the only package that knows them.

Everything else in the engine receives a rank, a world size and a local world size as plain
integers. The package owns:

- `env`: the node count and node rank a launcher states in the environment (Slurm, torchrun-
  style variables); a leaf that `engine.data` may import too;
- `cluster`: flags and those variables -> this node's `Cluster` layout, the GPU count per node,
  the one-process-per-node check (pure functions, no MegEngine);
- `rendezvous`: every node checks in with node 0 before any rank starts, with a deadline;
- `net`: the master port (free on node 0, the engine's server on the others) and the network
  interface the ranks use (MEGRAY_NET_DEVICE, NCCL_SOCKET_IFNAME from the route to node 0);
- `ranks`: `launch` (one process per GPU through MegEngine's launcher) and the relay that brings
  a rank's error back to the parent as one line;
- `group`: the process-group queries and collectives, the engine's one seam to
  `megengine.distributed`.

The names below are what the rest of the engine uses; the parts of the rendezvous and of the
error relay are reached through their modules. Importing the package does not import MegEngine;
the functions that need it import it.
"""
from engine.dist.cluster import (Cluster, check_one_process_per_node, expand_nodelist,
                                 is_loopback, require_gpus, resolve_cluster, resolve_ngpus)
from engine.dist.group import (all_reduce_sum, allreduce_callback, broadcast_buffers,
                               broadcast_module, get_rank, get_world_size)
from engine.dist.net import configure_interfaces
from engine.dist.ranks import gpu_count, launch
from engine.dist.rendezvous import RENDEZVOUS_TIMEOUT, node_report

__all__ = [
    "Cluster", "resolve_cluster", "resolve_ngpus", "expand_nodelist", "is_loopback",
    "check_one_process_per_node", "require_gpus",
    "RENDEZVOUS_TIMEOUT", "node_report", "gpu_count", "launch", "configure_interfaces",
    "get_rank", "get_world_size", "allreduce_callback", "broadcast_module", "broadcast_buffers",
    "all_reduce_sum",
]
