"""RedirectConnections in the pure core: the port pools, the grants, and the flows they admit.

Kernel-mode redirects are decided by ``Engine.decide(..., redirect_port=...)`` (the
kernel's DNAT has already sent the packet on to its target); user-mode redirects by
``Engine.redirect_packet`` (the client's packet still goes to the fw's port).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import uuid
from typing import Any

import pytest
from core_policy import INTERNAL, POLICY, events_of, pkt, retired

from enforcer.core import packet
from enforcer.core.decisions import SAME_FLOW_WINDOW
from enforcer.core.effects import ConnectEvent, EstablishedConnection
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.flows import FlowRecord, FlowTable, Mode, reverse
from enforcer.core.limits import Limits
from enforcer.core.packet import ICMP, TCP, UDP, FlowKey, Ingress, IPAddress, PacketMeta
from enforcer.core.permissions import ActionState, Permission
from enforcer.core.policy import Defaults, PortRange
from enforcer.core.redirects import MAX_ADDRESSES, PortPool, Redirect
from enforcer.core.results import (
    InvalidArgument,
    IsBusy,
    NetworkRulesDenied,
    PolicyRulesDenied,
    SessionApiError,
)
from enforcer.core.state import Verdict, redirect_key

ip = ipaddress.ip_address

C1, C2, C6 = "192.0.2.11", "192.0.2.12", "2001:db8:1::11"
S1, S6 = "198.51.100.21", "2001:db8:2::21"

FTP = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101")
SSH = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2103")
DNS = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2104")
S2 = "198.51.100.22"
DENIED = "203.0.113.5"
FW4, FW6 = ip("192.0.2.1"), ip("2001:db8:1::1")  # the fw's internal addresses
INTERNAL_ADDRESSES = [ipaddress.ip_interface("192.0.2.1/24"), ipaddress.ip_interface("2001:db8:1::1/64")]
EXTERNAL = (ip("198.51.100.1"), ip("2001:db8:2::1"), ip("198.51.100.2"))
KERNEL_PORTS = (61000, 61009)
USER_PORTS = (63000, 63009)
ACK = packet.TCP_ACK
NO_FLAGS = Flags(0)


def make_engine(*, nat: bool = False, defaults: Defaults | None = None,
                internal_addresses: list[Any] | None = None, limits: Limits | None = None,
                kernel_ports: tuple[int, int] = KERNEL_PORTS,
                user_ports: tuple[int, int] = USER_PORTS) -> Engine:
    policy = POLICY if defaults is None else dataclasses.replace(POLICY, defaults=defaults)
    engine = Engine(policy, INTERNAL, EXTERNAL, nat=nat, data_filters=["upper"],
                    internal_addresses=INTERNAL_ADDRESSES if internal_addresses is None
                    else internal_addresses,
                    kernel_redirect_ports=kernel_ports, user_redirect_ports=user_ports,
                    limits=limits)
    # Sessions come from primaries: C1's is session 1, C6's session 2.
    for client, server in ((C1, S1), (C6, S6)):
        d = engine.decide(pkt(client, server, 21, sport=1), 0.0)
        assert d.verdict is Verdict.ADMIT_KERNEL
    assert [s.id for s in engine.sessions] == [1, 2]
    return engine


@pytest.fixture
def engine() -> Engine:
    return make_engine()


def rdc(engine: Engine, targets: list[tuple[str, int]], *, session: int = 1, protocol: int = TCP,
        flags: Flags = NO_FLAGS, guid: uuid.UUID = FTP, now: float = 1.0,
        **kwargs: Any) -> tuple[tuple[IPAddress, int], list[Permission]]:
    return engine.redirect_connections(session, [(ip(a), p) for a, p in targets], protocol, flags,
                                       guid, now, **kwargs)


def snapshot(engine: Engine) -> tuple[object, ...]:
    """What a failed grant must leave as it was."""
    return ([p.id for p in engine.pending(None, 1.0)],
            [engine.pools[m].to_dict() for m in (False, True)], list(engine.effects))


def udp(src: str, dst: str, dport: int, sport: int = 7000,
        ingress: Ingress = Ingress.INTERNAL) -> PacketMeta:
    return pkt(src, dst, dport, proto=UDP, sport=sport, ingress=ingress)


# --- PortPool ---------------------------------------------------------------------------------

def test_pool_hands_out_consecutive_blocks() -> None:
    pool = PortPool(1000, 1009, "user-mode redirect")
    assert pool.allocate(3) == 1000
    assert pool.allocate(2) == 1003
    assert pool.in_use == 5
    assert pool.to_dict() == {"range": [1000, 1009], "in_use": 5, "blocks": 2}
    assert 1000 in pool and 1009 in pool
    assert 999 not in pool and 1010 not in pool and "1000" not in pool


def test_pool_cursor_rotates_past_ports_just_returned() -> None:
    pool = PortPool(1000, 1009, "user-mode redirect")
    assert pool.allocate(3) == 1000
    assert pool.allocate(2) == 1003
    pool.release(1000)
    assert pool.allocate(3) == 1005  # not 1000: just returned, so handed out last
    assert pool.allocate(2) == 1008  # the very end of the range
    assert pool.allocate(3) == 1000  # the cursor wrapped to the start
    assert pool.in_use == 10


def test_pool_skips_a_tail_too_short_for_the_block() -> None:
    pool = PortPool(1000, 1009, "kernel-mode redirect")
    assert pool.allocate(8) == 1000
    pool.release(1000)
    assert pool.allocate(3) == 1000  # 1008-1009 is free but holds only 2
    assert pool.allocate(5) == 1003
    assert pool.to_dict() == {"range": [1000, 1009], "in_use": 8, "blocks": 2}


def test_pool_release_returns_the_whole_block() -> None:
    pool = PortPool(1000, 1009, "kernel-mode redirect")
    base = pool.allocate(4)
    pool.release(base)
    assert pool.in_use == 0
    assert pool.to_dict()["blocks"] == 0
    assert pool.allocate(10) == 1000


def test_pool_exhausted_is_busy_and_names_the_range() -> None:
    pool = PortPool(1000, 1009, "user-mode redirect")
    assert pool.allocate(10) == 1000
    with pytest.raises(IsBusy, match=r"no 1 consecutive free ports among the user-mode redirect "
                                     r"ports 1000-1009 \(10 in use\)"):
        pool.allocate(1)
    assert pool.in_use == 10
    pool.release(1000)
    assert pool.allocate(1) == 1000


@pytest.mark.parametrize("count", [0, -1, 11, 64])
def test_pool_count_outside_the_range_size_is_invalid(count: int) -> None:
    pool = PortPool(1000, 1009, "kernel-mode redirect")
    pool.allocate(2)
    with pytest.raises(InvalidArgument, match=f"{count} ports do not fit the kernel-mode redirect "
                                              "ports 1000-1009"):
        pool.allocate(count)
    assert pool.in_use == 2 and pool.to_dict()["blocks"] == 1


def test_pool_block_needs_consecutive_free_ports() -> None:
    pool = PortPool(1000, 1005, "user-mode")
    assert [pool.allocate(2) for _ in range(3)] == [1000, 1002, 1004]
    pool.release(1000)
    pool.release(1004)
    assert pool.in_use == 2  # four ports free, but never more than two in a row
    for count in (3, 4):
        with pytest.raises(IsBusy, match=r"\(2 in use\)"):
            pool.allocate(count)
    assert pool.allocate(2) == 1000
    assert pool.allocate(2) == 1004
    assert pool.in_use == 6


def test_pool_blocks_skip_every_port_avoided() -> None:
    pool = PortPool(1000, 1009, "bind")
    assert pool.allocate(3, avoid=lambda port: port in (1001, 1004)) == 1005
    assert pool.allocate(1, avoid=lambda port: port != 1003) == 1003
    assert pool.allocate(1) == 1004  # nothing avoided: the cursor's next free port
    assert pool.in_use == 5
    with pytest.raises(IsBusy):
        pool.allocate(2, avoid=lambda port: port % 2 == 0)
    assert pool.in_use == 5


def test_pool_exhausted_says_how_many_ports_the_caller_avoided_and_why() -> None:
    pool = PortPool(1000, 1003, "user-mode redirect")
    assert pool.allocate(1) == 1000
    asked: list[int] = []

    def avoid(port: int) -> bool:
        asked.append(port)
        return port != 1002

    with pytest.raises(IsBusy, match=r"no 2 consecutive free ports among the user-mode redirect "
                                     r"ports 1000-1003 \(1 in use, 2 held by flows\)"):
        pool.allocate(2, avoid, "held by flows")
    assert sorted(asked) == [1001, 1002, 1003]  # each asked once, however many blocks hold it
    assert pool.in_use == 1


def test_pool_single_port_range() -> None:
    pool = PortPool(5000, 5000, "user-mode")
    assert pool.allocate(1) == 5000
    with pytest.raises(IsBusy):
        pool.allocate(1)
    pool.release(5000)
    assert pool.allocate(1) == 5000


@pytest.mark.parametrize(("low", "high"), [(0, 10), (10, 9), (1, 65536), (-5, 5)])
def test_pool_bad_range(low: int, high: int) -> None:
    with pytest.raises(ValueError, match=f"bad port range {low}-{high}"):
        PortPool(low, high, "x")


# --- RedirectConnections: the grant ------------------------------------------------------------

def test_redirect_returns_the_internal_address_and_one_action_per_target(engine: Engine) -> None:
    targets = [(S1, 2121), (S2, 2122), (S1, 2123)]
    (internal, base), perms = rdc(engine, targets, now=5.0, filter_id=3, context="ctx")
    assert (internal, base) == (FW4, 61000)
    assert len(perms) == 3
    for i, (perm, (target, port)) in enumerate(zip(perms, targets, strict=True)):
        assert perm.redirect == Redirect(TCP, ip(C1), FW4, 61000 + i, ip(target), port, 61000, False)
        assert perm.redirect.internal_endpoint == (FW4, 61000 + i)
        assert perm.redirect.target_endpoint == (ip(target), port)
        assert perm.key == redirect_key(TCP, ip(C1), 61000 + i)
        assert (perm.state, perm.session_id, perm.protocol_name) == (ActionState.PENDING, 1, "FTP")
        assert (perm.created, perm.expires, perm.filter_id, perm.context) == (5.0, None, 3, "ctx")
    assert [p.id for p in engine.pending(1, 5.0)] == [p.id for p in perms]
    assert (engine.pools[False].in_use, engine.pools[True].in_use) == (3, 0)
    assert perms[1].to_dict()["redirect"] == {"internal": ["192.0.2.1", 61001],
                                              "target": [S2, 2122], "mode": "kernel"}


def test_redirect_uses_the_internal_address_facing_the_client(engine: Engine) -> None:
    (internal, base), perms = rdc(engine, [(S6, 2121)], session=2)
    assert (internal, base) == (FW6, 61000)
    assert perms[0].redirect is not None and perms[0].redirect.client == ip(C6)
    assert perms[0].redirect.internal == FW6


def test_successive_redirects_take_successive_blocks(engine: Engine) -> None:
    assert rdc(engine, [(S1, 1), (S1, 2)])[0] == (FW4, 61000)
    assert rdc(engine, [(S1, 3)])[0] == (FW4, 61002)
    assert rdc(engine, [(S6, 3)], session=2)[0] == (FW6, 61003)  # one pool for both families
    assert engine.pools[False].to_dict() == {"range": [61000, 61009], "in_use": 4, "blocks": 3}


@pytest.mark.parametrize(("flags", "data_filter", "user_mode"), [
    (Flags(0), None, False),
    (Flags.ALLOW_MULTIPLE | Flags.INCREASE_RECEIVE_BUFFER, None, False),
    (Flags.TIMEOUT, None, False),
    (Flags.NO_KERNEL_MODE, None, True),
    (Flags(0), "upper", True),
])
def test_user_mode_redirects_come_from_the_user_pool(engine: Engine, flags: Flags, data_filter: str | None,
                                                    user_mode: bool) -> None:
    (_, base), perms = rdc(engine, [(S1, 2121), (S1, 2122)], flags=flags, data_filter=data_filter)
    assert base == (63000 if user_mode else 61000)
    assert all(p.redirect is not None and p.redirect.user_mode is user_mode for p in perms)
    assert all(p.flags == flags and p.data_filter == data_filter for p in perms)
    assert engine.pools[user_mode].in_use == 2
    assert engine.pools[not user_mode].in_use == 0
    assert perms[0].to_dict()["redirect"]["mode"] == ("user" if user_mode else "kernel")


def test_timeout_redirect_expires(engine: Engine) -> None:
    _, perms = rdc(engine, [(S1, 2121)], flags=Flags.TIMEOUT, now=3.0)
    assert perms[0].expires == 3.0 + POLICY.defaults.permission_timeout


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"flags": Flags.BIDIRECTIONAL}, InvalidArgument, "RedirectConnections does not take BIDIRECTIONAL"),
    ({"flags": Flags.ADDRESS_BASED}, InvalidArgument, "RedirectConnections does not take ADDRESS_BASED"),
    ({"flags": Flags.ADDRESS_BASED | Flags.BIDIRECTIONAL | Flags.TIMEOUT}, InvalidArgument,
     "does not take ADDRESS_BASED, BIDIRECTIONAL"),
    ({"flags": Flags.TIMEOUT | Flags.ALLOW_MULTIPLE}, InvalidArgument,
     "TIMEOUT and ALLOW_MULTIPLE cannot be combined"),
    ({"targets": []}, InvalidArgument, "give 1 to 64 connect addresses, not 0"),
    ({"targets": [(S1, 2000 + i) for i in range(MAX_ADDRESSES + 1)]}, InvalidArgument,
     "give 1 to 64 connect addresses, not 65"),
    ({"targets": [(S1, 2121), (DENIED, 2121), (S2, 2121)]}, NetworkRulesDenied,
     f"destination {DENIED} denied: site rule 'denied net'"),
    ({"targets": [(S1, 2121), ("192.0.2.200", 2121)]}, NetworkRulesDenied, "no site rule allows it"),
    ({"guid": SSH}, PolicyRulesDenied, f"protocol rule 'nobody uses SSH' denies SSH to {C1}"),
    ({"guid": uuid.UUID(int=7)}, InvalidArgument, "no protocol is defined with GUID"),
    ({"protocol": ICMP}, InvalidArgument, "protocol must be TCP (6) or UDP (17), not 1"),
    ({"targets": [(S1, 2121), (S1, 0)]}, InvalidArgument, "port 0 is outside 1-65535"),
    ({"targets": [(S1, 65536)]}, InvalidArgument, "port 65536 is outside 1-65535"),
    ({"targets": [(S1, 2121), (S6, 2121)]}, InvalidArgument, "not of the client's address family"),
    ({"targets": [("0.0.0.0", 2121)]}, InvalidArgument, "not a unicast host address"),
    ({"session": 99}, InvalidArgument, "no session 99"),
    ({"data_filter": "nope"}, InvalidArgument, "no data filter 'nope' (upper)"),
    ({"data_filter": "upper", "protocol": UDP, "guid": DNS}, InvalidArgument,
     "data filters are for TCP flows"),
    ({"proxy_external_address": ip("198.51.100.9")}, InvalidArgument,
     "not one of the firewall's external addresses"),
    ({"targets": [(S1, 2121), ("192.0.2.1", 2121)]}, InvalidArgument,
     "target 192.0.2.1 is the firewall's own address"),
    ({"targets": [("198.51.100.2", 22)]}, InvalidArgument,
     "target 198.51.100.2 is the firewall's own address"),
    ({"session": 2, "targets": [(S6, 2121), ("2001:db8:2::1", 8080)]}, InvalidArgument,
     "target 2001:db8:2::1 is the firewall's own address"),
    ({"session": 2, "targets": [("2001:db8:1::1", 2121)]}, InvalidArgument,
     "target 2001:db8:1::1 is the firewall's own address"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_a_refused_redirect_creates_nothing(engine: Engine, kwargs: dict[str, Any],
                                            error: type[SessionApiError], message: str) -> None:
    rdc(engine, [(S1, 1)])  # something there already, that must stay as it is
    rdc(engine, [(S1, 1)], flags=Flags.NO_KERNEL_MODE)
    before = snapshot(engine)
    targets = kwargs.pop("targets", [(S1, 2121), (S2, 2122)])
    with pytest.raises(error) as info:
        rdc(engine, targets, **kwargs)
    assert message in str(info.value)
    assert snapshot(engine) == before
    assert (engine.pools[False].in_use, engine.pools[True].in_use) == (1, 1)


def test_the_pending_cap_counts_every_target() -> None:
    engine = make_engine(defaults=Defaults(permission_timeout=5, max_pending_per_session=4))
    rdc(engine, [(S1, 1), (S1, 2)])
    before = snapshot(engine)
    with pytest.raises(IsBusy, match="session 1 would have more than 4 pending permissions"):
        rdc(engine, [(S1, 3), (S1, 4), (S1, 5)])
    assert snapshot(engine) == before
    (_, base), perms = rdc(engine, [(S1, 3), (S1, 4)])
    assert base == 61002 and len(perms) == 2
    assert len(engine.pending(1, 1.0)) == 4


def test_no_free_block_is_busy_and_creates_nothing(engine: Engine) -> None:
    rdc(engine, [(S1, p) for p in range(1, 9)])  # 8 of the 10 kernel-mode ports
    before = snapshot(engine)
    with pytest.raises(IsBusy, match=r"no 3 consecutive free ports among the kernel-mode redirect "
                                     r"ports 61000-61009 \(8 in use\)"):
        rdc(engine, [(S1, 2121), (S1, 2122), (S1, 2123)])
    assert snapshot(engine) == before
    # More than the whole range can ever hold: an invalid argument, not a busy pool.
    with pytest.raises(InvalidArgument, match="11 ports do not fit the user-mode redirect ports"):
        rdc(engine, [(S1, p) for p in range(1, 12)], flags=Flags.NO_KERNEL_MODE)
    assert snapshot(engine) == before
    # the other pool is separate
    assert rdc(engine, [(S1, 1), (S1, 2), (S1, 3)], flags=Flags.NO_KERNEL_MODE)[0] == (FW4, 63000)


def test_no_internal_address_on_the_clients_network() -> None:
    engine = make_engine(internal_addresses=INTERNAL_ADDRESSES[:1])  # IPv4 only
    before = snapshot(engine)
    with pytest.raises(InvalidArgument, match=f"the firewall has no address on {C6}'s network"):
        rdc(engine, [(S6, 2121)], session=2)
    assert snapshot(engine) == before
    assert rdc(engine, [(S1, 2121)])[0] == (FW4, 61000)


# --- a block's life ----------------------------------------------------------------------------

def test_a_block_returns_to_its_pool_when_all_its_actions_are_done(engine: Engine) -> None:
    (_, first), _ = rdc(engine, [(S1, 9)])
    (_, base), perms = rdc(engine, [(S1, 2121), (S1, 2122), (S1, 2123)], flags=Flags.TIMEOUT, now=1.0)
    assert (first, base) == (61000, 61001)
    engine.cancel(perms[0].id, 2.0)
    assert engine.pools[False].in_use == 4  # cancelled, but its block is still out
    d = engine.decide(pkt(C1, S1, 2122, sport=5000), 3.0, redirect_port=base + 1)
    assert d.verdict is Verdict.ADMIT_KERNEL
    assert engine.pools[False].in_use == 4
    engine.expire(1.0 + POLICY.defaults.permission_timeout)
    assert [p.state for p in perms] == [ActionState.CANCELLED, ActionState.CONSUMED, ActionState.EXPIRED]
    assert engine.pools[False].in_use == 1  # only the other block
    assert engine.pools[False].to_dict()["blocks"] == 1


def test_session_end_returns_the_block(engine: Engine) -> None:
    _, perms = rdc(engine, [(S1, 2121), (S1, 2122)], flags=Flags.NO_KERNEL_MODE)
    assert engine.pools[True].in_use == 2
    cancelled = engine.end_session(1, 2.0)
    assert {p.id for p in cancelled} == {p.id for p in perms}
    assert all(p.state is ActionState.CANCELLED for p in perms)
    assert engine.pools[True].in_use == 0


def test_allow_multiple_keeps_its_block_until_cancelled(engine: Engine) -> None:
    _, (perm,) = rdc(engine, [(S1, 2121)], flags=Flags.ALLOW_MULTIPLE)
    for sport in (5000, 5001, 5002):
        d = engine.decide(pkt(C1, S1, 2121, sport=sport), 2.0, redirect_port=61000)
        assert d.verdict is Verdict.ADMIT_KERNEL and d.action_id == perm.id
    assert perm.admitted == 3 and perm.state is ActionState.PENDING
    assert engine.pools[False].in_use == 1
    assert retired(engine) == []
    engine.cancel(perm.id, 3.0)
    assert engine.pools[False].in_use == 0
    assert retired(engine) == [perm]


def test_drain_retired_gives_kernel_mode_redirects_once(engine: Engine) -> None:
    _, kernel = rdc(engine, [(S1, 2121), (S1, 2122)])
    _, user = rdc(engine, [(S1, 2121), (S1, 2122)], flags=Flags.NO_KERNEL_MODE)
    assert retired(engine) == []
    engine.cancel(user[0].id, 2.0)
    engine.cancel(kernel[1].id, 2.0)
    assert engine.decide(pkt(C1, S1, 2121), 3.0, redirect_port=61000).verdict is Verdict.ADMIT_KERNEL
    assert engine.redirect_packet(pkt(C1, str(FW4), 63001), 40, 3.0) is not None
    assert retired(engine) == [kernel[1], kernel[0]]  # in the order they finished
    assert retired(engine) == []
    # nor are other grants' permissions ever retired
    perm = engine.allow_future_connect(1, ip(S1), 2121, TCP, Flags(0), FTP, 4.0)
    engine.cancel(perm.id, 5.0)
    assert retired(engine) == []


# --- kernel-mode redirects: decide(..., redirect_port=...) ----------------------------------------

def test_kernel_redirect_admits_once_per_port(engine: Engine) -> None:
    (_, base), perms = rdc(engine, [(S1, 2121), (S2, 2122)])
    d = engine.decide(pkt(C1, S2, 2122, sport=40001), 2.0, redirect_port=base + 1)
    assert d.verdict is Verdict.ADMIT_KERNEL
    assert (d.session_id, d.protocol, d.action_id, d.one_way) == (1, "FTP", perms[1].id, False)
    assert d.reason == f"redirected FTP flow admitted by action {perms[1].id} in kernel mode"
    assert [p.state for p in perms] == [ActionState.PENDING, ActionState.CONSUMED]
    record = engine.flows.get(d.key)
    assert record is not None
    assert (record.mode, record.redirect, record.action_id) == (Mode.KERNEL, (FW4, base + 1), perms[1].id)
    assert record.client_side_key == FlowKey(TCP, ip(C1), 40001, FW4, base + 1)
    again = engine.decide(pkt(C1, S2, 2122, sport=40002), 3.0, redirect_port=base + 1)
    assert again.verdict is Verdict.DROP
    assert again.reason == (f"no kernel-mode redirect of this client's to {S2}:2122 "
                            f"is pending on port {base + 1}")
    assert perms[0].state is ActionState.PENDING


@pytest.mark.parametrize(("meta", "port"), [
    (pkt(C1, S1, 2121), 61001),   # the other port's target
    (pkt(C1, S2, 2122), 61000),
    (pkt(C1, S1, 2122), 61000),   # right address, wrong port
    (pkt(C1, S1, 2121), 61005),   # a port nothing was granted on
    (pkt(C1, S1, 2121, ingress=Ingress.EXTERNAL), 61000),
    (pkt(C1, S1, 2121, flags=ACK), 61000),
    (pkt(C1, S1, 2121, flags=packet.TCP_SYN | ACK), 61000),
    (pkt(C2, S1, 2121), 61000),   # another client
    (pkt(C1, S1, 2121, proto=UDP), 61000),
    (pkt(C1, S1, 2123), 63000),   # the user-mode redirect's port
], ids=["other-target", "other-target-2", "wrong-port", "no-grant", "external", "ack", "syn-ack",
        "other-client", "udp", "user-mode-port"])
def test_kernel_redirect_drops_what_it_does_not_lead_to(engine: Engine, meta: PacketMeta,
                                                       port: int) -> None:
    _, perms = rdc(engine, [(S1, 2121), (S2, 2122)])
    _, user = rdc(engine, [(S1, 2123)], flags=Flags.NO_KERNEL_MODE)
    flows = len(engine.flows)
    d = engine.decide(meta, 2.0, redirect_port=port)
    assert d.verdict is Verdict.DROP
    assert f"is pending on port {port}" in d.reason
    assert all(p.state is ActionState.PENDING and p.admitted == 0 for p in [*perms, *user])
    assert len(engine.flows) == flows


def test_a_direct_connection_to_the_target_is_not_redirected(engine: Engine) -> None:
    _, (perm,) = rdc(engine, [(S1, 2121)])
    d = engine.decide(pkt(C1, S1, 2121), 2.0)
    assert d.verdict is Verdict.DROP
    assert "tcp/2121 is no protocol's primary port" in d.reason
    assert perm.state is ActionState.PENDING


@pytest.mark.parametrize("nat", [False, True])
def test_redirected_flows_are_always_source_translated(nat: bool) -> None:
    engine = make_engine(nat=nat)
    rdc(engine, [(S1, 2121)])
    rdc(engine, [(S1, 2122)], proxy_external_address=ip("198.51.100.2"))
    rdc(engine, [(S1, 2123)], flags=Flags.NO_KERNEL_MODE)
    first = engine.decide(pkt(C1, S1, 2121), 2.0, redirect_port=61000)
    second = engine.decide(pkt(C1, S1, 2122), 2.0, redirect_port=61001)
    assert (first.verdict, first.snat) == (Verdict.ADMIT_KERNEL, 0)
    assert (second.verdict, second.snat) == (Verdict.ADMIT_KERNEL, 1)
    record = engine.redirect_packet(pkt(C1, str(FW4), 63000), 60, 2.0)
    assert record is not None and record.snat == 0
    # A secondary connection is translated only under NAT.
    engine.allow_future_connect(1, ip(S1), 2200, TCP, Flags(0), FTP, 3.0)
    afc = engine.decide(pkt(C1, S1, 2200), 3.0)
    assert afc.verdict is Verdict.ADMIT_KERNEL
    assert afc.snat == (0 if nat else None)
    afc_record = engine.flows.get(afc.key)
    assert afc_record is not None and afc_record.snat == afc.snat
    assert engine.decide(pkt(C1, S1, 21, sport=9), 4.0).snat == (0 if nat else None)


# --- user-mode redirects: redirect_packet ------------------------------------------------------

def test_user_mode_redirect_makes_a_flow_to_the_target(engine: Engine) -> None:
    (internal, base), perms = rdc(engine, [(S1, 2121), (S2, 2122)], flags=Flags.NO_KERNEL_MODE)
    record = engine.redirect_packet(pkt(C1, str(internal), base + 1, sport=40001), 60, 2.0)
    assert record is not None
    assert record.key == FlowKey(TCP, ip(C1), 40001, ip(S2), 2122)
    assert record.redirect == (FW4, base + 1)
    assert record.client_side_key == FlowKey(TCP, ip(C1), 40001, FW4, base + 1)
    assert (record.mode, record.action_id, record.session_id, record.protocol) == \
        (Mode.USER, perms[1].id, 1, "FTP")
    assert (record.packets_out, record.bytes_out, record.admitted_at) == (1, 60, 2.0)
    assert record.one_way is False
    assert [p.state for p in perms] == [ActionState.PENDING, ActionState.CONSUMED]
    decision = engine.recent[-1]
    assert (decision.verdict, decision.key, decision.action_id) == \
        (Verdict.ADMIT_USER, record.key, perms[1].id)
    assert engine.counters["admit-user"] == 1


def test_later_packets_of_the_client_port_belong_to_the_same_flow(engine: Engine) -> None:
    _, (perm,) = rdc(engine, [(S1, 2121)], flags=Flags.NO_KERNEL_MODE)
    record = engine.redirect_packet(pkt(C1, str(FW4), 63000, sport=40001), 60, 2.0)
    decisions = len(engine.recent)
    assert record is not None
    for n, flags in enumerate((ACK, ACK | packet.TCP_FIN, packet.TCP_SYN), start=2):
        again = engine.redirect_packet(pkt(C1, str(FW4), 63000, sport=40001, flags=flags), 40, 2.0 + n)
        assert again is record
        assert (record.packets_out, record.bytes_out, record.last_seen) == (n, 60 + 40 * (n - 1), 2.0 + n)
    assert engine.counters["user-mode packets"] == 3
    assert len(engine.recent) == decisions  # no new decisions
    assert perm.admitted == 1
    # another client port is another connection, and the permission is used up
    assert engine.redirect_packet(pkt(C1, str(FW4), 63000, sport=40002), 60, 9.0) is None


@pytest.mark.parametrize("flags", [Flags.NO_KERNEL_MODE, Flags.NO_KERNEL_MODE | Flags.ALLOW_MULTIPLE])
def test_a_syn_after_the_handshake_is_a_new_connection_that_needs_a_permission(
        engine: Engine, flags: Flags) -> None:
    """A SYN before the handshake is done is the first one sent again, before a reply and
    after one (its SYN-ACK lost on the way to the client), however often: the same flow,
    no new event. Once the client has answered, the client port is being used for a new
    connection, which the used-up single-use redirect refuses."""
    _, (perm,) = rdc(engine, [(S1, 2121)], flags=flags)
    record = engine.redirect_packet(pkt(C1, str(FW4), 63000, sport=40001), 60, 2.0)
    assert record is not None
    decisions = len(engine.recent)
    assert engine.redirect_packet(pkt(C1, str(FW4), 63000, sport=40001), 60, 3.0) is record
    engine.user_packet(pkt(S1, C1, 40001, sport=2121, flags=packet.TCP_SYN | ACK,
                           ingress=Ingress.EXTERNAL), 60, 3.1)
    assert record.packets_back == 1
    for again in (3.5, 4.5):
        assert engine.redirect_packet(pkt(C1, str(FW4), 63000, sport=40001), 60, again) is record
    assert len(engine.recent) == decisions and perm.admitted == 1  # (no new flow, no event)
    assert engine.redirect_packet(pkt(C1, str(FW4), 63000, sport=40001, flags=ACK), 40, 4.6) is record
    if Flags.ALLOW_MULTIPLE in flags:
        return
    assert engine.redirect_packet(pkt(C1, str(FW4), 63000, sport=40001), 60, 130.0) is None
    assert engine.recent[-1].verdict is Verdict.DROP


def test_a_redirect_never_makes_a_flow_that_another_held_flow_is(engine: Engine) -> None:
    """Two redirect ports to one target, and the client connects to both from the same
    port (two connections to it): rewritten, the second would be the first's flow (the
    kernel tracks one). It is dropped, its redirect kept pending; the first goes on."""
    (_, first_port), _ = rdc(engine, [(S1, 2121)], flags=Flags.NO_KERNEL_MODE)
    (_, second_port), (second,) = rdc(engine, [(S1, 2121)], flags=Flags.NO_KERNEL_MODE)
    first = engine.redirect_packet(pkt(C1, str(FW4), first_port, sport=40001), 60, 2.0)
    assert first is not None
    assert engine.redirect_packet(pkt(C1, str(FW4), second_port, sport=40001), 60, 2.5) is None
    assert engine.recent[-1].reason == (f"the flow it would make, {first.key}, is another "
                                        "the fw holds")
    assert second.state is ActionState.PENDING and engine.flows.held_count == 1
    again = engine.redirect_packet(pkt(C1, str(FW4), first_port, sport=40001, flags=ACK), 40, 3.0)
    assert again is first and engine.flows.get(first.key) is first
    # from another port, the second redirect makes its own flow
    assert engine.redirect_packet(pkt(C1, str(FW4), second_port, sport=40002), 60, 3.5) is not None
    assert second.state is ActionState.CONSUMED


@pytest.mark.parametrize("closing", ["fins both ways", "reset", "fin out only", "open"])
def test_a_syn_from_the_port_of_a_closed_connection_by_the_redirect_starts_a_new_one(
        engine: Engine, closing: str) -> None:
    """A client connects again from the port of its last connection by the same redirect
    (a published server, ALLOW_MULTIPLE): once that connection is closed both ways, or
    reset, the SYN starts a new one in its place, as conntrack lets it; while it is open or
    half closed the SYN would take a live flow's place, and is dropped (CI met the first:
    curl's new control connection from a reused port waited 8 s)."""
    (_, base), (perm,) = rdc(engine, [(S1, 21)], flags=Flags.NO_KERNEL_MODE | Flags.ALLOW_MULTIPLE)
    old = engine.redirect_packet(pkt(C1, str(FW4), base, sport=40001), 60, 2.0)
    assert old is not None
    engine.user_packet(pkt(S1, C1, 40001, sport=21, flags=packet.TCP_SYN | ACK,
                           ingress=Ingress.EXTERNAL), 60, 2.1)
    assert engine.redirect_packet(pkt(C1, str(FW4), base, sport=40001, flags=ACK), 40, 2.2) is old
    fin, rst = packet.TCP_FIN | ACK, packet.TCP_RST
    if closing in ("fins both ways", "fin out only"):
        assert engine.redirect_packet(pkt(C1, str(FW4), base, sport=40001, flags=fin), 40, 2.3) is old
    if closing == "fins both ways":
        engine.user_packet(pkt(S1, C1, 40001, sport=21, flags=fin, ingress=Ingress.EXTERNAL), 40, 2.4)
        assert engine.redirect_packet(pkt(C1, str(FW4), base, sport=40001, flags=ACK), 40, 2.5) is old
    if closing == "reset":
        engine.user_packet(pkt(S1, C1, 40001, sport=21, flags=rst, ingress=Ingress.EXTERNAL), 40, 2.4)
    again = engine.redirect_packet(pkt(C1, str(FW4), base, sport=40001), 60, 3.0)
    if closing in ("fins both ways", "reset"):
        assert again is not None and again is not old and again.key == old.key
        assert engine.flows.get(old.key) is again and engine.flows.held_count == 1
        assert perm.admitted == 2
    else:
        assert again is None and engine.flows.get(old.key) is old
        assert engine.recent[-1].reason == (f"the flow it would make, {old.key}, is another "
                                            "the fw holds")
        assert perm.admitted == 1


