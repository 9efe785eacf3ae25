"""enforcer.core.memory: the per-item sizes behind the memory bound, measured.

Each kind of state is made through the engine, at its largest (its own client
address, nothing shared), with tracemalloc counting what the engine keeps. A
size is measured at several counts and the largest taken: a dict's cost per
entry steps with its resizes. The constant must cover the measurement and not
overstate it by much, so the bound moves with the code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import ipaddress
import os
import socket
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from core_policy import INTERNAL, POLICY, pkt
from socks_rig import USERS, Rig

from enforcer.core import memory, packet, socks, state
from enforcer.core.binds import RECENT_SENDERS
from enforcer.core.budget import ByteBudget
from enforcer.core.datafilter import Direction, TcpStreamEditor
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.flows import FlowRecord
from enforcer.core.ipfilter import IpFilter
from enforcer.core.limits import MIB, Limits
from enforcer.core.packet import TCP, UDP
from enforcer.core.socks import UdpAssociation
from enforcer.daemon import _Guarded
from enforcer.filters import Primary
from enforcer.plugins.ftp import FtpFilter

COUNTS = (700, 1400)  # just past dict resizes (2/3 of 1024 and 2048 slots): the dearest
SLACK = 1.5  # a constant may exceed its measurement by this much (plus 64 bytes), no more
FTP = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101")
EXT = ipaddress.ip_address("2001:db8:2::1")
ROOM = 10**6
ROOMY = Limits(**{f"{kind}_{scope}": ROOM for kind in ("sessions", "pending", "binds", "user_flows")
                  for scope in ("total", "per_client")}, flow_history=ROOM)


def client(i: int) -> ipaddress.IPv6Address:
    """A fresh address object for each item: nothing shared between items."""
    return ipaddress.IPv6Address(0x2001_0DB8_0001_0000_0000_0000_0001_0000 + i)


def server(i: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(0x2001_0DB8_0002_0000_0000_0000_0001_0000 + i)


# The engines measured here remember this many policy answers of each kind (the daemon's
# POLICY_MEMO): the memos are filled before an item is made, so that its answers take
# the place of old ones; a small one fills quickly.
SMALL_MEMO = 64


@contextlib.contextmanager
def small_memos() -> Iterator[None]:
    kept = state.POLICY_MEMO
    state.POLICY_MEMO = SMALL_MEMO
    try:
        yield
    finally:
        state.POLICY_MEMO = kept


def new_engine() -> Engine:
    with small_memos():
        return _new_engine()


def _new_engine() -> Engine:
    engine = Engine(POLICY, INTERNAL, (ipaddress.ip_address("198.51.100.1"), EXT), limits=ROOMY,
                    app_filters={"FTP": "ftp"}, data_filters=["shout"],
                    internal_addresses=[ipaddress.ip_interface("2001:db8:1::1/64")],
                    user_redirect_ports=(40000, 59999))
    engine.grants_in_kernel = True  # a pending grant at its largest: the kernel holds it too
    return engine


def per_item(prepare: Callable[[Engine, int], Any], make: Callable[[Engine, Any, int], None]) -> float:
    """The most bytes the engine keeps per item made by ``make`` (after ``prepare``,
    which is not counted), over COUNTS."""
    worst = 0.0
    for n in COUNTS:
        engine = new_engine()
        for i in range(engine.recent.maxlen or 0):  # the decisions deque full: it grows no more
            engine.decide(pkt("192.0.2.11", "198.51.100.21", 23, sport=i + 1), 0.0)
        made = prepare(engine, n)
        full_memos(engine)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                make(engine, made, i)
            gc.collect()
            worst = max(worst, (tracemalloc.get_traced_memory()[0] - before) / n)
        finally:
            tracemalloc.stop()
    return worst


def memos(engine: Engine) -> list[Callable[..., Any]]:
    """The engine's remembered policy answers (bounded: ``policy_answer`` in the bound)."""
    return [engine.is_internal, engine.protocol_verdict, engine.destination_denial,
            engine._host_refusal]


