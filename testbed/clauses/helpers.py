"""Small shared pieces of the clause suite: crafted packets and enforcer lookups."""

from __future__ import annotations

import itertools
import socket
import struct
import time
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP, TCPerror, UDPerror
from scapy.layers.inet6 import IPv6, _ICMPv6Error
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from enforcer.client import Action, Client
from enforcer.core.flags import Flags
from testbed import timeouts
from testbed.checks import expect_no_packet, expect_packet
from testbed.lab import GUIDS, SOCKS_PORT, SOCKS_USERS
from testbed.plugin import Net


def ip(net: Net, src: str, dst: str) -> Packet:
    return IP(src=src, dst=dst) if net.family == "ipv4" else IPv6(src=src, dst=dst)


def syn(net: Net, src: str, dst: str, sport: int, dport: int) -> Packet:
    return ip(net, src, dst) / TCP(sport=sport, dport=dport, flags="S", seq=1000)


def datagram(net: Net, src: str, dst: str, sport: int, dport: int, payload: bytes) -> Packet:
    return ip(net, src, dst) / UDP(sport=sport, dport=dport) / payload


def checksums_ok(pkt: Packet) -> bool:
    """Whether every checksum in a captured packet is right (IPv4 header, TCP, UDP, ICMP,
    ICMPv6, and a quoted IPv4 header), as Scapy computes them from the packet's bytes.

    A TCP or UDP checksum may also be a *partial* one that matches the addresses: a
    local socket's packets cross veth links with checksum offload pending (the
    receiving stack trusts them), so a capture shows only the pseudo-header sum; the
    kernel's NAT keeps that sum right as it changes addresses. The TCP or UDP checksum
    of a quoted packet is left alone: a quote is usually cut short.
    """
    clean = pkt.copy()
    layer: Packet = clean
    partial_ok = True
    while layer:
        if isinstance(layer, TCP | UDP) and not isinstance(layer, TCPerror | UDPerror):
            partial_ok = _is_partial_checksum(layer)
        if not isinstance(layer, TCPerror | UDPerror):
            for name in ("chksum", "cksum"):
                if name in layer.fields:
                    delattr(layer, name)
        layer = layer.payload
    if bytes(clean) == bytes(pkt):
        return True
    if not partial_ok:
        return False
    # only the transport checksum may differ: every other one must still be right
    for transport in (clean.getlayer(TCP), clean.getlayer(UDP)):
        if transport is not None and not isinstance(transport, TCPerror | UDPerror):
            transport.chksum = pkt[transport.__class__].chksum
    return bytes(clean) == bytes(pkt)


def _is_partial_checksum(layer: Packet) -> bool:
    """Whether a TCP/UDP header's checksum is the folded sum of its pseudo-header alone."""
    under = layer.underlayer
    length = len(bytes(layer))
    if isinstance(under, IP):
        words = (socket.inet_pton(socket.AF_INET, under.src) + socket.inet_pton(socket.AF_INET, under.dst)
                 + struct.pack("!BBH", 0, under.proto, length))
    elif isinstance(under, IPv6):
        words = (socket.inet_pton(socket.AF_INET6, under.src)
                 + socket.inet_pton(socket.AF_INET6, under.dst) + struct.pack("!IxxxB", length, under.nh))
    else:
        return False
    total = sum(struct.unpack(f"!{len(words) // 2}H", words))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return int(layer.chksum) in ({total} if total not in (0, 0xFFFF) else {0, 0xFFFF})


def is_rejection(pkt: Packet) -> bool:
    """A TCP reset or an ICMP error: what a *silent* drop must never produce."""
    if TCP in pkt and bool(pkt[TCP].flags.R):
        return True
    if ICMP in pkt and pkt[ICMP].type in (3, 11, 12):
        return True
    return bool(pkt.haslayer(_ICMPv6Error))


# Crafted probes' source ports: below Linux's ephemeral ports (32768-60999), so that no
# real connection shares one
PROBE_PORTS = itertools.cycle(range(31000, 32000))


def probe_port() -> int:
    return next(PROBE_PORTS)


