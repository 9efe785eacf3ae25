"""RDC: RedirectConnections, end to end: kernel NAT in kernel mode, the enforcer's own
rewriting in user mode, and the same result from both."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPerror6, IPv6
from scapy.packet import Packet

from testbed import timeouts
from testbed.agent import multiset_digest
from testbed.checks import expect_packet
from testbed.clauses.helpers import (
    FTP_GUID,
    NEGATIVE,
    assert_echoed,
    assert_ran_in_mode,
    checksums_ok,
    datagram,
    dropped_silently,
    ip,
    pending_actions,
    probe_port,
    refused,
    syn,
    wait_past_expiry,
    wait_until,
)
from testbed.drivers import MODES
from testbed.lab import ENFORCER_MAPS_TABLE, GUIDS
from testbed.plugin import Net
from testbed.session_api import (
    Action,
    Flags,
    InvalidArgument,
    IsBusy,
    NetworkRulesDenied,
    PolicyRulesDenied,
    SessionCalls,
    Terminating,
)


def redirect(net: Net, api: SessionCalls, targets: list[tuple[str, int]], *, session_of: str = "c1",
             protocol: str = "tcp", flags: Flags | None = None, mode: str | None = None,
             **kwargs: Any) -> tuple[tuple[str, int], list[Action]]:
    """RedirectConnections for ``session_of``'s session on behalf of FTP; in user mode
    (the test's, or ``mode``) with NO_KERNEL_MODE."""
    flags = flags or Flags(0)
    if (mode or net.mode) == "user":
        flags |= Flags.NO_KERNEL_MODE
    return api.redirect_connections(net.session(session_of), targets, protocol_guid=FTP_GUID,
                                    protocol=protocol, flags=flags, **kwargs)


def redirect_ports_in_use(net: Net) -> dict[str, int]:
    return {mode: pool["in_use"] for mode, pool in net.call("status")["redirect_ports"].items()}


def kernel_redirect_rules(net: Net) -> list[str]:
    """The kernel-mode redirects' map elements of the family ("client . internal . proto .
    port : ..."), as nft lists them."""
    proto = "ip" if net.family == "ipv4" else "ip6"
    out = []
    for name in (f"redirect_mark_{proto}", f"redirect_to_{proto}"):
        listing = net.lab.tb.run("fw", ["nft", "list", "map", "inet", ENFORCER_MAPS_TABLE, name]).stdout
        out += [e.strip(" ,{}") for line in listing.splitlines() if " : " in line
                for e in line.split("elements =")[-1].split(",") if " : " in e]
    return sorted(out)


@pytest.mark.clause("RDC-01")
def test_a_redirected_connection_whose_syn_ack_is_lost_after_the_fw_opens(net: Net,
                                                                           mode: str) -> None:
    """The target's first SYN-ACK is lost between the fw and c1 (iptables in c1 drops it,
    and counts it), and s1 does not send it again on its own (tcp_synack_retries 0): c1
    sends its SYN again, which the single-use redirect's flow must take as its own, and
    the connection opens and carries data both ways."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    tool = "iptables" if net.family == "ipv4" else "ip6tables"
    retries = "net.ipv4.tcp_synack_retries"  # (IPv6's too)
    with net.client() as api, s1.tcp_server(dst, 31011):
        (internal, port), (action,) = redirect(net, api, [(dst, 31011)])
        first_syn_ack = ["INPUT", "-p", "tcp", "--sport", str(port), "--tcp-flags", "SYN,ACK",
                         "SYN,ACK", "-m", "statistic", "--mode", "nth", "--every", "1000000",
                         "--packet", "0", "-j", "DROP"]
        was = net.lab.tb.run("s1", ["sysctl", "-n", retries]).stdout.strip()
        net.lab.tb.run("s1", ["sysctl", "-qw", f"{retries}=0"])
        net.lab.tb.run("c1", [tool, "-w", "-I", *first_syn_ack])
        try:
            result = c1.tcp_connect(internal, port, send_bytes=20_000)
            listed = net.lab.tb.run("c1", [tool, "-w", "-L", "INPUT", "-v", "-x", "-n"]).stdout
        finally:
            net.lab.tb.run("c1", [tool, "-w", "-D", *first_syn_ack], check=False)
            net.lab.tb.run("s1", ["sysctl", "-qw", f"{retries}={was}"], check=False)
        assert [line.split()[0] for line in listed.splitlines() if "statistic" in line] == ["1"], \
            f"c1 did not lose the first SYN-ACK:\n{listed}"
        assert_echoed(result, 20_000, "the connection whose first SYN-ACK was lost")
        assert action.state == "consumed"
        assert_ran_in_mode(net, action)


@pytest.mark.clause("RDC-01")
def test_internal_address_leads_to_the_first_connect_address(net: Net, mode: str) -> None:
    """InternalAddress is the fw's address facing the client; a connection to it reaches
    ConnectAddresses[0] and carries 200 kB each way; a direct connection to the target
    cannot use the redirect."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api, s1.tcp_server(dst, 31001) as server:
        (internal, port), (action,) = redirect(net, api, [(dst, 31001)])
        assert internal == net.fw_internal()
        with dropped_silently(net, "c1") as drop:
            drop.tcp("a connection direct to the target", dst, 31001)
        assert action.state == "pending"
        result = c1.tcp_connect(internal, port, send_bytes=200_000)
        assert_echoed(result, 200_000, "the redirected connection")
        assert [p[0] for p in server.stats()["peers"]] == [net.fw_external(0)]
        assert action.state == "consumed"
        listed = assert_ran_in_mode(net, action)
        if net.own_enforcer:  # its port ranges, and the flow it holds
            low, high = net.call("status")["redirect_ports"][mode]["range"]
            assert low <= port <= high, f"{mode}-mode redirect port {port} is outside {low}-{high}"
            (flow,) = listed
            assert flow["redirect"] == [internal, port], flow
    # a crafted SYN arrives at the target from the fw, its checksum valid
    with net.client() as api:
        (internal, port), _ = redirect(net, api, [(dst, 31002)])
        with s1.sniff(net.iface("s1")) as at_server:
            c1.send(syn(net, net.addr("c1"), internal, 41101, port))
            got = expect_packet(at_server, ip(net, net.fw_external(0), dst) / TCP(dport=31002, flags="S"))
        assert checksums_ok(got), got.show(dump=True)


@pytest.mark.clause("RDC-02")
def test_n_addresses_get_consecutive_ports_each_cancellable_alone(net: Net, mode: str) -> None:
    """Three addresses: ports base..base+2, action i leads to address i; cancelling one
    leaves the others; the block returns to the pool when all three are done."""
    c1, s1, s2 = net.agent("c1"), net.agent("s1"), net.agent("s2")
    targets = [(net.addr("s1"), 31021), (net.addr("s1"), 31022), (net.addr("s2"), 31023)]
    before = redirect_ports_in_use(net) if net.own_enforcer else None
    with net.client() as api, s1.tcp_server(*targets[0]) as first, \
            s1.tcp_server(*targets[1]) as second, s2.tcp_server(*targets[2]) as third:
        (internal, base), actions = redirect(net, api, targets)
        assert len(actions) == 3 and len({a.id for a in actions}) == 3
        for i, (action, target) in enumerate(zip(actions, targets, strict=True)):
            info = action.info()["redirect"]
            assert info["internal"] == [internal, base + i] and info["target"] == list(target), info
        if before is not None:
            assert redirect_ports_in_use(net)[mode] == before[mode] + 3
        # The middle one cancelled: the others still lead each to its own address, which
        # each connection's server shows as it is made (totals would not tell a swap).
        actions[1].cancel()
        with dropped_silently(net, "c1") as drop:
            drop.tcp("a connection to the cancelled port", internal, base + 1)
        servers = (first, second, third)
        accepted = [0, 0, 0]
        for i in (2, 0):
            assert_echoed(c1.tcp_connect(internal, base + i, send_bytes=1000), 1000,
                          f"the connection to redirect port {i}")
            accepted[i] = 1
            assert [s.stats()["accepted"] for s in servers] == accepted, \
                f"redirect port {i} (base + {i}) did not lead to address {i}, {targets[i]}"
        assert [a.state for a in actions] == ["consumed", "cancelled", "consumed"]
        for action in (actions[0], actions[2]):
            assert_ran_in_mode(net, action)
    if before is None:
        return
    assert redirect_ports_in_use(net) == before, "the block did not return to its pool"
    if mode == "kernel":
        assert not [e for e in kernel_redirect_rules(net) if f" . {base} : " in e], \
            "a finished redirect's map elements stayed"


@pytest.mark.clause("RDC-03")
@pytest.mark.parametrize("requested", [None, 0, 1], ids=["default", "first", "second"])
def test_proxy_external_address(net: Net, mode: str, requested: int | None) -> None:
    """The redirected flow leaves from the requested external address (default: the one
    the session's primary connections leave from)."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst, port = net.addr("s1"), 31031 + (2 if requested is None else requested)
    proxy = None if requested is None else net.fw_external(requested)
    with net.client() as api, s1.tcp_server(dst, port) as server:
        (internal, base), (action,) = redirect(net, api, [(dst, port)], proxy_external_address=proxy)
        assert_echoed(c1.tcp_connect(internal, base, send_bytes=1000), 1000, "the redirected connection")
        seen = server.stats()["peers"][0][0]
        assert_ran_in_mode(net, action)
    assert seen == (proxy or net.fw_external(0)), f"left from {seen}"


@pytest.mark.clause("RDC-04")
def test_single_use_and_allow_multiple(net: Net, mode: str) -> None:
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api, s1.tcp_server(dst, 31041) as server:
        (internal, base), (single,) = redirect(net, api, [(dst, 31041)])
        assert_echoed(c1.tcp_connect(internal, base, send_bytes=100), 100, "the single-use connection")
        assert single.state == "consumed"
        assert_ran_in_mode(net, single)
        with dropped_silently(net, "c1") as drop:
            drop.tcp("the second connection", internal, base)
        (internal, base), (multiple,) = redirect(net, api, [(dst, 31041)], flags=Flags.ALLOW_MULTIPLE)
        held = c1.tcp_open(internal, base)
        try:
            assert held.connected, held.error
            for i in range(2):
                assert_echoed(c1.tcp_connect(internal, base, send_bytes=100), 100,
                              f"sequential connection {i} to the ALLOW_MULTIPLE redirect")
            assert multiple.info()["admitted"] == 3
            multiple.cancel()
            with dropped_silently(net, "c1") as drop:
                drop.tcp("a connection after Cancel", internal, base)
            assert_echoed(held.exchange(20_000), 20_000, "the flow admitted before Cancel")
            assert_ran_in_mode(net, multiple)
        finally:
            held.close()
        with refused(net, Terminating, "cancelled"):
            multiple.cancel()
        assert server.stats()["accepted"] == 4


@pytest.mark.clause("RDC-04")
def test_a_client_port_whose_connection_by_the_redirect_closed_connects_again(net: Net,
                                                                            mode: str) -> None:
    """By an ALLOW_MULTIPLE redirect (a published server), c1 connects, exchanges and resets
    its connection, then connects again from the same port at once (its stack keeps no
    TIME_WAIT after a reset; a client that closes second keeps none either): the closed
    connection is no live flow, so the new one is admitted and its exchange comes back
    whole, twice over. (The enforcer held the reset connection's flow and dropped such a
    SYN as another flow's until conntrack would forget it: curl waited 8 s in CI.)"""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst, sport = net.addr("s1"), probe_port()
    with net.client() as api, s1.tcp_server(dst, 31043) as server:
        (internal, base), (multiple,) = redirect(net, api, [(dst, 31043)], flags=Flags.ALLOW_MULTIPLE)
        for i in range(3):
            result = c1.tcp_connect(internal, base, send_bytes=1000, source_port=sport, reset=True)
            assert result["local"][1] == sport, result
            assert_echoed(result, 1000, f"connection {i} from port {sport}")
        assert multiple.info()["admitted"] == 3 and server.stats()["accepted"] == 3
        assert_ran_in_mode(net, multiple)


@pytest.mark.clause("RDC-04")
def test_timeout_and_the_invalid_combination(net: Net, mode: str) -> None:
    """Two TIMEOUT redirects made together: the unused one expires (a connection sent past
    its deadline, the API not asked since, is dropped silently; then it is expired); the
    flow the other admitted outlives the timeout. TIMEOUT|ALLOW_MULTIPLE is E_INVALIDARG
    and creates nothing."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api, s1.tcp_server(dst, 31042) as server:
        (internal, unused_port), (unused,) = redirect(net, api, [(dst, 31042)], flags=Flags.TIMEOUT)
        (internal, used_port), (used,) = redirect(net, api, [(dst, 31042)], flags=Flags.TIMEOUT)
        with c1.tcp_open(internal, used_port) as admitted:
            assert admitted.connected, admitted.error
            wait_past_expiry(unused)
            with dropped_silently(net, "c1") as drop:
                drop.tcp("a connection past the deadline", internal, unused_port)
            assert unused.state == "expired"
            assert_echoed(admitted.exchange(20_000), 20_000, "the flow admitted before the expiry")
            assert_ran_in_mode(net, used)
        before, pools = pending_actions(net), redirect_ports_in_use(net)
        with refused(net, InvalidArgument, "cannot be combined"):
            redirect(net, api, [(dst, 31042)], flags=Flags.TIMEOUT | Flags.ALLOW_MULTIPLE)
        assert pending_actions(net) == before and redirect_ports_in_use(net) == pools
        assert server.stats()["accepted"] == 1


@pytest.mark.clause("RDC-05")
def test_udp_redirect_replies_come_from_the_internal_address(net: Net, mode: str) -> None:
    """Datagrams reach the target; its replies reach the client from InternalAddress
    (the client's connected socket accepts nothing else), checksums valid."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as api, s1.udp_server(dst, 31051) as server:
        (internal, base), (action,) = redirect(net, api, [(dst, 31051)], protocol="udp")
        with c1.sniff(net.iface("c1")) as at_client:
            answer = c1.udp_send(internal, base, b"redirected datagram", expect_reply=True)
            assert answer["reply"] == b"redirected datagram", answer
            reply = expect_packet(at_client, UDP(sport=base, dport=answer["local"][1]))
        assert reply[UDP].underlayer.src == internal, reply.summary()
        assert checksums_ok(reply), reply.show(dump=True)
        assert server.stats()["peers"][0][0] == net.fw_external(0)
        assert server.stats()["digest"] == multiset_digest([b"redirected datagram"]), \
            "the datagram did not reach the target as sent"
        assert action.state == "consumed"
        assert_ran_in_mode(net, action)
        # a new flow (another client port) to the consumed single-use port gets nowhere
        with dropped_silently(net, "c1") as drop:
            drop.udp("a second flow to the single-use redirect", internal, base, b"again")
        assert server.stats()["accepted"] == 1, "a second flow used a single-use redirect"


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.clause("RDC-05")
def test_a_udp_redirect_port_goes_to_no_client_whose_flow_through_it_lives(net: Net,
                                                                          mode: str) -> None:
    """A client's UDP flow by a redirect outlives its single-use action: the kernel (or the
    enforcer) knows the flow by its addresses and ports alone, so the same client's
    datagrams from that port to that redirect port go on down it, to the earlier target.
    With one port per pool: while c1's flow lives, c1's next UDP redirect is refused
    (FWX_E_IS_BUSY) and creates nothing, and c1's datagrams still reach the first target
    alone; another client, whose flows are its own, gets the port, and its datagram
    reaches its own target."""
    net.enforcer.restart(dataplane={"kernel_redirect_ports": [61000, 61000],
                                    "user_redirect_ports": [63000, 63000]})
    c1, c2, s1 = net.agent("c1"), net.agent("c2"), net.agent("s1")
    dst, sport = net.addr("s1"), probe_port()
    with net.client() as api, s1.udp_server(dst, 31071, echo=False) as first, \
            s1.udp_server(dst, 31072, echo=False) as second:
        (internal, base), (action,) = redirect(net, api, [(dst, 31071)], protocol="udp")
        c1.send(datagram(net, net.addr("c1"), internal, sport, base, b"by the first redirect"))
        wait_until(lambda: first.stats()["accepted"] == 1, "the first target to hear c1")
        assert action.state == "consumed"
        before = pending_actions(net)
        with refused(net, IsBusy, f"1 held by {net.addr('c1')}'s UDP flows of earlier redirects"):
            redirect(net, api, [(dst, 31072)], protocol="udp")
        assert pending_actions(net) == before
        (internal2, base2), (other,) = redirect(net, api, [(dst, 31072)], protocol="udp",
                                                session_of="c2")
        assert (internal2, base2) == (internal, base)
        c2.send(datagram(net, net.addr("c2"), internal, sport, base, b"c2's own"))
        c1.send(datagram(net, net.addr("c1"), internal, sport, base, b"the first flow again"))
        wait_until(lambda: second.stats()["accepted"] == 1 and first.stats()["accepted"] == 2,
                   "each target to hear its own client")
        assert other.state == "consumed"
        assert first.stats()["digest"] == multiset_digest([b"by the first redirect",
                                                           b"the first flow again"])
        assert second.stats()["digest"] == multiset_digest([b"c2's own"])
        assert_ran_in_mode(net, action)


def _burst(net: Net, mode: str, flags: Flags) -> tuple[dict[str, Any], dict[str, Any], Action]:
    """A burst of BURST datagrams on a new redirected UDP flow, sent while the firewall is
    paused (its queue socket filling, unread): what reaches s1."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst, port = net.addr("s1"), 31061 + (flags != Flags(0))
    with net.client() as api, s1.udp_server(dst, port, echo=False) as server:
        (internal, base), (action,) = redirect(net, api, [(dst, port)], protocol="udp", flags=flags,
                                               mode=mode)
        # (not in kernel mode: there every datagram sent before the first one's verdict is a
        # new flow of its own, which the per-client new-flow cap would thin out paused; once
        # admitted, the flow no longer goes through the queue)
        with net.enforcer.paused() if mode == "user" else contextlib.nullcontext():
            sent = c1.udp_burst(internal, base, BURST, 1000, expect_replies=False)
            time.sleep(0.2)  # (the last datagrams are in the fw's queue, or dropped there)
        assert sent["sent"] == BURST, sent
        end = time.monotonic() + timeouts.POSITIVE
        while server.stats()["accepted"] < BURST and time.monotonic() < end:
            time.sleep(0.1)
        return sent, server.stats(), action


BURST = 40  # datagrams of 1000 bytes: ~100 KB of queue buffer, under 2 x 64 KiB


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.clause("RDC-06")
def test_increase_receive_buffer(net: Net, mode: str) -> None:
    """With the queue socket's buffer cut to 4 KiB, a burst of 40 datagrams through a
    user-mode redirect, sent while the enforcer is paused, loses some; with
    INCREASE_RECEIVE_BUFFER the buffer is at least 64 KiB (the action says so) and the
    same burst arrives whole. (In kernel mode an admitted flow no longer goes through the
    queue: there the burst, unpaused, shows the flag costs nothing, but cannot show a loss
    without it.)"""
    net.enforcer.restart(dataplane={"receive_buffer": 4096})
    if mode == "user":
        _, small, plain = _burst(net, mode, Flags(0))
        assert plain.info()["receive_buffer"] is None
        assert small["accepted"] < BURST, \
            f"all {BURST} datagrams passed a 4 KiB queue buffer: this test cannot tell"
    sent, large, increased = _burst(net, mode, Flags.INCREASE_RECEIVE_BUFFER)
    assert large["accepted"] == BURST, f"{BURST - large['accepted']} of {BURST} datagrams were lost"
    assert large["digest"] == sent["digest"], "the datagrams that reached s1 are not those sent"
    assert_ran_in_mode(net, increased)
    assert increased.info()["receive_buffer"] >= 65536, increased.info()
    if net.own_enforcer:
        assert net.call("status")["receive_buffer"] >= 65536


@pytest.mark.clause("RDC-07")
def test_connect_events_go_to_filters_registered_on_the_port(net: Net, mode: str) -> None:
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as granting, net.client() as watching, net.client() as elsewhere, \
            s1.tcp_server(dst, 31071):
        watcher = watching.register_filter("watches 31070-31079")
        watching.register_connect_events(watcher, "tcp", (31070, 31079))
        other = elsewhere.register_filter("watches 40000-40010")
        elsewhere.register_connect_events(other, "tcp", (40000, 40010))
        (internal, base), (action,) = redirect(net, granting, [(dst, 31071)])
        result = c1.tcp_connect(internal, base, send_bytes=10)
        assert_echoed(result, 10, "the redirected connection")
        local = result["local"]
        event = watching.next_event(timeouts.POSITIVE)
        assert event is not None, "no connect event"
        assert event["event"] == "connect" and event["filter"] == watcher and event["secondary"] is True
        assert event["action"] == action.id and event["protocol"] == "tcp"
        assert event["client"] == [net.addr("c1"), local[1]]
        assert event["target"] == [dst, 31071] and event["internal"] == [internal, base]
        assert event["external"] == net.fw_external(0)
        # events are pushed as the flow is admitted: after one wait, none may be on the way
        assert watching.next_event(NEGATIVE) is None, "more than one event for one connection"
        assert elsewhere.next_event(0.05) is None, "a filter registered elsewhere was told"
        assert granting.next_event(0.05) is None, "the granting connection registered nothing"
        assert_ran_in_mode(net, action)
        # a primary connection to a registered port is an event too, not secondary
        primaries = watching.register_filter("watches FTP")
        watching.register_connect_events(primaries, "tcp", (21, 21))
        with s1.tcp_server(dst, 21):
            assert_echoed(c1.tcp_connect(dst, 21, send_bytes=10), 10, "the primary connection")
        event = watching.next_event(timeouts.POSITIVE)
        assert event is not None and event["filter"] == primaries and event["secondary"] is False
        assert event["action"] is None and event["internal"] is None


def _transfer(net: Net, mode: str, tcp_port: int, udp_port: int) -> dict[str, Any]:
    """What each mode's redirect makes of the same TCP transfer and UDP burst."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    out: dict[str, Any] = {}
    with net.client() as api, s1.tcp_server(dst, tcp_port) as tcp_server, \
            s1.udp_server(dst, udp_port) as udp_server:
        (internal, base), (tcp_action,) = redirect(net, api, [(dst, tcp_port)], mode=mode)
        with s1.sniff(net.iface("s1")) as at_server, c1.sniff(net.iface("c1")) as at_client:
            tcp = c1.tcp_connect(internal, base, send_bytes=1_000_000, timeout=20)
            (internal, ubase), (udp_action,) = redirect(net, api, [(dst, udp_port)], protocol="udp",
                                                        mode=mode)
            # the first datagram alone, the rest once it is answered: sent while the first
            # awaits its verdict, each would be a new flow to the kernel (an unconfirmed
            # conntrack entry of its own), which a firewall may count against the client's
            # new-flow rate and drop (the enforcer's kernel cap does, in kernel mode), however
            # well it rewrites an admitted flow, which is what is compared here
            udp = c1.udp_burst(internal, ubase, 100, 1200, expect_replies=True, first_answered=True)
            expect_packet(at_server, UDP(dport=udp_port))
            expect_packet(at_client, UDP(sport=ubase))
        client_side = [p for p in at_client.packets() if (TCP in p and p[TCP].sport == base)
                       or (UDP in p and p[UDP].sport == ubase)]
        server_side = [p for p in at_server.packets() if (TCP in p and p[TCP].dport == tcp_port)
                       or (UDP in p and p[UDP].dport == udp_port)]
        # the client's SYN reaches the server with its TCP options as they were
        (client_syn,) = [p for p in at_client.packets() if TCP in p and p[TCP].dport == base
                         and p[TCP].flags == "S"]
        (server_syn,) = [p for p in server_side if TCP in p and p[TCP].flags == "S"]
        assert client_syn[TCP].options and server_syn[TCP].options == client_syn[TCP].options, \
            f"{mode} mode: options {client_syn[TCP].options} became {server_syn[TCP].options}"
        bad = [p.summary() for p in client_side + server_side if not checksums_ok(p)]
        assert not bad, f"{mode} mode: {len(bad)} packets with bad checksums, e.g. {bad[:3]}"
        assert client_side and server_side
        sources = {p[TCP if TCP in p else UDP].underlayer.src for p in client_side}
        out["client sees"] = sorted(sources)
        out["server sees"] = sorted({p[TCP if TCP in p else UDP].underlayer.src for p in server_side})
        assert_echoed(tcp, 1_000_000, f"{mode} mode's redirected connection")
        for action in (tcp_action, udp_action):
            assert_ran_in_mode(net, action, mode)
        out["udp"] = {k: udp[k] for k in ("sent", "digest", "replies", "reply_digest", "error")}
        out["udp server"] = {k: udp_server.stats()[k] for k in ("accepted", "bytes_in", "digest")}
        out["tcp server"] = {k: tcp_server.stats()[k] for k in ("accepted", "bytes_in")}
        out["internal"] = internal
    return out


@pytest.mark.clause("RDC-08")
def test_kernel_and_user_mode_give_identical_transfers(net: Net) -> None:
    """1 MB each way over TCP and 100 echoed datagrams over UDP, through a kernel-mode and
    a user-mode redirect: the same bytes, the same addresses on both sides, valid checksums,
    the SYN's TCP options intact."""
    results = {mode: _transfer(net, mode, 31081 + i, 31083 + i) for i, mode in enumerate(MODES)}
    kernel, user = results["kernel"], results["user"]
    assert kernel["udp"]["replies"] == 100 and kernel["udp"]["reply_digest"] == kernel["udp"]["digest"]
    assert kernel["udp server"]["digest"] == kernel["udp"]["digest"]
    assert kernel["client sees"] == [kernel["internal"]] and kernel["server sees"] == [net.fw_external(0)]
    assert kernel == user, f"kernel mode: {kernel}\nuser mode: {user}"


def _first_peer(server: Any) -> list[Any]:
    end = time.monotonic() + timeouts.POSITIVE
    while not server.stats()["peers"]:
        assert time.monotonic() < end, "the datagram did not reach the server"
        time.sleep(0.05)
    return list(server.stats()["peers"][0])


def _icmp_error(net: Net, mode: str, port: int, kind: str) -> dict[str, Any]:
    """An ICMP error about a redirected UDP flow, as the client sees it: port unreachable
    from the target's own stack; packet too big crafted by Scapy at the target as if a
    router on the way sent it; or fragmentation needed (IPv6: packet too big) from the
    fw itself, when the datagram is too big for its external link."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    v4 = net.family == "ipv4"
    too_big: Packet = ICMP(type=3, code=4) if v4 else ICMPv6PacketTooBig()
    # fw-mtu: the server answers the flow's first datagram (see below)
    with net.client() as api, s1.udp_server(dst, port + 100, echo=(kind == "fw-mtu")) as server:
        # nothing listens on ``port``: for port unreachable, the target's stack answers
        target = port if kind == "port-unreachable" else port + 100
        (internal, base), (action,) = redirect(net, api, [(dst, target)], protocol="udp", mode=mode)
        with c1.sniff(net.iface("c1")) as at_client:
            if kind == "port-unreachable":
                answer = c1.udp_send(internal, base, b"anyone there?", expect_reply=True)
                assert "refused" in str(answer["error"]), \
                    f"the client's socket did not take the translated error as its own: {answer}"
                expected: Packet = ICMP(type=3, code=3) if v4 else ICMPv6DestUnreach(code=4)
            elif kind == "packet-too-big":
                answer = c1.udp_send(internal, base, b"x" * 200, expect_reply=False)
                peer = _first_peer(server)
                quoted = datagram(net, peer[0], dst, peer[1], target, b"x" * 200)
                s1.send(IP(src=dst, dst=peer[0]) / ICMP(type=3, code=4, nexthopmtu=1280) / bytes(quoted)
                        if v4 else IPv6(src=dst, dst=peer[0]) / ICMPv6PacketTooBig(mtu=1280) / bytes(quoted))
                expected = too_big
            else:
                ext = net.topology.fw_external_iface
                net.lab.tb.run("fw", ["ip", "link", "set", ext, "mtu", "1280"])
                try:
                    # one small datagram first, answered: an error about a flow's very first
                    # packet cannot reach a queue (see dataplane), so user mode cannot
                    # translate it; the answer shows the flow admitted before the big one
                    answer = c1.udp_burst(internal, base, 2, [64, 1400], expect_replies=False,
                                          first_answered=True)
                    assert answer["error"] is None, answer
                    expected = too_big
                    expect_packet(at_client, expected)  # before the MTU is back
                finally:
                    net.lab.tb.run("fw", ["ip", "link", "set", ext, "mtu", "1500"])
                    # forget the path MTU the error taught c1, for the next mode's turn
                    net.lab.tb.run("c1", ["ip", "-6" if not v4 else "-4", "route", "flush", "cache"])
            got = expect_packet(at_client, expected)
        assert_ran_in_mode(net, action, mode)
    assert checksums_ok(got), got.show(dump=True)
    inner, outer = got[IPerror if v4 else IPerror6], got[IP if v4 else IPv6]
    return {"outer": (outer.src, outer.dst), "inner": (inner.src, inner.dst),
            "ports": (got[UDPerror].sport, got[UDPerror].dport), "internal": (internal, base),
            "client": tuple(answer["local"])}


@pytest.mark.clause("RDC-08")
@pytest.mark.parametrize("kind", ["port-unreachable", "packet-too-big", "fw-mtu"])
def test_icmp_errors_about_the_flow_are_translated(net: Net, kind: str) -> None:
    """The client gets the error from InternalAddress, quoting the datagram it sent (to
    InternalAddress), checksums valid; kernel NAT and the enforcer agree."""
    offset = {"port-unreachable": 0, "packet-too-big": 2, "fw-mtu": 4}[kind]
    seen = {mode: _icmp_error(net, mode, 31091 + i + offset, kind) for i, mode in enumerate(MODES)}
    for mode, s in seen.items():
        internal, base = s["internal"]
        client, cport = s["client"]
        assert s["outer"] == (internal, client), f"{mode} mode: outer {s['outer']}"
        assert s["inner"] == (client, internal), f"{mode} mode: quoted {s['inner']}"
        assert s["ports"] == (cport, base), f"{mode} mode: quoted ports {s['ports']}"


@pytest.mark.clause("RDC-09")
def test_established_connection_event(net: Net, mode: str) -> None:
    """Exactly one event per admitted flow, the caller's context, to the caller's filter."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    dst = net.addr("s1")
    with net.client() as mine, net.client() as other, s1.tcp_server(dst, 31101):
        my_filter = mine.register_filter("ftp-nat")
        other.register_filter("bystander")
        context = {"token": "rdc-09"}
        (internal, base), (action,) = redirect(net, mine, [(dst, 31101)], flags=Flags.ALLOW_MULTIPLE,
                                               session_filter=my_filter, context=context)
        results = [c1.tcp_connect(internal, base, send_bytes=10) for _ in range(2)]
        for i, result in enumerate(results):
            assert_echoed(result, 10, f"redirected connection {i}")
        for local in [result["local"] for result in results]:
            event = mine.next_event(timeouts.POSITIVE)
            assert event is not None, "missing established_connection event"
            assert event["event"] == "established_connection" and event["filter"] == my_filter
            assert event["context"] == context and event["action"] == action.id
            assert event["client"] == [net.addr("c1"), local[1]]
            assert event["target"] == [dst, 31101] and event["internal"] == [internal, base]
            assert event["external"] == net.fw_external(0)
        assert mine.next_event(NEGATIVE) is None, "more events than admitted flows"
        assert other.next_event(0.05) is None, "another filter got the event"
        assert_ran_in_mode(net, action)


@pytest.mark.clause("RDC-10")
def test_policy_denials_create_nothing(net: Net) -> None:
    before, pools, rules = pending_actions(net, "c2"), redirect_ports_in_use(net), kernel_redirect_rules(net)
    with net.client() as api:
        with refused(net, PolicyRulesDenied, "HTTP"):
            api.redirect_connections(net.session("c2"), [(net.addr("s1"), 31111)],
                                     protocol_guid=GUIDS["HTTP"])
        with refused(net, NetworkRulesDenied, "the denied lab network"):
            api.redirect_connections(net.session("c2"), [(net.addr("s1"), 31111),
                                                          (net.addr("s2", 1), 31111)],
                                     protocol_guid=FTP_GUID)
    assert pending_actions(net, "c2") == before
    assert redirect_ports_in_use(net) == pools and kernel_redirect_rules(net) == rules


def _other_family(net: Net) -> str:
    return "198.51.100.21" if net.family == "ipv6" else "2001:db8:2::21"


@pytest.mark.clause("RDC-10")
@pytest.mark.parametrize(("params", "message"), [
    ({"addresses": []}, "'addresses' must be a list of 1 to 64"),
    ({"addresses": [["S1", 31112]] * 65}, "'addresses' must be a list of 1 to 64"),
    ({"addresses": "S1"}, "'addresses' must be a list"),
    ({"addresses": [["S1"]]}, r"'addresses\[0\]' must be \[address, port\]"),
    ({"addresses": [["S1", 31112], ["nowhere", 1]]}, "not an IP address"),
    ({"addresses": [["S1", 0]]}, "outside 1-65535"),
    ({"addresses": [["S1", "21"]]}, "the port must be an integer"),
    ({"addresses": [["OTHER", 31112]]}, "not of the client's address family"),
    ({"flags": ["TIMEOUT", "ALLOW_MULTIPLE"]}, "cannot be combined"),
    ({"flags": ["BIDIRECTIONAL"]}, "does not take BIDIRECTIONAL"),
    ({"flags": ["ADDRESS_BASED"]}, "does not take ADDRESS_BASED"),
    ({"flags": 0x400}, "unknown flag bits"),
    ({"protocol": "icmp"}, "'protocol' must be"),
    ({"protocol_guid": "00000000-0000-0000-0000-000000000000"}, "no protocol is defined"),
    ({"proxy_external_address": "C1"}, "not one of the firewall's external addresses"),
    ({"data_filter": "nope"}, "no data filter 'nope'"),
    ({"session": 10**6}, "no session"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={str(v[k])[:20]}" for k in v))
def test_invalid_arguments_create_nothing(net: Net, params: dict[str, Any], message: str) -> None:
    names = {"S1": net.addr("s1"), "OTHER": _other_family(net), "C1": net.addr("c1")}
    request: dict[str, Any] = {"session": net.session("c1"), "addresses": [["S1", 31112]],
                               "protocol": "tcp", "protocol_guid": GUIDS["FTP"]}
    request.update(params)
    if isinstance(request["addresses"], list):
        request["addresses"] = [[names.get(a[0], a[0]), *a[1:]] if isinstance(a, list) and a else a
                                for a in request["addresses"]]
    if "proxy_external_address" in request:
        request["proxy_external_address"] = names[request["proxy_external_address"]]
    before, pools, rules = pending_actions(net), redirect_ports_in_use(net), kernel_redirect_rules(net)
    with net.client() as api, refused(net, InvalidArgument, message):
        api.call("redirect_connections", **request)
    assert pending_actions(net) == before
    assert redirect_ports_in_use(net) == pools and kernel_redirect_rules(net) == rules


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.clause("RDC-10")
def test_exhausted_ports_are_a_clear_error(net: Net, mode: str) -> None:
    """With four ports per mode, a block of three fits once; the next is FWX_E_IS_BUSY and
    creates nothing; when the first block is done its ports serve again."""
    net.enforcer.restart(dataplane={"kernel_redirect_ports": [61000, 61003],
                                    "user_redirect_ports": [63000, 63003]})
    targets = [(net.addr("s1"), 31113 + i) for i in range(3)]
    with net.client() as api:
        _, actions = redirect(net, api, targets)
        before = pending_actions(net)
        with refused(net, IsBusy, "no 3 consecutive free ports"):
            redirect(net, api, targets)
        assert pending_actions(net) == before
        for action in actions:
            action.cancel()
        (_, base), _ = redirect(net, api, targets)
        assert base in (61000, 61001, 63000, 63001)

