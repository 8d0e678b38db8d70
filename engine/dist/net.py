"""The network under a multi-node run: the master port, and which interface carries the ranks.

- `check_master_port`: node 0 makes sure its rendezvous port is free before MegEngine's server
  tries it (whose failure is a raw `OSError: [Errno 98]` from another process), and names what
  holds it: another engine run, an HTTP server, or some other program.
- `foreign_server_message`: what a node says when the master port answers, but not as the
  engine's rendezvous server (an HTTP server gives XML-RPC a `ProtocolError`).
- `route_interface` / `configure_interfaces`: MegRay (MegEngine's collective bootstrap)
  advertises rank 0's first non-loopback interface, and NCCL picks its own; on a node with a
  management network beside InfiniBand/RoCE that may be one the other nodes cannot reach, and
  the first broadcast then waits forever. So before the ranks are forked each node sets
  `MEGRAY_NET_DEVICE` and `NCCL_SOCKET_IFNAME` to the interface that routes to the master
  address, unless the user set them, and the trainer prints what it chose.

The route is the kernel's own answer: a UDP socket "connected" to the master (nothing is sent)
has the source address the kernel would use, and the interface holding that address is found
with SIOCGIFADDR (IPv4) or /proc/net/if_inet6 (IPv6); /proc/net/route's longest prefix is the
fallback. Standard library only, Linux.
"""
from __future__ import annotations

import errno
import fcntl
import http.client
import ipaddress
import socket
import struct
import xmlrpc.client
from dataclasses import dataclass
from typing import Dict, List, Mapping, MutableMapping, Optional, Tuple

from engine.errors import UserError

__all__ = ["INTERFACE_VARS", "Route", "check_master_port", "describe_listener",
           "foreign_server_message", "route_interface", "interface_addresses",
           "configure_interfaces"]

#: Set from the route to the master unless the user set them: MegRay's, then NCCL's.
INTERFACE_VARS = ("MEGRAY_NET_DEVICE", "NCCL_SOCKET_IFNAME")

_SIOCGIFADDR = 0x8915
_PROBE_TIMEOUT_S = 2.0


# ------------------------------------------------------------------------------ the port

def describe_listener(port: int, host: str = "127.0.0.1") -> str:
    """What answers on `host:port`, in a few words: another engine run's rendezvous server, an
    HTTP server, or a program that speaks neither (bounded by a 2 s timeout)."""
    proxy = xmlrpc.client.ServerProxy("http://%s:%d" % (host, port), allow_none=True,
                                      transport=_Transport(_PROBE_TIMEOUT_S))
    try:
        proxy.connect()  # MegEngine's rendezvous server answers True
        return "another run's rendezvous server (a MegEngine distributed server)"
    except xmlrpc.client.ProtocolError as exc:
        return "an HTTP server (it answered %d %s)" % (exc.errcode, exc.errmsg)
    except xmlrpc.client.Fault:
        return "another XML-RPC server"
    except (http.client.HTTPException, OSError, ValueError):
        return "another program"


class _Transport(xmlrpc.client.Transport):
    def __init__(self, timeout: float):
        super().__init__()
        self._timeout = timeout

    def make_connection(self, host):
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


def check_master_port(port: int) -> None:
    """On node 0, before the rendezvous server starts: refuse a port that is taken, naming it
    and what holds it. Binds as MegEngine's server does (all interfaces, SO_REUSEADDR, so a
    port in TIME_WAIT counts as free)."""
    if not port:
        return  # 0: the server picks a free one
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(
                "the master port %d is already in use on this machine (node 0), by %s: pass "
                "another free port with --master-port (or MASTER_PORT) on every node, or stop "
                "the program that holds it (ss -ltnp 'sport = :%d' names it)"
                % (port, describe_listener(port), port)) from None
        if exc.errno == errno.EACCES:
            raise UserError(
                "the master port %d cannot be used on this machine (node 0): %s; ports below "
                "1024 need root, pick one above with --master-port (or MASTER_PORT)"
                % (port, exc.strerror)) from None
        raise UserError("the master port %d cannot be opened on this machine (node 0): %s"
                        % (port, exc.strerror or exc)) from None
    finally:
        s.close()


def foreign_server_message(addr: str, port: int, what: str) -> str:
    """One line for a master port that answers, but not as the engine's rendezvous server."""
    return ("%s:%d answers, but it is not the engine's rendezvous server (%s): another program "
            "holds that port on node 0. Pass a free port with --master-port (or MASTER_PORT) "
            "on every node, and check that --master-ip (MASTER_ADDR) is node 0"
            % (addr, port, what))


# ------------------------------------------------------------------------- the interface

@dataclass(frozen=True)
class Route:
    """How this machine reaches the master: the master's address, the local source address the
    kernel picks, and the interface that holds it (None when none could be named)."""

    master: str
    source: str
    interface: Optional[str]
    loopback: bool  # the master is this machine, by a loopback address


