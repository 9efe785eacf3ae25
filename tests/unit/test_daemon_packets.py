"""The daemon's turn at the queue, with a stand-in for the queue: an error in a packet's
effects must not escape into the loop (ROB-04); the marks its
verdicts set on flows to binds (RAB-06), the buffers INCREASE_RECEIVE_BUFFER grows
(RAB-07), what it removes from the kernel when a bind closes, and the NAT a SecureNAT
bind's flow gets (APP-FTP-03)."""

from __future__ import annotations

import gc
import ipaddress
import json
import signal
import socket
import sys
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from core_policy import GUID, INTERNAL, POLICY
from scapy.layers.inet import IP, TCP, UDP

from enforcer import dataplane, filters, workers
from enforcer.api import SessionApi
from enforcer.config import Config, DataplaneSettings, NetworkSettings
from enforcer.control import Caller
from enforcer.core import marks
from enforcer.core.binds import Bind
from enforcer.core.datafilter import Direction, FilterFailed
from enforcer.core.decisions import HOOK_INPUT, HOOK_PREROUTING
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.flows import FlowRecord, Mode
from enforcer.core.packet import TCP as TCP_PROTOCOL
from enforcer.core.packet import UDP as UDP_PROTOCOL
from enforcer.core.packet import FlowKey, IPAddress
from enforcer.core.results import IsBusy
from enforcer.daemon import (
    KERNEL_TIMER_MS,
    Arrivals,
    Daemon,
    StartupError,
    load_data_filters,
    settle_heap,
)
from enforcer.dataplane import SO_RCVBUFFORCE, Interfaces
from enforcer.loop import Loop
from enforcer.nfqueue import Packet
from enforcer.protocol import encode

C1, S1, EXT = "192.0.2.11", "198.51.100.21", "198.51.100.1"
INTERNAL_IF = 3  # the ifindex packets from the clients arrive on
EXTERNAL_IF = 4
HOOK_FORWARD = 2
DNS = GUID["DNS"]
INCREASED = 300_000


class QueuedPacket:
    """A packet for the queue, and what the daemon did with it: its verdicts, its mark."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.indev, self.hook, self.mark = INTERNAL_IF, HOOK_FORWARD, 0
        self.verdicts: list[str] = []


class FakeQueue:
    """The enforcer's queue (enforcer.nfqueue.Queue) as the daemon uses it: the packets
    waiting, the verdicts buffered, then sent (only then do they count)."""

    def __init__(self, packets: list[QueuedPacket], sock: FakeSocket | None = None) -> None:
        self.socket = sock  # where INCREASE_RECEIVE_BUFFER grows the queue's buffer
        self.queued = packets
        self.buffered: list[tuple[QueuedPacket, bool, int | None]] = []
        self.payload_limit = 65531
        self.waiting = False  # (a turn takes them all)
        self.unsent = False  # (every flush goes through)

    def turn(self, limit: int, until: float, clock: object) -> Iterator[Packet]:
        for i, p in enumerate(self.queued[:limit]):
            yield Packet(i, p.hook, p.mark, p.indev, p.data, len(p.data), True, False)

    def verdict(self, packet_id: int, accept: bool, *, mark: int | None = None,
                payload: bytes | None = None) -> None:
        if payload is not None and len(payload) > self.payload_limit:
            raise ValueError(f"a payload of {len(payload)} bytes")  # as Queue.verdict does
        self.buffered.append((self.queued[packet_id], accept, mark))

    def flush(self) -> None:
        for queued, accept, mark in self.buffered:
            queued.verdicts.append("accept" if accept else "drop")
            if mark is not None:
                queued.mark = mark
        self.buffered = []


def deliver(d: Daemon, *packets: QueuedPacket) -> None:
    """The packets queued at once, and the daemon's turn at the queue."""
    d.queue = FakeQueue(list(packets), getattr(d.queue, "socket", None))  # type: ignore[assignment]
    d.on_queue()


class SocketCaller(Caller):
    """A filter on the control socket: what it is pushed is encoded to be sent."""

    def __init__(self) -> None:  # no server, no socket
        self.sent: list[bytes] = []

    def push(self, message: dict[str, Any]) -> None:
        self.sent.append(encode(message))


def daemon() -> Daemon:
    """The daemon's packet path alone: its engine, session API and clock."""
    d = Daemon.__new__(Daemon)
    d.engine = Engine(POLICY, INTERNAL, [ipaddress.ip_address(EXT)])
    d.clock = lambda: 5.0
    d.api = SessionApi(d.engine, d.clock, d.apply, kernel_udp_flows=d.kernel_udp_flows)
    d.maps = d.conntrack = d.queue = d.notices = d.live = None
    d._arrived_on = Arrivals(Interfaces({"int0": INTERNAL_IF}, {"ext0": EXTERNAL_IF}, (), ()))
    d.config = Config(POLICY, NetworkSettings(("int0",), ("ext0",)),
                      DataplaneSettings(increased_receive_buffer=INCREASED))
    d.socks = d.pool = d.successor = None
    d.stray_grants = d._stop = d._queue_next = False
    d._next_prune = 0.0
    return d


def syn(dport: int, sport: int) -> QueuedPacket:
    return QueuedPacket(bytes(IP(src=C1, dst=S1) / TCP(sport=sport, dport=dport, flags="S")))


