"""GEN: default deny, primaries by policy, fail-closed (and fail-open when configured)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from testbed.agent import multiset_digest
from testbed.checks import expect_no_packet, expect_packet
from testbed.clauses.helpers import (
    NEGATIVE,
    answers_to,
    assert_echoed,
    assert_ran_in_mode,
    datagram,
    decisions_for,
    dropped_silently,
    grant,
    ip,
    syn,
    wait_until,
)
from testbed.lab import SOCKS_PORT
from testbed.plugin import Net

SECONDARY_TCP = 20021
SECONDARY_UDP = 20069


@pytest.mark.clause("GEN-01")
def test_secondary_flow_without_permission_is_dropped_silently(net: Net) -> None:
    """Crafted SYN and datagram to non-primary ports never reach the server; no RST, no ICMP."""
    s1 = net.agent("s1")
    src, dst = net.addr("c1"), net.addr("s1")
    with s1.sniff(net.iface("s1")) as at_server:
        with dropped_silently(net, "c1") as drop:
            drop.send("a secondary flow with no permission", syn(net, src, dst, 40001, SECONDARY_TCP),
                      datagram(net, src, dst, 40002, SECONDARY_UDP, b"no permission"))
        expect_no_packet(at_server, TCP(dport=SECONDARY_TCP), timeout=0)
        expect_no_packet(at_server, UDP(dport=SECONDARY_UDP), timeout=0)
    dropped = decisions_for(net, SECONDARY_TCP, src)
    assert dropped and all(d["verdict"] == "drop" for d in dropped), dropped
    assert "no permission" in dropped[-1]["reason"], dropped[-1]


@pytest.mark.clause("GEN-01")
def test_secondary_connection_without_permission_fails_with_real_sockets(net: Net) -> None:
    """A real TCP connect and UDP exchange to non-primary ports: nothing accepted or received."""
    s1 = net.agent("s1")
    dst = net.addr("s1")
    with s1.tcp_server(dst, SECONDARY_TCP) as tcp, s1.udp_server(dst, SECONDARY_UDP) as udp:
        with dropped_silently(net, "c1") as drop:
            drop.tcp(f"c1 -> {dst}:{SECONDARY_TCP}", dst, SECONDARY_TCP)
            drop.udp(f"a datagram c1 -> {dst}:{SECONDARY_UDP}", dst, SECONDARY_UDP, b"hello")
        assert tcp.stats()["accepted"] == 0
        assert udp.stats()["bytes_in"] == 0


@pytest.mark.clause("GEN-01")
def test_unsolicited_inbound_connection_is_dropped(net: Net) -> None:
    """A SYN from a server to a client (sent straight to the fw's MAC) never reaches the client."""
    c1 = net.agent("c1")
    # Built here, outside s1's namespace: both MACs are set so that nothing is looked up.
    ether = Ether(src=net.mac("s1"), dst=net.mac("fw", net.topology.fw_external_iface))
    frame = ether / syn(net, net.addr("s1"), net.addr("c1"), 40003, 21)
    with c1.sniff(net.iface("c1")) as at_client:
        with dropped_silently(net, "s1") as drop:
            drop.send("an unsolicited inbound SYN", frame)
        expect_no_packet(at_client, TCP(dport=21), timeout=0)
    reasons = [d["reason"] for d in decisions_for(net, 21, net.addr("s1"))]
    assert reasons and "external side" in reasons[-1], reasons


@pytest.mark.clause("GEN-01")
def test_what_looks_like_an_answer_from_outside_is_dropped(net: Net) -> None:
    """What a stateless rule takes for an answer, unasked: datagrams from s1's DNS and TFTP
    ports to a high port of c1's, and a TCP ACK (no SYN: conntrack could pick it up as a
    connection under way) from s1's FTP port. Each reaches the fw and goes no further."""
    c1 = net.agent("c1")
    src, dst = net.addr("s1"), net.addr("c1")
    ether = Ether(src=net.mac("s1"), dst=net.mac("fw", net.topology.fw_external_iface))
    probes = [("a datagram from DNS's port", datagram(net, src, dst, 53, 40007, b"answer")),
              ("a datagram from TFTP's port", datagram(net, src, dst, 69, 40008, b"\x00\x03")),
              ("an ACK from FTP's port", ip(net, src, dst) / TCP(sport=21, dport=40009, flags="A",
                                                                  seq=5000, ack=7000))]
    with c1.sniff(net.iface("c1")) as at_client:
        with dropped_silently(net, "s1") as drop:
            for what, probe in probes:
                drop.send(what, ether / probe)
        for _, probe in probes:
            expect_no_packet(at_client, probe, timeout=0)


@pytest.mark.clause("GEN-02")
def test_allowed_primary_passes_and_is_offloaded(net: Net) -> None:
    """c1's FTP (TCP) and DNS (UDP) primaries pass both ways; the kernel carries them after admission."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    src, dst = net.addr("c1"), net.addr("s1")
    with s1.tcp_server(dst, 21) as ftp, s1.udp_server(dst, 53) as dns:
        result = c1.tcp_connect(dst, 21, send_bytes=200_000)
        assert_echoed(result, 200_000, f"c1 -> {dst}:21")
        peers = [p[0] for p in ftp.stats()["peers"]]
        assert peers == [net.source_seen_by_server("c1")], peers
        answer = c1.udp_send(dst, 53, b"query", expect_reply=True)
        assert answer["reply"] == b"query", answer
        assert dns.stats()["digest"] == multiset_digest([b"query"]), "the query did not reach s1 as sent"
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
    srv = net.agent(server)
    src, dst = net.addr(client), net.addr(server, server_index)
    with srv.tcp_server(dst, port) as listener:
        with dropped_silently(net, client) as drop:
            drop.tcp(f"{client} -> {dst}:{port}", dst, port)
        assert listener.stats()["accepted"] == 0
    with srv.sniff(net.iface(server)) as at_server:
        with dropped_silently(net, client) as drop:
            drop.send(f"a crafted SYN {client} -> {dst}:{port}", syn(net, src, dst, 40005, port))
        expect_no_packet(at_server, TCP(dport=port), timeout=0)
    reasons = [d["reason"] for d in decisions_for(net, port, src)]
    assert reasons and why in reasons[-1], reasons
    # the allowed counterpart passes, so the drop is the rule's doing
    allowed_client = "c1"
    if why == "no protocol rule lets" and port == 80:
        with srv.tcp_server(dst, port):
            ok = net.agent(allowed_client).tcp_connect(dst, port, send_bytes=100)
            assert_echoed(ok, 100, "c1's HTTP, which it may use")


# --- GEN-03: fail-closed (rule 15, lockdown) ----------------------------------------------

FW_SERVICE = 2222  # a listener the checks start in the fw namespace: one of "the fw's services"
LOCKED_SPORTS = range(40010, 40020)


@pytest.mark.clause("GEN-02")
def test_a_udp_primary_to_a_denied_site_is_dropped(net: Net) -> None:
    """Site rules judge UDP primaries too: c1's DNS query to the denied network (s2's
    second address) never reaches s2; the same query to s1 is answered."""
    s2 = net.agent("s2")
    denied = net.addr("s2", 1)
    with s2.udp_server(denied, 53) as dns:
        with dropped_silently(net, "c1") as drop:
            drop.udp(f"a DNS query c1 -> {denied}:53", denied, 53, b"query")
        assert dns.stats()["bytes_in"] == 0
    reasons = [d["reason"] for d in decisions_for(net, 53, net.addr("c1"))]
    assert reasons and "site rule" in reasons[-1], reasons
    with net.agent("s1").udp_server(net.addr("s1"), 53):
        answer = net.agent("c1").udp_send(net.addr("s1"), 53, b"query", expect_reply=True)
        assert answer["reply"] == b"query", answer


def _outside(net: Net) -> Any:
    """An Ether header from s1 straight to the fw's external MAC (s1 may have no route)."""
    return Ether(src=net.mac("s1"), dst=net.mac("fw", net.topology.fw_external_iface))


