"""Engine.handle survives any input (ROB-04, at the packet path's one entry point):
whatever bytes, hook, mark, side and lengths a queued packet comes with, the engine
decides it without a bug (``errors`` stays 0: a bug is caught, failed closed and
counted there), and whatever it writes back is an IP packet as long as it says.

Each example starts from an engine holding one of everything a packet can reach (a
primary flow, a kernel-mode and a user-mode grant, a user-mode redirect, a flow through
a length-changing data filter, an approved UDP bind), and queues a few packets: valid
ones for every path, with bytes replaced, cut short or run long, at any hook with any
mark, in any order. Packets are made with Scapy (documentation addresses only)."""

from __future__ import annotations

import ipaddress

from core_policy import GUID, INTERNAL, POLICY, stretch_filter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6, IPv6ExtHdrRouting
from scapy.packet import Raw

from enforcer.core import marks
from enforcer.core.decisions import HOOK_FORWARD, HOOK_INPUT, HOOK_OUTPUT, HOOK_PREROUTING, QueuedPacket
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.packet import TCP as TCP_PROTOCOL
from enforcer.core.packet import UDP as UDP_PROTOCOL
from enforcer.core.packet import Ingress, Malformed, parse

ip = ipaddress.ip_address
C1, S1, FW_INT, EXT = "192.0.2.11", "198.51.100.21", "192.0.2.1", "198.51.100.1"
C6, S6, EXT6 = "2001:db8:1::11", "2001:db8:2::21", "2001:db8:2::1"
FTP = GUID["FTP"]
USER_PORTS = (63000, 63009)
HOOKS = (HOOK_PREROUTING, HOOK_INPUT, HOOK_FORWARD, HOOK_OUTPUT)