def assert_dropped_silently(net: Net, probes: list[tuple[str, Packet]]) -> None:
    """Send each (node, packet or frame; a packet's source port from ``probe_port``): it
    reaches the fw on the node's interface (the fw's capture has it) and goes no further:
    the fw sends no copy of it, translated or not, on any interface, and nothing answers
    it (no SYN-ACK, reply, reset or ICMP error); the server s1 sees nothing of it."""
    ports = {int(p[TCP].sport if TCP in p else p[UDP].sport) for _, p in probes}

    def carries_a_probe(pkt: Packet) -> bool:
        """A probe sent on (translated or not) or an answer to one: a probe's port at
        either end."""
        layer = TCP if TCP in pkt else UDP if UDP in pkt else None
        return layer is not None and bool({pkt[layer].sport, pkt[layer].dport} & ports)

    def a_probe_or_a_rejection(pkt: Packet) -> bool:
        """A probe sent on, an answer to one, or any reset or ICMP error."""
        return carries_a_probe(pkt) or is_rejection(pkt)

    server_mac = net.mac("s1")

    def a_probe_the_server_got(pkt: Packet) -> bool:
        """A probe (or an answer to one) that the server did not send itself."""
        return carries_a_probe(pkt) and pkt[Ether].src != server_mac

    since = time.time()
    with net.agent("s1").sniff(net.iface("s1")) as at_server:
        for node, probe in probes:
            net.agent(node).send(probe, iface=net.iface(node))
        for node, probe in probes:
            expect_packet(net.fw_received(net.topology.fw_iface_facing(node), since),
                          headers(probe))
        expect_no_packet(net.fw_sent(since), a_probe_or_a_rejection)
        expect_no_packet(at_server, a_probe_the_server_got, timeout=0)


def headers(probe: Packet) -> Packet:
    """A template of a probe's IP and TCP or UDP headers (a capture may dissect its payload
    as something else: DNS, say)."""
    template: Packet = (probe.payload if isinstance(probe, Ether) else probe).copy()
    template[TCP if TCP in template else UDP].remove_payload()
    return template


def decisions_for(net: Net, dport: int, src: str | None = None) -> list[dict[str, Any]]:
    """The enforcer's recent decisions about flows to ``dport`` (optionally from ``src``)."""
    out = []
    for d in net.call("decisions", limit=10000):
        flow = d["flow"]
        if flow.endswith(f":{dport}") and (src is None or f" {src}:" in flow or f"[{src}]:" in flow):
            out.append(d)
    return out


def assert_not_connected(result: dict[str, Any], what: str) -> None:
    """A connection attempt that must have been dropped silently: no connect, no refusal."""
    assert not result["connected"], f"{what}: connected, but the firewall should have dropped it"
    error = str(result["error"])
    assert "refused" not in error.lower(), \
        f"{what}: refused (a RST came back), but a drop must be silent: {error}"


NEGATIVE = timeouts.NEGATIVE


FTP_GUID = GUIDS["FTP"]


def grant(net: Net, client: Client, target: tuple[str, int], *, session_of: str = "c1",
          protocol: str = "tcp", flags: Flags | None = None, **kwargs: Any) -> Action:
    """AllowFutureConnect for ``session_of``'s SecureNAT session, on behalf of FTP.

    In a test run in user mode the grant carries NO_KERNEL_MODE.
    """
    flags = flags or Flags(0)
    if net.mode == "user":
        flags |= Flags.NO_KERNEL_MODE
    return client.allow_future_connect(net.session(session_of), target, protocol_guid=FTP_GUID,
                                       protocol=protocol, flags=flags, **kwargs)


def pending_actions(net: Net, session_of: str = "c1") -> list[dict[str, Any]]:
    return list(net.call("actions", session=net.session(session_of)))


def wait_for_state(action: Action, state: str, within: float) -> None:
    deadline = time.monotonic() + within
    while action.state != state:
        assert time.monotonic() < deadline, f"action {action.id} is {action.state}, not {state}"
        time.sleep(0.1)


def socks_open(net: Net, node: str, user: str, command: str, host: str, port: int,
               timeout: float | None = None, udp_port: int = 0) -> Any:
    """A SOCKS5 request from ``node`` to the fw's SOCKS service as ``user``: a Firewall
    client's control connection (agent.SocksConnection), which is its session. A UDP
    ASSOCIATE's datagrams go from ``udp_port`` (0: the kernel's choice)."""
    proxy = (net.fw_internal(node), SOCKS_PORT)
    return net.agent(node).socks(proxy, user, SOCKS_USERS[user], command, host, port, timeout=timeout,
                                 udp_port=udp_port)


def anywhere(net: Net) -> str:
    """The unspecified address of the family (a SOCKS request's "not known")."""
    return "0.0.0.0" if net.family == "ipv4" else "::"


def fw_session(net: Net, node: str, user: str) -> int:
    """The newest Firewall-client session of ``node``'s user."""
    ids = [s["id"] for s in net.call("sessions") if s["kind"] == "firewall-client"
           and s["client"] == net.addr(node) and s["user"] == user]
    assert ids, f"no Firewall-client session of {user} on {node}"
    return int(max(ids))