@pytest.mark.parametrize(("meta", "reason"), [
    (pkt(C1, str(FW4), 63000, flags=ACK), "TCP packet with flags 0x10 to a redirect port belongs to no "
                                          "redirected connection"),
    (pkt(C1, str(FW4), 63000, flags=packet.TCP_SYN | ACK), "TCP packet with flags 0x12"),
    (pkt(C1, str(FW4), 63005), "no user-mode redirect of this client's is pending on port 63005"),
    (pkt(C1, str(FW4), 61000), "no user-mode redirect of this client's is pending on port 61000"),
    (pkt(C1, "192.0.2.254", 63000), "no user-mode redirect of this client's is pending on port 63000"),
    (pkt(C1, str(FW4), 63000, proto=UDP), "no user-mode redirect of this client's is pending on port 63000"),
    (pkt(C2, str(FW4), 63000), "no user-mode redirect of this client's is pending on port 63000"),
    (pkt(C1, str(FW4), 63000, ingress=Ingress.EXTERNAL), f"{C1} is not an internal client on the "
                                                         "internal side"),
    (pkt("203.0.113.9", str(FW4), 63000), "203.0.113.9 is not an internal client"),
], ids=["ack", "syn-ack", "unknown-port", "kernel-mode-port", "other-address", "udp", "other-client",
        "external", "not-internal"])
