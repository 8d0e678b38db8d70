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
    assert "checkpoint differs between nodes" in check_node_reports(
        {0: ok, 1: node_report(num_nodes=2, ngpus=8, resume=str(b))})
    assert "same --num-nodes" in check_node_reports(
        {0: ok, 1: dict(ok, num_nodes=3)})
    # errors come first, lowest node first
    assert check_node_reports({0: ok, 1: dict(ok, error="e1"), 2: dict(ok, error="e2")}) == \
        "node 1: e1"
