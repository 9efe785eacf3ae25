"""enforcer.core.packet: flow keys and TCP flags from raw bytes, and refusing what it cannot read."""

from __future__ import annotations

import contextlib
import ipaddress
import pickle
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
)
from scapy.packet import Packet, Raw

from enforcer.core import packet
from enforcer.core.packet import FlowKey, Ingress, Malformed, PacketMeta, parse

C4, S4 = "192.0.2.11", "198.51.100.21"
C6, S6 = "2001:db8:1::11", "2001:db8:2::21"


def meta(pkt: Packet, ingress: Ingress = Ingress.INTERNAL) -> PacketMeta:
    return parse(bytes(pkt), ingress)


# --- flow keys ------------------------------------------------------------------------------

@pytest.mark.parametrize(("ip", "src", "dst"), [(IP, C4, S4), (IPv6, C6, S6)])
def test_tcp_key(ip: type[Packet], src: str, dst: str) -> None:
    m = meta(ip(src=src, dst=dst) / TCP(sport=40000, dport=21, flags="S"))
    assert m.key == FlowKey(packet.TCP, ipaddress.ip_address(src), 40000,
                            ipaddress.ip_address(dst), 21)
    assert m.ingress is Ingress.INTERNAL
    assert m.tcp_flags == packet.TCP_SYN


@pytest.mark.parametrize(("ip", "src", "dst"), [(IP, C4, S4), (IPv6, C6, S6)])
def test_udp_key(ip: type[Packet], src: str, dst: str) -> None:
    m = meta(ip(src=src, dst=dst) / UDP(sport=5353, dport=53) / Raw(b"query"), Ingress.EXTERNAL)
    assert m.key == FlowKey(packet.UDP, ipaddress.ip_address(src), 5353,
                            ipaddress.ip_address(dst), 53)
    assert m.ingress is Ingress.EXTERNAL
    assert m.tcp_flags == 0
    assert not m.starts_tcp_connection


def test_address_types_and_family() -> None:
    m4 = meta(IP(src=C4, dst=S4) / TCP(dport=80, flags="S"))
    m6 = meta(IPv6(src=C6, dst=S6) / TCP(dport=80, flags="S"))
    assert isinstance(m4.key.src, ipaddress.IPv4Address)
    assert isinstance(m6.key.dst, ipaddress.IPv6Address)
    assert (m4.family, m6.family) == ("ipv4", "ipv6")


def test_ipv4_options_move_the_transport_header() -> None:
    # 8 bytes of options (4 NOPs + EOL padding): IHL 7, TCP starts at 28.
    pkt = IP(src=C4, dst=S4, options=[b"\x01\x01\x01\x01\x01\x01\x01\x00"]) / TCP(sport=1111, dport=2222,
                                                                                  flags="S")
    data = bytes(pkt)
    assert data[0] & 0x0F > 5
    m = parse(data, Ingress.INTERNAL)
    assert (m.key.sport, m.key.dport, m.tcp_flags) == (1111, 2222, packet.TCP_SYN)


def test_portless_protocols_have_port_zero() -> None:
    m4 = meta(IP(src=C4, dst=S4) / ICMP())
    m6 = meta(IPv6(src=C6, dst=S6) / ICMPv6EchoRequest())
    assert (m4.key.protocol, m4.key.sport, m4.key.dport) == (packet.ICMP, 0, 0)
    assert (m6.key.protocol, m6.key.sport, m6.key.dport) == (packet.ICMPV6, 0, 0)


def test_flow_key_str() -> None:
    m4 = meta(IP(src=C4, dst=S4) / TCP(sport=40000, dport=21, flags="S"))
    m6 = meta(IPv6(src=C6, dst=S6) / UDP(sport=5000, dport=69))
    assert str(m4.key) == "tcp 192.0.2.11:40000 -> 198.51.100.21:21"
    assert str(m6.key) == "udp [2001:db8:1::11]:5000 -> [2001:db8:2::21]:69"


# --- TCP flags ------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "starts"), [
    ("S", True),
    ("SA", False),
    ("A", False),
    ("PA", False),
    ("R", False),
    ("RA", False),
    ("F", False),
    ("FA", False),
    ("SF", False),
    ("SR", False),
    ("", False),
    ("SE", True),   # ECN-setup SYN: ECE/CWR do not change what it is
    ("SEC", True),
    ("SP", True),
])
def test_starts_tcp_connection(flags: str, starts: bool) -> None:
    for ip, src, dst in ((IP, C4, S4), (IPv6, C6, S6)):
        m = meta(ip(src=src, dst=dst) / TCP(sport=1234, dport=80, flags=flags))
        assert m.tcp_flags == int(TCP(flags=flags).flags)
        assert m.starts_tcp_connection is starts, (ip.__name__, flags)


def test_tcp_flag_constants() -> None:
    assert (packet.TCP_FIN, packet.TCP_SYN, packet.TCP_RST, packet.TCP_ACK) == (1, 2, 4, 16)


