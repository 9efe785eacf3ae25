"""Bounded state (SPEC rules 16 and 18) in the pure core: the caps on sessions, pending
permissions, binds and user-mode flows; idle SecureNAT sessions; user-mode flows held
until conntrack has forgotten them; the status of every cap."""

from __future__ import annotations

import ipaddress
import uuid
from collections import Counter

import pytest
from core_policy import INTERNAL, POLICY, pkt

from enforcer.core import packet
from enforcer.core.binds import RECENT_SENDERS, Bind, BindState
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.flows import (
    RELEASE_MARGIN,
    SYSCTL,
    ConntrackTimeouts,
    FlowRecord,
    FlowTable,
    Lifetime,
    Mode,
)
from enforcer.core.limits import Limits, Quota
from enforcer.core.packet import ICMP, TCP, UDP, FlowKey
from enforcer.core.permissions import STALE_EXPIRIES, ActionState
from enforcer.core.results import InvalidArgument, IsBusy, NotFound, Terminating
from enforcer.core.sessions import Session
from enforcer.core.state import Verdict

ip = ipaddress.ip_address
C1, C2, C3, C6 = "192.0.2.11", "192.0.2.12", "192.0.2.13", "2001:db8:1::11"
S1, S2 = "198.51.100.21", "198.51.100.22"
EXT4 = ip("198.51.100.1")
EXTERNAL = (EXT4, ip("2001:db8:2::1"))
FTP = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101")
DNS = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2104")
SYN, ACK, FIN, RST = packet.TCP_SYN, packet.TCP_ACK, packet.TCP_FIN, packet.TCP_RST
NO_FLAGS = Flags(0)
TIMEOUTS = ConntrackTimeouts()


def make(**caps: float) -> Engine:
    """An engine with these caps, FTP watched by an application filter (its primaries
    run in user mode), a data filter, and NAT's internal address for redirects."""
    return Engine(POLICY, INTERNAL, EXTERNAL, limits=Limits(**caps),  # type: ignore[arg-type]
                  app_filters={"FTP": "ftp"}, data_filters=["shout"],
                  internal_addresses=[ipaddress.ip_interface("192.0.2.1/24")],
                  user_redirect_ports=(63000, 63009), bind_ports=(20000, 20099))


def securenat(engine: Engine, client: str, now: float = 0.0) -> int:
    """The client's SecureNAT session, made by a (kernel-mode) DNS primary."""
    d = engine.decide(pkt(client, S1, 53, proto=UDP, sport=5353), now)
    assert d.verdict is Verdict.ADMIT_KERNEL and d.session_id is not None, d
    return d.session_id


def user_flow(engine: Engine, client: str, sport: int, now: float = 0.0) -> FlowKey:
    """An FTP control connection (user mode), its handshake seen: established."""
    d = engine.decide(pkt(client, S1, 21, sport=sport), now)
    assert d.verdict is Verdict.ADMIT_USER, d
    meta = pkt(S1, client, sport, flags=SYN | ACK, sport=21)
    assert engine.user_packet(meta, 60, now) is not None
    assert engine.user_packet(pkt(client, S1, 21, flags=ACK, sport=sport), 60, now) is not None
    return d.key


def grant(engine: Engine, session: int, port: int, flags: Flags = NO_FLAGS, now: float = 0.0,
          **kwargs: object) -> int:
    return engine.allow_future_connect(session, ip(S1), port, TCP, flags, FTP, now, **kwargs).id  # type: ignore[arg-type]


# --- Quota ----------------------------------------------------------------------------------

def test_quota_counts_per_client_and_in_total_and_names_the_cap_in_the_way() -> None:
    counters: Counter[str] = Counter()
    quota = Quota("binds", Limits(binds_total=3, binds_per_client=2), counters)
    a, b = ip(C1), ip(C2)
    quota.take(a)
    quota.take(a)
    assert not quota.fits(a) and quota.fits(b)
    with pytest.raises(IsBusy, match=r"the binds_per_client cap \(2\) is reached: 192.0.2.11 holds 2"):
        quota.check(a)
    quota.take(b)
    with pytest.raises(IsBusy, match=r"the binds_total cap \(3\) is reached: 3 are held"):
        quota.check(ip(C3))
    assert counters == {"refused: binds_per_client": 1, "refused: binds_total": 1}
    assert quota.fits(b, 0) and not quota.fits(b, 2)
    quota.release(a)
    quota.check(b)  # room again in total
    quota.release(a)
    assert quota.by_client == {b: 1} and quota.used == 1  # no client left at zero