def test_an_event_that_cannot_be_sent_does_not_stop_its_flow_or_the_enforcer(
        caplog: pytest.LogCaptureFixture) -> None:
    # The event of an admitted flow is an effect the shell applies before the verdict;
    # when it could not be encoded (a context that is no JSON, from a filter in the
    # enforcer's process), a raise there once stopped the queue's loop (ROB-04). The flow
    # is admitted, the failure logged, and the enforcer goes on deciding.
    d = daemon()
    caller = SocketCaller()
    fid = d.api.register_filter({"name": "on the socket"}, caller)["filter"]
    primary = syn(21, 40000)
    deliver(d, primary)
    session = d.engine.sessions.find(ipaddress.ip_address(C1))
    assert primary.verdicts == ["accept"] and session is not None
    ftp = GUID["FTP"]
    d.engine.allow_future_connect(session.id, ipaddress.ip_address(S1), 20021, TCP_PROTOCOL, Flags(0),
                                  ftp, 1.0, filter_id=fid, context={"not", "json"})
    granted = syn(20021, 41000)
    deliver(d, granted)
    assert granted.verdicts == ["accept"] and caller.sent == []
    assert any("cannot send" in r.getMessage() for r in caplog.records)
    later = syn(20021, 41001)  # and it goes on deciding: the grant was single use
    deliver(d, later)
    assert later.verdicts == ["drop"]


class TurnsQueue(FakeQueue):
    """A queue whose turns end after ``per_turn`` packets (their time ran out), the rest
    held: waiting, without the socket's being readable."""

    def __init__(self, packets: list[QueuedPacket], per_turn: int) -> None:
        super().__init__(packets)
        self.per_turn, self.taken = per_turn, 0

    def turn(self, limit: int, until: float, clock: object) -> Iterator[Packet]:
        for _ in range(min(limit, self.per_turn, len(self.queued) - self.taken)):
            p = self.queued[self.taken]
            yield Packet(self.taken, p.hook, p.mark, p.indev, p.data, len(p.data), True, False)
            self.taken += 1
        self.waiting = self.taken < len(self.queued)


def test_packets_a_turn_left_held_are_decided_at_the_loop_s_next_turns() -> None:
    d = daemon()
    d.loop = Loop()
    packets = [syn(21, 40000 + i) for i in range(7)]
    d.queue = TurnsQueue(packets, per_turn=3)  # type: ignore[assignment]
    d.on_queue()
    assert [len(p.verdicts) for p in packets] == [1, 1, 1, 0, 0, 0, 0]
    d.loop.run_once(0)  # the queue's socket is not watched: its next turn comes anyway
    assert [len(p.verdicts) for p in packets] == [1] * 6 + [0]
    d.loop.run_once(0)
    assert [p.verdicts for p in packets] == [["accept"]] * 7
    assert d.loop.next_timer() is None  # nothing held: no more turns


def test_a_packet_the_engine_fails_on_is_dropped_and_counted() -> None:
    d = daemon()
    d.engine.decide = None  # type: ignore[assignment,method-assign]  # a bug in the core
    first = syn(21, 40000)
    deliver(d, first)
    assert first.verdicts == ["drop"] and d.engine.counters["errors"] == 1
    d.engine.decide = Engine.decide.__get__(d.engine)  # type: ignore[method-assign]
    second = syn(21, 40001)
    deliver(d, second)
    assert second.verdicts == ["accept"] and d.engine.counters["errors"] == 1


class FakeSocket:
    """A socket's receive buffer as the kernel keeps it: what is asked, doubled."""

    def __init__(self, size: int) -> None:
        self.size = size

    def getsockopt(self, level: int, option: int) -> int:
        return self.size

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert option == SO_RCVBUFFORCE
        self.size = 2 * value


class FakeSocks:
    """The SOCKS service as the daemon asks it: the socket it holds for a bind."""

    def __init__(self) -> None:
        self.sockets: dict[int, FakeSocket] = {}

    def socket_of(self, bind: Bind) -> FakeSocket | None:
        return self.sockets.get(bind.id)


class FakeConntrack:
    def __init__(self, udp_flows: set[int] | dataplane.DataplaneError = frozenset()) -> None:
        self.forgotten: list[int] = []
        self.udp_flows = udp_flows
        self.asked: list[tuple[IPAddress, IPAddress]] = []

    def forget(self, port: int) -> None:
        self.forgotten.append(port)

    def redirected_udp_ports(self, client: IPAddress, address: IPAddress) -> set[int]:
        self.asked.append((client, address))
        if isinstance(self.udp_flows, dataplane.DataplaneError):
            raise self.udp_flows
        return set(self.udp_flows)


def test_the_ports_a_client_s_udp_flows_hold_are_conntrack_s_and_a_failure_refuses_the_redirect(
        caplog: pytest.LogCaptureFixture) -> None:
    """What a UDP redirect must avoid comes from conntrack; before the enforcer runs nothing
    passes, so nothing is avoided; when conntrack does not answer, the redirect is refused
    (FWX_E_IS_BUSY, the cause logged), never given a port that may lead down a live flow."""
    d = daemon()
    client, internal = ipaddress.ip_address(C1), ipaddress.ip_address("192.0.2.1")
    assert d.kernel_udp_flows(client, internal) == set()
    d.conntrack = FakeConntrack({61000})  # type: ignore[assignment]
    assert d.kernel_udp_flows(client, internal) == {61000}
    d.conntrack = FakeConntrack(dataplane.DataplaneError("asking conntrack failed: timed out"))  # type: ignore[assignment]
    with pytest.raises(IsBusy, match=r"cannot tell which redirect ports 192\.0\.2\.\d+'s UDP "
                                     r"flows hold: asking conntrack failed: timed out"):
        d.kernel_udp_flows(client, internal)
    assert "asking conntrack failed" in caplog.text


