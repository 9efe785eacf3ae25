"""Packets as bytes: what the core reads of one, and every rewrite it makes of one.

One module, so that a packet is located once, by one set of rules, and the flow key
the core decides by and the rewrites it makes (user-space NAT, a filter's edits, an
ICMP error's quote) agree on where every header is: ``parse`` returns the key, the
TCP flags and the headers' offsets (``Headers``), and each rewrite takes those.

It runs for every queued packet, so it is a few ``struct`` reads on the bytes, never a
general dissector (Scapy's would cost a hundred times more). Only what the key needs
must be present: every header up to the transport one, and that one whole (TCP options
included). A rewrite needs the whole packet, as its IP length says, and no fragment.

Checksums are kept right incrementally (RFC 1624) where only header fields change, so
that a SYN and a 64 KiB segment cost the same and a packet that arrived corrupted still
fails its checksum after translation. RFC 1624 writes the update as
``HC' = ~(~HC + ~m + m')`` in ones' complement arithmetic. Ones' complement addition of
16-bit words is addition modulo 0xFFFF, and ``~x`` is ``-x`` there, so the update is
``HC' = HC + m - m' (mod 0xFFFF)``; and since a 16-bit-aligned byte string read as one
big-endian integer is congruent modulo 0xFFFF to the sum of its 16-bit words
(2**16 = 1 mod 0xFFFF), any number of changed words is one ``int.from_bytes`` each. The
representative in ``0 .. 0xFFFE`` is exactly what a full recomputation gives (0 and
0xFFFF are the two zeros; a sum over data that is not all zero never yields 0xFFFF), so
rewritten packets match what a stack would have written. UDP is the exception the
protocol makes: a computed 0 is sent as 0xFFFF, because 0 means "no checksum". Where the
payload changes, or the kernel handed over a packet whose checksum it had not completed
(a GSO packet or one the fw sent: ``complete_checksum``), the checksum is summed anew.

ICMP errors about a translated flow quote the flow's packet, which must be translated
too (as kernel NAT does): ``icmp_error_inner`` finds the quoted flow and
``rewrite_icmp_error`` rewrites outer and quoted headers.

No sockets, no Scapy: pure functions on bytes.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import Any, NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IPAddress, int]
"""An address and a port."""

TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58
PROTOCOL_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMPV6: "icmpv6"}

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

# IPv6 extension headers that may stand between the fixed header and TCP/UDP:
# hop-by-hop, routing, destination options
_IPV6_EXTENSIONS = frozenset({0, 43, 60})
_IPV6_ROUTING = 43
_IPV6_FRAGMENT = 44
# ICMP errors: destination unreachable, source quench, time exceeded, parameter problem
_ICMP_ERRORS = frozenset({3, 4, 11, 12})
# ICMPv6 errors: destination unreachable, packet too big, time exceeded, parameter problem
_ICMPV6_ERRORS = frozenset({1, 2, 3, 4})
_L4_CHECKSUM_OFFSET = {TCP: 16, UDP: 6}
_H = struct.Struct("!H")
_PORTS = struct.Struct("!HH")
_SEQ_ACK = struct.Struct("!II")
_TOTAL_FRAGMENT = struct.Struct("!H2xH")



class Ingress(enum.Enum):
    """The side of the firewall a packet arrived on."""

    INTERNAL = "internal"
    EXTERNAL = "external"


class FlowKey(NamedTuple):
    """A flow in the direction of its first packet (ports are 0 for portless protocols).

    A named tuple rather than a dataclass: one is built for every queued packet.
    """

    protocol: int
    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int

    def __str__(self) -> str:
        name = PROTOCOL_NAMES.get(self.protocol, str(self.protocol))
        return f"{name} {_ep(self.src, self.sport)} -> {_ep(self.dst, self.dport)}"


def _ep(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


class Headers(NamedTuple):
    """Where the headers of an IP packet (or of the one an ICMP error quotes) are in a buffer."""

    version: int
    addrs: int  # offset of the source address; the destination follows it
    l4: int  # offset of the transport header (after any IPv6 extension headers)
    protocol: int  # the transport protocol
    end: int  # where the packet ends: its length field, or the buffer when that is shorter
    whole: bool  # the buffer holds all of the packet (a quote: all there is of it)
    fragment: int = 0  # NOT_FRAGMENT, FIRST_FRAGMENT or LATER_FRAGMENT (IPv4)


NOT_FRAGMENT, FIRST_FRAGMENT, LATER_FRAGMENT = 0, 1, 2


class PacketMeta(NamedTuple):
    key: FlowKey
    ingress: Ingress
    tcp_flags: int = 0
    # The interface the packet arrived on (SPEC rule 17 judges its source by it); "" for
    # the fw's own packets, which arrived on none.
    interface: str = ""
    headers: Headers | None = None  # where things are, for a rewrite (None: made by hand)

    @property
    def family(self) -> str:
        return "ipv4" if self.key.src.version == 4 else "ipv6"

    @property
    def starts_tcp_connection(self) -> bool:
        """A bare SYN: the only TCP packet that may open a connection."""
        return self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN


class Malformed(ValueError):
    """The bytes are not an IP packet this enforcer can classify."""


ADDRESS_CACHE_SIZE = 65536
_addresses: dict[bytes, IPAddress] = {}


def _remember_hash(self: _IPv4Address | _IPv6Address, address: object) -> None:
    standard: Any = type(self).__bases__[0]  # the ipaddress class it stands for
    standard.__init__(self, address)
    self._hash = standard.__hash__(self)
    self._text = None


def _remembered_hash(self: _IPv4Address | _IPv6Address) -> int:
    return self._hash


def _remembered_text(self: _IPv4Address | _IPv6Address) -> str:
    text = self._text
    if text is None:
        standard: Any = type(self).__bases__[0]
        text = self._text = standard.__str__(self)
    return text


class _IPv4Address(ipaddress.IPv4Address):
    """An IPv4 address whose hash is computed once (the standard one formats the address
    in hex at every hash, and the core's tables hash a flow's addresses many times a
    packet), and its text once it is asked for (reasons, events, logs); equal, and
    hashing equal, to the standard object of the same address."""

    __slots__ = ("_hash", "_text")
    _hash: int
    _text: str | None
    __init__ = _remember_hash
    __hash__ = _remembered_hash
    __str__ = _remembered_text


class _IPv6Address(ipaddress.IPv6Address):
    """An IPv6 address whose hash is computed once, and its text (see _IPv4Address: an
    IPv6 address's text, its zeros compressed, takes the standard class tens of steps)."""

    __slots__ = ("_hash", "_text")
    _hash: int
    _text: str | None
    __init__ = _remember_hash
    __hash__ = _remembered_hash
    __str__ = _remembered_text


def _address(raw: bytes) -> IPAddress:
    """The address object for 4 or 16 raw bytes; the same few addresses recur in every
    packet of a flow, and building ipaddress objects is most of what parsing costs."""
    found = _addresses.get(raw)
    if found is None:
        if len(_addresses) >= ADDRESS_CACHE_SIZE:
            _addresses.clear()
        found = _addresses[raw] = _IPv4Address(raw) if len(raw) == 4 else _IPv6Address(raw)
    return found


def address(text: str) -> IPAddress:
    """The address ``text`` names, as the core keeps addresses; ValueError if none."""
    return _address(ipaddress.ip_address(text).packed)


def _locate(data: bytes | bytearray, start: int, limit: int, *, quoted: bool) -> Headers:
    """Locate the headers of the IP packet at ``data[start:limit]``, or raise Malformed.

    A packet (``quoted=False``) may be a truncated copy (``whole`` False) and an IPv4
    fragment (``fragment`` says which), never an IPv6 one. A quoted packet (inside an
    ICMP error) is a truncated copy by nature: its length field is the original's and is
    not used, and it may be a first fragment (which holds the ports), not a later one.
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
        total, fragment = _TOTAL_FRAGMENT.unpack_from(data, start + 2)
        place = (NOT_FRAGMENT if not fragment & 0x3FFF  # more fragments, or an offset
                 else LATER_FRAGMENT if fragment & 0x1FFF else FIRST_FRAGMENT)
        if quoted:
            if place == LATER_FRAGMENT:
                raise Malformed("quotes a non-first IPv4 fragment")
            end, whole = limit, True
        else:
            if total < ihl:
                raise Malformed("bad IPv4 total length")
            end = start + total
            whole = end <= limit
        return Headers(4, start + 12, start + ihl, data[start + 9], end if whole else limit,
                       whole, place)
    if version == 6:
        if limit - start < 40:
            raise Malformed("truncated IPv6 header")
        if quoted:
            end, whole = limit, True
        else:
            end = start + 40 + _H.unpack_from(data, start + 4)[0]
            whole = end <= limit
            end = end if whole else limit
        protocol = data[start + 6]
        offset = start + 40
        while True:
            if protocol in _IPV6_EXTENSIONS:
                if offset + 8 > end:
                    raise Malformed("truncated IPv6 extension header")
                if protocol == _IPV6_ROUTING and data[offset + 3]:
                    # With segments left, the destination is a waypoint: policy would judge
                    # the wrong address, and the transport checksum's pseudo-header holds
                    # the route's last address, not the header's.
                    raise Malformed("IPv6 routing header with segments left")
                protocol = data[offset]
                offset += (data[offset + 1] + 1) * 8
            elif protocol == _IPV6_FRAGMENT:
                if not quoted:  # ports are not in a later fragment; none is classified
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
        return Headers(6, start + 8, offset, protocol, end, whole)
    raise Malformed(f"IP version {version}")


def _endpoints(data: bytes | bytearray, h: Headers) -> tuple[IPAddress, IPAddress]:
    size = 4 if h.version == 4 else 16
    a = h.addrs
    return _address(bytes(data[a:a + size])), _address(bytes(data[a + size:a + 2 * size]))


def parse(data: bytes, ingress: Ingress, interface: str = "") -> PacketMeta:
    """The flow key, TCP flags and headers of an IPv4 or IPv6 packet that arrived on
    ``interface`` on the ``ingress`` side; raise Malformed otherwise."""
    h = _locate(data, 0, len(data), quoted=False)
    sport = dport = flags = 0
    protocol, l4, end = h.protocol, h.l4, h.end
    if protocol in (TCP, UDP):
        if h.fragment == LATER_FRAGMENT:
            raise Malformed("non-first fragment")
        if l4 + (20 if protocol == TCP else 8) > end:
            raise Malformed(f"truncated {PROTOCOL_NAMES[protocol]} header")
        sport, dport = _PORTS.unpack_from(data, l4)
        if protocol == TCP:
            # what conntrack calls invalid, and what a rewrite could not handle
            header = (data[l4 + 12] >> 4) * 4
            if header < 20 or l4 + header > end:
                raise Malformed("bad TCP header length")
            flags = data[l4 + 13]
    src, dst = _endpoints(data, h)
    return PacketMeta(FlowKey(protocol, src, sport, dst, dport), ingress, flags, interface, h)


def _rewritable(data: bytes | bytearray, headers: Headers | None) -> Headers:
    h = _locate(data, 0, len(data), quoted=False) if headers is None else headers
    if not h.whole:
        raise Malformed("the packet is longer than its bytes here")
    if h.fragment != NOT_FRAGMENT:
        raise Malformed("IPv4 fragment")
    return h


def _transport(data: bytes | bytearray, headers: Headers | None, *protocols: int) -> Headers:
    """The headers of a whole packet whose transport header (one of ``protocols``) is whole."""
    h = _rewritable(data, headers)
    if h.protocol not in protocols:
        raise Malformed(f"protocol {h.protocol} is not "
                        f"{' or '.join(PROTOCOL_NAMES[p].upper() for p in protocols)}")
    if h.protocol == TCP:
        if h.l4 + 20 > h.end:
            raise Malformed("truncated tcp header")
        offset = (data[h.l4 + 12] >> 4) * 4
        if offset < 20 or h.l4 + offset > h.end:
            raise Malformed("bad TCP header length")
    elif h.l4 + 8 > h.end:
        raise Malformed("truncated udp header")
    return h


# --- checksums ------------------------------------------------------------------------------

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


def _fold(header: bytes | bytearray) -> int:
    """The Internet checksum of an IPv4 header (its checksum field zero; its length a
    multiple of 4): the ones' complement of the sum is its negation modulo 0xFFFF."""
    return -int.from_bytes(header, "big") % 0xFFFF


def _transport_checksum(buf: bytearray, h: Headers) -> int:
    """The TCP or UDP checksum of the segment at ``buf[h.l4:h.end]`` (its checksum field
    zero), pseudo-header included: the addresses, the protocol and the segment's length
    (each congruent to the sum of its 16-bit words)."""
    segment = buf[h.l4:h.end]
    total = int.from_bytes(segment, "big")
    if len(segment) & 1:
        total <<= 8
    size = 8 if h.version == 4 else 32
    total += int.from_bytes(buf[h.addrs:h.addrs + size], "big") + len(segment) + h.protocol
    return -total % 0xFFFF


def _write_checksum(buf: bytearray, h: Headers) -> None:
    at = h.l4 + _L4_CHECKSUM_OFFSET[h.protocol]
    buf[at:at + 2] = b"\0\0"
    csum = _transport_checksum(buf, h)
    if h.protocol == UDP and csum == 0:
        csum = 0xFFFF  # 0 means "no checksum"
    _H.pack_into(buf, at, csum)


def complete_checksum(data: bytes, headers: Headers | None = None) -> bytes:
    """The TCP or UDP packet with its checksum summed anew: for a packet the kernel handed
    over before completing it (a partial, offloaded checksum holds the pseudo-header's sum
    only), which must be complete before any rewrite of it leaves the fw."""
    h = _transport(data, headers, TCP, UDP)
    buf = bytearray(data)
    _write_checksum(buf, h)
    return bytes(buf)


def segments_checksum(data: bytes) -> bytes:
    """A UDP GSO packet as its segments are made from it: the checksum field holding the
    pseudo-header's sum for its length, not complemented (the kernel adds each segment's
    data when it splits it; a complete checksum there would spoil every segment). Other
    packets are returned as they are (a TCP GSO packet's segments are summed anew)."""
    h = _locate(data, 0, len(data), quoted=False)
    if h.protocol != UDP or not h.whole or h.l4 + 8 > h.end:
        return data
    size = 8 if h.version == 4 else 32
    total = int.from_bytes(data[h.addrs:h.addrs + size], "big") + (h.end - h.l4) + UDP
    buf = bytearray(data)
    _H.pack_into(buf, h.l4 + 6, total % 0xFFFF or 0xFFFF)
    return bytes(buf)


# --- address and port translation -----------------------------------------------------------

def _check_endpoint(endpoint: Endpoint | None, version: int) -> None:
    if endpoint is not None:
        _check_address(endpoint[0], version)
        if not 0 <= endpoint[1] <= 0xFFFF:
            raise ValueError(f"port {endpoint[1]} out of range")


def _check_address(address: IPAddress | None, version: int) -> None:
    if address is not None and address.version != version:
        raise Malformed(f"an IPv{address.version} address for an IPv{version} packet")


def _set_addresses(buf: bytearray, h: Headers, src: IPAddress | None, dst: IPAddress | None) -> int:
    """Write the addresses that are given (already checked) and update an IPv4 header checksum.

    Returns the checksum delta (old minus new, as integers) for the L4 pseudo-header.
    """
    if src is None and dst is None:
        return 0
    a = h.addrs
    size = 4 if h.version == 4 else 16
    before = int.from_bytes(buf[a:a + 2 * size], "big")
    if src is not None:
        buf[a:a + size] = src.packed
    if dst is not None:
        buf[a + size:a + 2 * size] = dst.packed
    delta = before - int.from_bytes(buf[a:a + 2 * size], "big")
    if h.version == 4 and delta:
        at = a - 2  # the header checksum, just before the addresses
        _H.pack_into(buf, at, (_H.unpack_from(buf, at)[0] + delta) % 0xFFFF)
    return delta


def _translate(buf: bytearray, h: Headers, src: Endpoint | None, dst: Endpoint | None) -> None:
    """Rewrite addresses and ports of a TCP/UDP packet (whose 4 port bytes are present,
    endpoints already checked), with its checksums when they are within ``h.end``."""
    delta = _set_addresses(buf, h, None if src is None else src[0], None if dst is None else dst[0])
    ports = h.l4
    before = int.from_bytes(buf[ports:ports + 4], "big")
    if src is not None:
        _H.pack_into(buf, ports, src[1])
    if dst is not None:
        _H.pack_into(buf, ports + 2, dst[1])
    delta += before - int.from_bytes(buf[ports:ports + 4], "big")
    at = ports + _L4_CHECKSUM_OFFSET[h.protocol]
    if delta and at + 2 <= h.end:
        csum = _H.unpack_from(buf, at)[0]
        if h.protocol == UDP:
            if csum == 0:  # no checksum (RFC 768; RFC 6936 for IPv6 tunnels): nothing to keep right
                return
            csum = (csum + delta) % 0xFFFF or 0xFFFF
        else:
            csum = (csum + delta) % 0xFFFF
        _H.pack_into(buf, at, csum)


def rewrite(data: bytes | bytearray, *, src: Endpoint | None = None, dst: Endpoint | None = None,
            headers: Headers | None = None) -> bytes:
    """A TCP or UDP packet with its source and/or destination address and port replaced.

    IPv4, or IPv6 with the extension headers ``parse`` skips (hop-by-hop, routing without
    segments left, destination options). The IPv4 header checksum and the TCP/UDP
    checksum (pseudo-header included) are updated incrementally. A UDP checksum of 0
    (none; IPv4, or an RFC 6936 IPv6 tunnel) stays 0; a UDP checksum that comes out 0 is
    written as 0xFFFF. Everything else (TTL, TCP options, payload, any bytes after the IP
    length) is untouched. ``headers``: what ``parse`` found (else located here).

    Raises Malformed for anything else: not TCP/UDP, truncated (by the buffer or the IP
    length), a fragment, an IPv6 routing header with segments left, an address of the
    other family. Raises ValueError for a port outside ``0 .. 65535``.
    """
    h = _transport(data, headers, TCP, UDP)
    _check_endpoint(src, h.version)
    _check_endpoint(dst, h.version)
    buf = bytearray(data)
    _translate(buf, h, src, dst)
    return bytes(buf)


# --- ICMP errors ----------------------------------------------------------------------------

def _icmp_error(data: bytes | bytearray, headers: Headers | None) -> tuple[Headers, Headers]:
    """The outer packet and the quoted TCP/UDP packet of an ICMP error, or raise Malformed."""
    outer = _rewritable(data, headers)
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
    inner = _locate(data, outer.l4 + 8, outer.end, quoted=True)
    if inner.version != outer.version:
        raise Malformed("the quoted packet is of the other IP version")
    if inner.protocol not in (TCP, UDP):
        raise Malformed("the quoted packet is not TCP or UDP")
    if inner.l4 + 4 > inner.end:
        raise Malformed("the quote ends before the ports")
    return outer, inner


def icmp_error_inner(data: bytes | bytearray, headers: Headers | None = None) -> FlowKey | None:
    """The flow an ICMP error is about, or None.

    For an ICMP error (ICMPv4 types 3, 4, 11, 12; ICMPv6 types 1-4; not fragmented)
    quoting a TCP or UDP packet of its own IP version with at least the 4 port bytes:
    the quoted packet's FlowKey as the quoted header says it (protocol, src, sport, dst,
    dport), that is, in the direction of the packet that caused the error. None for
    every other packet, including errors that are truncated or quote something else
    (or a non-first fragment). Never raises on garbage.
    """
    try:
        _, inner = _icmp_error(data, headers)
    except Malformed:
        return None
    src, dst = _endpoints(data, inner)
    sport, dport = _PORTS.unpack_from(data, inner.l4)
    return FlowKey(inner.protocol, src, sport, dst, dport)


def rewrite_icmp_error(data: bytes | bytearray, *, outer_src: IPAddress | None = None,
                       outer_dst: IPAddress | None = None, inner_src: Endpoint | None = None,
                       inner_dst: Endpoint | None = None, headers: Headers | None = None) -> bytes:
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
    outer, inner = _icmp_error(data, headers)
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


# --- a filter's edits -----------------------------------------------------------------------

class Segment(NamedTuple):
    """What a stream filter sees of a TCP segment, and where its header is."""

    seq: int
    ack: int | None  # None when the ACK flag is off
    payload: bytes
    syn: bool
    fin: bool
    headers: Headers
    header: int  # the TCP header's length


def parse_segment(data: bytes, headers: Headers | None = None) -> Segment:
    """The TCP segment of a whole IP packet, or Malformed."""
    h = _transport(data, headers, TCP)
    header = (data[h.l4 + 12] >> 4) * 4
    seq, ack = _SEQ_ACK.unpack_from(data, h.l4 + 4)
    flags = data[h.l4 + 13]
    return Segment(seq, ack if flags & TCP_ACK else None, data[h.l4 + header:h.end],
                   bool(flags & TCP_SYN), bool(flags & TCP_FIN), h, header)


def rebuild(data: bytes, segment: Segment, seq: int, ack: int | None, payload: bytes,
            fin: bool) -> bytes:
    """The packet with this seq/ack and payload, its FIN flag off unless ``fin``;
    lengths and checksums right."""
    h = segment.headers
    start = h.l4
    buf = bytearray(data[:start + segment.header])
    old = bytes(buf[start + 4:start + 14])  # sequence, acknowledgement, offset and flags
    _SEQ_ACK.pack_into(buf, start + 4, seq, ack if ack is not None else
                       _SEQ_ACK.unpack_from(buf, start + 4)[1])
    if not fin:
        buf[start + 13] &= ~TCP_FIN & 0xFF
    if payload == segment.payload:
        csum = _H.unpack_from(buf, start + 16)[0]
        _H.pack_into(buf, start + 16, checksum_adjust(csum, old, buf[start + 4:start + 14]))
        return bytes(buf) + payload
    buf += payload
    _write_checksum(buf, _resized(buf, h))
    return bytes(buf)


def udp_payload(data: bytes, headers: Headers | None = None) -> bytes:
    h = _transport(data, headers, UDP)
    return data[h.l4 + 8:h.end]


def rebuild_udp(data: bytes, payload: bytes, headers: Headers | None = None) -> bytes:
    """The datagram with this payload; lengths and checksums right."""
    h = _transport(data, headers, UDP)
    buf = bytearray(data[:h.l4 + 8]) + payload
    _H.pack_into(buf, h.l4 + 4, 8 + len(payload))
    _write_checksum(buf, _resized(buf, h))
    return bytes(buf)


def _resized(buf: bytearray, h: Headers) -> Headers:
    """The IP length field for the packet ``buf`` now is (and IPv4's header checksum); its
    headers as they now are."""
    total = len(buf)
    if h.version == 4:
        ihl = h.l4  # the IPv4 header's length (the packet starts the buffer)
        _H.pack_into(buf, 2, total)
        buf[10:12] = b"\0\0"
        _H.pack_into(buf, 10, _fold(buf[:ihl]))
    else:
        _H.pack_into(buf, 4, total - 40)
    return h._replace(end=total)
