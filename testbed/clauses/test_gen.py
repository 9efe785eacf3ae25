"""GEN: default deny, primaries by policy, fail-closed (and fail-open when configured)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.l2 import Ether

from testbed.checks import expect_no_packet, expect_packet
from testbed.clauses.helpers import (
    NEGATIVE,
    assert_not_connected,
    datagram,
    decisions_for,
    ip,
    is_rejection,
    syn,
)
from testbed.plugin import Net

SECONDARY_TCP = 20021
SECONDARY_UDP = 20069


@pytest.mark.clause("GEN-01")
def test_secondary_flow_without_permission_is_dropped_silently(net: Net) -> None:
    """Crafted SYN and datagram to non-primary ports never reach the server; no RST, no ICMP."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    src, dst = net.addr("c1"), net.addr("s1")
    with s1.sniff(net.iface("s1")) as at_server, c1.sniff(net.iface("c1")) as at_client:
        c1.send(syn(net, src, dst, 40001, SECONDARY_TCP))
        c1.send(datagram(net, src, dst, 40002, SECONDARY_UDP, b"no permission"))
        expect_no_packet(at_server, TCP(dport=SECONDARY_TCP))
        expect_no_packet(at_server, UDP(dport=SECONDARY_UDP))
        expect_no_packet(at_client, is_rejection, timeout=0)
    dropped = decisions_for(net, SECONDARY_TCP, src)
    assert dropped and all(d["verdict"] == "drop" for d in dropped), dropped
    assert "no permission" in dropped[-1]["reason"], dropped[-1]


