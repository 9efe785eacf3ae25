"""ROB-02 and ROB-03: bounded state (SPEC rules 16 and 18), end to end.

Each check restarts the enforcer with small caps (``[limits]``), a new run with none of
the state an earlier check left; the next check's ``net`` fixture goes back to the
default enforcer. Checks whose outcome cannot depend on translation run in the routed
topology only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from scapy.layers.inet import TCP, UDP

from testbed import socks5, timeouts
from testbed.agent import multiset_digest
from testbed.checks import expect_no_packet, expect_packet
from testbed.clauses.helpers import (
    FTP_GUID,
    NEGATIVE,
    anywhere,
    assert_dropped_silently,
    assert_echoed,
    assert_ran_in_mode,
    datagram,
    decisions_for,
    dropped_silently,
    fw_session,
    grant,
    ip,
    probe_port,
    socks_open,
    syn,
    talk,
    wait_until,
)
from testbed.lab import MAX_PENDING_PER_SESSION, SOCKS_PORT, SOCKS_USERS, USER_MODE_MARK
from testbed.plugin import Net
from testbed.session_api import Flags, IsBusy, Terminating

SHOUT = {"shout": "tests.e2e.shout_filter:Shout"}  # "ping" -> "PONG!!" out, "!!" -> "?" back
GENERAL_FAILURE = 1  # SOCKS5 reply code


def restart(net: Net, **limits: object) -> None:
    """The enforcer again, with these caps."""
    net.enforcer.restart(limits=limits)


def status(net: Net) -> dict[str, Any]:
    return dict(net.call("status"))


def limits_of(net: Net) -> dict[str, Any]:
    return dict(status(net)["limits"])


def wait_for(net: Net, what: str, probe: Callable[[dict[str, Any]], bool], within: float) -> None:
    """Poll the caps' status until ``probe`` accepts it."""
    deadline = time.monotonic() + within
    while not probe(limits := limits_of(net)):
        assert time.monotonic() < deadline, f"{what}: not within {within:g} s: {limits}"
        time.sleep(0.1)


def spoofed(net: Net, i: int) -> str:
    """An address on the internal network that no host has."""
    return str(ipaddress.ip_network(net.topology.internal_network(net.family))[100 + i])


