"""Every dimension a permission or a bind matches on is shown to matter, while it is pending
(SPEC rules 1, 2, 9 and 10).

A grant (AllowFutureConnect) matches a new flow by IP protocol, client address, session
(unless ADDRESS_BASED), target address and target port; a redirect (RedirectConnections)
by IP protocol, client address and its port on the fw; a bind (BindForClient, a SOCKS BIND
or UDP ASSOCIATE, approved by RetroactiveAllowBind) by IP protocol, its address and port,
and the peer its IpFilter holds. For each, a check first sends a flow that differs from the
admitted one in that one dimension: it reaches the fw and goes no further, unanswered
(``assert_dropped_silently``). Then the exact flow gets through, and what comes back is what
was sent: the differing flow did not use up the single-use permission either. (A SecureNAT
bind expires unused after the lab's permission timeout, 2 s: a bind's check lets the exact
flow follow the differing one at once, and shows the drop once the negative timeout has
passed, ``dropped_silently_meanwhile``.)

A TCP segment that cannot open a connection (an ACK, a FIN, a reset, data) sent first is
dropped the same way, and neither opens a flow nor uses the permission or the bind.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
from scapy.layers.inet import TCP
from scapy.packet import Packet

from testbed.agent import multiset_digest
from testbed.checks import expect_no_packet
from testbed.clauses.helpers import (
    FTP_GUID,
    NEGATIVE,
    assert_dropped_silently,
    assert_ran_in_mode,
    datagram,
    dropped_silently_meanwhile,
    exchange_datagram,
    fw_session,
    grant,
    ip,
    probe_port,
    socks_open,
    syn,
    talk,
    wait_until,
)
from testbed.clauses.test_rab import allow, bind, only, through_the_bind
from testbed.clauses.test_rab_udp import association
from testbed.clauses.test_rdc import redirect
from testbed.plugin import Net
from testbed.session_api import Action, Flags, IpFilterWire, wire_ipfilter

# The targets' ports, each with the one above it (the port a differing flow takes): none
# twice in a lab, so that no flow of an earlier check meets a later one; below Linux's
# ephemeral ports (32768-60999), so that no client socket of a host holds one a check
# listens on there, and below the fw's bind ports (20000-29999)
PORTS = itertools.count(14000, 2)
NOT_ALLOWED = 2  # SOCKS5 reply code (RFC 1928 section 6): connection not allowed by ruleset


@contextmanager
def echo_server(net: Net, protocol: str, port: int) -> Iterator[Any]:
    """s1 echoing on ``port`` (TCP or UDP)."""
    s1, address = net.agent("s1"), net.addr("s1")
    with s1.tcp_server(address, port) if protocol == "tcp" else s1.udp_server(address, port) as server:
        yield server


def admitted(net: Net, node: str, protocol: str, address: str, port: int) -> None:
    """``node``'s own flow gets through to the echo server: what comes back is what it sent."""
    (talk if protocol == "tcp" else exchange_datagram)(net, node, address, port)


def probe(net: Net, protocol: str, src: str, dst: str, dport: int) -> Packet:
    """A crafted first packet of a new flow: a SYN, or a datagram."""
    if protocol == "tcp":
        return syn(net, src, dst, probe_port(), dport)
    return datagram(net, src, dst, probe_port(), dport, b"a flow that differs in one dimension")


# --- grants ----------------------------------------------------------------------------------------

class Differing(NamedTuple):
    """A flow that differs from the one a permission admits in one dimension: it comes from
    ``node``, is of ``protocol``, and goes to the destination named ``to`` (its address and
    port) with ``port_offset`` added to the port."""

    node: str
    protocol: str
    to: str
    port_offset: int = 0

    def probe(self, net: Net, destinations: dict[str, tuple[str, int]]) -> tuple[str, Packet]:
        """Its first packet, crafted; ``destinations``: (address, port) by name."""
        address, port = destinations[self.to]
        return self.node, probe(net, self.protocol, net.addr(self.node), address, port + self.port_offset)


