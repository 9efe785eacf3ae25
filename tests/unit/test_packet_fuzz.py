"""ROB-04 in the decision core: a million random and malformed packets, seeded.

Packets are built with ``struct`` from a few templates and varied with
``random.Random(SEED)``, not made with Scapy one by one: IPv4 with options,
fragments (first and later), IPv6 with extension-header chains (hop-by-hop,
routing, destination options, fragment, unknown next headers, long chains),
every TCP flag combination, TCP options, ICMP errors quoting flows, then
truncated, oversized (trailing bytes), with header fields changed (IHL, version,
lengths) or bytes flipped, and plain random bytes; and packets aimed at what the
grants and binds of the moment admit, some of them near misses (another source,
port, protocol, side or entry point). Each goes through ``parse`` and, when it
parses, one of the engine's packet entry points, with a random ingress (an aimed
packet's own, mostly) and a time that moves on (now and then past every timeout).

Checked, over the lab's routed and NAT shapes (half the packets each):

- nothing raises but ``Malformed`` from ``parse`` (which the daemon counts and drops);
- ``parse`` reads exactly the key the generator wrote into a well-formed packet, and
  refuses one whose headers are not all there, a later fragment, an IPv6 fragment
  and a routing header with segments left;
- every admission is justified: a primary the policy allows, a pending permission
  that matches, or an approved bind whose IpFilter includes the peer. That is worked
  out here, from the test's own record of the grants and binds it made and its own
  reading of the policy (``POLICY_DATA``), never by asking the engine;
- a packet the engine admits to a user-mode redirect can be rewritten, as the daemon
  does next (for what the kernel can deliver there: no fragments, lengths right);
- the engine goes on deciding: the grants and binds are made anew every few thousand
  packets, and then primaries and a multiple-use grant must be admitted and what
  policy denies dropped.

``PINHOLE_FUZZ_SEED`` and ``PINHOLE_FUZZ_PACKETS`` change the seed and the count.
"""

from __future__ import annotations

import bisect
import dataclasses
import ipaddress
import itertools
import os
import random
import struct
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from core_policy import INTERNAL, POLICY, POLICY_DATA

from enforcer.core import packet as wire
from enforcer.core.binds import Bind
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.ipfilter import IpFilter
from enforcer.core.packet import (
    ICMP,
    ICMPV6,
    TCP,
    UDP,
    FlowKey,
    Ingress,
    IPAddress,
    Malformed,
    PacketMeta,
    parse,
)
from enforcer.core.state import Decision, Verdict

SEED = int(os.environ.get("PINHOLE_FUZZ_SEED", "20261204"))
PACKETS = int(os.environ.get("PINHOLE_FUZZ_PACKETS", "1000000"))
REFRESH = 4096  # packets between two settings-up of the grants and binds

ip = ipaddress.ip_address
FTP = uuid.UUID(POLICY_DATA["protocol"][0]["guid"])
TIMEOUT = POLICY.defaults.permission_timeout
FW_INTERNAL = {4: ipaddress.ip_interface("192.0.2.1/24"), 6: ipaddress.ip_interface("2001:db8:1::1/64")}
FW_EXTERNAL = {4: [ip("198.51.100.1"), ip("198.51.100.2")], 6: [ip("2001:db8:2::1")]}
HOSTS = {
    4: {"c1": ip("192.0.2.11"), "c2": ip("192.0.2.12"), "c3": ip("192.0.2.77"),
        "s1": ip("198.51.100.21"), "s2": ip("198.51.100.22"), "denied": ip("203.0.113.22")},
    6: {"c1": ip("2001:db8:1::11"), "c2": ip("2001:db8:1::12"), "c3": ip("2001:db8:1::77"),
        "s1": ip("2001:db8:2::21"), "s2": ip("2001:db8:2::22"), "denied": ip("2001:db8:3::22")},
}
KERNEL_REDIRECT_PORTS = (61000, 61063)  # small pools: random packets find their ports
USER_REDIRECT_PORTS = (63000, 63063)
BIND_PORTS = (20000, 20063)
# Ports every packet may be sent to, beside the grants' and binds' of the moment
PORTS = (0, 1, 20, 21, 22, 53, 69, 80, 443, 1080, 20021, 20022, 20053, 30000, 65535)
HEADERS = [0, 43, 60]  # the IPv6 extension headers parse walks over
UNKNOWN_NEXT = [51, 50, 59, 135, 139, 140, 253, 254]  # AH, ESP, no next header, mobility, ...
MALFORMED = "malformed"  # the truth of a packet parse must refuse
T = TypeVar("T")


# --- packets ------------------------------------------------------------------------------------

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_ICMP = struct.Struct("!BBHI")


@dataclass
class Made:
    """A generated packet and what parse must make of it: ``truth`` is (protocol, src,
    sport, dst, dport, TCP flags) as the generator wrote them, MALFORMED, or None when
    anything but an exception will do."""

    data: bytes
    truth: tuple[int, bytes, int, bytes, int, int] | str | None
    need: int = 0  # the bytes parse must have: every header it reads, whole
    deliverable: bool = False  # one the kernel may queue as it is (no fragment, lengths right)
    quote: FlowKey | None = None  # the flow an ICMP error quotes
    kind: str = ""
    aim: Aim | None = None  # what an aimed packet was aimed at


