"""engine.dist.net with real sockets on this machine: a busy or foreign-protocol master port is
one line naming the port and what to do (a listening socket, an HTTP server and another run's
rendezvous server hold it), and the interface that routes to the master is the one the ranks
are told to use (MEGRAY_NET_DEVICE, NCCL_SOCKET_IFNAME), unless the user chose one."""
import http.server
import ipaddress
import os
import socket
import threading

import pytest

from engine import dist
from engine.config import TrainConfig
from engine.dist import net
from engine.dist.rendezvous import node_handshake, node_report
from engine.errors import UserError
from engine.trainer import train


def own_address():
    """This machine's first non-loopback IPv4 address (what other nodes would dial)."""
    for name, addr in net.interface_addresses():
        ip = ipaddress.ip_address(addr)
        if ip.version == 4 and not ip.is_loopback:
            return name, addr
    pytest.skip("this machine has no non-loopback IPv4 address")


@pytest.fixture
def listening():
    """A port held by a plain listening socket (a program that speaks no HTTP)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """A port held by an HTTP server (it answers XML-RPC's POST with 501)."""
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def rendezvous_server():
    from megengine.distributed.server import Server

    server = Server(0)
    yield server.py_server_port
    server.proc.terminate()


def _launch_node0(port, **kw):
    """Node 0 of a 2-node launch: it must refuse the port before anything else starts."""
    return dist.launch(lambda: None, ngpus=1, num_nodes=2, node_rank=0,
                       master_ip=own_address()[1], master_port=port,
                       report=node_report(num_nodes=2, ngpus=1), rendezvous_timeout=5, **kw)


def _one_line(exc):
    text = str(exc)
    assert "\n" not in text
    return text


def test_a_busy_master_port_is_one_line_naming_it(listening):
    """Before: MegEngine's server died with a raw `OSError: [Errno 98] Address already in use`."""
    with pytest.raises(UserError) as info:
        _launch_node0(listening)
    text = _one_line(info.value)
    assert ("master port %d is already in use" % listening) in text
    assert "another program" in text and "--master-port" in text


def test_an_http_server_on_the_master_port_is_named(http_server):
    with pytest.raises(UserError) as info:
        _launch_node0(http_server)
    text = _one_line(info.value)
    assert ("master port %d" % http_server) in text and "an HTTP server (it answered 501" in text


def test_another_runs_rendezvous_server_is_named(rendezvous_server):
    with pytest.raises(UserError, match="another run's rendezvous server"):
        _launch_node0(rendezvous_server)


def test_a_single_node_with_a_fixed_busy_port_is_refused_too(listening):
    with pytest.raises(UserError, match="master port %d is already in use" % listening):
        dist.launch(lambda: None, ngpus=2, master_port=listening)


def test_a_free_port_passes():
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    port = s.getsockname()[1]
    s.close()
    net.check_master_port(port)
    net.check_master_port(0)


def test_a_node_that_finds_an_http_server_at_the_master_says_so(http_server):
    """Before: node 1 died with a raw `xmlrpc.client.ProtocolError`."""
    with pytest.raises(UserError) as info:
        node_handshake("127.0.0.1", http_server, 1, 2, node_report(num_nodes=2, ngpus=1), 10)
    text = _one_line(info.value)
    assert ("127.0.0.1:%d answers, but it is not the engine's rendezvous server (HTTP 501"
            % http_server) in text
    assert "--master-port" in text


# ------------------------------------------------------------------------- the interface

def test_the_route_to_an_own_address_is_its_interface():
    name, addr = own_address()
    route = net.route_interface(addr)
    assert (route.master, route.source, route.interface, route.loopback) == (addr, addr, name,
                                                                             False)


def test_the_route_to_loopback_is_marked_loopback():
    route = net.route_interface("127.0.0.1")
    assert route.loopback and route.interface == "lo"


def test_the_route_table_fallback_agrees_with_the_kernel():
    """Outside addresses: the longest prefix of /proc/net/route names the same interface as
    the UDP-connect lookup (where the machine has such a route at all)."""
    for dest in ("10.255.255.1", "192.0.2.200", "198.51.100.7"):
        route = net.route_interface(dest)
        if route.interface is None:
            continue
        assert net._route_table_interface(dest) == route.interface, dest


def test_an_unresolvable_master_is_a_user_error():
    with pytest.raises(UserError, match="cannot resolve the master address"):
        net.route_interface("no-such-host.invalid")


def test_nccl_gets_an_exact_name_only_where_a_prefix_would_take_others():
    assert net._ifname_value("eth1", ["lo", "eth0", "eth1"]) == "eth1"
    assert net._ifname_value("eth1", ["lo", "eth1", "eth10"]) == "=eth1"


def test_unset_variables_are_set_from_the_route_and_said():
    name, addr = own_address()
    env = {}
    line = net.configure_interfaces(addr, env)
    assert env["MEGRAY_NET_DEVICE"] == name and env["NCCL_SOCKET_IFNAME"].lstrip("=") == name
    assert line.startswith("network: MEGRAY_NET_DEVICE=%s and NCCL_SOCKET_IFNAME=" % name)
    assert "routes to the master %s" % addr in line


def test_the_users_choice_is_kept_and_said():
    name, addr = own_address()
    env = {"NCCL_SOCKET_IFNAME": "ib0"}
    line = net.configure_interfaces(addr, env)
    assert env == {"NCCL_SOCKET_IFNAME": "ib0", "MEGRAY_NET_DEVICE": name}
    assert "NCCL_SOCKET_IFNAME=ib0 as set by you" in line
    env = {"NCCL_SOCKET_IFNAME": "ib0", "MEGRAY_NET_DEVICE": "ib0"}
    line = net.configure_interfaces(addr, env)
    assert env == {"NCCL_SOCKET_IFNAME": "ib0", "MEGRAY_NET_DEVICE": "ib0"}
    assert "as set by you" in line and ("%s routes to the master" % name) in line


def test_nothing_is_set_for_a_loopback_or_unknown_route():
    env = {}
    assert "loopback" in net.configure_interfaces("127.0.0.1", env) and env == {}
    assert "cannot resolve" in net.configure_interfaces("no-such-host.invalid", env)
    assert env == {}


@pytest.fixture
def clean_interface_vars(monkeypatch):
    for k in net.INTERFACE_VARS:
        monkeypatch.setenv(k, "x")  # recorded, so teardown restores the absence
        monkeypatch.delenv(k)


def test_the_trainer_sets_them_before_the_rendezvous_and_says_so(clean_interface_vars, capfd,
                                                                  monkeypatch, tmp_path):
    """Node 0 of a 2-node run whose data is missing here: it reports that at the rendezvous
    (node 1 never comes), but first it has chosen the interface for its ranks and said so."""
    name, addr = own_address()
    monkeypatch.setattr(dist, "gpu_count", lambda: 1)  # the rendezvous runs before any GPU use
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = TrainConfig(data=str(tmp_path / "nowhere"), save_dir=str(tmp_path / "o"),
                      num_nodes=2, node_rank=0, master_ip=addr, master_port=port,
                      rendezvous_timeout=1)
    with pytest.raises(UserError, match="node 1 did not reach the rendezvous"):
        train(cfg)
    err = capfd.readouterr().err
    assert "network: MEGRAY_NET_DEVICE=%s and NCCL_SOCKET_IFNAME=" % name in err
    assert os.environ["MEGRAY_NET_DEVICE"] == name
