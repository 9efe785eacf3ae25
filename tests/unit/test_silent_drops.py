"""The clause suite's negative checks (testbed.clauses.helpers): what counts as an answer
to a probe, and that ``dropped_silently`` fails when a probe is answered, never reached
the fw, or was never sent; ``wait_past_expiry`` (no root needed)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6ND_NS, ICMPv6Unknown, IPerror6, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from testbed.checks import CheckFailed
from testbed.clauses import helpers
from testbed.clauses.helpers import EXPIRY_MARGIN, Drop, answers_to, is_icmp, wait_past_expiry

C1, S1, C2 = "192.0.2.11", "198.51.100.21", "192.0.2.12"
C1_6, S1_6 = "2001:db8:1::11", "2001:db8:2::21"
ARRIVED = 100.0  # when the probe reached the fw


def at(pkt: Packet, when: float) -> Packet:
    """As if captured at ``when``: built to bytes and dissected again."""
    captured = Ether(bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / pkt))
    captured.time = when
    return captured


PROBE = IP(src=C1, dst=S1) / TCP(sport=40001, dport=20021, flags="S")
PROBE6 = IPv6(src=C1_6, dst=S1_6) / UDP(sport=40002, dport=20069)


def answer(pkt: Packet, when: float = ARRIVED + 0.1) -> bool:
    return answers_to([(PROBE, ARRIVED), (PROBE6, ARRIVED)])(at(pkt, when))


def test_any_icmp_message_is_icmp() -> None:
    assert is_icmp(at(IP() / ICMP(type=0), 0))
    assert is_icmp(at(IP() / ICMP(type=3, code=13) / IPerror() / TCPerror(), 0))
    assert is_icmp(at(IPv6() / ICMPv6DestUnreach() / IPerror6() / UDPerror(), 0))
    assert is_icmp(at(IPv6() / ICMPv6Unknown(type=200), 0)), "an ICMPv6 type Scapy does not know"
    assert not is_icmp(at(IP() / TCP(), 0))


@pytest.mark.parametrize("pkt", [
    IP(src=S1, dst=C1) / TCP(sport=20021, dport=40001, flags="RA"),
    IP(src=S1, dst=C1) / TCP(sport=20021, dport=40001, flags="SA"),
    IP(src="198.51.100.1", dst=C1) / ICMP(type=3, code=13) / IPerror(src=C1, dst=S1)
    / TCPerror(sport=40001, dport=20021),
    IP(src=S1, dst=C1) / ICMP(type=0),  # ICMP of any kind: an echo reply quotes nothing
    IP(src=S1, dst=C1) / ICMP(type=5, gw="192.0.2.1") / IPerror(src=C1, dst=S1)
    / TCPerror(sport=40001, dport=20021),
    IPv6(src=S1_6, dst=C1_6) / UDP(sport=20069, dport=40002),
    IPv6(src=S1_6, dst=C1_6) / UDP(sport=9999, dport=40002),  # a reply from another port
    IPv6(src="2001:db8:2::1", dst=C1_6) / ICMPv6DestUnreach(code=1) / IPerror6(src=C1_6, dst=S1_6)
    / UDPerror(sport=40002, dport=20069),
], ids=["rst", "syn-ack", "icmp-admin", "icmp-echo-reply", "icmp-redirect", "udp-reply",
        "udp-reply-other-port", "icmpv6-error"])
def test_what_answers_a_probe(pkt: Packet) -> None:
    assert answer(pkt)


@pytest.mark.parametrize(("pkt", "when"), [
    (IP(src=S1, dst=C1) / TCP(sport=20021, dport=40001, flags="RA"), ARRIVED - 0.1),
    (IP(src=C2, dst=C1) / TCP(sport=20021, dport=40001, flags="RA"), ARRIVED + 0.1),
    (IP(src=S1, dst=C2) / TCP(sport=20021, dport=40001, flags="RA"), ARRIVED + 0.1),
    (IP(src=S1, dst=C1) / TCP(sport=20021, dport=40009, flags="RA"), ARRIVED + 0.1),
    (IP(src=S1, dst=C1) / UDP(sport=20021, dport=40001), ARRIVED + 0.1),
    (IP(src="198.51.100.1", dst=C1) / ICMP(type=3, code=3) / IPerror(src=C1, dst=S1)
     / UDPerror(sport=555, dport=53), ARRIVED + 0.1),
    (IPv6(src="fe80::1", dst=C1_6) / ICMPv6ND_NS(tgt=C1_6), ARRIVED + 0.1),
    (PROBE, ARRIVED + 0.1),
], ids=["before-the-probe", "from-another-host", "to-another-host", "to-another-port",
        "another-protocol", "icmp-about-another-flow", "neighbour-discovery", "the-probe-itself"])
def test_what_does_not_answer_a_probe(pkt: Packet, when: float) -> None:
    assert not answer(pkt, when)


class Captured:
    """A sniffer (testbed.checks) of packets already captured."""

    def __init__(self, label: str, pkts: list[Packet] | None = None) -> None:
        self.label = label
        self.pkts = pkts or []

    def packets(self) -> list[Packet]:
        return list(self.pkts)


class FakeFirewall:
    """A driver's view of its verdicts (testbed.drivers.Firewall)."""

    def __init__(self, holds_packets: float | None, decides: bool = False) -> None:
        self.holds_packets = holds_packets
        self.decides = decides
        self.asked: list[tuple[list[str], float]] = []

    def decided(self, flows: list[str], since: float) -> bool:
        self.asked.append((list(flows), since))
        return self.decides