@dataclass(frozen=True)
class Aim:
    """A flow some grant or bind of the moment admits (or, policy, a primary), and the
    entry point and side its first packet reaches the engine by."""

    protocol: int
    src: bytes
    dst: bytes
    dport: int
    entry: str
    ingress: Ingress
    redirect_port: int | None = None


Fields = tuple[int, bytes, bytes, int]  # protocol, src, dst, dport


class Generator:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.random = rng.random
        self.flags = itertools.cycle(range(256))
        self.hot_ports: list[int] = []  # the grants' and binds' ports of the moment
        self.aims: list[Aim] = []
        self.keys: list[FlowKey] = []  # flows for ICMP errors to quote
        self.pools = {v: [a.packed for a in (*HOSTS[v].values(), FW_INTERNAL[v].ip, *FW_EXTERNAL[v])]
                      for v in (4, 6)}
        self.pools[6].append(ip("::ffff:192.0.2.11").packed)
        for v, size in ((4, 4), (6, 16)):
            self.pools[v] += [rng.randbytes(size) for _ in range(8)]
        self.made = {"ipv4": self.ipv4, "ipv6": self.ipv6, "icmp-error": self.icmp_error}
        self.kinds, weights = zip(*(("ipv4", 16), ("ipv6", 16), ("aimed", 16), ("icmp-error", 4),
                                    ("truncated", 18), ("mutated", 18), ("random", 6), ("trailing", 6)),
                                  strict=True)
        self.cumulative = list(itertools.accumulate(weights))

    def pick(self, items: Sequence[T]) -> T:
        """rng.choice, for less (this runs millions of times)."""
        return items[int(self.random() * len(items))]

    def address(self, version: int) -> bytes:
        if self.rng.random() < 0.9:
            return self.pick(self.pools[version])
        return self.rng.randbytes(4 if version == 4 else 16)

    def port(self) -> int:
        r = self.rng.random()
        if r < 0.5 and self.hot_ports:
            return self.pick(self.hot_ports)
        return self.pick(PORTS) if r < 0.8 else self.rng.getrandbits(16)

    def sport(self) -> int:
        return 40000 + self.rng.getrandbits(3) if self.rng.random() < 0.7 else self.rng.getrandbits(16)

    def tcp_flags(self, syn: float) -> int:
        """A bare SYN with probability ``syn``; else every combination in turn, or random ones."""
        r = self.rng.random()
        if r < syn:
            return 0x02
        return next(self.flags) if r < 0.5 + syn / 2 else self.rng.getrandbits(8)

    def transport(self, protocol: int, sport: int, dport: int, syn: float) -> tuple[bytes, int, int, bool]:
        """(header and payload, bytes parse needs of it, TCP flags, whether it has ports)."""
        rng = self.rng
        tail = rng.randbytes(self.pick((0, 0, 1, 7, 40)))
        if protocol == TCP:
            words = self.pick((0, 0, 0, 1, 3, 10))
            flags = self.tcp_flags(syn)
            reserved = rng.getrandbits(4) if rng.random() < 0.1 else 0  # NS and the reserved bits
            header = _TCP.pack(sport, dport, rng.getrandbits(32), rng.getrandbits(32),
                               (5 + words) << 4 | reserved, flags, 65535, 0, 0)
            return header + b"\x01" * (4 * words) + tail, 20 + 4 * words, flags, True
        if protocol == UDP:
            return _UDP.pack(sport, dport, 8 + len(tail), 0) + tail, 8, 0, True
        if protocol in (ICMP, ICMPV6):
            kind = self.pick((8, 0, 128, 129, 3, 1, rng.getrandbits(8)))
            return _ICMP.pack(kind, 0, 0, rng.getrandbits(32)) + tail, 0, 0, False
        return tail, 0, 0, False

    def fields(self, version: int) -> Fields:
        """A protocol (mostly TCP and UDP), two addresses and a destination port."""
        r = self.rng.random()
        if r < 0.45:
            protocol = TCP
        elif r < 0.75:
            protocol = UDP
        elif r < 0.85:
            protocol = ICMP if version == 4 else ICMPV6
        elif version == 6 and r < 0.9:
            protocol = self.pick(UNKNOWN_NEXT)
        else:
            protocol = self.pick((0, 2, 47, 132, 255, self.rng.getrandbits(8)))
            if version == 6 and protocol in (*HEADERS, 44):
                protocol = 253  # an extension header here would not be the transport
        return protocol, self.address(version), self.address(version), self.port()

    def ipv4(self, given: Fields | None = None, syn: float = 0.3) -> Made:
        rng = self.rng
        protocol, src, dst, dport = given or self.fields(4)
        sport = self.sport()
        l4, need, flags, ported = self.transport(protocol, sport, dport, syn)
        words = self.pick((0, 0, 0, 0, 1, 2, 10))
        fragment = 0 if given else self.pick((0, 0, 0, 0x4000, 0x4000, 0x2000, 0x2000 | 185, 1, 0x1FFF))
        total = 20 + 4 * words + len(l4)
        header = _IPV4.pack(0x45 + words, 0, total, rng.getrandbits(16), fragment, 64, protocol, 0,
                            src, dst) + b"\x01" * (4 * words)
        later = fragment & 0x1FFF
        if later and ported:
            return Made(header + l4, MALFORMED, kind="ipv4")
        truth = (protocol, src, sport, dst, dport, flags) if ported else (protocol, src, 0, dst, 0, 0)
        return Made(header + l4, truth, len(header) + (0 if later else need),
                    deliverable=not fragment & 0x3FFF, kind="ipv4")

    def ipv6(self, given: Fields | None = None, syn: float = 0.3) -> Made:
        rng = self.rng
        protocol, src, dst, dport = given or self.fields(6)
        sport = self.sport()
        l4, need, flags, ported = self.transport(protocol, sport, dport, syn)
        chain = [self.pick(HEADERS) for _ in range(self.pick((0, 0, 0, 1, 1, 2, 3, 6, 20)))]
        fragment = not given and rng.random() < 0.08
        if fragment:
            chain.insert(rng.randrange(len(chain) + 1), 44)
        refused = fragment
        extensions = b""
        for at, header in enumerate(chain):
            following = chain[at + 1] if at + 1 < len(chain) else protocol
            if header == 44:
                extensions += struct.pack("!BBHI", following, 0, self.pick((1, 0, 8, 0xFFF8)),
                                          rng.getrandbits(32))
                continue
            length = self.pick((0, 0, 0, 1, 2, 30))
            body = bytearray(rng.randbytes((length + 1) * 8 - 2))
            if header == 43:
                body[0] = self.pick((0, 2, 4))  # routing type
                body[1] = 0 if given or rng.random() < 0.8 else rng.randrange(1, 256)  # segments left
                refused |= body[1] != 0
            extensions += bytes((following, length)) + body
        first = chain[0] if chain else protocol
        data = _IPV6.pack(0x60000000, len(extensions) + len(l4), first, 64, src, dst) + extensions + l4
        if refused:
            return Made(data, MALFORMED, kind="ipv6")
        truth = (protocol, src, sport, dst, dport, flags) if ported else (protocol, src, 0, dst, 0, 0)
        return Made(data, truth, 40 + len(extensions) + need, deliverable=True, kind="ipv6")

    def aimed(self) -> Made:
        """A well-formed packet at what a grant or bind of the moment admits; now and then
        a near miss (another source, port, protocol, side or entry point)."""
        rng = self.rng
        aim = self.pick(self.aims)
        protocol, src, dst, dport = aim.protocol, aim.src, aim.dst, aim.dport
        miss = rng.randrange(16)  # 11 of 16 aim true
        if miss == 0:
            src = self.address(4 if len(src) == 4 else 6)
        elif miss == 1:
            dport = (dport + self.pick((1, -1))) % 65536
        elif miss == 2:
            protocol = UDP if protocol == TCP else TCP
        elif miss == 3:
            other = Ingress.INTERNAL if aim.ingress is Ingress.EXTERNAL else Ingress.EXTERNAL
            aim = dataclasses.replace(aim, ingress=other)
        elif miss == 4:
            aim = dataclasses.replace(aim, entry=self.pick(ENTRIES))
        build = self.ipv4 if len(src) == 4 else self.ipv6
        made = build((protocol, src, dst, dport), syn=0.6)
        made.kind, made.aim = "aimed", aim
        return made

    def icmp_error(self) -> Made:
        """An ICMP error quoting a TCP or UDP packet: a flow the engine admitted, or any."""
        rng = self.rng
        if self.keys and rng.random() < 0.7:
            quoted = self.pick(self.keys)
        else:
            version = self.pick((4, 6))
            quoted = FlowKey(self.pick((TCP, UDP)), ip(self.address(version)), self.sport(),
                             ip(self.address(version)), self.port())
        if rng.random() < 0.5:  # about a packet the other way
            quoted = FlowKey(quoted.protocol, quoted.dst, quoted.dport, quoted.src, quoted.sport)
        ports = struct.pack("!HHI", quoted.sport, quoted.dport, rng.getrandbits(32))
        if quoted.src.version == 4:
            inner = _IPV4.pack(0x45, 0, 1400, 0, 0, 64, quoted.protocol, 0, quoted.src.packed,
                               quoted.dst.packed)
            message = _ICMP.pack(self.pick((3, 11, 12, 4)), rng.getrandbits(4), 0, 0) + inner + ports
            src, dst = self.address(4), quoted.src.packed
            data = _IPV4.pack(0x45, 0, 20 + len(message), 0, 0, 64, ICMP, 0, src, dst) + message
            protocol = ICMP
        else:
            inner = _IPV6.pack(0x60000000, 1400, quoted.protocol, 64, quoted.src.packed,
                               quoted.dst.packed)
            message = _ICMP.pack(self.pick((1, 2, 3, 4)), 0, 0, 1280) + inner + ports
            src, dst = self.address(6), quoted.src.packed
            data = _IPV6.pack(0x60000000, len(message), ICMPV6, 64, src, dst) + message
            protocol = ICMPV6
        return Made(data, (protocol, src, 0, dst, 0, 0), len(data) - len(message), True, quoted,
                    kind="icmp-error")

    def well_formed(self) -> Made:
        return self.made[self.pick(("ipv4", "ipv4", "ipv6", "ipv6", "icmp-error"))]()

    def next(self) -> Made:
        rng = self.rng
        kind = self.kinds[bisect.bisect_right(self.cumulative, rng.randrange(self.cumulative[-1]))]
        if kind == "aimed":
            return self.aimed()
        if kind in self.made:
            return self.made[kind]()
        if kind == "random":
            data = rng.randbytes(rng.randrange(120))
            if data and rng.random() < 0.7:
                data = bytes((self.pick((0x40, 0x60)) | data[0] & 0x0F,)) + data[1:]
            return Made(data, None, kind=kind)
        made = self.well_formed()
        data = bytearray(made.data)
        if kind == "trailing":  # bytes after the IP length: parse ignores them
            return Made(made.data + rng.randbytes(rng.randrange(1, 64)), made.truth,
                        deliverable=made.deliverable, kind=kind)
        if kind == "truncated":
            cut = rng.randrange(len(data))
            del data[cut:]
            lengths_right = rng.random() < 0.5
            if lengths_right and data and data[0] >> 4 == 4 and cut >= 4:
                struct.pack_into("!H", data, 2, cut)
            elif lengths_right and cut >= 6:
                struct.pack_into("!H", data, 4, max(0, cut - 40))
            truth = made.truth
            if isinstance(truth, tuple) and cut < made.need:
                truth = MALFORMED
            return Made(bytes(data), truth, deliverable=made.deliverable and lengths_right
                        and isinstance(truth, tuple), kind=kind)
        # mutated: header fields and bytes changed where parse reads
        for _ in range(rng.randrange(1, 4)):
            what = rng.random()
            if what < 0.2:
                data[0] = (data[0] & 0xF0) | rng.getrandbits(4)  # IHL, or IPv6 traffic class
            elif what < 0.3:
                data[0] = (rng.getrandbits(4) << 4) | (data[0] & 0x0F)  # version
            else:
                at = rng.randrange(min(len(data), max(made.need, 8) + 8))
                data[at] = rng.getrandbits(8)
        return Made(bytes(data), None, kind=kind)


