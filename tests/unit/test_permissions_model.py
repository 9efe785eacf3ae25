"""The Engine's permissions against a reference model (SPEC.md "Resolved semantics" 1-5).

A hypothesis state machine drives one Engine through grants, new flows, cancels,
clock steps, session ends and primaries, and after every step compares it with a
plain model: a list of grants with their state. The model is written from the
spec, not from the implementation:

- a new flow matches a pending grant by (IP protocol, client, target, target port)
  of the client's current session; the oldest such grant is used, and consumed
  unless it has ALLOW_MULTIPLE;
- a TIMEOUT grant expires when ``now >= created + permission_timeout``, whether or
  not anything has swept the table yet;
- Cancel turns a pending grant into a cancelled one; anything else is
  FWX_E_TERMINATING; an unknown action is E_INVALIDARG;
- session end cancels every pending grant of the session (not the ones that have
  already expired) and forgets the session; a later primary makes a new one;
- IsBusy exactly when the session already has ``max_pending_per_session`` pending.

Example-based tests for the tricky cases follow the state machine.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from enforcer.core import packet
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.packet import TCP, UDP, FlowKey, Ingress, IPAddress, PacketMeta
from enforcer.core.permissions import ActionState, Permission, PermissionTable, pack_key, unpack_key
from enforcer.core.policy import Defaults, Policy, PortRange, ProtocolDef, ProtocolRule, SiteRule
from enforcer.core.results import InvalidArgument, IsBusy, NetworkRulesDenied, Terminating
from enforcer.core.state import Decision, Verdict, permission_key

ip = ipaddress.ip_address
net = ipaddress.ip_network

T = 4.0  # permission_timeout: small, and a multiple of the clock steps below (exact floats)
CAP = 5  # max_pending_per_session
FTP_GUID = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101")
FTP_PORT = 21
INTERNAL = net("192.0.2.0/24")
SERVERS = net("198.51.100.0/24")
POLICY = Policy(
    protocols=(ProtocolDef("FTP", FTP_GUID, TCP, (PortRange(FTP_PORT, FTP_PORT),)),),
    protocol_rules=(ProtocolRule("clients", True, frozenset({"FTP"}), (INTERNAL,), None),),
    site_rules=(SiteRule("servers", True, (SERVERS,)),),
    defaults=Defaults(permission_timeout=T, max_pending_per_session=CAP),
)
EXTERNAL = (ip("198.51.100.1"), ip("198.51.100.2"))
SERVER = ip("198.51.100.21")
CLIENTS = (ip("192.0.2.11"), ip("192.0.2.12"), ip("192.0.2.13"))
# Two allowed targets, and one that no site rule allows (NetworkRulesDenied, never admitted).
TARGETS = (ip("198.51.100.21"), ip("198.51.100.22"), ip("203.0.113.9"))
# 21 is also the FTP primary port: a TCP SYN to it that no permission matches is a primary.
PORTS = (21, 2000, 2001)
SYN = packet.TCP_SYN
SYN_ACK = packet.TCP_SYN | packet.TCP_ACK
UNKNOWN_ACTION = 10**9

# Flags the grant rule picks from; the last two are E_INVALIDARG.
GRANT_FLAGS = st.sampled_from([
    (Flags(0), None),
    (Flags.ALLOW_MULTIPLE, None),
    (Flags.TIMEOUT, None),
    (Flags.TIMEOUT, None),
    (Flags.BIDIRECTIONAL, UDP),
    (Flags.TIMEOUT | Flags.ALLOW_MULTIPLE, None),
    (Flags.BIDIRECTIONAL, TCP),
])


def syn(client: IPAddress, target: IPAddress, port: int, *, sport: int = 40000,
        protocol: int = TCP, tcp_flags: int = SYN) -> PacketMeta:
    return PacketMeta(FlowKey(protocol, client, sport, target, port), Ingress.INTERNAL,
                      tcp_flags if protocol == TCP else 0)


def new_engine() -> Engine:
    return Engine(POLICY, {"int0": (INTERNAL,)}, EXTERNAL)


def start_session(engine: Engine, client: IPAddress, now: float) -> int:
    d = engine.decide(syn(client, SERVER, FTP_PORT, sport=1), now)
    assert d.verdict is Verdict.ADMIT_KERNEL and d.session_id is not None
    return d.session_id


# --- the reference model --------------------------------------------------------------------

@dataclass
class Grant:
    id: int
    session: int
    protocol: int
    client: IPAddress
    target: IPAddress
    port: int
    flags: Flags
    created: float
    state: ActionState = ActionState.PENDING
    admitted: int = 0

    @property
    def expires(self) -> float | None:
        return self.created + T if Flags.TIMEOUT in self.flags else None

    def state_at(self, now: float) -> ActionState:
        expires = self.expires
        if self.state is ActionState.PENDING and expires is not None and now >= expires:
            return ActionState.EXPIRED
        return self.state


def engine_state_at(perm: Permission, now: float) -> ActionState:
    """The state an engine permission is in at ``now``, swept or not."""
    if perm.state is ActionState.PENDING and perm.expires is not None and now >= perm.expires:
        return ActionState.EXPIRED
    return perm.state


class PermissionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = new_engine()
        self.now = 1000.0
        self.grants: list[Grant] = []  # oldest first, never removed
        self.sessions: dict[IPAddress, int] = {}  # client -> its live session
        self.ended: list[int] = []
        self.next_session = 1
        self.next_action = 1
        self.sport = 30000

    # --- model helpers ----------------------------------------------------------------------
    def pending(self, session: int) -> list[Grant]:
        return [g for g in self.grants
                if g.session == session and g.state_at(self.now) is ActionState.PENDING]

    def expect_session(self, client: IPAddress) -> int:
        """The client's session, made by a primary if it has none."""
        if client not in self.sessions:
            self.sessions[client] = self.next_session
            self.next_session += 1
        return self.sessions[client]

    def fresh_sport(self) -> int:
        self.sport += 1
        return self.sport

    # --- rules --------------------------------------------------------------------------------
    @initialize()
    def two_sessions(self) -> None:
        for client in CLIENTS[:2]:
            expected = self.expect_session(client)
            assert start_session(self.engine, client, self.now) == expected

    @rule(data=st.data(), dst=st.sampled_from((*TARGETS[:2], *TARGETS)), port=st.sampled_from(PORTS),
          protocol=st.sampled_from([TCP, UDP]), flags=GRANT_FLAGS)
    def grant(self, data: st.DataObject, dst: IPAddress, port: int, protocol: int,
              flags: tuple[Flags, int | None]) -> None:
        live = sorted(self.sessions.values())
        # Mostly a live session; now and then one that has ended (E_INVALIDARG).
        choices = live * 4 + self.ended[-1:]
        if not choices:
            return
        session = data.draw(st.sampled_from(choices), label="session")
        flag, forced_protocol = flags
        self.try_grant(session, dst, port, forced_protocol or protocol, flag)

    @rule(data=st.data(), flags=GRANT_FLAGS)
    def grant_again(self, data: st.DataObject, flags: tuple[Flags, int | None]) -> None:
        """The same AllowFutureConnect as an earlier one (an independent grant, rule 5)."""
        if not self.grants:
            return
        g = data.draw(st.sampled_from(self.grants), label="like")
        flag, forced_protocol = flags
        if forced_protocol not in (None, g.protocol):
            flag = Flags(0)
        self.try_grant(g.session, g.target, g.port, g.protocol, flag)

    def try_grant(self, session: int, target: IPAddress, port: int, protocol: int,
                  flag: Flags) -> None:
        client = next((c for c, s in self.sessions.items() if s == session), None)
        expected: type[Exception] | None = None
        bad_flags = ((Flags.TIMEOUT in flag and Flags.ALLOW_MULTIPLE in flag)
                     or (Flags.BIDIRECTIONAL in flag and protocol == TCP))
        if bad_flags:
            expected = InvalidArgument
        elif client is None:
            expected = InvalidArgument  # the session has ended
        elif target not in SERVERS:
            expected = NetworkRulesDenied
        elif len(self.pending(session)) >= CAP:
            expected = IsBusy

        before = len(self.engine.permissions.pending())
        try:
            perm = self.engine.allow_future_connect(session, target, port, protocol, flag, FTP_GUID,
                                                    self.now)
        except (InvalidArgument, NetworkRulesDenied, IsBusy) as exc:
            assert expected is not None, f"unexpected {exc!r}"
            assert type(exc) is expected, f"expected {expected.__name__}, got {exc!r}"
            # Nothing was created (the count can only drop, by a sweep of expired ones).
            assert len(self.engine.permissions.pending()) <= before
            return
        assert expected is None, f"expected {expected.__name__}, got action {perm.id}"
        assert client is not None
        assert perm.id == self.next_action
        assert perm.state is ActionState.PENDING
        assert perm.session_id == session
        assert perm.key == permission_key(protocol, client, target, port)
        assert perm.flags == flag
        assert perm.created == self.now
        assert perm.expires == (self.now + T if Flags.TIMEOUT in flag else None)
        self.next_action += 1
        self.grants.append(Grant(perm.id, session, protocol, client, target, port, flag, self.now))

    @rule(client=st.sampled_from(CLIENTS), dst=st.sampled_from(TARGETS),
          port=st.sampled_from(PORTS), protocol=st.sampled_from([TCP, UDP]),
          bare_syn=st.booleans() | st.just(True))
    def new_flow(self, client: IPAddress, dst: IPAddress, port: int, protocol: int,
                 bare_syn: bool) -> None:
        meta = syn(client, dst, port, sport=self.fresh_sport(), protocol=protocol,
                   tcp_flags=SYN if bare_syn else SYN_ACK)
        d = self.engine.decide(meta, self.now)
        self.check_flow(meta, d)

    @rule(data=st.data())
    def flow_for_grant(self, data: st.DataObject) -> None:
        """A new flow with the key of some grant (which may be used up, expired or cancelled)."""
        if not self.grants:
            return
        g = data.draw(st.sampled_from(self.grants), label="grant")
        meta = syn(g.client, g.target, g.port, sport=self.fresh_sport(), protocol=g.protocol)
        d = self.engine.decide(meta, self.now)
        self.check_flow(meta, d)

    @rule(client=st.sampled_from(CLIENTS))
    def primary(self, client: IPAddress) -> None:
        """An FTP control connection; it (re)creates the client's session if it has none."""
        meta = syn(client, SERVER, FTP_PORT, sport=self.fresh_sport())
        d = self.engine.decide(meta, self.now)
        self.check_flow(meta, d)

    def check_flow(self, meta: PacketMeta, d: Decision) -> None:
        k = meta.key
        assert d.key == k and d.at == self.now
        if k.protocol == TCP and not meta.starts_tcp_connection:
            assert d.verdict is Verdict.DROP, d
            return
        session = self.sessions.get(k.src)
        match = next((g for g in self.grants
                      if g.state_at(self.now) is ActionState.PENDING and g.session == session
                      and (g.protocol, g.client, g.target, g.port)
                      == (k.protocol, k.src, k.dst, k.dport)), None)
        if match is not None:
            assert d.verdict is Verdict.ADMIT_KERNEL, (d, match)
            assert d.action_id == match.id, (d, match)
            assert d.session_id == match.session
            assert d.one_way == (k.protocol == UDP and Flags.BIDIRECTIONAL not in match.flags)
            match.admitted += 1
            if Flags.ALLOW_MULTIPLE not in match.flags:
                match.state = ActionState.CONSUMED
            return
        if k.protocol == TCP and k.dport == FTP_PORT and k.dst in SERVERS:
            expected_session = self.expect_session(k.src)
            assert d.verdict is Verdict.ADMIT_KERNEL, d
            assert d.action_id is None and d.protocol == "FTP"
            assert d.session_id == expected_session
            return
        assert d.verdict is Verdict.DROP, d
        assert d.action_id is None

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if not self.grants:
            return
        ids = [g.id for g in self.grants] * 3 + [UNKNOWN_ACTION]
        action = data.draw(st.sampled_from(ids), label="action")
        grant = next((g for g in self.grants if g.id == action), None)
        try:
            perm = self.engine.cancel(action, self.now)
        except InvalidArgument:
            assert grant is None
            return
        except Terminating:
            assert grant is not None
            assert grant.state_at(self.now) is not ActionState.PENDING
            return
        assert grant is not None and grant.state_at(self.now) is ActionState.PENDING
        assert perm.id == action and perm.state is ActionState.CANCELLED
        grant.state = ActionState.CANCELLED

    @rule(data=st.data())
    def query(self, data: st.DataObject) -> None:
        """Engine.action: the state as the API reports it (it sweeps first)."""
        if not self.grants:
            return
        grant = data.draw(st.sampled_from(self.grants), label="grant")
        perm = self.engine.action(grant.id, self.now)
        assert perm.state is grant.state_at(self.now)
        assert perm.admitted == grant.admitted

    @rule(step=st.sampled_from([0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 3.5, T])
          | st.floats(0.0, 2 * T, allow_nan=False))
    def tick(self, step: float) -> None:
        self.now += step

    @rule()
    def tick_to_next_expiry(self) -> None:
        """Step the clock to exactly the moment the next pending TIMEOUT grant expires."""
        due = [e for g in self.grants
               if g.state_at(self.now) is ActionState.PENDING and (e := g.expires) is not None]
        if due:
            self.now = min(due)

    @rule(data=st.data(), now_and_then=st.integers(0, 2))
    def end_session(self, data: st.DataObject, now_and_then: int) -> None:
        choices = sorted(self.sessions.values()) * 3 + self.ended[-1:]
        if not choices or now_and_then:  # rarer than the other rules, so sessions fill up
            return
        session = data.draw(st.sampled_from(choices), label="session")
        if session in self.ended:
            with pytest.raises(InvalidArgument):
                self.engine.end_session(session, self.now)
            return
        # Grants whose time is up are expired, not cancelled, even if nothing has swept them.
        to_cancel = {g.id for g in self.pending(session)}
        returned = {p.id for p in self.engine.end_session(session, self.now)}
        assert returned == to_cancel
        for g in self.grants:
            if g.id in to_cancel:
                g.state = ActionState.CANCELLED
        client = next(c for c, s in self.sessions.items() if s == session)
        del self.sessions[client]
        self.ended.append(session)
        assert self.engine.sessions.get(session) is None
        assert self.engine.sessions.find(client) is None

    # --- invariants -----------------------------------------------------------------------
    @invariant()
    def states_agree(self) -> None:
        table = self.engine.permissions
        for g in self.grants:
            perm = table.get(g.id)  # does not sweep
            assert (perm.session_id, perm.flags) == (g.session, g.flags)
            assert engine_state_at(perm, self.now) is g.state_at(self.now), (g, perm)
            assert perm.admitted == g.admitted, (g, perm)

    @invariant()
    def pending_counts_agree(self) -> None:
        table = self.engine.permissions
        live = {p.id for p in table.pending()
                if engine_state_at(p, self.now) is ActionState.PENDING}
        assert live == {g.id for g in self.grants if g.state_at(self.now) is ActionState.PENDING}
        for session in [*self.sessions.values(), *self.ended]:
            in_table = [p for p in table.pending(session)
                        if engine_state_at(p, self.now) is ActionState.PENDING]
            assert len(in_table) == len(self.pending(session))
            assert table.pending_count(session) == len(table.pending(session))
        for session in self.ended:
            assert not self.pending(session)

    @invariant()
    def sessions_agree(self) -> None:
        for client in CLIENTS:
            s = self.engine.sessions.find(client)
            assert (None if s is None else s.id) == self.sessions.get(client)
        assert len(self.engine.sessions) == len(self.sessions)


PermissionMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPermissionMachine = PermissionMachine.TestCase


# --- examples -----------------------------------------------------------------------------------

C1, C2 = CLIENTS[0], CLIENTS[1]
NO_FLAGS = Flags(0)
S1, S2 = TARGETS[0], TARGETS[1]


@pytest.fixture
def engine() -> Engine:
    return new_engine()


def grant(engine: Engine, session: int, flags: Flags = NO_FLAGS, *, target: IPAddress = S1,
          port: int = 2000, protocol: int = TCP, now: float = 0.0) -> Permission:
    return engine.allow_future_connect(session, target, port, protocol, flags, FTP_GUID, now)


def test_expired_but_not_swept_never_matches_in_the_table() -> None:
    table = PermissionTable()
    key = permission_key(TCP, C1, S1, 2000)
    perm = table.add(1, C1, key, Flags.TIMEOUT, "FTP", now=20.0, timeout=T, external_index=0)
    # Nothing sweeps: the permission stays in the pending index, but its time is up.
    assert table.match(key, 1, 20.0 + T) is None
    assert table.match(key, 1, 20.0 + T + 100) is None
    assert perm.state is ActionState.PENDING and len(table) == 1 and perm.admitted == 0
    assert table.expire(20.0 + T) == [perm]
    assert table.get(perm.id).state is ActionState.EXPIRED and len(table) == 0