class FakeNet:
    """What Drop uses of a Net: a sender's agent, the fw's capture, the firewall's driver."""

    family = "ipv4"

    def __init__(self, outcome: dict[str, Any] | None = None, firewall: FakeFirewall | None = None) -> None:
        self.received = Captured("the fw, received on int0")
        self.sent = Captured("the fw, sent on any interface")
        self.topology = SimpleNamespace(fw_iface_facing=lambda node: "int0")
        self.outcome = {"connected": False, "reply": None, "error": None, **(outcome or {})}
        self.enforcer = firewall or FakeFirewall(holds_packets=0.0)

    def agent(self, node: str) -> Any:
        def probe_start(proto: str, address: str, port: int, payload: bytes) -> dict[str, Any]:
            return {"pid": 1, "local": (C1, 40001), "error": None}

        def probe_outcome(pid: int) -> dict[str, Any]:
            return self.outcome
        return SimpleNamespace(probe_start=probe_start, probe_outcome=probe_outcome)

    def fw_received(self, iface: str, since: float) -> Captured:
        return self.received

    def fw_sent(self, since: float) -> Captured:
        return self.sent


@pytest.fixture(autouse=True)
def _short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(helpers.timeouts, "POSITIVE", 0.05)
    monkeypatch.setattr(helpers, "NEGATIVE", 0.05)
    monkeypatch.setattr(helpers, "SETTLE_GRACE", {"tcp": 0.01, "udp": 0.01})


def checked(net: FakeNet, back: list[Packet]) -> None:
    drop = Drop(net, "c1", since=0.0)  # type: ignore[arg-type]
    drop.sent("the probe", PROBE)
    drop.check(Captured("node c1, interface eth0", back))


def test_a_probe_that_reached_the_fw_and_met_silence_passes() -> None:
    net = FakeNet()
    net.received.pkts = [at(PROBE, ARRIVED)]
    net.sent.pkts = [at(IP(src=S1, dst=C2) / TCP(sport=20021, dport=40001, flags="RA"), ARRIVED + 0.1)]
    checked(net, [at(PROBE, ARRIVED - 0.001)])


def test_a_reset_at_the_sender_fails() -> None:
    net = FakeNet()
    net.received.pkts = [at(PROBE, ARRIVED)]
    reset = at(IP(src=S1, dst=C1) / TCP(sport=20021, dport=40001, flags="RA"), ARRIVED + 0.01)
    with pytest.raises(CheckFailed, match=r"the probe: answered \(at c1, the sender\)"):
        checked(net, [reset])


