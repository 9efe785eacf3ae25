"""BFC, RAB, IPF and AFC-07: Firewall clients over SOCKS5, their binds, RetroactiveAllowBind
and IpFilter, end to end. UDP binds with traffic (RAB-06, RAB-07, a UDP IpFilter):
test_rab_udp.py."""

from __future__ import annotations

import shutil
import time
from typing import Any

import pytest
from scapy.layers.inet import TCP

from enforcer.client import IpFilter, SessionApiError
from testbed import timeouts
from testbed.checks import expect_packet
from testbed.clauses.helpers import assert_echoed, dropped_silently, fw_session, refused, socks_open, syn
from testbed.lab import GUIDS, SOCKS_PORT, SOCKS_USERS
from testbed.plugin import Net
from testbed.session_api import (
    Flags,
    InvalidArgument,
    IpFilterWire,
    NotFound,
    PolicyRulesDenied,
    Terminating,
    flag_names,
    wire_ipfilter,
)

FTP = GUIDS["FTP"]


def bind(net: Net, node: str = "c1", user: str = "alice", command: str = "bind") -> tuple[Any, int, int]:
    """A SOCKS BIND (or UDP ASSOCIATE) by ``node``'s ``user``: (connection, session, external port)."""
    conn = socks_open(net, node, user, command, "0.0.0.0" if net.family == "ipv4" else "::", 0)
    assert conn.connected and conn.reply is not None and conn.reply["code"] == 0, (conn.error, conn.reply)
    session = fw_session(net, node, user)
    (b,) = [b for b in net.call("binds", session=session) if b["protocol"] == ("tcp" if command == "bind"
                                                                                else "udp")]
    return conn, session, int(b["address"][1])


def allow(net: Net, session: int, port: int, *, protocol: str = "tcp", address: str | None = None,
          flags: Flags | None = None, ipfilter: IpFilterWire | None = None, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"session": session, "protocol": protocol, "port": port,
                              "address": address or net.fw_external(0), "protocol_guid": FTP,
                              "flags": flag_names(flags or Flags(0))}
    if ipfilter is not None:
        params["ipfilter"] = ipfilter
    params.update(extra)
    return dict(net.call("retroactive_allow_bind", **params))


def only(net: Net, *nodes: str) -> IpFilterWire:
    """An IpFilter of ``nodes``' addresses."""
    return wire_ipfilter((net.addr(node), net.addr(node)) for node in nodes)


def state_of(net: Net, session: int, port: int) -> dict[str, Any]:
    (b,) = [b for b in net.call("binds", session=session) if b["address"][1] == port]
    return dict(b)


@pytest.mark.clause("BFC-01")
def test_a_bind_through_the_fw_succeeds_with_the_external_address(net: Net) -> None:
    """BindForClient over SOCKS BIND: granted at once, the fw's external address and a
    port of the bind range; the bind is the session's, pending approval."""
    conn, session, port = bind(net)
    with conn:
        assert conn.reply["address"] == net.fw_external(0), conn.reply
        assert 20000 <= port <= 29999 and conn.reply["port"] == port
        b = state_of(net, session, port)
        assert b["state"] == "pending" and b["session"] == session
        (s,) = [s for s in net.call("sessions") if s["id"] == session]
        assert (s["kind"], s["client"], s["user"]) == ("firewall-client", net.addr("c1"), "alice")
    # the session is the control connection: it ends with it, and its bind goes
    deadline = time.monotonic() + timeouts.POSITIVE
    while session in [s["id"] for s in net.call("sessions")]:
        assert time.monotonic() < deadline, "the session outlived its SOCKS connection"
        time.sleep(0.05)


@pytest.mark.clause("RAB-01")
def test_before_approval_inbound_attempts_are_discarded_silently(net: Net) -> None:
    """A peer's SYN to an unapproved bind: no SYN-ACK, no reset, no ICMP; the client is
    told of no connection; the bind stays pending and counts the discard."""
    conn, session, port = bind(net)
    with conn:
        with dropped_silently(net, "s1") as drop:
            drop.send("a SYN to the unapproved bind",
                      syn(net, net.addr("s1"), net.fw_external(0), 42001, port))
            drop.tcp("a connection to the unapproved bind", net.fw_external(0), port)
        assert conn.accept(timeout=0.2) is None, "the bound socket accepted a connection"
        b = state_of(net, session, port)
        assert b["state"] == "pending" and b["discarded"] >= 2 and b["admitted"] == 0


