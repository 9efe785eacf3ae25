"""Firewall-client sessions, client_connect, BindForClient, RetroactiveAllowBind and inbound
traffic to binds, in the pure core (enforcer.core.binds and the Engine methods around them)."""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

import pytest
from core_policy import INTERNAL, POLICY_DATA, events_of, retired_binds

from enforcer.core import packet
from enforcer.core.binding import BIND_FLAGS
from enforcer.core.binds import DEFAULT_BIND_PORTS, RECENT_SENDER_SECONDS, Bind, BindState, BindTable
from enforcer.core.effects import EstablishedConnection
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.ipfilter import IpFilter
from enforcer.core.packet import ICMP, TCP, UDP, FlowKey, Ingress, IPAddress, PacketMeta
from enforcer.core.permissions import ActionState
from enforcer.core.policy import policy_from_dict
from enforcer.core.results import (
    InvalidArgument,
    IsBusy,
    NotFound,
    PolicyRulesDenied,
    Terminating,
)
from enforcer.core.state import Verdict

ip = ipaddress.ip_address

# the shared policy, plus SMTP for alice only (by user)
POLICY = policy_from_dict({
    "protocol": [*POLICY_DATA["protocol"],
                 {"name": "SMTP", "guid": "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2105", "ip_protocol": "tcp",
                  "ports": [25]}],
    "protocol_rule": [*POLICY_DATA["protocol_rule"],
                      {"name": "alice mails", "action": "allow", "protocols": ["SMTP"],
                       "clients": ["192.0.2.0/24"], "users": ["alice"]}],
    "site_rule": POLICY_DATA["site_rule"],
})
C1, C2, C6 = ip("192.0.2.11"), ip("192.0.2.12"), ip("2001:db8:1::11")
S1, S2 = ip("198.51.100.21"), ip("198.51.100.22")
OUTSIDE = ip("192.0.2.99")  # an internal peer address: never in the filters below
FTP = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101")
HTTP = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2102")
SSH = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2103")
DNS = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2104")
SMTP = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2105")
EXT4, EXT6, EXT4B = ip("198.51.100.1"), ip("2001:db8:2::1"), ip("198.51.100.2")
EXTERNAL = (EXT4, EXT6, EXT4B)
BIND_PORTS = (20000, 20002)
SYN = packet.TCP_SYN
ACK = 0x10
NO_FLAGS = Flags(0)
SAME: Any = object()  # allow(): the bind's own address


@pytest.fixture
def engine() -> Engine:
    return Engine(POLICY, INTERNAL, EXTERNAL, bind_ports=BIND_PORTS)


def inbound_pkt(src: IPAddress, dst: IPAddress, dport: int, *, proto: int = TCP, flags: int = SYN,
                sport: int = 5555) -> PacketMeta:
    return PacketMeta(FlowKey(proto, src, sport, dst, dport), Ingress.EXTERNAL,
                      flags if proto == TCP else 0)


def only(*ranges: tuple[str, str]) -> IpFilter:
    f = IpFilter()
    for low, high in ranges:
        f.include_range(low, high)
    return f


def allow(engine: Engine, session_id: int, bind: Bind, *, guid: uuid.UUID = FTP,
          flags: Flags = NO_FLAGS, ipfilter: IpFilter | None = None, now: float = 1.0,
          address: IPAddress | None = SAME, port: int | None = None,
          protocol: int | None = None) -> tuple[Bind, bool]:
    """RetroactiveAllowBind of ``bind``, its own address, port and protocol unless given."""
    return engine.retroactive_allow_bind(
        session_id, bind.protocol if protocol is None else protocol,
        bind.address if address is SAME else address, bind.port if port is None else port,
        guid, flags, ipfilter, now)


# --- sessions -----------------------------------------------------------------------------

def test_constants() -> None:
    assert DEFAULT_BIND_PORTS == (20000, 29999)
    assert RECENT_SENDER_SECONDS == 120.0
    assert BIND_FLAGS == Flags.BIDIRECTIONAL | Flags.INCREASE_RECEIVE_BUFFER


def test_two_connections_of_one_client_and_user_share_a_session(engine: Engine) -> None:
    a = engine.open_firewall_session(C1, "alice", 1.0)
    again = engine.open_firewall_session(C1, "alice", 2.0)
    assert again is a and a.connections == 2 and a.kind == "firewall-client"
    assert a.user == "alice" and a.client == C1 and a.last_activity == 2.0
    bob = engine.open_firewall_session(C1, "bob", 3.0)
    anonymous = engine.open_firewall_session(C1, None, 3.0)
    other_ip = engine.open_firewall_session(C2, "alice", 3.0)
    assert len({a.id, bob.id, anonymous.id, other_ip.id}) == 4
    assert bob.connections == anonymous.connections == other_ip.connections == 1
    assert len(engine.sessions) == 4
    # a Firewall-client session is not the IP's SecureNAT session
    assert engine.sessions.find(C1) is None


