"""Grants the kernel holds, in the core (no root): which grants go to the kernel and with
what mark, what the enforcer does with a packet of a grant the kernel holds, how it hears
of a flow the kernel admitted by one, and how each way a grant ends takes it from the
kernel. (The kernel's side: tests/e2e/test_kernel_grants.py.)"""

from __future__ import annotations

import ipaddress

import pytest
from core_policy import INTERNAL, POLICY
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from test_handle import C1, EXT, FTP, FW_INT, S1, inside

from enforcer.core import marks
from enforcer.core.effects import AddKernelGrant, EstablishedConnection, KernelGrant, RemoveKernelGrant
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.packet import TCP as TCP_PROTOCOL
from enforcer.core.packet import UDP as UDP_PROTOCOL
from enforcer.core.permissions import Permission

ip = ipaddress.ip_address
C1_6, S1_6 = "2001:db8:1::11", "2001:db8:2::21"


def engine_holding(*, nat: bool = True) -> Engine:
    """An engine whose shell lets the kernel hold grants, with C1's session (1)."""
    engine = Engine(POLICY, INTERNAL, [ip(EXT), ip("2001:db8:2::1")], nat=nat, data_filters=["upper"],
                    internal_addresses=[ipaddress.ip_interface(f"{FW_INT}/24")])
    engine.grants_in_kernel = True
    assert engine.handle(inside(IP(src=C1, dst=S1) / TCP(sport=1, dport=21, flags="S")), 0.0).accept
    return engine


def granted(engine: Engine, port: int, flags: Flags | None = None, protocol: int = TCP_PROTOCOL,
            **kwargs: object) -> tuple[Permission, list[object]]:
    perm = engine.allow_future_connect(1, ip(S1), port, protocol, flags or Flags(0), FTP, 1.0,
                                       **kwargs)  # type: ignore[arg-type]
    return perm, list(engine.take_effects())


def syn(port: int, sport: int = 40000) -> bytes:
    return bytes(IP(src=C1, dst=S1) / TCP(sport=sport, dport=port, flags="S"))


@pytest.mark.parametrize(("nat", "protocol", "flags", "mark"), [
    (True, TCP_PROTOCOL, Flags(0), marks.mark_for(False, False, 0)),
    (False, TCP_PROTOCOL, Flags(0), marks.mark_for(False, False, None)),
    (True, UDP_PROTOCOL, Flags(0), marks.mark_for(False, True, 0)),  # one way
    (True, UDP_PROTOCOL, Flags.BIDIRECTIONAL, marks.mark_for(False, False, 0)),
    (True, TCP_PROTOCOL, Flags.TIMEOUT, marks.mark_for(False, False, 0)),
], ids=["nat", "routed", "udp-one-way", "udp-bidirectional", "timeout"])
def test_a_single_use_kernel_mode_grant_goes_to_the_kernel_with_its_flow_s_mark(
        nat: bool, protocol: int, flags: Flags, mark: int) -> None:
    engine = engine_holding(nat=nat)
    perm, effects = granted(engine, 20021, flags, protocol)
    assert effects == [AddKernelGrant(KernelGrant(perm, protocol, ip(S1), 20021, mark))]
    assert engine.kernel_grants == {perm.key: effects[0].grant}  # type: ignore[attr-defined]


@pytest.mark.parametrize("flags", [Flags.ALLOW_MULTIPLE, Flags.NO_KERNEL_MODE, Flags.ADDRESS_BASED],
                         ids=lambda f: f.name)
def test_grants_of_more_flows_of_user_mode_flows_or_of_other_sessions_stay_the_enforcer_s(
        flags: Flags) -> None:
    engine = engine_holding()
    assert granted(engine, 20021, flags)[1] == []
    assert granted(engine, 20022, data_filter="upper")[1] == []
    assert engine.kernel_grants == {}


def test_nothing_goes_to_the_kernel_unless_the_shell_says_it_can_hold_grants() -> None:
    engine = engine_holding()
    engine.grants_in_kernel = False
    assert granted(engine, 20021)[1] == []


def test_a_firewall_client_s_grant_stays_the_enforcer_s() -> None:
    engine = engine_holding()
    session = engine.open_firewall_session(ip("192.0.2.12"), "alice", 1.0)
    engine.allow_future_connect(session.id, ip(S1), 20021, TCP_PROTOCOL, Flags(0), FTP, 1.0)
    assert engine.take_effects() == [] and engine.kernel_grants == {}


def test_the_enforcer_admits_nothing_by_a_grant_the_kernel_holds() -> None:
    """The kernel did not admit the packet (it used the grant, or is expiring it), so the
    enforcer does not either; a second grant of the key, its own, admits one flow."""
    engine = engine_holding()
    held, _ = granted(engine, 20021)
    answer = engine.handle(inside(IP(syn(20021))), 1.0)
    assert not answer.accept and "the kernel's" in answer.reason
    assert held.state.value == "pending"
    own, effects = granted(engine, 20021)
    assert effects == []  # the kernel holds one grant a key
    assert engine.handle(inside(IP(syn(20021, 40001))), 1.0).accept
    assert own.state.value == "consumed" and held.state.value == "pending"