def test_redirect_packet_drops_what_no_redirect_admits(engine: Engine, meta: PacketMeta,
                                                      reason: str) -> None:
    _, user = rdc(engine, [(S1, 2121)], flags=Flags.NO_KERNEL_MODE)
    _, kernel = rdc(engine, [(S1, 2121)])
    flows = len(engine.flows)
    assert engine.redirect_packet(meta, 60, 2.0) is None
    decision = engine.recent[-1]
    assert (decision.verdict, decision.key, decision.at) == (Verdict.DROP, meta.key, 2.0)
    assert reason in decision.reason
    assert decision.session_id is None
    assert len(engine.flows) == flows
    assert all(p.state is ActionState.PENDING for p in [*user, *kernel])


def test_the_flow_table_finds_a_redirected_flow_by_either_key(engine: Engine) -> None:
    rdc(engine, [(S1, 2121)], flags=Flags.NO_KERNEL_MODE)
    record = engine.redirect_packet(pkt(C1, str(FW4), 63000, sport=40001), 60, 2.0)
    assert record is not None
    assert engine.flows.find(record.client_side_key) == (record, True)
    assert engine.flows.find(record.key) == (record, True)
    assert engine.flows.find(reverse(record.key)) == (record, False)
    assert engine.flows.get(record.key) is record
    # replies come from the target: counted on the way back
    reply = PacketMeta(reverse(record.key), Ingress.EXTERNAL, packet.TCP_SYN | ACK)
    assert engine.user_packet(reply, 50, 3.0) == (record, False)
    assert (record.packets_back, record.bytes_back) == (1, 50)


