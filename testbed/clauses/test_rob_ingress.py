"""ROB-05: ingress per interface (SPEC rule 17), in the split topology.

c1 and c2 are behind the fw's int0 (192.0.2.0/25, 2001:db8:1::/64), c3 behind its
int1 (192.0.2.128/25, 2001:db8:4::/64). A host on one network poses as a client of the
other: c3 as c1, and c1 as c3. Each spoofed probe is shown to have reached the fw
(its pcap has it arriving on the attacker's interface) and to have gone no further:
the fw sent no copy of it, translated or not, on any interface, nor a reset or an ICMP
error; the server saw nothing of it. The victim's state is unchanged, and the victim
then uses what it has itself (the data it gets back is the data it sent). None of
this reads the enforcer's decisions: the kernel may drop a spoofed packet before the
enforcer sees it (reverse-path filtering), and that is as good.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from scapy.layers.inet import TCP
from scapy.layers.l2 import Ether

from testbed.checks import expect_no_packet
from testbed.clauses.helpers import (
    FTP_GUID,
    assert_dropped_silently,
    assert_ran_in_mode,
    datagram,
    exchange_datagram,
    fw_session,
    grant,
    probe_port,
    socks_open,
    syn,
    talk,
)
from testbed.plugin import Net
from testbed.session_api import Flags

pytestmark = pytest.mark.topologies("split")

# (attacker, victim): each internal network's host poses as a client of the other
ATTACKS = (("c3", "c1"), ("c1", "c3"))
def sessions_of(net: Net, node: str) -> list[dict[str, Any]]:
    return [s for s in net.call("sessions") if s["client"] == net.addr(node)]


@contextmanager
def echo_servers(net: Net, tcp_port: int, udp_port: int) -> Iterator[tuple[Any, Any]]:
    s1, address = net.agent("s1"), net.addr("s1")
    with s1.tcp_server(address, tcp_port) as tcp, s1.udp_server(address, udp_port) as udp:
        yield tcp, udp


@pytest.mark.clause("ROB-05")
def test_a_host_cannot_open_flows_or_sessions_as_a_client_of_the_other_network(net: Net) -> None:
    """FTP and DNS primaries, which policy admits from every client, sent by c3 as c1 and
    by c1 as c3: dropped silently; c1's session is not touched and c3 gets none; then each
    opens its own."""
    behind = net.call("status")["networks_behind"]
    topo = net.topology
    assert behind == {iface: [topo.segment(seg).network(f) for f in ("ipv4", "ipv6")]
                      for iface, seg in zip(topo.fw_internal_ifaces, topo.internal_segments,
                                            strict=True)}
    net.session("c1")
    for session in sessions_of(net, "c3"):
        net.call("end_session", session=session["id"])
    before = {node: sessions_of(net, node) for node in ("c1", "c3")}
    assert before["c1"] and not before["c3"]
    server = net.addr("s1")
    assert_dropped_silently(net, [
        (attacker, probe) for attacker, victim in ATTACKS
        for probe in (syn(net, net.addr(victim), server, probe_port(), 21),
                      datagram(net, net.addr(victim), server, probe_port(), 53, b"spoofed query"))])
    assert {node: sessions_of(net, node) for node in ("c1", "c3")} == before
    with echo_servers(net, 21, 53):
        for _, victim in ATTACKS:
            talk(net, victim, server, 21)
            exchange_datagram(net, victim, server, 53)
    after = {node: sessions_of(net, node) for node in ("c1", "c3")}
    assert after["c1"][0]["primaries"] == before["c1"][0]["primaries"] + 2
    assert [s["primaries"] for s in after["c3"]] == [2]


@pytest.mark.clause("ROB-05")
def test_a_host_cannot_use_a_permission_of_the_other_networks_client(net: Net, mode: str) -> None:
    """c1's and c3's pending grants (TCP, and UDP both ways) admit nothing the other network
    sends in their name; they stay pending and then admit their own client."""
    server = net.addr("s1")
    tcp_port, udp_port = 34051, 34052
    with net.client() as api:
        actions = {victim: (grant(net, api, (server, tcp_port), session_of=victim),
                            grant(net, api, (server, udp_port), session_of=victim, protocol="udp",
                                  flags=Flags.BIDIRECTIONAL))
                   for _, victim in ATTACKS}
        assert_dropped_silently(net, [
            (attacker, probe) for attacker, victim in ATTACKS
            for probe in (syn(net, net.addr(victim), server, probe_port(), tcp_port),
                          datagram(net, net.addr(victim), server, probe_port(), udp_port,
                                   b"spoofed datagram"))])
        assert {a.state for pair in actions.values() for a in pair} == {"pending"}
        with echo_servers(net, tcp_port, udp_port) as (tcp, _):
            for _, victim in ATTACKS:
                talk(net, victim, server, tcp_port)
                exchange_datagram(net, victim, server, udp_port)
            assert sorted(p[0] for p in tcp.stats()["peers"]) == \
                sorted(net.addr(victim) for _, victim in ATTACKS)
        assert {a.state for pair in actions.values() for a in pair} == {"consumed"}
        for action in (a for pair in actions.values() for a in pair):
            assert_ran_in_mode(net, action)


@pytest.mark.clause("ROB-05")
def test_a_host_cannot_use_a_redirect_of_the_other_networks_client(net: Net, mode: str) -> None:
    """Each client's redirect port is on the fw's address on its own network. The other
    network's host, posing as the client, sends to it there and to the same port on the
    fw's address on its own side: dropped silently; the client then gets to s1 by it."""
    server, target_port = net.addr("s1"), 34061
    flags = Flags.NO_KERNEL_MODE if mode == "user" else Flags(0)
    with net.client() as api:
        redirects = {}
        for _, victim in ATTACKS:
            (address, port), (action,) = api.redirect_connections(
                net.session(victim), [(server, target_port)], protocol_guid=FTP_GUID, flags=flags)
            assert ipaddress.ip_address(address) == ipaddress.ip_address(net.fw_internal(victim)), \
                f"{victim}'s redirect is not on the fw's address on its network"
            redirects[victim] = (address, port, action)
        assert_dropped_silently(net, [
            (attacker, syn(net, net.addr(victim), to, probe_port(), redirects[victim][1]))
            for attacker, victim in ATTACKS
            for to in (redirects[victim][0], net.fw_internal(attacker))])
        assert {action.state for _, _, action in redirects.values()} == {"pending"}
        with net.agent("s1").tcp_server(server, target_port):
            for victim, (address, port, action) in redirects.items():
                talk(net, victim, address, port)
                assert action.state == "consumed"
                assert_ran_in_mode(net, action)


