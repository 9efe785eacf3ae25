"""enforcer.core.packet: address/port rewriting with incremental checksums, and ICMP error translation.

The reference is Scapy: a packet rewritten by nat must be byte for byte the packet Scapy
builds with the new addresses and ports (so every checksum is what a full recomputation
gives, and nothing else moved), and re-dissecting it and rebuilding with the checksum
fields cleared must give the same bytes again.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import struct
import subprocess
import sys
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, IPOption_Router_Alert, TCPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Packet, Raw

from enforcer.core import packet
from enforcer.core.packet import (
    Endpoint,
    FlowKey,
    IPAddress,
    Malformed,
    checksum_adjust,
    icmp_error_inner,
    rewrite,
    rewrite_icmp_error,
)

A = ipaddress.ip_address

# The testbed's addresses: a client, a server, the fw's external address, a router beyond.
CLIENT = {4: A("192.0.2.11"), 6: A("2001:db8:1::11")}
SERVER = {4: A("198.51.100.21"), 6: A("2001:db8:2::21")}
FW = {4: A("198.51.100.1"), 6: A("2001:db8:2::1")}
ROUTER = {4: A("203.0.113.254"), 6: A("2001:db8:3::fe")}

TCP_OPTIONS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123456789, 987654321)), ("NOP", None),
               ("WScale", 7)]
PAYLOAD = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"


# --- helpers --------------------------------------------------------------------------------

def ip_layer(src: IPAddress, dst: IPAddress, **fields: Any) -> Packet:
    if src.version == 4:
        return IP(src=str(src), dst=str(dst), ttl=fields.pop("ttl", 57), id=fields.pop("id", 4242), **fields)
    return IPv6(src=str(src), dst=str(dst), hlim=fields.pop("ttl", 57), fl=fields.pop("fl", 0xBEEF), **fields)


def l4_layer(proto: int, sport: int, dport: int, payload: bytes = PAYLOAD, *, flags: int | str = "PA",
             seq: int = 1000, ack: int = 2000, udp_chksum: int | None = None) -> Packet:
    if proto == packet.TCP:
        seg: Packet = TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=501,
                          options=TCP_OPTIONS)
    else:
        seg = UDP(sport=sport, dport=dport, chksum=udp_chksum)
    return seg / Raw(payload) if payload else seg


def build(proto: int, src: Endpoint, dst: Endpoint, *, ext: Packet | None = None, **l4: Any) -> bytes:
    """A TCP/UDP packet from src to dst (an IPv6 packet gets ``ext`` before its transport header)."""
    net = ip_layer(src[0], dst[0])
    if ext is not None:
        net = net / ext
    return bytes(net / l4_layer(proto, src[1], dst[1], **l4))


def dissect(raw: bytes) -> Packet:
    return IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)


_CHECKSUMMED = {IP: "chksum", TCP: "chksum", UDP: "chksum", ICMP: "chksum", IPerror: "chksum",
                ICMPv6DestUnreach: "cksum", ICMPv6PacketTooBig: "cksum", ICMPv6TimeExceeded: "cksum",
                ICMPv6ParamProblem: "cksum"}


def rebuilt(raw: bytes, *, quote_complete: bool = False) -> bytes:
    """``raw`` dissected by Scapy and built again with every checksum it can recompute cleared:
    the quoted TCP/UDP checksum of an ICMP error only when the quote is complete, and never a
    UDP checksum of 0 (no checksum)."""
    pkt = dissect(raw)
    layer: Packet | None = pkt
    while layer is not None and not isinstance(layer, Raw):
        field = _CHECKSUMMED.get(type(layer))
        if type(layer) in (TCPerror, UDPerror) and quote_complete:
            field = "chksum"
        if field is not None and not (isinstance(layer, UDP) and layer.chksum == 0):
            delattr(layer, field)
        layer = layer.payload or None
    return bytes(pkt)


def l4_checksum(raw: bytes) -> int:
    pkt = dissect(raw)
    return int((pkt[TCP] if TCP in pkt else pkt[UDP]).chksum)


# --- rewrite: TCP and UDP, both families, src / dst / both -----------------------------------

WHICH = ["src", "dst", "both"]


def translated(which: str, family: int) -> tuple[Endpoint | None, Endpoint | None]:
    new_src = (FW[family], 61000) if which in ("src", "both") else None
    new_dst = (ROUTER[family], 8080) if which in ("dst", "both") else None
    return new_src, new_dst


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("proto", [packet.TCP, packet.UDP])
@pytest.mark.parametrize("family", [4, 6])
def test_rewrite_matches_scapy(family: int, proto: int, which: str) -> None:
    src, dst = (CLIENT[family], 40000), (SERVER[family], 80)
    new_src, new_dst = translated(which, family)
    out = rewrite(build(proto, src, dst), src=new_src, dst=new_dst)
    assert out == build(proto, new_src or src, new_dst or dst)
    assert rebuilt(out) == out

    pkt = dissect(out)
    seg = pkt[TCP] if proto == packet.TCP else pkt[UDP]
    assert (A(pkt.src), seg.sport) == (new_src or src)
    assert (A(pkt.dst), seg.dport) == (new_dst or dst)
    assert bytes(seg.payload) == PAYLOAD
    if proto == packet.TCP:
        assert (seg.seq, seg.ack, seg.window, seg.flags) == (1000, 2000, 501, "PA")
        assert seg.options == dissect(build(proto, src, dst))[TCP].options


@pytest.mark.parametrize("which", WHICH)
def test_rewrite_ipv6_extension_headers(which: str) -> None:
    ext = (IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
           / IPv6ExtHdrRouting(addresses=["2001:db8:9::1"], segleft=0) / IPv6ExtHdrDestOpt())
    src, dst = (CLIENT[6], 40000), (SERVER[6], 443)
    new_src, new_dst = translated(which, 6)
    for proto in (packet.TCP, packet.UDP):
        out = rewrite(build(proto, src, dst, ext=ext), src=new_src, dst=new_dst)
        assert out == build(proto, new_src or src, new_dst or dst, ext=ext)
        assert rebuilt(out) == out


def test_rewrite_ipv4_options() -> None:
    raw = bytes(IP(src="192.0.2.11", dst="198.51.100.21", options=[IPOption_Router_Alert()])
                / TCP(sport=1, dport=2, flags="S", options=TCP_OPTIONS))
    out = rewrite(raw, src=(FW[4], 3), dst=(SERVER[4], 4))
    assert out == bytes(IP(src=str(FW[4]), dst=str(SERVER[4]), options=[IPOption_Router_Alert()])
                        / TCP(sport=3, dport=4, flags="S", options=TCP_OPTIONS))


@pytest.mark.parametrize("family", [4, 6])
def test_rewrite_tcp_without_payload(family: int) -> None:
    src, dst = (CLIENT[family], 40000), (SERVER[family], 21)
    raw = build(packet.TCP, src, dst, payload=b"", flags="S", ack=0)
    out = rewrite(raw, src=(FW[family], 1024))
    assert out == build(packet.TCP, (FW[family], 1024), dst, payload=b"", flags="S", ack=0)


@pytest.mark.parametrize("family", [4, 6])
def test_udp_zero_checksum_stays_zero(family: int) -> None:
    # No checksum: RFC 768 for IPv4; RFC 6936 zero-checksum tunnels for IPv6, as kernel NAT.
    src, dst = (CLIENT[family], 5353), (SERVER[family], 53)
    raw = build(packet.UDP, src, dst, udp_chksum=0)
    out = rewrite(raw, src=(FW[family], 30000), dst=(ROUTER[family], 5300))
    assert out == build(packet.UDP, (FW[family], 30000), (ROUTER[family], 5300), udp_chksum=0)
    assert dissect(out)[UDP].chksum == 0


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", [packet.TCP, packet.UDP])
def test_checksum_coming_out_zero(family: int, proto: int) -> None:
    """A new source port chosen to make the checksum sum to zero: TCP writes 0, UDP 0xFFFF."""
    src, dst = (CLIENT[family], 40000), (SERVER[family], 80)
    raw = build(proto, src, dst)
    old = l4_checksum(raw)
    # checksum' = checksum + old port - new port (mod 0xFFFF)
    port = (old + src[1]) % 0xFFFF
    out = rewrite(raw, src=(src[0], port))
    assert l4_checksum(out) == (0 if proto == packet.TCP else 0xFFFF)
    assert out == build(proto, (src[0], port), dst)
    assert rebuilt(out) == out


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", [packet.TCP, packet.UDP])
def test_a_checksum_summed_anew_coming_out_zero(family: int, proto: int) -> None:
    """The same sum, computed whole (a packet whose checksum the kernel had not completed,
    a rebuilt one): TCP writes 0, UDP 0xFFFF (its 0 says "no checksum")."""
    src, dst = (CLIENT[family], 40000), (SERVER[family], 80)
    port = (l4_checksum(build(proto, src, dst)) + src[1]) % 0xFFFF
    raw = bytearray(build(proto, (src[0], port), dst))
    at = (20 if family == 4 else 40) + (16 if proto == packet.TCP else 6)
    raw[at:at + 2] = b"\x12\x34"  # not its checksum: a partial one, as the kernel hands it over
    out = packet.complete_checksum(bytes(raw))
    assert l4_checksum(out) == (0 if proto == packet.TCP else 0xFFFF)
    assert out == build(proto, (src[0], port), dst)


@pytest.mark.parametrize("family", [4, 6])
def test_udp_checksum_0xffff_in(family: int) -> None:
    """A UDP checksum sent as 0xFFFF (computed 0) is updated like any other."""
    src, dst = (CLIENT[family], 40000), (SERVER[family], 80)
    raw = build(packet.UDP, src, dst)
    port = (l4_checksum(raw) + src[1]) % 0xFFFF
    zero = rewrite(raw, src=(src[0], port))
    assert l4_checksum(zero) == 0xFFFF
    assert rewrite(zero, src=src) == raw


@pytest.mark.parametrize("family", [4, 6])
def test_rewrite_nothing_or_the_same_is_identity(family: int) -> None:
    src, dst = (CLIENT[family], 40000), (SERVER[family], 80)
    for proto in (packet.TCP, packet.UDP):
        raw = build(proto, src, dst)
        assert rewrite(raw) == raw
        assert rewrite(raw, src=src, dst=dst) == raw
        assert rewrite(raw, src=dst, dst=src) == build(proto, dst, src)  # a swap keeps the sum
        assert rewrite(bytearray(raw), src=(FW[family], 1)) == build(proto, (FW[family], 1), dst)


def test_bytes_after_the_ip_length_are_kept() -> None:
    raw = build(packet.TCP, (CLIENT[4], 1), (SERVER[4], 2))
    out = rewrite(raw + b"\0\0trailer", dst=(ROUTER[4], 3))
    assert out == rewrite(raw, dst=(ROUTER[4], 3)) + b"\0\0trailer"


def test_round_trip() -> None:
    for family in (4, 6):
        raw = build(packet.TCP, (CLIENT[family], 40000), (SERVER[family], 80))
        there = rewrite(raw, src=(FW[family], 50000))
        assert rewrite(there, src=(CLIENT[family], 40000)) == raw


# --- rewrite: refusals ----------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"",
    b"\x45",
    b"\x00" * 40,
    b"\x55" + b"\x00" * 39,  # version 5
    bytes(IP(src="192.0.2.11", dst="198.51.100.21") / ICMP()),
    bytes(IPv6(src="2001:db8:1::11", dst="2001:db8:2::21") / ICMPv6EchoRequest()),
    bytes(IP(src="192.0.2.11", dst="198.51.100.21", proto=47) / Raw(b"\0" * 20)),
    bytes(IP(src="192.0.2.11", dst="198.51.100.21", flags="MF") / TCP()),
    bytes(IP(src="192.0.2.11", dst="198.51.100.21", frag=100, proto=6) / Raw(b"\0" * 20)),
    bytes(IP(src="192.0.2.11", dst="198.51.100.21", frag=1) / UDP()),
    bytes(IPv6(src="2001:db8:1::11", dst="2001:db8:2::21") / IPv6ExtHdrFragment() / TCP()),
    bytes(IPv6(src="2001:db8:1::11", dst="2001:db8:2::21")
          / IPv6ExtHdrRouting(addresses=["2001:db8:9::1"], segleft=1) / TCP()),
    bytes(IP(src="192.0.2.11", dst="198.51.100.21", ihl=4) / TCP()),
    bytes(IP(src="192.0.2.11", dst="198.51.100.21", len=19) / TCP()),
    bytes(IP(src="192.0.2.11", dst="198.51.100.21") / TCP(dataofs=4)),
    bytes(IP(src="192.0.2.11", dst="198.51.100.21") / TCP(dataofs=15)),
    bytes(IP(src="192.0.2.11", dst="198.51.100.21", len=30) / TCP()),
    bytes(IPv6(src="2001:db8:1::11", dst="2001:db8:2::21", plen=100) / UDP()),
    bytes(IPv6(src="2001:db8:1::11", dst="2001:db8:2::21", plen=0) / UDP()),
    bytes(IPv6(src="2001:db8:1::11", dst="2001:db8:2::21", nh=0) / Raw(b"\x06\x05" + b"\0" * 30)),
], ids=lambda raw: raw[:2].hex() + f"-{len(raw)}")
def test_rewrite_refuses(raw: bytes) -> None:
    with pytest.raises(Malformed):
        rewrite(raw, src=(FW[4] if raw[:1] != b"\x60" else FW[6], 1))
    assert icmp_error_inner(raw) is None


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", [packet.TCP, packet.UDP])
def test_rewrite_refuses_every_truncation(family: int, proto: int) -> None:
    raw = build(proto, (CLIENT[family], 1), (SERVER[family], 2))
    for n in range(len(raw)):
        with pytest.raises(Malformed):
            rewrite(raw[:n], dst=(SERVER[family], 3))


@pytest.mark.parametrize("family", [4, 6])
def test_rewrite_refuses_the_other_family(family: int) -> None:
    raw = build(packet.TCP, (CLIENT[family], 1), (SERVER[family], 2))
    other = 6 if family == 4 else 4
    with pytest.raises(Malformed, match="address"):
        rewrite(raw, src=(FW[other], 1))
    with pytest.raises(Malformed, match="address"):
        rewrite(raw, src=(FW[family], 1), dst=(SERVER[other], 2))


@pytest.mark.parametrize("port", [-1, 65536])
def test_rewrite_refuses_bad_ports(port: int) -> None:
    raw = build(packet.UDP, (CLIENT[4], 1), (SERVER[4], 2))
    with pytest.raises(ValueError, match="port"):
        rewrite(raw, dst=(SERVER[4], port))


# --- rewrite: properties --------------------------------------------------------------------

def endpoints(family: Literal[4, 6]) -> st.SearchStrategy[Endpoint]:
    return st.tuples(st.ip_addresses(v=family), st.integers(0, 0xFFFF))


@st.composite
def rewrite_cases(draw: st.DrawFn) -> tuple[int, int, Endpoint, Endpoint, Endpoint | None, Endpoint | None,
                                            dict[str, Any]]:
    family: Literal[4, 6] = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from([packet.TCP, packet.UDP]))
    l4: dict[str, Any] = {"payload": draw(st.binary(max_size=80))}
    if proto == packet.TCP:
        l4.update(flags=draw(st.integers(0, 255)), seq=draw(st.integers(0, 2**32 - 1)),
                  ack=draw(st.integers(0, 2**32 - 1)))
    elif family == 4 and draw(st.booleans()):
        l4["udp_chksum"] = 0
    return (family, proto, draw(endpoints(family)), draw(endpoints(family)),
            draw(st.none() | endpoints(family)), draw(st.none() | endpoints(family)), l4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rewrite_cases())
def test_rewrite_property(case: tuple[int, int, Endpoint, Endpoint, Endpoint | None, Endpoint | None,
                                      dict[str, Any]]) -> None:
    family, proto, src, dst, new_src, new_dst, l4 = case
    ext = IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() if family == 6 and l4["payload"][:1] == b"x" else None
    raw = build(proto, src, dst, ext=ext, **l4)
    out = rewrite(raw, src=new_src, dst=new_dst)
    assert out == build(proto, new_src or src, new_dst or dst, ext=ext, **l4)
    assert rebuilt(out) == out
    assert packet.parse(out, packet.Ingress.EXTERNAL).key == FlowKey(
        proto, (new_src or src)[0], (new_src or src)[1], (new_dst or dst)[0], (new_dst or dst)[1])


def reference_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


@given(st.binary(min_size=2, max_size=64).filter(any), st.data())
def test_checksum_adjust_equals_recomputation(data: bytes, draw: st.DataObject) -> None:
    at = draw.draw(st.integers(0, (len(data) - 1) // 2)) * 2
    size = draw.draw(st.integers(1, len(data) - at))
    if size % 2 and at + size != len(data):
        size += 1  # an odd length only for a field at the end
    new = draw.draw(st.binary(min_size=size, max_size=size))
    changed = data[:at] + new + data[at + size:]
    adjusted = checksum_adjust(reference_checksum(data), data[at:at + size], new)
    if any(changed):  # all zeros sum to 0xFFFF's complement, the one value nat never writes
        assert adjusted == reference_checksum(changed)


def test_checksum_adjust_rfc1624_example() -> None:
    # RFC 1624 section 4: HC 0xDD2F, m 0x5555 -> m' 0x3285 gives HC' 0x0000 (not 0xFFFF).
    assert checksum_adjust(0xDD2F, b"\x55\x55", b"\x32\x85") == 0x0000
    with pytest.raises(ValueError, match="length"):
        checksum_adjust(0, b"\0\0", b"\0")


# --- ICMP errors ----------------------------------------------------------------------------
#
# The scenario: client C talks to server S through the fw, translated to the fw's address
# F (source NAT, C:40000 -> F:50000). A router R beyond sends an ICMP error about a packet
# F:50000 -> S:80 to F; the fw must hand it to C about C:40000 -> S:80.

def icmp_error(family: int, quote: Packet | bytes, *, kind: str = "unreach", dst: IPAddress | None = None,
               outer_ext: Packet | None = None) -> bytes:
    outer = ip_layer(ROUTER[family], dst or FW[family])
    icmp: Packet
    if family == 4:
        icmp = {"unreach": ICMP(type=3, code=3), "mtu": ICMP(type=3, code=4, nexthopmtu=1300),
                "time": ICMP(type=11, code=0), "param": ICMP(type=12, ptr=20),
                "quench": ICMP(type=4)}[kind]
    else:
        icmp = {"unreach": ICMPv6DestUnreach(code=4), "mtu": ICMPv6PacketTooBig(mtu=1280),
                "time": ICMPv6TimeExceeded(), "param": ICMPv6ParamProblem(ptr=40)}[kind]
        if outer_ext is not None:
            outer = outer / outer_ext
    return bytes(outer / icmp / (Raw(quote) if isinstance(quote, bytes) else quote))


def quoted_packet(proto: int, family: int, src: Endpoint, dst: Endpoint, **l4: Any) -> Packet:
    """The packet src -> dst as Scapy builds a quote of it (IPerror/TCPerror/UDPerror)."""
    net = (IPerror(src=str(src[0]), dst=str(dst[0]), ttl=1, id=77) if family == 4
           else IPerror6(src=str(src[0]), dst=str(dst[0]), hlim=1, fl=5))
    if proto == packet.TCP:
        return net / TCPerror(sport=src[1], dport=dst[1], seq=5, flags="S", options=TCP_OPTIONS)
    return net / UDPerror(sport=src[1], dport=dst[1], chksum=l4.get("udp_chksum")) / Raw(PAYLOAD)


@pytest.mark.parametrize("kind", ["unreach", "mtu", "time", "param"])
@pytest.mark.parametrize("proto", [packet.TCP, packet.UDP])
@pytest.mark.parametrize("family", [4, 6])
def test_icmp_error_full_quote(family: int, proto: int, kind: str) -> None:
    translated_src, server, client = (FW[family], 50000), (SERVER[family], 80), (CLIENT[family], 40000)
    raw = icmp_error(family, quoted_packet(proto, family, translated_src, server), kind=kind)
    assert icmp_error_inner(raw) == FlowKey(proto, translated_src[0], 50000, server[0], 80)
    assert rebuilt(raw, quote_complete=True) == raw  # Scapy made a consistent error

    out = rewrite_icmp_error(raw, outer_dst=client[0], inner_src=client)
    assert icmp_error_inner(out) == FlowKey(proto, client[0], 40000, server[0], 80)
    # Everything as Scapy builds it for the client: outer and quoted header checksums, the
    # ICMP checksum, and the quoted TCP/UDP checksum of the complete quote.
    assert out == icmp_error(family, quoted_packet(proto, family, client, server), kind=kind, dst=client[0])
    assert rebuilt(out, quote_complete=True) == out
    pkt = dissect(out)
    assert (A(pkt.src), A(pkt.dst)) == (ROUTER[family], client[0])
    if kind == "mtu":
        assert (pkt[ICMP].nexthopmtu if family == 4 else pkt[ICMPv6PacketTooBig].mtu) == (
            1300 if family == 4 else 1280)


def quote_of(translated: bytes, on_wire: bytes, n: int) -> bytes:
    """The first ``n`` bytes of ``translated`` (a TCP/UDP packet without extension headers) as
    a quote of ``on_wire`` becomes when translated: a checksum cut in half is left as it was."""
    header = 20 if translated[0] >> 4 == 4 else 40
    checksum_at = header + (16 if translated[9 if header == 20 else 6] == packet.TCP else 6)
    quote = bytearray(translated[:n])
    if n == checksum_at + 1:
        quote[checksum_at] = on_wire[checksum_at]
    return bytes(quote)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", [packet.TCP, packet.UDP])
def test_icmp_error_quote_equals_rewritten_original(family: int, proto: int) -> None:
    """A quote of every length: the quoted bytes are the client's original packet, as
    ``rewrite`` turns the translated one back, cut at the same length."""
    client, server, translated_src = (CLIENT[family], 40000), (SERVER[family], 80), (FW[family], 50000)
    on_wire = build(proto, translated_src, server)
    original = rewrite(on_wire, src=client)
    assert original == build(proto, client, server)
    for n in range((20 if family == 4 else 40) + 4, len(on_wire) + 1):
        expected = quote_of(original, on_wire, n)
        for kind in ("unreach", "mtu"):
            raw = icmp_error(family, on_wire[:n], kind=kind)
            assert icmp_error_inner(raw) == FlowKey(proto, translated_src[0], 50000, server[0], 80)
            out = rewrite_icmp_error(raw, outer_dst=client[0], inner_src=client)
            assert out == icmp_error(family, expected, kind=kind, dst=client[0]), n
            assert rebuilt(out) == out  # outer checksums; the quoted IPv4 header checksum


def test_icmp_error_truncated_tcp_quote_keeps_its_checksum_bytes_alone() -> None:
    """A quote with only 8 bytes of TCP has no checksum: the bytes after it are not touched."""
    on_wire = build(packet.TCP, (FW[4], 50000), (SERVER[4], 80))
    raw = icmp_error(4, on_wire[:28], kind="mtu") + b"\xAA\xBB\xCC\xDD"  # past the IP length
    out = rewrite_icmp_error(raw, outer_dst=CLIENT[4], inner_src=(CLIENT[4], 40000))
    assert out.endswith(b"\xAA\xBB\xCC\xDD")
    assert out[:-4] == icmp_error(4, build(packet.TCP, (CLIENT[4], 40000), (SERVER[4], 80))[:28],
                                  kind="mtu", dst=CLIENT[4])


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_error_udp_zero_checksum_stays_zero(family: int) -> None:
    raw = icmp_error(family, quoted_packet(packet.UDP, family, (FW[family], 5353), (SERVER[family], 53),
                                           udp_chksum=0))
    out = rewrite_icmp_error(raw, outer_dst=CLIENT[family], inner_src=(CLIENT[family], 1234))
    assert dissect(out)[UDPerror].chksum == 0
    assert out == icmp_error(family, quoted_packet(packet.UDP, family, (CLIENT[family], 1234),
                                                   (SERVER[family], 53), udp_chksum=0), dst=CLIENT[family])


def test_icmpv6_error_with_extension_headers() -> None:
    client, server, translated_src = (CLIENT[6], 40000), (SERVER[6], 443), (FW[6], 50000)
    quote_ext = IPv6ExtHdrDestOpt()
    outer_ext = IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
    for proto in (packet.TCP, packet.UDP):
        on_wire = build(proto, translated_src, server, ext=quote_ext)
        for kind in ("unreach", "mtu"):
            raw = icmp_error(6, on_wire, kind=kind, outer_ext=outer_ext)
            assert icmp_error_inner(raw) == FlowKey(proto, FW[6], 50000, server[0], 443)
            out = rewrite_icmp_error(raw, outer_dst=client[0], inner_src=client)
            assert out == icmp_error(6, build(proto, client, server, ext=quote_ext), kind=kind,
                                     dst=client[0], outer_ext=outer_ext)
            assert rebuilt(out, quote_complete=True) == out


def test_icmp_error_quoting_a_first_fragment() -> None:
    on_wire = bytes(IP(src=str(FW[4]), dst=str(SERVER[4]), flags="MF") / UDP(sport=50000, dport=53)
                    / Raw(PAYLOAD))
    raw = icmp_error(4, on_wire, kind="time")
    assert icmp_error_inner(raw) == FlowKey(packet.UDP, FW[4], 50000, SERVER[4], 53)
    on_wire6 = bytes(IPv6(src=str(FW[6]), dst=str(SERVER[6])) / IPv6ExtHdrFragment(m=1, id=9)
                     / UDP(sport=50000, dport=53) / Raw(PAYLOAD))
    raw6 = icmp_error(6, on_wire6, kind="time")
    assert icmp_error_inner(raw6) == FlowKey(packet.UDP, FW[6], 50000, SERVER[6], 53)
    # The incremental update is right for a first fragment too: the delta is all that matters.
    out = rewrite_icmp_error(raw6, outer_dst=CLIENT[6], inner_src=(CLIENT[6], 1))
    expected = bytes(IPv6(src=str(CLIENT[6]), dst=str(SERVER[6])) / IPv6ExtHdrFragment(m=1, id=9)
                     / UDP(sport=1, dport=53) / Raw(PAYLOAD))
    assert out == icmp_error(6, expected, kind="time", dst=CLIENT[6])


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_error_translating_everything(family: int) -> None:
    """Destination NAT direction, all four at once, and the quoted IPv4 header has options."""
    on_wire = build(packet.TCP, (SERVER[family], 443), (CLIENT[family], 40000))
    if family == 4:
        on_wire = bytes(IP(src=str(SERVER[4]), dst=str(CLIENT[4]), options=[IPOption_Router_Alert()])
                        / TCP(sport=443, dport=40000, options=TCP_OPTIONS) / Raw(PAYLOAD))
    raw = icmp_error(family, on_wire, kind="unreach", dst=SERVER[family])
    out = rewrite_icmp_error(raw, outer_src=FW[family], outer_dst=ROUTER[family],
                             inner_src=(ROUTER[family], 8443), inner_dst=(FW[family], 1))
    pkt = dissect(out)
    assert (A(pkt.src), A(pkt.dst)) == (FW[family], ROUTER[family])
    assert icmp_error_inner(out) == FlowKey(packet.TCP, ROUTER[family], 8443, FW[family], 1)
    assert rebuilt(out, quote_complete=True) == out
    quote = out[(20 if family == 4 else 40) + 8:]
    assert quote == rewrite(on_wire, src=(ROUTER[family], 8443), dst=(FW[family], 1))


@pytest.mark.parametrize("raw", [
    # not errors, or not about TCP/UDP
    bytes(IP(src="203.0.113.254", dst="198.51.100.1") / ICMP(type=0)),
    bytes(IP(src="203.0.113.254", dst="198.51.100.1") / ICMP(type=8) / Raw(b"\0" * 40)),
    bytes(IP(src="203.0.113.254", dst="198.51.100.1") / ICMP(type=5)
          / IPerror(src="198.51.100.1", dst="198.51.100.21") / UDPerror()),
    bytes(IP(src="203.0.113.254", dst="198.51.100.1") / ICMP(type=3, code=3)
          / IPerror(src="198.51.100.1", dst="198.51.100.21") / ICMP()),
    bytes(IPv6(src="2001:db8:3::fe", dst="2001:db8:2::1") / ICMPv6EchoRequest()),
    bytes(IPv6(src="2001:db8:3::fe", dst="2001:db8:2::1") / ICMPv6DestUnreach()
          / IPerror6(src="2001:db8:2::1", dst="2001:db8:2::21", nh=58) / Raw(b"\x80\0\0\0\0\0\0\0")),
    # the other version quoted
    bytes(IP(src="203.0.113.254", dst="198.51.100.1") / ICMP(type=3, code=3)
          / IPerror6(src="2001:db8:2::1", dst="2001:db8:2::21") / UDPerror()),
    bytes(IPv6(src="2001:db8:3::fe", dst="2001:db8:2::1") / ICMPv6DestUnreach()
          / IPerror(src="198.51.100.1", dst="198.51.100.21") / UDPerror()),
    # ICMPv6 in IPv4, ICMPv4 in IPv6
    bytes(IP(src="203.0.113.254", dst="198.51.100.1", proto=58) / ICMPv6DestUnreach()
          / IPerror6(src="2001:db8:2::1", dst="2001:db8:2::21") / UDPerror()),
    bytes(IPv6(src="2001:db8:3::fe", dst="2001:db8:2::1", nh=1) / ICMP(type=3)
          / IPerror(src="198.51.100.1", dst="198.51.100.21") / UDPerror()),
    # quotes too short for the ports; a quoted non-first fragment; a fragmented error
    bytes(IP(src="203.0.113.254", dst="198.51.100.1") / ICMP(type=3, code=3)
          / Raw(bytes(IPerror(src="198.51.100.1", dst="198.51.100.21") / UDPerror())[:23])),
    bytes(IPv6(src="2001:db8:3::fe", dst="2001:db8:2::1") / ICMPv6DestUnreach()
          / Raw(bytes(IPerror6(src="2001:db8:2::1", dst="2001:db8:2::21") / UDPerror())[:43])),
    bytes(IP(src="203.0.113.254", dst="198.51.100.1") / ICMP(type=3, code=3)
          / IPerror(src="198.51.100.1", dst="198.51.100.21", frag=3, proto=17) / Raw(b"\0" * 8)),
    bytes(IPv6(src="2001:db8:3::fe", dst="2001:db8:2::1") / ICMPv6DestUnreach()
          / IPerror6(src="2001:db8:2::1", dst="2001:db8:2::21") / IPv6ExtHdrFragment(offset=4, nh=17)
          / Raw(b"\0" * 8)),
    bytes(IP(src="203.0.113.254", dst="198.51.100.1", flags="MF") / ICMP(type=3, code=3)
          / IPerror(src="198.51.100.1", dst="198.51.100.21") / UDPerror()),
    bytes(IPv6(src="2001:db8:3::fe", dst="2001:db8:2::1") / IPv6ExtHdrFragment(nh=58)
          / ICMPv6DestUnreach() / IPerror6(src="2001:db8:2::1", dst="2001:db8:2::21") / UDPerror()),
    # the ICMP header itself cut short; a bad quoted IPv4 header length
    bytes(IP(src="203.0.113.254", dst="198.51.100.1", proto=1) / Raw(b"\x03\x03\0\0")),
    bytes(IP(src="203.0.113.254", dst="198.51.100.1") / ICMP(type=3, code=3)
          / IPerror(src="198.51.100.1", dst="198.51.100.21", ihl=15) / UDPerror()),
    # TCP and UDP packets
    build(packet.TCP, (CLIENT[4], 1), (SERVER[4], 2)),
    build(packet.UDP, (CLIENT[6], 1), (SERVER[6], 2)),
    b"",
], ids=lambda raw: f"{len(raw)}")
def test_icmp_error_inner_none(raw: bytes) -> None:
    assert icmp_error_inner(raw) is None
    with pytest.raises(Malformed):
        rewrite_icmp_error(raw, outer_dst=A("192.0.2.11"))


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_error_every_truncation(family: int) -> None:
    """Cut anywhere, the error's own length field no longer fits: None, and Malformed."""
    raw = icmp_error(family, quoted_packet(packet.TCP, family, (FW[family], 1), (SERVER[family], 2)))
    for n in range(len(raw)):
        assert icmp_error_inner(raw[:n]) is None
        with pytest.raises(Malformed):
            rewrite_icmp_error(raw[:n])


