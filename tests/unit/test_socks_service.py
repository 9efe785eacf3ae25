"""enforcer.socks_service on loopback (tests/unit/socks_rig.py): the caps and timeouts
(FWC-04), whose UDP datagrams and which replies (FWC-02, FWC-03), the internal side
only (FWC-01), session ends, and resets at every step with nothing raised out of the
loop."""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import uuid
from collections.abc import Callable, Iterator

import pytest
from socks_rig import OUTSIDE, USERS, Rig, reset

from enforcer.core import socks
from enforcer.core.binds import Bind, BindState
from enforcer.core.datafilter import Direction, FilterFailed
from enforcer.core.flags import Flags
from enforcer.core.packet import TCP, UDP
from enforcer.core.permissions import ActionState
from enforcer.core.socks import BIND, UDP_ASSOCIATE, Reply
from enforcer.loop import Loop
from enforcer.socks_service import REFUSALS_LOGGED_EVERY, REFUSING_CLIENTS_APART, RefusalLog, _Pipe

DNS = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2104")
FTP = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101")
S1 = ipaddress.ip_address("198.51.100.21")


@pytest.fixture
def make() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def new(**kwargs: object) -> Rig:
        rigs.append(Rig(**kwargs))  # type: ignore[arg-type]
        return rigs[-1]

    yield new
    for rig in rigs:
        assert rig.errors == 0, "an exception left a callback"
        rig.close()


def served(rig: Rig) -> None:
    """The service still serves: a new client logs in and gets a BIND."""
    s, (code, _, port) = rig.request(BIND, user="bob")
    assert code is Reply.SUCCEEDED and port
    s.close()
    rig.pump()


def nothing_held(rig: Rig) -> None:
    assert not rig.service.clients and rig.service.quota.used == 0
    assert len(rig.engine.sessions) == 0 and rig.engine.bind_ports.in_use == 0
    assert not rig.service.by_session and rig.service.next_deadline() is None


# --- FWC-04: caps and timeouts -----------------------------------------------------------------

@pytest.mark.parametrize("require_auth", [True, False], ids=["login", "no-auth"])
def test_a_client_refused_at_the_session_cap_never_sees_a_success(make: Callable[..., Rig],
                                                                   require_auth: bool) -> None:
    rig = make(require_auth=require_auth, sessions_total=1)

    def handshake(user: str) -> bytes:
        name = user if require_auth else None
        return socks.client_greeting(name) + (socks.client_auth(user, USERS[user]) if name else b"")

    first = rig.connect()
    first.sendall(handshake("alice"))
    assert rig.read(first, 4 if require_auth else 2) == (b"\x05\x02\x01\x00" if require_auth else b"\x05\x00")
    second = rig.connect("127.0.0.5")
    second.sendall(handshake("bob") + socks.client_request(BIND, "0.0.0.0", 0))
    # bob's login is right, but alice's session fills the cap: a failure, no success first
    assert rig.read(second, 10) == (b"\x05\x02\x01\x01" if require_auth else b"\x05\xff")
    assert rig.closed(second)
    assert rig.engine.counters["refused: sessions_total"] == 1
    assert len(rig.engine.sessions) == 1 and rig.engine.bind_ports.in_use == 0


def test_connections_are_capped_per_client_and_in_total(make: Callable[..., Rig]) -> None:
    rig = make(socks_connections_per_client=2, socks_connections_total=3)
    held = [rig.connect("127.0.0.1"), rig.connect("127.0.0.1")]
    refused = rig.connect("127.0.0.1")
    assert rig.closed(refused), "a third connection of one client was served"
    assert rig.engine.counters["refused: socks_connections_per_client"] == 1
    held.append(rig.connect("127.0.0.5"))
    other = rig.connect("127.0.0.6")
    assert rig.closed(other)
    assert rig.engine.counters["refused: socks_connections_total"] == 1
    for s in held:  # those held are served
        assert rig.login(s) == b"\x05\x02\x01\x00"
    status = rig.service.limits_status()
    assert status["socks_connections_total"] == {"cap": 3, "used": 3, "refused": 1}
    assert status["socks_connections_per_client"]["highest"] == 2
    held.pop(0).close()
    rig.pump()
    assert rig.login(rig.connect("127.0.0.1")) == b"\x05\x02\x01\x00", "the freed place is not taken"


def socks_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pinhole.enforcer.socks"]


