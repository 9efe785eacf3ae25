"""Ingress per interface (SPEC rule 17): enforcer.core.ingress, Engine.judge_ingress, the
daemon's view of an arrival interface and the networks it finds behind each one.

The lab's split topology: c1 (192.0.2.11, 2001:db8:1::11) behind int0, c3 (192.0.2.131,
2001:db8:4::31) behind int1, servers behind ext0.
"""

from __future__ import annotations

import copy
import ipaddress
import socket

import pytest
from core_policy import POLICY_DATA, pkt
from hypothesis import given
from hypothesis import strategies as st

from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.ingress import InterfaceNetworks
from enforcer.core.packet import TCP, UDP, Ingress, PacketMeta
from enforcer.core.policy import policy_from_dict
from enforcer.core.state import Verdict
from enforcer.daemon import Arrivals
from enforcer.dataplane import Interfaces

ip = ipaddress.ip_address
net = ipaddress.ip_network



def _split_policy() -> dict[str, list[dict[str, object]]]:
    """The core tests' policy, with c3's IPv6 network among the clients'."""
    data = copy.deepcopy(POLICY_DATA)
    (clients,) = [r for r in data["protocol_rule"] if r["name"] == "clients"]
    clients["clients"] = [*clients["clients"], "2001:db8:4::/64"]
    return data


POLICY = policy_from_dict(_split_policy())
FTP_GUID = next(p.guid for p in POLICY.protocols if p.name == "FTP")
BEHIND = {"int0": (net("192.0.2.0/25"), net("2001:db8:1::/64")),
          "int1": (net("192.0.2.128/25"), net("2001:db8:4::/64"))}
INTERNAL_ADDRESSES = [ipaddress.ip_interface(a) for a in
                      ("192.0.2.1/25", "2001:db8:1::1/64", "192.0.2.129/25", "2001:db8:4::1/64")]
EXTERNAL = (ip("198.51.100.1"), ip("2001:db8:2::1"))
C1 = {"ipv4": "192.0.2.11", "ipv6": "2001:db8:1::11"}
C3 = {"ipv4": "192.0.2.131", "ipv6": "2001:db8:4::31"}
S1 = {"ipv4": "198.51.100.21", "ipv6": "2001:db8:2::21"}
FAMILIES = ("ipv4", "ipv6")


def arrived(src: str, dst: str, interface: str, *, dport: int = 21, proto: int = TCP) -> PacketMeta:
    """A new flow's first packet that came in on ``interface`` (ext0: the external side)."""
    side = Ingress.EXTERNAL if interface.startswith("ext") else Ingress.INTERNAL
    return pkt(src, dst, dport, proto=proto, ingress=side, interface=interface)


@pytest.fixture
def rule() -> InterfaceNetworks:
    return InterfaceNetworks(BEHIND)


# --- the rule -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_a_client_passes_on_its_own_interface_only(rule: InterfaceNetworks, family: str) -> None:
    assert rule.refusal(arrived(C1[family], S1[family], "int0")) is None
    assert rule.refusal(arrived(C3[family], S1[family], "int1")) is None
    assert rule.refusal(arrived(C1[family], S1[family], "int1")) == \
        f"source {C1[family]} is not on a network behind int1"
    assert rule.refusal(arrived(C3[family], S1[family], "int0")) == \
        f"source {C3[family]} is not on a network behind int0"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_outside_cannot_pass_for_any_internal_network(rule: InterfaceNetworks, family: str) -> None:
    assert rule.refusal(arrived(S1[family], C1[family], "ext0")) is None
    for client in (C1, C3):
        assert rule.refusal(arrived(client[family], S1[family], "ext0")) == \
            (f"source {client[family]} is on an internal network but arrived on ext0, "
             "which is not an internal interface")
    # nor may an outside address come in on an internal interface
    assert rule.refusal(arrived(S1[family], C1[family], "int0")) is not None


def test_a_network_routed_behind_an_interface_is_behind_it() -> None:
    routed = InterfaceNetworks({**BEHIND, "int1": (*BEHIND["int1"], net("203.0.113.0/24"))})
    assert routed.refusal(arrived("203.0.113.7", S1["ipv4"], "int1")) is None
    assert routed.refusal(arrived("203.0.113.7", S1["ipv4"], "int0")) is not None
    assert routed.refusal(arrived("203.0.113.7", S1["ipv4"], "ext0")) is not None
    assert ip("203.0.113.7") in routed.internal


def test_an_interface_with_nothing_behind_it_or_unknown_admits_no_source() -> None:
    rule = InterfaceNetworks({**BEHIND, "int2": ()})
    for interface in ("int2", "int9"):
        assert rule.refusal(arrived(C1["ipv4"], S1["ipv4"], interface)) == \
            f"source {C1['ipv4']} is not on a network behind {interface}"
    assert InterfaceNetworks({}).refusal(arrived(C1["ipv6"], S1["ipv6"], "int0")) is not None