def test_the_session_ends_with_its_last_connection(engine: Engine) -> None:
    s = engine.open_firewall_session(C1, "alice", 1.0)
    engine.open_firewall_session(C1, "alice", 1.0)
    other = engine.open_firewall_session(C1, "bob", 1.0)
    perm = engine.allow_future_connect(s.id, S1, 2021, TCP, Flags(0), FTP, 2.0)
    tcp = engine.bind_for_client(s.id, TCP, EXT4, 2.0)
    udp = engine.bind_for_client(s.id, UDP, EXT4, 2.0)
    allow(engine, s.id, udp, now=2.5)
    kept = engine.bind_for_client(other.id, TCP, EXT4, 2.0)
    assert engine.bind_ports.in_use == 3

    engine.close_firewall_connection(s.id, 3.0)
    assert engine.session(s.id) is s and s.connections == 1
    assert perm.state is ActionState.PENDING and tcp.state is BindState.PENDING
    assert udp.state is BindState.ALLOWED

    engine.close_firewall_connection(s.id, 4.0)
    with pytest.raises(InvalidArgument, match=f"no session {s.id}"):
        engine.session(s.id)
    assert engine.action(perm.id, 4.0).state is ActionState.CANCELLED
    assert {tcp.state, udp.state} == {BindState.CLOSED}
    assert engine.binds.at(TCP, EXT4, tcp.port) is None and engine.binds.at(UDP, EXT4, udp.port) is None
    assert engine.binds.of(s.id) == []
    assert engine.bind_ports.in_use == 1  # bob's
    assert kept.state is BindState.PENDING and engine.session(other.id) is other
    engine.close_firewall_connection(s.id, 5.0)  # ended already: nothing happens
    engine.close_firewall_connection(other.id, 5.0)
    assert engine.bind_ports.in_use == 0 and len(engine.sessions) == 0
    # a new session of the same client and user is a new one
    assert engine.open_firewall_session(C1, "alice", 6.0).id not in (s.id, other.id)


def test_the_shell_hears_of_every_session_end_after_its_permissions_are_cancelled(
        engine: Engine) -> None:
    """on_session_end: once per session, however it ends (its last connection, end_session),
    with its permissions cancelled and its binds closed by then."""
    ended: list[tuple[int, list[ActionState], list[BindState]]] = []
    engine.on_session_end = lambda session: ended.append(
        (session.id, [p.state for p in engine.permissions.pending(session.id)],
         [b.state for b in engine.binds.of(session.id)]))
    alice = engine.open_firewall_session(C1, "alice", 1.0)
    bob = engine.open_firewall_session(C1, "bob", 1.0)
    perm = engine.allow_future_connect(alice.id, S1, 2021, TCP, Flags(0), FTP, 2.0)
    engine.bind_for_client(alice.id, UDP, EXT4, 2.0)
    engine.close_firewall_connection(alice.id, 3.0)
    assert ended == [(alice.id, [], [])] and perm.state is ActionState.CANCELLED
    engine.end_session(bob.id, 4.0)
    assert ended[1] == (bob.id, [], [])
    engine.close_firewall_connection(bob.id, 5.0)  # ended already: no second call
    assert len(ended) == 2


def test_client_connect_relays_nothing_to_the_fw_itself(engine: Engine) -> None:
    """Policy that would allow the fw's own address, loopback or another family never makes
    the relay reach the fw: dropped with the reason, nothing admitted."""
    s = engine.open_firewall_session(C1, "alice", 1.0)
    for target, why in ((EXT4, "the firewall's own address"), (ip("127.0.0.1"), "not a unicast host"),
                        (ip("0.0.0.0"), "not a unicast host"), (ip("224.0.0.1"), "not a unicast host"),
                        (ip("2001:db8:2::21"), "not of the client's address family")):
        for protocol, port in ((TCP, 21), (UDP, 53)):
            d = engine.client_connect(s.id, protocol, target, port, 40000, 2.0)
            assert d.verdict is Verdict.DROP and why in d.reason, (target, d)
    assert len(engine.flows) == 0 and s.primaries == 0


def test_only_internal_clients_open_firewall_sessions(engine: Engine) -> None:
    for client in (S1, ip("2001:db8:2::5"), ip("10.0.0.1")):
        with pytest.raises(InvalidArgument, match="not on an internal network"):
            engine.open_firewall_session(client, "alice", 1.0)
    assert len(engine.sessions) == 0
    assert engine.open_firewall_session(C6, "alice", 1.0).client == C6


# --- client_connect -------------------------------------------------------------------------