def full_memos(engine: Engine) -> None:
    """Every memo at its size, its table at the size it keeps (answers replaced a few
    times over): an item's new answer then takes the place of an old one."""
    for i in range(4 * SMALL_MEMO):
        dummy = ipaddress.IPv6Address(0x2001_0DB8_00FF_0000_0000_0000_0000_0000 + i)
        engine.is_internal(dummy)
        engine.protocol_verdict("FTP", dummy, None)
        engine.destination_denial(dummy)
        engine._host_refusal(dummy)
    assert all(m.cache_info().currsize == SMALL_MEMO for m in memos(engine))  # type: ignore[attr-defined]


def policy_answer_size() -> float:
    """Bytes one remembered policy answer holds, the largest kind: a protocol verdict (its
    key the protocol, a client and a user; its answer a reason made for it)."""
    worst = 0.0
    for n in COUNTS:
        engine = _new_engine()  # the daemon's memos: room for every answer asked here
        assert engine.protocol_verdict.cache_info().maxsize > max(COUNTS)  # type: ignore[attr-defined]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                engine.protocol_verdict("FTP", client(i), "alice")
            gc.collect()
            worst = max(worst, (tracemalloc.get_traced_memory()[0] - before) / n)
        finally:
            tracemalloc.stop()
    return worst


def nothing(engine: Engine, n: int) -> None:
    return None


def securenat_sessions(engine: Engine, n: int) -> list[int]:
    return [engine.sessions.securenat(client(i), 0.0).id for i in range(n)]


def firewall_sessions(engine: Engine, n: int) -> list[int]:
    return [engine.open_firewall_session(client(i), "alice", 0.0).id for i in range(n)]


def grant(engine: Engine, sessions: list[int], i: int, flags: Flags = Flags.TIMEOUT) -> int:
    """A grant, its effects taken as the shell takes them (the kernel's part of it)."""
    action = engine.allow_future_connect(sessions[i], server(i), 20000 + i % 9999, TCP, flags, FTP,
                                         1.0).id
    engine.take_effects()
    return action


def cancel(engine: Engine, action: int) -> None:
    """Cancel an action, its effects taken as the shell takes them."""
    engine.cancel(action, 1.0)
    engine.take_effects()


def with_editor(record: FlowRecord | None) -> None:
    """The stream editor and filter the daemon gives a user-mode flow: a guarded FTP
    filter (the largest pinhole ships)."""
    assert record is not None and record.held_as is not None
    key = record.key
    primary = Primary(record.session_id, "tcp", (key.src, key.sport), (key.dst, key.dport),
                      translated=True, firewall_client=False, via=record.redirect)
    record.editor = TcpStreamEditor(_Guarded(FtpFilter().attach(primary, None),  # type: ignore[arg-type]
                                             f"application filter 'ftp' on {key}"),
                                    ByteBudget(Limits().buffered_bytes_per_client))


def ftp_flow(engine: Engine, sessions: list[int], i: int) -> None:
    """An FTP control connection: user mode, watched by the FTP filter."""
    d = engine.decide(pkt(str(client(i)), str(server(i)), 21, sport=40000), 1.0, 60)
    with_editor(engine.flows.get(d.key))


def redirected_flow(engine: Engine, sessions: list[int], i: int) -> None:
    """A user-mode redirect with a data filter: the flow is indexed three ways."""
    (internal, base), _ = engine.redirect_connections(sessions[i], [(server(i), 8080)], TCP,
                                                      Flags(0), FTP, 1.0, data_filter="shout")
    with_editor(engine.redirect_packet(pkt(str(client(i)), str(internal), base, sport=40000), 60, 1.0))


def kernel_flow(engine: Engine, sessions: list[int], i: int) -> None:
    engine.decide(pkt(str(client(i)), str(server(i)), 53, proto=UDP, sport=40000), 1.0, 60)


def full_bind(engine: Engine, sessions: list[int], i: int) -> Any:
    """A UDP ASSOCIATE's bind, approved for one peer (as the filters do), that has heard
    from as many peers as it remembers."""
    bind = engine.bind_for_client(sessions[i], UDP, EXT, 1.0)
    peer = IpFilter()
    peer.include_range(server(i), server(i))
    engine.retroactive_allow_bind(sessions[i], UDP, EXT, bind.port,
                                  uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2104"),
                                  Flags.BIDIRECTIONAL, peer, 1.0)
    for j in range(RECENT_SENDERS):
        engine.heard(bind, server(i * RECENT_SENDERS + j), 1024 + j, 1.0)
    return bind