def test_expired_grant_is_passed_over_for_a_newer_one_with_the_same_key() -> None:
    table = PermissionTable()
    key = permission_key(TCP, C1, S1, 2000)
    old = table.add(1, C1, key, Flags.TIMEOUT, "FTP", now=0.0, timeout=T, external_index=0)
    new = table.add(1, C1, key, Flags(0), "FTP", now=1.0, timeout=None, external_index=0)
    assert table.match(key, 1, T) is new  # not swept yet; the expired one is skipped
    assert old.state is ActionState.PENDING and old.admitted == 0
    assert new.state is ActionState.CONSUMED


def test_timeout_expires_exactly_at_created_plus_timeout(engine: Engine) -> None:
    s = start_session(engine, C1, 0.0)
    perm = grant(engine, s, Flags.TIMEOUT, now=10.0)
    assert perm.expires == 10.0 + T
    assert engine.action(perm.id, 10.0 + T - 0.5).state is ActionState.PENDING
    # decide sweeps first; at now == created + T the permission is gone.
    d = engine.decide(syn(C1, S1, 2000), 10.0 + T)
    assert d.verdict is Verdict.DROP
    assert perm.state is ActionState.EXPIRED and perm.admitted == 0
    with pytest.raises(Terminating):
        engine.cancel(perm.id, 10.0 + T)