def test_housekeeping_sends_the_verdicts_a_failed_send_kept() -> None:
    """Verdicts the kernel could not take for want of memory go at the next flush; with no
    packet coming to make a turn of the queue, the loop's housekeeping (at least once a
    second) makes it, and only then."""
    class Kept:
        unsent = True
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1
            self.unsent = False

    d = daemon()
    d.queue = kept = Kept()  # type: ignore[assignment]
    d._housekeeping()
    d._housekeeping()
    assert kept.flushes == 1


def datagram(src: str, dst: str, sport: int, dport: int, *, indev: int) -> QueuedPacket:
    queued = QueuedPacket(bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / b"data"))
    queued.indev = indev
    return queued


def securenat_session(d: Daemon) -> int:
    deliver(d, syn(21, 40000))
    session = d.engine.sessions.find(ipaddress.ip_address(C1))
    assert session is not None
    return session.id


def approve(d: Daemon, session: int, protocol: str, address: str, port: int, flags: list[str]) -> None:
    d.api.retroactive_allow_bind({"session": session, "protocol": protocol, "address": address,
                                  "port": port, "protocol_guid": str(DNS), "flags": flags}, SocketCaller())


@pytest.mark.parametrize(("flags", "one_way"), [([], True), (["BIDIRECTIONAL"], False)])
def test_a_securenat_udp_bind_s_flow_is_marked_one_way_without_bidirectional(flags: list[str],
                                                                            one_way: bool) -> None:
    """RAB-06: the verdict on the flow a peer opens to a SecureNAT UDP bind carries the
    one-way mark unless the bind has BIDIRECTIONAL: the kernel then drops the flow's reply
    direction, the client's answers to the peer."""
    d = daemon()
    session = securenat_session(d)
    d.api.bind_for_client({"session": session, "protocol": "udp", "client_port": 40069}, SocketCaller())
    approve(d, session, "udp", C1, 40069, flags)
    first = datagram(S1, C1, 45000, 40069, indev=EXTERNAL_IF)
    deliver(d, first)
    assert first.verdicts == ["accept"]
    assert first.mark == marks.mark_for(False, one_way, None)


def test_a_firewall_client_s_udp_flow_keeps_the_bind_s_mark() -> None:
    """A flow admitted to a Firewall client's UDP bind is marked with the bind's port, so that
    its later datagrams go to the socket in the kernel; a TCP one, and a refused one, are not."""
    d = daemon()
    session = d.engine.open_firewall_session(ipaddress.ip_address(C1), "alice", 1.0).id
    udp = d.engine.bind_for_client(session, UDP_PROTOCOL, ipaddress.ip_address(EXT), 1.0)
    tcp = d.engine.bind_for_client(session, TCP_PROTOCOL, ipaddress.ip_address(EXT), 1.0)
    early = datagram(S1, EXT, 45000, udp.port, indev=EXTERNAL_IF)
    early.hook = HOOK_INPUT
    deliver(d, early)
    assert early.verdicts == ["drop"] and early.mark == 0
    approve(d, session, "udp", EXT, udp.port, [])
    approve(d, session, "tcp", EXT, tcp.port, [])
    admitted = datagram(S1, EXT, 45000, udp.port, indev=EXTERNAL_IF)
    admitted.hook, admitted.mark = HOOK_INPUT, 0x00100000  # a bit not the enforcer's stays
    deliver(d, admitted)
    assert admitted.verdicts == ["accept"] and admitted.mark == marks.local_mark(udp.port) | 0x00100000
    connection = QueuedPacket(bytes(IP(src=S1, dst=EXT) / TCP(sport=45001, dport=tcp.port, flags="S")))
    connection.indev, connection.hook = EXTERNAL_IF, HOOK_INPUT
    deliver(d, connection)
    assert connection.verdicts == ["accept"] and connection.mark == 0


def test_increase_receive_buffer_on_a_securenat_bind_grows_the_queue_s() -> None:
    """RAB-07: a SecureNAT bind's flow runs in kernel mode, its first datagrams wait in the
    queue: INCREASE_RECEIVE_BUFFER grows the queue's buffer, which the bind reports; a
    bind without the flag (or a TCP one) changes nothing."""
    d = daemon()
    d.queue = FakeQueue([], queue := FakeSocket(212992))  # type: ignore[assignment]
    session = securenat_session(d)
    for port, protocol, flags in ((40069, "udp", []), (40070, "tcp", ["INCREASE_RECEIVE_BUFFER"])):
        d.api.bind_for_client({"session": session, "protocol": protocol, "client_port": port}, SocketCaller())
        approve(d, session, protocol, C1, port, flags)
    assert queue.size == 212992 and all(b.receive_buffer is None for b in d.engine.binds.of(session))
    d.api.bind_for_client({"session": session, "protocol": "udp", "client_port": 40071}, SocketCaller())
    approve(d, session, "udp", C1, 40071, ["INCREASE_RECEIVE_BUFFER"])
    (bind,) = [b for b in d.engine.binds.of(session) if b.client_port == 40071]
    assert queue.size == 2 * INCREASED and bind.receive_buffer == 2 * INCREASED