# --- the test's own record of what it granted -------------------------------------------------

NETWORKS = {name: [ipaddress.ip_network(n) for n in nets] for name, nets in
            [(r["name"], r.get("clients", r.get("destinations", [])))
             for r in POLICY_DATA["protocol_rule"] + POLICY_DATA["site_rule"]]}
PROTOCOL_NUMBERS = {"tcp": TCP, "udp": UDP}


def policy_allows(key: FlowKey) -> bool:
    """The lab policy (POLICY_DATA) read here: the first protocol whose primary port this
    is, the first protocol rule that applies to the client, the first site rule that
    covers the destination; no match is a denial."""
    protocol = next((p["name"] for p in POLICY_DATA["protocol"]
                     if PROTOCOL_NUMBERS[p["ip_protocol"]] == key.protocol and key.dport in p["ports"]),
                    None)
    rule = next((r for r in POLICY_DATA["protocol_rule"] if protocol in r["protocols"]
                 and "users" not in r and any(key.src in n for n in NETWORKS[r["name"]])), None)
    site = next((r for r in POLICY_DATA["site_rule"]
                 if any(key.dst in n for n in NETWORKS[r["name"]])), None)
    return rule is not None and rule["action"] == "allow" and site is not None and site["action"] == "allow"


def internal(address: IPAddress) -> bool:
    return any(address in n for networks in INTERNAL.values() for n in networks)


