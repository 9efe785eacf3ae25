"""Rebuilding a TCP segment or UDP datagram after a filter: new sequence numbers, payload,
lengths and checksums.

It runs for every packet of a filtered flow, so it works on the bytes with ``struct``
(no Scapy, which cost a few hundred microseconds a packet): the headers are found once
(``enforcer.core.nat.locate``), numbers and flags are set in place, and the transport
checksum is adjusted incrementally when only numbers changed (RFC 1624), or summed
anew over the segment when the payload did.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from enforcer.core.nat import checksum_adjust, locate
from enforcer.core.packet import TCP, TCP_ACK, TCP_FIN, TCP_SYN, UDP, Malformed

_SEQ_ACK = struct.Struct("!II")


class Segment(NamedTuple):
    seq: int
    ack: int | None  # None when the ACK flag is off
    payload: bytes
    syn: bool
    fin: bool
    l4: int  # where the TCP header starts
    header: int  # and its length


def parse_segment(data: bytes) -> Segment:
    """The TCP segment of an IP packet, or Malformed."""
    ip = locate(data)
    if ip.protocol != TCP or ip.l4 + 20 > ip.end:
        raise Malformed("not a whole TCP segment")
    header = (data[ip.l4 + 12] >> 4) * 4
    if header < 20 or ip.l4 + header > ip.end:
        raise Malformed("bad TCP data offset")
    seq, ack = _SEQ_ACK.unpack_from(data, ip.l4 + 4)
    flags = data[ip.l4 + 13]
    return Segment(seq, ack if flags & TCP_ACK else None, data[ip.l4 + header:ip.end],
                   bool(flags & TCP_SYN), bool(flags & TCP_FIN), ip.l4, header)


def rebuild(data: bytes, segment: Segment, seq: int, ack: int | None, payload: bytes,
            fin: bool) -> bytes:
    """The packet with this seq/ack and payload, its FIN flag off unless ``fin``;
    lengths and checksums right."""
    start = segment.l4
    buf = bytearray(data[:start + segment.header])
    old = bytes(buf[start + 4:start + 14])  # sequence, acknowledgement, offset and flags
    struct.pack_into("!I", buf, start + 4, seq)
    if ack is not None:
        struct.pack_into("!I", buf, start + 8, ack)
    if not fin:
        buf[start + 13] &= ~TCP_FIN & 0xFF
    if payload == segment.payload:
        csum = struct.unpack_from("!H", buf, start + 16)[0]
        struct.pack_into("!H", buf, start + 16, checksum_adjust(csum, old, buf[start + 4:start + 14]))
        return bytes(buf) + payload
    buf += payload
    _set_length(buf, len(buf))
    struct.pack_into("!H", buf, start + 16, 0)
    struct.pack_into("!H", buf, start + 16, _transport_checksum(buf, start, TCP))
    return bytes(buf)


def udp_payload(data: bytes) -> bytes:
    ip = locate(data)
    if ip.protocol != UDP or ip.l4 + 8 > ip.end:
        raise Malformed("not a whole UDP datagram")
    return data[ip.l4 + 8:ip.end]


def rebuild_udp(data: bytes, payload: bytes) -> bytes:
    """The datagram with this payload; lengths and checksums right."""
    ip = locate(data)
    buf = bytearray(data[:ip.l4 + 8]) + payload
    _set_length(buf, len(buf))
    struct.pack_into("!HH", buf, ip.l4 + 4, 8 + len(payload), 0)
    csum = _transport_checksum(buf, ip.l4, UDP)
    struct.pack_into("!H", buf, ip.l4 + 6, csum or 0xFFFF)  # UDP: 0 means "no checksum"
    return bytes(buf)


def _set_length(buf: bytearray, total: int) -> None:
    """The IP length field for a packet of ``total`` bytes (and IPv4's header checksum)."""
    if buf[0] >> 4 == 4:
        ihl = (buf[0] & 0x0F) * 4
        struct.pack_into("!H", buf, 2, total)
        struct.pack_into("!H", buf, 10, 0)
        struct.pack_into("!H", buf, 10, _fold(bytes(buf[:ihl])))
    else:
        struct.pack_into("!H", buf, 4, total - 40)


def _transport_checksum(buf: bytearray, l4: int, protocol: int) -> int:
    """The TCP or UDP checksum of the segment at ``buf[l4:]`` (its checksum field zero)."""
    if buf[0] >> 4 == 4:
        pseudo = bytes(buf[12:20]) + struct.pack("!BBH", 0, protocol, len(buf) - l4)
    else:
        pseudo = bytes(buf[8:40]) + struct.pack("!IxxxB", len(buf) - l4, protocol)
    return _fold(pseudo + bytes(buf[l4:]))


def _fold(data: bytes) -> int:
    """The Internet checksum of ``data``: a big-endian integer of 16-bit words is congruent
    to their sum modulo 0xFFFF (see enforcer.core.nat), so the ones' complement of the sum
    is its negation there."""
    if len(data) & 1:
        data += b"\0"
    return -int.from_bytes(data, "big") % 0xFFFF