def test_a_flow_the_kernel_admitted_uses_the_grant_as_one_the_enforcer_admits() -> None:
    engine = engine_holding()
    perm, (add,) = granted(engine, 20021, filter_id=7, context="ctx")
    engine.kernel_admitted(syn(20021), 2.0)
    assert perm.state.value == "consumed" and perm.admitted == 1
    effects = engine.take_effects()
    assert effects[0] == RemoveKernelGrant(add.grant)  # type: ignore[attr-defined]  # its mark goes
    (event,) = [e for e in effects if isinstance(e, EstablishedConnection)]
    assert (event.filter_id, event.context, event.action_id, event.at) == (7, "ctx", perm.id, 2.0)
    (flow,) = [f for f in engine.flows.newest(10) if f.action_id == perm.id]
    assert flow.mode.value == "kernel" and flow.key.sport == 40000
    assert engine.counters["kernel grants: used"] == 1 and engine.kernel_grants == {}
    assert "by the kernel" in engine.recent[-1].reason
    assert engine.action(perm.id, 2.0).state.value == "consumed"


def test_an_ipv6_grant_and_its_flow() -> None:
    engine = engine_holding()
    assert engine.handle(inside(IPv6(src=C1_6, dst=S1_6) / TCP(sport=1, dport=21, flags="S")), 0.0).accept
    session = engine.sessions.find(ip(C1_6))
    assert session is not None
    perm = engine.allow_future_connect(session.id, ip(S1_6), 20021, UDP_PROTOCOL, Flags(0), FTP, 1.0)
    (add,) = engine.take_effects()
    assert isinstance(add, AddKernelGrant) and add.grant.mark == marks.mark_for(False, True, 0)
    engine.kernel_admitted(bytes(IPv6(src=C1_6, dst=S1_6) / UDP(sport=5000, dport=20021)), 2.0)
    assert perm.state.value == "consumed"


@pytest.mark.parametrize("end", ["cancel", "expire", "end_session"])
def test_a_grant_that_ends_unused_leaves_the_kernel(end: str) -> None:
    engine = engine_holding()
    perm, (add,) = granted(engine, 20021, Flags.TIMEOUT)
    if end == "cancel":
        engine.cancel(perm.id, 2.0)
    elif end == "expire":
        assert perm.expires is not None
        engine.expire(perm.expires)
    else:
        engine.end_session(1, 2.0)
    assert engine.take_effects() == [RemoveKernelGrant(add.grant)]  # type: ignore[attr-defined]
    assert engine.kernel_grants == {}


def test_what_the_kernel_admitted_as_its_grant_ended_is_recorded_and_counted() -> None:
    engine = engine_holding()
    perm, _ = granted(engine, 20021)
    engine.cancel(perm.id, 2.0)
    engine.kernel_admitted(syn(20021), 2.0)
    assert engine.counters["kernel grants: used as they ended"] == 1
    assert perm.state.value == "cancelled" and "ended" in engine.recent[-1].reason


def test_a_notice_it_cannot_read_or_a_bug_is_counted_and_nothing_raises() -> None:
    engine = engine_holding()
    engine.kernel_admitted(b"\x45\x00\x00", 1.0)
    assert engine.counters["kernel grants: unreadable notices"] == 1
    granted(engine, 20021)

    def broken(perm: Permission) -> None:
        raise RuntimeError("a bug")
    engine.permissions.use = broken  # type: ignore[method-assign]
    engine.kernel_admitted(syn(20021), 1.0)
    assert engine.counters["errors"] == 1


def test_a_grant_the_kernel_cannot_hold_stays_the_enforcer_s() -> None:
    engine = engine_holding()
    perm, (add,) = granted(engine, 20021)
    engine.keep_grant(add.grant)  # type: ignore[attr-defined]
    assert engine.kernel_grants == {} and engine.counters["kernel grants: kept in user space"] == 1
    assert engine.handle(inside(IP(syn(20021))), 1.0).accept
    assert perm.state.value == "consumed"


def test_grants_the_kernel_used_unheard_of_are_used() -> None:
    """The kernel's notices were lost: the shell finds the grants the kernel no longer
    holds, and the engine takes them as used (not one it no longer holds itself)."""
    engine = engine_holding()
    used, (add,) = granted(engine, 20021)
    kept, _ = granted(engine, 20022)
    engine.kernel_used_unheard([add.grant])  # type: ignore[attr-defined]
    engine.kernel_used_unheard([add.grant])  # type: ignore[attr-defined]  # (once)
    assert used.state.value == "consumed" and used.admitted == 1 and kept.state.value == "pending"
    assert engine.counters["kernel grants: used, not heard of"] == 1
    assert engine.take_effects() == [RemoveKernelGrant(add.grant)]  # type: ignore[attr-defined]
