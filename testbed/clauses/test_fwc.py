"""FWC: the SOCKS service Firewall clients use, end to end: the internal side only
(FWC-01), a UDP ASSOCIATE for the endpoint that asked (FWC-02), one-way UDP (FWC-03),
and its limits before and after authentication (FWC-04).

The checks run with the SOCKS caps small (``socks_net``: SOCKS_LIMITS in
testbed/plugin.py), so that its timeouts pass in seconds; s1 echoes what it gets.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.l2 import Ether

from testbed import socks5, timeouts
from testbed.agent import multiset_digest
from testbed.checks import expect_no_packet
from testbed.clauses.helpers import (
    FTP_GUID,
    NEGATIVE,
    anywhere,
    datagram,
    dropped_silently,
    fw_session,
    ip,
    socks_open,
    syn,
)
from testbed.lab import SOCKS_PORT, SOCKS_USERS
from testbed.plugin import SOCKS_BIND_TIMEOUT, SOCKS_BUFFER, SOCKS_HANDSHAKE_TIMEOUT, SOCKS_LIMITS, Net
from testbed.session_api import Flags

NOT_ALLOWED, TTL_EXPIRED = 2, 6  # SOCKS5 reply codes (RFC 1928 section 6)
DNS_PORT = 53  # a primary the lab policy allows every client: s1 echoes on it
# Source ports of the probes: below Linux's ephemeral ports, so no real connection shares one
PROBE_PORTS = iter(range(32000, 32768))


@pytest.fixture
def dns(socks_net: Net) -> Iterator[Net]:
    """socks_net, with s1 echoing datagrams on the DNS port."""
    with socks_net.agent("s1").udp_server(socks_net.addr("s1"), DNS_PORT):
        yield socks_net


def associate(net: Net, node: str = "c1", user: str = "alice", host: str | None = None,
              port: int = 0, udp_port: int = 0) -> Any:
    conn = socks_open(net, node, user, "udp", anywhere(net) if host is None else host, port,
                      udp_port=udp_port)
    assert conn.reply is not None and conn.reply["code"] == 0, (conn.error, conn.reply)
    return conn


def udp_bind_port(net: Net, node: str = "c1", user: str = "alice") -> int:
    """The external port of the user's UDP ASSOCIATE."""
    (port,) = [b["address"][1] for b in net.call("binds", session=fw_session(net, node, user))
               if b["protocol"] == "udp" and b["state"] != "closed"]
    return int(port)


def counter(net: Net, name: str) -> int:
    return int(net.call("status")["counters"].get(name, 0))


# --- FWC-01 --------------------------------------------------------------------------------------