def test_quota_status_shows_caps_use_top_clients_and_refusals() -> None:
    counters: Counter[str] = Counter()
    quota = Quota("sessions", Limits(sessions_total=100, sessions_per_client=9), counters)
    for client, n in ((C1, 1), (C2, 5), (C3, 3), (C6, 2)):
        for _ in range(n):
            quota.take(ip(client))
    counters["refused: sessions_per_client"] += 4
    assert quota.status() == {
        "sessions_total": {"cap": 100, "used": 11, "refused": 0},
        "sessions_per_client": {"cap": 9, "highest": 5, "refused": 4,
                                "top": [[C2, 5], [C3, 3], [C6, 2]]}}
    empty = Quota("binds", Limits(), Counter()).status()
    assert empty["binds_per_client"]["highest"] == 0 and empty["binds_per_client"]["top"] == []


# --- sessions -------------------------------------------------------------------------------

def test_sessions_total_cap_refuses_new_clients_and_keeps_existing_ones() -> None:
    engine = make(sessions_total=2)
    first, second = securenat(engine, C1), securenat(engine, C2)
    d = engine.decide(pkt(C3, S1, 53, proto=UDP), 1.0)
    assert d.verdict is Verdict.DROP
    assert d.reason == "refused: the sessions_total cap (2) is reached: 2 are held"
    assert engine.counters["refused: sessions_total"] == 1
    assert engine.sessions.find(ip(C3)) is None and engine.flows.get(d.key) is None
    # the sessions held go on: their new flows are admitted, nothing was evicted
    assert [s.id for s in engine.sessions] == [first, second]
    for client, session in ((C1, first), (C2, second)):
        again = engine.decide(pkt(client, S1, 53, proto=UDP, sport=6000), 2.0)
        assert again.verdict is Verdict.ADMIT_KERNEL and again.session_id == session
    # a Firewall client's session is refused too (the SOCKS service then fails its request)
    with pytest.raises(IsBusy, match="sessions_total"):
        engine.open_firewall_session(ip(C3), "alice", 3.0)
    # a session that ends makes room
    engine.end_session(first, 4.0)
    assert engine.decide(pkt(C3, S1, 53, proto=UDP), 5.0).verdict is Verdict.ADMIT_KERNEL


def test_sessions_per_client_cap_counts_every_session_of_an_address() -> None:
    engine = make(sessions_per_client=2)
    securenat(engine, C1)
    alice = engine.open_firewall_session(ip(C1), "alice", 1.0)
    with pytest.raises(IsBusy, match=r"sessions_per_client cap \(2\) is reached: 192.0.2.11 holds 2"):
        engine.open_firewall_session(ip(C1), "bob", 1.0)
    assert engine.open_firewall_session(ip(C1), "alice", 2.0) is alice  # its own: no new one
    assert engine.open_firewall_session(ip(C2), "bob", 2.0).client == ip(C2)
    assert engine.counters["refused: sessions_per_client"] == 1
    engine.close_firewall_connection(alice.id, 3.0)
    engine.close_firewall_connection(alice.id, 3.0)
    assert engine.open_firewall_session(ip(C1), "bob", 4.0).user == "bob"


def test_a_user_mode_primary_at_the_session_cap_makes_nothing() -> None:
    engine = make(sessions_total=1)
    securenat(engine, C1)
    d = engine.decide(pkt(C2, S1, 21), 1.0)
    assert d.verdict is Verdict.DROP and "sessions_total" in d.reason
    assert len(engine.sessions) == 1 and engine.flows.held_count == 0


def test_an_idle_securenat_session_ends_and_its_grants_and_binds_with_it() -> None:
    engine = make(session_idle_timeout=10)
    session = securenat(engine, C1, now=0.0)
    perm = grant(engine, session, 2021, Flags.ALLOW_MULTIPLE, now=1.0)
    bind, _ = engine.bind_for_securenat(session, UDP, 7000, 2.0)
    firewall = engine.open_firewall_session(ip(C2), "alice", 0.0)
    engine.expire(11.9)  # the last activity was the bind, at 2.0
    assert engine.sessions.get(session) is not None
    engine.expire(12.0)
    assert engine.sessions.get(session) is None
    assert engine.action(perm, 12.0).state is ActionState.CANCELLED
    assert bind.state is BindState.CLOSED and engine.bind_ports.in_use == 0
    assert engine.counters["sessions ended idle"] == 1
    engine.expire(10_000.0)
    assert engine.sessions.get(firewall.id) is firewall  # a Firewall client's lives on
    # the client's next primary makes a new session
    assert securenat(engine, C1, now=20.0) != session