def echoed(conn: Any, data: bytes) -> None:
    """The connection still carries data: the echo comes back byte for byte."""
    assert conn.talk(data, expect=len(data)) == data


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.clause("ROB-02")
def test_sessions_from_spoofed_sources_stay_within_the_cap_and_idle_ones_end(net: Net) -> None:
    """With room for 3 sessions, c1's and two spoofed sources' are made; the other
    spoofed SYNs and a new real client are refused at the fw; c1's connection goes on;
    once the sessions are idle for 3 s they end, and the new client gets in."""
    restart(net, sessions_total=3, session_idle_timeout=3)
    c1, c2, s1 = net.agent("c1"), net.agent("c2"), net.agent("s1")
    dst = net.addr("s1")
    with s1.tcp_server(dst, 21), c1.tcp_open(dst, 21) as held, s1.sniff(net.iface("s1")) as at_server:
        assert held.connected, held.error  # c1's session: 1 of 3
        c1.send([syn(net, spoofed(net, i), dst, 42000 + i, 21) for i in range(2)])
        with dropped_silently(net, "c1") as from_c1, dropped_silently(net, "c2") as from_c2:
            from_c1.send("a SYN from a spoofed source beyond the sessions cap",
                         *(syn(net, spoofed(net, i), dst, 42000 + i, 21) for i in range(2, 6)))
            from_c2.tcp("c2 beyond the sessions cap", dst, 21)
        for i in (0, 1):
            expect_packet(at_server, TCP(sport=42000 + i, dport=21, flags="S"))
        expect_no_packet(at_server, lambda p: TCP in p and p[TCP].dport == 21
                         and 42002 <= p[TCP].sport <= 42005, timeout=0)
        limits = limits_of(net)
        assert limits["sessions_total"]["used"] == 3, limits["sessions_total"]
        assert limits["sessions_total"]["refused"] >= 5, limits["sessions_total"]  # 4 spoofed, c2
        # the refused SYNs reached the fw, which refused them for the cap
        for i in range(2, 6):
            reasons = [d["reason"] for d in decisions_for(net, 21, spoofed(net, i))]
            assert reasons and reasons[-1].startswith("refused: the sessions_total cap (3)"), reasons
        echoed(held, b"c1's session is kept" * 50)
        # idle sessions end; c1's flow outlives its session (it runs in the kernel)
        wait_for(net, "idle sessions end", lambda caps: caps["sessions_total"]["used"] == 0,
                 3 + 2 + timeouts.POSITIVE)
        assert limits_of(net)["session_idle_timeout"]["ended"] == 3
        echoed(held, b"after the session ended" * 50)
        with c2.tcp_open(dst, 21) as admitted:
            assert admitted.connected, admitted.error
            echoed(admitted, b"room again" * 100)


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.topologies("routed")  # the caps do not depend on the topology
@pytest.mark.clause("ROB-02")
def test_a_firewall_client_beyond_its_address_sessions_cap_gets_a_socks_failure(net: Net) -> None:
    """Two sessions per client address: c1's SecureNAT session and alice's; bob on c1
    is refused (RFC 1929's failure status for his right password, never a success first,
    and his request is not served) while alice's relay goes on; bob on c2 is not."""
    restart(net, sessions_per_client=2)
    dst = net.addr("s1")
    net.session("c1")
    with net.agent("s1").tcp_server(dst, 21) as server, \
            socks_open(net, "c1", "alice", "connect", dst, 21) as alice:
        assert alice.reply is not None and alice.reply["code"] == 0, (alice.error, alice.reply)
        with net.agent("c1").tcp_open(net.fw_internal("c1"), SOCKS_PORT) as bob:
            login = socks5.greeting("bob") + socks5.login("bob", SOCKS_USERS["bob"])
            answer = bob.talk(login + socks5.request("connect", dst, 21), expect=5)
            assert answer == b"\x05\x02\x01\x01", answer
            assert bob.ended()
        echoed(alice, b"alice's relay" * 100)
        assert server.stats()["accepted"] == 1, "bob's request was served (s1 accepted a second connection)"
        with socks_open(net, "c2", "bob", "connect", dst, 21) as elsewhere:
            assert elsewhere.reply is not None and elsewhere.reply["code"] == 0, elsewhere.reply
            echoed(elsewhere, b"bob on c2" * 10)
        cap = limits_of(net)["sessions_per_client"]
        assert cap["refused"] == 1 and cap["top"][0] == [net.addr("c1"), 2], cap


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.topologies("routed")  # the caps do not depend on the topology
@pytest.mark.clause("ROB-02")
def test_binds_and_pending_permissions_stop_at_their_caps(net: Net) -> None:
    """Binds: 2 per client, 3 in all; pending permissions: the same. At a cap the call
    fails with FWX_E_IS_BUSY (a SOCKS BIND with a failure reply); what is held works."""
    restart(net, binds_per_client=2, binds_total=3, pending_per_client=2, pending_total=3)
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api:
        one, two = net.session("c1"), net.session("c2")
        binds = [api.call("bind_for_client", session=one, protocol="tcp", client_port=port)
                 for port in (45001, 45002)]
        with pytest.raises(IsBusy, match="binds_per_client"):
            api.call("bind_for_client", session=one, protocol="tcp", client_port=45003)
        with socks_open(net, "c1", "alice", "bind", "0.0.0.0" if net.family == "ipv4" else "::",
                        0) as refused:
            assert refused.reply is not None and refused.reply["code"] == GENERAL_FAILURE, \
                (refused.error, refused.reply)
        api.call("bind_for_client", session=two, protocol="tcp", client_port=45001)
        with pytest.raises(IsBusy, match="binds_total"):
            api.call("bind_for_client", session=two, protocol="tcp", client_port=45002)

        actions = [grant(net, api, (dst, port)) for port in (46001, 46002)]
        with pytest.raises(IsBusy, match="pending_per_client"):
            grant(net, api, (dst, 46003))
        grant(net, api, (dst, 46001), session_of="c2")
        with pytest.raises(IsBusy, match="pending_total"):
            grant(net, api, (dst, 46002), session_of="c2")
        # a refused grant left nothing behind that admits its connection
        with dropped_silently(net, "c1") as from_c1, dropped_silently(net, "c2") as from_c2:
            from_c1.tcp("c1's connection by the grant refused at pending_per_client", dst, 46003)
            from_c2.tcp("c2's connection by the grant refused at pending_total", dst, 46002)
        limits = limits_of(net)
        assert (limits["binds_total"]["used"], limits["pending_total"]["used"]) == (3, 3), limits
        assert limits["binds_per_client"]["refused"] == 2, limits["binds_per_client"]  # API, SOCKS
        assert limits["pending_per_client"]["refused"] == 1 and limits["pending_total"]["refused"] == 1

        # what is held works: a grant admits its connection, an approved bind its peer
        with s1.tcp_server(dst, 46001), c1.tcp_open(dst, 46001) as conn:
            assert conn.connected, conn.error
            echoed(conn, b"under a grant held at the cap" * 40)
        assert actions[0].state == "consumed"
        bound = binds[0]["address"]
        api.call("retroactive_allow_bind", session=one, protocol="tcp", address=bound[0],
                 port=bound[1], protocol_guid=FTP_GUID,
                 ipfilter={"ranges": [[net.addr("s1"), net.addr("s1")]]})
        with c1.tcp_server(net.addr("c1"), 45001), s1.tcp_open(bound[0], bound[1]) as inbound:
            assert inbound.connected, inbound.error
            echoed(inbound, b"through a bind held at the cap" * 40)


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.topologies("routed")  # the caps do not depend on the topology
@pytest.mark.clause("ROB-02")
def test_user_mode_flows_stop_at_the_cap_and_those_held_go_on(net: Net) -> None:
    """Two user-mode flows per client: a third connection under the same grant is
    dropped at the fw; the two go on; kernel-mode flows are not limited by it."""
    restart(net, user_flows_per_client=2)
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    session = net.session("c1")
    with net.client() as api, s1.tcp_server(dst, 47001), s1.tcp_server(dst, 21):
        action = api.allow_future_connect(session, (dst, 47001), protocol_guid=FTP_GUID,
                                          flags=Flags.ALLOW_MULTIPLE | Flags.NO_KERNEL_MODE)
        with c1.tcp_open(dst, 47001) as a, c1.tcp_open(dst, 47001) as b:
            assert a.connected and b.connected, (a.error, b.error)
            with dropped_silently(net, "c1") as drop:
                drop.tcp("a third user-mode flow", dst, 47001)
            reasons = [d["reason"] for d in decisions_for(net, 47001, net.addr("c1"))]
            assert reasons[-1].startswith("refused: the user_flows_per_client cap (2)"), reasons
            echoed(a, b"first" * 300)
            echoed(b, b"second" * 300)
            assert_echoed(c1.tcp_connect(dst, 21, send_bytes=5000), 5000, "a kernel-mode primary")
        assert action.info()["admitted"] == 2
    cap = limits_of(net)["user_flows_per_client"]
    assert cap["refused"] >= 1 and cap["top"][0] == [net.addr("c1"), 2], cap


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.clause("ROB-03")
def test_a_filtered_flow_keeps_its_filter_through_a_flood_of_other_flows(net: Net) -> None:
    """A flow with a data filter (lengths change both ways) goes on, filtered, while c2
    opens far more flows than the caps hold: 150 kernel-mode ones (the history keeps
    20) and 40 user-mode ones (6 fit)."""
    net.enforcer.data_filters = SHOUT
    try:
        # no kernel rate limit: the flood is to reach the enforcer, all of it
        net.enforcer.restart(limits={"flow_history": 20, "user_flows_total": 7,
                                     "new_flows_per_second": 0})
    finally:
        net.enforcer.data_filters = None  # the next check's enforcer is the default one again
    c1, c2, s1 = net.agent("c1"), net.agent("c2"), net.agent("s1")
    dst, flooder = net.addr("s1"), net.addr("c2")
    with net.client() as api, s1.tcp_server(dst, 48001):
        api.allow_future_connect(net.session("c1"), (dst, 48001), protocol_guid=FTP_GUID,
                                 data_filter="shout")
        api.allow_future_connect(net.session("c2"), (dst, 48002), protocol_guid=FTP_GUID,
                                 flags=Flags.ALLOW_MULTIPLE | Flags.NO_KERNEL_MODE)
        with c1.tcp_open(dst, 48001) as filtered:
            assert filtered.connected, filtered.error
            assert filtered.talk(b"ping----" * 20, expect=9 * 20) == b"PONG?----" * 20
            c2.send([datagram(net, flooder, dst, 50000 + i, 53, b"flood") for i in range(150)]
                    + [syn(net, flooder, dst, 51000 + i, 48002) for i in range(40)])
            wait_for(net, "the flood decided", lambda caps: caps["user_flows_total"]["refused"] >= 34,
                     timeouts.POSITIVE)
            limits = limits_of(net)
            assert limits["flow_history"]["used"] == 20 and limits["user_flows_total"]["used"] == 7, limits
            for n in (10, 125, 60):  # the filter, and its sequence shifts, are all still there
                assert filtered.talk(b"ping----" * n, expect=9 * n) == b"PONG?----" * n
            assert_echoed(filtered.exchange(50_000), 50_000, "the filtered flow, after the flood")
        (listed,) = [f for f in net.call("flows", limit=10000) if f["flow"].endswith(f":{48001}")]
        assert listed["data_filter"] == "shout" and listed["held"] is not None, listed