@pytest.mark.clause("FWC-01")
@pytest.mark.parametrize("fail_open", [False, True], ids=["lockdown-base", "fail-open"])
def test_from_outside_the_socks_service_and_its_relays_get_nothing(dns: Net, fail_open: bool) -> None:
    """s1 sends, as frames to the fw's external MAC, SYNs to the SOCKS port on the fw's
    internal address and to an association's relay port there, and a datagram to that
    relay port carrying a SOCKS header, before the client's first datagram (the weak-host
    model would deliver all of them; the relay would not have known whose it was);
    and SYNs to the SOCKS port on each of the fw's external addresses.
    With the lockdown base, and with fail_open (no base: the enforcer's own rules and the
    service must hold it): each is dropped silently (it reaches the fw, and nothing answers
    it); the relay hears nothing, and then serves the client. The same port serves the
    inside. (The BIND and UDP ASSOCIATE ports on the external address are for approved
    peers: RAB-01, RAB-03.)"""
    net = dns
    if fail_open:
        net.enforcer.restart(fail_open=True, limits=SOCKS_LIMITS)
    server = net.addr("s1")
    ext = net.topology.fw_external_iface
    outside = Ether(src=net.mac("s1"), dst=net.mac("fw", ext))
    with associate(net) as conn:
        relay_address, relay_port = conn.reply["address"], int(conn.reply["port"])
        assert relay_address == net.fw_internal()
        # before the client's first datagram, while the association would take its sender's
        # port as the client's: nothing from outside reaches the relay
        from_elsewhere = counter(net, "socks: UDP from another source dropped")
        with dropped_silently(net, "s1") as drop:
            drop.send("a SYN from outside to the SOCKS port",
                      outside / syn(net, server, relay_address, next(PROBE_PORTS), SOCKS_PORT))
            drop.send("a SYN from outside to the relay port",
                      outside / syn(net, server, relay_address, next(PROBE_PORTS), relay_port))
            drop.send("a datagram from outside to the relay port",
                      outside / datagram(net, server, relay_address, next(PROBE_PORTS), relay_port,
                                         socks5.datagram(server, DNS_PORT, b"from outside")))
            for external in net.topology.fw_external_addresses(net.family):  # (a service on all)
                drop.send(f"a SYN from outside to the SOCKS port on {external}",
                          syn(net, server, external, next(PROBE_PORTS), SOCKS_PORT))
        assert counter(net, "socks: UDP from another source dropped") == from_elsewhere
        echoed = conn.udp(server, DNS_PORT, b"from the inside", expect_reply=True)
        assert echoed["reply"] == b"from the inside", echoed
        assert conn.udp(None, 0, b"", expect_reply=True, timeout=0.1)["reply"] is None
        again = conn.udp(server, DNS_PORT, b"still served", expect_reply=True)
        assert again["reply"] == b"still served", again


# --- FWC-02 --------------------------------------------------------------------------------------

@pytest.mark.clause("FWC-02")
@pytest.mark.parametrize("named", [True, False], ids=["endpoint-in-request", "first-datagram"])
def test_an_association_relays_only_for_the_endpoint_that_asked(dns: Net, named: bool) -> None:
    """The endpoint is the request's DST.ADDR and DST.PORT, or with zeros the first
    datagram's source. Another socket on the client's address (named: before the endpoint
    sent, too) and a neighbour sending in the client's name from another port are dropped
    silently (they reach the relay, and nothing answers them): s1 gets only the endpoint's
    datagrams."""
    net = dns
    s1 = net.agent("s1")
    client, server = net.addr("c1"), net.addr("s1")
    endpoint_port = next(PROBE_PORTS)
    conn = associate(net, host=client if named else None, port=endpoint_port if named else 0,
                     udp_port=endpoint_port if named else 0)
    with conn, s1.sniff(net.iface("s1")) as at_server:
        relay = (conn.reply["address"], int(conn.reply["port"]))
        dropped_before = counter(net, "socks: UDP from another source dropped")
        early = 0
        if named:  # the endpoint is the request's, not whoever sends first
            with dropped_silently(net, "c1") as from_c1:
                from_c1.udp("another socket of the client, before the endpoint sent", *relay,
                            socks5.datagram(server, DNS_PORT, b"another port"))
            early = 1
        first = conn.udp(server, DNS_PORT, b"the endpoint", expect_reply=True)
        assert first["reply"] == b"the endpoint" and first["from"] == [server, DNS_PORT], first
        with dropped_silently(net, "c1") as from_c1, dropped_silently(net, "c2") as from_c2:
            from_c1.udp("another socket of the client", *relay,
                        socks5.datagram(server, DNS_PORT, b"another port"))
            from_c2.send("a neighbour in the client's name",
                         datagram(net, client, relay[0], next(PROBE_PORTS), relay[1],
                                  socks5.datagram(server, DNS_PORT, b"spoofed")))
        expect_no_packet(at_server, lambda p: UDP in p and (b"another port" in bytes(p[UDP].payload)
                                                             or b"spoofed" in bytes(p[UDP].payload)),
                         timeout=0)
        assert counter(net, "socks: UDP from another source dropped") == dropped_before + 2 + early
        second = conn.udp(server, DNS_PORT, b"the endpoint again", expect_reply=True)
        assert second["reply"] == b"the endpoint again", second


