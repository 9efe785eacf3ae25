"""Engine.handle, the packet path's one entry point: each path a queued packet can take
(a new flow, a user-mode flow's packet each way, a user-mode redirect, a flow to a
Firewall client's bind, an ICMP error about a user-mode flow), from bytes, hook and
mark to the verdict, the mark, the rewritten bytes and the effects, without root.
Packets are made with Scapy (documentation addresses only); rewritten ones are read
back with it, checksums included."""

from __future__ import annotations

import ipaddress

import pytest
from core_policy import GUID, INTERNAL, POLICY, stretch_filter
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw

from enforcer.core import marks
from enforcer.core.datafilter import Direction, FilterFailed
from enforcer.core.decisions import (
    HOOK_FORWARD,
    HOOK_INPUT,
    HOOK_OUTPUT,
    HOOK_PREROUTING,
    QueuedPacket,
)
from enforcer.core.effects import AddRedirect, EstablishedConnection, RemoveRedirect
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.flows import FAILED_KEPT, RELEASE_MARGIN, FlowRecord, Lifetime
from enforcer.core.packet import TCP as TCP_PROTOCOL
from enforcer.core.packet import UDP as UDP_PROTOCOL
from enforcer.core.packet import FlowKey, Ingress, segments_checksum

ip = ipaddress.ip_address
C1, S1, FW_INT, EXT = "192.0.2.11", "198.51.100.21", "192.0.2.1", "198.51.100.1"
FTP = GUID["FTP"]
USER_PORTS = (63000, 63009)


def make_engine(*, nat: bool = True) -> Engine:
    engine = Engine(POLICY, INTERNAL, [ip(EXT)], nat=nat, data_filters=["upper"],
                    internal_addresses=[ipaddress.ip_interface(f"{FW_INT}/24")],
                    user_redirect_ports=USER_PORTS)
    answer = engine.handle(inside(IP(src=C1, dst=S1) / TCP(sport=1, dport=21, flags="S")), 0.0)
    assert answer.accept  # C1's session (1) comes from a primary
    return engine


def inside(pkt: Packet, hook: int = HOOK_FORWARD, mark: int = 0, *,
           checksum_ready: bool = True) -> QueuedPacket:
    return QueuedPacket(bytes(pkt), hook, mark, Ingress.INTERNAL, "int0",
                        checksum_ready=checksum_ready)


def outside(pkt: Packet, hook: int = HOOK_FORWARD, mark: int = 0) -> QueuedPacket:
    return QueuedPacket(bytes(pkt), hook, mark, Ingress.EXTERNAL, "ext0")


def reread(data: bytes | None) -> Packet:
    """The rewritten bytes as Scapy reads them, after checking every checksum in them
    is what Scapy would compute."""
    assert data is not None
    parsed = IP(data)
    for layer in (IP, TCP, UDP, ICMP):
        if layer in parsed:
            written = parsed[layer].chksum
            fresh = parsed.copy()
            del fresh[layer].chksum
            assert IP(bytes(fresh))[layer].chksum == written, f"{layer.__name__} checksum"
    return parsed


def test_a_new_flow_s_first_packet_is_admitted_with_its_mode_in_the_mark() -> None:
    engine = make_engine()
    perm = engine.allow_future_connect(1, ip(S1), 20021, TCP_PROTOCOL, Flags(0), FTP, 1.0)
    answer = engine.handle(inside(IP(src=C1, dst=S1) / TCP(sport=2, dport=20021, flags="S"),
                                  mark=0x00100000), 1.0)
    assert answer.accept and answer.packet is None and answer.effects == ()
    # kernel mode, leaving from external address 0; a bit that is not the enforcer's stays
    assert answer.mark == 0x00100000 | marks.mark_for(False, False, 0)
    assert f"action {perm.id}" in answer.reason
    again = engine.handle(inside(IP(src=C1, dst=S1) / TCP(sport=3, dport=20021, flags="S")), 1.0)
    assert not again.accept and again.mark is None  # single use


def test_what_it_cannot_read_or_decide_is_dropped_and_counted() -> None:
    engine = make_engine()
    assert not engine.handle(QueuedPacket(b"\x45\x00"), 1.0).accept
    assert engine.counters["malformed"] == 1
    engine.decide = None  # type: ignore[assignment,method-assign]  # a bug
    failed = engine.handle(inside(IP(src=C1, dst=S1) / TCP(sport=2, dport=21, flags="S")), 1.0)
    assert not failed.accept and "failed to decide" in failed.reason
    assert engine.counters["errors"] == 1