def _ipv4_address(name: str) -> Optional[str]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        return socket.inet_ntoa(raw[20:24])
    except OSError:  # no IPv4 address on it
        return None
    finally:
        s.close()


def _ipv6_addresses(path: str = "/proc/net/if_inet6") -> List[Tuple[str, str]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6:
                    hexaddr, name = parts[0], parts[5]
                    addr = ipaddress.IPv6Address(bytes.fromhex(hexaddr))
                    out.append((name, str(addr)))
    except (OSError, ValueError):
        pass
    return out


def interface_addresses() -> List[Tuple[str, str]]:
    """(interface, address) for every address of this machine (IPv4 primary ones, then IPv6)."""
    out = []
    for _index, name in socket.if_nameindex():
        addr = _ipv4_address(name)
        if addr is not None:
            out.append((name, addr))
    return out + _ipv6_addresses()


def _route_table_interface(dest: str, path: str = "/proc/net/route") -> Optional[str]:
    """The interface of the longest-prefix IPv4 route to `dest` in the main routing table."""
    try:
        target = int(ipaddress.IPv4Address(dest))
        best: Tuple[int, Optional[str]] = (-1, None)
        with open(path) as f:
            next(f, None)  # the header
            for line in f:
                parts = line.split()
                if len(parts) < 8:
                    continue
                net = int.from_bytes(bytes.fromhex(parts[1]), "little")
                mask = int.from_bytes(bytes.fromhex(parts[7]), "little")
                if target & mask == net and bin(mask).count("1") > best[0]:
                    best = (bin(mask).count("1"), parts[0])
        return best[1]
    except (OSError, ValueError):
        return None


def route_interface(master: str, port: int = 9) -> Route:
    """Which interface this machine uses to reach `master` (a name or an address).

    Raises UserError when the name does not resolve (the rendezvous could not reach it either).
    """
    try:
        infos = socket.getaddrinfo(master, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise UserError("cannot resolve the master address %r: %s" % (master, exc)) from None
    family, _, _, _, sockaddr = infos[0]
    ip = str(sockaddr[0])
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.connect(sockaddr)  # UDP: picks the route and source address, sends nothing
        source = str(s.getsockname()[0])
    except OSError:  # no route at all
        return Route(ip, "", None, False)
    finally:
        s.close()
    source_ip = ipaddress.ip_address(source.split("%")[0])
    owners = [name for name, addr in interface_addresses()
              if ipaddress.ip_address(addr) == source_ip]
    name = owners[0] if owners else None
    if name is None and family == socket.AF_INET:
        name = _route_table_interface(ip)
    return Route(ip, source, name, ipaddress.ip_address(ip).is_loopback)


def _ifname_value(name: str, names: List[str]) -> str:
    """NCCL_SOCKET_IFNAME matches by prefix ("eth1" would take eth10 too); "=name" is exact."""
    return "=" + name if any(n != name and n.startswith(name) for n in names) else name


def configure_interfaces(master: str, env: MutableMapping[str, str],
                         route: Optional[Route] = None) -> str:
    """Set MEGRAY_NET_DEVICE and NCCL_SOCKET_IFNAME in `env` (the process environment, before
    the ranks are forked) to the interface that routes to `master`, leaving either alone when
    the user set it; returns the start-up summary line that says what was chosen and why."""
    try:
        route = route or route_interface(master)
    except UserError as exc:
        return "network: %s; %s left as they are" % (exc, " and ".join(INTERFACE_VARS))
    said = {k: env[k] for k in INTERFACE_VARS if k in env}
    if route.interface is None or route.loopback:
        why = ("%s is a loopback address of this machine" % master if route.loopback
               else "no interface of this machine holds the route to %s" % master)
        return "network: %s, so %s are left as they are%s" % (
            why, " and ".join(INTERFACE_VARS), _said(said))
    names = [n for _i, n in socket.if_nameindex()]
    chosen: Dict[str, str] = {}
    for k in INTERFACE_VARS:
        if k not in env:
            value = route.interface if k == "MEGRAY_NET_DEVICE" else _ifname_value(
                route.interface, names)
            env[k] = chosen[k] = value
    where = "the interface that routes to the master %s (%s, from %s)" % (
        master, route.master, route.source)
    if not chosen:
        return "network: %s; %s routes to the master %s" % (_said(said).lstrip("; "),
                                                           route.interface, master)
    text = " and ".join("%s=%s" % kv for kv in chosen.items())
    return "network: %s, %s%s" % (text, where, _said(said))


def _said(values: Mapping[str, str]) -> str:
    if not values:
        return ""
    return "; %s as set by you" % " and ".join("%s=%s" % kv for kv in values.items())
