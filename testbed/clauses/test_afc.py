"""AFC: AllowFutureConnect, FirewallAction and session events, end to end."""

from __future__ import annotations

import re
import time

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from testbed import timeouts
from testbed.agent import multiset_digest
from testbed.checks import expect_no_packet, expect_packet
from testbed.clauses.helpers import (
    FTP_GUID,
    NEGATIVE,
    answers_to,
    assert_dropped_silently,
    assert_echoed,
    assert_ran_in_mode,
    datagram,
    dropped_silently,
    fw_session,
    grant,
    ip,
    pending_actions,
    probe_port,
    refused,
    socks_open,
    syn,
    wait_for_state,
    wait_past_expiry,
)
from testbed.drivers import Unsupported
from testbed.lab import GUIDS
from testbed.plugin import Net
from testbed.session_api import (
    ControlError,
    Flags,
    InvalidArgument,
    NetworkRulesDenied,
    PolicyRulesDenied,
    Terminating,
)


@pytest.mark.clause("AFC-01")
def test_one_admitted_tcp_connection_carries_data_both_ways(net: Net, mode: str) -> None:
    """A granted connection passes 200 kB each way; the server sees the session's address."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api, s1.tcp_server(dst, 30001) as server:
        action = grant(net, api, (dst, 30001))
        result = c1.tcp_connect(dst, 30001, send_bytes=200_000)
        assert_echoed(result, 200_000, "the granted connection")
        assert [p[0] for p in server.stats()["peers"]] == [net.source_seen_by_server("c1")]
        assert action.state == "consumed"
        assert_ran_in_mode(net, action)
        # a crafted SYN under a second grant is seen at the server, rewritten in NAT
        grant(net, api, (dst, 30002))
        with s1.sniff(net.iface("s1")) as at_server:
            c1.send(syn(net, net.addr("c1"), dst, 41001, 30002))
            expect_packet(at_server, ip(net, net.source_seen_by_server("c1"), dst)
                          / TCP(dport=30002, flags="S"))


@pytest.mark.clause("AFC-02")
def test_single_use_admits_one_connection_only(net: Net, mode: str) -> None:
    """The second connection to a single-use grant, and other ports and servers, are dropped."""
    c1, s1, s2 = net.agent("c1"), net.agent("s1"), net.agent("s2")
    dst = net.addr("s1")
    with net.client() as api, s1.tcp_server(dst, 30011) as server, \
            s1.tcp_server(dst, 30012) as other_port, s2.tcp_server(net.addr("s2"), 30011) as other_host:
        action = grant(net, api, (dst, 30011))
        assert_echoed(c1.tcp_connect(dst, 30011, send_bytes=1000), 1000, "the granted connection")
        assert action.state == "consumed"
        assert_ran_in_mode(net, action)
        with dropped_silently(net, "c1") as drop:
            drop.tcp("the second connection", dst, 30011)
            drop.tcp("another port", dst, 30012)
            drop.tcp("another server", net.addr("s2"), 30011)
        assert server.stats()["accepted"] == 1
        assert other_port.stats()["accepted"] == other_host.stats()["accepted"] == 0
    with s1.sniff(net.iface("s1")) as at_server:
        with dropped_silently(net, "c1") as drop:
            drop.send("a crafted SYN to the consumed grant's target",
                      syn(net, net.addr("c1"), dst, 41002, 30011))
        expect_no_packet(at_server, TCP(dport=30011), timeout=0)


@pytest.mark.clause("AFC-03")
def test_allow_multiple_admits_until_cancel(net: Net, mode: str) -> None:
    """Sequential and concurrent connections pass until Cancel; open ones survive the Cancel."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api, s1.tcp_server(dst, 30021) as server:
        action = grant(net, api, (dst, 30021), flags=Flags.ALLOW_MULTIPLE)
        for i in range(3):
            assert_echoed(c1.tcp_connect(dst, 30021, send_bytes=1000), 1000, f"sequential connection {i}")
        held = [c1.tcp_open(dst, 30021) for _ in range(3)]
        try:
            assert all(c.connected for c in held), [c.error for c in held]
            for i, c in enumerate(held):
                assert_echoed(c.exchange(20_000), 20_000, f"concurrent connection {i}")
            assert action.state == "pending" and action.info()["admitted"] == 6
            assert_ran_in_mode(net, action)
            action.cancel()
            with dropped_silently(net, "c1") as drop:
                drop.tcp("a connection after Cancel", dst, 30021)
            for i, c in enumerate(held):
                assert_echoed(c.exchange(20_000), 20_000, f"concurrent connection {i}, after Cancel")
        finally:
            for c in held:
                c.close()
        assert server.stats()["accepted"] == 6