def test_icmp_error_source_quench_and_other_types() -> None:
    quote = quoted_packet(packet.UDP, 4, (FW[4], 1), (SERVER[4], 2))
    assert icmp_error_inner(icmp_error(4, quote, kind="quench")) is not None
    for icmp_type in range(256):
        raw = bytes(IP(src="203.0.113.254", dst="198.51.100.1") / ICMP(type=icmp_type) / Raw(bytes(quote)))
        assert (icmp_error_inner(raw) is not None) == (icmp_type in (3, 4, 11, 12))
        raw6 = bytes(IPv6(src="2001:db8:3::fe", dst="2001:db8:2::1") / ICMPv6DestUnreach(type=icmp_type)
                     / quoted_packet(packet.UDP, 6, (FW[6], 1), (SERVER[6], 2)))
        assert (icmp_error_inner(raw6) is not None) == (icmp_type in (1, 2, 3, 4))


@pytest.mark.parametrize("family", [4, 6])
def test_rewrite_icmp_error_refuses_the_other_family(family: int) -> None:
    raw = icmp_error(family, quoted_packet(packet.UDP, family, (FW[family], 1), (SERVER[family], 2)))
    other = 6 if family == 4 else 4
    cases: list[dict[str, Any]] = [{"outer_src": FW[other]}, {"outer_dst": FW[other]},
                                   {"inner_src": (FW[other], 1)}, {"inner_dst": (FW[other], 1)}]
    for kwargs in cases:
        with pytest.raises(Malformed, match="address"):
            rewrite_icmp_error(raw, **kwargs)
    with pytest.raises(ValueError, match="port"):
        rewrite_icmp_error(raw, inner_dst=(FW[family], 70000))