@pytest.mark.clause("GEN-01")
def test_secondary_connection_without_permission_fails_with_real_sockets(net: Net) -> None:
    """A real TCP connect and UDP exchange to non-primary ports: nothing accepted or received."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with s1.tcp_server(dst, SECONDARY_TCP) as tcp, s1.udp_server(dst, SECONDARY_UDP) as udp:
        result = c1.tcp_connect(dst, SECONDARY_TCP, send_bytes=1000, timeout=NEGATIVE)
        assert_not_connected(result, f"c1 -> {dst}:{SECONDARY_TCP}")
        sent = c1.udp_send(dst, SECONDARY_UDP, b"hello", expect_reply=True, timeout=NEGATIVE)
        assert sent["reply"] is None, "a datagram with no permission was answered"
        assert tcp.stats()["accepted"] == 0
        assert udp.stats()["bytes_in"] == 0


@pytest.mark.clause("GEN-01")
def test_unsolicited_inbound_connection_is_dropped(net: Net) -> None:
    """A SYN from a server to a client (sent straight to the fw's MAC) never reaches the client."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    # Built here, outside s1's namespace: both MACs are set so that nothing is looked up.
    ether = Ether(src=net.mac("s1"), dst=net.mac("fw", net.topology.fw_external_iface))
    frame = ether / syn(net, net.addr("s1"), net.addr("c1"), 40003, 21)
    with c1.sniff(net.iface("c1")) as at_client:
        s1.send(frame, iface=net.iface("s1"))
        expect_no_packet(at_client, TCP(dport=21))
    reasons = [d["reason"] for d in decisions_for(net, 21, net.addr("s1"))]
    assert reasons and "external side" in reasons[-1], reasons


@pytest.mark.clause("GEN-02")
def test_allowed_primary_passes_and_is_offloaded(net: Net) -> None:
    """c1's FTP (TCP) and DNS (UDP) primaries pass both ways; the kernel carries them after admission."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    src, dst = net.addr("c1"), net.addr("s1")
    with s1.tcp_server(dst, 21) as ftp, s1.udp_server(dst, 53) as dns:
        result = c1.tcp_connect(dst, 21, send_bytes=200_000)
        assert result["connected"], f"c1 -> {dst}:21 was not admitted: {result['error']}"
        assert result["received"] == result["sent"] == 200_000, result
        peers = [p[0] for p in ftp.stats()["peers"]]
        assert peers == [net.source_seen_by_server("c1")], peers
        answer = c1.udp_send(dst, 53, b"query", expect_reply=True)
        assert answer["reply"] == b"query", answer
        assert dns.stats()["bytes_in"] == len(b"query")
    # 200 kB took well over a hundred packets; the enforcer decided exactly one of them.
    local_port = result["local"][1]
    decided = [d for d in decisions_for(net, 21, src) if d["flow"].split(" ")[1].endswith(f":{local_port}")]
    assert [d["verdict"] for d in decided] == ["admit-kernel"], decided

    with s1.sniff(net.iface("s1")) as at_server:
        c1.send(syn(net, src, dst, 40004, 21))
        expect_packet(at_server, ip(net, net.source_seen_by_server("c1"), dst) / TCP(dport=21, flags="S"))

@pytest.mark.parametrize(("client", "server", "server_index", "port", "why"), [
    ("c2", "s1", 0, 80, "no protocol rule lets"),     # HTTP is for c1 only
    ("c1", "s1", 0, 22, "no protocol rule lets"),     # SSH is defined, allowed to nobody
    ("c1", "s2", 1, 21, "site rule"),                 # the denied network
], ids=["http-from-c2", "ssh", "denied-site"])
@pytest.mark.clause("GEN-02")
def test_primary_not_allowed_by_policy_is_dropped(net: Net, client: str, server: str,
                                                   server_index: int, port: int, why: str) -> None:
    """Protocol rules and site rules decide primaries: the denied ones never reach the server."""
    agent, srv = net.agent(client), net.agent(server)
    src, dst = net.addr(client), net.addr(server, server_index)
    with srv.tcp_server(dst, port) as listener:
        result = agent.tcp_connect(dst, port, send_bytes=100, timeout=NEGATIVE)
        assert_not_connected(result, f"{client} -> {dst}:{port}")
        assert listener.stats()["accepted"] == 0
    with srv.sniff(net.iface(server)) as at_server:
        agent.send(syn(net, src, dst, 40005, port))
        expect_no_packet(at_server, TCP(dport=port))
    reasons = [d["reason"] for d in decisions_for(net, port, src)]
    assert reasons and why in reasons[-1], reasons
    # the allowed counterpart passes, so the drop is the rule's doing
    allowed_client = "c1"
    if why == "no protocol rule lets" and port == 80:
        with srv.tcp_server(dst, port):
            ok = net.agent(allowed_client).tcp_connect(dst, port, send_bytes=100)
            assert ok["connected"], f"c1 may use HTTP but was refused: {ok['error']}"


@pytest.mark.clause("GEN-03")
def test_fail_closed_when_the_enforcer_dies(net: Net) -> None:
    """SIGKILL the enforcer: no new flow passes; a restart removes the stale state and enforces again."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    src, dst = net.addr("c1"), net.addr("s1")
    net.enforcer.kill()
    with s1.tcp_server(dst, 21) as ftp:
        result = c1.tcp_connect(dst, 21, send_bytes=100, timeout=NEGATIVE)
        assert_not_connected(result, "a primary with the enforcer dead")
        assert ftp.stats()["accepted"] == 0
        with s1.sniff(net.iface("s1")) as at_server:
            c1.send(syn(net, src, dst, 40006, 21))
            c1.send(datagram(net, src, dst, 40007, 53, b"dead"))
            expect_no_packet(at_server, TCP(dport=21))
            expect_no_packet(at_server, UDP(dport=53))

        net.enforcer.start()
        rules = net.lab.tb.run("fw", ["iptables-save"]).stdout
        assert rules.count("-j PINHOLE-FORWARD") == 1, f"stale rules doubled after restart:\n{rules}"
        ok = c1.tcp_connect(dst, 21, send_bytes=100)
        assert ok["connected"], f"no primary after restart: {ok['error']}"


@pytest.mark.clause("GEN-03")
def test_fail_open_only_when_configured(net: Net) -> None:
    """With fail_open, a live enforcer still drops unpermitted flows; a dead one lets flows pass."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    net.enforcer.stop()
    net.enforcer.start(fail_open=True)
    with s1.tcp_server(dst, SECONDARY_TCP) as listener:
        alive = c1.tcp_connect(dst, SECONDARY_TCP, send_bytes=100, timeout=NEGATIVE)
        assert_not_connected(alive, "fail-open with the enforcer alive")
        net.enforcer.kill()
        dead = c1.tcp_connect(dst, SECONDARY_TCP, send_bytes=100_000)
        assert dead["connected"] and dead["received"] == 100_000, \
            f"fail-open with the enforcer dead should pass traffic: {dead}"
        assert listener.stats()["accepted"] == 1