def test_an_icmp_error_the_fw_sent_fails() -> None:
    """A probe in another's name: its answer goes where the sender never sees it."""
    net = FakeNet()
    net.received.pkts = [at(PROBE, ARRIVED)]
    net.sent.pkts = [at(IP(src="192.0.2.1", dst=C1) / ICMP(type=3, code=13) / IPerror(src=C1, dst=S1)
                        / TCPerror(sport=40001, dport=20021), ARRIVED + 0.01)]
    with pytest.raises(CheckFailed, match=r"answered \(sent by the fw\)"):
        checked(net, [])


@pytest.mark.parametrize("sent_on", [
    IP(src=C1, dst=S1) / TCP(sport=40001, dport=20021, flags="S", seq=7),  # as it came
    IP(src="198.51.100.1", dst=S1) / TCP(sport=40001, dport=20021, flags="S", seq=7),  # NATed
    IP(src="198.51.100.1", dst="198.51.100.22") / TCP(sport=40001, dport=8080, flags="S", seq=7),
])
def test_a_probe_the_fw_sent_on_fails(sent_on: Packet) -> None:
    """Silence is not enough: a SYN the fw passes on (translated or redirected, the server
    not answering) was not dropped; what shows it is its source port and sequence number."""
    net = FakeNet()
    probe = IP(src=C1, dst=S1) / TCP(sport=40001, dport=20021, flags="S", seq=7)
    net.received.pkts = [at(probe, ARRIVED)]
    net.sent.pkts = [at(sent_on, ARRIVED + 0.001)]
    with pytest.raises(CheckFailed, match="the probe: the fw sent it on, but it must be dropped"):
        checked(net, [])


@pytest.mark.parametrize("sent", [
    IP(src="198.51.100.1", dst=S1) / TCP(sport=40001, dport=20021, flags="S", seq=8),  # another SYN
    IP(src="198.51.100.1", dst=S1) / TCP(sport=40002, dport=20021, flags="S", seq=7),
    IP(src=C1, dst=S1) / UDP(sport=40001, dport=20021) / b"x",
])
def test_what_the_fw_sends_of_other_flows_is_not_the_probe(sent: Packet) -> None:
    net = FakeNet()
    net.received.pkts = [at(IP(src=C1, dst=S1) / TCP(sport=40001, dport=20021, flags="S", seq=7),
                            ARRIVED)]
    net.sent.pkts = [at(sent, ARRIVED + 0.001)]
    checked(net, [])


def test_a_datagram_the_fw_sent_on_is_known_by_its_payload() -> None:
    datagram = IP(src=C1, dst=S1) / UDP(sport=40001, dport=20021) / b"probe 1"
    for payload, passed_on in ((b"probe 1", True), (b"probe 2", False)):
        net = FakeNet()
        net.received.pkts = [at(datagram, ARRIVED)]
        net.sent.pkts = [at(IP(src="198.51.100.1", dst=S1) / UDP(sport=40001, dport=20021) / payload,
                            ARRIVED + 0.001)]
        drop = Drop(net, "c1", since=0.0)  # type: ignore[arg-type]
        drop.sent("the datagram", IP(src=C1, dst=S1) / UDP(sport=40001, dport=20021))
        if passed_on:
            with pytest.raises(CheckFailed, match="the fw sent it on"):
                drop.check(Captured("c1"))
        else:
            drop.check(Captured("c1"))


def test_a_probe_that_never_reached_the_fw_fails() -> None:
    with pytest.raises(CheckFailed, match="the probe never reached the fw"):
        checked(FakeNet(), [])


def test_no_probe_fails() -> None:
    with pytest.raises(AssertionError, match="no probe was sent"):
        Drop(FakeNet(), "c1", since=0.0).check(Captured("c1"))  # type: ignore[arg-type]


@pytest.mark.parametrize(("outcome", "message"), [
    ({"connected": True}, "a probe: connected"),
    ({"error": "connect to 198.51.100.21:20021 failed: Connection refused"},
     "Connection refused, but a drop must be silent"),
])
def test_a_connection_that_connected_or_was_refused_fails(outcome: dict[str, Any], message: str) -> None:
    net = FakeNet(outcome)
    net.received.pkts = [at(IP(src=C1, dst=S1) / TCP(sport=40001, dport=20021, flags="S"), ARRIVED)]
    with pytest.raises(AssertionError, match=message):
        Drop(net, "c1", since=0.0).tcp("a probe", S1, 20021)  # type: ignore[arg-type]