def test_increase_receive_buffer_on_a_firewall_client_s_bind_grows_its_socket_s() -> None:
    """RAB-07: a Firewall client's UDP bind is a socket of the fw: its buffer grows (and the
    queue's, where each new flow's first datagrams wait), and the bind reports the socket's;
    a buffer larger already is left alone."""
    d = daemon()
    d.queue = FakeQueue([], queue := FakeSocket(212992))  # type: ignore[assignment]
    d.socks = socks = FakeSocks()  # type: ignore[assignment]
    session = d.engine.open_firewall_session(ipaddress.ip_address(C1), "alice", 1.0).id
    small, large = (d.engine.bind_for_client(session, UDP_PROTOCOL, ipaddress.ip_address(EXT), 1.0)
                    for _ in range(2))
    socks.sockets = {small.id: FakeSocket(212992), large.id: FakeSocket(4 * INCREASED)}
    approve(d, session, "udp", EXT, small.port, ["INCREASE_RECEIVE_BUFFER"])
    assert socks.sockets[small.id].size == 2 * INCREASED and small.receive_buffer == 2 * INCREASED
    assert queue.size == 2 * INCREASED
    approve(d, session, "udp", EXT, large.port, ["INCREASE_RECEIVE_BUFFER"])
    assert large.receive_buffer == 4 * INCREASED


class FakeMaps:
    """The NAT maps as the daemon writes them: the rules added and deleted, in order."""

    def __init__(self, error: str | None = None, *, unheld: int | None = None,
                 unreleased: int = 0) -> None:
        self.added: list[dataplane.NatRule] = []
        self.deleted: list[dataplane.NatRule] = []
        self.held: list[dataplane.GrantRule] = []
        self.released: list[bytes] = []
        self.present: set[bytes] = set()  # the keys of the grants the kernel still holds
        self.error = error  # an add (and a grant the kernel is to hold) fails with it
        self.unheld = unheld  # with error: the last this many grants of a hold are not held
        self.unreleased = unreleased  # this many releases fail, leaving their grants
        self.watched: QueuedPacket | None = None  # its verdicts as each delete came
        self.verdicts_at_delete: list[list[str]] = []

    def add(self, rules: list[dataplane.NatRule]) -> None:
        if self.error is not None:
            raise dataplane.DataplaneError(self.error)
        self.added += rules

    def delete(self, rules: list[dataplane.NatRule]) -> None:
        self.deleted += rules
        if self.watched is not None:
            self.verdicts_at_delete.append(list(self.watched.verdicts))

    def hold(self, grants: list[dataplane.GrantRule]) -> None:
        if self.error is not None and self.unheld is None:
            raise dataplane.DataplaneError(self.error)
        made = grants[:len(grants) - (self.unheld or 0)]
        self.held += made
        self.present |= {g.key for g in made}
        if self.error is not None and self.unheld:
            raise dataplane.GrantsNotHeld(self.error, self.unheld)

    def release(self, keys: list[bytes]) -> None:
        if self.unreleased:
            self.unreleased -= 1
            raise dataplane.DataplaneError("the kernel refused to remove a grant: No buffer space")
        self.released += keys
        self.present -= set(keys)

    def grant_keys(self) -> set[bytes]:
        return self.present


FW_INT = "192.0.2.1"


@pytest.mark.parametrize("from_fw", [False, True], ids=["from-the-server", "from-the-fw"])
@pytest.mark.parametrize("nat", [False, True], ids=["routed", "nat"])
def test_a_securenat_bind_s_kernel_nat_and_its_source(nat: bool, from_fw: bool) -> None:
    """A SecureNAT bind's NAT rule is written as the bind is made and deleted once it has
    taken its flow: in NAT, from the fw's external port to the client's; asked to reach
    the client from the fw, its source is the fw's address on the client's network, and
    routed too it is on the fw's external address (the peer of a client that sees only
    the fw sees only the fw). Routed and from the server: no rule at all."""
    d = daemon()
    d.engine = Engine(POLICY, INTERNAL, [ipaddress.ip_address(EXT)], nat=nat,
                      internal_addresses=[ipaddress.ip_interface(f"{FW_INT}/24")])
    d.api = SessionApi(d.engine, d.clock, d.apply)
    d.maps = maps = FakeMaps()  # type: ignore[assignment]
    session = securenat_session(d)
    made = d.api.bind_for_client({"session": session, "protocol": "tcp", "client_port": 40021,
                                  "from_fw": from_fw}, SocketCaller())
    address = EXT if nat or from_fw else C1
    assert made["address"] == [address, 40021] and made["source"] == (FW_INT if from_fw else None)
    expected = [dataplane.BindRule(TCP_PROTOCOL, ipaddress.ip_address(address), 40021,
                                   ipaddress.ip_address(C1), 40021,
                                   ipaddress.ip_address(FW_INT) if from_fw else None)]
    if not (nat or from_fw):
        expected = []
    assert maps.added == expected and maps.deleted == []
    approve(d, session, "tcp", address, 40021, [])
    data = QueuedPacket(bytes(IP(src=S1, dst=C1) / TCP(sport=20, dport=40021, flags="S")))
    data.indev = EXTERNAL_IF
    maps.watched = data
    deliver(d, data)
    assert data.verdicts == ["accept"]
    assert maps.deleted == expected
    # removed after the verdict: its flow's first packet is translated on its way out
    assert maps.verdicts_at_delete == ([["accept"]] if expected else [])


def test_a_closed_firewall_client_bind_s_flows_are_forgotten() -> None:
    """A Firewall client's UDP bind that admitted a flow closes: its flows are forgotten in
    the kernel (by the bind's port); a SecureNAT bind's NAT goes the NAT maps' way."""
    d = daemon()
    d.conntrack = flows = FakeConntrack()  # type: ignore[assignment]
    session = d.engine.open_firewall_session(ipaddress.ip_address(C1), "alice", 1.0).id
    bind = d.engine.bind_for_client(session, UDP_PROTOCOL, ipaddress.ip_address(EXT), 1.0)
    approve(d, session, "udp", EXT, bind.port, [])
    admitted = datagram(S1, EXT, 45000, bind.port, indev=EXTERNAL_IF)
    admitted.hook = HOOK_INPUT
    deliver(d, admitted)
    d.engine.bind_done(bind)
    d.settle()
    assert flows.forgotten == [bind.port]
    d.settle()
    assert flows.forgotten == [bind.port]