# Per dimension: the grant's protocol (c1's, to s1's port), and the flow that differs in it
GRANT_DIMENSIONS: dict[str, tuple[str, Differing]] = {
    "protocol-udp-to-tcp": ("tcp", Differing("c1", "udp", "s1")),
    "protocol-tcp-to-udp": ("udp", Differing("c1", "tcp", "s1")),
    "client-address": ("tcp", Differing("c2", "tcp", "s1")),
    "target-address": ("tcp", Differing("c1", "tcp", "s2")),
    "target-port": ("tcp", Differing("c1", "tcp", "s1", port_offset=1)),
}


@pytest.mark.parametrize("address_based", [False, True], ids=["session-scoped", "address-based"])
@pytest.mark.parametrize("dimension", [
    pytest.param(d, marks=pytest.mark.clause("AFC-06" if d == "client-address" else "AFC-02"))
    for d in GRANT_DIMENSIONS])
def test_a_pending_grant_admits_no_flow_that_differs_in_one_dimension(
        net: Net, mode: str, dimension: str, address_based: bool) -> None:
    """c1's single-use grant to s1's port (TCP; UDP for a TCP probe), with ADDRESS_BASED
    too: first a flow that differs in one dimension (the other IP protocol to the port;
    from c2; to s2; to the port above) reaches the fw and goes no further, unanswered; then
    c1's own flow gets through (echoed)."""
    protocol, differing = GRANT_DIMENSIONS[dimension]
    dst, port = net.addr("s1"), next(PORTS)
    flags = Flags.ADDRESS_BASED if address_based else Flags(0)
    if protocol == "udp":
        flags |= Flags.BIDIRECTIONAL  # (the echo comes back)
    with net.client() as api, echo_server(net, protocol, port):
        action = grant(net, api, (dst, port), protocol=protocol, flags=flags)
        destinations = {server: (net.addr(server), port) for server in ("s1", "s2")}
        assert_dropped_silently(net, [differing.probe(net, destinations)])
        admitted(net, "c1", protocol, dst, port)
        assert_ran_in_mode(net, action)


@pytest.mark.clause("AFC-02")
def test_a_single_use_udp_grant_admits_the_first_datagram_s_flow_only(net: Net, mode: str) -> None:
    """Rule 2's "or the first UDP datagram": c1's first datagram to the target uses the
    grant up (its flow's echo comes back, byte for byte); a datagram of a new flow to the
    same target (another source port) then reaches the fw and goes no further, unanswered."""
    dst, port = net.addr("s1"), next(PORTS)
    with net.client() as api, echo_server(net, "udp", port):
        action = grant(net, api, (dst, port), protocol="udp", flags=Flags.BIDIRECTIONAL)
        admitted(net, "c1", "udp", dst, port)
        assert action.state == "consumed", action.state
        assert_ran_in_mode(net, action)
        assert_dropped_silently(net, [("c1", probe(net, "udp", net.addr("c1"), dst, port))])


@pytest.mark.clause("AFC-07")
def test_a_pending_grant_admits_no_socks_connect_of_another_session_on_its_client_s_address(
        net: Net, mode: str) -> None:
    """Without ADDRESS_BASED a grant is its session's alone, though another session has the
    same client address: with c1's SecureNAT session's single-use grant pending, bob's SOCKS
    CONNECT from c1 to its target is refused (reply 2) and the fw sends nothing to the
    target; then c1's own connection gets through (echoed). (With ADDRESS_BASED another
    session may use it: AFC-07's checks in test_rab.py and test_afc.py.)"""
    dst, port = net.addr("s1"), next(PORTS)
    with net.client() as api, echo_server(net, "tcp", port) as server:
        action = grant(net, api, (dst, port))
        since = time.time()
        with socks_open(net, "c1", "bob", "connect", dst, port) as bob:
            assert bob.reply is not None and bob.reply["code"] == NOT_ALLOWED, \
                f"bob's CONNECT on c1's grant: {bob.error} {bob.reply}"
        expect_no_packet(net.fw_sent(since), TCP(dport=port), timeout=0)
        assert server.stats()["accepted"] == 0, "bob's CONNECT reached the target"
        talk(net, "c1", dst, port)
        assert_ran_in_mode(net, action)