@pytest.mark.clause("FWC-02")
def test_an_association_for_another_host_is_not_allowed(socks_net: Net) -> None:
    """DST.ADDR naming c2: the relay would send c2 what comes for c1. Reply 2, no bind."""
    net = socks_net
    with socks_open(net, "c1", "alice", "udp", net.addr("c2"), 40000) as conn:
        assert conn.reply is not None and conn.reply["code"] == NOT_ALLOWED, conn.reply
        assert conn.ended()
    assert not [b for b in net.call("binds") if b["state"] != "closed" and b["protocol"] == "udp"]


# --- FWC-03 --------------------------------------------------------------------------------------

@pytest.mark.clause("FWC-03")
@pytest.mark.parametrize("kind", ["one-way", "bidirectional", "primary"])
def test_a_target_s_replies_need_bidirectional(socks_net: Net, kind: str) -> None:
    """A Firewall client's UDP flow admitted by a permission without BIDIRECTIONAL gets no
    replies relayed: the target's reply is dropped silently (it reaches the fw, and
    nothing answers it) and goes no further. With BIDIRECTIONAL it comes back, from that
    target only: another port of the same host is dropped silently. A primary policy
    allows (DNS) gets its replies, as a SecureNAT client's does."""
    net = socks_net
    s1, server = net.agent("s1"), net.addr("s1")
    port = DNS_PORT if kind == "primary" else 30301 + (kind == "bidirectional")
    with s1.udp_server(server, port) as target, associate(net) as conn:
        if kind != "primary":
            flags = Flags.BIDIRECTIONAL if kind == "bidirectional" else Flags(0)
            with net.client() as api:
                api.allow_future_connect(fw_session(net, "c1", "alice"), (server, port),
                                         protocol="udp", protocol_guid=FTP_GUID, flags=flags)
        since = time.time()
        if kind == "one-way":
            with dropped_silently(net, "s1") as drop:
                got = conn.udp(server, port, b"request", expect_reply=True, timeout=NEGATIVE)
                assert got["reply"] is None, f"a reply was relayed without BIDIRECTIONAL: {got}"
                drop.sent("the target's reply", ip(net, server, net.fw_external())
                          / UDP(sport=port, dport=udp_bind_port(net)))
            assert target.stats()["digest"] == multiset_digest([b"request"]), \
                "the datagram did not reach the target as sent"
            relay = conn.reply["address"], int(conn.reply["port"])
            expect_no_packet(net.fw_sent(since), ip(net, relay[0], net.addr("c1")) / UDP(sport=relay[1]),
                             timeout=0)
            assert counter(net, "socks: UDP reply dropped, one way") >= 1
            return
        got = conn.udp(server, port, b"request", expect_reply=True)
        assert target.stats()["digest"] == multiset_digest([b"request"]), \
            "the datagram did not reach the target as sent"
        assert got["reply"] == b"request" and got["from"] == [server, port], got
        # another port of the target's host: not the target, and the bind is not approved
        with dropped_silently(net, "s1") as drop:
            drop.send("a datagram from another port of the target's host",
                      datagram(net, server, net.fw_external(), port + 100, udp_bind_port(net),
                               b"not the target"))
        assert conn.udp(None, 0, b"", expect_reply=True, timeout=0.1)["reply"] is None


# --- FWC-04 --------------------------------------------------------------------------------------

def proxy(net: Net, node: str = "c1") -> tuple[str, int]:
    return net.fw_internal(node), SOCKS_PORT