def test_flow_admitted_before_expiry_consumes(engine: Engine) -> None:
    s = start_session(engine, C1, 0.0)
    perm = grant(engine, s, Flags.TIMEOUT, now=0.0)
    d = engine.decide(syn(C1, S1, 2000), T - 0.5)
    assert d.verdict is Verdict.ADMIT_KERNEL and d.action_id == perm.id
    assert engine.action(perm.id, 100.0).state is ActionState.CONSUMED  # not EXPIRED later


def test_allow_multiple_admits_until_cancel(engine: Engine) -> None:
    s = start_session(engine, C1, 0.0)
    perm = grant(engine, s, Flags.ALLOW_MULTIPLE)
    for i in range(5):
        d = engine.decide(syn(C1, S1, 2000, sport=50000 + i), 1.0 + i)
        assert d.verdict is Verdict.ADMIT_KERNEL and d.action_id == perm.id
    assert engine.action(perm.id, 10.0).state is ActionState.PENDING
    assert perm.admitted == 5
    assert engine.cancel(perm.id, 10.0) is perm and perm.state is ActionState.CANCELLED
    assert engine.decide(syn(C1, S1, 2000, sport=50010), 11.0).verdict is Verdict.DROP
    with pytest.raises(Terminating):
        engine.cancel(perm.id, 12.0)
    assert perm.admitted == 5