class World:
    """An engine holding something on every path, and the packets that reach each."""

    def __init__(self) -> None:
        engine = Engine(POLICY, INTERNAL, [ip(EXT), ip(EXT6)], nat=True, data_filters=["stretch"],
                        internal_addresses=[ipaddress.ip_interface(f"{FW_INT}/24")],
                        user_redirect_ports=USER_PORTS)
        engine.stream_filter = stretch_filter
        self.engine = engine
        user = marks.mark_for(True, False, 0)
        first = self.handle(QueuedPacket(bytes(IP(src=C1, dst=S1) / TCP(sport=1, dport=21, flags="S")),
                                         HOOK_FORWARD, 0, Ingress.INTERNAL, "int0"))
        assert first.accept  # C1's session (1) comes from a primary
        engine.allow_future_connect(1, ip(S1), 20000, TCP_PROTOCOL, Flags(0), FTP, 0.0)
        engine.allow_future_connect(1, ip(S1), 20001, UDP_PROTOCOL, Flags.NO_KERNEL_MODE, FTP, 0.0)
        engine.allow_future_connect(1, ip(S1), 20002, TCP_PROTOCOL, Flags(0), FTP, 0.0,
                                    data_filter="stretch")
        six = self.handle(QueuedPacket(bytes(IPv6(src=C6, dst=S6) / TCP(sport=1, dport=21, flags="S")),
                                       HOOK_FORWARD, 0, Ingress.INTERNAL, "int0"))
        assert six.accept
        session6 = engine.sessions.find(ip(C6))
        assert session6 is not None
        engine.allow_future_connect(session6.id, ip(S6), 20003, UDP_PROTOCOL, Flags.NO_KERNEL_MODE,
                                    FTP, 0.0)
        (_, self.redirect_port), _ = engine.redirect_connections(
            1, [(ip(S1), 8080)], TCP_PROTOCOL, Flags.NO_KERNEL_MODE, FTP, 0.0)
        client = engine.open_firewall_session(ip(C1), "alice", 0.0).id
        bind = engine.bind_for_client(client, UDP_PROTOCOL, ip(EXT), 0.0)
        engine.retroactive_allow_bind(client, UDP_PROTOCOL, ip(EXT), bind.port, FTP, Flags(0), None, 0.0)
        engine.take_effects()
        redirect = self.redirect_port
        out, back = IP(src=C1, dst=S1), IP(src=S1, dst=C1)
        data = b"abcab" * 10
        self.seeds = [
            # new flows, each kind of grant and a primary, both families
            QueuedPacket(bytes(out / TCP(sport=2, dport=20000, flags="S")), HOOK_FORWARD, 0,
                         Ingress.INTERNAL, "int0"),
            QueuedPacket(bytes(out / UDP(sport=3, dport=20001) / Raw(data)), HOOK_FORWARD, 0,
                         Ingress.INTERNAL, "int0"),
            QueuedPacket(bytes(out / TCP(sport=4, dport=20002, flags="S", seq=100)), HOOK_FORWARD,
                         0, Ingress.INTERNAL, "int0"),
            QueuedPacket(bytes(IPv6(src=C6, dst=S6) / TCP(sport=5, dport=21, flags="S")),
                         HOOK_FORWARD, 0, Ingress.INTERNAL, "int0"),
            QueuedPacket(bytes(IPv6(src=C6, dst=S6) / UDP(sport=6, dport=20003) / Raw(data)),
                         HOOK_FORWARD, 0, Ingress.INTERNAL, "int0"),
            QueuedPacket(bytes(IPv6(src=C6, dst=S6) / IPv6ExtHdrRouting() / UDP(sport=6, dport=53)),
                         HOOK_FORWARD, 0, Ingress.INTERNAL, "int0"),
            # the filtered flow's data each way, its checksum complete or partial
            QueuedPacket(bytes(out / TCP(sport=4, dport=20002, flags="PA", seq=101, ack=1) / Raw(data)),
                         HOOK_FORWARD, user, Ingress.INTERNAL, "int0", checksum_ready=False),
            QueuedPacket(bytes(back / TCP(sport=20002, dport=4, flags="PA", seq=1, ack=151) / Raw(data)),
                         HOOK_FORWARD, user, Ingress.EXTERNAL, "ext0"),
            QueuedPacket(bytes(out / TCP(sport=4, dport=20002, flags="FA", seq=151, ack=1)),
                         HOOK_FORWARD, user, Ingress.INTERNAL, "int0", gso=True),
            # the user-mode redirect: the client's SYN and data, the server's reply
            QueuedPacket(bytes(IP(src=C1, dst=FW_INT) / TCP(sport=7, dport=redirect, flags="S", seq=5)),
                         HOOK_PREROUTING, 0, Ingress.INTERNAL, "int0"),
            QueuedPacket(bytes(IP(src=C1, dst=FW_INT) / TCP(sport=7, dport=redirect, flags="A", seq=6)
                               / Raw(data)), HOOK_PREROUTING, 0, Ingress.INTERNAL, "int0", length=9000),
            QueuedPacket(bytes(back / TCP(sport=8080, dport=7, flags="SA", seq=50, ack=6)),
                         HOOK_FORWARD, user, Ingress.EXTERNAL, "ext0"),
            # a datagram to the bind, and ICMP errors about the user-mode flows
            QueuedPacket(bytes(IP(src=S1, dst=EXT) / UDP(sport=9, dport=bind.port) / Raw(data)),
                         HOOK_INPUT, 0, Ingress.EXTERNAL, "ext0"),
            QueuedPacket(bytes(IP(src=FW_INT, dst=C1) / ICMP(type=3, code=4)
                               / bytes(IP(src=C1, dst=S1) / TCP(sport=7, dport=8080))[:28]),
                         HOOK_OUTPUT, 0, Ingress.EXTERNAL, ""),
            QueuedPacket(bytes(IP(src=S1, dst=C1) / ICMP(type=3, code=3)
                               / bytes(IP(src=C1, dst=S1) / UDP(sport=3, dport=20001))),
                         HOOK_FORWARD, user, Ingress.EXTERNAL, "ext0"),
            QueuedPacket(bytes(IPv6(src=S6, dst=C6) / ICMPv6DestUnreach()
                               / IPv6(src=C6, dst=S6) / UDP(sport=6, dport=20003) / Raw(data)),
                         HOOK_FORWARD, user, Ingress.EXTERNAL, "ext0"),
        ]

    def handle(self, queued: QueuedPacket, now: float = 0.0) -> object:
        answer = self.engine.handle(queued, now)
        assert self.engine.counters["errors"] == 0, answer.reason
        if answer.packet is not None:
            # what it writes back is a packet the core reads, as long as its header says
            try:
                parse(answer.packet, queued.ingress, queued.interface)
            except Malformed as exc:
                raise AssertionError(f"it wrote back what it cannot read: {exc}") from None
            # (the kernel trims a packet to its length field before it queues it: a buffer
            # that says otherwise is only the core's to survive)
            if declared_length(queued.data) == len(queued.data):
                assert declared_length(answer.packet) == len(answer.packet)
        return answer