def test_user_mode_udp_redirect_admits_replies(engine: Engine) -> None:
    (_, base), _ = rdc(engine, [(S1, 53)], protocol=UDP, guid=DNS, flags=Flags.NO_KERNEL_MODE)
    record = engine.redirect_packet(udp(C1, str(FW4), base), 30, 2.0)
    assert record is not None and record.protocol == "DNS"
    assert record.one_way is False  # the client spoke to the fw: its answers come back
    assert engine.recent[-1].one_way is False
    assert engine.redirect_packet(udp(C1, str(FW4), base), 30, 20.0) is record
    # unlike a secondary UDP flow without BIDIRECTIONAL
    engine.allow_future_connect(1, ip(S1), 5000, UDP, Flags(0), DNS, 3.0)
    assert engine.decide(udp(C1, S1, 5000), 3.0).one_way is True


def test_user_mode_redirect_ipv6(engine: Engine) -> None:
    (internal, base), _ = rdc(engine, [(S6, 2121)], session=2, flags=Flags.NO_KERNEL_MODE)
    assert (internal, base) == (FW6, 63000)
    record = engine.redirect_packet(pkt(C6, str(FW6), base), 80, 2.0)
    assert record is not None
    assert record.key == FlowKey(TCP, ip(C6), 40000, ip(S6), 2121)
    assert record.redirect == (FW6, 63000)
    assert record.to_dict()["redirect"] == [str(FW6), 63000]