def test_the_fws_own_packets_arrived_on_no_interface_and_are_not_judged(rule: InterfaceNetworks) -> None:
    # an ICMP error the fw sends from its internal address, queued at the output hook
    own = pkt("192.0.2.1", C1["ipv4"], 0, proto=1, ingress=Ingress.EXTERNAL)
    assert own.interface == ""
    assert rule.refusal(own) is None


def test_internal_networks_are_every_interfaces_without_repeats() -> None:
    rule = InterfaceNetworks({**BEHIND, "int2": BEHIND["int1"]})
    assert rule.internal.networks == (*BEHIND["int0"], *BEHIND["int1"])


ADDRESSES = ["192.0.2.11", "192.0.2.127", "192.0.2.128", "192.0.2.131", "198.51.100.21",
             "2001:db8:1::11", "2001:db8:4::31", "2001:db8:2::21", "2001:db8:5::1"]


@given(st.sampled_from(ADDRESSES), st.sampled_from(["int0", "int1", "int9", "ext0", "lo"]),
       st.booleans())
def test_a_source_passes_exactly_when_a_network_behind_its_interface_holds_it(
        src: str, interface: str, internal_side: bool) -> None:
    """Against a model written with ipaddress alone: internal side, a network behind that
    interface; any other side, no internal network."""
    meta = pkt(src, "198.51.100.99" if ":" not in src else "2001:db8:2::99", 21,
               ingress=Ingress.INTERNAL if internal_side else Ingress.EXTERNAL, interface=interface)
    address = ip(src)
    if internal_side:
        expected = any(address in n for n in BEHIND.get(interface, ()))
    else:
        expected = not any(address in n for nets in BEHIND.values() for n in nets)
    assert (InterfaceNetworks(BEHIND).refusal(meta) is None) == expected


# --- the engine -----------------------------------------------------------------------------

@pytest.fixture
def engine() -> Engine:
    return Engine(POLICY, BEHIND, EXTERNAL, internal_addresses=INTERNAL_ADDRESSES)


def shell(engine: Engine, meta: PacketMeta, now: float) -> Verdict:
    """What the daemon does with a new flow's first packet: ingress first, then the rest."""
    refused = engine.judge_ingress(meta, now)
    return (refused or engine.decide(meta, now)).verdict


def test_a_spoofed_packet_is_dropped_counted_and_recorded(engine: Engine) -> None:
    meta = arrived(C1["ipv4"], S1["ipv4"], "int1")
    d = engine.judge_ingress(meta, 5.0)
    assert d is not None
    assert (d.verdict, d.key, d.at, d.session_id) == (Verdict.DROP, meta.key, 5.0, None)
    assert d.reason == f"source {C1['ipv4']} is not on a network behind int1"
    assert list(engine.recent) == [d]
    assert engine.counters == {"drop": 1, "dropped: source not behind its interface": 1}
    assert engine.judge_ingress(arrived(C1["ipv4"], S1["ipv4"], "int0"), 6.0) is None
    assert list(engine.recent) == [d], "a packet that may be judged leaves no trace here"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("attacker", "victim"), [("int1", C1), ("int0", C3)],
                         ids=["c3-as-c1", "c1-as-c3"])
def test_a_spoofed_primary_neither_creates_nor_touches_the_victims_session(
        engine: Engine, family: str, attacker: str, victim: dict[str, str]) -> None:
    spoofed = arrived(victim[family], S1[family], attacker)
    assert shell(engine, spoofed, 1.0) is Verdict.DROP
    assert engine.sessions.find(ip(victim[family])) is None and len(engine.flows) == 0
    own = "int0" if attacker == "int1" else "int1"
    assert shell(engine, arrived(victim[family], S1[family], own, dport=53, proto=UDP), 2.0) \
        is Verdict.ADMIT_KERNEL
    session = engine.sessions.find(ip(victim[family]))
    assert session is not None and (session.primaries, session.last_activity) == (1, 2.0)
    assert shell(engine, arrived(victim[family], S1[family], attacker, dport=53, proto=UDP), 3.0) \
        is Verdict.DROP
    assert (session.primaries, session.last_activity) == (1, 2.0)
    assert len(engine.flows) == 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_a_spoofed_flow_leaves_the_victims_permission_pending(engine: Engine, family: str,
                                                              proto: int) -> None:
    shell(engine, arrived(C1[family], S1[family], "int0"), 0.0)
    session = engine.sessions.find(ip(C1[family]))
    assert session is not None
    flags = Flags.BIDIRECTIONAL if proto == UDP else Flags(0)
    action = engine.allow_future_connect(session.id, ip(S1[family]), 30001, proto, flags,
                                         FTP_GUID, 0.0)
    assert shell(engine, arrived(C1[family], S1[family], "int1", dport=30001, proto=proto), 1.0) \
        is Verdict.DROP
    assert shell(engine, arrived(C1[family], S1[family], "ext0", dport=30001, proto=proto), 1.5) \
        is Verdict.DROP
    assert action.state.value == "pending" and action.admitted == 0
    assert shell(engine, arrived(C1[family], S1[family], "int0", dport=30001, proto=proto), 2.0) \
        is Verdict.ADMIT_KERNEL
    assert action.state.value == "consumed"