def test_a_spoofed_source_is_dropped_before_anything_is_looked_up() -> None:
    engine = make_engine()
    engine.allow_future_connect(1, ip(S1), 20021, TCP_PROTOCOL, Flags(0), FTP, 1.0)
    spoofed = engine.handle(outside(IP(src=C1, dst=S1) / TCP(sport=2, dport=20021, flags="S")), 1.0)
    assert not spoofed.accept and engine.counters["dropped: source not behind its interface"] == 1
    assert len(engine.permissions) == 1  # not used


def user_redirect(engine: Engine) -> int:
    (_, base), _ = engine.redirect_connections(1, [(ip(S1), 8080)], TCP_PROTOCOL,
                                                Flags.NO_KERNEL_MODE, FTP, 1.0)
    assert engine.take_effects() == []  # user mode: no kernel NAT
    return base


@pytest.mark.parametrize("checksum_ready", [True, False], ids=["complete", "partial-checksum"])
def test_a_user_mode_redirect_is_rewritten_both_ways(checksum_ready: bool) -> None:
    engine = make_engine()
    port = user_redirect(engine)
    syn = IP(src=C1, dst=FW_INT) / TCP(sport=4000, dport=port, flags="S", seq=10)
    data = bytes(syn)
    if not checksum_ready:  # as a local sender's offloaded packet arrives: pseudo-header only
        data = data[:36] + b"\x12\x34" + data[38:]
    answer = engine.handle(QueuedPacket(data, HOOK_PREROUTING, 0, Ingress.INTERNAL, "int0",
                                        checksum_ready=checksum_ready), 1.0)
    assert answer.accept
    assert answer.mark == marks.MARK_REWRITTEN | marks.mark_for(True, False, 0)
    out = reread(answer.packet)
    assert (out.dst, out[TCP].dport, out.src, out[TCP].sport) == (S1, 8080, C1, 4000)
    # the server's reply (after the kernel's NAT back to C1) leaves from the redirect port
    reply = IP(src=S1, dst=C1) / TCP(sport=8080, dport=4000, flags="SA", seq=99, ack=11)
    back = engine.handle(outside(reply, mark=marks.mark_for(True, False, 0)), 1.2)
    assert back.accept and back.mark is None
    seen = reread(back.packet)
    assert (seen.src, seen[TCP].sport, seen[TCP].seq) == (FW_INT, port, 99)
    # the client's later packets come by the redirect; one to the target itself does not pass
    direct = IP(src=C1, dst=S1) / TCP(sport=4000, dport=8080, flags="A", seq=11, ack=100)
    refused = engine.handle(inside(direct, mark=marks.mark_for(True, False, 0)), 1.3)
    assert not refused.accept and engine.counters["dropped: not by the redirect"] == 1


def test_a_redirect_s_packet_cut_short_is_dropped_as_unreadable() -> None:
    """A copy shorter than its packet cannot be rewritten: dropped and counted as
    malformed, not as a failure of the engine (``errors``: a bug)."""
    engine = make_engine()
    port = user_redirect(engine)
    syn = bytes(IP(src=C1, dst=FW_INT) / TCP(sport=4000, dport=port, flags="S") / Raw(b"x" * 100))
    answer = engine.handle(QueuedPacket(syn[:40], HOOK_PREROUTING, 0, Ingress.INTERNAL, "int0",
                                        length=len(syn)), 1.0)
    assert not answer.accept and answer.reason.startswith("malformed: ")
    assert (engine.counters["malformed"], engine.counters["errors"]) == (1, 0)


def test_an_icmp_error_about_a_redirected_flow_comes_from_the_redirect() -> None:
    engine = make_engine()
    port = user_redirect(engine)
    engine.handle(QueuedPacket(bytes(IP(src=C1, dst=FW_INT) / TCP(sport=4000, dport=port, flags="S")),
                               HOOK_PREROUTING, 0, Ingress.INTERNAL, "int0"), 1.0)
    quoted = IP(src=C1, dst=S1) / TCP(sport=4000, dport=8080, flags="S")
    error = IP(src=FW_INT, dst=C1) / ICMP(type=3, code=4) / bytes(quoted)[:28]
    answer = engine.handle(QueuedPacket(bytes(error), HOOK_OUTPUT, 0, Ingress.EXTERNAL, ""), 1.1)
    assert answer.accept
    out = reread(answer.packet)
    assert out.src == FW_INT and out[ICMP].payload.dst == FW_INT  # the quote: what C1 sent
    unknown = IP(src=FW_INT, dst=C1) / ICMP(type=3, code=4) / bytes(
        IP(src=C1, dst=S1) / TCP(sport=4999, dport=8080))[:28]
    assert not engine.handle(QueuedPacket(bytes(unknown), HOOK_OUTPUT), 1.1).accept
    assert engine.counters["dropped: unknown user-mode flow"] == 1