@pytest.mark.topologies("routed")  # the caps do not depend on the topology
@pytest.mark.clause("ROB-03")
def test_a_packet_of_a_user_mode_flow_the_enforcer_does_not_know_is_dropped(net: Net) -> None:
    """A conntrack entry marked user mode that the enforcer never admitted (made by hand
    in the fw; UDP, which conntrack tracks without windows): a datagram of it is dropped
    silently and counted, and never reaches the server."""
    s1 = net.agent("s1")
    src, dst, sport, dport = net.addr("c1"), net.addr("s1"), 49001, 49002
    reply_dst = net.fw_external(0) if net.nat else src
    entry = ["-p", "udp", "-s", src, "-d", dst, "--sport", str(sport), "--dport", str(dport)]
    net.lab.tb.run("fw", ["conntrack", "-I", *entry, "-r", dst, "-q", reply_dst,
                          "--reply-port-src", str(dport), "--reply-port-dst", str(sport),
                          # -u before --mark: conntrack 1.4.7 writes -u's bits over a --mark before it
                          "--timeout", "60", "-u", "SEEN_REPLY,ASSURED", "--mark", USER_MODE_MARK])
    try:
        before = status(net)["counters"].get("dropped: unknown user-mode flow", 0)
        with s1.sniff(net.iface("s1")) as at_server:
            with dropped_silently(net, "c1") as drop:
                drop.send("a datagram of a user-mode flow nobody admitted",
                          datagram(net, src, dst, sport, dport, b"a flow nobody admitted"))
            expect_no_packet(at_server, UDP(sport=sport, dport=dport), timeout=0)
        after = status(net)["counters"].get("dropped: unknown user-mode flow", 0)
        assert after == before + 1, (before, after)
    finally:
        net.lab.tb.run("fw", ["conntrack", "-D", "-f", net.family, *entry], check=False)