@pytest.mark.parametrize("family", FAMILIES)
def test_redirects_face_each_clients_own_interface_and_spoofs_cannot_use_them(
        engine: Engine, family: str) -> None:
    """InternalAddress is the fw's address on the client's network; a packet from another
    network claiming the client's address never reaches the redirect."""
    internal = {}
    for client, own in ((C1, "int0"), (C3, "int1")):
        shell(engine, arrived(client[family], S1[family], own), 0.0)
        session = engine.sessions.find(ip(client[family]))
        assert session is not None
        (address, port), (action,) = engine.redirect_connections(
            session.id, [(ip(S1[family]), 30002)], TCP, Flags.NO_KERNEL_MODE, FTP_GUID, 0.0)
        internal[own] = (address, port, action)
    assert [str(a) for a, _, _ in internal.values()] == \
        (["192.0.2.1", "192.0.2.129"] if family == "ipv4" else ["2001:db8:1::1", "2001:db8:4::1"])
    for client, own, attacker in ((C1, "int0", "int1"), (C3, "int1", "int0")):
        address, port, action = internal[own]
        spoofed = arrived(client[family], str(address), attacker, dport=port)
        assert engine.judge_ingress(spoofed, 1.0) is not None
        assert action.state.value == "pending"
        real = arrived(client[family], str(address), own, dport=port)
        assert engine.judge_ingress(real, 2.0) is None
        record = engine.redirect_packet(real, 60, 2.0)
        assert record is not None and (record.key.dst, record.key.dport) == (ip(S1[family]), 30002)
        assert action.state.value == "consumed"


def test_a_spoofed_internal_source_cannot_reach_a_bind_from_outside(engine: Engine) -> None:
    """A bind that admits any peer still refuses an inside address arriving from outside."""
    shell(engine, arrived(C1["ipv4"], S1["ipv4"], "int0"), 0.0)
    session = engine.sessions.find(ip(C1["ipv4"]))
    assert session is not None
    bind, _ = engine.bind_for_securenat(session.id, TCP, 20021, 0.0)
    engine.retroactive_allow_bind(session.id, TCP, bind.address, bind.port, FTP_GUID, Flags(0),
                                  None, 0.0)
    for inside in (C3["ipv4"], "192.0.2.12"):
        assert shell(engine, arrived(inside, C1["ipv4"], "ext0", dport=20021), 1.0) is Verdict.DROP
    assert (bind.state.value, bind.admitted, bind.discarded) == ("allowed", 0, 0)
    assert shell(engine, arrived(S1["ipv4"], C1["ipv4"], "ext0", dport=20021), 2.0) \
        is Verdict.ADMIT_KERNEL
    assert bind.admitted == 1


# --- the shells: where a packet came in, what is behind each interface ---------------------

INTERFACES = Interfaces(
    internal={"int0": 2, "int1": 3}, external={"ext0": 4},
    internal_networks=(*BEHIND["int0"], *BEHIND["int1"]), external_addresses=EXTERNAL,
    internal_addresses=tuple(("int0" if a.ip in BEHIND["int0"][a.version == 6] else "int1", a)
                             for a in INTERNAL_ADDRESSES))


def test_the_daemon_names_the_side_and_the_interface_a_packet_arrived_on() -> None:
    arrivals = Arrivals(INTERFACES)
    assert arrivals(2) == (Ingress.INTERNAL, "int0")
    assert arrivals(3) == (Ingress.INTERNAL, "int1")
    assert arrivals(4) == (Ingress.EXTERNAL, "ext0")
    assert arrivals(0) == (Ingress.EXTERNAL, "")  # the fw's own packet
    # an interface the config does not name counts as outside, by its own name
    lo = socket.if_nametoindex("lo")
    assert arrivals(lo) == (Ingress.EXTERNAL, "lo")
    assert arrivals(99999) == (Ingress.EXTERNAL, "interface #99999")


def test_the_networks_behind_an_interface_are_those_of_its_addresses() -> None:
    assert INTERFACES.networks_behind() == BEHIND
    bare = Interfaces({"int0": 2, "int1": 3}, {"ext0": 4}, BEHIND["int0"], EXTERNAL,
                      internal_addresses=(("int0", INTERNAL_ADDRESSES[0]),
                                          ("int0", ipaddress.ip_interface("192.0.2.2/25"))))
    assert bare.networks_behind() == {"int0": (net("192.0.2.0/25"),), "int1": ()}
