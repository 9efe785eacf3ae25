"""Rebuilding a filtered TCP segment: new numbers and payload, its FIN only where the
editor keeps it, lengths and checksums right (documentation addresses only)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from enforcer import rewrite


@pytest.mark.parametrize("ip", [IP(src="192.0.2.11", dst="198.51.100.21"),
                                IPv6(src="2001:db8:1::11", dst="2001:db8:2::21")])
@pytest.mark.parametrize("fin", [True, False])
def test_a_segment_keeps_its_fin_only_when_told(ip: IP | IPv6, fin: bool) -> None:
    data = bytes(ip / TCP(sport=40000, dport=21, flags="FPA", seq=100, ack=7) / b"QUIT\r\n")
    packet, segment = rewrite.parse_segment(data)
    assert (segment.seq, segment.ack, segment.payload, segment.syn, segment.fin) == \
        (100, 7, b"QUIT\r\n", False, True)
    out = type(ip)(rewrite.rebuild(packet, 104, 9, b"QUIT 2\r\n", fin))
    assert (out[TCP].seq, out[TCP].ack, bytes(out[TCP].payload)) == (104, 9, b"QUIT 2\r\n")
    assert str(out[TCP].flags) == ("FPA" if fin else "PA")
    recomputed = out.copy()
    del recomputed[TCP].chksum
    if isinstance(recomputed, IP):
        del recomputed.chksum, recomputed.len
    else:
        del recomputed.plen
    assert bytes(type(ip)(bytes(recomputed))) == bytes(out)  # lengths and checksums right
