"""The node rendezvous: every node checks in before any rank starts, with a deadline.

MegEngine's own rendezvous never gives up: its client retries the master forever (a node given
--master-ip localhost waits for a server on itself), and nodes that disagree on the GPU count
compute different world sizes and wait forever in the first barrier. So before the launcher
forks any rank, the parent process of every node reports to the rendezvous server on node 0
(MegEngine's own XML-RPC server, through its user_set/user_get store): its GPU count, node
count, any error found in its own checks (a missing --resume file, say), and a fingerprint of
the checkpoint it would resume. Node 0 (the leader) compares the reports and publishes one
verdict; every other node (a follower) waits for it. Then every node starts its ranks or stops
with the same one-line error. Each wait has a deadline, after which the message says which node
did not arrive.

After the start, the same server carries the run's heartbeat (`NodeWatch`): the parent of
every node beats once a second, node 0 watches every other node's beat and the other nodes
watch node 0's, and a node whose rank failed reports it. Node 0 turns the first failure (or a
node silent for the heartbeat timeout) into one stop message that every node reads, so a
failure anywhere stops every node with the same line instead of leaving the others in a
collective forever. Standard library only: the server is MegEngine's, the client plain XML-RPC.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
import xmlrpc.client
from typing import Any, Callable, Dict, List, Mapping, Optional

from engine.errors import UserError

__all__ = ["RENDEZVOUS_TIMEOUT", "VERDICT_MARGIN_S", "HEARTBEAT_TIMEOUT", "file_fingerprint",
           "node_report", "check_node_reports", "node_handshake", "NodeWatch"]

RENDEZVOUS_TIMEOUT = 600.0  # seconds; nodes of one Slurm job start within seconds of each other
VERDICT_MARGIN_S = 30.0
# A node's parent process only waits for its ranks, so it beats steadily even when they are
# busy; a node silent this long is gone (torchelastic's default keep-alive gives up after 15 s).
HEARTBEAT_TIMEOUT = 15.0

_NODE_KEY = "engine/rendezvous/node/%d"
_VERDICT_KEY = "engine/rendezvous/verdict"
_ACK_KEY = "engine/rendezvous/ack/%d"


def file_fingerprint(path: str) -> str:
    """Size and content hash of a file: equal on two nodes only for the same checkpoint."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return "%d bytes, sha256 %s" % (os.path.getsize(path), h.hexdigest()[:16])


def node_report(*, num_nodes: int, ngpus: Optional[int], error: Optional[str] = None,
                resume: Optional[str] = None) -> Dict[str, Any]:
    """What one node tells the others at the rendezvous."""
    return {"num_nodes": int(num_nodes), "ngpus": ngpus, "error": error,
            "resume": file_fingerprint(resume) if resume and error is None else None}


def check_node_reports(reports: Mapping[int, Mapping[str, Any]]) -> Optional[str]:
    """The first problem among all nodes' reports, as one line; None when they agree."""
    for k in sorted(reports):
        if reports[k].get("error"):
            return "node %d: %s" % (k, reports[k]["error"])
    base = reports[0]
    for k in sorted(reports):
        r = reports[k]
        if r["num_nodes"] != base["num_nodes"]:
            return ("node %d was started for %d nodes but node 0 for %d: give every node the "
                    "same --num-nodes" % (k, r["num_nodes"], base["num_nodes"]))
        if r["ngpus"] != base["ngpus"]:
            return ("node %d runs %s GPU processes but node 0 runs %s: every node must use the "
                    "same number (pass the same --ngpus everywhere)" % (k, r["ngpus"], base["ngpus"]))
        if r.get("resume") != base.get("resume"):
            return ("the checkpoint to continue from differs between nodes: node %d has %s, "
                    "node 0 has %s; copy node 0's checkpoint to every node (or keep the save dir "
                    "on shared storage)" % (k, r.get("resume") or "none (a new run)",
                                            base.get("resume") or "none (a new run)"))
    return None


class _TimeoutTransport(xmlrpc.client.Transport):
    def __init__(self, timeout: float):
        super().__init__()
        self._timeout = max(0.1, timeout)

    def make_connection(self, host):
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


