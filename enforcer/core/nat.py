"""Address and port translation on raw IPv4/IPv6 packet bytes, for the enforcer's user-space NAT.

Flows that run in user mode (a data filter, ``NO_KERNEL_MODE``) cannot leave their
translation to the kernel's conntrack NAT: every packet comes through the queue, and
the enforcer rewrites it before giving its verdict. So this runs once per packet of
such a flow and is written to be cheap: it finds the fields with a few ``struct``
reads, changes them in a ``bytearray``, and adjusts the checksums *incrementally*
(RFC 1624) from the old and new values of what changed, rather than summing the whole
segment again. A TCP or UDP checksum covers the payload, so a full recomputation costs
time proportional to the packet; the incremental update costs the same for a SYN as for
a 64 KiB segment, and it keeps the end-to-end property of the checksum: a packet that
arrived corrupted still fails its checksum after translation.

RFC 1624 writes the update as ``HC' = ~(~HC + ~m + m')`` in ones' complement
arithmetic. Ones' complement addition of 16-bit words is addition modulo 0xFFFF, and
``~x`` is ``-x`` there, so the update is ``HC' = HC + m - m' (mod 0xFFFF)``; and since a
16-bit-aligned byte string read as one big-endian integer is congruent modulo 0xFFFF to
the sum of its 16-bit words (2**16 = 1 mod 0xFFFF), any number of changed words is one
``int.from_bytes`` each. The representative in ``0 .. 0xFFFE`` is exactly what a full
recomputation gives (0 and 0xFFFF are the two zeros; a recomputation over data that is
not all zero never yields 0xFFFF), so translated packets match what a stack or Scapy
would have written. UDP is the exception the protocol makes: a computed 0 is sent as
0xFFFF, because 0 means "no checksum".

ICMP errors about a translated flow quote the flow's packet, which must be translated
too (as kernel NAT does): ``icmp_error_inner`` finds the quoted flow and
``rewrite_icmp_error`` rewrites outer and quoted headers. The ICMP checksum is then
recomputed over the message, which is short.

No sockets, no Scapy: pure functions on bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from enforcer.core.packet import ICMP, ICMPV6, TCP, UDP, FlowKey, IPAddress, Malformed

Endpoint = tuple[IPAddress, int]
"""An address and a port."""

_ICMP_ERRORS = frozenset({3, 4, 11, 12})  # destination unreachable, source quench, time exceeded,
#                                           parameter problem
_ICMPV6_ERRORS = frozenset({1, 2, 3, 4})  # destination unreachable, packet too big, time exceeded,
#                                           parameter problem
_IPV6_EXTENSIONS = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_IPV6_ROUTING = 43
_IPV6_FRAGMENT = 44
_L4_CHECKSUM_OFFSET = {TCP: 16, UDP: 6}

_H = struct.Struct("!H")


def checksum_adjust(csum: int, old: bytes | bytearray, new: bytes | bytearray) -> int:
    """The Internet checksum ``csum`` updated for ``old`` bytes of the data it covers having
    become ``new`` (RFC 1624, eqn. 3, computed modulo 0xFFFF as the module docstring explains).

    ``old`` and ``new`` must have the same length and start at an even offset of the
    checksummed data (every address and port in an IP, TCP or UDP header does); an odd
    length is taken as padded with a zero byte, which is right for a field that ends the data.
    The result is in ``0 .. 0xFFFE``; UDP callers must write a 0 result as 0xFFFF.
    """
    if len(old) != len(new):
        raise ValueError("old and new differ in length")
    delta = int.from_bytes(old, "big") - int.from_bytes(new, "big")
    if len(old) & 1:
        delta <<= 8
    return (csum + delta) % 0xFFFF


class _IP(NamedTuple):
    """Where things are in an IP packet (or a quoted one) inside a buffer."""

    version: int
    addrs: int  # offset of the source address; the destination follows it
    l4: int  # offset of the transport header
    protocol: int  # the transport protocol (after any IPv6 extension headers)
    end: int  # where the packet ends: its length field for a packet, the buffer for a quote


def _ip(data: bytes | bytearray, start: int, limit: int, *, quoted: bool) -> _IP:
    """Locate the headers of the IP packet at ``data[start:limit]``, or raise Malformed.

    A packet (``quoted=False``) must be complete as its length field says, and not a
    fragment. A quoted packet (inside an ICMP error) is a truncated copy: its length
    field is the original's and is not checked, and it may be a first fragment (which
    holds the ports), not a later one.
    """
    if limit - start < 1:
        raise Malformed("empty packet")
    version = data[start] >> 4
    if version == 4:
        if limit - start < 20:
            raise Malformed("truncated IPv4 header")
        ihl = (data[start] & 0x0F) * 4
        if ihl < 20 or start + ihl > limit:
            raise Malformed("bad IPv4 header length")
        total, fragment = struct.unpack_from("!H2xH", data, start + 2)
        if quoted:
            if fragment & 0x1FFF:
                raise Malformed("quotes a non-first IPv4 fragment")
            end = limit
        else:
            if fragment & 0x3FFF:  # more fragments, or an offset
                raise Malformed("IPv4 fragment")
            if total < ihl or start + total > limit:
                raise Malformed("bad IPv4 total length")
            end = start + total
        return _IP(4, start + 12, start + ihl, data[start + 9], end)
    if version == 6:
        if limit - start < 40:
            raise Malformed("truncated IPv6 header")
        if quoted:
            end = limit
        else:
            end = start + 40 + _H.unpack_from(data, start + 4)[0]
            if end > limit:
                raise Malformed("bad IPv6 payload length")
        protocol = data[start + 6]
        offset = start + 40
        while True:
            if protocol in _IPV6_EXTENSIONS:
                if offset + 8 > end:
                    raise Malformed("truncated IPv6 extension header")
                if protocol == _IPV6_ROUTING and data[offset + 3]:
                    # With segments left, the transport pseudo-header's destination is the
                    # route's last address, not the header's: a translation cannot be right.
                    raise Malformed("IPv6 routing header with segments left")
                protocol = data[offset]
                offset += (data[offset + 1] + 1) * 8
            elif protocol == _IPV6_FRAGMENT:
                if not quoted:
                    raise Malformed("IPv6 fragment")
                if offset + 8 > end:
                    raise Malformed("truncated IPv6 fragment header")
                if _H.unpack_from(data, offset + 2)[0] & 0xFFF8:
                    raise Malformed("quotes a non-first IPv6 fragment")
                protocol = data[offset]
                offset += 8
            else:
                break
        if offset > end:
            raise Malformed("truncated IPv6 extension header")
        return _IP(6, start + 8, offset, protocol, end)
    raise Malformed(f"IP version {version}")


def locate(data: bytes | bytearray) -> _IP:
    """Where the headers of a whole, unfragmented IP packet are, or raise Malformed."""
    return _ip(data, 0, len(data), quoted=False)


def _check_endpoint(endpoint: Endpoint | None, version: int) -> None:
    if endpoint is not None:
        _check_address(endpoint[0], version)
        if not 0 <= endpoint[1] <= 0xFFFF:
            raise ValueError(f"port {endpoint[1]} out of range")


def _check_address(address: IPAddress | None, version: int) -> None:
    if address is not None and address.version != version:
        raise Malformed(f"an IPv{address.version} address for an IPv{version} packet")


def _set_addresses(buf: bytearray, ip: _IP, src: IPAddress | None, dst: IPAddress | None) -> int:
    """Write the addresses that are given (already checked) and update an IPv4 header checksum.

    Returns the checksum delta (old minus new, as integers) for the L4 pseudo-header.
    """
    if src is None and dst is None:
        return 0
    a = ip.addrs
    size = 4 if ip.version == 4 else 16
    before = int.from_bytes(buf[a:a + 2 * size], "big")
    if src is not None:
        buf[a:a + size] = src.packed
    if dst is not None:
        buf[a + size:a + 2 * size] = dst.packed
    delta = before - int.from_bytes(buf[a:a + 2 * size], "big")
    if ip.version == 4 and delta:
        at = a - 2  # the header checksum, just before the addresses
        _H.pack_into(buf, at, (_H.unpack_from(buf, at)[0] + delta) % 0xFFFF)
    return delta


def _translate(buf: bytearray, ip: _IP, src: Endpoint | None, dst: Endpoint | None) -> None:
    """Rewrite addresses and ports of a TCP/UDP packet (whose 4 port bytes are present,
    endpoints already checked), with its checksums when they are within ``ip.end``."""
    delta = _set_addresses(buf, ip, None if src is None else src[0], None if dst is None else dst[0])
    ports = ip.l4
    before = int.from_bytes(buf[ports:ports + 4], "big")
    if src is not None:
        _H.pack_into(buf, ports, src[1])
    if dst is not None:
        _H.pack_into(buf, ports + 2, dst[1])
    delta += before - int.from_bytes(buf[ports:ports + 4], "big")
    at = ports + _L4_CHECKSUM_OFFSET[ip.protocol]
    if delta and at + 2 <= ip.end:
        csum = _H.unpack_from(buf, at)[0]
        if ip.protocol == UDP:
            if csum == 0:  # no checksum (RFC 768; RFC 6936 for IPv6 tunnels): nothing to keep right
                return
            csum = (csum + delta) % 0xFFFF or 0xFFFF
        else:
            csum = (csum + delta) % 0xFFFF
        _H.pack_into(buf, at, csum)


def rewrite(data: bytes | bytearray, *, src: Endpoint | None = None, dst: Endpoint | None = None) -> bytes:
    """A TCP or UDP packet with its source and/or destination address and port replaced.

    IPv4, or IPv6 with the extension headers ``packet.parse`` skips (hop-by-hop,
    routing without segments left, destination options). The IPv4 header checksum and
    the TCP/UDP checksum (pseudo-header included) are updated incrementally. A UDP
    checksum of 0 (none; IPv4, or an RFC 6936 IPv6 tunnel) stays 0; a UDP checksum that
    comes out 0 is written as 0xFFFF. Everything else (TTL, TCP options, payload, any
    bytes after the IP length) is untouched.

    Raises Malformed for anything else: not TCP/UDP, truncated (by the buffer or the IP
    length), a fragment, an IPv6 routing header with segments left, an address of the
    other family. Raises ValueError for a port outside ``0 .. 65535``.
    """
    ip = locate(data)
    if ip.protocol == TCP:
        if ip.l4 + 20 > ip.end:
            raise Malformed("truncated tcp header")
        offset = (data[ip.l4 + 12] >> 4) * 4
        if offset < 20 or ip.l4 + offset > ip.end:
            raise Malformed("bad TCP header length")
    elif ip.protocol == UDP:
        if ip.l4 + 8 > ip.end:
            raise Malformed("truncated udp header")
    else:
        raise Malformed(f"protocol {ip.protocol} is not TCP or UDP")
    _check_endpoint(src, ip.version)
    _check_endpoint(dst, ip.version)
    buf = bytearray(data)
    _translate(buf, ip, src, dst)
    return bytes(buf)


def _icmp_error(data: bytes | bytearray) -> tuple[_IP, _IP]:
    """The outer packet and the quoted TCP/UDP packet of an ICMP error, or raise Malformed."""
    outer = _ip(data, 0, len(data), quoted=False)
    if outer.version == 4:
        if outer.protocol != ICMP:
            raise Malformed("not ICMP")
        errors = _ICMP_ERRORS
    else:
        if outer.protocol != ICMPV6:
            raise Malformed("not ICMPv6")
        errors = _ICMPV6_ERRORS
    if outer.l4 + 8 > outer.end:
        raise Malformed("truncated ICMP header")
    if data[outer.l4] not in errors:
        raise Malformed(f"ICMP type {data[outer.l4]} is not an error")
    # The quote runs to the end of the message. An RFC 4884 length field is not used to
    # bound it: as in kernel NAT, the L4 header the checksums need is always well inside.
    inner = _ip(data, outer.l4 + 8, outer.end, quoted=True)
    if inner.version != outer.version:
        raise Malformed("the quoted packet is of the other IP version")
    if inner.protocol not in (TCP, UDP):
        raise Malformed("the quoted packet is not TCP or UDP")
    if inner.l4 + 4 > inner.end:
        raise Malformed("the quote ends before the ports")
    return outer, inner


def _address(raw: bytes | bytearray) -> IPAddress:
    return ipaddress.IPv4Address(bytes(raw)) if len(raw) == 4 else ipaddress.IPv6Address(bytes(raw))


def icmp_error_inner(data: bytes | bytearray) -> FlowKey | None:
    """The flow an ICMP error is about, or None.

    For an ICMP error (ICMPv4 types 3, 4, 11, 12; ICMPv6 types 1-4; not fragmented)
    quoting a TCP or UDP packet of its own IP version with at least the 4 port bytes:
    the quoted packet's FlowKey as the quoted header says it (protocol, src, sport, dst,
    dport), that is, in the direction of the packet that caused the error. None for
    every other packet, including errors that are truncated or quote something else
    (or a non-first fragment). Never raises on garbage.
    """
    try:
        _, inner = _icmp_error(data)
    except Malformed:
        return None
    a = inner.addrs
    size = 4 if inner.version == 4 else 16
    sport, dport = struct.unpack_from("!HH", data, inner.l4)
    return FlowKey(inner.protocol, _address(data[a:a + size]), sport,
                   _address(data[a + size:a + 2 * size]), dport)


def rewrite_icmp_error(data: bytes | bytearray, *, outer_src: IPAddress | None = None,
                       outer_dst: IPAddress | None = None, inner_src: Endpoint | None = None,
                       inner_dst: Endpoint | None = None) -> bytes:
    """Translate an ICMP error about a flow, as kernel NAT does.

    Replaces the outer addresses given, and the quoted header's addresses and ports
    (``inner_src``/``inner_dst`` are the quoted packet's source and destination). The
    outer and quoted IPv4 header checksums are updated incrementally, and so is the quoted
    TCP/UDP checksum when the quote contains it (at offset 16 of TCP, 6 of UDP; a UDP zero
    checksum stays zero); the ICMP checksum (over the message) or ICMPv6 checksum (over the
    message and the IPv6 pseudo-header, RFC 4443) is then recomputed over the message.

    Raises Malformed if ``icmp_error_inner(data)`` would return None, or for an address of
    the other family; ValueError for a port outside ``0 .. 65535``.
    """
    outer, inner = _icmp_error(data)
    _check_address(outer_src, outer.version)
    _check_address(outer_dst, outer.version)
    _check_endpoint(inner_src, inner.version)
    _check_endpoint(inner_dst, inner.version)
    buf = bytearray(data)
    _set_addresses(buf, outer, outer_src, outer_dst)
    _translate(buf, inner, inner_src, inner_dst)

    message = outer.l4
    buf[message + 2:message + 4] = b"\0\0"
    total = int.from_bytes(buf[message:outer.end], "big")
    if (outer.end - message) & 1:
        total <<= 8
    if outer.version == 6:  # pseudo-header: addresses, upper-layer length, next header
        total += int.from_bytes(buf[8:40], "big") + (outer.end - message) + ICMPV6
    _H.pack_into(buf, message + 2, -total % 0xFFFF)
    return bytes(buf)