@pytest.mark.clause("AFC-07")
def test_a_firewall_client_s_pending_grant_admits_no_flow_of_its_host_s_securenat_session(
        net: Net) -> None:
    """A single-use grant to alice's Firewall-client session on c1, without ADDRESS_BASED: a
    SYN of c1's own (its SecureNAT session) to the target reaches the fw and goes no
    further, unanswered; then alice's CONNECT gets through (relayed, echoed)."""
    dst, port = net.addr("s1"), next(PORTS)
    s1 = net.agent("s1")
    with net.client() as api, s1.tcp_server(dst, 21), echo_server(net, "tcp", port), \
            socks_open(net, "c1", "alice", "connect", dst, 21) as control:  # alice's FTP session
        assert control.reply is not None and control.reply["code"] == 0, (control.error, control.reply)
        api.allow_future_connect(fw_session(net, "c1", "alice"), (dst, port), protocol_guid=FTP_GUID)
        assert_dropped_silently(net, [("c1", syn(net, net.addr("c1"), dst, probe_port(), port))])
        with socks_open(net, "c1", "alice", "connect", dst, port) as own:
            assert own.reply is not None and own.reply["code"] == 0, \
                f"alice's own CONNECT on her grant: {own.error} {own.reply}"
            data = b"alice's relayed data, on her own grant"
            assert own.talk(data, len(data)) == data


# --- redirects -------------------------------------------------------------------------------------

# Per dimension, the flow that differs from c1's to the redirect's port on the fw ("internal";
# "target": the redirect's target itself)
REDIRECT_DIMENSIONS = {
    "protocol": Differing("c1", "udp", "internal"),
    "client-address": Differing("c2", "tcp", "internal"),
    "port": Differing("c1", "tcp", "internal", port_offset=1),
    "target": Differing("c1", "tcp", "target"),
}


@pytest.mark.clause("RDC-04")
@pytest.mark.parametrize("dimension", REDIRECT_DIMENSIONS)
def test_a_pending_redirect_admits_no_flow_that_differs_in_one_dimension(
        net: Net, mode: str, dimension: str) -> None:
    """c1's single-use TCP redirect to s1: first a flow that differs in one dimension (a
    datagram to the redirect's port; from c2; to the port above; to the target itself)
    reaches the fw and goes no further, unanswered; then c1's own connection to the
    redirect's port gets through to s1 (echoed)."""
    differing = REDIRECT_DIMENSIONS[dimension]
    target = next(PORTS)
    with net.client() as api, echo_server(net, "tcp", target):
        (internal, port), (action,) = redirect(net, api, [(net.addr("s1"), target)])
        assert_dropped_silently(net, [differing.probe(net, {"internal": (internal, port),
                                                            "target": (net.addr("s1"), target)})])
        talk(net, "c1", internal, port)
        assert_ran_in_mode(net, action)


# --- binds -----------------------------------------------------------------------------------------

BIND_KINDS = [("securenat", "tcp"), ("securenat", "udp"), ("firewall-client", "tcp"),
              ("firewall-client", "udp")]
BIND_IDS = [f"{kind}-{protocol}" for kind, protocol in BIND_KINDS]


@dataclass
class Bound:
    """An approved bind of c1's: where a peer sends (``address``, ``port``), how a
    peer's own flow is shown to reach c1 through it (``delivers``), and that nothing more
    reached the client (``nothing_more``: what the fw's capture cannot show, a relay's
    copy, which has new ports and a SOCKS header)."""

    net: Net
    protocol: str
    address: str
    port: int
    delivers: Callable[[str, bytes], None]
    nothing_more: Callable[[], None] = lambda: None

    def probe(self, node: str, protocol: str | None = None, port: int | None = None) -> Packet:
        """A crafted first packet from ``node`` to the bind (or to another port, or of the
        other protocol)."""
        return probe(self.net, protocol or self.protocol, self.net.addr(node), self.address,
                     port or self.port)


def securenat_bind(net: Net, protocol: str, client_port: int,
                   ipfilter: IpFilterWire | None) -> tuple[str, int]:
    """c1's port made reachable with BindForClient and approved for ``ipfilter``'s peers
    (None: any; on behalf of FTP): where a peer sends (c1's own address and port, or in
    NAT the fw's)."""
    session = net.session("c1")
    with net.client() as api:
        address = api.bind_for_client(session, client_port, protocol=protocol)
        ranges = None if ipfilter is None else [(low, high) for low, high in ipfilter["ranges"]]
        assert api.retroactive_allow_bind(session, address, protocol_guid=FTP_GUID, protocol=protocol,
                                          ipfilter=ranges), f"the bind {address} was approved already"
    return address