def socks_connections(state: str) -> float:
    """The most bytes the SOCKS service (and the engine, for the session and bind each
    makes) keeps per connection in ``state`` ("associated": a UDP ASSOCIATE whose
    endpoint is known; "relaying": a BIND's relay), each from its own client address.
    Connections are made a hundred at a time (the listener's backlog), 700 in all: past
    the resize of a 1024-slot table, the dearest point. The test's own ends of the
    sockets are counted too: a little high."""
    count = 700
    rig = Rig(bind_ports=(30000, 31999), **{f"{kind}_{scope}": ROOM for kind in (
        "sessions", "binds", "socks_connections") for scope in ("total", "per_client")})
    try:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for first in range(0, count, 100):
            socks_batch(rig, range(first, first + 100), state)
        assert len(rig.service.clients) == count
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
        rig.close()


def socks_batch(rig: Rig, numbers: range, state: str) -> None:
    request = socks.client_greeting("alice") + socks.client_auth("alice", USERS["alice"]) + \
        socks.client_request(socks.UDP_ASSOCIATE if state == "associated" else socks.BIND, "0.0.0.0", 0)
    made = []
    for i in numbers:
        source = f"127.0.{1 + i // 250}.{1 + i % 250}"
        s = socket.socket()
        rig.sockets.append(s)
        s.bind((source, 0))
        s.connect(rig.address)
        s.sendall(request)
        made.append((s, source))
    rig.pump(len(made) + 10)
    for s, source in made:
        s.setblocking(False)
        assert rig.read(s, 4) == b"\x05\x02\x01\x00"
        code, address, port = rig.reply(s)
        assert code is socks.Reply.SUCCEEDED
        if state == "associated":
            rig.udp(source).sendto(socks.build_udp("198.51.100.21", 9, b""), (address, port))
        else:
            rig.sockets.append(socket.create_connection((address, port)))
    rig.pump(2 * len(made))
    if state == "relaying":
        assert all(rig.reply(s)[0] is socks.Reply.SUCCEEDED for s, _ in made)


def udp_targets() -> float:
    worst = 0.0
    for n in COUNTS:
        association = UdpAssociation(client(0), ipaddress.ip_address("::"), 0, n)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                association.add_target(server(i), 1024 + i, two_way=True)
            gc.collect()
            worst = max(worst, (tracemalloc.get_traced_memory()[0] - before) / n)
        finally:
            tracemalloc.stop()
    return worst


def measured(kind: str) -> float:
    """Each kind is measured once per run (some sizes are differences of others)."""
    if kind not in _measured:
        _measured[kind] = MEASURED[kind]()
    return _measured[kind]


_measured: dict[str, float] = {}
MEASURED: dict[str, Callable[[], float]] = {
    "session": lambda: max(
        per_item(nothing, lambda e, _, i: e.sessions.securenat(client(i), 0.0) and None),
        # a Firewall client with the longest user name RFC 1929 allows, its own string
        per_item(nothing, lambda e, _, i: e.open_firewall_session(
            client(i), f"{i:0255d}", 0.0) and None)),
    # a pending grant with its expiry entry, and the stale entry a finished one may leave
    "pending": lambda: per_item(securenat_sessions, lambda e, s, i: grant(e, s, i) and None)
    + measured("expiry"),
    "finished_action": lambda: per_item(securenat_sessions, lambda e, s, i: cancel(
        e, grant(e, s, i, Flags(0)))),
    "expiry": lambda: max(0.0, per_item(securenat_sessions, lambda e, s, i: cancel(
        e, grant(e, s, i))) - measured("finished_action")),
    "bind": lambda: per_item(firewall_sessions, lambda e, s, i: full_bind(e, s, i) and None),
    "closed_bind": lambda: per_item(firewall_sessions, lambda e, s, i: e.bind_done(
        full_bind(e, s, i))),
    "user_flow": lambda: max(per_item(securenat_sessions, ftp_flow),
                             per_item(securenat_sessions, redirected_flow)),
    "flow_history": lambda: per_item(securenat_sessions, kernel_flow),
    # with its text, which it keeps once asked for it
    "address": lambda: per_item(nothing, lambda e, _, i: str(packet._address(
        client(i + 10**6).packed)) and None),
    "decision": lambda: decision_size(),
    "policy_answer": policy_answer_size,
    "socks_connection": lambda: max(socks_connections("associated"), socks_connections("relaying")),
    "socks_udp_target": udp_targets,
}