def test_two_identical_grants_admit_two_flows_oldest_first(engine: Engine) -> None:
    s = start_session(engine, C1, 0.0)
    a, b = grant(engine, s), grant(engine, s)
    assert a.id != b.id and a.key == b.key
    d1 = engine.decide(syn(C1, S1, 2000, sport=50001), 1.0)
    d2 = engine.decide(syn(C1, S1, 2000, sport=50002), 2.0)
    d3 = engine.decide(syn(C1, S1, 2000, sport=50003), 3.0)
    assert (d1.action_id, d2.action_id) == (a.id, b.id)
    assert d3.verdict is Verdict.DROP
    assert a.state is b.state is ActionState.CONSUMED


def test_cancelling_one_of_two_identical_grants_leaves_the_other(engine: Engine) -> None:
    s = start_session(engine, C1, 0.0)
    a, b = grant(engine, s), grant(engine, s)
    engine.cancel(a.id, 1.0)
    d = engine.decide(syn(C1, S1, 2000), 2.0)
    assert d.verdict is Verdict.ADMIT_KERNEL and d.action_id == b.id
    assert engine.decide(syn(C1, S1, 2000, sport=50009), 3.0).verdict is Verdict.DROP
    assert (a.state, b.state) == (ActionState.CANCELLED, ActionState.CONSUMED)


def test_single_use_matches_only_its_key(engine: Engine) -> None:
    s1, s2 = start_session(engine, C1, 0.0), start_session(engine, C2, 0.0)
    perm = grant(engine, s1, port=2000)
    for meta in (syn(C2, S1, 2000), syn(C1, S2, 2000), syn(C1, S1, 2001),
                 syn(C1, S1, 2000, protocol=UDP), syn(C1, S1, 2000, tcp_flags=SYN_ACK)):
        assert engine.decide(meta, 1.0).verdict is Verdict.DROP, meta
    assert perm.state is ActionState.PENDING and s2 != s1
    assert engine.decide(syn(C1, S1, 2000, sport=1234), 2.0).action_id == perm.id