# --- events ------------------------------------------------------------------------------------

def test_established_connection_of_a_kernel_mode_redirect(engine: Engine) -> None:
    _, (perm,) = rdc(engine, [(S1, 2121)], filter_id=7, context={"k": 1})
    d = engine.decide(pkt(C1, S1, 2121, sport=40001), 2.0, redirect_port=61000)
    assert events_of(engine) == [
        EstablishedConnection(7, {"k": 1}, perm.id, 1, d.key, ip("198.51.100.1"), 2.0, (FW4, 61000))]
    assert events_of(engine) == []
    event = EstablishedConnection(7, {"k": 1}, perm.id, 1, d.key, ip("198.51.100.1"), 2.0,
                                  (FW4, 61000)).to_dict()
    assert (event["client"], event["target"], event["internal"], event["external"]) == \
        ([C1, 40001], [S1, 2121], ["192.0.2.1", 61000], "198.51.100.1")


def test_established_connection_of_a_user_mode_redirect(engine: Engine) -> None:
    _, (perm,) = rdc(engine, [(S1, 2121)], flags=Flags.NO_KERNEL_MODE, filter_id=7,
                     proxy_external_address=ip("198.51.100.2"))
    record = engine.redirect_packet(pkt(C1, str(FW4), 63000, sport=40001), 60, 2.0)
    assert record is not None
    (event,) = events_of(engine)
    assert isinstance(event, EstablishedConnection)
    assert (event.filter_id, event.action_id, event.key, event.internal, event.external) == \
        (7, perm.id, record.key, (FW4, 63000), ip("198.51.100.2"))
    # later packets of the flow make none
    engine.redirect_packet(pkt(C1, str(FW4), 63000, sport=40001, flags=ACK), 40, 3.0)
    assert events_of(engine) == []