@pytest.mark.parametrize("kind", sorted(memory.ITEM_BYTES))
def test_item_size_covers_its_measurement(kind: str) -> None:
    size = measured(kind)
    stated = memory.ITEM_BYTES[kind]
    assert size <= stated, f"{kind}: {size:.0f} bytes measured, ITEM_BYTES says {stated}"
    assert stated <= size * SLACK + 64, \
        f"{kind}: ITEM_BYTES says {stated}, far above the {size:.0f} bytes measured"


def decision_size() -> float:
    """Bytes one recent decision holds (a drop's: its key and reason); per_item fills the
    deque first, so this one makes it as long as the count."""
    worst = 0.0
    for n in COUNTS:
        with small_memos():
            engine = Engine(POLICY, INTERNAL, history=n)
        full_memos(engine)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                engine.decide(pkt(str(client(i)), str(server(i)), 23), 1.0)
            gc.collect()
            worst = max(worst, (tracemalloc.get_traced_memory()[0] - before) / n)
        finally:
            tracemalloc.stop()
    return worst


def test_the_bound_adds_cap_times_size_for_each_part() -> None:
    small = Limits(sessions_total=10, pending_total=20, binds_total=3, user_flows_total=4,
                   flow_history=5, buffered_bytes_total=MIB, socks_connections_total=6,
                   socks_buffer_bytes=1000, socks_udp_targets=7)
    parts = memory.memory_bound(small)
    items = memory.ITEM_BYTES
    assert parts["socks_connections"] == 6 * (items["socks_connection"] + 2 * 1000
                                              + 7 * items["socks_udp_target"])
    assert parts["sessions"] == 10 * items["session"]
    assert parts["pending"] == 20 * items["pending"]
    assert parts["finished_actions"] == 20 * items["finished_action"]
    assert parts["binds"] == 3 * (items["bind"] + items["closed_bind"])
    assert parts["user_flows"] == 4 * items["user_flow"]
    assert parts["flow_history"] == 5 * items["flow_history"]
    assert parts["buffered_bytes"] == MIB
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    # raising a cap raises the bound by cap times the item
    more = memory.memory_bound(dataclasses.replace(small, sessions_total=11))
    assert more["total"] - parts["total"] == items["session"]


def test_base_covers_the_idle_daemon() -> None:
    """A fresh interpreter with the daemon's modules, the filters and an engine: its
    resident set fits the base figure, with a quarter to spare."""
    code = ("import enforcer.daemon, enforcer.plugins.ftp, enforcer.plugins.tftp\n"
            "from enforcer.core.engine import Engine\n"
            "from enforcer.core.policy import Policy\n"
            "Engine(Policy(), {})\n"
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    rss = int(out.stdout) * 1024
    assert rss * 1.25 <= memory.BASE_BYTES, f"idle daemon RSS {rss / MIB:.1f} MiB"


def test_the_stream_editor_in_the_measure_is_the_daemons() -> None:
    """ftp_flow attaches what the daemon attaches: a guarded FTP filter in an editor."""
    engine = new_engine()
    sessions = securenat_sessions(engine, 1)
    ftp_flow(engine, sessions, 0)
    record = engine.flows.newest(1)[0]
    assert record.app_filter == "ftp" and record.editor is not None
    edited = record.editor.edit(Direction.OUT, 1, None, b"NOOP\r\n")
    assert edited is not None and edited[:3] == (1, None, b"NOOP\r\n")