def _call(addr: str, port: int, deadline: float, method: str, *args: Any) -> Any:
    """One XML-RPC call to the rendezvous server, retried while it is not up yet, never past
    the deadline (socket.timeout / ConnectionError when the time is up)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline passed")
        proxy = xmlrpc.client.ServerProxy("http://%s:%d" % (addr, port), allow_none=True,
                                          transport=_TimeoutTransport(left))
        try:
            return getattr(proxy, method)(*args)
        except socket.timeout:
            raise
        except (xmlrpc.client.ProtocolError, xmlrpc.client.Fault) as exc:
            from engine.dist.net import foreign_server_message

            what = ("HTTP %d %s" % (exc.errcode, exc.errmsg)
                    if isinstance(exc, xmlrpc.client.ProtocolError) else "XML-RPC fault")
            raise UserError(foreign_server_message(addr, port, what)) from None
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, socket.gaierror):
                raise UserError("cannot resolve the master address %r: %s" % (addr, exc)) from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def node_handshake(addr: str, port: int, node_rank: int, num_nodes: int,
                   report: Mapping[str, Any], timeout: float = RENDEZVOUS_TIMEOUT) -> None:
    """Meet the other nodes at `addr:port` before launching; raise UserError on any problem.

    Node 0 collects every node's report and publishes the verdict; the others publish theirs
    and wait for it. Every wait ends after `timeout` seconds with a message naming what was
    missing, so a wrong address, a node that never started or a node with another GPU count
    is an error on every node instead of a hang.
    """
    deadline = time.monotonic() + timeout
    where = "%s:%d" % (addr, port)
    try:
        _call(addr, port, deadline, "user_set", _NODE_KEY % node_rank, json.dumps(dict(report)))
    except socket.timeout:
        raise UserError(
            "node %d could not reach the rendezvous server at %s within %.0f s: is node 0 "
            "running, is --master-ip node 0's address as this node sees it, and is port %d "
            "open between the nodes?" % (node_rank, where, timeout, port)) from None
    if node_rank == 0:
        verdict = _lead(addr, port, num_nodes, report, deadline, timeout)
    else:
        verdict = _follow(addr, port, node_rank, deadline, timeout)
    if verdict:
        raise UserError(verdict)


def _lead(addr: str, port: int, num_nodes: int, report: Mapping[str, Any], deadline: float,
          timeout: float) -> Optional[str]:
    """Node 0's half: collect every report, publish the verdict, and when it stops the run,
    give the other nodes a moment to read it. Returns the verdict (None: start)."""
    reports: Dict[int, Mapping[str, Any]] = {0: dict(report)}
    verdict = None
    for k in range(1, num_nodes):
        try:
            reports[k] = json.loads(_call(addr, port, deadline, "user_get", _NODE_KEY % k))
        except socket.timeout:
            verdict = ("node %d did not reach the rendezvous at %s:%d within %.0f s: check that "
                       "it was started with --num-nodes %d, --node-rank %d and the same "
                       "--master-ip/--master-port, and that it can reach this machine"
                       % (k, addr, port, timeout, num_nodes, k))
            break
    verdict = verdict or check_node_reports(reports)
    # Published even when some node is missing, so that the nodes that did arrive stop too.
    _call(addr, port, time.monotonic() + 30, "user_set", _VERDICT_KEY, verdict or "")
    if verdict:
        # This process exits next, and the server with it: first let the nodes that arrived
        # read the verdict (bounded: a node may have died meanwhile).
        ack_deadline = time.monotonic() + 30
        for k in sorted(reports):
            if k:
                try:
                    _call(addr, port, ack_deadline, "user_get", _ACK_KEY % k)
                except socket.timeout:
                    break
    return verdict


def _follow(addr: str, port: int, node_rank: int, deadline: float,
            timeout: float) -> Optional[str]:
    """Another node's half: wait for node 0's verdict and acknowledge a stopping one."""
    # Node 0 publishes its verdict at its own deadline at the latest, and it may have started
    # later than this node: wait that long plus a margin, or a slow node 0 would turn its
    # precise message ("node 2 did not arrive") into this node's vague one.
    try:
        verdict = _call(addr, port, deadline + VERDICT_MARGIN_S, "user_get", _VERDICT_KEY)
    except socket.timeout:
        raise UserError("node 0 did not complete the rendezvous at %s:%d within %.0f s (another "
                        "node may be missing or still starting)"
                        % (addr, port, timeout + VERDICT_MARGIN_S)) from None
    if verdict:
        try:
            _call(addr, port, time.monotonic() + 10, "user_set", _ACK_KEY % node_rank, True)
        except (socket.timeout, UserError):
            pass
    return verdict


# ------------------------------------------------------------------------------ heartbeat

_BEAT_KEY = "engine/watch/beat/%d"
_FAIL_KEY = "engine/watch/fail/%d"
_STOP_KEY = "engine/watch/stop"
_STOP_ACK_KEY = "engine/watch/stop-ack/%d"
_DONE_KEY = "engine/watch/done/%d"
_ACK_WAIT_S = 10.0     # node 0 keeps its server up this long for the others to read a stop
_REFUSED_GRACE_S = 3.0  # a server that refuses connections this long is gone with its node
_RPC_ERRORS = (OSError, xmlrpc.client.Error, http.client.HTTPException)


def _rpc(addr: str, port: int, timeout: Optional[float], method: str, *args: Any) -> Any:
    """One XML-RPC call, no retry; `timeout` None waits as long as the server takes."""
    transport = (_TimeoutTransport(timeout) if timeout is not None
                 else xmlrpc.client.Transport())
    proxy = xmlrpc.client.ServerProxy("http://%s:%d" % (addr, port), allow_none=True,
                                      transport=transport)
    return getattr(proxy, method)(*args)


class NodeWatch:
    """One node's side of the run's heartbeat, in the node's parent process.

    `start()` after the ranks are forked (its threads must not exist at the fork), then the
    supervisor polls `stop` (None while the run is healthy, else the one-line message every
    node prints), calls `report(message)` when one of its own ranks failed (it returns the
    message to print: node 0's verdict, which names the first failure of the run), and
    `finish()` when its ranks completed. Node 0 decides: it watches every other node's beat
    and their failure reports and publishes the stop message; the other nodes watch node 0's
    beat and wait for that message. `timeout` is how long a node may stay silent.
    """

    def __init__(self, addr: str, port: int, node_rank: int, num_nodes: int,
                 timeout: float = HEARTBEAT_TIMEOUT):
        self.addr, self.port = addr, port
        self.node, self.num_nodes = node_rank, num_nodes
        self.timeout = float(timeout)
        self.interval = min(1.0, self.timeout / 5)
        self._rpc_timeout = max(0.5, min(5.0, self.timeout / 2))
        self._lock = threading.Lock()
        self._stop: Optional[str] = None
        self._dead: List[int] = []   # nodes declared gone (no ack expected from them)
        self._quit = threading.Event()
        self._threads: List[threading.Thread] = []

    # ---- what the supervisor uses
    @property
    def stop(self) -> Optional[str]:
        with self._lock:
            return self._stop

    def start(self) -> None:
        self._spawn(self._beat_loop)
        if self.node == 0:
            for k in range(1, self.num_nodes):
                self._spawn(self._wait_failure, k)
        else:
            self._spawn(self._wait_stop)

    def report(self, message: str) -> None:
        """This node's ranks failed with `message`: tell node 0 (node 0 decides at once)."""
        if self.node == 0:
            self._decide(message)
            return
        try:
            _rpc(self.addr, self.port, self._rpc_timeout, "user_set", _FAIL_KEY % self.node,
                 message)
        except _RPC_ERRORS:
            self._set_stop(message)  # node 0 is unreachable: nobody else can say more

    def verdict(self, message: str) -> str:
        """After `report(message)`: the message to print, node 0's stop message (the run's
        first failure, which may be another node's), or `message` if none comes in time."""
        deadline = time.monotonic() + _ACK_WAIT_S
        while time.monotonic() < deadline and self.stop is None:
            time.sleep(0.05)
        return self.stop or message

    def finish(self) -> None:
        """This node's ranks completed: say so, and on node 0 keep the server up until every
        other node has said so too (bounded by the heartbeat timeout)."""
        self._quit.set()
        try:
            if self.node:
                _rpc(self.addr, self.port, self._rpc_timeout, "user_set", _DONE_KEY % self.node,
                     True)
            else:
                deadline = time.monotonic() + self.timeout
                for k in range(1, self.num_nodes):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    _rpc(self.addr, self.port, left, "user_get", _DONE_KEY % k)
        except _RPC_ERRORS:
            pass

    def close(self) -> None:
        """After a stop: on node 0, give the other live nodes a moment to read it."""
        self._quit.set()
        if self.node:
            return
        deadline = time.monotonic() + _ACK_WAIT_S
        with self._lock:
            dead = set(self._dead)
        for k in range(1, self.num_nodes):
            left = deadline - time.monotonic()
            if k in dead or left <= 0:
                continue
            try:
                _rpc(self.addr, self.port, left, "user_get", _STOP_ACK_KEY % k)
            except _RPC_ERRORS:
                continue

    # ---- threads
    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True,
                             name="engine-watch-%s" % target.__name__)
        t.start()
        self._threads.append(t)

    def _decide(self, message: str, dead: Optional[int] = None) -> None:
        """Node 0: the first failure becomes the run's stop message, published once."""
        with self._lock:
            if dead is not None:
                self._dead.append(dead)
            if self._stop is not None:
                return
            self._stop = message
        try:
            _rpc(self.addr, self.port, self._rpc_timeout, "user_set", _STOP_KEY, message)
        except _RPC_ERRORS:
            pass

    def _set_stop(self, message: str) -> None:
        with self._lock:
            if self._stop is None:
                self._stop = message

    def _wait_failure(self, k: int) -> None:
        """Node 0: block until node k reports a failure."""
        try:
            message = _rpc(self.addr, self.port, None, "user_get", _FAIL_KEY % k)
        except _RPC_ERRORS:
            return  # the server is gone; the beat loop notices
        if not self._quit.is_set():
            self._decide(str(message))

    def _wait_stop(self) -> None:
        """Another node: block until node 0 publishes the stop message, then acknowledge."""
        try:
            message = _rpc(self.addr, self.port, None, "user_get", _STOP_KEY)
        except _RPC_ERRORS:
            return  # node 0's server went away; the beat loop names it
        self._set_stop(str(message))
        try:
            _rpc(self.addr, self.port, self._rpc_timeout, "user_set", _STOP_ACK_KEY % self.node,
                 True)
        except _RPC_ERRORS:
            pass

    def _beat_loop(self) -> None:
        """Beat every `interval`; node 0 also checks the others' beats, the others node 0's.
        After a stop node 0 keeps beating (until `close`) so the others never mistake the
        time it takes them to read the stop for its silence."""
        watched = list(range(1, self.num_nodes)) if self.node == 0 else [0]
        seen: Dict[int, Any] = {k: None for k in watched}
        fresh = {k: time.monotonic() for k in watched}
        refused_since: Optional[float] = None
        count = 0
        while not self._quit.wait(self.interval):
            stopped = self.stop is not None
            if stopped and self.node:
                return
            count += 1
            try:
                _rpc(self.addr, self.port, self._rpc_timeout, "user_set", _BEAT_KEY % self.node,
                     count)
                for k in [] if stopped else watched:
                    value = _rpc(self.addr, self.port, self._rpc_timeout, "user_get",
                                 _BEAT_KEY % k)
                    if value != seen[k]:
                        seen[k], fresh[k] = value, time.monotonic()
                refused_since = None
            except ConnectionRefusedError:
                refused_since = refused_since or time.monotonic()
            except _RPC_ERRORS:
                pass  # a slow or stopped peer: its beat stops changing, which is checked below
            if self._quit.is_set() or stopped:
                continue
            now = time.monotonic()
            if refused_since is not None and now - refused_since >= min(_REFUSED_GRACE_S,
                                                                        self.timeout):
                self._lost_server()
                continue
            for k in watched:
                if now - fresh[k] >= self.timeout:
                    self._silent(k)
                    break

    def _silent(self, k: int) -> None:
        message = ("node %d stopped answering: no heartbeat for %.0f s (its machine or engine "
                   "process died, was stopped, or lost the network; see its log; the limit is "
                   "--heartbeat-timeout)" % (k, self.timeout))
        if self.node == 0:
            self._decide(message, dead=k)
        else:
            self._set_stop(message)

    def _lost_server(self) -> None:
        where = "%s:%d" % (self.addr, self.port)
        if self.node == 0:
            self._decide("the rendezvous server on node 0 (%s) stopped: its process died"
                         % where)
        else:
            self._set_stop("node 0 is gone: its rendezvous server at %s refuses connections "
                           "(node 0's engine process exited or was killed; see its log)" % where)