# --- IPv6 extension headers ---------------------------------------------------------------

@pytest.mark.parametrize("ext", [
    pytest.param(lambda: IPv6ExtHdrHopByHop(), id="hop-by-hop"),
    pytest.param(lambda: IPv6ExtHdrDestOpt(), id="destination-options"),
    pytest.param(lambda: IPv6ExtHdrRouting(), id="routing"),
    pytest.param(lambda: IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(), id="hop-by-hop+dest-opts"),
])
@pytest.mark.parametrize("l4", [
    pytest.param(lambda: TCP(sport=4321, dport=21, flags="S"), id="tcp"),
    pytest.param(lambda: UDP(sport=4321, dport=21), id="udp"),
])
def test_ipv6_extension_headers_are_skipped(ext: Callable[[], Packet], l4: Callable[[], Packet]) -> None:
    pkt = IPv6(src=C6, dst=S6) / ext() / l4()
    m = meta(pkt)
    proto = packet.TCP if isinstance(l4(), TCP) else packet.UDP
    assert m.key == FlowKey(proto, ipaddress.ip_address(C6), 4321, ipaddress.ip_address(S6), 21)


def test_ipv6_long_destination_options_header() -> None:
    # A destination-options header longer than 8 bytes (Hdr Ext Len > 0).
    pkt = IPv6(src=C6, dst=S6) / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 20)]) / TCP(
        sport=7, dport=8, flags="S")
    data = bytes(pkt)
    assert data[41] > 0
    m = parse(data, Ingress.INTERNAL)
    assert (m.key.sport, m.key.dport, m.starts_tcp_connection) == (7, 8, True)


def test_ipv6_fragment_is_malformed() -> None:
    pkt = IPv6(src=C6, dst=S6) / IPv6ExtHdrFragment(offset=0, m=1) / UDP(sport=1, dport=2)
    with pytest.raises(Malformed):
        meta(pkt)


def test_ipv6_truncated_extension_header() -> None:
    data = bytes(IPv6(src=C6, dst=S6) / IPv6ExtHdrHopByHop() / TCP(dport=21, flags="S"))
    with pytest.raises(Malformed):
        parse(data[:44], Ingress.INTERNAL)


# --- refusing what cannot be read --------------------------------------------------------

def _every_short_prefix(pkt: Packet, header_len: int) -> list[bytes]:
    data = bytes(pkt)
    return [data[:n] for n in range(header_len)]


@pytest.mark.parametrize(("pkt", "header_len"), [
    (IP(src=C4, dst=S4) / TCP(flags="S"), 20 + 20),
    (IP(src=C4, dst=S4) / UDP(), 20 + 8),
    (IPv6(src=C6, dst=S6) / TCP(flags="S"), 40 + 20),
    (IPv6(src=C6, dst=S6) / UDP(), 40 + 8),
    (IPv6(src=C6, dst=S6) / IPv6ExtHdrHopByHop() / TCP(flags="S"), 48 + 20),
    (IPv6(src=C6, dst=S6) / IPv6ExtHdrDestOpt() / UDP(), 48 + 8),
    (IP(src=C4, dst=S4) / TCP(flags="S", options=[("MSS", 1460), ("WScale", 7)]), 20 + 28),
    (IPv6(src=C6, dst=S6) / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 20)]) / ICMPv6EchoRequest(),
     40 + 24),
], ids=["ipv4-tcp", "ipv4-udp", "ipv6-tcp", "ipv6-udp", "ipv6-hbh-tcp", "ipv6-dst-udp",
        "ipv4-tcp-options", "ipv6-dst-icmp"])
def test_truncated_packets_are_malformed(pkt: Packet, header_len: int) -> None:
    data = bytes(pkt)
    for prefix in _every_short_prefix(pkt, header_len):
        with pytest.raises(Malformed):
            parse(prefix, Ingress.INTERNAL)
    # The whole of every header it reads, TCP options included, is enough.
    assert parse(data[:header_len], Ingress.INTERNAL).key == parse(data, Ingress.INTERNAL).key


@pytest.mark.parametrize("offset", [0, 1, 4, 6, 15])
def test_tcp_data_offset_must_fit_the_header_and_the_packet(offset: int) -> None:
    # Conntrack calls such a segment invalid, and the enforcer could not rewrite it:
    # parse read only the ports and flags, so a SYN with data offset 0 sent to a
    # user-mode redirect port used the redirect's permission, then raised in the daemon.
    for ip, src, dst in ((IP, C4, S4), (IPv6, C6, S6)):
        data = bytearray(bytes(ip(src=src, dst=dst) / TCP(sport=1, dport=2, flags="S") / Raw(b"x" * 3)))
        tcp = len(data) - 23
        data[tcp + 12] = offset << 4
        with pytest.raises(Malformed, match="TCP header length"):
            parse(bytes(data), Ingress.INTERNAL)
    ok = IP(src=C4, dst=S4) / TCP(sport=1, dport=2, flags="S", options=[("NOP", None)] * 40)
    assert parse(bytes(ok), Ingress.INTERNAL).key.dport == 2