@pytest.mark.clause("RAB-02")
def test_after_approval_an_allowed_peer_reaches_the_client(net: Net) -> None:
    """s1, which the IpFilter includes, connects to alice's approved BIND and data goes
    both ways; the BIND took its one connection, and s1's next is dropped silently."""
    s1 = net.agent("s1")
    conn, session, port = bind(net)
    with conn:
        result = allow(net, session, port, ipfilter=only(net, "s1"))
        assert (result["result"], result["hresult"]) == ("S_OK", 0)
        with s1.tcp_open(net.fw_external(0), port) as peer:
            assert peer.connected, peer.error
            second = conn.accept()
            assert second is not None and second["code"] == 0, second
            assert second["address"] == net.addr("s1")
            assert peer.talk(b"from the peer", expect=0) == b""
            assert conn.talk(b"", expect=len(b"from the peer")) == b"from the peer"
            assert conn.talk(b"from the client", expect=0) == b""
            assert peer.talk(b"", expect=len(b"from the client")) == b"from the client"
        # a BIND takes one connection: the allowed peer's next one is dropped silently
        _dropped(net, "s1", port)


def through_the_bind(net: Net, conn: Any, node: str, port: int, data: bytes) -> None:
    """``node`` connects to alice's BIND: she is told of it (``node``'s address), and data
    goes both ways."""
    with net.agent(node).tcp_open(net.fw_external(0), port) as peer:
        assert peer.connected, f"{node} did not get through alice's bind: {peer.error}"
        second = conn.accept()
        assert second is not None and second["code"] == 0 and second["address"] == net.addr(node), second
        assert peer.talk(data, expect=0) == b""
        assert conn.talk(b"", expect=len(data)) == data, f"{node}'s data did not reach alice"
        answer = data.upper()
        assert conn.talk(answer, expect=0) == b""
        assert peer.talk(b"", expect=len(answer)) == answer, f"alice's answer did not reach {node}"


def _dropped(net: Net, node: str, port: int) -> None:
    """``node``'s connection to the bind is dropped silently."""
    with dropped_silently(net, node) as drop:
        drop.tcp(f"{node}'s connection to the bind", net.fw_external(0), port)


@pytest.mark.clause("RAB-03")
@pytest.mark.parametrize("kind", ["included", "null", "empty"])
def test_the_ipfilter_decides_which_peers_get_through(net: Net, kind: str) -> None:
    """Only s1 included: s2's SYN is dropped before the socket (no SYN-ACK at s2) and s1
    gets through; NULL: anyone; a filter with no ranges: no one."""
    s2 = net.agent("s2")
    conn, session, port = bind(net)
    with conn:
        ipfilter = {"included": only(net, "s1"), "null": None, "empty": wire_ipfilter(())}[kind]
        allow(net, session, port, ipfilter=ipfilter)
        probe = syn(net, net.addr("s2"), net.fw_external(0), 42003, port)
        if kind == "null":  # (the crafted SYN's handshake is never completed: s2 resets it)
            with s2.sniff(net.iface("s2")) as at_s2:
                s2.send(probe)
                expect_packet(at_s2, TCP(sport=port, flags="SA"))
            through_the_bind(net, conn, "s2", port, b"s2 through alice's bind, anyone's")
            return
        with dropped_silently(net, "s2") as drop:
            drop.send("a SYN from s2, which the filter leaves out", probe)
        assert conn.accept(timeout=0.2) is None, "a filtered peer reached the bound socket"
        if kind == "included":
            through_the_bind(net, conn, "s1", port, b"s1 through alice's bind, included")
        else:
            _dropped(net, "s1", port)
            assert conn.accept(timeout=0.2) is None, "s1 reached the bound socket"


