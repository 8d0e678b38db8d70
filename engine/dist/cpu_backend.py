"""The test-only CPU collective backend: several training ranks on a machine without CUDA.

MegEngine's collectives are CUDA/ROCm-only (`init_process_group` refuses any other device, and
the collective operator needs a GPU comp node), so without this module no run of two or more
ranks can execute on a CPU machine. This backend replaces exactly the three functions through
which the engine's collectives reach MegEngine, and nothing else:

- `megengine.distributed.helper.all_reduce_sum`: the gradient all-reduce of the GradManager
  callback (`make_allreduce_cb`, under `pack_allreduce_split`, which still packs, divides by the
  group size and splits for real);
- `megengine.distributed.helper._bcast_param`: the parameter and buffer broadcast (`bcast_list_`);
- `megengine.distributed.functional.all_reduce_sum`: the host sums of `engine.dist.group` (the
  eval counts and the logged loss).

Everything around them is the real code path: the ranks are forked by `engine.dist.ranks`, the
process group's state is what `init_process_group` would set (built directly, since that
function refuses the CPU), MegEngine's own rendezvous server carries the group barrier and the
address of rank 0's exchange, and the data moves over TCP between each rank and rank 0 (a
star; rank 0 adds the arrays in rank order, so every rank receives the same bits). Values are
read on the host, so it works in eager mode only; a call inside a traced graph is refused.

It is chosen by the environment variable named in `SWITCH`, which only the test suite sets;
it is never on in a user's run, and it refuses to run where GPUs are visible (a GPU run needs
NCCL, not this). A user who sets it anyway gets the one-line notice in `NOTE`.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from engine.errors import UserError

__all__ = ["SWITCH", "BACKEND", "NOTE", "enabled", "check_cpu_only", "init_rank", "run_rank",
           "exchange"]

#: The switch. Test-only: it makes multi-rank runs use host-side sums instead of NCCL.
SWITCH = "ENGINE_TEST_ONLY_CPU_COLLECTIVES"
#: The process group's backend name while it is on (MegEngine only stores it).
BACKEND = "engine-cpu-test"
NOTE = ("note: %s is set: the ranks exchange gradients through the test-only CPU backend, "
        "eagerly (no --trace); this is for the engine's own tests, not for training" % SWITCH)

_STAR_KEY = "engine/cpu-backend/star"
_CONNECT_TIMEOUT = 300.0  # seconds for every rank to reach rank 0's exchange at start-up
# A collective whose peer died never completes under NCCL either; this one waits that long for
# the node's supervisor (engine.dist.ranks) to stop the rank, then raises, so nothing hangs.
_LOST_PEER_WAIT = 60.0
_HEADER = struct.Struct("!I")


def enabled(env: Optional[Mapping[str, str]] = None) -> bool:
    """True when the test-only switch is set (to anything but "" or "0")."""
    value = (os.environ if env is None else env).get(SWITCH, "")
    return value.strip() not in ("", "0")


def check_cpu_only(gpus: int) -> None:
    """Refuse the backend where GPUs are visible: such a run is a GPU run and needs NCCL."""
    if gpus > 0:
        raise UserError(
            "%s is set, but %d GPU(s) are visible: that switch selects the engine's test-only "
            "CPU collectives and cannot run on GPUs; unset it (or hide the GPUs with "
            "CUDA_VISIBLE_DEVICES= for a CPU test)" % (SWITCH, gpus))


# --------------------------------------------------------------------------- the exchange

class _PeerLost(Exception):
    pass


def _send(sock: socket.socket, meta: Dict[str, Any], payload: bytes = b"") -> None:
    head = json.dumps(meta).encode()
    sock.sendall(_HEADER.pack(len(head)) + head)
    if payload:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise _PeerLost()
        got += k
    return buf


def _recv(sock: socket.socket) -> tuple:
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    meta = json.loads(bytes(_recv_exact(sock, n)))
    payload = _recv_exact(sock, int(meta.get("nbytes", 0)))
    return meta, payload


def _array_meta(op: str, seq: int, arr: np.ndarray) -> Dict[str, Any]:
    return {"op": op, "seq": seq, "dtype": arr.dtype.str, "shape": list(arr.shape),
            "nbytes": int(arr.nbytes)}


def _as_array(meta: Dict[str, Any], payload: bytearray) -> np.ndarray:
    return np.frombuffer(payload, dtype=np.dtype(meta["dtype"])).reshape(meta["shape"]).copy()


class _Star:
    """Rank 0 holds one TCP connection to every other rank; collectives go through it.

    Every rank calls the collectives in the same order (as with NCCL); each message carries
    the operation and its sequence number, so a rank that calls a different one is an error
    rather than a wrong sum.
    """

    def __init__(self, rank: int, world: int, master_ip: str, client: Any):
        self.rank, self.world, self.seq = rank, world, 0
        self.peers: Dict[int, socket.socket] = {}
        if rank == 0:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", 0))
            listener.listen(world)
            listener.settimeout(_CONNECT_TIMEOUT)
            client.user_set(_STAR_KEY, listener.getsockname()[1])
            try:
                while len(self.peers) < world - 1:
                    conn, _ = listener.accept()
                    conn.settimeout(None)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    meta, _ = _recv(conn)
                    self.peers[int(meta["rank"])] = conn
            except socket.timeout:
                missing = sorted(set(range(1, world)) - set(self.peers))
                raise RuntimeError("ranks %s did not connect to rank 0's CPU exchange within "
                                   "%.0f s" % (missing, _CONNECT_TIMEOUT)) from None
            finally:
                listener.close()
        else:
            port = int(client.user_get(_STAR_KEY))
            deadline = time.monotonic() + _CONNECT_TIMEOUT
            while True:
                try:
                    conn = socket.create_connection((master_ip, port), timeout=10)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _send(conn, {"rank": rank})
            self.peers[0] = conn

    def _check(self, meta: Dict[str, Any], op: str, seq: int, peer: int) -> None:
        if meta.get("op") != op or meta.get("seq") != seq:
            raise RuntimeError(
                "collectives out of order: rank %d is in %s #%d but rank %d sent %s #%s"
                % (self.rank, op, seq, peer, meta.get("op"), meta.get("seq")))

    def _lost(self, peer: int) -> None:
        # NCCL would block here forever; the supervisor stops this rank within seconds.
        time.sleep(_LOST_PEER_WAIT)
        raise ConnectionError("rank %d lost its connection to rank %d in a collective"
                              % (self.rank, peer))

    def all_reduce_sum(self, arr: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(arr)
        self.seq += 1
        seq, peer = self.seq, 0
        try:
            if self.rank == 0:
                total = arr.copy()
                for peer in range(1, self.world):  # rank order: the same bits on every rank
                    meta, payload = _recv(self.peers[peer])
                    self._check(meta, "all_reduce_sum", seq, peer)
                    total += _as_array(meta, payload)
                out = total.tobytes()
                for peer in range(1, self.world):
                    _send(self.peers[peer], _array_meta("all_reduce_sum", seq, total), out)
                return total
            _send(self.peers[0], _array_meta("all_reduce_sum", seq, arr), arr.tobytes())
            meta, payload = _recv(self.peers[0])
            self._check(meta, "all_reduce_sum", seq, 0)
            return _as_array(meta, payload)
        except (_PeerLost, ConnectionError, BrokenPipeError):
            self._lost(peer)
            raise

    def broadcast(self, arr: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(arr)
        self.seq += 1
        seq, peer = self.seq, 0
        try:
            if self.rank == 0:
                data = arr.tobytes()
                for peer in range(1, self.world):
                    _send(self.peers[peer], _array_meta("broadcast", seq, arr), data)
                return arr
            meta, payload = _recv(self.peers[0])
            self._check(meta, "broadcast", seq, 0)
            return _as_array(meta, payload)
        except (_PeerLost, ConnectionError, BrokenPipeError):
            self._lost(peer)
            raise


_star: Optional[_Star] = None


def exchange() -> _Star:
    """This rank's exchange (after init_rank)."""
    assert _star is not None, "engine.dist.cpu_backend.init_rank was not called in this rank"
    return _star