class Upper:
    """A data filter: what the client sends, in capitals."""

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        return data.upper() if direction is Direction.OUT else data


def test_a_filtered_flow_s_payload_and_sequence_numbers_are_rewritten() -> None:
    engine = make_engine(nat=False)
    made: list[FlowRecord] = []

    def stream_filter(record: FlowRecord) -> Upper:
        made.append(record)
        return Upper()

    engine.stream_filter = stream_filter
    engine.allow_future_connect(1, ip(S1), 2000, TCP_PROTOCOL, Flags(0), FTP, 1.0, data_filter="upper")
    user = marks.mark_for(True, False, None)
    first = engine.handle(inside(IP(src=C1, dst=S1) / TCP(sport=5, dport=2000, flags="S", seq=0)), 1.0)
    assert first.accept and first.mark == user
    segment = IP(src=C1, dst=S1) / TCP(sport=5, dport=2000, flags="PA", seq=1, ack=1) / Raw(b"hello")
    answer = engine.handle(inside(segment, mark=user, checksum_ready=False), 1.1)
    assert answer.accept and len(made) == 1
    assert bytes(reread(answer.packet)[TCP].payload) == b"HELLO"
    # a segment after bytes that have not come: the filter sees the stream in order
    ahead = IP(src=C1, dst=S1) / TCP(sport=5, dport=2000, flags="PA", seq=50, ack=1) / Raw(b"later")
    dropped = engine.handle(inside(ahead, mark=user), 1.2)
    assert not dropped.accept and dropped.reason == "ahead of a gap in the filtered stream"


def test_data_in_a_filtered_flow_s_syn_never_passes_unfiltered() -> None:
    """A SYN that carries data (TCP Fast Open) leaves without it; the filter sees the
    stream from its first byte, which the client sends again after the handshake."""
    engine = make_engine(nat=False)
    seen: list[bytes] = []

    class Spy(Upper):
        def on_data(self, direction: Direction, data: bytes) -> bytes:
            seen.append(data)
            return super().on_data(direction, data)

    engine.stream_filter = lambda record: Spy()
    engine.allow_future_connect(1, ip(S1), 2000, TCP_PROTOCOL, Flags(0), FTP, 1.0, data_filter="upper")
    user = marks.mark_for(True, False, None)
    syn = IP(src=C1, dst=S1) / TCP(sport=5, dport=2000, flags="S", seq=0) / Raw(b"secret")
    first = engine.handle(inside(syn, checksum_ready=False), 1.0)
    assert first.accept and first.mark == user
    out = reread(first.packet)
    assert out[TCP].flags == "S" and out[TCP].seq == 0 and not bytes(out[TCP].payload), out.show(dump=True)
    assert seen == []
    again = IP(src=C1, dst=S1) / TCP(sport=5, dport=2000, flags="PA", seq=1, ack=1) / Raw(b"secret")
    answer = engine.handle(inside(again, mark=user), 1.1)
    assert answer.accept and bytes(reread(answer.packet)[TCP].payload) == b"SECRET"
    assert seen == [b"secret"]


def test_a_user_mode_redirect_s_stream_goes_through_its_data_filter() -> None:
    """Each of the client's packets to the redirect port is rewritten to the target and
    then filtered (the SYN starts the flow's stream editor); a segment ahead of a gap is
    dropped there too."""
    engine = make_engine()
    engine.stream_filter = lambda record: Upper()
    (_, port), _ = engine.redirect_connections(1, [(ip(S1), 8080)], TCP_PROTOCOL, Flags.NO_KERNEL_MODE,
                                               FTP, 1.0, data_filter="upper")

    def to_port(flags: str, seq: int, payload: bytes = b"") -> QueuedPacket:
        pkt = IP(src=C1, dst=FW_INT) / TCP(sport=4000, dport=port, flags=flags, seq=seq, ack=1)
        return QueuedPacket(bytes(pkt / Raw(payload) if payload else pkt), HOOK_PREROUTING, 0,
                            Ingress.INTERNAL, "int0", checksum_ready=False)

    syn = engine.handle(to_port("S", 10), 1.0)
    assert syn.accept and reread(syn.packet)[TCP].dport == 8080
    data = engine.handle(to_port("PA", 11, b"hello"), 1.1)
    out = reread(data.packet)
    assert data.accept and (out.dst, out[TCP].dport, bytes(out[TCP].payload)) == (S1, 8080, b"HELLO")
    ahead = engine.handle(to_port("PA", 60, b"later"), 1.2)
    assert not ahead.accept and ahead.reason == "ahead of a gap in the filtered stream"