def test_no_established_connection_without_a_filter(engine: Engine) -> None:
    rdc(engine, [(S1, 2121)])
    assert engine.decide(pkt(C1, S1, 2121), 2.0, redirect_port=61000).verdict is Verdict.ADMIT_KERNEL
    assert events_of(engine) == []


def test_connect_events_for_redirected_flows(engine: Engine) -> None:
    engine.register_connect_events(9, TCP, PortRange(2100, 2130))
    engine.register_connect_events(9, TCP, PortRange(2121, 2121))  # overlapping: still one event
    engine.register_connect_events(10, UDP, PortRange(2121, 2121))  # other protocol
    engine.register_connect_events(11, TCP, PortRange(61000, 61009))  # the redirect ports
    _, (perm,) = rdc(engine, [(S1, 2121)], filter_id=7)
    d = engine.decide(pkt(C1, S1, 2121), 2.0, redirect_port=61000)
    external = ip("198.51.100.1")
    assert events_of(engine) == [
        EstablishedConnection(7, None, perm.id, 1, d.key, external, 2.0, (FW4, 61000)),
        ConnectEvent(9, True, "FTP", perm.id, 1, d.key, external, 2.0, (FW4, 61000)),
    ]
    out = ConnectEvent(9, True, "FTP", perm.id, 1, d.key, external, 2.0, (FW4, 61000)).to_dict()
    assert (out["event"], out["secondary"], out["protocol"], out["target"], out["internal"]) == \
        ("connect", True, "tcp", [S1, 2121], ["192.0.2.1", 61000])


def test_connect_events_for_primaries(engine: Engine) -> None:
    engine.register_connect_events(9, TCP, PortRange(21, 21))
    d = engine.decide(pkt(C1, S1, 21, sport=40005), 2.0)
    assert events_of(engine) == [ConnectEvent(9, False, "FTP", None, 1, d.key, None, 2.0, None)]
    engine.decide(pkt(C1, S1, 80, sport=40006), 3.0)  # HTTP: not a registered port
    assert events_of(engine) == []
    nat = make_engine(nat=True)
    nat.register_connect_events(9, TCP, PortRange(21, 21))
    d = nat.decide(pkt(C1, S1, 21, sport=40005), 2.0)
    (event,) = events_of(nat)
    assert isinstance(event, ConnectEvent) and event.external == ip("198.51.100.1")