def test_kernel_nat_that_cannot_be_made_withdraws_its_grant_or_bind() -> None:
    """A kernel-mode redirect or a SecureNAT bind whose NAT cannot be written: the call
    that made it fails naming the problem, and nothing of it is left pending."""
    d = daemon()
    d.engine = Engine(POLICY, INTERNAL, [ipaddress.ip_address(EXT)], nat=True,
                      internal_addresses=[ipaddress.ip_interface(f"{FW_INT}/24")])
    d.api = SessionApi(d.engine, d.clock, d.apply)
    d.maps = FakeMaps(error="nft says no")  # type: ignore[assignment]
    session = securenat_session(d)
    ftp = str(GUID["FTP"])
    with pytest.raises(dataplane.DataplaneError, match="nft says no"):
        d.api.redirect_connections({"session": session, "addresses": [[S1, 2121], [S1, 2122]],
                                    "protocol_guid": ftp}, SocketCaller())
    assert d.engine.pending(None, 5.0) == [] and d.engine.pools[False].in_use == 0
    assert d.engine.effects == []  # no removal of what was never written
    with pytest.raises(dataplane.DataplaneError, match="nft says no"):
        d.api.bind_for_client({"session": session, "protocol": "tcp", "client_port": 40021},
                              SocketCaller())
    assert d.engine.binds.leading_to(TCP_PROTOCOL, ipaddress.ip_address(EXT), 40021) is None
    assert d.engine.effects == []


def test_no_child_process_on_the_packet_path() -> None:
    """Nothing a queued packet makes the enforcer do starts a child process: its decision,
    the FTP filter it runs and the grants and binds that filter asks for, the kernel NAT
    they need (over netlink), events. An audit hook sees every process the path would
    start (subprocess, os.system, spawn, fork, exec)."""
    d = daemon()
    d.engine = Engine(POLICY, INTERNAL, [ipaddress.ip_address(EXT)], nat=True,
                      app_filters={"FTP": "ftp"},
                      internal_addresses=[ipaddress.ip_interface(f"{FW_INT}/24")])
    d.api = SessionApi(d.engine, d.clock, d.apply)
    d.app_filters, d.filter_factories = filters.load(["ftp"]), {}
    d.calls = filters.InProcessCalls(d.api.handlers())
    d.engine.stream_filter = d.stream_filter
    d.maps = maps = FakeMaps()  # type: ignore[assignment]
    d.engine.grants_in_kernel = True
    user = marks.mark_for(True, False, 0)
    control = [IP(src=C1, dst=S1) / TCP(sport=40000, dport=21, flags="S", seq=100),
               IP(src=S1, dst=C1) / TCP(sport=21, dport=40000, flags="SA", seq=500, ack=101),
               IP(src=C1, dst=S1) / TCP(sport=40000, dport=21, flags="PA", seq=101, ack=501)
               / b"PORT 192,0,2,11,156,65\r\n",
               IP(src=S1, dst=C1) / TCP(sport=21, dport=40000, flags="PA", seq=501, ack=125)
               / b"227 Entering Passive Mode (198,51,100,21,117,49).\r\n"]
    started: list[str] = []
    watching = [True]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if watching[0] and event.startswith(("subprocess.", "os.system", "os.posix_spawn",
                                              "os.fork", "os.exec", "os.spawn")):
            started.append(event)

    sys.addaudithook(hook)  # (one cannot be removed: it stops watching instead)
    try:
        for i, segment in enumerate(control):
            queued = QueuedPacket(bytes(segment))
            queued.mark = 0 if i == 0 else user
            queued.indev = INTERNAL_IF if segment[IP].src == C1 else EXTERNAL_IF
            deliver(d, queued)
            assert queued.verdicts == ["accept"], i
    finally:
        watching[0] = False
    assert started == []
    # and the filter did what the packets asked: a bind for the PORT (its NAT over
    # netlink), a grant for the 227
    assert [r.client_port for r in maps.added if isinstance(r, dataplane.BindRule)] == [40001]
    assert [p.redirect for p in d.engine.pending(None, 5.0)] == [None]
    assert [(str(g.target), g.port) for g in maps.held] == [(S1, 30001)]  # held by the kernel


class FakeNotices:
    """The kernel's log of the flows it admitted by grants it held (``losing``: the reads
    that find some notices were lost)."""

    def __init__(self, *packets: bytes, losing: int = 0) -> None:
        self.waiting = list(packets)
        self.lost, self.losing = 0, losing

    def read(self) -> list[bytes]:
        if self.losing:
            self.losing -= 1
            self.lost += 1
        out, self.waiting = self.waiting, []
        return out


