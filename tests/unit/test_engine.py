"""enforcer.core.engine: Engine.decide on primaries and on what it must drop (no permissions)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from core_policy import INTERNAL, POLICY, pkt
from scapy.layers.inet import IP
from scapy.layers.inet import TCP as ScapyTCP

from enforcer.config import parse
from enforcer.core import packet
from enforcer.core.engine import Engine
from enforcer.core.flows import Mode
from enforcer.core.limits import Limits
from enforcer.core.packet import ICMP, UDP, Ingress, PacketMeta
from enforcer.core.policy import Policy
from enforcer.core.state import Decision, Verdict
from testbed import topology
from testbed.lab import lab_config

ip = ipaddress.ip_address
net = ipaddress.ip_network

C1, C2, C6 = "192.0.2.11", "192.0.2.12", "2001:db8:1::11"
S1, S6 = "198.51.100.21", "2001:db8:2::21"
SYN = packet.TCP_SYN


@pytest.fixture
def engine() -> Engine:
    return Engine(POLICY, INTERNAL, (ip("198.51.100.1"), ip("2001:db8:2::1")))


# --- admitted primaries -------------------------------------------------------------------

def test_primary_admitted(engine: Engine) -> None:
    m = pkt(C1, S1, 21)
    d = engine.decide(m, now=100.0)
    assert d.verdict is Verdict.ADMIT_KERNEL
    assert d.key == m.key
    assert d.protocol == "FTP"
    assert d.at == 100.0
    assert "FTP" in d.reason and "'clients'" in d.reason
    session = engine.sessions.find(ip(C1))
    assert session is not None
    assert d.session_id == session.id
    assert session.kind == "securenat" and session.user is None
    assert session.primaries == 1
    assert (session.created, session.last_activity) == (100.0, 100.0)
    record = engine.flows.get(m.key)
    assert record is not None
    assert (record.session_id, record.protocol, record.mode, record.admitted_at) == \
        (session.id, "FTP", Mode.KERNEL, 100.0)
    assert record.action_id is None


def test_one_session_per_client_ip(engine: Engine) -> None:
    a = engine.decide(pkt(C1, S1, 21, sport=1000), 1.0)
    b = engine.decide(pkt(C1, S1, 80, sport=1001), 2.0)
    c = engine.decide(pkt(C1, "198.51.100.22", 21, sport=1002), 3.0)
    other = engine.decide(pkt(C2, S1, 21), 4.0)
    six = engine.decide(pkt(C6, S6, 21), 5.0)
    assert all(d.verdict is Verdict.ADMIT_KERNEL for d in (a, b, c, other, six))
    assert a.session_id == b.session_id == c.session_id
    assert len({a.session_id, other.session_id, six.session_id}) == 3
    s1 = engine.sessions.find(ip(C1))
    assert s1 is not None
    assert s1.primaries == 3
    assert s1.created == 1.0 and s1.last_activity == 3.0
    assert engine.sessions.get(other.session_id) is engine.sessions.find(ip(C2))
    assert len(engine.sessions) == 3
    assert len(engine.flows) == 5


def test_udp_primary(engine: Engine) -> None:
    d = engine.decide(pkt(C6, S6, 53, proto=UDP, sport=5353), 7.5)
    assert d.verdict is Verdict.ADMIT_KERNEL
    assert d.protocol == "DNS"
    rec = engine.flows.get(d.key)
    assert rec is not None and rec.protocol == "DNS"


def test_udp_to_a_tcp_primary_port_is_dropped(engine: Engine) -> None:
    d = engine.decide(pkt(C1, S1, 21, proto=UDP), 1.0)
    assert d.verdict is Verdict.DROP
    assert "udp/21" in d.reason


def test_parsed_packet_is_decided() -> None:
    e = Engine(POLICY, INTERNAL)
    m = packet.parse(bytes(IP(src=C1, dst=S1) / ScapyTCP(sport=1234, dport=80, flags="S")),
                     Ingress.INTERNAL)
    assert e.decide(m, 0.0).verdict is Verdict.ADMIT_KERNEL


# --- drops --------------------------------------------------------------------------------

@pytest.mark.parametrize(("meta", "reason"), [
    (pkt(C1, S1, 21, flags=packet.TCP_SYN | packet.TCP_ACK), "flags 0x12 cannot open a connection"),
    (pkt(C1, S1, 21, flags=packet.TCP_ACK), "flags 0x10 cannot open a connection"),
    (pkt(C1, S1, 21, flags=packet.TCP_RST), "cannot open a connection"),
    (pkt(C1, S1, 21, flags=packet.TCP_SYN | packet.TCP_FIN), "cannot open a connection"),
    (pkt(C1, S1, 21, flags=0), "flags 0x00 cannot open a connection"),
    (pkt(S1, C1, 21, ingress=Ingress.EXTERNAL), "arrived on the external side"),
    (pkt(C1, S1, 21, ingress=Ingress.EXTERNAL), "arrived on the external side"),
    (pkt(S1, C1, 53, proto=UDP, ingress=Ingress.EXTERNAL), "arrived on the external side"),
    (pkt("203.0.113.9", S1, 21), "source 203.0.113.9 is not on an internal network"),
    (pkt("2001:db8:9::1", S6, 21), "is not on an internal network"),
    (pkt("::ffff:192.0.2.11", S6, 21), "is not on an internal network"),
    (pkt(C1, S1, 23), "no permission admits it and tcp/23 is no protocol's primary port"),
    (pkt(C1, S1, 54, proto=UDP), "udp/54 is no protocol's primary port"),
    (pkt(C1, S1, 0, proto=ICMP), "icmp/0 is no protocol's primary port"),
    (pkt(C2, S1, 80), f"no protocol rule lets {C2} use HTTP"),
    (pkt(C6, S6, 80), "no protocol rule lets 2001:db8:1::11 use HTTP"),
    (pkt(C1, S1, 22), f"protocol rule 'nobody uses SSH' denies SSH to {C1}"),
    (pkt(C1, "203.0.113.5", 21), "destination 203.0.113.5 denied: site rule 'denied net'"),
    (pkt(C6, "2001:db8:3::5", 53, proto=UDP), "site rule 'denied net'"),
    (pkt(C1, "192.0.2.200", 21), "destination 192.0.2.200 denied: no site rule allows it"),
    (pkt(C6, "2001:db8:4::1", 21), "no site rule allows it"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_drops(engine: Engine, meta: PacketMeta, reason: str) -> None:
    d = engine.decide(meta, 42.0)
    assert d.verdict is Verdict.DROP
    assert reason in d.reason
    assert d.key == meta.key and d.at == 42.0
    assert d.session_id is None and d.protocol is None
    # A drop creates nothing.
    assert len(engine.sessions) == 0
    assert len(engine.flows) == 0


def test_tcp_flag_check_comes_first(engine: Engine) -> None:
    # A SYN-ACK from outside is dropped for its flags, before anything else is looked at.
    d = engine.decide(pkt(S1, C1, 21, flags=0x12, ingress=Ingress.EXTERNAL), 0.0)
    assert "cannot open a connection" in d.reason


def test_drop_does_not_touch_an_existing_session(engine: Engine) -> None:
    engine.decide(pkt(C1, S1, 21), 1.0)
    engine.decide(pkt(C1, S1, 23), 2.0)
    engine.decide(pkt(C1, S1, 21, flags=packet.TCP_ACK), 3.0)
    s = engine.sessions.find(ip(C1))
    assert s is not None and s.primaries == 1 and s.last_activity == 1.0
    assert len(engine.flows) == 1


def test_empty_policy_drops_everything() -> None:
    e = Engine(Policy(), INTERNAL)
    assert e.decide(pkt(C1, S1, 21), 0.0).verdict is Verdict.DROP
    assert e.decide(pkt(C1, S1, 53, proto=UDP), 0.0).verdict is Verdict.DROP


def test_no_internal_networks_drops_everything() -> None:
    e = Engine(POLICY, {})
    d = e.decide(pkt(C1, S1, 21), 0.0)
    assert d.verdict is Verdict.DROP and "not on an internal network" in d.reason


# --- counters, history, time ---------------------------------------------------------------

def test_counters_and_recent() -> None:
    e = Engine(POLICY, INTERNAL, history=3)
    metas = [pkt(C1, S1, 21, sport=1), pkt(C1, S1, 23, sport=2), pkt(C2, S1, 21, sport=3),
             pkt(C1, S1, 21, flags=packet.TCP_ACK, sport=4), pkt(C6, S6, 53, proto=UDP, sport=5)]
    decisions = [e.decide(m, float(i)) for i, m in enumerate(metas)]
    assert e.counters["admit-kernel"] == 3
    assert e.counters["drop"] == 2
    assert list(e.recent) == decisions[-3:]
    assert [d.at for d in e.recent] == [2.0, 3.0, 4.0]


def test_time_passed_in_is_recorded(engine: Engine) -> None:
    d1 = engine.decide(pkt(C1, S1, 21, sport=1), 1234.5)
    d2 = engine.decide(pkt(C1, S1, 23, sport=2), 99.25)   # the engine takes the caller's word
    assert (d1.at, d2.at) == (1234.5, 99.25)
    rec = engine.flows.get(d1.key)
    assert rec is not None and rec.admitted_at == 1234.5
    engine.decide(pkt(C1, S1, 21, sport=3), 2000.0)
    s = engine.sessions.find(ip(C1))
    assert s is not None and (s.created, s.last_activity) == (1234.5, 2000.0)


def test_decision_to_dict(engine: Engine) -> None:
    d = engine.decide(pkt(C1, S1, 21, sport=1234), 5.0)
    out = d.to_dict()
    assert out["verdict"] == "admit-kernel"
    assert out["flow"] == f"tcp {C1}:1234 -> {S1}:21"
    assert out["at"] == 5.0 and out["session"] == d.session_id and out["protocol"] == "FTP"
    drop = engine.decide(pkt(C1, S1, 23), 6.0).to_dict()
    assert drop["verdict"] == "drop" and drop["session"] is None
    assert isinstance(d, Decision)


def test_kernel_mode_flow_history_is_bounded() -> None:
    e = Engine(POLICY, INTERNAL, limits=Limits(flow_history=3))
    keys = [e.decide(pkt(C1, S1, 21, sport=p), 0.0).key for p in range(1, 6)]
    assert len(e.flows) == 3
    assert e.flows.get(keys[0]) is None and e.flows.get(keys[-1]) is not None
    assert [r.key.sport for r in e.flows.newest(10)] == [5, 4, 3]


# --- the lab's policy, as the conformance runs use it ------------------------------------

@pytest.mark.parametrize("name", topology.TOPOLOGIES)
def test_lab_policy_decisions(name: str) -> None:
    class FakeTestbed:
        topology = topology.named(name)

    topo = FakeTestbed.topology
    cfg = parse(lab_config(FakeTestbed(), socket=Path("/run/pinhole/t.sock")))  # type: ignore[arg-type]
    assert cfg.network.internal_interfaces == topo.fw_internal_ifaces
    behind = {i.name: [ipaddress.ip_interface(a).network for a in i.addresses]
              for i in topo.firewall.interfaces if i.name in topo.fw_internal_ifaces}
    e = Engine(cfg.policy, behind)
    for fam in ("ipv4", "ipv6"):
        c1, c2, s1 = (topo.address(n, fam) for n in ("c1", "c2", "s1"))
        assert e.decide(pkt(c1, s1, 21), 0.0).verdict is Verdict.ADMIT_KERNEL
        assert e.decide(pkt(c1, s1, 80), 0.0).verdict is Verdict.ADMIT_KERNEL
        assert e.decide(pkt(c2, s1, 80), 0.0).verdict is Verdict.DROP
        assert e.decide(pkt(c2, s1, 22), 0.0).verdict is Verdict.DROP
        assert e.decide(pkt(c2, s1, 53, proto=UDP), 0.0).verdict is Verdict.ADMIT_KERNEL
        assert e.decide(pkt(c2, s1, 69, proto=UDP), 0.0).verdict is Verdict.ADMIT_KERNEL
        for other in (c.name for c in topo.clients if c.name not in ("c1", "c2")):
            assert e.decide(pkt(topo.address(other, fam), s1, 21), 0.0).verdict is Verdict.ADMIT_KERNEL
            assert e.decide(pkt(topo.address(other, fam), s1, 80), 0.0).verdict is Verdict.DROP
        denied = ipaddress.ip_network(topo.denied_network(fam)).network_address + 1
        assert e.decide(pkt(c1, str(denied), 21), 0.0).verdict is Verdict.DROP