def test_a_datagram_answered_by_icmp_fails() -> None:
    net = FakeNet({"error": "UDP to 198.51.100.21:20021: Connection refused"})
    net.received.pkts = [at(IP(src=C1, dst=S1) / UDP(sport=40001, dport=20021), ARRIVED)]
    with pytest.raises(AssertionError, match="no ICMP"):
        Drop(net, "c1", since=0.0).udp("a datagram", S1, 20021, b"x")  # type: ignore[arg-type]


def watched(monkeypatch: pytest.MonkeyPatch, firewall: FakeFirewall, reached: bool = True) -> float:
    """How long a silent TCP probe is watched, with NEGATIVE at 1 s."""
    monkeypatch.setattr(helpers, "NEGATIVE", 1.0)
    net = FakeNet(firewall=firewall)
    if reached:
        net.received.pkts = [at(IP(src=C1, dst=S1) / TCP(sport=40001, dport=20021, flags="S"), ARRIVED)]
    started = time.monotonic()
    Drop(net, "c1", since=0.0).tcp("a probe", S1, 20021)  # type: ignore[arg-type]
    return time.monotonic() - started


def test_a_kernel_firewall_s_probe_is_watched_until_it_is_decided(monkeypatch: pytest.MonkeyPatch) -> None:
    assert watched(monkeypatch, FakeFirewall(holds_packets=0.0)) < 0.5


def test_a_firewall_that_logs_its_verdicts_ends_the_watch_when_it_has_decided(
        monkeypatch: pytest.MonkeyPatch) -> None:
    firewall = FakeFirewall(holds_packets=None, decides=True)
    assert watched(monkeypatch, firewall) < 0.5
    flows, since = firewall.asked[0]
    assert flows == [f"tcp {C1}:40001 -> {S1}:20021"] and since <= time.monotonic()


@pytest.mark.parametrize(("driver", "reached"), [
    (FakeFirewall(holds_packets=None), True),  # it cannot tell
    (FakeFirewall(holds_packets=0.0, decides=True), False),  # the probe is not seen at the fw yet
])
def test_a_probe_is_watched_the_whole_negative_timeout_while_something_could_come(
        monkeypatch: pytest.MonkeyPatch, driver: FakeFirewall, reached: bool) -> None:
    assert watched(monkeypatch, driver, reached) >= 1.0


class FakeAction:
    id = 7

    def __init__(self, **info: Any) -> None:
        self._info = {"created": 500.0, "expires": 502.0, "state": "pending", **info}

    def info(self) -> dict[str, Any]:
        return dict(self._info)


def test_wait_past_expiry_sleeps_the_lifetime_and_a_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(helpers.time, "sleep", slept.append)
    wait_past_expiry(FakeAction())  # type: ignore[arg-type]
    assert len(slept) == 1 and 2 + EXPIRY_MARGIN - 0.1 < slept[0] <= 2 + EXPIRY_MARGIN


@pytest.mark.parametrize(("info", "message"), [({"expires": None}, "has no deadline"),
                                               ({"state": "expired"}, "is expired before its deadline")])
def test_wait_past_expiry_refuses_what_it_cannot_show(info: dict[str, Any], message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        wait_past_expiry(FakeAction(**info))  # type: ignore[arg-type]


def test_a_datagram_is_given_longer_for_its_answer_than_a_syn(monkeypatch: pytest.MonkeyPatch) -> None:
    """A datagram let through is answered by a process (an echo server), a SYN by the
    server's kernel: the grace after the verdict is longer for UDP."""
    monkeypatch.setattr(helpers, "NEGATIVE", 1.0)
    monkeypatch.setattr(helpers, "SETTLE_GRACE", {"tcp": 0.01, "udp": 0.3})
    net = FakeNet(firewall=FakeFirewall(holds_packets=0.0))
    net.received.pkts = [at(IP(src=C1, dst=S1) / UDP(sport=40001, dport=20021), ARRIVED)]
    started = time.monotonic()
    Drop(net, "c1", since=0.0).udp("a datagram", S1, 20021, b"x")  # type: ignore[arg-type]
    assert 0.3 <= time.monotonic() - started < 0.9