# --- each cap at its edge: at cap - 1 the request works, at the cap it is refused --------------

@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.topologies("routed")  # the caps do not depend on the topology
@pytest.mark.clause("ROB-02")
def test_a_client_s_tracked_flows_stop_at_flows_per_client(net: Net) -> None:
    """flows_per_client 3, enforced by the kernel before the queue: c1's third FTP connection
    opens; a fourth's SYN (a primary policy admits) reaches the fw and goes no further,
    unanswered, and never reaches the enforcer; the three go on, c2 connects; once one of
    c1's closes, c1's next opens."""
    restart(net, flows_per_client=3)
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with s1.tcp_server(dst, 21), c1.tcp_open(dst, 21) as first, c1.tcp_open(dst, 21) as second:
        with c1.tcp_open(dst, 21) as third:
            assert first.connected and second.connected and third.connected, \
                (first.error, second.error, third.error)
            beyond = syn(net, net.addr("c1"), dst, probe_port(), 21)
            assert_dropped_silently(net, [("c1", beyond)])
            if net.own_enforcer:  # the kernel dropped it before the queue
                assert not [d for d in decisions_for(net, 21, net.addr("c1"))
                            if f":{beyond[TCP].sport} ->" in d["flow"]]
            for conn in (first, second, third):
                echoed(conn, b"a flow held at the cap" * 50)
            talk(net, "c2", dst, 21)
        talk(net, "c1", dst, 21)  # (a closed connection is no longer counted)