@pytest.mark.parametrize("activity", ["primary", "secondary", "grant", "bind", "inbound"])
def test_activity_keeps_a_session_from_going_idle(activity: str) -> None:
    engine = make(session_idle_timeout=10)
    session = securenat(engine, C1, now=0.0)
    engine.bind_for_securenat(session, TCP, 7000, 0.0)
    engine.retroactive_allow_bind(session, TCP, None, 7000, FTP, NO_FLAGS, None, 0.0)
    if activity == "secondary":
        grant(engine, session, 2021)
    if activity == "primary":
        engine.decide(pkt(C1, S1, 53, proto=UDP, sport=7777), 8.0)
    elif activity == "secondary":
        assert engine.decide(pkt(C1, S1, 2021), 8.0).verdict is Verdict.ADMIT_KERNEL
    elif activity == "grant":
        grant(engine, session, 2022, now=8.0)
    elif activity == "bind":
        engine.bind_for_securenat(session, TCP, 7001, 8.0)
    else:
        meta = pkt(S1, C1, 7000, sport=20, ingress=packet.Ingress.EXTERNAL)
        assert engine.decide(meta, 8.0).verdict is Verdict.ADMIT_KERNEL
    engine.expire(17.9)
    assert engine.sessions.get(session) is not None
    engine.expire(18.0)
    assert engine.sessions.get(session) is None


def test_a_session_holding_a_user_mode_flow_is_never_idle() -> None:
    """Its filter may call the session API whenever the client speaks again."""
    engine = make(session_idle_timeout=10)
    key = user_flow(engine, C1, 40000, now=0.0)
    session = engine.sessions.find(ip(C1))
    assert session is not None
    engine.expire(5000.0)
    assert engine.sessions.get(session.id) is session
    # the flow closes: conntrack forgets it a closing timeout later, and so does the table
    engine.user_packet(pkt(C1, S1, 21, flags=FIN | ACK, sport=40000), 60, 6000.0)
    engine.user_packet(pkt(S1, C1, 40000, flags=FIN | ACK, sport=21), 60, 6000.0)
    engine.expire(6000.0 + TIMEOUTS.of(Lifetime.TCP_CLOSING) + RELEASE_MARGIN)
    assert engine.flows.find(key) is None
    assert engine.sessions.get(session.id) is session  # idle from now on
    engine.expire(6200.0)
    assert engine.sessions.get(session.id) is None


def test_idle_expiry_looks_only_at_sessions_that_are_due() -> None:
    engine = make(session_idle_timeout=10)
    for i in range(200):
        engine.sessions.securenat(ip(f"192.0.2.{i + 1}"), float(i))
    asked: list[int] = []

    def in_use(session: object) -> bool:
        asked.append(1)
        return False

    assert engine.sessions.idle(9.5, in_use) == []
    assert asked == []
    ended = engine.sessions.idle(14.0, in_use)
    assert [str(s.client) for s in ended] == [f"192.0.2.{i}" for i in range(1, 6)]
    assert len(asked) == 5


# --- pending permissions ------------------------------------------------------------------

def test_pending_per_client_cap() -> None:
    engine = make(pending_per_client=3)
    s1, s2 = securenat(engine, C1), securenat(engine, C2)
    actions = [grant(engine, s1, 3000 + i) for i in range(3)]
    with pytest.raises(IsBusy, match=r"pending_per_client cap \(3\) is reached: 192.0.2.11 holds 3"):
        grant(engine, s1, 3100)
    alice = engine.open_firewall_session(ip(C1), "alice", 0.0)  # another session, same address
    with pytest.raises(IsBusy, match="pending_per_client"):
        grant(engine, alice.id, 3101)
    grant(engine, s2, 3000)  # another client
    assert engine.counters["refused: pending_per_client"] == 2
    assert len(engine.permissions) == 4  # nothing made by the refused calls
    # a redirect of two addresses needs room for two: nothing made, no port taken
    engine.cancel(actions[0], 1.0)
    with pytest.raises(IsBusy, match="pending_per_client"):
        engine.redirect_connections(s1, [(ip(S1), 80), (ip(S1), 81)], TCP, NO_FLAGS, FTP, 1.0)
    assert engine.pools[False].in_use == 0
    # a permission that is consumed, cancelled or expired makes room
    assert engine.decide(pkt(C1, S1, 3001), 2.0).verdict is Verdict.ADMIT_KERNEL
    engine.redirect_connections(s1, [(ip(S1), 80), (ip(S1), 81)], TCP, NO_FLAGS, FTP, 3.0)


def test_pending_total_cap_and_the_per_session_cap_are_counted() -> None:
    engine = make(pending_total=2)
    s1, s2 = securenat(engine, C1), securenat(engine, C2)
    grant(engine, s1, 3000)
    grant(engine, s2, 3000)
    with pytest.raises(IsBusy, match=r"pending_total cap \(2\) is reached: 2 are held"):
        grant(engine, s2, 3001)
    assert engine.counters["refused: pending_total"] == 1
    capped = make()
    s = securenat(capped, C1)
    for i in range(capped.policy.defaults.max_pending_per_session):
        grant(capped, s, 1024 + i)
    with pytest.raises(IsBusy, match="pending permissions"):
        grant(capped, s, 60000)
    assert capped.counters["refused: max_pending_per_session"] == 1


