"""Rebuilding a filtered TCP segment or UDP datagram on its bytes: new numbers and payload,
its FIN only where the editor keeps it, lengths and checksums what Scapy computes
(documentation addresses only)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.packet import Packet

from enforcer.core import packet as rewrite
from enforcer.core.packet import Malformed

IPS = [IP(src="192.0.2.11", dst="198.51.100.21", options=[]),
       IPv6(src="2001:db8:1::11", dst="2001:db8:2::21"),
       IPv6(src="2001:db8:1::11", dst="2001:db8:2::21") / IPv6ExtHdrDestOpt()]


def recomputed(packet: Packet) -> bytes:
    """The packet with every length and checksum left for Scapy to compute."""
    clean = packet.copy()
    for layer in (IP, TCP, UDP):
        if layer in clean:
            for name in ("chksum", "len"):
                if name in clean[layer].fields:
                    delattr(clean[layer], name)
    if IPv6 in clean:
        del clean[IPv6].plen
    return bytes(clean)


@pytest.mark.parametrize("ip", IPS, ids=["ipv4", "ipv6", "ipv6-options"])
@pytest.mark.parametrize("fin", [True, False])
def test_a_segment_keeps_its_fin_only_when_told(ip: Packet, fin: bool) -> None:
    data = bytes(ip / TCP(sport=40000, dport=21, flags="FPA", seq=100, ack=7) / b"QUIT\r\n")
    segment = rewrite.parse_segment(data)
    assert (segment.seq, segment.ack, segment.payload, segment.syn, segment.fin) == \
        (100, 7, b"QUIT\r\n", False, True)
    out_bytes = rewrite.rebuild(data, segment, 104, 9, b"QUIT 2\r\n", fin)
    out = type(ip)(out_bytes)
    assert (out[TCP].seq, out[TCP].ack, bytes(out[TCP].payload)) == (104, 9, b"QUIT 2\r\n")
    assert str(out[TCP].flags) == ("FPA" if fin else "PA")
    assert recomputed(out) == out_bytes  # lengths and checksums right


@given(st.sampled_from(IPS), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.binary(max_size=300), st.binary(max_size=300), st.booleans(), st.booleans())
def test_rebuilt_segments_are_what_scapy_builds(ip: Packet, seq: int, ack: int, payload: bytes,
                                                 new: bytes, same: bool, fin: bool) -> None:
    """Numbers changed alone (the checksum adjusted) or with the payload (summed anew):
    every length and checksum as Scapy computes it."""
    data = bytes(ip / TCP(sport=40000, dport=21, flags="FA", seq=1, ack=2,
                          options=[("MSS", 1460)]) / payload)
    segment = rewrite.parse_segment(data)
    out = rewrite.rebuild(data, segment, seq, ack, payload if same else new, fin)
    assert recomputed(type(ip)(out)) == out


@pytest.mark.parametrize("ip", IPS, ids=["ipv4", "ipv6", "ipv6-options"])
@pytest.mark.parametrize("new", [b"", b"x", b"a longer payload than before\n"])
def test_a_datagram_rebuilt(ip: Packet, new: bytes) -> None:
    data = bytes(ip / UDP(sport=40000, dport=69) / b"\x00\x01file\x00octet\x00")
    assert rewrite.udp_payload(data) == b"\x00\x01file\x00octet\x00"
    out = rewrite.rebuild_udp(data, new)
    parsed = type(ip)(out)
    assert bytes(parsed[UDP].payload) == new and recomputed(parsed) == out
    assert parsed[UDP].chksum != 0


@pytest.mark.parametrize("data", [b"", bytes(IP() / UDP()), bytes(IP() / TCP())[:30],
                                  bytes(IPv6() / TCP(dataofs=15))])
def test_what_is_not_a_whole_segment_is_malformed(data: bytes) -> None:
    with pytest.raises(Malformed):
        rewrite.parse_segment(data)