@pytest.mark.clause("AFC-04")
def test_timeout_expires_an_unused_permission(net: Net, mode: str) -> None:
    """With TIMEOUT (the lab's timeout is 2 s) an unused grant expires: a connection sent
    past its deadline, the API not asked since, is dropped silently; then the action is
    expired."""
    s1 = net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api, s1.tcp_server(dst, 30031) as server:
        action = grant(net, api, (dst, 30031), flags=Flags.TIMEOUT)
        wait_past_expiry(action)
        with dropped_silently(net, "c1") as drop:
            drop.tcp("a connection past the deadline", dst, 30031)
        assert action.state == "expired"
        assert server.stats()["accepted"] == 0


@pytest.mark.clause("AFC-04")
def test_admitted_flow_outlives_the_timeout(net: Net, mode: str) -> None:
    """A flow admitted by a TIMEOUT grant goes on past the grant's deadline: shown by a
    twin grant made with it, left unused, which has expired by then (whatever the
    firewall's timeout)."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api, s1.tcp_server(dst, 30032):
        action = grant(net, api, (dst, 30032), flags=Flags.TIMEOUT)
        twin = grant(net, api, (dst, 30033), flags=Flags.TIMEOUT)
        with c1.tcp_open(dst, 30032) as conn:
            assert conn.connected, conn.error
            wait_past_expiry(twin)  # (the flow is not the permission)
            assert twin.state == "expired", twin.state
            assert_echoed(conn.exchange(50_000), 50_000, "the flow admitted before the timeout")
            assert_ran_in_mode(net, action)


@pytest.mark.clause("AFC-05")
@pytest.mark.parametrize(("params", "message"), [
    ({"flags": ["TIMEOUT", "ALLOW_MULTIPLE"]}, "cannot be combined"),
    ({"flags": ["BIDIRECTIONAL"]}, "UDP only"),
    ({"flags": ["NO_SUCH_FLAG"]}, "unknown flag"),
    ({"flags": 0x400}, "unknown flag bits"),
    ({"flags": "TIMEOUT"}, "'flags' must be"),
    ({"address": "198.51.100.300"}, "not an IP address"),
    ({"address": ""}, "not an IP address"),
    ({"address": 7}, "must be an IP address string"),
    ({"port": 0}, "outside 1-65535"),
    ({"port": 65536}, "outside 1-65535"),
    ({"port": -1}, "'port' must be"),
    ({"port": "21"}, "'port' must be an integer"),
    ({"protocol": "sctp"}, "'protocol' must be"),
    ({"protocol_guid": "ftp"}, "is not a GUID"),
    ({"protocol_guid": "00000000-0000-0000-0000-000000000000"}, "no protocol is defined"),
    ({"proxy_external_address": "OTHER"}, "not one of the firewall's external addresses"),
    ({"address": "WRONG-FAMILY"}, "not of the client's address family"),
    ({"filter": 999}, "no filter 999"),
    ({"session": 0}, "'session' must be"),
    ({"unexpected": 1}, "unexpected parameters: unexpected"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v[k]}" for k in v))
def test_invalid_arguments_create_nothing(net: Net, params: dict[str, object], message: str) -> None:
    """E_INVALIDARG names the problem and no permission is created: none is listed, and
    (for a request whose target is s1's port) a SYN from c1 to that port, which such a
    grant would admit, reaches the fw and goes no further."""
    request: dict[str, object] = {
        "session": net.session("c1"), "address": net.addr("s1"), "port": 30041, "protocol": "tcp",
        "protocol_guid": GUIDS["FTP"]}
    request.update(params)
    if request["address"] == "WRONG-FAMILY":
        request["address"] = "198.51.100.21" if net.family == "ipv6" else "2001:db8:2::21"
    if request.get("proxy_external_address") == "OTHER":
        request["proxy_external_address"] = net.addr("c1")  # an address, but not an external one of ours
    before = pending_actions(net)
    with net.client() as api, refused(net, InvalidArgument, message):
        api.call("allow_future_connect", **request)
    assert pending_actions(net) == before
    if (request["address"], request["port"]) == (net.addr("s1"), 30041):
        assert_dropped_silently(net, [("c1", syn(net, net.addr("c1"), net.addr("s1"), probe_port(),
                                                 30041))])


@pytest.mark.clause("AFC-06")
def test_another_client_cannot_use_the_permission(net: Net, mode: str) -> None:
    """c1's grant admits nothing from c2; it stays pending and then admits c1."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api, s1.tcp_server(dst, 30051) as server:
        action = grant(net, api, (dst, 30051))
        with dropped_silently(net, "c2") as drop:
            drop.tcp("c2 on c1's grant", dst, 30051)
        assert action.state == "pending" and server.stats()["accepted"] == 0
        assert_echoed(c1.tcp_connect(dst, 30051, send_bytes=100), 100, "c1 on its own grant")
        assert_ran_in_mode(net, action)


@pytest.mark.clause("AFC-06")
def test_spoofed_client_source_on_the_external_side_is_dropped(net: Net) -> None:
    """A SYN claiming c1's address but arriving from the outside never passes the fw."""
    s2 = net.agent("s2")
    target = net.addr("s2")
    fw_mac = net.mac("fw", net.topology.fw_external_iface)
    with net.client() as api:
        action = grant(net, api, (target, 30052))
        frame = Ether(src=net.mac("s1"), dst=fw_mac) / syn(net, net.addr("c1"), target, 41003, 30052)
        with s2.sniff(net.iface("s2")) as at_s2:
            with dropped_silently(net, "s1") as drop:
                drop.send("a SYN from outside in c1's name", frame)
            # only a copy forwarded by the fw would carry the fw's MAC as its source
            expect_no_packet(at_s2, Ether(src=fw_mac) / TCP(dport=30052), timeout=0)
        assert action.state == "pending"


@pytest.mark.clause("AFC-08")
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-way", "bidirectional"])
def test_udp_is_one_way_unless_bidirectional(net: Net, mode: str, bidirectional: bool) -> None:
    """Without BIDIRECTIONAL the server's reply never reaches the client; with it, it does."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst, port = net.addr("s1"), 30061 + bidirectional
    flags = Flags.BIDIRECTIONAL if bidirectional else Flags(0)
    with net.client() as api, s1.udp_server(dst, port) as server:
        action = grant(net, api, (dst, port), protocol="udp", flags=flags)
        with c1.sniff(net.iface("c1")) as at_client:
            if bidirectional:
                answer = c1.udp_send(dst, port, b"datagram", expect_reply=True)
                assert answer["reply"] == b"datagram", answer
                expect_packet(at_client, UDP(sport=port))
            else:
                with dropped_silently(net, "s1") as drop:
                    answer = c1.udp_send(dst, port, b"datagram", expect_reply=True, timeout=NEGATIVE)
                    assert answer["reply"] is None, "a reply passed without BIDIRECTIONAL"
                    drop.sent("the server's reply", ip(net, dst, net.source_seen_by_server("c1"))
                              / UDP(sport=port))
                expect_no_packet(at_client, UDP(sport=port), timeout=0)
            assert server.stats()["digest"] == multiset_digest([b"datagram"]), \
                "the datagram did not arrive as sent"
        assert_ran_in_mode(net, action)


@pytest.mark.clause("AFC-08")
def test_crafted_udp_reply_without_bidirectional_is_dropped(net: Net) -> None:
    c1, s1 = net.agent("c1"), net.agent("s1")
    src, dst = net.addr("c1"), net.addr("s1")
    with net.client() as api:
        grant(net, api, (dst, 30063), protocol="udp")
        with s1.sniff(net.iface("s1")) as at_server, c1.sniff(net.iface("c1")) as at_client:
            c1.send(datagram(net, src, dst, 41004, 30063, b"request"))
            expect_packet(at_server, UDP(dport=30063))
            with dropped_silently(net, "s1") as drop:
                drop.send("a reply without BIDIRECTIONAL",
                          datagram(net, dst, net.source_seen_by_server("c1"), 30063, 41004, b"reply"))
            expect_no_packet(at_client, UDP(sport=30063), timeout=0)


@pytest.mark.clause("AFC-09")
def test_protocol_rules_deny_creates_nothing(net: Net) -> None:
    """c2 may not use HTTP: a grant on HTTP's behalf is FWX_E_POLICY_RULES_DENIED."""
    with net.client() as api:
        before = pending_actions(net, "c2")
        with refused(net, PolicyRulesDenied, r"no protocol rule lets .* use HTTP"):
            api.allow_future_connect(net.session("c2"), (net.addr("s1"), 30071),
                                     protocol_guid=GUIDS["HTTP"])
        with pytest.raises(PolicyRulesDenied):
            api.allow_future_connect(net.session("c2"), (net.addr("s1"), 30071),
                                     protocol_guid=GUIDS["SSH"])
        assert pending_actions(net, "c2") == before
        with dropped_silently(net, "c2") as drop:
            drop.tcp("a connection after a denied grant", net.addr("s1"), 30071)


@pytest.mark.clause("AFC-10")
def test_site_rules_deny_creates_nothing(net: Net) -> None:
    """The denied network: FWX_E_NETWORK_RULES_DENIED, and no flow passes."""
    denied = net.addr("s2", 1)
    with net.client() as api, net.agent("s2").tcp_server(denied, 30081) as server:
        before = pending_actions(net)
        with refused(net, NetworkRulesDenied, "site rule 'the denied lab network'"):
            grant(net, api, (denied, 30081))
        assert pending_actions(net) == before
        with dropped_silently(net, "c1") as drop:
            drop.tcp("a connection to the denied network", denied, 30081)
        assert server.stats()["accepted"] == 0


@pytest.mark.clause("AFC-11")
def test_cancel_semantics(net: Net, mode: str) -> None:
    """Cancel stops new matches only; cancelling what is not pending (cancelled, consumed,
    expired: its deadline shown by a dropped connection first) is FWX_E_TERMINATING."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api, s1.tcp_server(dst, 30091), s1.tcp_server(dst, 30092), \
            s1.tcp_server(dst, 30093):
        multiple = grant(net, api, (dst, 30091), flags=Flags.ALLOW_MULTIPLE)
        with c1.tcp_open(dst, 30091) as admitted:
            assert admitted.connected, admitted.error
            multiple.cancel()
            assert multiple.state == "cancelled"
            with dropped_silently(net, "c1") as drop:
                drop.tcp("a connection after Cancel", dst, 30091)
            assert_echoed(admitted.exchange(10_000), 10_000, "the flow admitted before Cancel")
        assert_ran_in_mode(net, multiple)
        with refused(net, Terminating, "cancelled"):
            multiple.cancel()

        consumed = grant(net, api, (dst, 30092))
        assert_echoed(c1.tcp_connect(dst, 30092, send_bytes=10), 10, "the single-use grant's connection")
        with refused(net, Terminating, "consumed"):
            consumed.cancel()

        expired = grant(net, api, (dst, 30093), flags=Flags.TIMEOUT)
        wait_past_expiry(expired)  # the deadline is shown by a packet, before the API is asked
        with dropped_silently(net, "c1") as drop:
            drop.tcp("a connection past the deadline", dst, 30093)
        with refused(net, Terminating, "expired"):
            expired.cancel()
        with refused(net, InvalidArgument, "no action"):
            api.call("cancel", action=10**9)


@pytest.mark.clause("AFC-12")
def test_identical_grants_are_independent(net: Net, mode: str) -> None:
    """Two identical grants admit two flows; cancelling one leaves the other."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api, s1.tcp_server(dst, 30101) as server:
        first, second = grant(net, api, (dst, 30101)), grant(net, api, (dst, 30101))
        assert first.id != second.id
        for twin in ("first", "second"):
            assert_echoed(c1.tcp_connect(dst, 30101, send_bytes=10), 10, f"the {twin} twin's connection")
        with dropped_silently(net, "c1") as drop:
            drop.tcp("a third connection", dst, 30101)
        assert (first.state, second.state) == ("consumed", "consumed")
        assert server.stats()["accepted"] == 2
        assert_ran_in_mode(net, first)

        kept, cancelled = grant(net, api, (dst, 30101)), grant(net, api, (dst, 30101))
        cancelled.cancel()
        assert_echoed(c1.tcp_connect(dst, 30101, send_bytes=10), 10, "the kept twin's connection")
        assert kept.state == "consumed" and cancelled.state == "cancelled"
        with dropped_silently(net, "c1") as drop:
            drop.tcp("a connection under the cancelled twin", dst, 30101)


@pytest.mark.clause("AFC-13")
def test_established_connection_event_goes_to_its_filter_only(net: Net, mode: str) -> None:
    """Exactly one event per admitted flow, with the caller's context, to the caller's filter."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as mine, net.client() as other, s1.tcp_server(dst, 30111):
        my_filter = mine.register_filter("ftp-test")
        other.register_filter("bystander")
        context = {"token": "afc-13", "n": [1, 2]}
        action = grant(net, mine, (dst, 30111), flags=Flags.ALLOW_MULTIPLE, session_filter=my_filter,
                       context=context)
        grant(net, mine, (dst, 30112))  # no filter: no event for anyone
        results = [c1.tcp_connect(dst, 30111, send_bytes=10) for _ in range(2)]
        for i, result in enumerate(results):
            assert_echoed(result, 10, f"connection {i} under the filter's grant")
        locals_ = [result["local"] for result in results]
        with s1.tcp_server(dst, 30112):
            assert_echoed(c1.tcp_connect(dst, 30112, send_bytes=10), 10, "the connection with no filter")
        events = [mine.next_event(timeouts.POSITIVE) for _ in range(2)]
        assert all(e is not None for e in events), events
        for event, local in zip(events, locals_, strict=True):
            assert event is not None
            assert event["event"] == "established_connection" and event["filter"] == my_filter
            assert event["context"] == context
            assert event["client"] == [net.addr("c1"), local[1]]
            assert event["target"] == [dst, 30111] and event["protocol"] == "tcp"
            assert event["external"] == (net.fw_external(0) if net.nat else None)
        assert mine.next_event(NEGATIVE) is None, "more events than admitted flows"
        assert other.next_event(NEGATIVE) is None, "another filter got the event"
        assert_ran_in_mode(net, action)


@pytest.mark.clause("AFC-14")
@pytest.mark.parametrize("requested", [None, 0, 1], ids=["default", "first", "second"])
def test_proxy_external_address(net: Net, mode: str, requested: int | None) -> None:
    """In NAT the flow leaves from the requested external address (default: the primary's)."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst, port = net.addr("s1"), 30121 + (requested if requested is not None else 2)
    proxy = None if requested is None else net.fw_external(requested)
    with net.client() as api, s1.tcp_server(dst, port) as server:
        action = grant(net, api, (dst, port), proxy_external_address=proxy)
        assert_echoed(c1.tcp_connect(dst, port, send_bytes=1000), 1000, "the granted connection")
        seen = server.stats()["peers"][0][0]
        assert_ran_in_mode(net, action)
    if net.nat:
        assert seen == (proxy or net.fw_external(0)), f"left from {seen}"
    else:
        assert seen == net.addr("c1"), "routed: no translation"


@pytest.mark.clause("AFC-16")
def test_session_end_cancels_pending_permissions(net: Net, mode: str) -> None:
    """Ending the session cancels its pending grants, a redirect's too (one that served a
    connection before: after the end, its port leads nowhere); flows it admitted keep
    working."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    user_mode = Flags.NO_KERNEL_MODE if mode == "user" else Flags(0)
    with net.client() as api, s1.tcp_server(dst, 30131), s1.tcp_server(dst, 30132):
        admitting = grant(net, api, (dst, 30131))
        pending = grant(net, api, (dst, 30132), flags=Flags.ALLOW_MULTIPLE)
        (internal, port), (redirecting,) = api.redirect_connections(
            net.session("c1"), [(dst, 30132)], protocol_guid=FTP_GUID,
            flags=Flags.ALLOW_MULTIPLE | user_mode)
        assert_echoed(c1.tcp_connect(internal, port, send_bytes=1000), 1000,
                      "a connection by the redirect before the session's end")
        with c1.tcp_open(dst, 30131) as admitted:
            assert admitted.connected, admitted.error
            session = net.session("c1")
            ended = api.call("end_session", session=session)
            assert sorted(ended["cancelled"]) == sorted([pending.id, redirecting.id])
            assert pending.state == redirecting.state == "cancelled" and admitting.state == "consumed"
            with dropped_silently(net, "c1") as drop:
                drop.tcp("a connection after the session's end", dst, 30132)
                drop.tcp("a connection by the redirect after the session's end", internal, port)
            assert_echoed(admitted.exchange(10_000), 10_000, "the flow the ended session admitted")
            assert_ran_in_mode(net, admitting)
        with refused(net, InvalidArgument, "no session"):
            api.call("end_session", session=session)
        assert session not in [s["id"] for s in net.call("sessions")]


@pytest.mark.clause("AFC-16")
def test_a_firewall_client_s_session_ends_with_its_last_socks_connection(net: Net, mode: str) -> None:
    """alice's session lives while she has a SOCKS connection: closing one of two leaves
    her pending grant pending; closing the last ends the session and cancels it (c1's own
    connection, which it admitted before, is dropped after), while a flow it admitted
    (c1's own, under an ADDRESS_BASED grant) goes on. A new connection of hers is a new
    session, without the grant."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    user_mode = Flags.NO_KERNEL_MODE if mode == "user" else Flags(0)
    with net.client() as api, s1.tcp_server(dst, 21), s1.tcp_server(dst, 30161), \
            s1.tcp_server(dst, 30162) as pending_port:
        first = socks_open(net, "c1", "alice", "connect", dst, 21)
        second = socks_open(net, "c1", "alice", "connect", dst, 21)
        assert first.reply["code"] == second.reply["code"] == 0, (first.reply, second.reply)
        session = fw_session(net, "c1", "alice")
        admitting = api.allow_future_connect(session, (dst, 30161), protocol_guid=FTP_GUID,
                                             flags=Flags.ADDRESS_BASED | user_mode)
        # ADDRESS_BASED: c1's own connection may use it, and shows it used while it stands
        pending = api.allow_future_connect(session, (dst, 30162), protocol_guid=FTP_GUID,
                                           flags=Flags.ALLOW_MULTIPLE | Flags.ADDRESS_BASED | user_mode)
        assert_echoed(c1.tcp_connect(dst, 30162, send_bytes=1000), 1000, "c1's use of the grant")
        with c1.tcp_open(dst, 30161) as admitted:
            assert admitted.connected, admitted.error
            assert admitting.state == "consumed"
            first.close()
            time.sleep(0.2)
            assert pending.state == "pending", "the session ended with a connection still open"
            assert_echoed(second.exchange(1000), 1000, "alice's other SOCKS connection")
            second.close()
            wait_for_state(pending, "cancelled", within=timeouts.POSITIVE)
            assert session not in [s["id"] for s in net.call("sessions")]
            assert_echoed(admitted.exchange(10_000), 10_000, "the flow the ended session admitted")
            assert_ran_in_mode(net, admitting)
        with socks_open(net, "c1", "alice", "connect", dst, 30162) as again:
            assert again.reply is not None and again.reply["code"] == 2, again.reply
        with dropped_silently(net, "c1") as drop:
            drop.tcp("a connection after the session ended", dst, 30162)
        assert pending_port.stats()["accepted"] == 1  # the one before


# How long a SecureNAT session may stay idle before it ends (SPEC rule 16), in the check
# of a session's natural end
IDLE_SESSION = 2.0


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.clause("AFC-16")
def test_an_idle_securenat_session_ends_by_itself_and_cancels_its_pending_grants(net: Net) -> None:
    """c1's SecureNAT session, idle for the configured time, ends by itself (rule 16), and
    its end cancels its pending grants (rule 4): then a SYN to the target of a single-use
    grant it never used, and one to that of an ALLOW_MULTIPLE | ADDRESS_BASED grant (which
    a flow of c1's address may use with no session) that admitted c1 before, reach the fw
    and go no further, unanswered; the flow admitted before goes on. Kernel mode only: a
    user-mode flow keeps its session in use until conntrack forgets it, minutes after it
    closes."""
    net.enforcer.restart(limits={"session_idle_timeout": IDLE_SESSION})
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api, s1.tcp_server(dst, 30181) as unused, \
            s1.tcp_server(dst, 30182) as used:
        session = net.session("c1")
        grant(net, api, (dst, unused.port))
        grant(net, api, (dst, used.port), flags=Flags.ALLOW_MULTIPLE | Flags.ADDRESS_BASED)
        with c1.tcp_open(dst, used.port) as admitted:
            assert admitted.connected, admitted.error
            deadline = time.monotonic() + IDLE_SESSION + 1 + timeouts.POSITIVE  # the timer ticks each second
            while session in [s["id"] for s in net.call("sessions")]:
                assert time.monotonic() < deadline, \
                    f"c1's session {session}, idle for {IDLE_SESSION:g} s, did not end"
                time.sleep(0.1)
            assert_dropped_silently(net, [("c1", syn(net, net.addr("c1"), dst, probe_port(), port))
                                          for port in (unused.port, used.port)])
            assert_echoed(admitted.exchange(10_000), 10_000, "the flow the ended session had admitted")
        assert unused.stats()["accepted"] == 0 and used.stats()["accepted"] == 1


@pytest.mark.clause("AFC-07")
@pytest.mark.parametrize("address_based", [False, True], ids=["session", "address-based"])
def test_another_firewall_client_session_uses_a_udp_grant_only_with_address_based(
        net: Net, address_based: bool) -> None:
    """A BIDIRECTIONAL UDP grant to alice's session: bob's UDP ASSOCIATE on the same
    client IP gets its datagram through (and the reply back) only with ADDRESS_BASED;
    alice's own does either way."""
    s1 = net.agent("s1")
    dst, port = net.addr("s1"), 30171 + address_based
    anywhere = "0.0.0.0" if net.family == "ipv4" else "::"
    with net.client() as api, s1.tcp_server(dst, 21), s1.udp_server(dst, port) as server, \
            socks_open(net, "c1", "alice", "connect", dst, 21) as control:
        assert control.reply is not None and control.reply["code"] == 0, control.reply
        flags = Flags.ALLOW_MULTIPLE | Flags.BIDIRECTIONAL
        if address_based:
            flags |= Flags.ADDRESS_BASED
        api.allow_future_connect(fw_session(net, "c1", "alice"), (dst, port), protocol="udp",
                                 protocol_guid=FTP_GUID, flags=flags)
        with socks_open(net, "c1", "bob", "udp", anywhere, 0) as bob:
            got = bob.udp(dst, port, b"bob's", expect_reply=True,
                          timeout=None if address_based else NEGATIVE)
            assert (got["reply"] == b"bob's") is address_based, got
        with socks_open(net, "c1", "alice", "udp", anywhere, 0) as alice:
            assert alice.udp(dst, port, b"alice's", expect_reply=True)["reply"] == b"alice's"
        arrived = [b"alice's", b"bob's"] if address_based else [b"alice's"]
        assert server.stats()["digest"] == multiset_digest(arrived), \
            f"the datagrams that reached s1 are not {arrived}"


@pytest.mark.clause("AFC-05")
def test_the_daemon_keeps_serving_after_bad_session_api_input(net: Net) -> None:
    """Wrong types, huge arrays and truncated JSON get error replies; the daemon goes on."""
    with net.client() as api:
        for raw in (b'{"id": 1, "method": "allow_future_connect", "params": {"flags": ['
                    + b'"TIMEOUT", ' * 2000 + b'"TIMEOUT"]}}\n',
                    b'{"id": 2, "method": "allow_future_connect", "params": {"session": "one"}}\n',
                    b'{"id": 3, "method": "cancel", "params": {"action": [1]}}\n',
                    b'{"id": 4, "method": "allow_future_connect", "params": {"sess\n'):
            reply = api.raw(raw)
            assert reply["error"]["name"] == "E_INVALIDARG", reply
        assert api.call("ping") == {"pong": True}
    with net.client() as api:
        try:
            reply = api.raw(b'{"id": 5, "method": "actions", "params": {"x": "' + b"y" * 70_000 + b'"}}\n')
            assert "request too large" in reply["error"]["message"], reply
        except ControlError:
            pass  # the daemon may close the connection before the sender is done
    assert net.call("ping") == {"pong": True}


def conntrack_packets(net: Net, port: int) -> tuple[int, int]:
    """(original, reply) packets the kernel counted for the flow to ``port``."""
    listing = net.lab.tb.run("fw", ["conntrack", "-L", "-f", net.family, "-p", "tcp",
                                    "--orig-port-dst", str(port)], check=False).stdout
    counts = [int(n) for n in re.findall(r"packets=(\d+)", listing)]
    assert len(counts) == 2, f"expected one conntrack entry with accounting:\n{listing}"
    return counts[0], counts[1]


@pytest.mark.clause("AFC-15")
def test_user_mode_sees_every_packet_and_kernel_mode_only_the_first(net: Net, mode: str) -> None:
    """A 1 MB echo: in user mode the enforcer sees every packet (all the bytes, each way);
    in kernel mode only the admitting SYN, while the kernel carries the rest."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst, port = net.addr("s1"), 30141 if net.family == "ipv4" else 30142
    net.lab.tb.run("fw", ["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"])
    net.lab.tb.run("fw", ["conntrack", "-D", "-p", "tcp", "--orig-port-dst", str(port)], check=False)
    with net.client() as api, s1.tcp_server(dst, port):
        action = grant(net, api, (dst, port))
        result = c1.tcp_connect(dst, port, send_bytes=1_000_000, timeout=10)
        assert_echoed(result, 1_000_000, "the granted connection")
    if not net.own_enforcer:
        raise Unsupported("counting the packets of a flow the firewall saw")
    (flow,) = assert_ran_in_mode(net, action)
    original, reply = conntrack_packets(net, port)
    # even as 64 KiB GSO/GRO super-packets, 1 MB takes at least 16 each way
    assert original >= 16 and reply >= 16, (original, reply)
    seen = (flow["packets_out"], flow["packets_back"])
    if mode == "user":
        # The kernel counts GRO'd super-packets as one, the enforcer the segments it
        # was queued: it sees at least as many, and every byte each way.
        assert seen[0] >= original and seen[1] >= reply, \
            f"the enforcer saw {seen} packets, the kernel counted {(original, reply)}"
        assert flow["bytes_out"] > 1_000_000 and flow["bytes_back"] > 1_000_000, flow
    else:
        assert seen == (1, 0), f"kernel mode: the enforcer should see the SYN only, saw {seen}"


@pytest.mark.clause("AFC-02")
def test_a_single_use_grant_admits_one_of_two_first_packets_sent_together(net: Net, mode: str) -> None:
    """Two SYNs from two ports of c1, sent together to a single-use TCP grant, and two
    first datagrams to a single-use UDP grant: one of each reaches s1 (whichever the fw
    decides first; the SYN is answered, the datagram's grant is one way); both reached
    the fw, and nothing answers the other (no reset, no reply, no ICMP). Single use holds
    however close together the first packets come."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    src, dst = net.addr("c1"), net.addr("s1")
    probes = {30015: [syn(net, src, dst, probe_port(), 30015) for _ in range(2)],
              30016: [datagram(net, src, dst, probe_port(), 30016, b"first") for _ in range(2)]}
    since = time.time()
    with net.client() as api, s1.tcp_server(dst, 30015), s1.udp_server(dst, 30016), \
            s1.sniff(net.iface("s1"), bpf="dst port 30015 or dst port 30016") as at_server, \
            c1.sniff(net.iface("c1")) as at_client:
        actions = [grant(net, api, (dst, 30015)), grant(net, api, (dst, 30016), protocol="udp")]
        c1.send([probe for sent in probes.values() for probe in sent])
        layers: dict[int, type[Packet]] = {30015: TCP, 30016: UDP}
        for port, layer in layers.items():
            expect_packet(at_server, layer(dport=port))
        time.sleep(NEGATIVE)  # the other, had it passed, would be there by now
        for port, sent in probes.items():
            layer = layers[port]
            sports = {int(p[layer].sport) for p in sent}
            reached = {int(p[layer].sport) for p in at_server.packets()
                       if layer in p and int(p[layer].dport) == port}
            assert len(reached) == 1, f"{len(reached)} of the 2 first packets to {port} reached s1"
            at_fw = {int(p[layer].sport) for p in net.fw_received(net.topology.fw_internal_iface,
                                                                   since).packets()
                     if layer in p and int(p[layer].dport) == port}
            assert at_fw == sports, f"to {port}: the fw got {sorted(at_fw)} of {sorted(sports)}"
            answered = {int(p[layer].dport) for p in at_client.packets()
                        if layer in p and int(p[layer].sport) == port}
            # TCP: the SYN that passed is answered; UDP: neither (the grant is one way)
            assert len(answered) == (layer is TCP) and answered <= sports, \
                f"to {port}: answered {answered}"
            unanswered = [p for p in sent if int(p[layer].sport) not in answered]
            expect_no_packet(at_client, answers_to([(p, since) for p in unanswered]), timeout=0)
        assert [a.state for a in actions] == ["consumed", "consumed"]