def test_finished_actions_are_remembered_as_many_as_may_be_pending() -> None:
    engine = make(pending_total=3)
    s = securenat(engine, C1)
    finished = []
    for i in range(5):
        finished.append(grant(engine, s, 2000 + i))
        engine.cancel(finished[-1], 1.0)
    for action in finished[2:]:
        with pytest.raises(Terminating):  # cancelled already: its state is still known
            engine.cancel(action, 2.0)
    for action in finished[:2]:
        with pytest.raises(InvalidArgument, match=f"no action {action}"):
            engine.action(action, 2.0)


def test_expiry_entries_of_finished_permissions_do_not_pile_up() -> None:
    engine = make()
    s = securenat(engine, C1)
    for i in range(3 * STALE_EXPIRIES):
        perm = grant(engine, s, 2000 + i % 50, Flags.TIMEOUT, now=float(i) / 100)
        engine.cancel(perm, float(i) / 100)
    assert len(engine.permissions) == 0
    assert len(engine.permissions._expiry) <= STALE_EXPIRIES + 1
    kept = grant(engine, s, 9000, Flags.TIMEOUT, now=50.0)
    assert engine.permissions.next_expiry() == 50.0 + engine.policy.defaults.permission_timeout
    engine.expire(50.0 + engine.policy.defaults.permission_timeout)
    assert engine.action(kept, 200.0).state is ActionState.EXPIRED


# --- binds ---------------------------------------------------------------------------------

def test_binds_per_client_cap_refuses_before_taking_a_port() -> None:
    engine = make(binds_per_client=2)
    fc = engine.open_firewall_session(ip(C1), "alice", 0.0)
    a = engine.bind_for_client(fc.id, TCP, EXT4, 0.0)
    engine.bind_for_client(fc.id, UDP, EXT4, 0.0)
    snat = securenat(engine, C1)
    with pytest.raises(IsBusy, match=r"binds_per_client cap \(2\) is reached: 192.0.2.11 holds 2"):
        engine.bind_for_client(fc.id, TCP, EXT4, 0.0)
    with pytest.raises(IsBusy, match="binds_per_client"):
        engine.bind_for_securenat(snat, TCP, 7000, 0.0)
    assert engine.bind_ports.in_use == 2 and len(engine.binds) == 2
    assert engine.counters["refused: binds_per_client"] == 2
    other = engine.open_firewall_session(ip(C2), "alice", 0.0)
    engine.bind_for_client(other.id, TCP, EXT4, 0.0)
    engine.bind_done(a)  # a closed bind makes room
    engine.bind_for_securenat(snat, TCP, 7000, 1.0)


def test_binds_total_cap() -> None:
    engine = make(binds_total=2)
    for client in (C1, C2):
        engine.bind_for_securenat(securenat(engine, client), UDP, 7000, 0.0)
    with pytest.raises(IsBusy, match=r"binds_total cap \(2\) is reached: 2 are held"):
        engine.bind_for_securenat(securenat(engine, C3), UDP, 7000, 0.0)
    assert engine.counters["refused: binds_total"] == 1


def closed_binds(engine: Engine, count: int) -> tuple[Session, list[Bind]]:
    """A Firewall client's session (C1's) that opened and closed ``count`` binds, in order."""
    fc = engine.open_firewall_session(ip(C1), "alice", 0.0)
    binds = []
    for _ in range(count):
        bind = engine.bind_for_client(fc.id, TCP, EXT4, 0.0)
        engine.bind_done(bind)
        binds.append(bind)
    return fc, binds


def test_a_session_s_closed_binds_do_not_push_out_another_s() -> None:
    """Each session remembers at most binds_per_client closed binds (the oldest go): a
    client that opens and closes binds without end keeps its list short, and another
    session's closed binds stay FWX_E_TERMINATING."""
    engine = make(binds_total=8, binds_per_client=2)
    other = engine.open_firewall_session(ip(C2), "bob", 0.0)
    theirs = engine.bind_for_client(other.id, TCP, EXT4, 0.0)
    engine.bind_done(theirs)
    fc, binds = closed_binds(engine, 20)
    assert [b.id for b in engine.binds.of(fc.id)] == [b.id for b in binds[-2:]]
    assert engine.binds.closed_count == 3
    with pytest.raises(Terminating, match="is closed"):
        engine.retroactive_allow_bind(other.id, TCP, EXT4, theirs.port, FTP, NO_FLAGS, None, 1.0)


