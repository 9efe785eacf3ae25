"""Rebuilding a TCP segment or UDP datagram after a filter: new sequence numbers, payload,
lengths and checksums. Scapy does the rebuilding; it runs only for flows that carry a
filter."""

from __future__ import annotations

from dataclasses import dataclass

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw

from enforcer.core.packet import TCP_ACK, TCP_FIN, TCP_SYN


@dataclass(frozen=True)
class Segment:
    seq: int
    ack: int | None  # None when the ACK flag is off
    payload: bytes
    syn: bool = False
    fin: bool = False


def parse_segment(data: bytes) -> tuple[Packet, Segment]:
    packet = _packet(data)
    tcp = packet[TCP]
    flags = int(tcp.flags)
    ack = tcp.ack if flags & TCP_ACK else None
    return packet, Segment(tcp.seq, ack, bytes(tcp.payload), bool(flags & TCP_SYN),
                           bool(flags & TCP_FIN))


def rebuild(packet: Packet, seq: int, ack: int | None, payload: bytes, fin: bool) -> bytes:
    """The packet with this seq/ack and payload, its FIN flag off unless ``fin``;
    lengths and checksums recomputed."""
    tcp = packet[TCP]
    tcp.seq = seq
    if ack is not None:
        tcp.ack = ack
    if not fin:
        tcp.flags = int(tcp.flags) & ~TCP_FIN
    tcp.remove_payload()
    if payload:
        tcp.add_payload(Raw(payload))
    del tcp.chksum
    return _recomputed(packet)


def _recomputed(packet: Packet) -> bytes:
    """The packet's bytes, its IP length (and IPv4 checksum) computed anew."""
    if isinstance(packet, IP):
        del packet.len
        del packet.chksum
    else:
        del packet.plen
    return bytes(packet)


def _packet(data: bytes) -> Packet:
    return IP(data) if data[0] >> 4 == 4 else IPv6(data)


def udp_payload(data: bytes) -> bytes:
    return bytes(_packet(data)[UDP].payload)


def rebuild_udp(data: bytes, payload: bytes) -> bytes:
    """The datagram with this payload; lengths and checksums recomputed."""
    packet = _packet(data)
    udp = packet[UDP]
    udp.remove_payload()
    udp.add_payload(Raw(payload))
    del udp.len
    del udp.chksum
    return _recomputed(packet)
