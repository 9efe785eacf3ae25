"""End to end: agents, sniffers, crafted packets, real sockets and captures in two
namespaces joined by a veth pair (no firewall in between)."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import CookedLinuxV2, Ether
from scapy.packet import Raw
from scapy.utils import rdpcap

from testbed.agent import Agent, AgentError
from testbed.capture import FwCapture
from testbed.checks import (
    CheckFailed,
    expect_no_packet,
    expect_nothing_else,
    expect_packet,
    set_current_pcap,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (network namespaces, raw sockets)"
)

ADDR = {
    4: ("192.0.2.1", "192.0.2.2", "192.0.2.0/24", "192.0.2.99"),
    6: ("2001:db8:1::1", "2001:db8:1::2", "2001:db8:1::/64", "2001:db8:1::99"),
}
IP_OF = {4: IP, 6: IPv6}


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@dataclass
class Pair:
    ns_a: str
    ns_b: str
    a: Agent
    b: Agent
    if_a: str = "veth-a"
    if_b: str = "veth-b"


def _ledger(tb_id: str, namespaces: dict[str, str]) -> Any:
    """Claim the namespaces in the testbed ledger so a concurrent sweep leaves them alone."""
    try:
        from testbed.ledger import Ledger

        return Ledger.create(tb_id, namespaces=namespaces, tag="tests/e2e/test_traffic.py")
    except Exception:  # the ledger is a convenience here, not a requirement
        return None


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    tag = secrets.token_hex(3)
    ns_a, ns_b = f"ph-test-{tag}-a", f"ph-test-{tag}-b"
    led = _ledger(f"test-{tag}", {"a": ns_a, "b": ns_b})
    agents: list[Agent] = []
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip("link", "add", "veth-a", "netns", ns_a, "type", "veth",
            "peer", "name", "veth-b", "netns", ns_b)
        for ns, dev, v4, v6 in ((ns_a, "veth-a", ADDR[4][0], ADDR[6][0]),
                                (ns_b, "veth-b", ADDR[4][1], ADDR[6][1])):
            _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            _ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        agents.append(Agent.start(ns_a, "h1"))
        agents.append(Agent.start(ns_b, "h2"))
        yield Pair(ns_a, ns_b, agents[0], agents[1])
    finally:
        for ag in agents:
            ag.close()
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if led is not None:
            led.remove()


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


# -- crafted packets ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
def test_l3_send_tcp_syn_and_udp(pair: Pair, version: int) -> None:
    src, dst, _, _ = ADDR[version]
    L3 = IP_OF[version]
    with pair.b.sniff(pair.if_b, bpf="tcp or udp") as sn:
        syn = L3(dst=dst) / TCP(sport=40001, dport=8080, flags="S", seq=1000)
        dgram = L3(dst=dst) / UDP(sport=40002, dport=5300) / Raw(b"pinhole")
        pair.a.send([syn, dgram])
        got = expect_packet(sn, Ether() / L3(src=src, dst=dst) / TCP(dport=8080, flags="S"))
        assert got[TCP].seq == 1000
        got = expect_packet(sn, L3(src=src) / UDP(dport=5300) / Raw(load=b"pinhole"))
        assert got.time > 0
        # The kernel in b answers the SYN with RST and the datagram with an ICMP error.
        expect_nothing_else(sn, [L3(src=src, dst=dst), L3(src=dst, dst=src)])


@pytest.mark.parametrize("version", [4, 6])
def test_l3_send_spoofed_source(pair: Pair, version: int) -> None:
    spoofed = "198.51.100.7" if version == 4 else "2001:db8:99::7"
    _, dst, _, _ = ADDR[version]
    with pair.b.sniff(pair.if_b) as sn:
        pair.a.send(IP_OF[version](src=spoofed, dst=dst) / UDP(sport=7, dport=7777))
        expect_packet(sn, IP_OF[version](src=spoofed, dst=dst) / UDP(dport=7777))


@pytest.mark.parametrize("version", [4, 6])
def test_l2_send_on_interface(pair: Pair, version: int) -> None:
    src, dst, _, _ = ADDR[version]
    with pair.b.sniff(pair.if_b, bpf="udp port 7778") as sn:
        pair.a.send(IP_OF[version](dst=dst) / UDP(sport=7, dport=7778), iface=pair.if_a)
        got = expect_packet(sn, IP_OF[version](src=src, dst=dst) / UDP(dport=7778))
        assert got[Ether].dst != "ff:ff:ff:ff:ff:ff"


def test_sniffer_in_sender_agent_sees_its_own_packets(pair: Pair) -> None:
    with pair.a.sniff(pair.if_a, bpf="udp port 7779") as sn:
        pair.a.send(IP(dst=ADDR[4][1]) / UDP(dport=7779))
        expect_packet(sn, UDP(dport=7779))


def test_expect_no_packet_passes_when_nothing_sent(pair: Pair) -> None:
    with pair.b.sniff(pair.if_b) as sn:
        pair.a.send(IP(dst=ADDR[4][1]) / UDP(dport=7001))
        expect_packet(sn, UDP(dport=7001))
        t0 = time.monotonic()
        expect_no_packet(sn, UDP(dport=7002), timeout=0.3)
        assert time.monotonic() - t0 >= 0.3
        with pytest.raises(CheckFailed, match="arrived"):
            expect_no_packet(sn, UDP(dport=7001), timeout=0.3)


def test_mismatch_message_has_field_diff(pair: Pair) -> None:
    set_current_pcap("/tmp/example.pcap")
    try:
        with pair.b.sniff(pair.if_b, bpf="udp") as sn:
            pair.a.send(IP(dst=ADDR[4][1]) / UDP(sport=5555, dport=7100))
            expect_packet(sn, UDP(dport=7100))
            with pytest.raises(CheckFailed) as info:
                expect_packet(sn, IP(dst=ADDR[4][1]) / UDP(sport=5555, dport=7101), timeout=0.2)
    finally:
        set_current_pcap(None)
    msg = str(info.value)
    assert "node h2" in msg and pair.if_b in msg
    assert "###[ UDP ]###" in msg  # the expected packet, shown
    assert "closest candidate" in msg
    assert "UDP.dport" in msg and "7101" in msg and "7100" in msg
    assert "!=UDP.dport" in msg.replace(" ", "")
    assert "/tmp/example.pcap" in msg


# -- real sockets ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
def test_tcp_echo(pair: Pair, version: int) -> None:
    src, dst, _, _ = ADDR[version]
    with pair.b.tcp_server(dst, 0) as srv:
        res = pair.a.tcp_connect(dst, srv.port, send_bytes=100_000)
        assert res["connected"], res
        assert res["error"] is None
        assert res["sent"] == res["received"] == 100_000
        assert res["echo_digest"] == res["digest"], "the echo differs from the bytes sent"
        assert res["local"][0] == src
        stats = srv.stats()
        assert stats["accepted"] == 1
        assert stats["bytes_in"] == stats["bytes_out"] == 100_000
        assert stats["peers"] == [res["local"]]
        res2 = pair.a.tcp_connect(dst, srv.port, bind=src)
        assert res2["connected"] and res2["sent"] == 0
        # the connection closed at once; the server's accept may lag behind the client
        deadline = time.monotonic() + 2.0
        while srv.stats()["accepted"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.stats()["accepted"] == 2


@pytest.mark.parametrize("version", [4, 6])
def test_udp_echo(pair: Pair, version: int) -> None:
    src, dst, _, _ = ADDR[version]
    with pair.b.udp_server(dst, 0) as srv:
        res = pair.a.udp_send(dst, srv.port, b"\x00ping\xff", expect_reply=True)
        assert res["reply"] == b"\x00ping\xff", res
        assert res["sent"] == 6
        assert res["local"][0] == src
        stats = srv.stats()
        assert stats["accepted"] == 1 and stats["bytes_in"] == stats["bytes_out"] == 6
        assert stats["peers"] == [res["local"]]
    with pair.b.udp_server(dst, 0, echo=False) as quiet:
        res = pair.a.udp_send(dst, quiet.port, b"x", expect_reply=True, timeout=0.3)
        assert res["reply"] is None and "no reply" in res["error"]
        assert quiet.stats()["bytes_in"] == 1


def test_tcp_connect_closed_port_refused(pair: Pair) -> None:
    t0 = time.monotonic()
    res = pair.a.tcp_connect(ADDR[4][1], 9, send_bytes=10, timeout=2.0)
    assert time.monotonic() - t0 < 2.0
    assert res["connected"] is False
    assert "refused" in res["error"].lower()


@pytest.mark.parametrize("version", [4, 6])
def test_tcp_connect_unanswered_times_out(pair: Pair, version: int) -> None:
    # Nobody owns this address: the SYN is never answered, like a filtered port.
    t0 = time.monotonic()
    res = pair.a.tcp_connect(ADDR[version][3], 80, send_bytes=10, timeout=0.5)
    elapsed = time.monotonic() - t0
    assert res["connected"] is False
    assert "timed out" in res["error"] or "unreachable" in res["error"].lower()
    assert elapsed < 3.0


# -- agents -----------------------------------------------------------------------------------


def test_agent_errors_name_the_node(pair: Pair) -> None:
    with pytest.raises(AgentError, match=r"agent h1 .*nosuchif"):
        pair.a.sniff("nosuchif")
    with pytest.raises(AgentError, match="agent h1"):
        pair.a.tcp_server("not-an-address", 1)
    assert pair.a.ping()["pid"] == pair.a.pid  # still healthy


def test_agent_close_leaves_no_process(pair: Pair) -> None:
    ag = Agent.start(pair.ns_a, "tmp")
    pid = ag.pid
    with ag.sniff("veth-a"):
        pass
    srv = ag.tcp_server(ADDR[4][0], 0)
    assert _alive(pid)
    ag.close()
    ag.close()  # idempotent
    assert not _alive(pid)
    with pytest.raises(AgentError, match="closed"):
        ag.ping()
    srv.close()  # closing a handle of a closed agent is harmless


def test_dead_agent_reported_not_hung(pair: Pair) -> None:
    with Agent.start(pair.ns_b, "doomed") as ag:
        os.kill(ag.pid, 9)
        t0 = time.monotonic()
        with pytest.raises(AgentError, match="doomed"):
            for _ in range(50):
                ag.ping()
                time.sleep(0.02)
        assert time.monotonic() - t0 < 3.0
    assert not _alive(ag.pid)


def test_start_in_missing_namespace_fails_clearly() -> None:
    with pytest.raises(AgentError, match="ph-test-missing"):
        Agent.start("ph-test-missing-ns", "ghost")


# -- capture ------------------------------------------------------------------------------------


def test_fw_capture_writes_readable_pcap(pair: Pair, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "fw.pcap"
    with FwCapture(pair.ns_b, path) as cap:
        assert cap.running
        pair.a.send(IP(dst=ADDR[4][1]) / UDP(sport=4242, dport=4243) / Raw(b"captured"))
        pair.a.send(IPv6(dst=ADDR[6][1]) / UDP(sport=4242, dport=4243) / Raw(b"captured6"))
        # each family's last packet seen arrive (a first IPv6 one waits for neighbour
        # discovery) before the capture stops
        with pair.b.sniff(pair.if_b, bpf="udp port 4243") as sn:
            pair.a.send(IP(dst=ADDR[4][1]) / UDP(sport=4242, dport=4243) / Raw(b"sync"))
            pair.a.send(IPv6(dst=ADDR[6][1]) / UDP(sport=4242, dport=4243) / Raw(b"sync6"))
            expect_packet(sn, Raw(load=b"sync"))
            expect_packet(sn, Raw(load=b"sync6"))
    assert not cap.running
    assert cap.dropped == 0, cap.output
    assert path.stat().st_size > 24
    pkts = rdpcap(str(path))
    loads = [bytes(p[Raw].load) for p in pkts if Raw in p and UDP in p]
    assert b"captured" in loads and b"captured6" in loads and b"sync" in loads
    assert all(isinstance(p, CookedLinuxV2) for p in pkts)
    with contextlib.suppress(Exception):
        cap.stop()  # idempotent


def test_no_processes_left_in_namespaces(pair: Pair) -> None:
    # Only the two module agents may be running in the test namespaces.
    for ns, ag in ((pair.ns_a, pair.a), (pair.ns_b, pair.b)):
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        pids = {int(p) for p in out.stdout.split()}
        assert pids == {ag.pid}, (ns, pids)


def test_a_stopped_sniffer_keeps_what_arrived_before_its_stop(pair: Pair) -> None:
    """Stopping a capture reads what its socket still holds first: a burst that arrives
    faster than the sniffer's thread takes it (each packet is dissected) is all there once
    the capture stops, however far behind the thread was."""
    count = 400
    with pair.b.sniff(pair.if_b, bpf="udp dst port 7790") as sn:
        assert pair.a.datagram_flood(ADDR[4][1], 7790, count, b"burst")["sent"] == count
    got = sn.packets()
    assert len(got) == count, f"{count} datagrams sent, {len(got)} captured"


def test_a_capture_that_lost_packets_says_so(pair: Pair) -> None:
    """A capture whose socket had no room for some packets cannot show what arrived: its
    packets() raises, naming the loss, rather than let a check conclude from part of it."""
    with pair.b.sniff(pair.if_b, bpf="udp dst port 7791", buffer=4096) as sn:
        assert pair.a.datagram_flood(ADDR[4][1], 7791, 2000, b"x" * 1000)["sent"] == 2000
        with pytest.raises(AgentError, match=r"lost \d+ packets .*4096 B buffer"):
            sn.packets()
    assert sn.lost > 0
    with pytest.raises(AgentError, match="lost"):  # after its stop too
        sn.packets()


def test_a_capture_counts_no_loss_from_before_its_filter(pair: Pair) -> None:
    """A capture's socket takes every packet until its filter is attached (Scapy opens it
    first), and drops what its tiny buffer has no room for meanwhile: traffic it does not
    capture, before it started. None of that counts as its loss."""
    flood = threading.Thread(target=pair.a.datagram_flood, args=(ADDR[4][1], 7792, 100_000, b"x" * 1000))
    flood.start()
    try:
        for _ in range(20):
            with pair.b.sniff(pair.if_b, bpf="udp dst port 7793") as sn:
                assert sn.packets() == []
    finally:
        flood.join()