def test_a_session_forgets_the_bind_it_closed_first_not_the_one_it_made_first() -> None:
    """The session's closed binds are kept by when they closed: one made first and closed
    last is still FWX_E_TERMINATING; the one closed first is forgotten (NOT_FOUND)."""
    engine = make(binds_per_client=2)
    fc = engine.open_firewall_session(ip(C1), "alice", 0.0)
    made_first = engine.bind_for_client(fc.id, TCP, EXT4, 0.0)
    closed_first = engine.bind_for_client(fc.id, TCP, EXT4, 0.0)
    engine.bind_done(closed_first)
    closed_second = engine.bind_for_client(fc.id, TCP, EXT4, 1.0)
    engine.bind_done(closed_second)
    engine.bind_done(made_first)
    for kept in (closed_second, made_first):
        with pytest.raises(Terminating, match="is closed"):
            engine.retroactive_allow_bind(fc.id, TCP, EXT4, kept.port, FTP, NO_FLAGS, None, 2.0)
    with pytest.raises(NotFound):
        engine.retroactive_allow_bind(fc.id, TCP, EXT4, closed_first.port, FTP, NO_FLAGS, None, 2.0)


def test_closed_binds_are_remembered_for_a_while_then_forgotten() -> None:
    engine = make(binds_total=3)
    fc, binds = closed_binds(engine, 5)
    assert engine.binds.closed_count == 3
    assert [b.id for b in engine.binds.of(fc.id)] == [b.id for b in binds[2:]]
    recent, forgotten = binds[-1], binds[0]
    with pytest.raises(Terminating, match="is closed"):
        engine.retroactive_allow_bind(fc.id, TCP, EXT4, recent.port, FTP, NO_FLAGS, None, 1.0)
    assert forgotten.port not in {b.port for b in binds[2:]}  # the pool hands out new ports first
    with pytest.raises(NotFound):
        engine.retroactive_allow_bind(fc.id, TCP, EXT4, forgotten.port, FTP, NO_FLAGS, None, 1.0)
    # an ended session's binds are forgotten with it
    engine.close_firewall_connection(fc.id, 2.0)
    assert engine.binds.closed_count == 0 and engine.binds.of(None) == []


def test_a_bind_remembers_its_most_recent_senders_only() -> None:
    engine = make()
    fc = engine.open_firewall_session(ip(C1), "alice", 0.0)
    bind = engine.bind_for_client(fc.id, UDP, EXT4, 0.0)
    engine.retroactive_allow_bind(fc.id, UDP, EXT4, bind.port, DNS, Flags.BIDIRECTIONAL, None, 0.0)
    peers = [ip(f"198.51.100.{100 + i}") for i in range(RECENT_SENDERS + 4)]
    for peer in peers:
        engine.heard(bind, peer, 53, 1.0)
    engine.heard(bind, peers[0], 53, 2.0)  # heard again: the most recent
    assert len(bind.recent) == RECENT_SENDERS
    assert bind.may_answer(peers[0], 53, 2.0) and bind.may_answer(peers[-1], 53, 2.0)
    assert not any(bind.may_answer(p, 53, 2.0) for p in peers[1:5])
    engine.bind_done(bind)
    assert bind.recent == {}


# --- user-mode flows: caps -----------------------------------------------------------------

def test_user_flows_per_client_cap_refuses_new_user_mode_flows() -> None:
    engine = make(user_flows_per_client=2)
    first = user_flow(engine, C1, 40001)
    user_flow(engine, C1, 40002)
    d = engine.decide(pkt(C1, S1, 21, sport=40003), 1.0)
    assert d.verdict is Verdict.DROP
    assert d.reason == ("refused: the user_flows_per_client cap (2) is reached: "
                        "192.0.2.11 holds 2")
    assert engine.counters["refused: user_flows_per_client"] == 1
    # kernel-mode flows are not held, and not refused
    assert engine.decide(pkt(C1, S1, 53, proto=UDP, sport=7), 1.0).verdict is Verdict.ADMIT_KERNEL
    user_flow(engine, C2, 40001)  # another client
    # the held flows go on
    found = engine.user_packet(pkt(C1, S1, 21, flags=ACK, sport=40001), 100, 2.0)
    assert found is not None and found[0].key == first and found[0].bytes_out == 160


def test_user_flows_total_cap() -> None:
    engine = make(user_flows_total=2)
    user_flow(engine, C1, 40001)
    user_flow(engine, C2, 40001)
    d = engine.decide(pkt(C3, S1, 21, sport=40001), 1.0)
    assert d.verdict is Verdict.DROP and "user_flows_total cap (2) is reached: 2 are held" in d.reason
    # no session was made for the refused flow
    assert engine.sessions.find(ip(C3)) is None


