"""engine.dist.rendezvous: the node handshake against MegEngine's real rendezvous server."""
# MegEngine's rendezvous server is plain XML-RPC and runs on CPU, so these use the real one;
# "nodes" are threads of this process talking to it over 127.0.0.1.
import threading

import pytest

from engine.dist.rendezvous import check_node_reports, file_fingerprint, node_handshake, node_report
from engine.errors import UserError


@pytest.fixture
def server_port():
    from megengine.distributed.server import Server

    server = Server(0)
    yield server.py_server_port
    server.proc.terminate()


def handshake_all(port, reports, num_nodes, timeout=60.0):
    """Run node_handshake for each node in `reports` on its own thread; {node: error or None}."""
    out = {}

    def node(k):
        try:
            node_handshake("127.0.0.1", port, k, num_nodes, reports[k], timeout)
            out[k] = None
        except UserError as exc:
            out[k] = str(exc)

    threads = [threading.Thread(target=node, args=(k,)) for k in reports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 60)
    return out


def test_nodes_that_agree_start(server_port):
    reports = {k: node_report(num_nodes=3, ngpus=8) for k in range(3)}
    assert handshake_all(server_port, reports, 3) == {0: None, 1: None, 2: None}


def test_a_node_with_another_gpu_count_stops_every_node(server_port):
    reports = {0: node_report(num_nodes=2, ngpus=8), 1: node_report(num_nodes=2, ngpus=4)}
    out = handshake_all(server_port, reports, 2)
    assert out[0] == out[1]
    assert "node 1 runs 4 GPU processes but node 0 runs 8" in out[0]


def test_a_node_missing_the_checkpoint_names_it_on_every_node(server_port, tmp_path):
    ck = tmp_path / "checkpoint.pkl"
    ck.write_bytes(b"weights" * 100)
    missing = "--resume: no such file or folder: /scratch/run/checkpoint.pkl"
    reports = {0: node_report(num_nodes=2, ngpus=8, resume=str(ck)),
               1: node_report(num_nodes=2, ngpus=8, error=missing)}
    out = handshake_all(server_port, reports, 2)
    assert out[0] == out[1] == "node 1: " + missing


def test_a_node_that_never_arrives_is_an_error_not_a_hang(server_port):
    # 3 nodes expected, node 2 never starts: node 0 gives up at the deadline and tells node 1
    reports = {k: node_report(num_nodes=3, ngpus=2) for k in range(2)}
    out = handshake_all(server_port, reports, 3, timeout=3)
    assert "node 2 did not reach the rendezvous" in out[0]
    assert out[1] == out[0]


def test_unreachable_master_is_an_error_not_a_hang():
    with socket_free_port() as port:
        with pytest.raises(UserError, match="could not reach the rendezvous server at "
                                            "127.0.0.1:%d within 2 s" % port):
            node_handshake("127.0.0.1", port, 1, 2, node_report(num_nodes=2, ngpus=1), 2)


class socket_free_port:
    """A local port with nothing listening on it."""

    def __enter__(self):
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc):
        return False


def test_check_node_reports(tmp_path):
    a, b = tmp_path / "a.pkl", tmp_path / "b.pkl"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"y" * 1000)
    assert file_fingerprint(str(a)) != file_fingerprint(str(b))
    ok = node_report(num_nodes=2, ngpus=8, resume=str(a))
    assert check_node_reports({0: ok, 1: dict(ok)}) is None
    assert "the checkpoint to continue from differs between nodes" in check_node_reports(
        {0: ok, 1: node_report(num_nodes=2, ngpus=8, resume=str(b))})
    # a node-local save dir that is empty on node 1: it would start a new run
    assert "node 1 has none (a new run), node 0 has 1000 bytes" in check_node_reports(
        {0: ok, 1: node_report(num_nodes=2, ngpus=8, resume=None)})
    assert "same --num-nodes" in check_node_reports(
        {0: ok, 1: dict(ok, num_nodes=3)})
    # errors come first, lowest node first
    assert check_node_reports({0: ok, 1: dict(ok, error="e1"), 2: dict(ok, error="e2")}) == \
        "node 1: e1"


# ---- the run's heartbeat (NodeWatch): node processes are threads here, the server is real

def _wait_for(predicate, timeout):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_failure_on_one_node_becomes_every_nodes_message(server_port):
    from engine.dist.rendezvous import NodeWatch

    watches = [NodeWatch("127.0.0.1", server_port, k, 3, timeout=30) for k in range(3)]
    for w in watches:
        w.start()
    message = "rank 5 (node 2): cannot write /x/checkpoint.pkl: the disk is full"
    watches[2].report(message)
    assert watches[2].verdict(message) == message
    assert _wait_for(lambda: all(w.stop == message for w in watches), 10)
    watches[0].close()  # node 0 waits for the others to have read it: they have


def test_node_zero_keeps_the_first_failure(server_port):
    from engine.dist.rendezvous import NodeWatch

    watches = [NodeWatch("127.0.0.1", server_port, k, 2, timeout=30) for k in range(2)]
    for w in watches:
        w.start()
    watches[0].report("rank 0 (node 0): first")
    watches[1].report("rank 1 (node 1): second, a consequence")
    assert watches[1].verdict("rank 1 (node 1): second, a consequence") == "rank 0 (node 0): first"


def test_a_silent_node_is_named_after_the_timeout(server_port):
    import time

    from engine.dist.rendezvous import NodeWatch

    # node 1 never beats (as if it died right after the handshake)
    leader = NodeWatch("127.0.0.1", server_port, 0, 2, timeout=1.5)
    t = time.monotonic()
    leader.start()
    assert _wait_for(lambda: leader.stop is not None, 15)
    assert time.monotonic() - t >= 1.4
    assert leader.stop.startswith("node 1 stopped answering: no heartbeat for 2 s")


def test_a_finished_run_ends_quietly(server_port):
    from engine.dist.rendezvous import NodeWatch

    watches = [NodeWatch("127.0.0.1", server_port, k, 2, timeout=2) for k in range(2)]
    for w in watches:
        w.start()
    watches[1].finish()
    watches[0].finish()  # returns once node 1 said it is done, well before the timeout
    assert all(w.stop is None for w in watches)


def test_node_zero_gone_is_named_by_the_others():
    from megengine.distributed.server import Server

    from engine.dist.rendezvous import NodeWatch

    server = Server(0)
    follower = NodeWatch("127.0.0.1", server.py_server_port, 1, 2, timeout=30)
    follower.start()
    server.proc.kill()
    assert _wait_for(lambda: follower.stop is not None, 15)
    assert follower.stop.startswith("node 0 is gone: its rendezvous server at 127.0.0.1:%d "
                                    "refuses connections" % server.py_server_port)