# ------------------------------------------------- the three functions MegEngine calls

def _host_value(inp: Any, what: str) -> np.ndarray:
    from megengine.jit.tracing import is_tracing

    if is_tracing():
        raise RuntimeError("%s inside a traced graph: the test-only CPU backend reads values "
                           "on the host, so it runs eagerly only (trace=False)" % what)
    return inp.numpy()


def _all_reduce_sum(inp: Any, group: Any = None, device: Any = None) -> Any:
    """Stands in for megengine.distributed.{helper,functional}.all_reduce_sum."""
    import megengine as mge

    out = exchange().all_reduce_sum(_host_value(inp, "all_reduce_sum"))
    return mge.tensor(out, dtype=inp.dtype, device=inp.device)


def _bcast_param(inp: Any, group: Any = None) -> Any:
    """Stands in for megengine.distributed.helper._bcast_param (rank 0's value everywhere)."""
    import megengine as mge

    out = exchange().broadcast(_host_value(inp, "broadcast"))
    return mge.tensor(out, dtype=inp.dtype, device=inp.device)


def init_rank(master_ip: str, port: int, world_size: int, rank: int,
              machine_ranks: Sequence[int]) -> None:
    """In a forked rank: the process-group state `init_process_group` sets for NCCL, the
    connection to rank 0's exchange, and the three replaced functions."""
    global _star
    from megengine.distributed import functional, group, helper
    from megengine.distributed.server import Client

    sd = group.StaticData()
    sd.client = Client(master_ip, port)
    sd.master_ip, sd.py_server_port = master_ip, port
    sd.world_size, sd.proc_rank = world_size, rank
    sd.device, sd.device_type, sd.backend = 0, "cpu", BACKEND
    sd.machine_ranks = list(machine_ranks)
    group._sd = sd
    group.WORLD.reset(list(range(world_size)))
    _star = _Star(rank, world_size, master_ip, sd.client)
    helper.all_reduce_sum = _all_reduce_sum
    helper._bcast_param = _bcast_param
    functional.all_reduce_sum = _all_reduce_sum


def run_rank(fn: Callable[..., Any], is_multimachine: bool, master_ip: str, port: int,
             world_size: int, rank: int, dev: int, args: Sequence[Any], queue: Any,
             machine_ranks: List[int]) -> None:
    """One forked rank: MegEngine's `launcher._run_wrapped`, with `init_rank` in place of
    `init_process_group` (the same barriers, result queue and exit)."""
    from megengine import _exit
    from megengine.core._imperative_rt.core2 import full_sync
    from megengine.distributed.group import group_barrier

    init_rank(master_ip, port, world_size, rank, machine_ranks)
    if is_multimachine:
        group_barrier()
    ret = fn(*args)
    queue.put((dev, ret))
    full_sync()
    if is_multimachine:
        group_barrier()
    _exit(0)