def test_a_user_mode_grant_at_the_cap_is_not_consumed() -> None:
    engine = make(user_flows_per_client=1)
    user_flow(engine, C1, 40001, now=0.0)
    session = engine.sessions.find(ip(C1))
    assert session is not None
    action = grant(engine, session.id, 2021, Flags.NO_KERNEL_MODE)
    d = engine.decide(pkt(C1, S1, 2021), 1.0)
    assert d.verdict is Verdict.DROP and "user_flows_per_client" in d.reason
    assert engine.action(action, 1.0).state is ActionState.PENDING
    # a kernel-mode grant to the same target is used meanwhile
    kernel = grant(engine, session.id, 2021)
    assert engine.decide(pkt(C1, S1, 2021, sport=1), 1.0).action_id == kernel
    # the held flow ends (RST): once conntrack has surely forgotten it, there is room
    engine.user_packet(pkt(S1, C1, 40001, flags=RST, sport=21), 40, 2.0)
    engine.expire(2.0 + TIMEOUTS.of(Lifetime.TCP_RESET) + RELEASE_MARGIN)
    admitted = engine.decide(pkt(C1, S1, 2021, sport=2), 400.0)
    assert admitted.verdict is Verdict.ADMIT_USER and admitted.action_id == action


def test_a_user_mode_redirect_at_the_cap_is_refused_and_kept() -> None:
    engine = make(user_flows_per_client=1)
    user_flow(engine, C1, 40001)
    session = engine.sessions.find(ip(C1))
    assert session is not None
    (internal, base), (action,) = engine.redirect_connections(
        session.id, [(ip(S2), 8080)], TCP, Flags.NO_KERNEL_MODE, FTP, 1.0)
    assert engine.redirect_packet(pkt(C1, str(internal), base, sport=5000), 60, 1.0) is None
    assert engine.recent[-1].reason.startswith("refused: the user_flows_per_client cap")
    assert action.state is ActionState.PENDING


def test_relayed_flows_are_history_and_never_refused() -> None:
    engine = make(user_flows_total=1)
    fc = engine.open_firewall_session(ip(C1), "alice", 0.0)
    for port in (1, 2, 3):
        d = engine.client_connect(fc.id, TCP, ip(S1), 21, port, 1.0)
        assert d.verdict is Verdict.ADMIT_USER
        record = engine.flows.get(d.key)
        assert record is not None and record.relayed and record.held_as is None
    assert engine.flows.held_count == 0 and engine.flows.history_count == 3


# --- user-mode flows: held until conntrack forgets them ------------------------------------

def test_a_flood_of_kernel_mode_flows_never_evicts_a_user_mode_flow() -> None:
    engine = make(flow_history=3)
    key = user_flow(engine, C1, 40000)
    record = engine.flows.get(key)
    assert record is not None
    record.data_filter = "shout"
    for sport in range(1, 50):
        engine.decide(pkt(C2, S1, 53, proto=UDP, sport=sport), 1.0)
    assert engine.flows.history_count == 3
    assert engine.user_packet(pkt(S1, C1, 40000, flags=ACK, sport=21), 10, 2.0) == (record, False)
    assert record.data_filter == "shout"


def flow(protocol: int = TCP, *, one_way: bool = False) -> FlowRecord:
    key = FlowKey(protocol, ip(C1), 40000, ip(S1), 21 if protocol == TCP else 53)
    return FlowRecord(key, 1, "FTP", Mode.USER, 0.0, one_way=one_way)


def release_time(table: FlowTable, record: FlowRecord, until: float = 1e7, step: float = 0.5) -> float:
    """When ``expire`` first lets the record go (searching in ``step`` seconds)."""
    low, high = record.last_seen, until
    assert table.find(record.key) is not None
    while high - low > step:
        mid = (low + high) / 2
        probe = FlowTable(timeouts=table.timeouts)
        twin = FlowRecord(record.key, 1, "FTP", Mode.USER, 0.0)
        for field in ("packets_out", "packets_back", "fins", "reset", "confirmed", "one_way",
                      "last_seen"):
            setattr(twin, field, getattr(record, field))
        probe.add(twin, record.last_seen)
        if probe.expire(mid):
            high = mid
        else:
            low = mid
    return high