def assert_locked_down(net: Net) -> None:
    """No new flow passes either way, TCP or UDP, and nothing from outside reaches the
    fw's services (TCP and UDP), its SOCKS port included: every probe is dropped silently
    (it reached the fw, and no SYN-ACK, RST, reply or ICMP came of it) and none reached
    the other side or a service. The inside still reaches the fw's services, so the
    silence from outside is the fw's doing, not a dead listener."""
    c1, s1, fw = net.agent("c1"), net.agent("s1"), net.agent("fw")
    client, server = net.addr("c1"), net.addr("s1")
    out = _outside(net)
    probes_in = [(net.fw_external(), FW_SERVICE), (net.fw_internal(), FW_SERVICE),
                 (net.fw_internal(), SOCKS_PORT)]
    with fw.tcp_server(net.fw_external(), FW_SERVICE), fw.tcp_server(net.fw_internal(), FW_SERVICE), \
            fw.udp_server(net.fw_external(), FW_SERVICE) as udp_service, \
            s1.sniff(net.iface("s1")) as at_s1, c1.sniff(net.iface("c1")) as at_c1:
        with dropped_silently(net, "c1") as from_c1, dropped_silently(net, "s1") as from_s1:
            from_c1.send("an allowed primary, TCP and UDP", syn(net, client, server, 40010, 21),
                         datagram(net, client, server, 40011, 53, b"locked down"))
            from_s1.send("an inbound SYN", out / syn(net, server, client, 40012, 21))
            from_s1.send("a SYN to a service of the fw, from outside",
                         *(out / syn(net, server, address, sport, port)
                           for sport, (address, port) in zip(LOCKED_SPORTS[3:], probes_in, strict=False)))
            from_s1.send("an inbound datagram, to c1 and to a UDP service of the fw",
                         out / datagram(net, server, client, LOCKED_SPORTS[6], 53, b"inbound"),
                         out / datagram(net, server, net.fw_external(), LOCKED_SPORTS[7], FW_SERVICE,
                                        b"to the fw's service"))
            from_c1.tcp("a primary while the enforcer is not running", server, 21)
        to_server = IP(dst=server) if net.family == "ipv4" else IPv6(dst=server)
        from_server = IP(src=server) if net.family == "ipv4" else IPv6(src=server)
        expect_no_packet(at_s1, to_server / TCP(dport=21, flags="S"), timeout=0)
        expect_no_packet(at_s1, to_server / UDP(dport=53), timeout=0)
        # (from s1: c1's own connection to port 21 may have 40012 for its source port)
        expect_no_packet(at_c1, from_server / TCP(sport=40012), timeout=0)
        expect_no_packet(at_c1, from_server / UDP(sport=LOCKED_SPORTS[6]), timeout=0)
        assert udp_service.stats()["bytes_in"] == 0, "the fw's UDP service got a datagram from outside"
        inner = c1.tcp_connect(net.fw_internal(), FW_SERVICE, send_bytes=100)
        assert_echoed(inner, 100, "the fw's service, from the inside")