def test_client_connect_admits_a_primary_with_the_session_s_user(engine: Engine) -> None:
    alice = engine.open_firewall_session(C1, "alice", 1.0)
    bob = engine.open_firewall_session(C1, "bob", 1.0)
    ftp = engine.client_connect(alice.id, TCP, S1, 21, 40000, 2.0)
    assert ftp.verdict is Verdict.ADMIT_USER and ftp.session_id == alice.id and ftp.protocol == "FTP"
    assert ftp.key == FlowKey(TCP, C1, 40000, S1, 21) and ftp.snat == 0
    assert alice.primaries == 1 and alice.last_activity == 2.0
    assert engine.flows.get(ftp.key) is not None
    mail = engine.client_connect(alice.id, TCP, S1, 25, 40001, 3.0)
    assert mail.verdict is Verdict.ADMIT_USER and mail.protocol == "SMTP"
    denied = engine.client_connect(bob.id, TCP, S1, 25, 40002, 3.0)
    assert denied.verdict is Verdict.DROP and denied.session_id == bob.id
    assert "no protocol rule" in denied.reason and "SMTP" in denied.reason
    assert bob.primaries == 0
    # what the decision says is what the engine records
    assert list(engine.recent)[-1] == denied


def test_client_connect_drops_what_is_no_primary_or_is_denied(engine: Engine) -> None:
    s = engine.open_firewall_session(C2, "alice", 1.0)
    other = engine.client_connect(s.id, TCP, S1, 8080, 40000, 2.0)
    assert other.verdict is Verdict.DROP and "no protocol's primary port" in other.reason
    assert "tcp/8080" in other.reason
    http = engine.client_connect(s.id, TCP, S1, 80, 40000, 2.0)  # HTTP is C1's only
    assert http.verdict is Verdict.DROP and "no protocol rule" in http.reason
    ssh = engine.client_connect(s.id, TCP, S1, 22, 40000, 2.0)
    assert ssh.verdict is Verdict.DROP and "nobody uses SSH" in ssh.reason
    site = engine.client_connect(s.id, TCP, ip("203.0.113.5"), 21, 40000, 2.0)
    assert site.verdict is Verdict.DROP and "denied net" in site.reason
    with pytest.raises(InvalidArgument, match="no session 99"):
        engine.client_connect(99, TCP, S1, 21, 40000, 2.0)
    assert s.primaries == 0 and len(engine.flows) == 0


def test_client_connect_under_the_session_s_permission(engine: Engine) -> None:
    s = engine.open_firewall_session(C1, "alice", 1.0)
    perm = engine.allow_future_connect(s.id, S1, 2021, TCP, Flags(0), FTP, 1.0, filter_id=7,
                                       context="ctx")
    d = engine.client_connect(s.id, TCP, S1, 2021, 40000, 2.0)
    assert d.verdict is Verdict.ADMIT_USER and d.action_id == perm.id and d.session_id == s.id
    assert perm.state is ActionState.CONSUMED and perm.admitted == 1
    events = events_of(engine)
    assert len(events) == 1 and isinstance(events[0], EstablishedConnection)
    assert events[0].action_id == perm.id and events[0].session_id == s.id
    assert events[0].filter_id == 7 and events[0].context == "ctx"
    assert events[0].key == FlowKey(TCP, C1, 40000, S1, 2021)
    # single use: consumed
    again = engine.client_connect(s.id, TCP, S1, 2021, 40001, 3.0)
    assert again.verdict is Verdict.DROP and events_of(engine) == []


def test_a_relayed_flow_leaves_from_the_external_address_its_grant_asked_routed_too(
        engine: Engine) -> None:
    """The SOCKS service relays a Firewall client's flow from the fw's own address, routed
    as in NAT: the one its grant's ProxyExternalAddress names (the decision's ``snat``,
    which the relay connects from, and the event's), by default the first."""
    s = engine.open_firewall_session(C1, "alice", 1.0)
    assert not engine.nat
    asked = engine.allow_future_connect(s.id, S1, 2021, TCP, Flags(0), FTP, 1.0, filter_id=7,
                                        proxy_external_address=EXT4B)
    default = engine.allow_future_connect(s.id, S1, 2022, TCP, Flags(0), FTP, 1.0, filter_id=7)
    for perm, port, index, address in ((asked, 2021, 1, EXT4B), (default, 2022, 0, EXT4)):
        d = engine.client_connect(s.id, TCP, S1, port, 40000, 2.0)
        assert d.action_id == perm.id and d.snat == index
        assert engine.external_address(4, index) == address
        (event,) = events_of(engine)
        assert isinstance(event, EstablishedConnection) and event.external == address
    # a Firewall client's grant needs an external address of its family, routed too
    v4_only = Engine(POLICY, INTERNAL, (EXT4,))
    alice6 = v4_only.open_firewall_session(C6, "alice", 1.0)
    with pytest.raises(InvalidArgument, match="no external IPv6 address"):
        v4_only.allow_future_connect(alice6.id, ip("2001:db8:2::21"), 2021, TCP, Flags(0), FTP, 1.0)


def test_client_connect_with_an_allow_multiple_permission(engine: Engine) -> None:
    s = engine.open_firewall_session(C1, "alice", 1.0)
    perm = engine.allow_future_connect(s.id, S1, 2021, UDP, Flags.ALLOW_MULTIPLE, DNS, 1.0)
    for n in range(3):
        d = engine.client_connect(s.id, UDP, S1, 2021, 40000 + n, 2.0 + n)
        assert d.verdict is Verdict.ADMIT_USER and d.action_id == perm.id
    assert perm.state is ActionState.PENDING and perm.admitted == 3