@pytest.mark.parametrize(("packets", "lifetime"), [
    ([(True, SYN)], Lifetime.TCP_OPENING),
    ([(True, SYN), (False, SYN | ACK)], Lifetime.TCP_OPENING),
    ([(True, SYN), (False, SYN | ACK), (True, ACK)], Lifetime.TCP_ESTABLISHED),
    ([(True, SYN), (False, SYN | ACK), (True, ACK), (True, FIN | ACK)], Lifetime.TCP_CLOSING),
    ([(True, SYN), (False, SYN | ACK), (True, ACK), (False, FIN | ACK), (True, ACK)],
     Lifetime.TCP_CLOSING),
    ([(True, SYN), (False, RST | ACK)], Lifetime.TCP_RESET),
    ([(True, SYN), (False, SYN | ACK), (True, ACK), (True, FIN), (False, RST)], Lifetime.TCP_RESET),
    # a RST conntrack kept the connection through (its sequence number was off)
    ([(True, SYN), (False, SYN | ACK), (True, ACK), (False, RST), (True, ACK)],
     Lifetime.TCP_ESTABLISHED),
], ids=["syn", "syn-ack", "established", "fin", "fin-back", "refused", "reset", "reset-survived"])
def test_tcp_lifetime_follows_what_the_enforcer_saw(packets: list[tuple[bool, int]],
                                                     lifetime: Lifetime) -> None:
    record = flow()
    for i, (forward, flags) in enumerate(packets):
        record.saw(forward, 40, float(i), flags)
    assert record.lifetime is lifetime
    timeouts = ConntrackTimeouts(tcp_syn_sent=100, tcp_syn_recv=50, tcp_established=9000,
                                 tcp_fin_wait=80, tcp_close_wait=40, tcp_last_ack=20,
                                 tcp_time_wait=70, tcp_close=7, tcp_max_retrans=30)
    table = FlowTable(timeouts=timeouts)
    table.add(record, record.last_seen)
    expected = {Lifetime.TCP_OPENING: 100, Lifetime.TCP_ESTABLISHED: 9000, Lifetime.TCP_CLOSING: 80,
                Lifetime.TCP_RESET: 30}[lifetime]
    released = release_time(table, record)
    assert record.last_seen + expected + RELEASE_MARGIN <= released <= \
        record.last_seen + expected + RELEASE_MARGIN + 0.5


@pytest.mark.parametrize(("replied", "one_way", "lifetime"), [
    (False, False, Lifetime.UDP_UNREPLIED), (True, False, Lifetime.UDP_STREAM),
    # replies the kernel drops (one-way) still make conntrack's entry a stream
    (False, True, Lifetime.UDP_STREAM)])
def test_udp_lifetime(replied: bool, one_way: bool, lifetime: Lifetime) -> None:
    record = flow(UDP, one_way=one_way)
    record.saw(True, 40, 1.0)
    if replied:
        record.saw(False, 40, 2.0)
    assert record.lifetime is lifetime
    assert flow(ICMP).lifetime is Lifetime.OTHER


def test_conntrack_timeouts_by_sysctl_name_and_class() -> None:
    assert SYSCTL["tcp_established"] == "nf_conntrack_tcp_timeout_established"
    assert SYSCTL["tcp_max_retrans"] == "nf_conntrack_tcp_timeout_max_retrans"
    assert SYSCTL["udp"] == "nf_conntrack_udp_timeout"
    assert SYSCTL["udp_stream"] == "nf_conntrack_udp_timeout_stream"
    assert SYSCTL["generic"] == "nf_conntrack_generic_timeout"
    read = ConntrackTimeouts.from_sysctl({"nf_conntrack_tcp_timeout_established": 3600,
                                          "nf_conntrack_udp_timeout_stream": 20,
                                          "nf_conntrack_udp_timeout": 45, "unrelated": 1})
    assert read == ConntrackTimeouts(tcp_established=3600, udp=45, udp_stream=20)
    assert read.of(Lifetime.UDP_STREAM) == 45  # the longer of the two can apply
    assert read.of(Lifetime.TCP_ESTABLISHED) == 3600
    assert TIMEOUTS.of(Lifetime.TCP_OPENING) == 120 and TIMEOUTS.of(Lifetime.TCP_CLOSING) == 120
    assert TIMEOUTS.of(Lifetime.TCP_RESET) == 300  # after retransmissions, not CLOSE's 10
    assert ConntrackTimeouts(tcp_close=20, tcp_max_retrans=5).of(Lifetime.TCP_RESET) == 20
    assert TIMEOUTS.of(Lifetime.OTHER) == 600


def test_released_in_order_of_last_packet_within_a_class() -> None:
    released: list[int] = []
    table = FlowTable(timeouts=ConntrackTimeouts(udp=10),
                      on_release=lambda r, now: released.append(r.key.sport))
    records = []
    for sport in (1, 2, 3):
        record = FlowRecord(FlowKey(UDP, ip(C1), sport, ip(S1), 53), 7, "DNS", Mode.USER, 0.0)
        record.saw(True, 10, float(sport))
        table.add(record, float(sport))
        records.append(record)
    table.saw(records[0], True, 10, 5.0)  # the first moves behind the others
    assert table.expire(3.0 + 10 + RELEASE_MARGIN) == records[1:]
    assert released == [2, 3] and table.holds(7)
    assert table.expire(5.0 + 10 + RELEASE_MARGIN) == records[:1]
    assert not table.holds(7) and table.quota.used == 0 and len(table) == 0