def test_forget_filter_stops_connect_events(engine: Engine) -> None:
    engine.register_connect_events(9, TCP, PortRange(21, 21))
    engine.register_connect_events(10, TCP, PortRange(21, 21))
    engine.forget_filter(9)
    engine.forget_filter(12345)  # unknown: nothing to do
    d = engine.decide(pkt(C1, S1, 21, sport=40005), 2.0)
    assert [e.filter_id for e in events_of(engine)] == [10]
    assert d.verdict is Verdict.ADMIT_KERNEL
    assert 9 not in engine.connect_registrations


@pytest.mark.parametrize("protocol", [ICMP, 0, 58, 132])
def test_connect_events_are_for_tcp_and_udp_only(engine: Engine, protocol: int) -> None:
    message = f"protocol must be TCP (6) or UDP (17), not {protocol}"
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        engine.register_connect_events(9, protocol, PortRange(1, 65535))
    assert engine.connect_registrations == {}


# --- UDP: datagrams queued before the kernel knew the first one's verdict ----------------------

@pytest.mark.parametrize(("flags", "verdict"), [(Flags(0), Verdict.ADMIT_KERNEL),
                                                (Flags.NO_KERNEL_MODE, Verdict.ADMIT_USER)])
def test_a_udp_flow_s_early_datagrams_share_its_verdict(engine: Engine, flags: Flags,
                                                       verdict: Verdict) -> None:
    perm = engine.allow_future_connect(1, ip(S1), 5000, UDP, flags, DNS, 9.0, filter_id=7)
    admitted = engine.counters[verdict.value]  # the fixture's primaries
    first = engine.decide(udp(C1, S1, 5000), 10.0, length=30)
    assert first.verdict is verdict and first.action_id == perm.id
    assert len(events_of(engine)) == 1
    for now in (10.5, 10.0 + SAME_FLOW_WINDOW):
        again = engine.decide(udp(C1, S1, 5000), now, length=30)
        assert again.verdict is verdict
        assert again.reason == "a later datagram of a flow just admitted"
        assert (again.action_id, again.session_id, again.one_way, again.snat, again.protocol) == \
            (perm.id, 1, True, None, "DNS")
    assert perm.admitted == 1  # the permission was used once
    assert events_of(engine) == []
    record = engine.flows.get(first.key)
    assert record is not None and (record.packets_out, record.bytes_out) == (3, 90)
    # after the window, it is a new flow: the single-use permission is gone
    late = engine.decide(udp(C1, S1, 5000), 10.0 + SAME_FLOW_WINDOW + 0.5)
    assert late.verdict is Verdict.DROP
    assert engine.counters[verdict.value] == admitted + 3


def test_a_datagram_that_came_another_way_is_no_later_datagram_of_the_flow(engine: Engine) -> None:
    """In the window, a datagram with a flow's addresses and ports is the flow's only if it
    came the flow's way: one sent straight to a kernel-mode redirect's target is not the
    redirected flow's (its single-use permission is spent: dropped), and a forwarded one
    is not the SOCKS service's relayed flow's (that permission was alice's, and spent)."""
    (_, port), _ = rdc(engine, [(S1, 5353)], protocol=UDP, guid=DNS)
    first = engine.decide(udp(C1, S1, 5353), 10.0, redirect_port=port)
    assert first.verdict is Verdict.ADMIT_KERNEL
    again = engine.decide(udp(C1, S1, 5353), 10.2, redirect_port=port)
    assert again.reason == "a later datagram of a flow just admitted"
    straight = engine.decide(udp(C1, S1, 5353), 10.3)
    assert straight.verdict is Verdict.DROP, straight

    alice = engine.open_firewall_session(ip(C2), "alice", 20.0)
    engine.allow_future_connect(alice.id, ip(S2), 7000, UDP, NO_FLAGS, DNS, 20.0)
    relayed = engine.client_connect(alice.id, UDP, ip(S2), 7000, 40001, 21.0)
    assert relayed.verdict is not Verdict.DROP, relayed
    forwarded = engine.decide(udp(C2, S2, 7000, sport=40001), 21.2)
    assert forwarded.verdict is Verdict.DROP, forwarded


def test_udp_primary_datagrams_in_the_window_are_one_primary(engine: Engine) -> None:
    first = engine.decide(udp(C1, S1, 53), 10.0)
    again = engine.decide(udp(C1, S1, 53), 10.5)
    assert first.verdict is again.verdict is Verdict.ADMIT_KERNEL
    session = engine.sessions.find(ip(C1))
    assert session is not None and session.primaries == 2  # the fixture's, and this one
    later = engine.decide(udp(C1, S1, 53), 12.0)
    assert later.verdict is Verdict.ADMIT_KERNEL and "primary connection" in later.reason
    assert session.primaries == 3
    record = engine.flows.get(later.key)
    assert record is not None and record.admitted_at == 12.0


def test_udp_kernel_redirect_datagrams_in_the_window(engine: Engine) -> None:
    _, (perm,) = rdc(engine, [(S1, 53)], protocol=UDP, guid=DNS, filter_id=7)
    first = engine.decide(udp(C1, S1, 53), 2.0, redirect_port=61000)
    again = engine.decide(udp(C1, S1, 53), 2.5, redirect_port=61000)
    assert first.verdict is again.verdict is Verdict.ADMIT_KERNEL
    assert again.snat == first.snat == 0 and again.one_way is False
    assert perm.admitted == 1 and len(events_of(engine)) == 1
    # another client port is another flow
    assert engine.decide(udp(C1, S1, 53, sport=7001), 2.5, redirect_port=61000).verdict is Verdict.DROP


def test_the_window_is_for_udp_and_the_flow_s_own_direction(engine: Engine) -> None:
    engine.allow_future_connect(1, ip(S1), 2200, TCP, Flags(0), FTP, 1.0)
    assert engine.decide(pkt(C1, S1, 2200), 2.0).verdict is Verdict.ADMIT_KERNEL
    assert engine.decide(pkt(C1, S1, 2200), 2.1).verdict is Verdict.DROP  # a TCP SYN is always new
    engine.allow_future_connect(1, ip(S1), 5000, UDP, Flags(0), DNS, 1.0)
    d = engine.decide(udp(C1, S1, 5000), 2.0)
    assert d.verdict is Verdict.ADMIT_KERNEL
    reply = PacketMeta(reverse(d.key), Ingress.EXTERNAL)
    back = engine.decide(reply, 2.1)
    assert back.verdict is Verdict.DROP and "external side" in back.reason


# --- ICMP errors: the flow a quoted packet belongs to -------------------------------------------

def test_related_finds_the_flow_of_a_quoted_packet(engine: Engine) -> None:
    rdc(engine, [(S1, 2121)], flags=Flags.NO_KERNEL_MODE)
    record = engine.redirect_packet(pkt(C1, str(FW4), 63000, sport=40001), 60, 2.0)
    assert record is not None
    assert engine.related(record.key) == (record, True)
    assert engine.related(record.client_side_key) == (record, True)
    assert engine.related(reverse(record.key)) == (record, False)
    assert engine.related(None) is None
    assert engine.related(FlowKey(TCP, ip(C1), 40002, ip(S1), 2121)) is None


# --- defects found by these tests, fixed ----------------------------------------------------