def test_tcp_and_udp_are_not_icmp_errors() -> None:
    with pytest.raises(Malformed):
        rewrite(icmp_error(4, quoted_packet(packet.UDP, 4, (FW[4], 1), (SERVER[4], 2))), src=(FW[4], 1))


@st.composite
def icmp_cases(draw: st.DrawFn) -> tuple[int, int, str, Endpoint, Endpoint, Endpoint, Endpoint, int, bytes]:
    family: Literal[4, 6] = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from([packet.TCP, packet.UDP]))
    kind = draw(st.sampled_from(["unreach", "mtu", "time", "param"]))
    payload = draw(st.binary(max_size=40))
    src, dst, new_src, new_dst = (draw(endpoints(family)) for _ in range(4))
    header = 20 if family == 4 else 40
    cut = draw(st.integers(header + 4, header + (40 if proto == packet.TCP else 8) + len(payload)))
    return family, proto, kind, src, dst, new_src, new_dst, cut, payload


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(icmp_cases())
def test_rewrite_icmp_error_property(case: tuple[int, int, str, Endpoint, Endpoint, Endpoint, Endpoint, int,
                                                 bytes]) -> None:
    family, proto, kind, src, dst, new_src, new_dst, cut, payload = case
    on_wire = build(proto, src, dst, payload=payload)
    raw = icmp_error(family, on_wire[:cut], kind=kind, dst=src[0])
    assert icmp_error_inner(raw) == FlowKey(proto, src[0], src[1], dst[0], dst[1])
    out = rewrite_icmp_error(raw, outer_dst=new_src[0], inner_src=new_src, inner_dst=new_dst)
    expected = quote_of(rewrite(on_wire, src=new_src, dst=new_dst), on_wire, cut)
    assert out == icmp_error(family, expected, kind=kind, dst=new_src[0])
    assert icmp_error_inner(out) == FlowKey(proto, new_src[0], new_src[1], new_dst[0], new_dst[1])


