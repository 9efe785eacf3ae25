"""What the decision core needs to know about a packet, and how to get it from bytes.

Only the flow key and the TCP flags are read, and only from a packet whose headers
are all there: every header up to the transport one, and that one whole (TCP
options included). This is deliberately a few ``struct`` reads rather than a
general dissector: it runs for every queued packet, where Scapy's dissection
would cost a hundred times more.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58
PROTOCOL_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMPV6: "icmpv6"}

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

# IPv6 extension headers that may stand between the fixed header and TCP/UDP.
_IPV6_EXTENSIONS = {0, 43, 60}
_IPV6_ROUTING = 43


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


class PacketMeta(NamedTuple):
    key: FlowKey
    ingress: Ingress
    tcp_flags: int = 0
    # The interface the packet arrived on (SPEC rule 17 judges its source by it); "" for
    # the fw's own packets, which arrived on none.
    interface: str = ""

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


def _address(raw: bytes) -> IPAddress:
    """The address object for 4 or 16 raw bytes; the same few addresses recur in every
    packet of a flow, and building ipaddress objects is most of what parsing costs."""
    found = _addresses.get(raw)
    if found is None:
        if len(_addresses) >= ADDRESS_CACHE_SIZE:
            _addresses.clear()
        found = _addresses[raw] = (ipaddress.IPv4Address(raw) if len(raw) == 4
                                   else ipaddress.IPv6Address(raw))
    return found


def parse(data: bytes, ingress: Ingress, interface: str = "") -> PacketMeta:
    """Read the flow key of an IPv4 or IPv6 packet that arrived on ``interface`` on the
    ``ingress`` side; raise Malformed otherwise."""
    if not data:
        raise Malformed("empty packet")
    version = data[0] >> 4
    if version == 4:
        if len(data) < 20:
            raise Malformed("truncated IPv4 header")
        ihl = (data[0] & 0x0F) * 4
        if ihl < 20 or len(data) < ihl:
            raise Malformed("bad IPv4 header length")
        protocol = data[9]
        src = _address(data[12:16])
        dst = _address(data[16:20])
        fragment_offset = struct.unpack_from("!H", data, 6)[0] & 0x1FFF
        offset = ihl if fragment_offset == 0 else -1
    elif version == 6:
        if len(data) < 40:
            raise Malformed("truncated IPv6 header")
        protocol = data[6]
        src = _address(data[8:24])
        dst = _address(data[24:40])
        offset = 40
        while protocol in _IPV6_EXTENSIONS:
            if len(data) < offset + 8:
                raise Malformed("truncated IPv6 extension header")
            if protocol == _IPV6_ROUTING and data[offset + 3]:
                # The destination is a waypoint: policy would judge the wrong address.
                raise Malformed("IPv6 routing header with segments left")
            protocol = data[offset]
            offset += (data[offset + 1] + 1) * 8
        if len(data) < offset:
            raise Malformed("truncated IPv6 extension header")
        if protocol == 44:  # a fragment: ports are not in this packet
            raise Malformed("IPv6 fragment")
    else:
        raise Malformed(f"IP version {version}")

    sport = dport = flags = 0
    if protocol in (TCP, UDP):
        if offset < 0:
            raise Malformed("non-first fragment")
        if len(data) < offset + (20 if protocol == TCP else 8):
            raise Malformed(f"truncated {PROTOCOL_NAMES[protocol]} header")
        sport, dport = struct.unpack_from("!HH", data, offset)
        if protocol == TCP:
            # what conntrack calls invalid, and what a rewrite could not handle
            header = (data[offset + 12] >> 4) * 4
            if header < 20 or len(data) < offset + header:
                raise Malformed("bad TCP header length")
            flags = data[offset + 13]
    return PacketMeta(FlowKey(protocol, src, sport, dst, dport), ingress, flags, interface)