@pytest.mark.clause("ROB-05")
def test_an_internal_source_arriving_from_outside_is_dropped(net: Net) -> None:
    """s1 sends in the name of c3 and of c2 to the bind alice on c1 has on the fw (approved
    for any peer), and in the name of c3 to s2 by way of the fw: dropped silently, and the
    bind still waits; then s1 itself gets through it to c1."""
    external = net.fw_external(0)
    with socks_open(net, "c1", "alice", "bind", "0.0.0.0" if net.family == "ipv4" else "::",
                    0) as client, net.client() as api:
        assert client.reply is not None and client.reply["code"] == 0, (client.error, client.reply)
        assert client.reply["address"] == external
        port, session = int(client.reply["port"]), fw_session(net, "c1", "alice")
        assert api.retroactive_allow_bind(session, (external, port), protocol_guid=FTP_GUID)
        assert_dropped_silently(net, [
            ("s1", syn(net, net.addr("c3"), external, probe_port(), port)),
            ("s1", syn(net, net.addr("c2"), external, probe_port(), port)),
            # s2 is on-link for s1: only a frame to the fw's address takes this one there
            ("s1", Ether(src=net.mac("s1"), dst=net.mac("fw", net.topology.fw_external_iface))
             / syn(net, net.addr("c3"), net.addr("s2"), probe_port(), 34072))])
        (bind,) = [b for b in api.binds(session) if b["address"] == [external, port]]
        assert (bind["state"], bind["admitted"]) == ("allowed", 0)
        with net.agent("s1").tcp_open(external, port) as peer:
            assert peer.connected, f"s1's own connection to the bind failed: {peer.error}"
            second = client.accept()
            assert second is not None and second["address"] == net.addr("s1"), second
            data = b"s1, through alice's bind on the fw"
            assert peer.talk(data, expect=0) == b""
            assert client.talk(b"", expect=len(data)) == data


@pytest.mark.clause("ROB-05")
def test_a_firewall_clients_grant_admits_no_one_on_the_other_network(net: Net) -> None:
    """alice on c1 and alice on c3 are two Firewall-client sessions, each served on the fw's
    address on its own network: a grant to c1's admits c3's CONNECT not, and then c1's."""
    server, port = net.addr("s1"), 34081
    s1 = net.agent("s1")
    with s1.tcp_server(server, 21), s1.tcp_server(server, port) as target, net.client() as api, \
            socks_open(net, "c1", "alice", "connect", server, 21) as c1_primary, \
            socks_open(net, "c3", "alice", "connect", server, 21) as c3_primary:
        for primary in (c1_primary, c3_primary):
            assert primary.reply is not None and primary.reply["code"] == 0, (primary.error, primary.reply)
        assert fw_session(net, "c1", "alice") != fw_session(net, "c3", "alice")
        action = api.allow_future_connect(fw_session(net, "c1", "alice"), (server, port),
                                          protocol_guid=FTP_GUID)
        since = time.time()
        with socks_open(net, "c3", "alice", "connect", server, port) as other:
            assert other.reply is not None and other.reply["code"] == 2, other.reply  # not allowed
        expect_no_packet(net.fw_sent(since), TCP(dport=port), timeout=0)  # (nothing relayed)
        assert target.stats()["accepted"] == 0, "c3's CONNECT reached the target"
        assert action.state == "pending"
        with socks_open(net, "c1", "alice", "connect", server, port) as own:
            assert own.reply is not None and own.reply["code"] == 0, own.reply
            data = b"alice's relayed data, from c1"
            assert own.talk(data, len(data)) == data
        assert action.state == "consumed"


@pytest.mark.clause("ROB-05")
def test_the_second_internal_network_is_judged_as_the_first(net: Net) -> None:
    """What comes in on int1 is judged as what comes in on int0: c3's own flows that no
    permission or rule admits (to a port nobody granted; HTTP, which is c1's alone), and
    c3 posing as an external host (s2) or as an address of the external network nobody
    has, are dropped silently, and s1 sees none of them; then c3's own FTP gets through."""
    server = net.addr("s1")
    nobody = str(ipaddress.ip_network(net.topology.external_network(net.family))[77])
    probes = [syn(net, net.addr("c3"), server, probe_port(), 34099),
              syn(net, net.addr("c3"), server, probe_port(), 80),
              syn(net, net.addr("s2"), server, probe_port(), 21),
              syn(net, nobody, server, probe_port(), 21),
              datagram(net, nobody, server, probe_port(), 53, b"from nobody")]
    assert_dropped_silently(net, [("c3", probe) for probe in probes])
    with echo_servers(net, 21, 53):
        talk(net, "c3", server, 21)