@contextmanager
def approved_bind(net: Net, kind: str, protocol: str, ipfilter: IpFilterWire | None) -> Iterator[Bound]:
    """A bind of c1's, approved for the peers ``ipfilter`` holds (None: any): a SecureNAT one
    (bind_for_client; c1 echoes on the bound port) or a Firewall client's (alice's SOCKS
    BIND or UDP ASSOCIATE)."""
    c1 = net.agent("c1")
    if kind == "securenat":
        # it expires unused in the lab's permission timeout, 2 s: the peers' agents, which
        # take a second or two to start on their first use, are started before it is made
        for peer in ("s1", "s2"):
            net.agent(peer)
        client_port = next(PORTS)
        if protocol == "tcp":
            with c1.tcp_server(net.addr("c1"), client_port):
                address, port = securenat_bind(net, protocol, client_port, ipfilter)
                yield Bound(net, protocol, address, port, lambda node, data: _echoed(net, node, address,
                                                                                   port, data))
            return
        with c1.udp_server(net.addr("c1"), client_port, echo=False) as server:
            address, port = securenat_bind(net, protocol, client_port, ipfilter)
            yield Bound(net, protocol, address, port,
                        lambda node, data: _received(net, server, node, address, port, data))
        return
    if protocol == "tcp":
        conn, session, port = bind(net)
        with conn:
            assert allow(net, session, port, ipfilter=ipfilter)["result"] == "S_OK"
            yield Bound(net, protocol, net.fw_external(0), port,
                        lambda node, data: through_the_bind(net, conn, node, port, data))
        return
    conn, _, port = association(net, Flags(0), ipfilter)

    def nothing_relayed() -> None:
        """alice's association relayed nothing more to her"""
        got = conn.udp(None, 0, b"", expect_reply=True, timeout=NEGATIVE)
        assert got["reply"] is None, f"the relay sent alice a datagram it must drop: {got}"

    with conn:
        yield Bound(net, protocol, net.fw_external(0), port,
                    lambda node, data: _relayed(net, conn, node, port, data), nothing_relayed)


def _echoed(net: Net, node: str, address: str, port: int, data: bytes) -> None:
    """``node`` connects to c1's bound port (c1 echoes) and gets back what it sent."""
    with net.agent(node).tcp_open(address, port) as peer:
        assert peer.connected, f"{node} did not get through c1's bind: {peer.error}"
        assert peer.talk(data, len(data)) == data, f"{node}'s data did not come back through c1's bind"


def _received(net: Net, server: Any, node: str, address: str, port: int, data: bytes) -> None:
    """``node``'s datagram to c1's bound port reaches c1 (the only one it gets)."""
    before = server.stats()["accepted"]
    net.agent(node).udp_send(address, port, data, expect_reply=False)
    wait_until(lambda: server.stats()["accepted"] > before, f"{node}'s datagram did not reach c1")
    assert server.stats()["digest"] == multiset_digest([data]), server.stats()


def _relayed(net: Net, conn: Any, node: str, port: int, data: bytes) -> None:
    """``node``'s datagram to alice's UDP ASSOCIATE is relayed to her, from it."""
    sent = net.agent(node).udp_send(net.fw_external(0), port, data, expect_reply=False)
    got = conn.udp(None, 0, b"", expect_reply=True)
    assert (got["reply"], got["from"]) == (data, [net.addr(node), sent["local"][1]]), got