@pytest.mark.parametrize("flags", [Flags(0), Flags.ADDRESS_BASED])
def test_another_session_s_permission_on_the_ip_needs_address_based(engine: Engine, flags: Flags) -> None:
    alice = engine.open_firewall_session(C1, "alice", 1.0)
    bob = engine.open_firewall_session(C1, "bob", 1.0)
    perm = engine.allow_future_connect(alice.id, S1, 2021, TCP, flags, FTP, 1.0)
    d = engine.client_connect(bob.id, TCP, S1, 2021, 40000, 2.0)
    if Flags.ADDRESS_BASED in flags:
        assert d.verdict is Verdict.ADMIT_USER and d.action_id == perm.id
        assert perm.state is ActionState.CONSUMED
    else:
        assert d.verdict is Verdict.DROP and perm.state is ActionState.PENDING


@pytest.mark.parametrize("flags", [Flags(0), Flags.ADDRESS_BASED])
def test_securenat_flows_use_a_firewall_client_permission_only_if_address_based(
        engine: Engine, flags: Flags) -> None:
    s = engine.open_firewall_session(C1, "alice", 1.0)
    perm = engine.allow_future_connect(s.id, S1, 2021, TCP, flags, FTP, 1.0)
    syn = PacketMeta(FlowKey(TCP, C1, 40000, S1, 2021), Ingress.INTERNAL, SYN)
    d = engine.decide(syn, 2.0)
    if Flags.ADDRESS_BASED in flags:
        assert d.verdict is Verdict.ADMIT_KERNEL and d.action_id == perm.id
    else:
        assert d.verdict is Verdict.DROP and perm.state is ActionState.PENDING


def test_client_connect_consumes_an_expired_permission_never(engine: Engine) -> None:
    s = engine.open_firewall_session(C1, "alice", 1.0)
    timeout = POLICY.defaults.permission_timeout
    perm = engine.allow_future_connect(s.id, S1, 2021, TCP, Flags.TIMEOUT, FTP, 1.0)
    d = engine.client_connect(s.id, TCP, S1, 2021, 40000, 1.0 + timeout)
    assert d.verdict is Verdict.DROP and perm.state is ActionState.EXPIRED


# --- BindForClient ----------------------------------------------------------------------------

def test_bind_for_client_allocates_distinct_ports_until_busy(engine: Engine) -> None:
    s = engine.open_firewall_session(C1, "alice", 1.0)
    binds = [engine.bind_for_client(s.id, TCP, EXT4, 1.0),
             engine.bind_for_client(s.id, UDP, EXT4, 1.0),
             engine.bind_for_client(s.id, TCP, EXT4B, 1.0)]
    assert sorted(b.port for b in binds) == [20000, 20001, 20002]
    assert len({b.id for b in binds}) == 3
    assert all(b.state is BindState.PENDING and b.session_id == s.id for b in binds)
    assert [b.protocol for b in binds] == [TCP, UDP, TCP]
    assert engine.binds.at(UDP, EXT4, binds[1].port) is binds[1]
    assert engine.binds.at(TCP, EXT4, binds[1].port) is None  # protocol is part of the address
    assert len(engine.binds) == 3 and engine.bind_ports.in_use == 3
    with pytest.raises(IsBusy):
        engine.bind_for_client(s.id, UDP, EXT6, 1.0)
    with pytest.raises(InvalidArgument, match="no session 42"):
        engine.bind_for_client(42, TCP, EXT4, 1.0)
    assert engine.bind_ports.in_use == 3


def test_bind_to_dict(engine: Engine) -> None:
    s = engine.open_firewall_session(C1, "alice", 1.0)
    bind = engine.bind_for_client(s.id, UDP, EXT4, 1.5)
    assert bind.to_dict() == {"bind": bind.id, "session": s.id, "protocol": "udp",
                              "address": [str(EXT4), bind.port], "state": "pending", "flags": [],
                              "protocol_name": None, "ipfilter": None, "admitted": 0,
                              "discarded": 0, "receive_buffer": None, "created": 1.5,
                              "leads_to": None, "source": None, "expires": None}
    allow(engine, s.id, bind, guid=DNS, flags=Flags.BIDIRECTIONAL,
          ipfilter=only(("198.51.100.0", "198.51.100.255")))
    out = bind.to_dict()
    assert out["state"] == "allowed" and out["flags"] == ["BIDIRECTIONAL"]
    assert out["protocol_name"] == "DNS"
    assert out["ipfilter"] == {"ranges": [["198.51.100.0", "198.51.100.255"]]}


def test_bind_table_refuses_a_second_bind_on_one_address() -> None:
    table = BindTable()
    first = table.add(1, TCP, EXT4, 20000, 0.0, C1)
    with pytest.raises(ValueError, match="bound already"):
        table.add(2, TCP, EXT4, 20000, 0.0, C1)
    assert table.add(2, UDP, EXT4, 20000, 0.0, C1).id != first.id
    table.close(first)
    assert table.add(2, TCP, EXT4, 20000, 0.0, C1).session_id == 2  # free again once closed
    assert [b.id for b in table.of(1)] == [first.id]  # the closed one stays listed