def test_grants_the_kernel_holds_and_what_the_daemon_hears_of_them() -> None:
    """A single-use kernel-mode grant goes to the kernel with what is left of its timeout;
    the flow the kernel admitted by it, heard before the next control request, uses it up,
    and what is left of it in the kernel goes; one the kernel cannot hold is the
    enforcer's to match, and the call that made it succeeds."""
    d = daemon()
    d.maps = maps = FakeMaps()  # type: ignore[assignment]
    d.engine.grants_in_kernel = True
    session = securenat_session(d)
    ftp = str(GUID["FTP"])
    made = d.api.allow_future_connect({"session": session, "address": S1, "port": 30001,
                                       "protocol_guid": ftp, "flags": ["TIMEOUT"]}, SocketCaller())
    (grant,) = maps.held
    perm = d.engine.permissions.get(made["action"])
    assert perm.expires is not None
    assert (grant.protocol, str(grant.client), str(grant.target), grant.port, grant.mark) == \
        (TCP_PROTOCOL, C1, S1, 30001, marks.mark_for(False, False, None))
    assert grant.timeout_ms == int((perm.expires - d.clock()) * 1000) - KERNEL_TIMER_MS

    d.notices = FakeNotices(syn(30001, 41000).data)  # type: ignore[assignment]
    actions = d._hearing_first(d.api.action)
    assert actions({"action": made["action"]}, SocketCaller())["state"] == "consumed"
    assert maps.released == [grant.key]

    d.maps = FakeMaps(error="set full")  # type: ignore[assignment]
    kept = d.api.allow_future_connect({"session": session, "address": S1, "port": 30002,
                                       "protocol_guid": ftp}, SocketCaller())
    assert d.engine.kernel_grants == {}
    deliver(d, first := syn(30002, 41001))
    assert first.verdicts == ["accept"]
    assert d.engine.permissions.get(kept["action"]).state.value == "consumed"


class RefusingSocket(FakeSocket):
    def setsockopt(self, level: int, option: int, value: int) -> None:
        raise OSError(105, "No buffer space available")


def test_a_receive_buffer_that_cannot_grow_withdraws_its_grant() -> None:
    """INCREASE_RECEIVE_BUFFER that the kernel refuses: the grant's call fails naming it,
    and nothing of the grant is left pending."""
    d = daemon()
    d.queue = FakeQueue([], RefusingSocket(212992))  # type: ignore[assignment]
    session = securenat_session(d)
    ftp = str(GUID["FTP"])
    with pytest.raises(dataplane.DataplaneError, match="cannot grow a receive buffer"):
        d.api.allow_future_connect({"session": session, "address": S1, "port": 20021,
                                    "protocol_guid": ftp, "flags": ["INCREASE_RECEIVE_BUFFER"]},
                                   SocketCaller())
    assert d.engine.pending(None, 5.0) == []


def test_a_packet_the_queue_cannot_carry_is_dropped_and_the_turn_goes_on() -> None:
    """A rewritten packet the queue refuses (past its payload limit): that packet is
    dropped, the turn's other packets still get their verdicts, and what the engine
    decided about it has its effects (here the connect event of the flow it admitted)."""
    d = daemon()
    d.engine = Engine(POLICY, INTERNAL, [ipaddress.ip_address(EXT)], nat=True,
                      internal_addresses=[ipaddress.ip_interface(f"{FW_INT}/24")])
    d.api = SessionApi(d.engine, d.clock, d.apply)
    caller = SocketCaller()
    fid = d.api.register_filter({"name": "events"}, caller)["filter"]
    d.api.register_connect_events({"filter": fid, "protocol": "tcp", "ports": [8080, 8080]}, caller)
    session = securenat_session(d)
    (_, base), _ = d.engine.redirect_connections(session, [(ipaddress.ip_address(S1), 8080)],
                                                 TCP_PROTOCOL, Flags.NO_KERNEL_MODE,
                                                 GUID["FTP"], 5.0)
    redirected = QueuedPacket(bytes(IP(src=C1, dst=FW_INT) / TCP(sport=4000, dport=base, flags="S")))
    redirected.hook = HOOK_PREROUTING
    other = syn(21, 40001)
    queue = FakeQueue([redirected, other])
    queue.payload_limit = 10
    d.queue = queue  # type: ignore[assignment]
    d.on_queue()
    assert redirected.verdicts == ["drop"] and other.verdicts == ["accept"]
    events = [json.loads(m) for m in caller.sent]
    assert [(e["event"], e["target"]) for e in events] == [("connect", [S1, 8080])], events


def test_lost_notices_are_made_up_for_by_what_the_kernel_still_holds() -> None:
    """When the kernel's notices were lost, the grants it no longer holds are used (not one
    it still holds, nor one about to expire, which the kernel expires a moment early)."""
    d = daemon()
    d.maps = maps = FakeMaps()  # type: ignore[assignment]
    d.engine.grants_in_kernel = True
    session = securenat_session(d)
    ftp = str(GUID["FTP"])
    actions = [d.api.allow_future_connect({"session": session, "address": S1, "port": port,
                                           "protocol_guid": ftp, **extra}, SocketCaller())["action"]
               for port, extra in ((30001, {}), (30002, {}), (30003, {"flags": ["TIMEOUT"]}))]
    maps.present = {maps.held[1].key}  # the first used, unheard of; the third expiring
    d.clock = lambda: d.engine.permissions.get(actions[2]).expires - 0.001  # type: ignore[operator]
    d.notices = FakeNotices(losing=1)  # type: ignore[assignment]
    d.hear_kernel()
    states = [d.engine.permissions.get(a).state.value for a in actions]
    assert states == ["consumed", "pending", "pending"]
    assert d.engine.counters["kernel grants: used, not heard of"] == 1
    d.hear_kernel()  # nothing lost since: nothing compared
    assert d.engine.counters["kernel grants: used, not heard of"] == 1