@pytest.mark.clause("RAB-01")
@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_before_approval_a_securenat_bind_discards_what_comes_to_it(net: Net, protocol: str) -> None:
    """c1's port made reachable with BindForClient, not yet approved: s1's first packet to
    it reaches the fw and goes no further, unanswered, and c1 gets nothing; the bind
    counts the discard and admits nothing. Approved for s1, the same place then leads s1's
    flow to c1 (content compared): the probe went where a flow would."""
    c1, session, client_port = net.agent("c1"), net.session("c1"), next(PORTS)
    net.agent("s1")  # started before the bind, which expires unused in the lab's 2 s
    with c1.tcp_server(net.addr("c1"), client_port) if protocol == "tcp" else \
            c1.udp_server(net.addr("c1"), client_port, echo=False) as server, net.client() as api:
        address, port = api.bind_for_client(session, client_port, protocol=protocol)
        assert_dropped_silently(net, [("s1", probe(net, protocol, net.addr("s1"), address, port))])
        assert server.stats()["accepted"] == 0, "c1 got what came before the approval"
        (listed,) = [b for b in net.call("binds", session=session) if b["address"] == [address, port]]
        assert listed["discarded"] >= 1 and listed["admitted"] == 0, listed
        assert api.retroactive_allow_bind(session, (address, port), protocol_guid=FTP_GUID,
                                          protocol=protocol,
                                          ipfilter=[(net.addr("s1"), net.addr("s1"))])
        data = f"s1 through c1's {protocol} bind, once approved".encode()
        if protocol == "tcp":
            _echoed(net, "s1", address, port, data)
        else:
            _received(net, server, "s1", address, port, data)


@pytest.mark.clause("RAB-02")
@pytest.mark.parametrize("dimension", ["protocol", "port"])
@pytest.mark.parametrize(("kind", "protocol"), BIND_KINDS, ids=BIND_IDS)
def test_an_approved_bind_admits_no_flow_that_differs_in_one_dimension(
        net: Net, kind: str, protocol: str, dimension: str) -> None:
    """c1's bind, approved for s1: first s1 sends the other IP protocol to the bind's port,
    or the bind's protocol to the port above: it reaches the fw and goes no further,
    unanswered; then s1's own flow reaches c1 through the bind (content compared)."""
    other = "udp" if protocol == "tcp" else "tcp"
    with dropped_silently_meanwhile(net, "s1") as send, \
            approved_bind(net, kind, protocol, only(net, "s1")) as bound:
        if dimension == "protocol":
            send("s1", f"{other.upper()} to the bind's port", bound.probe("s1", protocol=other))
        else:
            send("s1", "to the port above the bind's", bound.probe("s1", port=bound.port + 1))
        bound.delivers("s1", f"s1 through c1's {kind} {protocol} bind".encode())


def excluding_s2(net: Net) -> IpFilterWire:
    """The lab's external network, but s2's address in it: the two ranges around it."""
    network = ipaddress.ip_network(net.topology.external_network(net.family))
    excluded = ipaddress.ip_address(net.addr("s2"))
    return wire_ipfilter([(str(network[0]), str(excluded - 1)), (str(excluded + 1), str(network[-1]))])


@pytest.mark.clause("RAB-03")
@pytest.mark.parametrize(("kind", "protocol"), BIND_KINDS, ids=BIND_IDS)
def test_a_peer_excluded_inside_an_included_range_is_dropped_before_and_after_an_allowed_one(
        net: Net, kind: str, protocol: str) -> None:
    """c1's bind, approved for the external network but s2's address in it: s2 comes first
    and reaches the fw and goes no further, unanswered; then s1 (in the network) reaches c1
    through the bind (content compared); then s2 again gets nowhere."""
    with dropped_silently_meanwhile(net, "s2") as send, \
            approved_bind(net, kind, protocol, excluding_s2(net)) as bound:
        send("s2", "s2, excluded, before s1", bound.probe("s2"))
        bound.delivers("s1", f"s1 through c1's {kind} {protocol} bind".encode())
        send("s2", "s2, excluded, after s1", bound.probe("s2"))
        bound.nothing_more()


@pytest.mark.clause("RAB-03")
@pytest.mark.parametrize("ipfilter", ["empty", "null"])
@pytest.mark.parametrize(("kind", "protocol"), BIND_KINDS, ids=BIND_IDS)
def test_an_empty_ipfilter_blocks_every_peer_and_a_null_one_none(net: Net, kind: str, protocol: str,
                                                                  ipfilter: str) -> None:
    """c1's bind approved with an empty IpFilter: s1's first packet reaches the fw and goes
    no further, unanswered, and nothing reaches c1. Approved with a NULL IpFilter (no
    restriction): s2's own flow reaches c1 through it (content compared)."""
    if ipfilter == "empty":
        with dropped_silently_meanwhile(net, "s1") as send, \
                approved_bind(net, kind, protocol, wire_ipfilter([])) as bound:
            send("s1", "s1, to a bind approved with an empty IpFilter", bound.probe("s1"))
            bound.nothing_more()
        return
    with approved_bind(net, kind, protocol, None) as bound:
        bound.delivers("s2", f"s2 through c1's {kind} {protocol} bind, no IpFilter".encode())