# --- RetroactiveAllowBind -----------------------------------------------------------------------

@pytest.fixture
def session(engine: Engine) -> int:
    return engine.open_firewall_session(C1, "alice", 1.0).id


def test_retroactive_allow_bind_s_ok_then_s_false(engine: Engine, session: int) -> None:
    bind = engine.bind_for_client(session, TCP, EXT4, 1.0)
    f = only(("198.51.100.0", "198.51.100.255"))
    got, first = allow(engine, session, bind, flags=Flags.INCREASE_RECEIVE_BUFFER, ipfilter=f)
    assert got is bind and first is True
    assert bind.state is BindState.ALLOWED and bind.protocol_name == "FTP"
    assert bind.flags == Flags.INCREASE_RECEIVE_BUFFER and bind.ipfilter == f
    # a second call is S_FALSE and changes nothing
    got, second = allow(engine, session, bind, guid=HTTP, flags=Flags(0), ipfilter=None)
    assert got is bind and second is False
    assert bind.protocol_name == "FTP" and bind.ipfilter == f
    assert bind.flags == Flags.INCREASE_RECEIVE_BUFFER


@pytest.mark.parametrize(("kwargs", "message"), [
    pytest.param({"port": 0}, "port must be nonzero", id="port-0"),
    pytest.param({"port": 65536}, "port must be nonzero", id="port-65536"),
    pytest.param({"port": -1}, "port must be nonzero", id="port-negative"),
    pytest.param({"protocol": ICMP}, "protocol must be TCP", id="icmp"),
    pytest.param({"protocol": 0}, "protocol must be TCP", id="protocol-0"),
    pytest.param({"flags": Flags.BIDIRECTIONAL}, "BIDIRECTIONAL is for UDP only", id="bidi-tcp"),
    pytest.param({"flags": Flags.ADDRESS_BASED}, "does not take ADDRESS_BASED", id="address-based"),
    pytest.param({"flags": Flags.ALLOW_MULTIPLE}, "does not take ALLOW_MULTIPLE", id="allow-multiple"),
    pytest.param({"flags": Flags.TIMEOUT | Flags.INCREASE_RECEIVE_BUFFER}, "does not take TIMEOUT",
                 id="timeout"),
    pytest.param({"flags": Flags.NO_KERNEL_MODE}, "does not take NO_KERNEL_MODE", id="no-kernel-mode"),
    pytest.param({"guid": uuid.UUID(int=5)}, "no protocol is defined with GUID", id="unknown-guid"),
])
def test_retroactive_allow_bind_invalid_arguments(engine: Engine, session: int, kwargs: dict[str, object],
                                                   message: str) -> None:
    bind = engine.bind_for_client(session, TCP, EXT4, 1.0)
    with pytest.raises(InvalidArgument, match=message):
        allow(engine, session, bind, **kwargs)  # type: ignore[arg-type]
    assert bind.state is BindState.PENDING and bind.protocol_name is None


def test_retroactive_allow_bind_for_an_unknown_session(engine: Engine, session: int) -> None:
    bind = engine.bind_for_client(session, TCP, EXT4, 1.0)
    with pytest.raises(InvalidArgument, match="no session 77"):
        allow(engine, 77, bind)
    assert bind.state is BindState.PENDING


def test_retroactive_allow_bind_takes_bidirectional_for_udp(engine: Engine, session: int) -> None:
    bind = engine.bind_for_client(session, UDP, EXT4, 1.0)
    assert allow(engine, session, bind, guid=DNS, flags=BIND_FLAGS) == (bind, True)
    assert bind.flags == BIND_FLAGS


def test_retroactive_allow_bind_not_found(engine: Engine, session: int) -> None:
    other = engine.open_firewall_session(C1, "bob", 1.0).id
    bind = engine.bind_for_client(session, TCP, EXT4, 1.0)
    bobs = engine.bind_for_client(other, TCP, EXT4, 1.0)
    for kwargs in ({"port": bind.port + 1}, {"port": 21}, {"address": EXT4B}, {"address": EXT6},
                   {"protocol": UDP}):
        with pytest.raises(NotFound):
            allow(engine, session, bind, **kwargs)
    with pytest.raises(NotFound, match=f"session {session} has no tcp bind on any address port {bobs.port}$"):
        allow(engine, session, bobs, address=None)
    with pytest.raises(NotFound):
        allow(engine, session, bobs)
    assert bind.state is bobs.state is BindState.PENDING
    assert allow(engine, other, bobs) == (bobs, True)


def test_retroactive_allow_bind_on_the_any_address(engine: Engine, session: int) -> None:
    first = engine.bind_for_client(session, UDP, EXT6, 1.0)
    second = engine.bind_for_client(session, UDP, EXT4B, 1.0)
    assert allow(engine, session, second, guid=DNS, address=None) == (second, True)
    assert allow(engine, session, first, guid=DNS, address=None) == (first, True)
    assert first.state is second.state is BindState.ALLOWED


