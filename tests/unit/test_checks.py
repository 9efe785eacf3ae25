"""Matching and failure messages of testbed.checks, and testbed.timeouts (no root needed)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from testbed import checks, timeouts
from testbed.checks import (
    CheckFailed,
    compare,
    expect_no_packet,
    expect_nothing_else,
    expect_packet,
    is_noise,
    matches,
)

MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"


def wire(pkt: Packet) -> Packet:
    """As if captured: built to bytes and dissected again."""
    return Ether(bytes(pkt))


def udp4(dport: int = 53, load: bytes = b"q") -> Packet:
    return wire(Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="192.0.2.2")
                / UDP(sport=1234, dport=dport) / Raw(load))


def syn6(dport: int = 80) -> Packet:
    return wire(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="2001:db8:1::1", dst="2001:db8:1::2")
                / TCP(sport=4321, dport=dport, flags="S"))


class FakeSniffer:
    label = "node h2 (netns ph-x), interface veth-b"

    def __init__(self, pkts: list[Packet], *, later: list[tuple[float, Packet]] | None = None):
        self._pkts = list(pkts)
        self._later = list(later or [])
        self._t0 = time.monotonic()

    def packets(self) -> list[Any]:
        now = time.monotonic() - self._t0
        while self._later and self._later[0][0] <= now:
            self._pkts.append(self._later.pop(0)[1])
        return list(self._pkts)


# -- matching ---------------------------------------------------------------------------


def test_only_set_fields_count() -> None:
    p = udp4()
    assert matches(IP() / UDP(), p)
    assert matches(UDP(dport=53), p)
    assert matches(IP(dst="192.0.2.2") / UDP(dport=53) / Raw(load=b"q"), p)
    assert not matches(UDP(dport=54), p)
    assert not matches(IP(src="192.0.2.9"), p)
    assert not matches(TCP(), p)


def test_none_means_any_and_list_defaults_are_not_set() -> None:
    p = udp4()
    assert matches(IP(chksum=None) / UDP(chksum=None), p)
    assert matches(IP(options=[]), p)  # the default copied into fields is not a constraint


def test_ipv6_addresses_compare_in_wire_form() -> None:
    assert matches(IPv6(dst="2001:DB8:1:0:0::2") / TCP(dport=80, flags="S"), syn6())
    assert not matches(TCP(flags="SA"), syn6())


def test_layer_order_and_exact_classes() -> None:
    # An ICMP error quoting a UDP datagram must not match a UDP template:
    # the quoted headers are IPerror/UDPerror, not IP/UDP.
    err = wire(Ether() / IP(src="192.0.2.2", dst="192.0.2.1") / ICMP(type=3, code=3)
               / bytes(IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=1, dport=53)))
    assert matches(IP() / ICMP(type=3), err)
    assert not matches(UDP(dport=53), err)
    # Order matters: UDP before IP is not the same stack.
    assert not matches(UDP() / IP(), udp4())


def test_class_and_predicate_templates() -> None:
    assert matches(UDP, udp4())
    assert not matches(TCP, udp4())
    assert matches(lambda p: UDP in p and p[UDP].dport == 53, udp4())
    with pytest.raises(TypeError):
        matches(42, udp4())  # type: ignore[arg-type]


def test_compare_rows() -> None:
    rows = compare(IP(dst="192.0.2.2") / UDP(dport=54) / Raw(b"q"), udp4())
    by = {f"{r.layer}.{r.field}": r for r in rows}
    assert set(by) == {"IP.dst", "UDP.dport", "Raw.load"}
    assert by["IP.dst"].ok and by["Raw.load"].ok
    assert not by["UDP.dport"].ok
    assert by["UDP.dport"].expected.startswith("54") and "53" in by["UDP.dport"].got
    missing = compare(IP() / TCP(dport=80), udp4())
    assert [(r.layer, r.field, r.got) for r in missing] == [("TCP", "dport", "<layer missing>")]


def test_noise() -> None:
    assert is_noise(wire(Ether() / ARP(pdst="192.0.2.2")))
    assert is_noise(wire(Ether() / IPv6(dst="ff02::1:ff00:2") / ICMPv6ND_NS(tgt="2001:db8::2")))
    assert not is_noise(udp4())


# -- checks -----------------------------------------------------------------------------------


def test_expect_packet_returns_first_match_and_waits() -> None:
    sn = FakeSniffer([udp4(53)], later=[(0.1, udp4(54))])
    t0 = time.monotonic()
    got = expect_packet(sn, UDP(dport=54), timeout=2)
    assert got[UDP].dport == 54
    assert 0.09 <= time.monotonic() - t0 < 1.5


def test_expect_packet_failure_message() -> None:
    sn = FakeSniffer([udp4(53), syn6(), wire(Ether() / ARP())])
    checks.set_current_pcap("/tmp/pinhole/test_x.pcap")
    try:
        with pytest.raises(CheckFailed) as info:
            expect_packet(sn, IP(dst="192.0.2.2") / UDP(dport=5353), timeout=0.05)
    finally:
        checks.set_current_pcap(None)
    assert isinstance(info.value, AssertionError)
    msg = str(info.value)
    assert "node h2" in msg and "veth-b" in msg
    assert "###[ UDP ]###" in msg  # the template's show()
    assert "arrived instead (3 packets)" in msg
    assert "[1]" in msg and "TCP" in msg  # every packet summarised
    assert "closest candidate [0] (1 of 2 set fields match)" in msg
    diff = [ln for ln in msg.splitlines() if ln.lstrip().startswith("!=")]
    assert len(diff) == 1 and "UDP.dport" in diff[0] and "5353" in diff[0] and "53" in diff[0]
    assert "/tmp/pinhole/test_x.pcap" in msg


def test_expect_packet_failure_with_nothing_captured() -> None:
    with pytest.raises(CheckFailed, match=r"(?s)arrived instead \(0 packets\).*\(nothing\)"):
        expect_packet(FakeSniffer([]), UDP(dport=1), timeout=0.01)


def test_expect_packet_uses_positive_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeouts, "POSITIVE", 0.15)
    t0 = time.monotonic()
    with pytest.raises(CheckFailed, match=r"within 0\.15 s"):
        expect_packet(FakeSniffer([]), UDP)
    assert 0.14 <= time.monotonic() - t0 < 1.0


def test_expect_no_packet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeouts, "NEGATIVE", 0.1)
    t0 = time.monotonic()
    expect_no_packet(FakeSniffer([udp4(53)]), UDP(dport=54))
    assert time.monotonic() - t0 >= 0.1
    sn = FakeSniffer([udp4(53)], later=[(0.05, udp4(54))])
    with pytest.raises(CheckFailed) as info:
        expect_no_packet(sn, UDP(dport=54), timeout=2)
    msg = str(info.value)
    assert "must not arrive" in msg and "<- matches" in msg and "dport     = 54" in msg


def test_expect_nothing_else() -> None:
    noise = [wire(Ether() / ARP()),
             wire(Ether() / IPv6(dst="ff02::1:ff00:2") / ICMPv6ND_NS(tgt="2001:db8::2"))]
    sn = FakeSniffer([udp4(53), *noise])
    expect_nothing_else(sn, [UDP(dport=53)])
    with pytest.raises(CheckFailed, match="2 unexpected packets"):
        expect_nothing_else(sn, [UDP(dport=53)], ignore_noise=False)
    sn2 = FakeSniffer([udp4(53), syn6(), *noise])
    with pytest.raises(CheckFailed) as info:
        expect_nothing_else(sn2, [UDP(dport=53), ARP])
    msg = str(info.value)
    assert "1 unexpected packet\n" in msg
    assert "[1]" in msg and "<- unexpected" in msg and "###[ TCP ]###" in msg
    assert "UDP.dport=domain (53)" in msg  # the allowed templates are listed


class TellingSniffer(FakeSniffer):
    """A capture that learns of its losses only later (as the fw's tcpdump does)."""

    def __init__(self, pkts: list[Packet]) -> None:
        super().__init__(pkts)
        self.relied_on = 0

    def absence_relied_on(self) -> None:
        self.relied_on += 1


def test_a_negative_check_tells_its_capture_that_it_concluded_from_an_absence() -> None:
    sn = TellingSniffer([udp4(53)])
    expect_no_packet(sn, UDP(dport=54), timeout=0)
    expect_nothing_else(sn, [UDP(dport=53)])
    assert sn.relied_on == 2
    expect_packet(sn, UDP(dport=53), timeout=0)  # a packet found is there, lost ones or not
    with pytest.raises(CheckFailed):  # a check that failed concluded nothing from it
        expect_no_packet(sn, UDP(dport=53), timeout=0)
    with pytest.raises(CheckFailed):
        expect_nothing_else(sn, [])
    assert sn.relied_on == 2


# -- timeouts ------------------------------------------------------------------------------


def test_timeouts_defaults_and_env() -> None:
    assert timeouts.read_timeout("X", 3.0, {}) == 3.0
    assert timeouts.read_timeout("X", 3.0, {"X": " "}) == 3.0
    assert timeouts.read_timeout("X", 3.0, {"X": "0.5"}) == 0.5
    for bad in ("abc", "0", "-1", "nan", "inf"):
        with pytest.raises(timeouts.TimeoutConfigError, match="PINHOLE_NEGATIVE_TIMEOUT"):
            timeouts.read_timeout("PINHOLE_NEGATIVE_TIMEOUT", 1.0,
                                  {"PINHOLE_NEGATIVE_TIMEOUT": bad})


def test_timeouts_module_reads_env() -> None:
    import os
    import subprocess
    import sys

    code = "from testbed import timeouts as t; print(t.POSITIVE, t.NEGATIVE)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINHOLE_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "PINHOLE_POSITIVE_TIMEOUT": "7.5"})
    assert out.stdout.split() == ["7.5", "1.0"], out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "PINHOLE_NEGATIVE_TIMEOUT": "soon"})
    assert out.returncode != 0
    assert "TimeoutConfigError: PINHOLE_NEGATIVE_TIMEOUT='soon' is not a number" in out.stderr