def declared_length(packet: bytes) -> int | None:
    """The length an IP packet's header gives it (None: too short to say)."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        return int.from_bytes(packet[2:4], "big")
    if len(packet) >= 40 and packet[0] >> 4 == 6:
        return 40 + int.from_bytes(packet[4:6], "big")
    return None


# a seed's index, the fields of it that change, bytes replaced (where, by what), where it is cut
Variant = tuple[int, dict[str, object], list[tuple[int, int]], int | None]


@st.composite
def queued_packets(draw: st.DrawFn, seeds: int) -> Variant:
    """Which seed, what about it changes, which of its bytes, and where it is cut."""
    changes: dict[str, object] = {}
    if draw(st.booleans()):
        changes["hook"] = draw(st.sampled_from(HOOKS))
    if draw(st.booleans()):
        changes["mark"] = draw(st.one_of(
            st.sampled_from([0, marks.mark_for(True, False, 0), marks.mark_for(False, False, None),
                             marks.MARK_REWRITTEN, marks.worker_mark(1), 63001]),
            st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        changes["ingress"] = draw(st.sampled_from(list(Ingress)))
        changes["interface"] = draw(st.sampled_from(["", "int0", "ext0", "other"]))
    if draw(st.booleans()):
        changes["length"] = draw(st.one_of(st.none(), st.integers(0, 70000)))
    if draw(st.booleans()):
        changes["checksum_ready"] = draw(st.booleans())
    if draw(st.booleans()):
        changes["gso"] = draw(st.booleans())
    flips = draw(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4))
    cut = draw(st.one_of(st.none(), st.integers(0, 200)))
    return draw(st.integers(0, seeds - 1)), changes, flips, cut


SEEDS = len(World().seeds)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(queued_packets(SEEDS), min_size=1, max_size=6), st.binary(max_size=40))
def test_any_queued_packet_is_decided_without_a_bug(
        packets: list[Variant], tail: bytes) -> None:
    world = World()
    now = 1.0
    # every seed as it is first, so that the flows they make are there to be hit
    for seed in world.seeds:
        world.handle(seed, now)
    for index, changes, flips, cut in packets:
        queued = world.seeds[index]._replace(**changes)  # type: ignore[arg-type]
        data = bytearray(queued.data)
        for at, value in flips:
            if at < len(data):
                data[at] = value
        data = data[:cut] if cut is not None else data + tail
        now += 0.5
        world.handle(queued._replace(data=bytes(data)), now)


def test_every_seed_reaches_the_path_it_is_for() -> None:
    """The seeds are worth mutating: each is accepted as it is, on its own path (a seed
    that was dropped would only test the drop)."""
    world = World()
    for seed in world.seeds:
        answer = world.engine.handle(seed, 1.0)
        assert answer.accept, (seed, answer.reason)
    assert world.engine.counters["errors"] == 0