# --- garbage --------------------------------------------------------------------------------

def _valid_samples() -> list[bytes]:
    samples = []
    for family in (4, 6):
        for proto in (packet.TCP, packet.UDP):
            samples.append(build(proto, (CLIENT[family], 1), (SERVER[family], 2)))
            samples.append(icmp_error(family, quoted_packet(proto, family, (FW[family], 1),
                                                            (SERVER[family], 2))))
    samples.append(build(packet.TCP, (CLIENT[6], 1), (SERVER[6], 2),
                         ext=IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt()))
    return samples


VALID = _valid_samples()


def exercise(raw: bytes) -> None:
    """Everything nat does to bytes: only Malformed may come out."""
    key = icmp_error_inner(raw)
    assert key is None or isinstance(key, FlowKey)
    version = raw[0] >> 4 if raw else 4
    address = FW[6] if version == 6 else FW[4]
    with contextlib.suppress(Malformed):
        assert len(rewrite(raw, src=(address, 9), dst=(address, 10))) == len(raw)
    try:
        out = rewrite_icmp_error(raw, outer_dst=address, inner_src=(address, 9))
    except Malformed:
        assert key is None
    else:
        assert key is not None
        assert len(out) == len(raw)


@settings(max_examples=500)
@given(st.binary(max_size=120))
def test_random_bytes(raw: bytes) -> None:
    exercise(raw)


@settings(max_examples=500)
@given(st.binary(max_size=120).map(lambda b: bytes([0x45 if len(b) % 2 else 0x60]) + b))
def test_random_bytes_with_a_version(raw: bytes) -> None:
    exercise(raw)


@settings(max_examples=1000)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       st.integers(0, 400))
def test_mutated_packets(raw: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(raw)
    for at, value in flips:
        data[at % len(data)] = value
    exercise(bytes(data[:cut]))
    exercise(bytes(data))


def test_mutated_packets_seeded() -> None:
    """Many more mutations, cheaply, from a fixed seed."""
    rng = random.Random(1624)
    for _ in range(20_000):
        data = bytearray(rng.choice(VALID))
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        exercise(bytes(data[:rng.randint(0, len(data))]) if rng.random() < 0.3 else bytes(data))


def test_module_is_pure() -> None:
    """No Scapy, no sockets at run time: only the test suite uses Scapy."""
    code = ("import sys, enforcer.core.packet; "
            "print(sorted(m for m in sys.modules if m in ('scapy', 'socket')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