# How many new flows a client may start at once (limits.new_flows_per_second's burst, a tenth
# of the rate and at least 10), at the rate the check sets: one a second, which no part of the
# check waits long enough to see refilled but where it says so
NEW_FLOWS_AT_ONCE = 10


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.topologies("routed")  # the caps do not depend on the topology
@pytest.mark.clause("ROB-02")
def test_a_client_s_new_flows_stop_at_new_flows_per_second(net: Net) -> None:
    """new_flows_per_second 1 (10 at once), enforced by the kernel before the queue: with c1's
    connection held (its token back after a second), 10 new DNS flows of c1's at once reach
    s1 (the datagrams compared); an eleventh reaches the fw and goes no further, unanswered;
    c2 is not held back; the held connection goes on; a second later c1 starts a new flow."""
    restart(net, new_flows_per_second=1)
    c1, s1 = net.agent("c1"), net.agent("s1")
    src, dst = net.addr("c1"), net.addr("s1")
    with s1.tcp_server(dst, 21), s1.udp_server(dst, 53, echo=False) as dns, c1.tcp_open(dst, 21) as held:
        assert held.connected, held.error
        time.sleep(1.2)  # the held connection's token comes back: the bucket is full again
        payloads = [f"new flow {i} of c1's".encode() for i in range(NEW_FLOWS_AT_ONCE)]
        c1.send([datagram(net, src, dst, probe_port(), 53, p) for p in payloads])
        started = time.monotonic()
        assert_dropped_silently(net, [("c1", datagram(net, src, dst, probe_port(), 53, b"one too many"))])
        wait_until(lambda: dns.stats()["accepted"] >= NEW_FLOWS_AT_ONCE,
                   f"{NEW_FLOWS_AT_ONCE} new flows at once did not reach s1")
        assert dns.stats()["digest"] == multiset_digest(payloads), dns.stats()
        talk(net, "c2", dst, 21)
        echoed(held, b"a flow started before the cap" * 50)
        time.sleep(max(0.0, started + 1.1 - time.monotonic()))  # a token again
        talk(net, "c1", dst, 21)


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.topologies("routed")  # the caps do not depend on the topology
@pytest.mark.clause("ROB-02")
def test_user_mode_flows_stop_at_user_flows_total_and_the_grant_stays_pending(net: Net) -> None:
    """user_flows_total 2: c1's user-mode flow, then c2's (the second) open; c1's next SYN under
    a single-use user-mode grant reaches the fw and goes no further, unanswered, and the grant
    stays pending; the two flows go on, and a kernel-mode flow is not held back."""
    restart(net, user_flows_total=2)
    c1, c2, s1 = net.agent("c1"), net.agent("c2"), net.agent("s1")
    dst = net.addr("s1")
    user = Flags.ALLOW_MULTIPLE | Flags.NO_KERNEL_MODE
    sessions = {node: net.session(node) for node in ("c1", "c2")}
    with net.client() as api, s1.tcp_server(dst, 21), s1.tcp_server(dst, 47101), \
            s1.tcp_server(dst, 47102):
        held = [api.allow_future_connect(session, (dst, 47101), protocol_guid=FTP_GUID, flags=user)
                for session in sessions.values()]
        single = api.allow_future_connect(sessions["c1"], (dst, 47102), protocol_guid=FTP_GUID,
                                          flags=Flags.NO_KERNEL_MODE)
        with c1.tcp_open(dst, 47101) as first, c2.tcp_open(dst, 47101) as second:
            assert first.connected and second.connected, (first.error, second.error)
            beyond = syn(net, net.addr("c1"), dst, probe_port(), 47102)
            assert_dropped_silently(net, [("c1", beyond)])
            if net.own_enforcer:
                (reason,) = [d["reason"] for d in decisions_for(net, 47102, net.addr("c1"))
                             if f":{beyond[TCP].sport} ->" in d["flow"]]
                assert reason.startswith("refused: the user_flows_total cap (2)"), reason
                assert single.state == "pending", "a flow refused at the cap used the grant"
            echoed(first, b"c1's user-mode flow at the cap" * 50)
            echoed(second, b"c2's user-mode flow at the cap" * 50)
            for action in held:  # (the cap's are user-mode flows)
                assert_ran_in_mode(net, action, "user")
            talk(net, "c1", dst, 21)  # a kernel-mode primary


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.topologies("routed")  # the caps do not depend on the topology
@pytest.mark.clause("ROB-02")
def test_an_association_s_targets_stop_at_socks_udp_targets(net: Net) -> None:
    """socks_udp_targets 2: alice's UDP ASSOCIATE sends to s1's and s2's DNS port (the second
    target) and gets the answers; her datagram to a third target, which her BIDIRECTIONAL
    grant admits, reaches the relay and goes no further (the target gets nothing); the first
    target still answers; a new association of hers reaches the third."""
    restart(net, socks_udp_targets=2)
    s1, s2 = net.agent("s1"), net.agent("s2")
    dst, third = net.addr("s1"), 47201
    with s1.udp_server(dst, 53), s2.udp_server(net.addr("s2"), 53), s1.udp_server(dst, third) as target, \
            socks_open(net, "c1", "alice", "udp", anywhere(net), 0) as conn, net.client() as api:
        assert conn.reply is not None and conn.reply["code"] == 0, (conn.error, conn.reply)
        api.allow_future_connect(fw_session(net, "c1", "alice"), (dst, third), protocol="udp",
                                 protocol_guid=FTP_GUID, flags=Flags.ALLOW_MULTIPLE | Flags.BIDIRECTIONAL)
        for host in (dst, net.addr("s2")):
            payload = f"to {host}'s DNS port".encode()
            got = conn.udp(host, 53, payload, expect_reply=True)
            assert (got["reply"], got["from"]) == (payload, [host, 53]), got
        since = time.time()
        got = conn.udp(dst, third, b"to a third target", expect_reply=True, timeout=NEGATIVE)
        assert got["reply"] is None, f"the association reached a third target: {got}"
        expect_packet(net.fw_received(net.topology.fw_iface_facing("c1"), since),
                      ip(net, net.addr("c1"), conn.reply["address"]) / UDP(dport=int(conn.reply["port"])))
        expect_no_packet(net.fw_sent(since), lambda p: UDP in p and p[UDP].dport == third, timeout=0)
        assert target.stats()["accepted"] == 0
        again = conn.udp(dst, 53, b"the first target again", expect_reply=True)
        assert again["reply"] == b"the first target again", again
        with socks_open(net, "c1", "alice", "udp", anywhere(net), 0) as other:
            assert other.reply is not None and other.reply["code"] == 0, (other.error, other.reply)
            got = other.udp(dst, third, b"a new association", expect_reply=True)
            assert got["reply"] == b"a new association", got