def test_a_grant_the_kernel_could_not_give_up_is_taken_from_it_at_the_next_housekeeping() -> None:
    """Cancelled, a grant the kernel holds must leave it: when the removal fails (a
    transaction refused, its acknowledgements lost), the next housekeeping takes from the
    kernel every grant the enforcer no longer holds, and tries again until it can."""
    d = daemon()
    d.maps = maps = FakeMaps(unreleased=2)  # type: ignore[assignment]
    d.engine.grants_in_kernel = True
    d.notices = FakeNotices()  # type: ignore[assignment]
    session = securenat_session(d)
    ftp = str(GUID["FTP"])
    kept, cancelled = (d.api.allow_future_connect({"session": session, "address": S1, "port": port,
                                                   "protocol_guid": ftp}, SocketCaller())["action"]
                       for port in (30001, 30002))
    assert len(maps.present) == 2
    d.api.cancel({"action": cancelled}, SocketCaller())
    assert d.stray_grants and len(maps.present) == 2  # the removal failed
    d._housekeeping()  # fails again: still due
    assert d.stray_grants and len(maps.present) == 2
    d._housekeeping()
    assert not d.stray_grants
    assert maps.present == {maps.held[0].key} and maps.released == [maps.held[1].key]
    assert d.engine.counters["kernel grants: strays taken"] == 1
    assert d.engine.permissions.get(kept).state.value == "pending"


def test_grants_the_kernel_held_in_part_are_the_kernel_s_the_rest_the_enforcer_s() -> None:
    """A hold the kernel refused after its first transactions: the grants it holds stay
    the kernel's, the others the enforcer matches; none is lost."""
    d = daemon()
    d.maps = maps = FakeMaps("set full", unheld=2)  # type: ignore[assignment]
    d.engine.grants_in_kernel = True
    session = securenat_session(d)
    for port in (30001, 30002, 30003):  # effects gathered, as a turn of the loop may
        d.engine.allow_future_connect(session, ipaddress.ip_address(S1), port, TCP_PROTOCOL,
                                      Flags(0), GUID["FTP"], 5.0)
    d.apply(d.engine.take_effects())
    assert [g.port for g in maps.held] == [30001]
    assert sorted(g.port for g in d.engine.kernel_grants.values()) == [30001]
    assert d.stray_grants  # what the kernel made of the others is looked at again
    for sport, port in ((41000, 30002), (41001, 30003)):
        deliver(d, first := syn(port, sport))
        assert first.verdicts == ["accept"]


def test_a_stop_asked_for_while_a_restart_is_under_way_stops_the_next_run() -> None:
    """SIGTERM between a run's stop for a restart and the next run's handlers: the next run
    stops too (the signal reached the old run's handler), rather than going on unasked."""
    d = daemon()
    d.successor = then = daemon()
    d._stop = True  # restarting
    d._on_signal(signal.SIGTERM, None)
    assert then._stop


class FakePool:
    """The worker processes as the daemon uses them (enforcer.workers.WorkerPool): what it
    is told, with the verdicts buffered at that moment; what the workers sent."""

    def __init__(self, d: Daemon, *, full: bool = False) -> None:
        self.d, self.full = d, full
        self.told: list[tuple[str, int, int]] = []  # (what, worker, verdicts buffered then)
        self.sent: list[tuple[Any, ...]] = []
        self.gone = False
        self.lost_workers: list[int] = []
        self.pair = socket.socketpair()
        self.workers = {1: workers.Worker(1, 1)}
        self.workers[1].socket = self.pair[0]
        self.ready = (1,)

    def hand_over(self, record: Any, index: int) -> None:
        if self.full:
            raise workers.WorkerError(f"worker {index} is not reading (its socket is full)")
        self.told.append(("add", index, len(self.d.queue.buffered)))  # type: ignore[union-attr]

    def let_go(self, key: Any, admitted_at: float, index: int) -> None:
        self.told.append(("forget", index, 0))

    def read(self, index: int) -> tuple[list[tuple[Any, ...]], bool]:
        if self.sent:
            self.workers[index].heard = self.d.clock()
        return self.sent, self.gone

    def lost(self, index: int) -> None:
        self.lost_workers.append(index)
        self.ready = tuple(w for w in self.ready if w != index)
        self.workers[index].socket = None

    def silent(self, now: float) -> list[int]:
        return [k for k, w in self.workers.items() if w.silent(now)]

    def kill(self, index: int) -> None:
        self.told.append(("kill", index, 0))


@pytest.mark.parametrize("full", [False, True], ids=["told", "not-reading"])
def test_a_user_mode_flow_goes_to_its_worker_before_its_verdict(full: bool) -> None:
    """The flow's record reaches its worker before the verdict that lets its later packets
    go to that worker's queue; a worker that cannot be told costs the flow (its packets
    go to a worker that does not know it, which drops them), counted."""
    d = daemon()
    d.pool = pool = FakePool(d, full=full)  # type: ignore[assignment]
    d.engine.workers = (1,)
    session = securenat_session(d)
    d.engine.allow_future_connect(session, ipaddress.ip_address(S1), 30001, TCP_PROTOCOL,
                                  Flags.NO_KERNEL_MODE, GUID["FTP"], 5.0)
    first = syn(30001, 40001)
    deliver(d, first)
    assert first.verdicts == ["accept"]
    assert first.mark == marks.mark_for(True, False, None) | marks.worker_mark(1)
    assert pool.told == ([] if full else [("add", 1, 0)])  # no verdict buffered yet
    assert d.engine.counters["user-mode flows lost with a worker"] == (1 if full else 0)