@pytest.mark.clause("RAB-04")
def test_result_codes(net: Net) -> None:
    """S_OK, S_FALSE, E_INVALIDARG, NOT_FOUND, FWX_E_TERMINATING, FWX_E_POLICY_RULES_DENIED."""
    conn, session, port = bind(net)
    other, _, other_port = bind(net, user="bob")
    with conn, other:
        for bad, message in (({"port": 0}, "must be nonzero"),
                             ({"flags": ["BIDIRECTIONAL"]}, "BIDIRECTIONAL is for UDP only"),
                             ({"flags": ["ALLOW_MULTIPLE"]}, "does not take ALLOW_MULTIPLE"),
                             ({"ipfilter": {"ranges": [["1.2.3.4"]]}}, "ranges"),
                             ({"protocol": "icmp"}, "'protocol' must be")):
            request = {"session": session, "protocol": "tcp", "port": port,
                       "address": net.fw_external(0), "protocol_guid": FTP, **bad}
            with refused(net, InvalidArgument, message):
                net.call("retroactive_allow_bind", **request)
        with refused(net, NotFound, "no tcp bind"):
            allow(net, session, port + 1 if port + 1 != other_port else port + 2)
        with pytest.raises(NotFound):
            allow(net, session, other_port)  # bob's bind is not alice's session's
        with pytest.raises(PolicyRulesDenied):
            allow(net, session, port, protocol_guid=GUIDS["SSH"])
        assert state_of(net, session, port)["state"] == "pending", "a failed call changed the bind"
        assert allow(net, session, port)["result"] == "S_OK"
        again = allow(net, session, port)
        assert (again["result"], again["hresult"], again["bind"]["state"]) == ("S_FALSE", 1, "allowed")
        through_the_bind(net, conn, "s1", port, b"s1 through alice's bind, approved")
        with refused(net, Terminating, "closed"):  # a BIND takes one connection
            allow(net, session, port)


@pytest.mark.clause("RAB-05")
def test_the_any_address_with_the_port_matches_the_bind(net: Net) -> None:
    """The any-address with a port approves the session's bind on that port, and only
    that one: alice's other bind stays pending, s1's SYN to it dropped silently."""
    conn, session, port = bind(net)
    anywhere = "0.0.0.0" if net.family == "ipv4" else "::"
    other = socks_open(net, "c1", "alice", "bind", anywhere, 0)
    with conn, other:
        assert other.reply is not None and other.reply["code"] == 0, (other.error, other.reply)
        other_port = int(other.reply["port"])
        assert allow(net, session, port, address=anywhere)["result"] == "S_OK"
        assert state_of(net, session, port)["state"] == "allowed"
        assert state_of(net, session, other_port)["state"] == "pending"
        _dropped(net, "s1", other_port)
        assert other.accept(timeout=0.2) is None, "alice's other bind accepted a connection"
        through_the_bind(net, conn, "s1", port, b"s1 through alice's bind, any address")


@pytest.mark.clause("IPF-01")
def test_ipfilter_operations(family: str) -> None:
    """Include/ExcludeRange, Include/ExcludeFilter, IsIncluded, Compare, Clone: the
    enforcer's IpFilter object itself, as its public client module gives it to
    application filters (no firewall behaviour: catalog.NO_FIREWALL_BEHAVIOUR)."""
    v4 = family == "ipv4"
    a, b, c, d = (("198.51.100.10", "198.51.100.20", "198.51.100.15", "198.51.100.30") if v4 else
                  ("2001:db8:2::10", "2001:db8:2::20", "2001:db8:2::15", "2001:db8:2::30"))
    f = IpFilter()
    assert not f.is_included(a), "an empty filter blocks all"
    f.include_range(a, b)
    assert f.is_included(a) and f.is_included(b) and f.is_included(c) and not f.is_included(d)
    f.exclude_range(c, c)
    assert not f.is_included(c) and f.is_included(a)
    g = f.clone()
    g.include_range(c, d)
    assert g.is_included(c) and not f.is_included(c), "a clone is independent"
    assert f.compare(g) != 0 and f.compare(f.clone()) == 0
    h = IpFilter()
    h.include_filter(g)
    h.exclude_filter(f)
    assert h.is_included(c) and h.is_included(d) and not h.is_included(a)
    other = "2001:db8:2::10" if v4 else "198.51.100.10"
    assert not g.is_included(other), "the families are apart"
    with pytest.raises(SessionApiError) as refused:
        f.include_range(b, a)
    assert refused.value.name == "E_INVALIDARG", f"a range from high to low: {refused.value.name}"