IDLE = 3.0  # seconds: the session_idle_timeout of the check of its edge


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.topologies("routed")  # the caps do not depend on the topology
@pytest.mark.clause("ROB-02")
def test_a_securenat_session_does_not_end_before_its_idle_timeout(net: Net) -> None:
    """session_idle_timeout 3 s: c1's session, idle since the grant it asked for half a second
    less than that ago, is still there: the grant admits c1's connection (echoed). (That an
    idle session ends and cancels its grants: the checks above and AFC-16.)"""
    restart(net, session_idle_timeout=IDLE)
    dst, port = net.addr("s1"), 47301
    with net.client() as api, net.agent("s1").tcp_server(dst, port):
        session = net.session("c1")
        grant(net, api, (dst, port))
        granted = time.monotonic()  # the session's last activity was before this
        time.sleep(IDLE - 0.5)
        assert time.monotonic() - granted < IDLE, "the check slept too long to tell"
        talk(net, "c1", dst, port)
        if net.own_enforcer:
            assert session in [s["id"] for s in net.call("sessions")], \
                f"c1's session ended after {time.monotonic() - granted:.1f} s, before {IDLE:g} s idle"


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.topologies("routed")  # the caps do not depend on the topology
@pytest.mark.clause("ROB-02")
def test_kernel_mode_flows_beyond_flow_history_are_admitted_and_the_oldest_forgotten(net: Net) -> None:
    """flow_history 3: c1's fourth kernel-mode connection opens too (nothing is refused for
    this cap), and all four carry data; the enforcer lists the last three."""
    restart(net, flow_history=3)
    c1, dst = net.agent("c1"), net.addr("s1")
    with net.agent("s1").tcp_server(dst, 21):
        held = [c1.tcp_open(dst, 21) for _ in range(4)]
        try:
            assert all(conn.connected for conn in held), [conn.error for conn in held]
            for conn in held:
                echoed(conn, b"a kernel-mode flow beyond the history" * 50)
            if net.own_enforcer:
                listed = [f["flow"] for f in net.call("flows", limit=10000)]
                ports = [f":{conn.local[1]} ->" for conn in held if conn.local is not None]
                assert [p for p in ports if any(p in flow for flow in listed)] == ports[1:], listed
                assert limits_of(net)["flow_history"]["used"] == 3
        finally:
            for conn in held:
                conn.close()