def test_ipv6_routing_header_with_segments_left_is_malformed() -> None:
    # The destination is a waypoint, not where the packet goes: the policy would judge
    # the wrong address, and a rewrite could not keep the transport checksum right.
    route = IPv6ExtHdrRouting(addresses=["2001:db8:3::22"], segleft=1)
    with pytest.raises(Malformed, match="segments left"):
        meta(IPv6(src=C6, dst=S6) / route / TCP(sport=1, dport=21, flags="S"))
    done = IPv6ExtHdrRouting(addresses=["2001:db8:3::22"], segleft=0)
    assert meta(IPv6(src=C6, dst=S6) / done / TCP(sport=1, dport=21, flags="S")).key.dport == 21


@pytest.mark.parametrize("data", [
    b"",
    b"\x00",
    b"\x45",
    b"\x45" + b"\x00" * 18,               # 19 bytes
    b"\x44" + b"\x00" * 39,               # IHL 4: shorter than the fixed header
    b"\x4f" + b"\x00" * 39,               # IHL 15: 60 bytes claimed, 40 present
    b"\x60" + b"\x00" * 38,               # 39 bytes of IPv6
    b"\x50" + b"\x00" * 60,               # version 5
    b"\x00" * 60,                         # version 0
    b"\xff" * 60,                         # version 15
    b"\x47" + b"\x00" * 20,               # IHL 7: 28 bytes claimed, 21 present
], ids=repr)
def test_garbage_is_malformed(data: bytes) -> None:
    with pytest.raises(Malformed):
        parse(data, Ingress.INTERNAL)


@pytest.mark.parametrize("l4", [TCP(sport=1, dport=21, flags="S"), UDP(sport=1, dport=53)],
                         ids=["tcp", "udp"])
def test_ipv4_non_first_fragment_is_malformed(l4: Packet) -> None:
    pkt = IP(src=C4, dst=S4, frag=185, flags="MF") / l4
    with pytest.raises(Malformed, match="fragment"):
        meta(pkt)
    last = IP(src=C4, dst=S4, frag=1) / l4
    with pytest.raises(Malformed, match="fragment"):
        meta(last)


def test_ipv4_first_fragment_has_ports() -> None:
    m = meta(IP(src=C4, dst=S4, flags="MF", frag=0) / UDP(sport=1000, dport=69) / Raw(b"x" * 100))
    assert (m.key.sport, m.key.dport) == (1000, 69)


def test_malformed_is_a_value_error() -> None:
    assert issubclass(Malformed, ValueError)


def _ipv_prefixed(version_nibble: int) -> st.SearchStrategy[bytes]:
    return st.tuples(st.integers(0, 15), st.binary(max_size=120)).map(
        lambda t: bytes([(version_nibble << 4) | t[0]]) + t[1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=120), _ipv_prefixed(4), _ipv_prefixed(6)),
       st.sampled_from(list(Ingress)))
def test_random_bytes_raise_only_malformed(data: bytes, ingress: Ingress) -> None:
    try:
        m = parse(data, ingress)
    except Malformed:
        return
    assert m.ingress is ingress
    assert 0 <= m.key.sport <= 65535 and 0 <= m.key.dport <= 65535
    assert 0 <= m.tcp_flags <= 255


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 200), st.binary(min_size=0, max_size=64))
def test_ipv6_random_extension_chains_raise_only_malformed(hdr_len: int, tail: bytes) -> None:
    # Fixed IPv6 header with next header = hop-by-hop, then arbitrary bytes.
    fixed = bytes(IPv6(src=C6, dst=S6, nh=0, plen=0))[:40]
    data = fixed + bytes([60, hdr_len % 256]) + tail
    with contextlib.suppress(Malformed):
        parse(data, Ingress.INTERNAL)


@pytest.mark.parametrize("text", ["192.0.2.11", "2001:db8:1::11"])
def test_addresses_as_the_core_keeps_them_are_the_standard_ones_to_every_table(text: str) -> None:
    """Parsed addresses hash once, and a table keyed by either kind finds the other: a
    session made from a packet is found by an address from a request, and the reverse."""
    kept, standard = packet.address(text), ipaddress.ip_address(text)
    assert kept == standard and hash(kept) == hash(standard) and str(kept) == text
    assert {standard: "found"}[kept] == {kept: "found"}[standard] == "found"
    assert kept is packet.address(text)  # one object per address, while the cache holds it
    assert packet.address(text.upper()) is kept  # another text of it, the same address
    # its text, kept once made, is the standard one in every use, and so is a copy's
    assert (str(kept), f"{kept}", repr(kept).split("'")[1]) == (str(standard),) * 3
    copy = pickle.loads(pickle.dumps(kept))
    assert copy == kept and str(copy) == text and hash(copy) == hash(standard)
    with pytest.raises(ValueError):
        packet.address("fw")