@dataclass
class Grant:
    """A permission the test made: AllowFutureConnect, or one port of RedirectConnections."""

    action: int
    session: int
    protocol: int
    client: IPAddress
    target: IPAddress
    port: int
    multiple: bool = False
    address_based: bool = False
    expires: float | None = None
    internal_port: int | None = None  # a redirect's port on the fw's internal address
    user_mode: bool = False
    open: bool = True


@dataclass
class BindRecord:
    """A bind the test made: a Firewall client's (SOCKS) or one for a SecureNAT client."""

    bind: Bind
    protocol: int
    address: IPAddress
    port: int
    approved: bool
    ranges: list[tuple[IPAddress, IPAddress]] | None  # the IpFilter's; None: any peer
    client: tuple[IPAddress, int] | None = None  # a SecureNAT bind's client and port
    expires: float | None = None
    open: bool = True

    def includes(self, peer: IPAddress) -> bool:
        return self.ranges is None or any(lo.version == peer.version and lo <= peer <= hi
                                          for lo, hi in self.ranges)


class Violation(AssertionError):
    pass


def require(condition: bool, why: str) -> None:
    if not condition:
        raise Violation(why)


@dataclass
class Ledger:
    """What the test granted and bound, and which flows it saw admitted for a reason."""

    grants: dict[int, Grant] = field(default_factory=dict)
    binds: list[BindRecord] = field(default_factory=list)
    securenat: dict[IPAddress, int] = field(default_factory=dict)  # client -> its session
    flows: set[tuple[FlowKey, Ingress]] = field(default_factory=set)  # admitted, from that side
    redirected: set[FlowKey] = field(default_factory=set)  # keys of redirected flows, both sides
    admitted: list[FlowKey] = field(default_factory=list)  # in order, for ICMP errors to quote

    def permits(self, grant: Grant | None, key: FlowKey, now: float) -> None:
        require(grant is not None, "admitted by an action the test never made")
        assert grant is not None
        require(grant.open, f"action {grant.action} is no longer pending")
        require(grant.expires is None or now < grant.expires, f"action {grant.action} has expired")
        require(grant.protocol == key.protocol and grant.client == key.src,
                f"action {grant.action} is for {grant.client}, protocol {grant.protocol}")
        require(grant.address_based or grant.session == self.securenat.get(key.src),
                f"action {grant.action} belongs to session {grant.session}, not {key.src}'s")
        if not grant.multiple:
            grant.open = False

    def approved_bind(self, bind: BindRecord | None, peer: IPAddress, now: float) -> None:
        require(bind is not None, "no bind of the test's leads there")
        assert bind is not None
        require(bind.approved, f"bind {bind.bind.id} is not approved")
        require(bind.expires is None or now < bind.expires, f"bind {bind.bind.id} has expired")
        require(bind.includes(peer), f"{peer} is not in bind {bind.bind.id}'s IpFilter")
        if bind.client is not None:  # a SecureNAT bind takes one flow
            bind.open = False

    def bind_at(self, protocol: int, address: IPAddress, port: int) -> BindRecord | None:
        return next((b for b in self.binds if b.open and (b.protocol, b.address, b.port) ==
                     (protocol, address, port)), None)

    def bind_to(self, protocol: int, client: IPAddress, port: int) -> BindRecord | None:
        return next((b for b in self.binds if b.open and b.protocol == protocol
                     and b.client == (client, port)), None)

    def justify(self, entry: str, meta: PacketMeta, decision: Decision, now: float,
                redirect_port: int | None) -> str:
        """Why an admission is allowed (a reason's name), or raise Violation."""
        key, ingress = meta.key, meta.ingress
        if key.protocol == UDP and (key, ingress) in self.flows:
            return "later datagram"
        require(key.protocol == UDP or (key.protocol == TCP and meta.tcp_flags & 0x17 == 0x02),
                "not a packet that may open a flow")
        grant = None if decision.action_id is None else self.grants.get(decision.action_id)
        if entry == "inbound":  # to one of the fw's own addresses
            self.approved_bind(self.bind_at(key.protocol, key.dst, key.dport), key.src, now)
            why = "bind"
        elif entry == "redirect":  # to a user-mode redirect port
            require(ingress is Ingress.INTERNAL and internal(key.src), "not from the internal side")
            require(grant is not None and grant.user_mode and grant.internal_port == key.dport and
                    FW_INTERNAL[key.src.version].ip == key.dst, "not by a user-mode redirect port")
            self.permits(grant, key, now)
            why = "user-mode redirect"
        elif redirect_port is not None:  # by a kernel-mode redirect's rule
            require(ingress is Ingress.INTERNAL, "not from the internal side")
            require(grant is not None and not grant.user_mode and grant.internal_port == redirect_port
                    and (grant.target, grant.port) == (key.dst, key.dport),
                    "not to the target of the kernel-mode redirect port it came by")
            self.permits(grant, key, now)
            why = "kernel-mode redirect"
        elif ingress is Ingress.EXTERNAL:
            self.approved_bind(self.bind_to(key.protocol, key.dst, key.dport), key.src, now)
            why = "SecureNAT bind"
        else:
            require(internal(key.src), "the source is not internal")
            if decision.action_id is not None:
                require(grant is not None and grant.internal_port is None and
                        (grant.target, grant.port) == (key.dst, key.dport), "not the action's target")
                self.permits(grant, key, now)
                why = "permission"
            else:
                require(policy_allows(key), "a primary the policy does not allow")
                why = "primary"
        self.flows.add((key, ingress))
        self.admitted.append(key)
        if grant is not None and grant.internal_port is not None:
            outbound = FlowKey(key.protocol, key.src, key.sport, grant.target, grant.port)
            self.redirected |= {outbound, key._replace(dst=FW_INTERNAL[key.src.version].ip,
                                                       dport=grant.internal_port)}
            self.flows.add((outbound, ingress))
        return why


