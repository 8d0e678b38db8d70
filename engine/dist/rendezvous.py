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
did not arrive. Standard library only: the server is MegEngine's, the client plain XML-RPC.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import xmlrpc.client
from typing import Any, Dict, Mapping, Optional

from engine.errors import UserError

__all__ = ["RENDEZVOUS_TIMEOUT", "VERDICT_MARGIN_S", "file_fingerprint", "node_report",
           "check_node_reports", "node_handshake"]

RENDEZVOUS_TIMEOUT = 600.0  # seconds; nodes of one Slurm job start within seconds of each other
VERDICT_MARGIN_S = 30.0

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
            return ("the --resume checkpoint differs between nodes: node %d has %s, node 0 has "
                    "%s; copy node 0's checkpoint to every node (or keep the save dir on shared "
                    "storage)" % (k, r.get("resume"), base.get("resume")))
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