def test_a_new_flow_with_a_held_flows_key_replaces_it() -> None:
    released: list[FlowRecord] = []
    table = FlowTable(on_release=lambda r, now: released.append(r))
    old = flow()
    table.add(old, 0.0)
    new = flow()
    table.add(new, 1.0)
    assert released == [old] and table.held_count == 1 and table.get(old.key) is new
    # the flow seen from the other end is the same flow
    other = FlowRecord(FlowKey(TCP, ip(S1), 21, ip(C1), 40000), 2, "x", Mode.KERNEL, 2.0)
    table.add(other, 2.0)
    assert released == [old, new] and table.held_count == 0 and table.history_count == 1
    # and a kernel-mode flow's record too, by the flow from its other end
    again = FlowRecord(FlowKey(TCP, ip(C1), 40000, ip(S1), 21), 2, "x", Mode.KERNEL, 3.0)
    table.add(again, 3.0)
    assert table.history_count == 1 and table.find(other.key) is None
    assert table.get(again.key) is again


def test_the_held_flows_seen_since_a_time_are_those_a_worker_reports() -> None:
    """``seen_since`` (what a worker sends back): every held flow seen at that time or
    later, of every timeout class, and no kernel-mode flow's record."""
    table = FlowTable()
    for sport, (proto, at) in enumerate(((TCP, 1.0), (UDP, 2.0), (TCP, 3.0), (UDP, 4.0)), 40000):
        record = FlowRecord(FlowKey(proto, ip(C1), sport, ip(S1), 53), 7, "x", Mode.USER, at)
        record.saw(True, 10, at)
        table.add(record, at)
    table.add(FlowRecord(FlowKey(TCP, ip(C1), 1, ip(S1), 21), 7, "x", Mode.KERNEL, 5.0), 5.0)
    assert sorted(r.key.sport for r in table.seen_since(2.0)) == [40001, 40002, 40003]
    assert table.seen_since(4.5) == []


def test_a_released_flow_is_unknown_and_its_packets_are_dropped_counted() -> None:
    engine = make()
    key = user_flow(engine, C1, 40000, now=0.0)
    record = engine.flows.get(key)
    assert record is not None
    icmp_error_inner = FlowKey(TCP, ip(S1), 21, ip(C1), 40000)  # a quoted reply
    assert engine.related(icmp_error_inner) == (record, False)
    engine.user_packet(pkt(C1, S1, 21, flags=RST, sport=40000), 40, 1.0)
    engine.expire(1.0 + TIMEOUTS.of(Lifetime.TCP_RESET) + RELEASE_MARGIN)
    assert engine.user_packet(pkt(C1, S1, 21, flags=ACK, sport=40000), 40, 400.0) is None
    assert engine.related(None) is None
    assert engine.related(icmp_error_inner) is None
    assert engine.counters["dropped: unknown user-mode flow"] == 2
    assert engine.flows.quota.used == 0


def test_a_kernel_mode_flow_is_not_a_user_mode_one() -> None:
    engine = make()
    d = engine.decide(pkt(C1, S1, 53, proto=UDP, sport=9), 0.0)
    assert engine.flows.find(d.key) is not None  # history
    assert engine.user_packet(pkt(C1, S1, 53, proto=UDP, sport=9), 40, 0.5) is None
    assert engine.related(d.key) is None


# --- status ---------------------------------------------------------------------------------

def test_limits_status_shows_every_cap_its_use_and_refusals() -> None:
    engine = make(sessions_total=3, user_flows_per_client=1, flow_history=7)
    user_flow(engine, C1, 40000)
    securenat(engine, C2)
    engine.decide(pkt(C1, S1, 21, sport=40001), 1.0)  # refused: user_flows_per_client
    engine.decide(pkt(C3, S1, 53, proto=UDP), 1.0)
    engine.decide(pkt("192.0.2.14", S1, 53, proto=UDP), 1.0)  # refused: sessions_total
    status = engine.limits_status()
    assert set(Limits().to_dict()) <= set(status)
    assert status["sessions_total"] == {"cap": 3, "used": 3, "refused": 1}
    assert status["sessions_per_client"]["highest"] == 1
    assert status["user_flows_per_client"] == {"cap": 1, "highest": 1, "top": [[C1, 1]],
                                               "refused": 1}
    assert status["user_flows_total"]["used"] == 1
    assert status["flow_history"] == {"cap": 7, "used": 2}
    assert status["session_idle_timeout"] == {"cap": 900.0, "ended": 0}
    assert status["max_pending_per_session"]["cap"] == 1024
    assert status["flows_per_client"] == {"cap": Limits.flows_per_client}  # the kernel's
    assert status["buffered_bytes_total"] == {"cap": Limits.buffered_bytes_total}


def test_an_unknown_session_is_still_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="no session 99"):
        make().bind_for_client(99, TCP, EXT4, 0.0)