# --- the world the packets meet ---------------------------------------------------------------

class World:
    """An engine in the lab's shape, with sessions, pending grants and binds made anew
    (``refresh``) every REFRESH packets, and the test's Ledger of them."""

    def __init__(self, nat_mode: bool, rng: random.Random, generator: Generator) -> None:
        self.engine = Engine(POLICY, INTERNAL, [*FW_EXTERNAL[4], *FW_EXTERNAL[6]], nat=nat_mode,
                             data_filters=["edit"], app_filters={"FTP": "ftp"},
                             internal_addresses=list(FW_INTERNAL.values()),
                             kernel_redirect_ports=KERNEL_REDIRECT_PORTS,
                             user_redirect_ports=USER_REDIRECT_PORTS, bind_ports=BIND_PORTS)
        self.ledger = Ledger()
        self.rng = rng
        self.generator = generator
        self.client_ports = itertools.cycle(range(45000, 45064))
        self.sports = itertools.cycle(range(50000, 60000))
        self.firewall_sessions = {v: self.engine.open_firewall_session(HOSTS[v]["c1"], "alice", 0.0).id
                                  for v in (4, 6)}
        self.multiple: dict[int, Grant] = {}  # per family: an ALLOW_MULTIPLE grant of c1's
        self.aims: list[Aim] = []

    def refresh(self, now: float) -> None:
        """Cancel what is pending, close the Firewall client's binds, and grant and bind
        anew; aim the generator at all of it."""
        engine, ledger = self.engine, self.ledger
        engine.expire(now)
        for perm in engine.pending(None, now):
            engine.cancel(perm.id, now)
        for record in ledger.binds:
            if record.open and record.client is None:
                engine.bind_done(record.bind)  # the SOCKS service's part when a client goes
        ledger.grants.clear()
        ledger.binds = [b for b in ledger.binds if b.client is not None and b.open
                        and b.expires is not None and now < b.expires]
        self.aims = []
        for v in (4, 6):
            h = HOSTS[v]
            for client in ("c1", "c2"):  # primaries: the sessions, and the engine still admits
                key = FlowKey(TCP, h[client], next(self.sports), h["s1"], 21)
                decision = engine.decide(PacketMeta(key, Ingress.INTERNAL, 0x02), now)
                assert decision.verdict is Verdict.ADMIT_USER and decision.session_id is not None, \
                    decision
                ledger.securenat[h[client]] = decision.session_id
                ledger.flows.add((key, Ingress.INTERNAL))
            for protocol, client, server, port in ((TCP, "c1", "s1", 21), (TCP, "c1", "s2", 80),
                                                   (TCP, "c2", "s1", 80), (TCP, "c1", "s1", 22),
                                                   (UDP, "c2", "s2", 53), (TCP, "c1", "denied", 21)):
                self.aim(protocol, h[client], h[server], port, "decide", Ingress.INTERNAL)
            c1, c2, fw = ledger.securenat[h["c1"]], ledger.securenat[h["c2"]], self.firewall_sessions[v]
            self.multiple[v] = self.grant(now, c1, h["c1"], TCP, h["s1"], 20022, Flags.ALLOW_MULTIPLE)
            self.grant(now, c1, h["c1"], TCP, h["s1"], 20021, Flags(0))
            self.grant(now, c1, h["c1"], UDP, h["s2"], 20053, Flags.BIDIRECTIONAL | Flags.TIMEOUT)
            self.grant(now, c1, h["c1"], TCP, h["s2"], 30000, Flags.NO_KERNEL_MODE, data_filter="edit")
            self.grant(now, c2, h["c2"], TCP, h["s1"], 20021, Flags.TIMEOUT)
            self.grant(now, fw, h["c1"], TCP, h["s1"], 30000, Flags.ADDRESS_BASED)
            self.grant(now, fw, h["c1"], TCP, h["s2"], 20022, Flags(0))  # the Firewall client's own
            self.redirect(now, c1, h["c1"], TCP, [(h["s1"], 20021), (h["s2"], 20022)], Flags(0))
            self.redirect(now, c1, h["c1"], UDP, [(h["s1"], 20053)], Flags.NO_KERNEL_MODE)
            self.redirect(now, c2, h["c2"], TCP, [(h["s2"], 30000)], Flags.TIMEOUT, "edit")
            servers = [(h["s1"], h["s1"])]
            ext = FW_EXTERNAL[v][0]
            self.socks_bind(now, fw, TCP, ext, servers)
            self.socks_bind(now, fw, UDP, ext, None)
            self.socks_bind(now, fw, TCP, ext, servers, approve=False)
            self.securenat_bind(now, c1, TCP, [(h["s1"], h["s2"])])
            self.securenat_bind(now, c2, UDP, [])
            self.securenat_bind(now, c1, UDP, None, approve=False)
        for record in ledger.binds:
            if record.client is not None:  # to the client (NAT: after the kernel's DNAT)
                for peer in ("s1", "s2", "c2"):
                    address = HOSTS[record.address.version][peer]
                    self.aim(record.protocol, address, record.client[0], record.client[1], "decide",
                             Ingress.EXTERNAL)
                    self.aim(record.protocol, address, record.address, record.port, "inbound",
                             Ingress.EXTERNAL)
        self.generator.aims = self.aims
        self.generator.hot_ports = sorted({a.dport for a in self.aims} |
                                          {a.redirect_port for a in self.aims if a.redirect_port})

    def aim(self, protocol: int, src: IPAddress, dst: IPAddress, dport: int, entry: str,
            ingress: Ingress, redirect_port: int | None = None) -> None:
        self.aims.append(Aim(protocol, src.packed, dst.packed, dport, entry, ingress, redirect_port))

    def grant(self, now: float, session: int, client: IPAddress, protocol: int, target: IPAddress,
              port: int, flags: Flags, data_filter: str | None = None) -> Grant:
        perm = self.engine.allow_future_connect(session, target, port, protocol, flags, FTP, now,
                                                data_filter=data_filter)
        grant = Grant(perm.id, session, protocol, client, target, port,
                      Flags.ALLOW_MULTIPLE in flags, Flags.ADDRESS_BASED in flags,
                      now + TIMEOUT if Flags.TIMEOUT in flags else None)
        self.ledger.grants[perm.id] = grant
        self.aim(protocol, client, target, port, "decide", Ingress.INTERNAL)
        return grant

    def redirect(self, now: float, session: int, client: IPAddress, protocol: int,
                 targets: list[tuple[IPAddress, int]], flags: Flags, data_filter: str | None = None) -> None:
        (internal, base), perms = self.engine.redirect_connections(session, targets, protocol, flags, FTP,
                                                                   now, data_filter=data_filter)
        user_mode = Flags.NO_KERNEL_MODE in flags or data_filter is not None
        for i, (perm, (target, port)) in enumerate(zip(perms, targets, strict=True)):
            self.ledger.grants[perm.id] = Grant(
                perm.id, session, protocol, client, target, port, Flags.ALLOW_MULTIPLE in flags,
                expires=now + TIMEOUT if Flags.TIMEOUT in flags else None, internal_port=base + i,
                user_mode=user_mode)
            if user_mode:  # to the port on the fw, before the enforcer rewrites it
                self.aim(protocol, client, internal, base + i, "redirect", Ingress.INTERNAL)
            else:  # after the kernel's DNAT, marked with the port it came by
                self.aim(protocol, client, target, port, "kernel-redirect", Ingress.INTERNAL, base + i)

    def socks_bind(self, now: float, session: int, protocol: int, address: IPAddress,
                   ranges: list[tuple[IPAddress, IPAddress]] | None, approve: bool = True) -> None:
        bind = self.engine.bind_for_client(session, protocol, address, now)
        self.ledger.binds.append(BindRecord(bind, protocol, address, bind.port, approve, ranges))
        if approve:
            self.approve(session, bind, ranges, now)
        for peer in ("s1", "s2", "c1"):
            self.aim(protocol, HOSTS[address.version][peer], address, bind.port, "inbound", Ingress.EXTERNAL)

    def securenat_bind(self, now: float, session: int, protocol: int,
                       ranges: list[tuple[IPAddress, IPAddress]] | None, approve: bool = True) -> None:
        bind, _ = self.engine.bind_for_securenat(session, protocol, next(self.client_ports), now)
        assert bind.client is not None and bind.client_port is not None
        self.ledger.binds.append(BindRecord(bind, protocol, bind.address, bind.port, approve, ranges,
                                            (bind.client, bind.client_port), now + TIMEOUT))
        if approve:
            self.approve(session, bind, ranges, now)

    def approve(self, session: int, bind: Bind, ranges: list[tuple[IPAddress, IPAddress]] | None,
                now: float) -> None:
        ipfilter = None
        if ranges is not None:
            ipfilter = IpFilter()
            for low, high in ranges:
                ipfilter.include_range(low, high)
        self.engine.retroactive_allow_bind(session, bind.protocol, bind.address, bind.port, FTP,
                                           Flags(0), ipfilter, now)

    def still_deciding(self, now: float) -> None:
        """What the engine must still do after the packets of a round: admit an allowed
        primary and a multiple-use grant's flow; drop what policy denies."""
        for v in (4, 6):
            h = HOSTS[v]
            expected = [(h["c1"], h["s2"], 21, "primary"), (h["c1"], h["s1"], 20022, "permission"),
                        (h["c2"], h["s1"], 80, None), (h["c1"], h["s1"], 22, None),
                        (h["c1"], h["denied"], 21, None), (h["c3"], h["s1"], 20022, None)]
            for src, dst, port, admitted in expected:
                meta = PacketMeta(FlowKey(TCP, src, next(self.sports), dst, port), Ingress.INTERNAL, 0x02)
                decision = self.engine.decide(meta, now)
                if admitted is None:
                    assert decision.verdict is Verdict.DROP, decision
                    continue
                # FTP primaries run in user mode, for their application filter
                assert decision.verdict is (Verdict.ADMIT_USER if port == 21 else Verdict.ADMIT_KERNEL)
                assert decision.key == meta.key and decision.protocol == "FTP", decision
                if admitted == "permission":
                    assert decision.action_id == self.multiple[v].action, decision
                assert self.ledger.justify("decide", meta, decision, now, None) == admitted