# --- first packets that cannot open a connection ---------------------------------------------------

# A segment that cannot open a connection: its flags, and its payload
SEGMENTS = {"ack": ("A", b""), "fin": ("FA", b""), "rst": ("R", b""),
            "data": ("PA", b"data before any handshake")}


def segment(net: Net, kind: str, src: str, dst: str, dport: int) -> Packet:
    """A crafted TCP segment of ``kind`` (SEGMENTS) that starts no handshake."""
    flags, payload = SEGMENTS[kind]
    packet: Packet = ip(net, src, dst) / TCP(sport=probe_port(), dport=dport, flags=flags, seq=1000,
                                             ack=5000 if "A" in flags else 0)
    return packet / payload if payload else packet


def assert_opened_no_flow(net: Net, crafted: Packet) -> None:
    """The enforcer holds no flow of the crafted segment's (its source port is its own)."""
    if not net.own_enforcer:
        return
    sport = crafted[TCP].sport
    flows = [f["flow"] for f in net.call("flows", limit=10000) if f":{sport} ->" in f["flow"]]
    assert not flows, f"a segment that cannot open a connection opened {flows}"


def assert_segment_left_it_pending(net: Net, kind: str, action: Action, address: str,
                                   port: int) -> None:
    """c1's crafted ``kind`` segment to address:port, which the pending ``action`` would
    admit a connection to, reaches the fw and goes no further, unanswered, and opens no
    flow; then c1's own connection there gets through (echoed), in the row's mode: the
    segment did not use the action."""
    crafted = segment(net, kind, net.addr("c1"), address, port)
    assert_dropped_silently(net, [("c1", crafted)])
    assert_opened_no_flow(net, crafted)
    talk(net, "c1", address, port)
    assert_ran_in_mode(net, action)


@pytest.mark.clause("AFC-02")
@pytest.mark.parametrize("kind", SEGMENTS)
def test_a_segment_that_cannot_open_a_connection_leaves_a_grant_pending(net: Net, mode: str,
                                                                        kind: str) -> None:
    """With c1's single-use grant to s1 pending, c1 sends a crafted ACK, FIN, reset or data
    segment to the target: it reaches the fw and goes no further, unanswered, and opens no
    flow; then c1's own connection gets through (echoed): the segment did not use the grant."""
    dst, port = net.addr("s1"), next(PORTS)
    with net.client() as api, echo_server(net, "tcp", port):
        action = grant(net, api, (dst, port))
        assert_segment_left_it_pending(net, kind, action, dst, port)


@pytest.mark.clause("RDC-04")
@pytest.mark.parametrize("kind", SEGMENTS)
def test_a_segment_that_cannot_open_a_connection_leaves_a_redirect_pending(net: Net, mode: str,
                                                                           kind: str) -> None:
    """As for a grant: the segment to c1's redirect port goes no further and opens no flow;
    then c1's own connection to the port gets through to s1 (echoed)."""
    target = next(PORTS)
    with net.client() as api, echo_server(net, "tcp", target):
        (internal, port), (action,) = redirect(net, api, [(net.addr("s1"), target)])
        assert_segment_left_it_pending(net, kind, action, internal, port)


@pytest.mark.clause("RAB-02")
@pytest.mark.parametrize("kind", SEGMENTS)
@pytest.mark.parametrize("bind_kind", ["securenat", "firewall-client"])
def test_a_segment_that_cannot_open_a_connection_leaves_a_bind_waiting(net: Net, bind_kind: str,
                                                                       kind: str) -> None:
    """s1 sends the segment to c1's TCP bind, approved for s1: it goes no further and opens no
    flow; then s1's own connection reaches c1 through the bind (content compared)."""
    with dropped_silently_meanwhile(net, "s1") as send, \
            approved_bind(net, bind_kind, "tcp", only(net, "s1")) as bound:
        crafted = segment(net, kind, net.addr("s1"), bound.address, bound.port)
        send("s1", f"a crafted {kind} segment first", crafted)
        bound.delivers("s1", f"s1 through c1's {bind_kind} bind".encode())
    assert_opened_no_flow(net, crafted)