@pytest.mark.parametrize("filtered", [True, False], ids=["filter", "no-filter-made"])
def test_a_udp_primary_s_datagrams_go_through_its_application_filter(filtered: bool) -> None:
    """A UDP primary watched by an application filter runs in user mode, and its filter
    sees every datagram from the first (which carries data as any other), each way, and
    may change its length. With no stream filter made by the shell, none runs: they pass
    as they are."""
    engine = Engine(POLICY, INTERNAL, [ip(EXT)], app_filters={"DNS": "dns"})
    if filtered:
        engine.stream_filter = stretch_filter  # each "a" out becomes two; each "b" back goes
    first = engine.handle(inside(IP(src=C1, dst=S1) / UDP(sport=5300, dport=53) / Raw(b"data")), 1.0)
    user = marks.mark_for(True, False, None)
    assert first.accept and first.mark == user
    reply = engine.handle(outside(IP(src=S1, dst=C1) / UDP(sport=53, dport=5300) / Raw(b"bob"),
                                  mark=user), 1.1)
    assert reply.accept
    if not filtered:
        assert first.packet is None and reply.packet is None
        return
    assert bytes(reread(first.packet)[UDP].payload) == b"daataa"
    back = reread(reply.packet)
    assert (bytes(back[UDP].payload), back[UDP].len, back.len) == (b"o", 9, 29)
    again = engine.handle(inside(IP(src=C1, dst=S1) / UDP(sport=5300, dport=53) / Raw(b"xyz"),
                                 mark=user), 1.2)
    assert again.accept and again.packet is None  # the filter left it as it was


def test_a_flow_to_a_firewall_client_s_udp_bind_keeps_its_port_in_the_mark() -> None:
    engine = make_engine()
    session = engine.open_firewall_session(ip(C1), "alice", 1.0).id
    bind = engine.bind_for_client(session, UDP_PROTOCOL, ip(EXT), 1.0)
    datagram = IP(src=S1, dst=EXT) / UDP(sport=53000, dport=bind.port) / Raw(b"x")
    early = engine.handle(outside(datagram, HOOK_INPUT), 1.0)
    assert not early.accept and "not approved" in early.reason
    engine.retroactive_allow_bind(session, UDP_PROTOCOL, ip(EXT), bind.port, FTP, Flags(0), None, 1.0)
    admitted = engine.handle(outside(datagram, HOOK_INPUT, mark=0x00100000), 1.1)
    assert admitted.accept and admitted.mark == 0x00100000 | marks.local_mark(bind.port)


def test_a_packet_s_effects_come_with_its_answer_in_order() -> None:
    engine = make_engine()
    perm = engine.allow_future_connect(1, ip(S1), 20021, TCP_PROTOCOL, Flags(0), FTP, 1.0,
                                       filter_id=7, context="c")
    (_, base), (redirect,) = engine.redirect_connections(1, [(ip(S1), 8080)], TCP_PROTOCOL,
                                                          Flags(0), FTP, 1.0)
    assert engine.take_effects() == [AddRedirect(redirect)]  # kernel NAT before the call returns
    answer = engine.handle(inside(IP(src=C1, dst=S1) / TCP(sport=2, dport=20021, flags="S")), 1.0)
    (event,) = answer.effects
    assert isinstance(event, EstablishedConnection) and (event.filter_id, event.action_id) == (7, perm.id)
    # the kernel's redirect rule sent the next one on to its target, marked with its port
    redirected = engine.handle(inside(IP(src=C1, dst=S1) / TCP(sport=3, dport=8080, flags="S"),
                                      mark=base), 1.1)
    assert redirected.accept and redirected.effects == (RemoveRedirect(redirect),)  # used up


def test_ipv6_takes_the_same_path() -> None:
    engine = Engine(POLICY, INTERNAL, [ip("2001:db8:2::1")])
    c6, s6 = "2001:db8:1::11", "2001:db8:2::21"
    first = engine.handle(QueuedPacket(bytes(IPv6(src=c6, dst=s6) / TCP(sport=1, dport=21, flags="S")),
                                       HOOK_FORWARD, 0, Ingress.INTERNAL, "int0"), 0.0)
    assert first.accept and first.mark == marks.mark_for(False, False, None)