def test_retroactive_allow_bind_after_bind_done_is_terminating(engine: Engine, session: int) -> None:
    bind = engine.bind_for_client(session, TCP, EXT4, 1.0)
    allowed = engine.bind_for_client(session, UDP, EXT4, 1.0)
    allow(engine, session, allowed, guid=DNS)
    engine.bind_done(bind)
    engine.bind_done(allowed)
    assert bind.state is allowed.state is BindState.CLOSED
    with pytest.raises(Terminating, match=f"bind {bind.id} is closed"):
        allow(engine, session, bind)
    with pytest.raises(Terminating):
        allow(engine, session, allowed, guid=DNS)
    with pytest.raises(Terminating):
        allow(engine, session, bind, address=None)
    # closed binds take nothing in
    d = engine.inbound(inbound_pkt(S1, EXT4, bind.port), 2.0)
    assert d.verdict is Verdict.DROP and "nothing is bound" in d.reason


def test_retroactive_allow_bind_policy_denied(engine: Engine) -> None:
    bob = engine.open_firewall_session(C1, "bob", 1.0).id
    c2 = engine.open_firewall_session(C2, "alice", 1.0).id
    bind = engine.bind_for_client(bob, TCP, EXT4, 1.0)
    c2_bind = engine.bind_for_client(c2, TCP, EXT4, 1.0)
    for guid in (SMTP, SSH):
        with pytest.raises(PolicyRulesDenied):
            allow(engine, bob, bind, guid=guid)
    with pytest.raises(PolicyRulesDenied, match="no protocol rule"):
        allow(engine, c2, c2_bind, guid=HTTP)  # HTTP is C1's only
    assert bind.state is c2_bind.state is BindState.PENDING
    assert bind.protocol_name is None and bind.ipfilter is None
    # the failed call left the bind pending: it can still be approved
    assert allow(engine, bob, bind, guid=FTP) == (bind, True)
    alice = engine.open_firewall_session(C1, "alice", 1.0).id
    mine = engine.bind_for_client(alice, TCP, EXT4, 1.0)
    assert allow(engine, alice, mine, guid=SMTP) == (mine, True)


def test_retroactive_allow_bind_clones_the_filter(engine: Engine, session: int) -> None:
    bind = engine.bind_for_client(session, UDP, EXT4, 1.0)
    f = only(("198.51.100.21", "198.51.100.21"))
    allow(engine, session, bind, guid=DNS, ipfilter=f)
    assert bind.ipfilter is not f
    f.include_range("198.51.100.22", "198.51.100.22")
    f.exclude_range("198.51.100.21", "198.51.100.21")
    assert bind.ipfilter == only(("198.51.100.21", "198.51.100.21"))
    assert engine.inbound(inbound_pkt(S1, EXT4, bind.port, proto=UDP), 2.0).verdict is Verdict.ADMIT_KERNEL
    assert engine.inbound(inbound_pkt(S2, EXT4, bind.port, proto=UDP), 2.0).verdict is Verdict.DROP


# --- inbound --------------------------------------------------------------------------------------

def test_inbound_without_a_bind_drops(engine: Engine, session: int) -> None:
    d = engine.inbound(inbound_pkt(S1, EXT4, 20000), 1.0)
    assert d.verdict is Verdict.DROP and "nothing is bound on 198.51.100.1 port 20000" in d.reason
    bind = engine.bind_for_client(session, TCP, EXT4, 1.0)
    allow(engine, session, bind)
    for meta in (inbound_pkt(S1, EXT4B, bind.port), inbound_pkt(S1, EXT4, bind.port + 1),
                 inbound_pkt(S1, EXT4, bind.port, proto=UDP)):
        assert engine.inbound(meta, 2.0).verdict is Verdict.DROP
    assert bind.admitted == 0 and bind.discarded == 0


def test_inbound_to_a_pending_bind_is_discarded(engine: Engine, session: int) -> None:
    bind = engine.bind_for_client(session, UDP, EXT4, 1.0)
    d = engine.inbound(inbound_pkt(S1, EXT4, bind.port, proto=UDP), 2.0)
    assert d.verdict is Verdict.DROP and "pending" in d.reason
    engine.inbound(inbound_pkt(S2, EXT4, bind.port, proto=UDP), 2.0)
    assert bind.discarded == 2 and bind.admitted == 0 and bind.recent == {}
    assert len(engine.flows) == 0
    assert list(engine.recent)[-1].verdict is Verdict.DROP