@pytest.mark.clause("FWC-04")
def test_an_idle_or_slow_handshake_is_closed_after_its_timeout(socks_net: Net) -> None:
    """One connection says nothing, one stops after its greeting: both are closed after
    socks_handshake_timeout (counted); one that made its request in time is not."""
    net = socks_net
    c1 = net.agent("c1")
    before = counter(net, "socks: handshake timed out")
    started = time.monotonic()
    with c1.tcp_open(*proxy(net)) as idle, c1.tcp_open(*proxy(net)) as slow, \
            socks_open(net, "c1", "alice", "bind", anywhere(net), 0) as done:
        assert slow.talk(socks5.greeting("alice"), expect=2) == b"\x05\x02"
        assert done.reply is not None and done.reply["code"] == 0
        assert idle.ended(timeout=SOCKS_HANDSHAKE_TIMEOUT + timeouts.POSITIVE)
        assert slow.ended(timeout=timeouts.POSITIVE)
        took = time.monotonic() - started
        assert took >= SOCKS_HANDSHAKE_TIMEOUT - 0.2, f"closed after {took:.2f} s, before the timeout"
        assert not done.ended(timeout=0.3), "a connection past its request was closed"
    assert counter(net, "socks: handshake timed out") == before + 2


@pytest.mark.clause("FWC-04")
def test_connections_are_capped_per_client_and_in_total(dns: Net) -> None:
    """Six per client, eight in all (SOCKS_LIMITS): c1's seventh and c2's third are closed
    unserved (counted, the status shows the use), those held keep working, and a
    connection closed makes room."""
    net = dns
    server = net.addr("s1")
    status = net.call("status")["limits"]
    before = {k: status[k]["refused"] for k in ("socks_connections_per_client", "socks_connections_total")}
    held = [associate(net) for _ in range(6)]

    def refused(node: str, user: str) -> None:
        (probe,) = net.agent(node).tcp_probes(*proxy(net, node), [socks5.greeting(user)])
        assert probe["connected"] and probe["closed"] and probe["received"] == b"", probe

    try:
        refused("c1", "alice")
        held += [associate(net, "c2", "bob") for _ in range(2)]
        refused("c2", "bob")
        status = net.call("status")["limits"]
        assert status["socks_connections_total"]["used"] == 8
        assert status["socks_connections_per_client"]["highest"] == 6
        for name, count in before.items():
            assert status[name]["refused"] == count + 1, (name, status[name])
        for conn in (held[0], held[-1]):
            payload = f"held {conn.reply['port']}".encode()
            assert conn.udp(server, DNS_PORT, payload, expect_reply=True)["reply"] == payload
        held.pop().close()
        with associate(net, "c2", "bob") as again:
            assert again.udp(server, DNS_PORT, b"room again", expect_reply=True)["reply"] == b"room again"
    finally:
        for conn in held:
            conn.close()


@pytest.mark.clause("FWC-04")
def test_a_bind_waits_for_its_peer_a_bounded_time(socks_net: Net) -> None:
    """No peer within socks_bind_timeout: the second reply is 6 (TTL expired), the
    connection closes, the bind is gone, and a late peer gets nothing."""
    net = socks_net
    before = counter(net, "socks: bind timed out")
    started = time.monotonic()
    with socks_open(net, "c1", "alice", "bind", anywhere(net), 0) as conn:
        assert conn.reply is not None and conn.reply["code"] == 0
        port, session = int(conn.reply["port"]), fw_session(net, "c1", "alice")
        second = conn.accept(timeout=SOCKS_BIND_TIMEOUT + timeouts.POSITIVE)
        took = time.monotonic() - started
        assert second is not None and second["code"] == TTL_EXPIRED, second
        assert took >= SOCKS_BIND_TIMEOUT - 0.2, f"the BIND gave up after {took:.2f} s"
        assert conn.ended()
    assert counter(net, "socks: bind timed out") == before + 1
    assert not [b for b in net.call("binds") if b["session"] == session and b["state"] != "closed"]
    with dropped_silently(net, "s1") as drop:
        drop.tcp("a late peer", net.fw_external(), port)


def queued_bytes(net: Net, node: str, side: str, port: int) -> int:
    """The bytes waiting in ``node``'s TCP sockets whose ``side`` port (``sport``,
    ``dport``) is ``port``: unread ones where it is the local port, unsent ones where it
    is the peer's (``ss``'s Recv-Q and Send-Q)."""
    out = net.lab.tb.run(node, ["ss", "-Htn", side, "=", f":{port}"]).stdout
    column = 1 if side == "sport" else 2
    return sum(int(line.split()[column]) for line in out.splitlines() if line.startswith("ESTAB"))