@pytest.mark.topologies("routed")  # the caps do not depend on the topology
@pytest.mark.clause("ROB-02")
def test_a_session_s_pending_permissions_stop_at_max_pending_per_session(net: Net) -> None:
    """The lab policy's max_pending_per_session: c1's SecureNAT session holds that many
    grants; one more is refused (FWX_E_IS_BUSY); alice's Firewall-client session on c1's
    address is not held back by it; once a connection consumes one of c1's grants, its
    session gets exactly one more."""
    dst, base = net.addr("s1"), 49100
    beyond = (dst, base + MAX_PENDING_PER_SESSION)
    refused_before = limits_of(net)["max_pending_per_session"]["refused"] if net.own_enforcer else 0
    with net.client() as api:
        actions = [grant(net, api, (dst, base + i)) for i in range(MAX_PENDING_PER_SESSION)]
        try:
            with pytest.raises(IsBusy):
                grant(net, api, beyond)
            with dropped_silently(net, "c1") as drop:  # the refused grant admits nothing
                drop.tcp("a connection by the refused grant", *beyond)
            with net.agent("s1").tcp_server(dst, 21), \
                    socks_open(net, "c1", "alice", "connect", dst, 21) as alice:
                assert alice.reply is not None and alice.reply["code"] == 0, (alice.error, alice.reply)
                api.allow_future_connect(fw_session(net, "c1", "alice"), beyond,
                                         protocol_guid=FTP_GUID).cancel()
            with net.agent("s1").tcp_server(dst, base):
                talk(net, "c1", dst, base)
            assert actions[0].state == "consumed"
            actions.append(grant(net, api, beyond))
            with pytest.raises(IsBusy):
                grant(net, api, (dst, base + MAX_PENDING_PER_SESSION + 1))
            with dropped_silently(net, "c1") as drop:
                drop.tcp("a connection by the grant refused again", dst, base + MAX_PENDING_PER_SESSION + 1)
            if net.own_enforcer:
                assert limits_of(net)["max_pending_per_session"]["refused"] == refused_before + 2
        finally:  # the next checks grant for c1's session too
            for action in actions:
                with contextlib.suppress(Terminating):
                    action.cancel()


# A full-sized segment's bytes (1448, an Ethernet MSS with TCP timestamps) and the fixed cost
# of its record, however a firewall counts that: a budget this far from its cap is full
SEGMENT_AND_RECORD = 2048