def test_invalid_flag_combinations_create_nothing(engine: Engine) -> None:
    s = start_session(engine, C1, 0.0)
    with pytest.raises(InvalidArgument):
        grant(engine, s, Flags.TIMEOUT | Flags.ALLOW_MULTIPLE)
    with pytest.raises(InvalidArgument):
        grant(engine, s, Flags.BIDIRECTIONAL, protocol=TCP)
    assert engine.permissions.pending_count(s) == 0 and len(engine.permissions) == 0
    assert grant(engine, s).id == 1  # no action id was used up


def test_is_busy_at_cap_and_a_slot_frees_on_cancel_consume_or_expiry(engine: Engine) -> None:
    s = start_session(engine, C1, 0.0)
    perms = [grant(engine, s, Flags.TIMEOUT, port=3000 + i) for i in range(CAP)]
    with pytest.raises(IsBusy):
        grant(engine, s, port=4000)
    assert engine.permissions.pending_count(s) == CAP
    engine.cancel(perms[0].id, 0.5)
    extra = grant(engine, s, port=4000, now=0.5)
    with pytest.raises(IsBusy):
        grant(engine, s, port=4001, now=0.5)
    assert engine.decide(syn(C1, S1, 3001), 1.0).action_id == perms[1].id
    grant(engine, s, port=4001, now=1.0)
    with pytest.raises(IsBusy):
        grant(engine, s, port=4002, now=1.0)
    # The TIMEOUT grants made at 0.0 expire at T: three slots free up.
    for port in (4002, 4003, 4004):
        grant(engine, s, port=port, now=T)
    with pytest.raises(IsBusy):
        grant(engine, s, port=4005, now=T)
    assert extra.state is ActionState.PENDING
    # Another session has its own budget.
    s2 = start_session(engine, C2, T)
    assert grant(engine, s2, now=T).session_id == s2


def test_end_session_cancels_pending_and_a_primary_makes_a_new_session(engine: Engine) -> None:
    s = start_session(engine, C1, 0.0)
    used, kept = grant(engine, s, port=2000), grant(engine, s, Flags.ALLOW_MULTIPLE, port=2001)
    engine.decide(syn(C1, S1, 2000), 1.0)
    engine.decide(syn(C1, S1, 2001), 1.0)
    assert [p.id for p in engine.end_session(s, 2.0)] == [kept.id]
    assert (used.state, kept.state) == (ActionState.CONSUMED, ActionState.CANCELLED)
    with pytest.raises(InvalidArgument):
        engine.end_session(s, 2.0)
    with pytest.raises(InvalidArgument):
        grant(engine, s, now=2.0)
    assert engine.decide(syn(C1, S1, 2001, sport=9), 3.0).verdict is Verdict.DROP
    s_new = start_session(engine, C1, 4.0)
    assert s_new != s
    assert engine.decide(syn(C1, S1, 2001, sport=10), 5.0).verdict is Verdict.DROP


def test_end_session_after_expiry_reports_expired(engine: Engine) -> None:
    """A grant whose time was up before the session ended is EXPIRED, not CANCELLED, even if
    nothing swept the table in between (regression: end_session did not sweep first)."""
    s = start_session(engine, C1, 0.0)
    expired = grant(engine, s, Flags.TIMEOUT, now=0.0)
    live = grant(engine, s, Flags.TIMEOUT, port=2001, now=2.0)
    ended = engine.end_session(s, T + 1.0)
    assert ended == [live]
    assert (expired.state, live.state) == (ActionState.EXPIRED, ActionState.CANCELLED)


@settings(max_examples=300)
@given(st.sampled_from([TCP, UDP]), st.sampled_from([4, 6]), st.integers(0, 2**128 - 1),
       st.integers(0, 2**128 - 1), st.integers(0, 65535))
def test_a_key_unpacks_to_what_it_was_packed_from(protocol: int, version: int, client: int,
                                                  target: int, port: int) -> None:
    """The action listing reads a permission's protocol and target back from its key."""
    if version == 4:
        client, target = client >> 96, target >> 96
    key = pack_key(protocol, version, client, target, port)
    assert unpack_key(key) == (protocol, version, client, target, port)