def test_inbound_through_an_ipfilter(engine: Engine, session: int) -> None:
    bind = engine.bind_for_client(session, TCP, EXT4, 1.0)
    allow(engine, session, bind,
          ipfilter=only(("198.51.100.16", "198.51.100.31"), ("2001:db8::", "2001:db8::ff")))
    d = engine.inbound(inbound_pkt(S1, EXT4, bind.port), 2.0, length=60)
    assert d.verdict is Verdict.ADMIT_KERNEL and d.session_id == session and d.protocol == "FTP"
    assert d.key == FlowKey(TCP, S1, 5555, EXT4, bind.port)
    record = engine.flows.get(d.key)
    assert record is not None and record.session_id == session and record.protocol == "FTP"
    for peer in (ip("198.51.100.15"), ip("198.51.100.32"), OUTSIDE, ip("::ffff:198.51.100.21")):
        out = engine.inbound(inbound_pkt(peer, EXT4, bind.port), 2.0)
        assert out.verdict is Verdict.DROP and "IpFilter" in out.reason
    assert bind.admitted == 1 and bind.discarded == 4
    assert bind.recent == {}  # TCP peers are not remembered


def test_inbound_with_no_filter_admits_anyone_and_an_empty_one_no_one(engine: Engine, session: int) -> None:
    anyone = engine.bind_for_client(session, TCP, EXT4, 1.0)
    no_one = engine.bind_for_client(session, TCP, EXT4B, 1.0)
    allow(engine, session, anyone, ipfilter=None)
    allow(engine, session, no_one, ipfilter=IpFilter())
    for n, peer in enumerate((S1, S2, ip("203.0.113.5"), OUTSIDE)):
        assert engine.inbound(inbound_pkt(peer, EXT4, anyone.port, sport=6000 + n), 2.0).verdict \
            is Verdict.ADMIT_KERNEL
        assert engine.inbound(inbound_pkt(peer, EXT4B, no_one.port, sport=6000 + n), 2.0).verdict \
            is Verdict.DROP
    assert anyone.admitted == 4 and no_one.admitted == 0 and no_one.discarded == 4
    assert no_one.to_dict()["ipfilter"] == {"ranges": []}


def test_inbound_tcp_needs_a_syn(engine: Engine, session: int) -> None:
    bind = engine.bind_for_client(session, TCP, EXT4, 1.0)
    allow(engine, session, bind)
    for flags in (ACK, SYN | ACK, 0):
        d = engine.inbound(inbound_pkt(S1, EXT4, bind.port, flags=flags), 2.0)
        assert d.verdict is Verdict.DROP and "cannot open a connection" in d.reason
    assert bind.admitted == 0 and bind.discarded == 3
    assert engine.inbound(inbound_pkt(S1, EXT4, bind.port), 2.0).verdict is Verdict.ADMIT_KERNEL


def test_udp_inbound_records_the_peer_and_may_answer(engine: Engine, session: int) -> None:
    bidi = engine.bind_for_client(session, UDP, EXT4, 1.0)
    oneway = engine.bind_for_client(session, UDP, EXT4B, 1.0)
    allow(engine, session, bidi, guid=DNS, flags=Flags.BIDIRECTIONAL)
    allow(engine, session, oneway, guid=DNS)
    assert not bidi.may_answer(S1, 5555, 10.0)  # nobody sent yet
    for bind, address in ((bidi, EXT4), (oneway, EXT4B)):
        d = engine.inbound(inbound_pkt(S1, address, bind.port, proto=UDP), 10.0)
        assert d.verdict is Verdict.ADMIT_KERNEL and d.protocol == "DNS"
        assert bind.recent == {(S1, 5555): 10.0}
    assert bidi.may_answer(S1, 5555, 10.0)
    assert bidi.may_answer(S1, 5555, 10.0 + RECENT_SENDER_SECONDS)
    assert not bidi.may_answer(S1, 5555, 10.0 + RECENT_SENDER_SECONDS + 0.001)
    assert not bidi.may_answer(S1, 5556, 10.0)  # another port of the same peer
    assert not bidi.may_answer(S2, 5555, 10.0)
    assert not oneway.may_answer(S1, 5555, 10.0)  # no BIDIRECTIONAL
    # heard() refreshes: the shell calls it for every datagram to the bind
    engine.heard(bidi, S1, 5555, 100.0)
    assert bidi.may_answer(S1, 5555, 100.0 + RECENT_SENDER_SECONDS)
    engine.heard(bidi, S2, 7, 100.0)
    assert bidi.may_answer(S2, 7, 101.0)


@pytest.mark.parametrize(("flags", "one_way"), [(NO_FLAGS, True), (Flags.BIDIRECTIONAL, False)])
def test_a_udp_flow_to_a_bind_is_one_way_unless_bidirectional(engine: Engine, session: int,
                                                              flags: Flags, one_way: bool) -> None:
    """RAB-06 for a Firewall client's UDP bind: receive only unless BIDIRECTIONAL (the
    relay answers only then; the decision and the record say so as for any flow)."""
    bind = engine.bind_for_client(session, UDP, EXT4, 1.0)
    allow(engine, session, bind, guid=DNS, flags=flags)
    d = engine.inbound(inbound_pkt(S1, EXT4, bind.port, proto=UDP), 2.0)
    assert d.verdict is Verdict.ADMIT_KERNEL and d.one_way is one_way
    record = engine.flows.get(d.key)
    assert record is not None and record.one_way is one_way