def test_redirect_of_a_family_without_an_external_address() -> None:
    engine = Engine(POLICY, INTERNAL, (ip("198.51.100.1"),), internal_addresses=INTERNAL_ADDRESSES,
                    kernel_redirect_ports=KERNEL_PORTS, user_redirect_ports=USER_PORTS)
    engine.decide(pkt(C6, S6, 21, sport=1), 0.0)
    with pytest.raises(InvalidArgument, match="no external IPv6 address"):
        rdc(engine, [(S6, 2121)])
    assert engine.pending(None, 1.0) == []
    assert engine.pools[False].in_use == 0


def test_nat_primary_of_a_family_without_an_external_address() -> None:
    engine = Engine(POLICY, INTERNAL, (ip("198.51.100.1"),), nat=True)
    d = engine.decide(pkt(C6, S6, 21), 0.0)
    assert d.verdict is Verdict.ADMIT_KERNEL and d.snat is None  # no address to translate to


def test_a_replaced_redirected_flow_leaves_no_stale_client_side_key() -> None:
    """A record of the same flow (as it leaves the fw) replaces a redirected one, its
    client-side key and all: the old redirect port leads to it no more."""
    table = FlowTable(Limits(flow_history=3))
    key = FlowKey(UDP, ip(C1), 5000, ip(S1), 53)
    first = FlowRecord(key, 1, "DNS", Mode.USER, 2.0, redirect=(FW4, 63000))
    second = FlowRecord(key, 1, "DNS", Mode.USER, 3.0, redirect=(FW4, 63001))
    table.add(first, 2.0)
    table.add(second, 3.0)
    assert first.held_as is None and table.held_count == 1
    for sport in (2, 3, 4, 5):  # kernel-mode history: evicts no held flow
        table.add(FlowRecord(FlowKey(TCP, ip(C1), sport, ip(S1), 21), 1, "FTP", Mode.KERNEL, 4.0), 4.0)
    assert table.find_held(FlowKey(UDP, ip(C1), 5000, FW4, 63001)) == (second, True)
    assert table.find(FlowKey(UDP, ip(C1), 5000, FW4, 63000)) is None


# --- a UDP redirect port and the flows of earlier redirects through it --------------------------

def test_a_user_mode_udp_redirect_port_goes_to_no_client_whose_held_flow_went_through_it() -> None:
    """The enforcer holds a user-mode flow by the client's addresses and ports: a new UDP
    redirect of the same client on the port would never see that client's datagrams from
    the flow's port (they go on down the held flow). Other clients, and TCP (whose new
    connection is a SYN), may have the port; once the flow is let go, the client may too."""
    engine = make_engine(user_ports=(63000, 63000))
    assert engine.decide(pkt(C2, S1, 21, sport=1), 0.0).session_id == 3
    (_, base), (first,) = rdc(engine, [(S1, 5001)], protocol=UDP, guid=DNS, flags=Flags.NO_KERNEL_MODE)
    record = engine.redirect_packet(udp(C1, str(FW4), base), 30, 2.0)
    assert record is not None and first.state is ActionState.CONSUMED
    assert engine.flows.holds_redirected(UDP, ip(C1), (FW4, 63000))
    before = snapshot(engine)
    with pytest.raises(IsBusy, match=r"\(0 in use, 1 held by 192\.0\.2\.11's UDP flows of "
                                     r"earlier redirects\)"):
        rdc(engine, [(S2, 5002)], protocol=UDP, guid=DNS, flags=Flags.NO_KERNEL_MODE, now=3.0)
    assert snapshot(engine) == before
    (_, other), (theirs,) = rdc(engine, [(S2, 5002)], session=3, protocol=UDP, guid=DNS,
                                flags=Flags.NO_KERNEL_MODE, now=3.0)
    assert other == 63000
    engine.cancel(theirs.id, 3.0)
    (_, tcp), (connection,) = rdc(engine, [(S2, 2121)], flags=Flags.NO_KERNEL_MODE, now=3.0)
    assert tcp == 63000
    engine.cancel(connection.id, 3.0)
    engine.expire(10_000.0)  # the held flow is let go: conntrack has forgotten it
    assert not engine.flows.holds_redirected(UDP, ip(C1), (FW4, 63000))
    assert rdc(engine, [(S2, 5002)], protocol=UDP, guid=DNS, flags=Flags.NO_KERNEL_MODE,
               now=10_000.0)[0][1] == 63000


def test_a_kernel_mode_udp_redirect_avoids_the_ports_conntrack_says_the_client_s_flows_go_to() -> None:
    engine = make_engine(kernel_ports=(61000, 61001))
    asked: list[tuple[IPAddress, IPAddress]] = []

    def kernel_udp_flows(client: IPAddress, internal: IPAddress) -> set[int]:
        asked.append((client, internal))
        return {61000, 5353}

    (_, base), _ = rdc(engine, [(S1, 5001)], protocol=UDP, guid=DNS, kernel_udp_flows=kernel_udp_flows)
    assert base == 61001 and asked == [(ip(C1), FW4)]
    before = snapshot(engine)
    with pytest.raises(IsBusy, match=r"\(1 in use, 1 held by 192\.0\.2\.11's UDP flows"):
        rdc(engine, [(S1, 5002)], protocol=UDP, guid=DNS, kernel_udp_flows=kernel_udp_flows)
    assert snapshot(engine) == before
    # TCP asks nothing of conntrack; nor does a user-mode UDP redirect (the enforcer holds those)
    asked.clear()
    assert rdc(engine, [(S1, 2121)], kernel_udp_flows=kernel_udp_flows)[0][1] == 61000
    rdc(engine, [(S1, 5003)], protocol=UDP, guid=DNS, flags=Flags.NO_KERNEL_MODE,
        kernel_udp_flows=kernel_udp_flows)
    assert asked == []


def test_a_udp_redirect_whose_flows_cannot_be_asked_for_creates_nothing(engine: Engine) -> None:
    def kernel_udp_flows(client: IPAddress, internal: IPAddress) -> set[int]:
        raise IsBusy("cannot tell which redirect ports 192.0.2.11's UDP flows hold")

    before = snapshot(engine)
    with pytest.raises(IsBusy, match="cannot tell"):
        rdc(engine, [(S1, 5001)], protocol=UDP, guid=DNS, kernel_udp_flows=kernel_udp_flows)
    assert snapshot(engine) == before


def test_the_flow_table_counts_held_redirected_flows_by_client_and_port() -> None:
    table = FlowTable()
    port = (FW4, 63000)

    def record(sport: int, mode: Mode) -> FlowRecord:
        return FlowRecord(FlowKey(UDP, ip(C1), sport, ip(S1), 53), 1, "DNS", mode, 1.0,
                          redirect=port)

    kernel = record(7000, Mode.KERNEL)
    table.add(kernel, 1.0)  # history: conntrack holds it, the enforcer does not
    assert not table.holds_redirected(UDP, ip(C1), port)
    first, second = record(7001, Mode.USER), record(7002, Mode.USER)
    table.add(first, 1.0)
    table.add(second, 1.0)
    assert table.holds_redirected(UDP, ip(C1), port)
    assert not table.holds_redirected(UDP, ip(C2), port)
    assert not table.holds_redirected(TCP, ip(C1), port)
    table.remove(first, 2.0)
    assert table.holds_redirected(UDP, ip(C1), port)
    table.remove(second, 2.0)
    assert not table.holds_redirected(UDP, ip(C1), port)