# --- the run ------------------------------------------------------------------------------------

ENTRIES = ("decide", "decide", "decide", "kernel-redirect", "inbound", "inbound", "redirect",
           "redirect", "user", "related")
ADMITS = ("admit-kernel", "admit-user")


class Mismatch(AssertionError):
    """A pure step of the daemon's after the engine's went wrong."""


@dataclass
class Tally:
    kinds: Counter[str] = field(default_factory=Counter)
    malformed: int = 0
    parsed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    flags: set[tuple[str, int]] = field(default_factory=set)  # (entry, TCP flags) that reached it
    quotes: int = 0
    rewrites: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)
        else:
            self.problems[-1] = f"... and more ({text})"


def run(nat_mode: bool, count: int, seed: int) -> Tally:
    rng = random.Random(seed)
    generator = Generator(rng)
    world = World(nat_mode, rng, generator)
    tally = Tally()
    now = 1.0
    world.refresh(now)
    ingresses = (Ingress.INTERNAL, Ingress.EXTERNAL)
    for index in range(count):
        if index and index % REFRESH == 0:
            world.still_deciding(now)
            if rng.random() < 0.25:
                now += TIMEOUT + 1  # past every timeout: what was granted expires
            world.refresh(now)
            generator.keys = world.ledger.admitted[-256:]
        now += rng.expovariate(1000.0)
        made = generator.next()
        tally.kinds[made.kind] += 1
        aim = made.aim
        if aim is not None and rng.random() < 0.8:
            entry, ingress, redirect_port = aim.entry, aim.ingress, aim.redirect_port
        else:
            entry, ingress = ENTRIES[rng.randrange(len(ENTRIES))], ingresses[rng.getrandbits(1)]
            redirect_port = generator.pick(generator.hot_ports)
        try:
            check(entry, ingress, redirect_port, made, now, world, tally)
        except Violation as violation:
            tally.problem(f"{entry} admitted what nothing allows ({violation}): "
                          f"{where(seed, index, made, entry, ingress, now)}")
        except Mismatch as mismatch:
            tally.problem(f"{mismatch}: {where(seed, index, made, entry, ingress, now)}")
        except Exception as exc:
            tally.problem(f"raised {exc!r}: {where(seed, index, made, entry, ingress, now)}")
    world.still_deciding(now)
    return tally


