"""Seeded random and malformed packets against the lab, and what the lab lets cross.

``Fuzz`` makes the packets (random protocols, every TCP flag combination, fragments,
IPv6 extension headers, truncated headers, bad lengths and header fields), each
numbered in its IPv4 ID or IPv6 flow label; ``Allowed`` says what the lab policy and a
test's grants let open a flow, read from testbed.lab, not asked of the enforcer. Used
by ROB-04's checks and by the hostile-client soak.
"""

from __future__ import annotations

import ipaddress
import random
import re
import struct
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Packet, Raw

from testbed.lab import PORTS
from testbed.plugin import Net

TTL = 77  # a forwarded packet arrives with 76: the fw's own packets never have that


def policy_allows(net: Net, protocol: str, src: str, dst: str, dport: int) -> bool:
    """testbed.lab's policy: FTP, TFTP and DNS for the internal network, HTTP for c1,
    SSH for nobody; the denied network denied, the external network allowed."""
    service = next((name for name, (p, port) in PORTS.items() if (p, port) == (protocol, dport)), None)
    source, destination = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    clients = {"FTP": net.topology.internal_network(net.family), "TFTP": net.topology.internal_network(
        net.family), "DNS": net.topology.internal_network(net.family), "HTTP": net.addr("c1")}
    if service not in clients or source not in ipaddress.ip_network(clients[service]):
        return False
    return (destination in ipaddress.ip_network(net.topology.external_network(net.family))
            and destination not in ipaddress.ip_network(net.topology.denied_network(net.family)))


Flow = tuple[str, str, str, int]  # protocol, client, destination, port


class Allowed:
    """What may cross: a primary the policy allows, or a grant of the test's, opened by
    its first packet from the internal side (a bare SYN, or a datagram)."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.sent: set[Flow] = set()  # the grants' flows as the client sends them
        self.logged: dict[int, Flow] = {}  # action -> its flow as the enforcer logs it

    def grant(self, action: int, sent: Flow, logged: Flow | None = None) -> None:
        """A grant: ``logged`` differs from ``sent`` for a redirect (to its target)."""
        self.sent.add(sent)
        self.logged[action] = logged or sent

    def opens(self, protocol: str, src: str, dst: str, dport: int) -> bool:
        """Whether the policy or a grant lets this flow be opened from the internal side."""
        return policy_allows(self.net, protocol, src, dst, dport) or (protocol, src, dst, dport) in self.sent

    def opened_by(self, data: bytes) -> bool:
        """Whether these bytes, sent from the internal side, are a packet that may open
        such a flow (a bare SYN or a datagram), as Scapy reads them."""
        if not data or data[0] >> 4 not in (4, 6):
            return False
        try:
            pkt = IP(data) if data[0] >> 4 == 4 else IPv6(data)
        except struct.error:  # a fixed header cut short: the kernel drops it as well
            return False
        for layer, protocol in ((TCP, "tcp"), (UDP, "udp")):
            l4 = pkt.getlayer(layer)
            if l4 is not None and (layer is UDP or int(l4.flags) & 0x17 == 0x02):
                return self.opens(protocol, str(pkt.src), str(pkt.dst), int(l4.dport))
        return False

    def decision(self, decision: dict[str, Any]) -> bool:
        """Whether an admission in the decision log is one of these."""
        protocol, src, _, dst, dport = flow_of(decision["flow"])
        if decision["action"] is None:
            return policy_allows(self.net, protocol, src, dst, dport)
        return self.logged.get(decision["action"]) == (protocol, src, dst, dport)


def flow_of(text: str) -> tuple[str, str, int, str, int]:
    """The decision log's "tcp 192.0.2.11:40000 -> [2001:db8:2::21]:21"."""
    m = re.fullmatch(r"(\S+) \[?([0-9a-fA-F.:]+?)\]?:(\d+) -> \[?([0-9a-fA-F.:]+?)\]?:(\d+)", text)
    assert m is not None, text
    return m[1], m[2], int(m[3]), m[4], int(m[5])


# --- the packets --------------------------------------------------------------------------------

def pick(rng: random.Random, weighted: list[tuple[Any, float]]) -> Any:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