def test_datagrams_queued_before_the_kernel_knew_the_verdict_are_the_flow_s(engine: Engine,
                                                                            session: int) -> None:
    """A flow's later datagrams that reached the queue before the kernel had recorded the
    first one's verdict get it again, as the same flow: the bind counts one admission."""
    bind = engine.bind_for_client(session, UDP, EXT4, 1.0)
    allow(engine, session, bind, guid=DNS)
    first = engine.inbound(inbound_pkt(S1, EXT4, bind.port, proto=UDP), 2.0)
    again = engine.inbound(inbound_pkt(S1, EXT4, bind.port, proto=UDP), 2.1)
    assert again.verdict is Verdict.ADMIT_KERNEL and "later datagram" in again.reason
    assert (again.session_id, again.one_way) == (first.session_id, first.one_way)
    assert (bind.admitted, bind.discarded) == (1, 0)
    other = engine.inbound(inbound_pkt(S1, EXT4, bind.port, proto=UDP, sport=5556), 2.1)
    assert other.verdict is Verdict.ADMIT_KERNEL and bind.admitted == 2  # another flow
    engine.bind_done(bind)  # its socket is gone: nothing of the flow is admitted any more
    late = engine.inbound(inbound_pkt(S1, EXT4, bind.port, proto=UDP), 2.2)
    assert late.verdict is Verdict.DROP and "nothing is bound" in late.reason


@pytest.mark.parametrize(("proto", "peer_sent", "retired"), [
    (UDP, True, True), (UDP, False, False), (TCP, True, False)],
    ids=["udp-admitted-a-flow", "udp-admitted-none", "tcp"])
def test_a_closed_udp_bind_s_flows_are_retired(engine: Engine, session: int, proto: int, peer_sent: bool,
                                               retired: bool) -> None:
    """The kernel hands an admitted flow's later datagrams to the bind's socket: when a UDP
    bind that admitted flows closes, the shell is told to forget them (so that none reaches
    the socket that binds the port next). A TCP bind's connection keeps its own socket."""
    bind = engine.bind_for_client(session, proto, EXT4, 1.0)
    allow(engine, session, bind, guid=DNS if proto == UDP else FTP)
    if peer_sent:
        engine.inbound(inbound_pkt(S1, EXT4, bind.port, proto=proto), 2.0)
    assert retired_binds(engine) == []
    engine.bind_done(bind)
    assert retired_binds(engine) == ([bind] if retired else [])
    engine.bind_done(bind)  # twice is once
    assert retired_binds(engine) == []


def test_a_pending_bidirectional_bind_may_not_answer(engine: Engine, session: int) -> None:
    bind = engine.bind_for_client(session, UDP, EXT4, 1.0)
    engine.inbound(inbound_pkt(S1, EXT4, bind.port, proto=UDP), 2.0)
    assert bind.recent == {} and not bind.may_answer(S1, 5555, 2.0)


def test_a_tcp_bind_takes_one_connection(engine: Engine, session: int) -> None:
    bind = engine.bind_for_client(session, TCP, EXT4, 1.0)
    allow(engine, session, bind)
    assert engine.inbound(inbound_pkt(S1, EXT4, bind.port), 2.0).verdict is Verdict.ADMIT_KERNEL
    engine.bind_done(bind)
    d = engine.inbound(inbound_pkt(S1, EXT4, bind.port, sport=5556), 3.0)
    assert d.verdict is Verdict.DROP
    assert [b.id for b in engine.binds.of(session)] == [bind.id]


def test_ending_the_session_closes_its_binds(engine: Engine, session: int) -> None:
    bind = engine.bind_for_client(session, UDP, EXT4, 1.0)
    allow(engine, session, bind, guid=DNS)
    engine.end_session(session, 2.0)
    assert bind.state is BindState.CLOSED and engine.bind_ports.in_use == 0
    assert engine.inbound(inbound_pkt(S1, EXT4, bind.port, proto=UDP), 3.0).verdict is Verdict.DROP
    # the port is free for the next client
    other = engine.open_firewall_session(C2, "alice", 3.0)
    ports = {engine.bind_for_client(other.id, UDP, EXT4, 3.0).port for _ in range(3)}
    assert ports == {20000, 20001, 20002}


def test_a_done_bind_gives_its_port_back_and_a_new_bind_there_is_found(engine: Engine) -> None:
    """bind_done returns the port at once; when the pool hands it out again, the session's
    new bind there is the one RetroactiveAllowBind finds, not the closed one."""
    s = engine.open_firewall_session(C1, "alice", 1.0)
    first = [engine.bind_for_client(s.id, TCP, EXT4, 1.0) for _ in range(3)]  # the whole pool
    engine.bind_done(first[0])
    assert engine.bind_ports.in_use == 2
    engine.bind_done(first[0])  # twice is once
    assert engine.bind_ports.in_use == 2
    again = engine.bind_for_client(s.id, TCP, EXT4, 2.0)
    assert again.port == first[0].port
    found, approved = engine.retroactive_allow_bind(s.id, TCP, None, again.port, FTP, Flags(0), None, 3.0)
    assert found is again and approved