def where(seed: int, index: int, made: Made, entry: str, ingress: Ingress, now: float) -> str:
    return (f"seed {seed}, packet {index} ({made.kind}, to {entry} from the {ingress.value} side, "
            f"now {now:.3f}): {made.data.hex()}")


def check(entry: str, ingress: Ingress, redirect_port: int | None, made: Made, now: float,
          world: World, tally: Tally) -> None:
    """One packet through parse and, if it parses, an entry point of the engine, and what
    the daemon does next where that is pure."""
    try:
        meta = parse(made.data, ingress)
    except Malformed:
        tally.malformed += 1
        if isinstance(made.truth, tuple):
            raise Mismatch("parse refused a well-formed packet") from None
        return
    tally.parsed += 1
    key = meta.key
    if made.truth == MALFORMED:
        raise Mismatch(f"parse read {key} from a packet it must refuse")
    if isinstance(made.truth, tuple) and made.truth != (
            key.protocol, key.src.packed, key.sport, key.dst.packed, key.dport, meta.tcp_flags):
        raise Mismatch(f"parse read {key} flags {meta.tcp_flags}, not {made.truth}")
    if key.protocol == TCP:
        tally.flags.add((entry, meta.tcp_flags))
    engine, ledger, length = world.engine, world.ledger, len(made.data)
    if entry in ("decide", "kernel-redirect", "inbound"):
        if entry == "inbound":
            decision = engine.inbound(meta, now, length)
        else:
            redirect_port = redirect_port if entry == "kernel-redirect" else None
            decision = engine.decide(meta, now, length, redirect_port)
        if decision.verdict is not Verdict.DROP:
            tally.reasons[ledger.justify(entry, meta, decision, now, redirect_port)] += 1
    elif entry == "redirect":
        before = sum(engine.counters[a] for a in ADMITS)
        record = engine.redirect_packet(meta, length, now)
        if record is None:
            return
        if sum(engine.counters[a] for a in ADMITS) > before:
            tally.reasons[ledger.justify(entry, meta, engine.recent[-1], now, None)] += 1
        else:
            require(key in ledger.redirected, "a packet of no redirected flow")
            tally.reasons["redirected flow"] += 1
        if made.deliverable:  # the daemon rewrites it to the redirect's target next
            try:
                wire.rewrite(made.data, dst=(record.key.dst, record.key.dport))
            except Malformed as exc:
                raise Mismatch(f"admitted to a user-mode redirect, and cannot be rewritten: {exc}") from None
            tally.rewrites += 1
    elif entry == "user":
        engine.user_packet(meta, length, now)
    else:
        quoted = wire.icmp_error_inner(made.data)
        if made.quote is not None:
            if quoted != made.quote:
                raise Mismatch(f"icmp_error_inner read {quoted}, not {made.quote}")
            tally.quotes += 1
        engine.related(quoted)


@pytest.mark.parametrize("variant", ["routed", "nat"])
def test_a_million_random_and_malformed_packets(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    count, seed = PACKETS // 2, SEED + (variant == "nat")
    started = time.perf_counter()
    tally = run(variant == "nat", count, seed)
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n{variant}: {count} packets (seed {seed}) in {elapsed:.1f} s: {tally.parsed} parsed, "
              f"{tally.malformed} malformed; admitted: {dict(sorted(tally.reasons.items()))}")
    assert not tally.problems, "\n".join(tally.problems)
    # the generator reached every part it is meant to
    assert set(tally.kinds) == {"ipv4", "ipv6", "aimed", "icmp-error", "truncated", "mutated", "random",
                                "trailing"}
    assert tally.malformed > count // 20 and tally.parsed > count // 2, tally
    every_reason = {"primary", "permission", "kernel-mode redirect", "user-mode redirect", "bind",
                    "SecureNAT bind", "later datagram", "redirected flow"}
    assert set(tally.reasons) == every_reason, tally.reasons
    assert tally.flags == {(e, f) for e in ENTRIES for f in range(256)}, "a TCP flag combination missed"
    assert tally.quotes > 1000 and tally.rewrites > 300, tally