def test_a_udp_gso_packet_s_checksum_field_is_what_its_segments_start_from() -> None:
    """The kernel makes a UDP GSO packet's segments after the verdict, adding each one's
    data to the field: it must hold the pseudo-header's sum, so that the whole comes to
    the checksum a stack would write."""
    datagram = IP(src=C1, dst=S1) / UDP(sport=1, dport=2) / Raw(b"x" * 2999)
    out = segments_checksum(bytes(datagram))
    field = int.from_bytes(out[26:28], "big")
    segment = bytearray(out[20:])
    segment[6:8] = b"\0\0"
    total = field + (int.from_bytes(segment, "big") << 8)  # odd length: padded
    assert (-total % 0xFFFF or 0xFFFF) == IP(bytes(datagram))[UDP].chksum
    tcp = bytes(IP(src=C1, dst=S1) / TCP(sport=1, dport=2))
    assert segments_checksum(tcp) == tcp  # TCP segments are summed anew


class FailsOnSecret:
    """A data filter that raises when the client sends b"secret"."""

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        if b"secret" in data:
            raise FilterFailed("a filter's bug")
        return data


def test_a_flow_whose_filter_fails_ends_and_never_passes_unfiltered() -> None:
    """Rule 18: a filtered flow keeps its filter. When the filter fails, the segment it
    failed on and every later packet of the flow, either way, are dropped (and counted);
    the flow's buffered bytes go back to its client's budget."""
    engine = make_engine(nat=False)
    engine.stream_filter = lambda record: FailsOnSecret()
    engine.allow_future_connect(1, ip(S1), 2000, TCP_PROTOCOL, Flags(0), FTP, 1.0, data_filter="upper")
    user = marks.mark_for(True, False, None)

    def out(seq: int, payload: bytes, flags: str = "PA") -> QueuedPacket:
        return inside(IP(src=C1, dst=S1) / TCP(sport=6, dport=2000, flags=flags, seq=seq, ack=1)
                      / Raw(payload), mark=user)

    assert engine.handle(inside(IP(src=C1, dst=S1) / TCP(sport=6, dport=2000, flags="S", seq=0)),
                         1.0).accept
    assert engine.handle(out(1, b"fine"), 1.1).accept
    record = engine.flows.get(FlowKey(TCP_PROTOCOL, ip(C1), 6, ip(S1), 2000))
    assert record is not None and record.editor is not None and record.editor.held > 0
    failed = engine.handle(out(5, b"secret"), 1.2)
    assert not failed.accept and failed.reason == "its flow's filter failed: the flow ends"
    assert record.filter_failed and record.editor is None
    assert record.held_as is Lifetime.FILTER_FAILED  # (if no packet of it came again)
    assert engine.buffered.of(ip(C1)).used == 0
    later = [engine.handle(out(5, b"secret"), 1.3),  # the same segment again
             engine.handle(out(11, b"harmless"), 1.4),
             engine.handle(outside(IP(src=S1, dst=C1) / TCP(sport=2000, dport=6, flags="A", seq=1,
                                                            ack=5), mark=user), 1.5),
             engine.handle(out(11, b"", flags="F"), 1.6)]
    assert [a.accept for a in later] == [False] * 4
    assert all(a.reason == "of a flow whose filter failed" for a in later)
    assert engine.counters["filters failed: flows ended"] == 1
    assert engine.counters["dropped: its flow's filter failed"] == 5
    # It holds nothing: once silent a little while, its record (and its place in the
    # client's user-mode flow caps) goes, not after conntrack's days; its packets still drop
    assert engine.flows.held_count == 1
    engine.expire(1.6 + FAILED_KEPT + RELEASE_MARGIN - 0.1)
    assert engine.flows.held_count == 1
    engine.expire(1.6 + FAILED_KEPT + RELEASE_MARGIN + 0.1)
    assert engine.flows.held_count == 0 and engine.flows.get(record.key) is None
    after = engine.handle(out(11, b"harmless"), 20.0)
    assert not after.accept and after.reason == "of no user-mode flow the enforcer holds"


def test_a_udp_flow_whose_filter_fails_on_its_first_datagram_sends_nothing() -> None:
    engine = Engine(POLICY, INTERNAL, [ip(EXT)], app_filters={"DNS": "dns"})
    engine.stream_filter = lambda record: FailsOnSecret()
    first = engine.handle(inside(IP(src=C1, dst=S1) / UDP(sport=5301, dport=53) / Raw(b"secret")), 1.0)
    assert not first.accept and first.reason == "its flow's filter failed: the flow ends"
    user = marks.mark_for(True, False, None)
    reply = engine.handle(outside(IP(src=S1, dst=C1) / UDP(sport=53, dport=5301) / Raw(b"x"),
                                  mark=user), 1.1)
    assert not reply.accept and reply.reason == "of a flow whose filter failed"