class Fuzz:
    """Seeded random and malformed packets from one side of the fw; each packet's number
    goes in its IPv4 ID or IPv6 flow label, so that a copy the fw forwards is known."""

    def __init__(self, net: Net, rng: random.Random, allowed: Allowed, ports: list[int]) -> None:
        self.net, self.rng, self.allowed = net, rng, allowed
        self.v4 = net.family == "ipv4"
        self.ports = [0, 7, 21, 22, 53, 69, 80, 1080, 20000, 61000, 63000, 65535, *ports]
        self.number = rng.randrange(1 << 12)
        a, internal, external = net.addr, "192.0.2.99" if self.v4 else "2001:db8:1::99", \
            "198.51.100.77" if self.v4 else "2001:db8:2::77"
        fw_int, ext0, ext1 = net.fw_internal(), net.fw_external(0), net.fw_external(1)
        self.sides = {
            "internal": ([(a("c1"), 6), (a("c2"), 1), (internal, 1), (a("s1"), 1), (fw_int, 0.5),
                          (a("s2", 1), 0.5)],
                         [(a("s1"), 3), (a("s2"), 1.5), (a("s2", 1), 1), (a("c2"), 0.5), (fw_int, 1.5),
                          (ext0, 1), (ext1, 0.5), (external, 1)]),
            "external": ([(a("s1"), 5), (a("s2"), 1.5), (a("c1"), 1), (ext0, 0.5), (external, 1),
                          (a("s2", 1), 1)],
                         [(a("c1"), 3), (a("c2"), 1.5), (ext0, 2), (ext1, 1), (fw_int, 1), (a("s2"), 0.5),
                          (internal, 1)]),
        }

    def packet(self, side: str) -> bytes:
        """A packet from ``side`` that nothing lets cross (one that would, after all its
        changes, is made again)."""
        while True:
            data = self.attempt(side)
            if side == "external" or not self.allowed.opened_by(data):
                return data

    def attempt(self, side: str) -> bytes:
        rng = self.rng
        sources, destinations = self.sides[side]  # the near misses below save most attempts
        src, dst = pick(rng, sources), pick(rng, destinations)
        dport = rng.choice(self.ports) if rng.random() < 0.8 else rng.randrange(65536)
        sport = rng.randrange(1024, 65536)
        kind = rng.random()
        l4: Packet
        if kind < 0.5:
            flags = rng.randrange(256)
            if flags & 0x17 == 0x02 and side == "internal" and self.allowed.opens("tcp", src, dst, dport):
                flags |= 0x01  # not a packet that may open this flow: a near miss
            options = [("NOP", None)] * rng.choice((0, 0, 1, 4)) + [("MSS", 1460)] * rng.randrange(2)
            l4 = TCP(sport=sport, dport=dport, flags=flags, seq=rng.getrandbits(32), options=options)
        elif kind < 0.75:
            if side == "internal" and self.allowed.opens("udp", src, dst, dport):
                dport = 9
            l4 = UDP(sport=sport, dport=dport)
        elif kind < 0.85:
            l4 = ICMP(type=rng.choice((8, 0, 3, 11, 5, rng.randrange(256)))) if self.v4 else \
                ICMPv6EchoRequest()
        else:
            l4 = Raw(rng.randbytes(rng.randrange(24)))
        payload = Raw(rng.randbytes(rng.choice((0, 4, 32, 300))))
        self.number += 1
        ttl = rng.choice((TTL, TTL, TTL, TTL, 1, 2))
        if self.v4:
            fragment = pick(rng, [((0, 0), 8), ((1, 0), 1), ((0, 100), 1)])  # (MF, offset)
            ip = IP(src=src, dst=dst, id=self.number & 0xFFFF, ttl=ttl, flags=fragment[0],
                    frag=fragment[1])
            if isinstance(l4, Raw):
                ip.proto = rng.choice((0, 2, 47, 132, 255, rng.randrange(256)))
            data = bytes(ip / l4 / payload)
        else:
            ip6: Packet = IPv6(src=src, dst=dst, fl=self.number & 0xFFFFF, hlim=ttl)
            for _ in range(rng.choice((0, 0, 0, 1, 2, 6))):
                ip6 = ip6 / rng.choice((IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(),
                                        IPv6ExtHdrRouting(segleft=rng.choice((0, 0, 1)),
                                                          addresses=[self.net.addr("s2", 1)])))
            if rng.random() < 0.1:
                ip6 = ip6 / IPv6ExtHdrFragment(offset=rng.choice((0, 100)), m=rng.randrange(2),
                                               id=rng.getrandbits(32))
            if isinstance(l4, Raw):
                ip6.lastlayer().nh = rng.choice((59, 47, 132, 253, rng.randrange(256)))
            data = bytes(ip6 / l4 / payload)
        return self.malformed(data) if rng.random() < 0.35 else data

    def malformed(self, data: bytes) -> bytes:
        rng, out = self.rng, bytearray(data)
        what = rng.randrange(6)
        if what == 0:  # truncated
            del out[rng.randrange(1, len(out)):]
        elif what == 1 and self.v4:  # IHL
            out[0] = 0x40 | rng.randrange(16)
        elif what == 2:  # the length field
            at = 2 if self.v4 else 4
            out[at:at + 2] = rng.randrange(65536).to_bytes(2, "big")
        elif what == 3:  # a byte of the transport header
            at = rng.randrange(20 if self.v4 else 40, min(len(out), 80)) if len(out) > 41 else 0
            out[at] = rng.getrandbits(8)
        elif what == 4:  # bytes after the end
            out += rng.randbytes(rng.randrange(1, 40))
        else:  # the version
            out[0] = (rng.randrange(16) << 4) | (out[0] & 0x0F)
        return bytes(out)