@contextlib.contextmanager
def silenced(net: Net, node: str, ports: tuple[int, ...]) -> Iterator[None]:
    """``node`` sends nothing from these TCP ports (no acknowledgement, no echo) for a while."""
    tb, table = net.lab.tb, ["inet", "pinhole_silenced"]
    tb.run(node, ["nft", "add", "table", *table])
    try:
        tb.run(node, ["nft", "add", "chain", *table, "out",
                      "{ type filter hook output priority 0 ; }"])
        tb.run(node, ["nft", "add", "rule", *table, "out", "tcp", "sport",
                      "{ " + ", ".join(map(str, ports)) + " }", "drop"])
        yield
    finally:
        tb.run(node, ["nft", "delete", "table", *table])


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.topologies("routed")  # the caps do not depend on the topology
@pytest.mark.clause("ROB-02")
def test_filtered_streams_hold_bytes_up_to_the_client_s_cap_and_the_total(net: Net) -> None:
    """buffered_bytes_per_client 8 KiB within a total of 12 KiB, with a data filter on c1's and
    c2's flows: while s1 acknowledges nothing, what the fw keeps for retransmission grows to
    c1's cap and stops there (c1 sends 10 segments, more than the cap), then c2's to what the
    total leaves; once s1 answers again, both streams arrive whole and echo back as sent,
    and the filter is still at work on them."""
    per_client, total = 8192, 12288
    net.enforcer.data_filters = SHOUT
    try:
        net.enforcer.restart(limits={"buffered_bytes_per_client": per_client,
                                     "buffered_bytes_total": total})
    finally:
        net.enforcer.data_filters = None  # the next check's enforcer is the default one again
    dst, ports = net.addr("s1"), (49001, 49002)
    # 20 KiB, nothing for the filter to edit: more than a sender's first window (10 segments)
    payload = bytes(range(256)).replace(b"!", b".") * 80

    def held() -> dict[str, int]:
        top = limits_of(net)["buffered_bytes_per_client"]["top"]
        return {client: used for client, used in top}

    def settled(node: str, least: int) -> int:
        """What ``node``'s flow holds once it stops growing (at least ``least``)."""
        deadline, last = time.monotonic() + timeouts.POSITIVE, -1
        while (now := held().get(net.addr(node), 0)) != last or now < least:
            assert time.monotonic() < deadline, f"{node}'s flow holds {now} bytes, not {least}+"
            last = now
            time.sleep(0.5)  # past the sender's first retransmission
        return now

    with net.client() as api, net.agent("s1").tcp_server(dst, ports[0]), \
            net.agent("s1").tcp_server(dst, ports[1]):
        for node, port in zip(("c1", "c2"), ports, strict=True):
            api.allow_future_connect(net.session(node), (dst, port), protocol_guid=FTP_GUID,
                                     data_filter="shout")
        with net.agent("c1").tcp_open(dst, ports[0]) as one, net.agent("c2").tcp_open(dst, ports[1]) as two:
            assert one.connected and two.connected, (one.error, two.error)
            for conn in (one, two):
                assert conn.talk(b"ping", expect=5) == b"PONG?"
            with silenced(net, "s1", ports):  # (briefly: the senders' timers back off meanwhile)
                assert one.talk(payload, timeout=0.1) == b""  # c1's first window, at once
                assert two.talk(payload, timeout=0.1) == b""
                c1_held = settled("c1", per_client - SEGMENT_AND_RECORD)
                assert c1_held <= per_client, f"c1's flow holds {c1_held} bytes, past its cap"
                c2_held = settled("c2", total - c1_held - SEGMENT_AND_RECORD)
                assert c1_held + c2_held <= total, f"{c1_held} + {c2_held} bytes held, past the total"
                assert limits_of(net)["buffered_bytes_total"]["used"] == c1_held + c2_held
            # the bytes the fw did not take are sent again when the senders' retransmission
            # timers fire, backed off while s1 was silent (and again for new bytes sent past
            # what the fw dropped meanwhile): seconds
            for node, conn in (("c1", one), ("c2", two)):
                echo = conn.talk(b"", expect=len(payload), timeout=20)
                assert echo == payload, f"{node}: {len(echo)} of {len(payload)} bytes came back as sent"
                assert conn.talk(b"ping", expect=5) == b"PONG?"