@pytest.mark.clause("AFC-07")
@pytest.mark.parametrize("address_based", [False, True], ids=["session", "address-based"])
def test_another_session_on_the_same_ip_only_with_address_based(net: Net, address_based: bool) -> None:
    """A grant to alice's session: bob's session on the same client IP (and c1's SecureNAT
    traffic) may use it only with ADDRESS_BASED; alice's own may."""
    s1 = net.agent("s1")
    dst, port = net.addr("s1"), 33071 + address_based
    with s1.tcp_server(dst, 21), s1.tcp_server(dst, port) as server, net.client() as api, \
            socks_open(net, "c1", "alice", "connect", dst, 21) as control:  # alice's FTP session
        assert control.reply is not None and control.reply["code"] == 0, (control.error, control.reply)
        flags = Flags.ALLOW_MULTIPLE | (Flags.ADDRESS_BASED if address_based else Flags(0))
        api.allow_future_connect(fw_session(net, "c1", "alice"), (dst, port), protocol_guid=FTP, flags=flags)
        with socks_open(net, "c1", "bob", "connect", dst, port) as bob:
            assert bob.reply is not None
            assert (bob.reply["code"] == 0) is address_based, bob.reply
        if address_based:
            direct = net.agent("c1").tcp_connect(dst, port)
            assert direct["connected"], f"c1's SecureNAT connection on the ADDRESS_BASED grant: {direct}"
        else:
            with dropped_silently(net, "c1") as drop:
                drop.tcp("c1's SecureNAT connection on alice's grant", dst, port)
        with socks_open(net, "c1", "alice", "connect", dst, port) as own:
            assert own.reply is not None and own.reply["code"] == 0, own.reply
            assert_echoed(own.exchange(10_000), 10_000, "alice's own connection on her grant")
        assert server.stats()["accepted"] == 1 + 2 * address_based


@pytest.mark.clause("BFC-01")
@pytest.mark.clause("RAB-02")
@pytest.mark.parametrize("family", ["ipv4"])  # socksify gave no IPv6 bind here (see the note)
def test_dante_socksify_binds_through_the_fw(net: Net) -> None:
    """A real third-party SOCKS client: dante's socksify runs a program that binds, listens
    and accepts. Its bind() is a SOCKS BIND through the fw, and the program is told the
    fw's external address; once a filter approves the bind for s1, s1's connection
    reaches the program and is answered."""
    from testbed import dante

    reason = dante.available()
    if reason is not None:
        pytest.skip(reason)
    proxy = net.fw_internal()
    proc, workdir = dante.bind_and_accept(net.lab.tb, "c1", proxy, SOCKS_PORT, "alice",
                                          SOCKS_USERS["alice"], 3 * timeouts.POSITIVE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        words = proc.stdout.readline().split()
        assert words[:1] == ["bound"], f"socksify: {words} {proc.stderr.read()}"
        address, port = words[1], int(words[2])
        assert address == net.fw_external(0), f"the program is bound to {address}, not the fw's address"
        session = fw_session(net, "c1", "alice")
        assert state_of(net, session, port)["state"] == "pending"
        _dropped(net, "s1", port)
        assert allow(net, session, port, ipfilter=only(net, "s1"))["result"] == "S_OK"
        with net.agent("s1").tcp_open(address, port) as peer:
            assert peer.connected, peer.error
            answer = peer.talk(b"data channel", expect=len(b"data channel"))
        assert answer == b"DATA CHANNEL", f"{answer!r}; socksify said {proc.stderr.read()}"
        assert proc.stdout.readline().split()[:2] == ["peer", net.addr("s1")]
        assert proc.wait(timeout=timeouts.POSITIVE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        net.lab.tb.forget(proc.pid)
        shutil.rmtree(workdir, ignore_errors=True)