def _end(net: Net, how: str) -> None:
    """The enforcer stops running, as ``how`` says."""
    if how == "never started":  # as at boot: the lockdown command, no enforcer yet
        net.enforcer.stop()
        net.enforcer.unload()
        assert not _pinhole_rules(net), "unload left rules behind"
        net.enforcer.lockdown()
    elif how == "stopped":
        assert net.enforcer.stop() == 0, net.enforcer.log_tail()
    elif how == "crashed":
        assert net.enforcer.crash() != 0
    else:
        net.enforcer.kill()


def _pinhole_rules(net: Net) -> str:
    return "".join(line + "\n" for tool in ("iptables-save", "ip6tables-save")
                   for line in net.lab.tb.run("fw", [tool]).stdout.splitlines() if "PINHOLE" in line)


@pytest.mark.clause("GEN-03")
@pytest.mark.parametrize("how", ["never started", "stopped", "crashed", "killed"])
def test_locked_down_whenever_the_enforcer_is_not_running(net: Net, how: str, mode: str) -> None:
    """Before the first start, after a clean stop, a crash or SIGKILL: nothing new passes
    either way and the fw's services are closed to the outside. A flow admitted before
    in kernel mode goes on; one in user mode stops (its filter is gone: nothing of it
    passes unjudged). A start then takes over with one copy of its rules."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    server = net.addr("s1")
    with net.client() as api, s1.tcp_server(server, SECONDARY_TCP):
        action = grant(net, api, (server, SECONDARY_TCP))
        with c1.tcp_open(server, SECONDARY_TCP) as admitted:
            assert admitted.connected, admitted.error
            assert_echoed(admitted.exchange(10_000), 10_000, "the admitted flow")
            assert_ran_in_mode(net, action)
            _end(net, how)
            assert_locked_down(net)
            after = admitted.exchange(10_000, timeout=NEGATIVE)
            if mode == "user":
                assert not after["received"], "a user-mode flow went on without its enforcer"
            elif how != "never started":  # (unload, the operator's command, cut it there)
                assert_echoed(after, 10_000, "the flow admitted in kernel mode, once the enforcer stopped")
    net.enforcer.start()
    rules = _pinhole_rules(net)
    for chain in ("FORWARD", "INPUT"):
        assert rules.count(f"-A {chain} -j PINHOLE-{chain}") == 2, rules  # one per family
    assert rules.count("-A PINHOLE-FORWARD -j DROP") == 2, rules
    with s1.tcp_server(server, 21):
        ok = c1.tcp_connect(server, 21, send_bytes=100)
    assert_echoed(ok, 100, "a primary after the start")


@pytest.mark.clause("GEN-03")
@pytest.mark.parametrize("how", ["stop-and-start", "control-restart"])
def test_a_restart_leaves_no_gap(net: Net, how: str) -> None:
    """SYNs no permission allows, sent without pause through a stop and a start (a new
    process, or the control socket's ``restart`` in the same one), reach the fw and never
    the other side, and nothing answers them: there is no moment without rules. Both
    ways: c1 to s1, s1 to c1, and s1 to a service of the fw on its external address;
    some of each way reach the fw while the restart runs."""
    c1, s1, fw = net.agent("c1"), net.agent("s1"), net.agent("fw")
    client, server = net.addr("c1"), net.addr("s1")
    sports, inbound_sports = range(41000, 42000), range(42000, 43000)
    out = _outside(net)
    sent = sent_in = 0
    stop = threading.Event()

    def inbound(i: int) -> Packet:
        """In turn: a SYN to the fw's service, a SYN to c1, a datagram to c1, a datagram to
        the fw's UDP service."""
        sport = inbound_sports[i % len(inbound_sports)]
        dst, dport = (client, SECONDARY_TCP) if i % 4 in (1, 2) else (net.fw_external(), FW_SERVICE)
        made: Packet = out / (syn(net, server, dst, sport, dport) if i % 4 < 2 else
                              datagram(net, server, dst, sport, dport, b"while restarting"))
        return made

    def probe() -> None:
        nonlocal sent, sent_in
        while not stop.is_set():
            c1.send([syn(net, client, server, sports[(sent + i) % len(sports)], SECONDARY_TCP)
                     for i in range(20)])
            sent += 20
            s1.send([inbound(sent_in + i) for i in range(4)], iface=net.iface("s1"))
            sent_in += 4

    started = time.time()
    with fw.tcp_server(net.fw_external(), FW_SERVICE) as service, \
            fw.udp_server(net.fw_external(), FW_SERVICE) as udp_service, \
            s1.sniff(net.iface("s1")) as at_server, \
            fw.sniff(net.topology.fw_internal_iface, bpf=f"tcp dst port {SECONDARY_TCP}") as at_fw, \
            fw.sniff(net.topology.fw_external_iface,
                     bpf=f"src host {server} and (dst port {SECONDARY_TCP} or "
                         f"dst port {FW_SERVICE})") as at_fw_outside, \
            c1.sniff(net.iface("c1"), bpf=f"not tcp dst port {SECONDARY_TCP} or src host {server}"
                     ) as at_client:
        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        try:
            wait_until(lambda: sent >= 20, "probes before the stop")
            gap_began = time.time()
            if how == "stop-and-start":
                assert net.enforcer.stop() == 0
                net.enforcer.start()
            else:
                net.enforcer.restart()
            gap_ended = time.time()  # (the new run answers)
            if how == "control-restart":
                assert net.call("status")["run"] > 1, "the restart was not in the same process"
            # and after the start (a restart in place may take less time than 100 probes)
            wait_until(lambda: sent >= 100, "probes after the start")
        finally:
            stop.set()
            prober.join(10)
        to_server = IP(dst=server) if net.family == "ipv4" else IPv6(dst=server)
        expect_no_packet(at_server, to_server / TCP(dport=SECONDARY_TCP))
        expect_no_packet(at_client, answers_to([(syn(net, client, server, sport, SECONDARY_TCP), started)
                                                for sport in sports]), timeout=0)
        expect_no_packet(at_client, ip(net, server, client) / TCP(dport=SECONDARY_TCP), timeout=0)
        expect_no_packet(at_client, ip(net, server, client) / UDP(dport=SECONDARY_TCP), timeout=0)
        expect_no_packet(at_server, answers_to([(inbound(i), started)
                                                for i in range(min(sent_in, len(inbound_sports)))]),
                         timeout=0)
        arrived = len(at_fw.packets())
        arrived_in = len(at_fw_outside.packets())
        # the probes cover the restart itself, both ways: some reached the fw meanwhile
        during = [sum(gap_began <= float(p.time) <= gap_ended for p in sniffed.packets())
                  for sniffed in (at_fw, at_fw_outside)]
        accepted = service.stats()["accepted"]
        datagrams = udp_service.stats()["bytes_in"]
    assert sent >= 100 and arrived >= sent // 2, f"{sent} probes sent, {arrived} seen at the fw"
    assert sent_in >= 20 and arrived_in >= sent_in // 2, \
        f"{sent_in} inbound probes sent, {arrived_in} seen at the fw"
    assert min(during) >= 1, (f"probes that reached the fw while the enforcer restarted "
                              f"({gap_ended - gap_began:.3f} s), out and in: {during}")
    print(f"\nGEN-03 {how}: {gap_ended - gap_began:.3f} s; probes at the fw meanwhile, out and in: {during}")
    assert accepted == 0, f"the fw's service accepted {accepted} connections from outside"
    assert datagrams == 0, f"the fw's UDP service got {datagrams} bytes from outside"
    rules = _pinhole_rules(net)
    assert rules.count("-A FORWARD -j PINHOLE-FORWARD") == 2, rules


@pytest.mark.clause("GEN-03")
def test_fail_open_only_when_configured(net: Net) -> None:
    """With fail_open, a live enforcer still drops unpermitted flows; a dead one, or one that
    stopped cleanly, lets flows pass (no lockdown)."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    net.enforcer.restart(fail_open=True)
    with s1.tcp_server(dst, SECONDARY_TCP) as listener:
        with dropped_silently(net, "c1") as drop:
            drop.tcp("an unpermitted flow, fail-open with the enforcer alive", dst, SECONDARY_TCP)
        net.enforcer.kill()
        dead = c1.tcp_connect(dst, SECONDARY_TCP, send_bytes=100_000)
        assert_echoed(dead, 100_000, "an unpermitted flow, fail-open with the enforcer dead")
        net.enforcer.start(fail_open=True)
        assert net.enforcer.stop() == 0
        assert not _pinhole_rules(net), "a fail-open stop left rules"
        if net.nat:
            # nothing translates any more, so s1 cannot answer; but the fw forwards
            with s1.sniff(net.iface("s1")) as at_server:
                c1.send(syn(net, net.addr("c1"), dst, 40020, SECONDARY_TCP))
                expect_packet(at_server, ip(net, net.addr("c1"), dst) / TCP(sport=40020))
        else:
            stopped = c1.tcp_connect(dst, SECONDARY_TCP, send_bytes=100_000)
            assert_echoed(stopped, 100_000, "an unpermitted flow, fail-open after a clean stop")
            assert listener.stats()["accepted"] == 2