def test_refusals_are_each_counted_and_logged_a_few_a_client(make: Callable[..., Rig],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Connections to the service are not under the kernel's caps on new flows: a client
    at its cap that went on connecting wrote a line each time. Each refusal is counted;
    the log has the client's first, then a line an interval with how many more."""
    caplog.set_level(logging.INFO, logger="pinhole.enforcer.socks")
    rig = make(socks_connections_per_client=1)
    held = rig.connect("127.0.0.1")
    counters = rig.engine.counters
    for batch in range(10):  # 1000 connections, 100 at a time (the listen backlog takes them)
        made = [socket.create_connection(rig.address, source_address=("127.0.0.1", 0))
                for _ in range(100)]
        for _ in range(1000):
            if counters["refused: socks_connections_per_client"] == 100 * (batch + 1):
                break
            rig.loop.run_once(0.01)
        for s in made:
            s.close()
    assert counters["refused: socks_connections_per_client"] == 1000
    assert rig.login(held) == b"\x05\x02\x01\x00"  # the one held is served
    (first,) = socks_lines(caplog)
    assert first.startswith("SOCKS: refused a connection of 127.0.0.1: the socks_connections_per_client")
    rig.later(REFUSALS_LOGGED_EVERY)
    assert socks_lines(caplog)[1:] == [
        f"SOCKS: 999 more refusals of 127.0.0.1 since the last line about it (the last: {first[7:]})"]
    rig.later(REFUSALS_LOGGED_EVERY)  # none since: nothing to say, and the client is forgotten
    assert len(socks_lines(caplog)) == 2 and len(rig.service.refusals) == 0


def test_the_refusal_log_tells_a_bounded_number_of_clients_apart(caplog: pytest.LogCaptureFixture) -> None:
    """Refusals of many clients: the log holds state for at most REFUSING_CLIENTS_APART
    of them (and the others together), and logs that many lines an interval at most."""
    caplog.set_level(logging.INFO, logger="pinhole.enforcer.socks")
    refusals = RefusalLog()
    clients = [ipaddress.ip_address(0x0A000000 + i) for i in range(5 * REFUSING_CLIENTS_APART)]
    for _ in range(3):
        for client in clients:
            refusals.refused(client, f"refused {client}", 0.0)
            assert len(refusals) <= REFUSING_CLIENTS_APART + 1
    assert len(socks_lines(caplog)) == REFUSING_CLIENTS_APART + 1
    refusals.tick(REFUSALS_LOGGED_EVERY)
    summaries = socks_lines(caplog)[REFUSING_CLIENTS_APART + 1:]
    assert len(summaries) == REFUSING_CLIENTS_APART + 1
    assert summaries[0] == f"SOCKS: 2 more refusals of {clients[0]} since the last line about it " \
        f"(the last: refused {clients[0]})"
    others = 3 * (len(clients) - REFUSING_CLIENTS_APART) - 1
    assert summaries[-1] == f"SOCKS: {others} more refusals of other clients since the last line " \
        f"about it (the last: refused {clients[-1]})"
    refusals.tick(2 * REFUSALS_LOGGED_EVERY)
    assert len(refusals) == 0


def test_a_client_from_outside_is_refused(make: Callable[..., Rig]) -> None:
    """FWC-01 in the service itself: a peer on no internal network (what the weak-host
    model would deliver from outside) is closed unserved."""
    rig = make()
    s = rig.connect(OUTSIDE)
    s.sendall(socks.client_greeting("alice"))
    assert rig.read(s, 2) == b"" and rig.closed(s)
    assert rig.engine.counters["socks: refused a client from outside"] == 1
    nothing_held(rig)


def test_an_idle_or_slow_handshake_is_closed_after_its_timeout(make: Callable[..., Rig]) -> None:
    rig = make(socks_handshake_timeout=5.0)
    idle, slow, logged_in = rig.connect(), rig.connect(), rig.connect()
    slow.sendall(socks.client_greeting("alice"))
    assert rig.read(slow, 2) == b"\x05\x02"
    assert rig.login(logged_in) == b"\x05\x02\x01\x00"
    done, (code, _, _) = rig.request(BIND)
    assert code is Reply.SUCCEEDED
    rig.later(4.9)
    assert not any(rig.closed(s) for s in (idle, slow, logged_in))
    rig.later(0.2)
    assert all(rig.closed(s) for s in (idle, slow, logged_in))
    assert rig.engine.counters["socks: handshake timed out"] == 3
    assert not rig.closed(done), "a connection past its request was closed by the handshake's timeout"
    assert rig.service.quota.used == 1 and len(rig.engine.sessions) == 1


def test_a_bind_waits_for_its_peer_a_bounded_time(make: Callable[..., Rig]) -> None:
    rig = make(socks_bind_timeout=30.0)
    s, (code, address, port) = rig.request(BIND)
    assert code is Reply.SUCCEEDED and address == str(rig.external)
    assert rig.service.next_deadline() == rig.clock.now + 30.0
    rig.later(29.0)
    assert rig.read(s, 10, turns=3) == b""
    rig.later(1.5)
    assert rig.reply(s)[0] is Reply.TTL_EXPIRED and rig.closed(s)
    assert rig.engine.counters["socks: bind timed out"] == 1
    nothing_held(rig)
    peer = socket.socket()
    assert peer.connect_ex((address, port)) != 0, "the bind still listens"
    peer.close()


def test_bytes_sent_before_the_relay_starts_are_bounded(make: Callable[..., Rig]) -> None:
    """After BIND, before the peer: at most socks_buffer_bytes are read, then the client is
    not read; once the peer comes they all reach it, in order."""
    rig = make(socks_buffer_bytes=1000)
    s, (code, address, port) = rig.request(BIND)
    assert code is Reply.SUCCEEDED
    data = bytes(range(256)) * 20
    s.sendall(data)
    rig.pump(10)
    (client,) = rig.service.clients
    assert len(client.early) == 1000 and not client.reading
    assert rig.service.limits_status()["socks_buffer_bytes"] == {"cap": 1000, "highest": 1000,
                                                                 "clients_held": 1}
    peer = socket.create_connection((address, port))
    peer.setblocking(False)
    rig.pump()
    assert rig.reply(s)[0] is Reply.SUCCEEDED
    assert rig.read(peer, len(data), turns=200) == data
    peer.close()


def test_passwords_are_compared_in_constant_time(make: Callable[..., Rig],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import enforcer.socks_service as service

    rig = make()
    compared: list[int] = []

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(len(a) + len(b))
        return a == b

    monkeypatch.setattr(service.hmac, "compare_digest", spy)
    check = rig.service.check
    assert check("alice", USERS["alice"]) and not check("alice", "wrong")
    assert not check("mallory", USERS["alice"]) and not check("mallory", "")
    assert not check("alice", USERS["alice"] + "x")
    # every call compares, digests of one length, known user or not
    assert compared == [64] * 5


def test_the_status_shows_every_socks_cap(make: Callable[..., Rig]) -> None:
    rig = make(socks_udp_targets=7, socks_handshake_timeout=3.0, socks_bind_timeout=4.0)
    status = rig.service.limits_status()
    assert {name for name in rig.engine.limits.to_dict() if name.startswith("socks_")} <= set(status)
    assert status["socks_udp_targets"] == {"cap": 7, "highest": 0, "refused": 0}
    assert status["socks_handshake_timeout"] == {"cap": 3.0, "closed": 0}
    assert status["socks_bind_timeout"] == {"cap": 4.0, "failed": 0}


# --- FWC-02 and FWC-03: a UDP ASSOCIATE ------------------------------------------------------------

def the_session(rig: Rig) -> int:
    (session,) = rig.service.by_session
    return session


def udp_bind(rig: Rig) -> Bind:
    (bind,) = [b for b in rig.engine.binds.of(the_session(rig)) if b.protocol == UDP]
    return bind


def associate(rig: Rig, host: str = "0.0.0.0", port: int = 0) -> tuple[socket.socket, tuple[str, int]]:
    s, (code, address, relay_port) = rig.request(UDP_ASSOCIATE, host, port)
    assert code is Reply.SUCCEEDED, code
    assert address == str(rig.internal) and relay_port == udp_bind(rig).port, "the relay port is the bind's"
    return s, (address, relay_port)


def received(rig: Rig, u: socket.socket) -> list[bytes]:
    out = []
    for _ in range(20):
        rig.pump(1)
        try:
            out.append(u.recv(65535))
        except BlockingIOError:
            continue
    return out


@pytest.mark.parametrize("named", [True, False], ids=["named-endpoint", "first-datagram"])
def test_an_association_relays_for_its_endpoint_only(make: Callable[..., Rig], named: bool) -> None:
    """Datagrams from another port of the client's address are dropped; a peer the bind
    admits is relayed to the endpoint alone."""
    rig = make()
    mine, other = rig.udp(), rig.udp()
    port = mine.getsockname()[1]
    _, relay = associate(rig, "127.0.0.1" if named else "0.0.0.0", port if named else 0)
    bind = udp_bind(rig)
    if not named:
        mine.sendto(socks.build_udp("198.51.100.21", 9, b"first"), relay)  # fixes the endpoint
        rig.pump()
    other.sendto(socks.build_udp("198.51.100.21", 9, b"stolen"), relay)
    rig.pump()
    assert rig.engine.counters["socks: UDP from another source dropped"] == 1
    rig.engine.retroactive_allow_bind(the_session(rig), UDP, None, bind.port, DNS, Flags(0), None,
                                      rig.clock())
    peer = rig.udp("127.0.0.9")
    peer.sendto(b"for the client", (str(rig.external), bind.port))
    got = received(rig, mine)
    assert [socks.parse_udp(d) for d in got] == [("127.0.0.9", peer.getsockname()[1], b"for the client")]
    assert received(rig, other) == [], "a reply went to another endpoint"


def test_an_association_for_another_address_is_refused(make: Callable[..., Rig]) -> None:
    rig = make()
    s, (code, _, _) = rig.request(UDP_ASSOCIATE, "127.0.0.7", 4000)
    assert code is Reply.NOT_ALLOWED and rig.closed(s)
    assert rig.engine.bind_ports.in_use == 0


def test_an_unknown_peer_s_datagram_is_dropped(make: Callable[..., Rig]) -> None:
    """Before RetroactiveAllowBind, what reaches the association from a peer that is no
    two-way target is dropped (the kernel's rules drop it first; this holds without them)."""
    rig = make()
    mine = rig.udp()
    associate(rig, "127.0.0.1", mine.getsockname()[1])
    bind = udp_bind(rig)
    rig.udp("127.0.0.9").sendto(b"unasked", (str(rig.external), bind.port))
    assert received(rig, mine) == []
    assert rig.engine.counters["socks: UDP from an unknown peer dropped"] == 1


# --- sessions -------------------------------------------------------------------------------------

def test_the_session_ends_with_its_last_connection_and_cancels_its_permissions(
        make: Callable[..., Rig]) -> None:
    """AFC-16 on the Firewall-client path: pending with one connection left, cancelled
    with the last."""
    rig = make()
    first, _ = rig.request(BIND)
    second = rig.connect()
    assert rig.login(second) == b"\x05\x02\x01\x00"
    session = the_session(rig)
    perm = rig.engine.allow_future_connect(session, S1, 2021, TCP, Flags(0), FTP, rig.clock())
    first.close()
    rig.pump()
    assert perm.state is ActionState.PENDING and rig.engine.session(session).connections == 1
    second.close()
    rig.pump()
    assert perm.state is ActionState.CANCELLED
    nothing_held(rig)


def test_end_session_fails_a_bind_s_wait_ends_an_association_and_a_pending_request(
        make: Callable[..., Rig]) -> None:
    rig = make()
    waiting, _ = rig.request(BIND)
    association, _ = associate(rig)
    before_request = rig.connect()
    assert rig.login(before_request) == b"\x05\x02\x01\x00"
    session = the_session(rig)
    binds = rig.engine.binds.of(session)
    cancelled = rig.engine.end_session(session, rig.clock())
    assert cancelled == []
    assert rig.reply(waiting)[0] is Reply.GENERAL_FAILURE and rig.closed(waiting)
    assert rig.closed(association) and rig.closed(before_request)
    assert {b.state for b in binds} == {BindState.CLOSED}
    nothing_held(rig)
    served(rig)


def test_a_relay_goes_on_after_end_session(make: Callable[..., Rig]) -> None:
    rig = make()
    s, (_, address, port) = rig.request(BIND)
    peer = socket.create_connection((address, port))
    peer.setblocking(False)
    rig.pump()
    assert rig.reply(s)[0] is Reply.SUCCEEDED
    rig.engine.end_session(the_session(rig), rig.clock())
    s.sendall(b"still relayed")
    assert rig.read(peer, 13) == b"still relayed"
    assert len(rig.service.clients) == 1
    peer.close()
    assert rig.closed(s)
    s.close()
    rig.pump()
    nothing_held(rig)


def test_a_bind_s_peer_sees_its_client_go(make: Callable[..., Rig]) -> None:
    """The connection a BIND took is closed with the client's: its peer is told at once."""
    rig = make()
    s, (_, address, port) = rig.request(BIND)
    peer = socket.create_connection((address, port))
    peer.setblocking(False)
    rig.pump()
    assert rig.reply(s)[0] is Reply.SUCCEEDED
    reset(s)
    assert rig.closed(peer), "the peer's connection outlived the client's"
    nothing_held(rig)


# --- resets at every step -------------------------------------------------------------------------

STEPS = ["connected", "half-greeting", "greeted", "half-login", "logged-in", "half-request",
         "bind-waiting", "bind-early-bytes", "bind-relaying", "associated", "udp-sent"]


def drive(rig: Rig, step: str) -> socket.socket:
    """A client taken to ``step`` (its connection, to be reset there)."""
    s = rig.connect()
    login = socks.client_greeting("alice") + socks.client_auth("alice", USERS["alice"])
    upto = {"connected": b"", "half-greeting": login[:2], "greeted": login[:3],
            "half-login": login[:9], "logged-in": login,
            "half-request": login + socks.client_request(BIND, "0.0.0.0", 0)[:5]}
    if step in upto:
        s.sendall(upto[step])
        rig.pump()
        return s
    command = UDP_ASSOCIATE if step in ("associated", "udp-sent") else BIND
    s.sendall(login + socks.client_request(command, "0.0.0.0", 0))
    rig.read(s, 4)
    code, address, port = rig.reply(s)
    assert code is Reply.SUCCEEDED
    if step == "bind-early-bytes":
        s.sendall(b"x" * 100_000)
    elif step == "bind-relaying":
        conn = socket.create_connection((address, port))
        rig.sockets.append(conn)  # kept open: the relay's other end
        rig.pump()
        rig.reply(s)
        conn.sendall(b"from the peer")
    elif step == "udp-sent":
        u = rig.udp()
        u.sendto(socks.build_udp("198.51.100.21", 53, b"query"), (address, port))
    rig.pump()
    return s


@pytest.mark.parametrize("step", STEPS)
def test_a_reset_at_any_step_raises_nothing_and_leaves_nothing(make: Callable[..., Rig], step: str) -> None:
    rig = make()
    reset(drive(rig, step))
    rig.pump(10)
    if step == "bind-early-bytes":  # a client held (its bytes fill the buffer) is not read:
        rig.later(rig.engine.limits.socks_bind_timeout)  # its wait ends it
    assert rig.errors == 0
    nothing_held(rig)
    served(rig)


@pytest.mark.parametrize("step", ["logged-in", "bind-waiting", "bind-relaying", "associated", "udp-sent"])
def test_end_session_at_any_step_raises_nothing(make: Callable[..., Rig], step: str) -> None:
    rig = make()
    s = drive(rig, step)
    rig.engine.end_session(the_session(rig), rig.clock())
    rig.pump(10)
    assert rig.errors == 0
    if step == "bind-relaying":
        assert len(rig.service.clients) == 1, "the relay did not go on"
    else:
        assert rig.closed(s) and not rig.service.clients
    reset(s)
    rig.pump()
    nothing_held(rig)
    served(rig)


class _FailsOnSecret:
    def on_data(self, direction: Direction, data: bytes) -> bytes:
        if b"secret" in data:
            raise FilterFailed("a filter's bug")
        return data


def _tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(the client's end, the relay's end) of a loopback TCP connection."""
    client = socket.create_connection(listener.getsockname())
    relay, _ = listener.accept()
    relay.setblocking(False)
    return client, relay


def test_a_relay_whose_filter_fails_is_reset_both_ways() -> None:
    """The relay's filter passes what it may, then fails: both ends get a reset, not a
    FIN that would pass the cut stream off as a whole one, and nothing more is relayed."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client, a = _tcp_pair(listener)
        target, b = _tcp_pair(listener)
        loop = Loop()
        closed: list[bool] = []

        def on_close() -> None:
            closed.append(True)
            a.close()
            b.close()

        pipe = _Pipe(loop, a, b, on_close, 1 << 16, _FailsOnSecret())
        pipe.start(b"", b"")
        client.sendall(b"first")
        for _ in range(40):
            loop.run_once(0.05)
            if select.select([target], [], [], 0)[0]:
                break
        assert target.recv(5) == b"first"
        client.sendall(b"secret")
        for _ in range(40):
            if closed:
                break
            loop.run_once(0.05)
        assert closed == [True]
        for end in (client, target):
            end.settimeout(2)
            with pytest.raises(ConnectionResetError):
                end.recv(100)
            end.close()
        loop.close()