def test_what_workers_send_and_a_worker_gone() -> None:
    """A report's figures reach the flows and its counters the daemon's; a worker whose
    socket ended is watched no more and takes no new flow, and its flows wait for its
    successor."""
    d = daemon()
    d.loop = Loop(d.engine.counters, d.clock)
    d.pool = pool = FakePool(d)  # type: ignore[assignment]
    d.engine.workers = (1,)
    session = securenat_session(d)
    d.engine.allow_future_connect(session, ipaddress.ip_address(S1), 30001, TCP_PROTOCOL,
                                  Flags.NO_KERNEL_MODE, GUID["FTP"], 5.0)
    deliver(d, syn(30001, 40001))
    (record,) = d.engine.flows.held_by(1)
    d._watch_worker(pool.workers[1])
    seen = record.figures()._replace(packets_back=3, bytes_back=4500, last_seen=6.0)
    pool.sent = [("seen", [(record.key, record.admitted_at, seen)], Counter({"user-mode packets": 4}))]
    d._from_worker(1)
    assert (record.packets_back, record.bytes_back, record.last_seen) == (3, 4500, 6.0)
    assert d.engine.counters["user-mode packets"] == 4
    pool.sent, pool.gone = [], True
    d._from_worker(1)
    assert pool.lost_workers == [1] and d.engine.workers == ()
    assert not d.loop.watched(pool.workers[1].socket)
    assert d.engine.flows.held_by(1) == [record]  # its worker's successor takes it
    for s in pool.pair:
        s.close()


@pytest.mark.parametrize("unread", [False, True], ids=["silent", "unread-report"])
def test_a_worker_that_says_nothing_for_too_long_is_killed(unread: bool) -> None:
    """A ready worker silent past the limit is killed and lost as a dead one is (no new
    flow goes to it, its flows wait for its successor), counted; one whose report waits
    unread (the loop was late, not the worker) is not."""
    d = daemon()
    d.loop = Loop(d.engine.counters, d.clock)
    d.pool = pool = FakePool(d)  # type: ignore[assignment]
    d.engine.workers = (1,)
    worker = pool.workers[1]
    worker.ready, worker.heard = True, 5.0 - workers.SILENCE_LIMIT
    d._watch_worker(worker)
    d._watch_dog(5.0)
    assert pool.told == [] and pool.lost_workers == [], "killed at the limit, not past it"
    worker.heard -= 0.1
    if unread:
        pool.sent = [("seen", [], Counter())]
    d._watch_dog(5.0)
    killed = [] if unread else [1]
    assert [w for what, w, _ in pool.told if what == "kill"] == killed
    assert pool.lost_workers == killed and d.engine.workers == (() if killed else (1,))
    assert d.loop.watched(pool.pair[0]) is bool(unread)
    assert d.engine.counters["worker processes killed: silent"] == len(killed)
    d._watch_dog(5.0)
    assert d.engine.counters["worker processes killed: silent"] == len(killed), "killed once"
    for s in pool.pair:
        s.close()


def test_the_heap_the_start_made_is_left_out_of_the_gc_s_passes() -> None:
    """``settle_heap``: what exists before the loop is frozen (a full collection then walks
    only what the loop makes); garbage is collected first, not frozen with it."""

    class Cycle:
        other: object = None

    gc.collect()  # what earlier tests left: the count below is of what lives
    before = len(gc.get_objects())
    cycle = Cycle()
    cycle.other = cycle
    gone = weakref.ref(cycle)
    del cycle
    settle_heap()
    try:
        assert gone() is None, "a garbage cycle was frozen, not collected"
        assert gc.get_freeze_count() >= before * 0.9
        assert len(gc.get_objects()) < before * 0.1
    finally:
        gc.unfreeze()


def test_a_data_filter_that_cannot_be_loaded_or_called_stops_the_start() -> None:
    assert load_data_filters({"x": "json:loads"}) == {"x": json.loads}
    with pytest.raises(StartupError, match="data filter 'x': cannot load json:nope"):
        load_data_filters({"x": "json:nope"})
    with pytest.raises(StartupError, match="data filter 'x': json:__name__ is not a factory"):
        load_data_filters({"x": "json:__name__"})


class _RaisingFilter:
    def on_data(self, direction: Direction, data: bytes) -> bytes:
        raise RuntimeError("a filter's bug")


class _UnattachableApp:
    def attach(self, primary: object, api: object) -> None:
        raise RuntimeError("cannot attach")


def _no_filter(key: FlowKey) -> _RaisingFilter:
    raise RuntimeError("cannot be made")


@pytest.mark.parametrize("how", ["raises", "not made", "not attached"])
def test_a_flow_s_filter_that_fails_fails_at_every_call_logged_once(
        how: str, caplog: pytest.LogCaptureFixture) -> None:
    """A filter that raises, or that cannot be made or attached, raises FilterFailed at
    every use from then on (the engine ends its flow): its data never passes unfiltered."""
    d = daemon()
    d.app_filters = {"FTP": _UnattachableApp()} if how == "not attached" else {}  # type: ignore[dict-item]
    d.filter_factories = {"f": (lambda key: _RaisingFilter()) if how == "raises" else _no_filter}
    d.calls = None  # type: ignore[assignment]
    key = FlowKey(TCP_PROTOCOL, ipaddress.ip_address(C1), 5, ipaddress.ip_address(S1), 2000)
    record = FlowRecord(key, 1, "FTP", Mode.USER, 0.0, data_filter="f",
                        app_filter="FTP" if how == "not attached" else None)
    stream = d.stream_filter(record)
    for _ in range(3):
        with pytest.raises(FilterFailed):
            stream.on_data(Direction.OUT, b"data")
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(logged) == 1 and logged[0].endswith("its connection ends"), logged