@pytest.mark.clause("FWC-04")
def test_bytes_sent_before_the_relay_starts_are_bounded(socks_net: Net) -> None:
    """After BIND, before its peer, the client sends 60 kB: the service holds
    socks_buffer_bytes of them and reads no more (the status shows it, and so do the
    sockets: the rest waits in their queues); once the peer comes every byte reaches it,
    in order."""
    net = socks_net
    data = bytes(i * 7 % 251 for i in range(60_000))
    with socks_open(net, "c1", "alice", "bind", anywhere(net), 0) as conn:
        assert conn.reply is not None and conn.reply["code"] == 0
        port = int(conn.reply["port"])
        assert conn.talk(data, expect=0) == b""
        deadline = time.monotonic() + timeouts.POSITIVE
        while (held := net.call("status")["limits"]["socks_buffer_bytes"])["highest"] < SOCKS_BUFFER:
            assert time.monotonic() < deadline, held
            time.sleep(0.05)
        assert held["highest"] == SOCKS_BUFFER and held["cap"] == SOCKS_BUFFER, held
        # the sockets show it too: every byte past the cap waits unread, in the fw's receive
        # queue of the connection or still in c1's send queue
        while (unread := queued_bytes(net, "fw", "sport", SOCKS_PORT)
               + queued_bytes(net, "c1", "dport", SOCKS_PORT)) != len(data) - SOCKS_BUFFER:
            assert time.monotonic() < deadline, \
                f"{len(data) - unread} bytes left the sockets' queues, not the cap's {SOCKS_BUFFER}"
            time.sleep(0.05)
        net.call("retroactive_allow_bind", session=fw_session(net, "c1", "alice"), protocol="tcp",
                 address=net.fw_external(), port=port, protocol_guid=FTP_GUID)
        with net.agent("s1").tcp_open(net.fw_external(), port) as peer:
            assert peer.connected, peer.error
            second = conn.accept()
            assert second is not None and second["code"] == 0, second
            assert peer.talk(b"", expect=len(data)) == data


@pytest.mark.clause("FWC-04")
@pytest.mark.parametrize("login", ["wrong-password", "unknown-user", "malformed", "session-cap"])
def test_a_failed_authentication_never_sees_a_success(socks_net: Net, login: str) -> None:
    """A wrong password, an unknown user, a malformed login, and a right one refused at
    the session cap (sessions_per_client 1, alice holding it): RFC 1929's failure status
    and the close, never a success first, and the request that followed is not served."""
    net = socks_net
    if login == "session-cap":
        net.enforcer.restart(limits={**SOCKS_LIMITS, "sessions_per_client": 1})
    user, password = {"wrong-password": ("alice", "wrong"), "unknown-user": ("mallory", "x"),
                      "session-cap": ("bob", SOCKS_USERS["bob"])}.get(login, ("alice", ""))
    wire = socks5.login(user, password) if login != "malformed" else b"\x02\x05alice\x00"
    request = socks5.request("connect", net.addr("s1"), 21)
    since = time.time()
    with net.agent("s1").tcp_server(net.addr("s1"), 21) as server, \
            socks_open(net, "c1", "alice", "bind", anywhere(net), 0) as alice, \
            net.agent("c1").tcp_open(*proxy(net)) as conn:
        assert alice.reply is not None and alice.reply["code"] == 0
        answer = conn.talk(socks5.greeting(user) + wire + request, expect=5)
        assert answer == b"\x05\x02\x01\x01", f"{login}: {answer!r}"
        assert conn.ended()
        # the request after the login was not served: nothing of it left the fw for s1:21
        expect_no_packet(net.fw_sent(since), TCP(dport=21, flags="S"))
        assert server.stats()["accepted"] == 0, f"{login}: the CONNECT after it was served"
    if login == "session-cap":
        assert net.call("status")["limits"]["sessions_per_client"]["refused"] >= 1
