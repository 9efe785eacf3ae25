"""RAB-06, RAB-07 and RAB-03 for UDP binds, with traffic: a SecureNAT client's bind (what an
application filter makes with ``bind_for_client``, as the TFTP filter does) and a Firewall
client's (a SOCKS UDP ASSOCIATE through the fw), each approved with RetroactiveAllowBind.

A drop is silent (``dropped_silently``: the probe reached the fw, and nothing answered it)
and shown at the fw too: nothing left it, on any interface, that carried the probe on."""

from __future__ import annotations

import ipaddress
import itertools
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from scapy.layers.inet import UDP
from scapy.packet import Packet, Raw

from testbed import socks5, timeouts
from testbed.agent import multiset_digest
from testbed.checks import expect_no_packet
from testbed.clauses.helpers import NEGATIVE, datagram, dropped_silently, ip, wait_until
from testbed.clauses.test_rab import allow, bind, only, state_of
from testbed.lab import GUIDS
from testbed.plugin import Net
from testbed.session_api import Flags, IpFilterWire, flag_names

TFTP = GUIDS["TFTP"]
# The ports of clients' binds and of peers: none twice in a lab, so that no conntrack
# entry of an earlier check (an admitted flow lives on) meets a later one
PORTS = itertools.count(17000)  # below the ephemeral ports and the fw's bind ports (20000-29999)
KINDS = ["securenat", "firewall-client"]
NO_FLAGS = Flags(0)


def securenat_bind(net: Net, client_port: int, flags: Flags, ipfilter: IpFilterWire | None) -> dict[str, Any]:
    """c1's port made reachable with bind_for_client and approved: the bind (its ``address``
    is where a peer sends: c1's own, or in NAT the fw's)."""
    session = net.session("c1")
    made = net.call("bind_for_client", session=session, protocol="udp", client_port=client_port)
    params: dict[str, Any] = {"session": session, "protocol": "udp", "address": made["address"][0],
                              "port": made["address"][1], "protocol_guid": TFTP,
                              "flags": flag_names(flags)}
    if ipfilter is not None:
        params["ipfilter"] = ipfilter
    approved = net.call("retroactive_allow_bind", **params)
    assert approved["result"] == "S_OK", approved
    return dict(approved["bind"])


def association(net: Net, flags: Flags, ipfilter: IpFilterWire | None) -> tuple[Any, int, int]:
    """alice's UDP ASSOCIATE from c1, approved: (the SOCKS connection, its session, the
    bind's port on the fw's first external address)."""
    conn, session, port = bind(net, command="udp")
    # the relay sends to the client endpoint it first heard from (this datagram policy drops)
    conn.udp(net.addr("s1"), 9, b"where I am", expect_reply=False)
    approved = allow(net, session, port, protocol="udp", flags=flags, ipfilter=ipfilter)
    assert approved["result"] == "S_OK", approved
    return conn, session, port


def sent_to(*targets: tuple[str, int | None]) -> Callable[[Packet], bool]:
    """A template of what must not leave the fw after probes that are to be dropped: a
    datagram to one of ``targets`` (address, port or None for any)."""
    wanted = [(ipaddress.ip_address(address), port) for address, port in targets]

    def a_datagram_there(pkt: Packet) -> bool:
        """a datagram to where a probe would have gone on"""
        return UDP in pkt and any(ipaddress.ip_address(pkt[UDP].underlayer.dst) == address
                                  and port in (None, pkt[UDP].dport) for address, port in wanted)
    return a_datagram_there


def relay_of(conn: Any) -> tuple[str, int]:
    """Where a UDP ASSOCIATE's client sends its datagrams (the SOCKS reply's BND)."""
    assert conn.reply is not None
    return str(conn.reply["address"]), int(conn.reply["port"])


# --- RAB-06: receive only, unless BIDIRECTIONAL --------------------------------------------------

@pytest.mark.clause("RAB-06")
@pytest.mark.parametrize("bidirectional", [False, True], ids=["receive-only", "bidirectional"])
def test_a_securenat_udp_bind_answers_only_with_bidirectional(net: Net, bidirectional: bool) -> None:
    """s1 sends to c1's bind and c1 answers it from the bound port (the flow's reply
    direction): without BIDIRECTIONAL the answer is dropped silently at the fw; with it
    s1 gets it. Either way c1's datagram from that port to a peer that never sent to it
    (s2) is dropped silently at the fw."""
    c1, s1, s2 = net.agent("c1"), net.agent("s1"), net.agent("s2")
    client_port, stranger_port = next(PORTS), next(PORTS)
    question = f"to c1's bind, {net.family}".encode()
    with c1.udp_server(net.addr("c1"), client_port, echo=True) as client, \
            s2.udp_server(net.addr("s2"), stranger_port, echo=False) as stranger:
        made = securenat_bind(net, client_port, Flags.BIDIRECTIONAL if bidirectional else NO_FLAGS,
                              only(net, "s1"))
        since = time.time()
        with dropped_silently(net, "c1") as drop:
            drop.send("c1's datagram from the bound port to a peer that never sent to it",
                      datagram(net, net.addr("c1"), net.addr("s2"), client_port, stranger_port, b"unasked"))
            asked = s1.udp_send(made["address"][0], made["address"][1], question, expect_reply=True,
                                timeout=timeouts.POSITIVE if bidirectional else NEGATIVE)
            got = client.stats()
            assert got["digest"] == multiset_digest([question]), f"the datagram did not reach c1: {got}"
            assert got["bytes_out"] == len(question), "c1 did not answer"
            peer_port = asked["local"][1]
            dropped = [(net.addr("s2"), stranger_port)]
            if bidirectional:
                assert asked["reply"] == question, asked
            else:
                assert asked["reply"] is None, f"c1's answer reached s1 without BIDIRECTIONAL: {asked}"
                drop.sent("c1's answer to s1 without BIDIRECTIONAL",
                          ip(net, net.addr("c1"), net.addr("s1")) / UDP(sport=client_port, dport=peer_port))
                dropped.append((net.addr("s1"), peer_port))
            # once s1 has sent too, the bound port answers s1's port alone: not s2, nor
            # another port of s1's (a peer is an address and a port)
            drop.send("c1's datagram from the bound port to a peer that never sent, after s1 did",
                      datagram(net, net.addr("c1"), net.addr("s2"), client_port, stranger_port, b"later"))
            drop.send("c1's datagram from the bound port to another port of s1's",
                      datagram(net, net.addr("c1"), net.addr("s1"), client_port, peer_port + 1, b"there"))
            dropped.append((net.addr("s1"), peer_port + 1))
        expect_no_packet(net.fw_sent(since), sent_to(*dropped), timeout=0)
        assert stranger.stats()["accepted"] == 0


@pytest.mark.clause("RAB-06")
@pytest.mark.parametrize("bidirectional", [False, True], ids=["receive-only", "bidirectional"])
def test_a_firewall_client_s_udp_bind_answers_only_with_bidirectional(net: Net, bidirectional: bool) -> None:
    """s1 sends to alice's UDP ASSOCIATE and the datagram is relayed to her; her answer to s1
    through the relay is dropped silently at the fw without BIDIRECTIONAL, and reaches s1
    with it. Either way her datagram to a peer that never sent (s2) is dropped silently."""
    s1, s2 = net.agent("s1"), net.agent("s2")
    peer_port, stranger_port = next(PORTS), next(PORTS)
    question, answer = f"to alice, {net.family}".encode(), f"from alice, {net.family}".encode()
    conn, _, port = association(net, Flags.BIDIRECTIONAL if bidirectional else NO_FLAGS, only(net, "s1"))
    relay, relay_port = relay_of(conn)

    def to_relay(address: str, port: int, payload: bytes) -> Packet:
        """alice's datagram through the relay to address:port, as the relay receives it"""
        return (ip(net, net.addr("c1"), relay) / UDP(dport=relay_port)
                / Raw(socks5.datagram(address, port, payload)))

    with conn, s1.udp_server(net.addr("s1"), peer_port, echo=False) as peer, \
            s2.udp_server(net.addr("s2"), stranger_port, echo=False) as stranger:
        s1.send(datagram(net, net.addr("s1"), net.fw_external(0), peer_port, port, question))
        got = conn.udp(None, 0, b"", expect_reply=True)
        assert (got["reply"], got["from"]) == (question, [net.addr("s1"), peer_port]), got
        since = time.time()
        dropped = [(net.addr("s2"), stranger_port)]
        with dropped_silently(net, "c1") as drop:
            conn.udp(net.addr("s2"), stranger_port, b"unasked", expect_reply=False)
            drop.sent("alice's datagram to a peer that never sent to her",
                      to_relay(net.addr("s2"), stranger_port, b"unasked"))
            conn.udp(net.addr("s1"), peer_port, answer, expect_reply=False)
            if bidirectional:
                wait_until(lambda: peer.stats()["accepted"] == 1, "alice's answer did not reach s1")
                assert peer.stats()["digest"] == multiset_digest([answer])
            else:
                drop.sent("alice's answer to s1 without BIDIRECTIONAL",
                          to_relay(net.addr("s1"), peer_port, answer))
                dropped.append((net.addr("s1"), peer_port))
        expect_no_packet(net.fw_sent(since), sent_to(*dropped), timeout=0)
        assert stranger.stats()["accepted"] == 0 and peer.stats()["accepted"] == int(bidirectional)


# --- RAB-03 for UDP: the IpFilter -----------------------------------------------------------------

@pytest.mark.clause("RAB-03")
@pytest.mark.parametrize("kind", KINDS)
def test_a_udp_bind_s_ipfilter_drops_excluded_peers_silently(net: Net, kind: str) -> None:
    """Only s1 included: s2's datagram is dropped silently at the fw, and goes no further (not
    to the client); s1's then reaches the client whole."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    sport = next(PORTS)
    excluded, included = f"from s2, {kind}".encode(), f"from s1, {kind}".encode()
    if kind == "securenat":
        client_port = next(PORTS)
        with c1.udp_server(net.addr("c1"), client_port, echo=False) as client:
            address, port = securenat_bind(net, client_port, NO_FLAGS, only(net, "s1"))["address"]
            since = time.time()
            with dropped_silently(net, "s2") as drop:
                drop.send("a datagram from s2, which the filter leaves out",
                          datagram(net, net.addr("s2"), address, sport, port, excluded))
            expect_no_packet(net.fw_sent(since), sent_to((net.addr("c1"), client_port)), timeout=0)
            assert client.stats()["accepted"] == 0
            s1.send(datagram(net, net.addr("s1"), address, sport, port, included))
            wait_until(lambda: client.stats()["accepted"] == 1, "s1's datagram did not reach c1")
            assert client.stats()["digest"] == multiset_digest([included])
        return
    conn, _, port = association(net, NO_FLAGS, only(net, "s1"))
    with conn:
        address = net.fw_external(0)
        since = time.time()
        with dropped_silently(net, "s2") as drop:
            drop.send("a datagram from s2, which the filter leaves out",
                      datagram(net, net.addr("s2"), address, sport, port, excluded))
        expect_no_packet(net.fw_sent(since), sent_to((net.addr("c1"), None)), timeout=0)
        assert conn.udp(None, 0, b"", expect_reply=True, timeout=0.1)["reply"] is None
        s1.send(datagram(net, net.addr("s1"), address, sport, port, included))
        got = conn.udp(None, 0, b"", expect_reply=True)
        assert (got["reply"], got["from"]) == (included, [net.addr("s1"), sport]), got


# --- RAB-07: INCREASE_RECEIVE_BUFFER ------------------------------------------------------------

INCREASE = Flags.INCREASE_RECEIVE_BUFFER
SIZE = 1000  # bytes of each datagram of a burst
QUEUE_BUFFER = 4096  # the queue's buffer asked of the kernel (which doubles it) for the SecureNAT check
# Datagrams of a burst into the queue: 20 KB of payload alone, past its 8 KiB; some 50 KB
# of queue, well under the increased buffer. While the kernel does not know the flow's
# verdict each datagram is a new flow: two bursts stay under the 50 a peer may start at
# once (limits.new_flows_per_second's burst), the rest of which goes nowhere.
QUEUED_BURST = 20


def queue_counters(net: Net) -> tuple[int, int]:
    """The fw's NFQUEUE: (packets waiting for the enforcer, packets the kernel dropped for
    want of room: user_dropped and queue_dropped)."""
    for line in net.lab.tb.run("fw", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.splitlines():
        number, _, waiting, _, _, queue_dropped, user_dropped, *_ = map(int, line.split())
        if number == 0:  # the lab's queue
            return waiting, queue_dropped + user_dropped
    raise AssertionError("the fw has no NFQUEUE 0")


def delivered(net: Net) -> int:
    """Packets the fw's kernel has handed to its own transport protocols (IP's and IPv6's
    InDelivers): a burst to a socket of the fw has reached it, or been dropped there,
    once this has grown by its length. (The fw's capture may miss packets of a burst.)"""
    snmp = net.lab.tb.run("fw", ["cat", "/proc/net/snmp", "/proc/net/snmp6"]).stdout.splitlines()
    ip4 = [line.split() for line in snmp if line.startswith("Ip: ")]
    ip6 = next(int(line.split()[1]) for line in snmp if line.startswith("Ip6InDelivers "))
    return int(ip4[1][ip4[0].index("InDelivers")]) + ip6


def socket_memory(net: Net, port: int) -> dict[str, int]:
    """The fw's UDP socket bound on its external address and ``port`` (the bind's; the relay
    port facing the client has the same number on the internal address), as ``ss -m``
    shows it: ``rb`` its receive buffer, ``d`` the datagrams it dropped for want of room."""
    address = net.fw_external(0) if net.family == "ipv4" else f"[{net.fw_external(0)}]"
    out = net.lab.tb.run("fw", ["ss", "-H", "-u", "-a", "-n", "-m", "src", f"{address}:{port}"]).stdout
    found = re.search(r"skmem:\(r\d+,rb(\d+),.*,d(\d+)\)", out)
    assert found is not None, f"no UDP socket of the fw on port {port}: {out!r}"
    return {"rb": int(found.group(1)), "d": int(found.group(2))}


def queued_burst(net: Net, flags: Flags) -> tuple[dict[str, Any], int, dict[str, Any], str]:
    """A burst from s1 opens a flow to a new SecureNAT bind of c1's (approved with ``flags``)
    while the enforcer reads nothing: (the bind, the datagrams the queue lost, what c1 got,
    the digest of what s1 sent)."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    client_port = next(PORTS)
    with c1.udp_server(net.addr("c1"), client_port, echo=False) as client:
        made = securenat_bind(net, client_port, flags, only(net, "s1"))
        waiting, dropped = queue_counters(net)
        with net.enforcer.paused():
            burst = s1.udp_burst(made["address"][0], made["address"][1], QUEUED_BURST, SIZE,
                                 expect_replies=False)
            assert burst["sent"] == QUEUED_BURST, burst
            wait_until(lambda: sum(queue_counters(net)) - waiting - dropped == QUEUED_BURST,
                       "the burst did not reach the queue (or not all of it)")
        lost = queue_counters(net)[1] - dropped
        wait_until(lambda: client.stats()["accepted"] == QUEUED_BURST - lost,
                   f"of {QUEUED_BURST} datagrams, {lost} lost in the queue, the rest did not reach c1")
        return made, lost, client.stats(), str(burst["digest"])


@pytest.mark.reconfigures  # it starts the firewall in its own configuration first
@pytest.mark.clause("RAB-07")
def test_increase_receive_buffer_on_a_securenat_udp_bind(net: Net) -> None:
    """A SecureNAT bind's flow runs in kernel mode: what the fw holds of it is the queue,
    where its datagrams wait until the kernel knows its verdict. With the queue's buffer
    cut to 4 KiB, a burst that opens the flow while the enforcer reads nothing (paused)
    loses datagrams in the queue, and the kernel counts them; with INCREASE_RECEIVE_BUFFER
    the queue's buffer is the increased one (the bind says which) and the same burst
    arrives whole."""
    net.enforcer.restart(dataplane={"receive_buffer": QUEUE_BUFFER})
    # first without: the queue's buffer, once increased, stays so
    made, lost, got, _ = queued_burst(net, NO_FLAGS)
    assert made["receive_buffer"] is None, made
    assert lost > 0, f"all {QUEUED_BURST} datagrams fit a 4 KiB queue: this check cannot tell"
    made, lost, got, sent = queued_burst(net, INCREASE)
    assert made["receive_buffer"] == net.call("status")["receive_buffer"] >= 1 << 20, made
    assert lost == 0 and got["digest"] == sent, got


def socket_burst(net: Net, flags: Flags, count: int | None = None) -> tuple[int, int, dict[str, Any],
                                                                              list[bytes]]:
    """alice's UDP ASSOCIATE (approved with ``flags``) gets s1's flow; the enforcer admits
    its first datagram, then ``count`` more (None: more payload than the socket's buffer
    holds) arrive while the relay reads nothing: (the bind's socket's buffer, the
    datagrams it dropped, what alice got, what s1 sent)."""
    s1, sport = net.agent("s1"), next(PORTS)
    conn, session, port = association(net, flags, only(net, "s1"))
    with conn:
        buffer = socket_memory(net, port)["rb"]
        assert state_of(net, session, port)["receive_buffer"] == (buffer if flags else None)
        count = buffer // SIZE + 16 if count is None else count
        address = net.fw_external(0)
        s1.send(datagram(net, net.addr("s1"), address, sport, port, b"the flow's first"))
        assert conn.udp(None, 0, b"", expect_reply=True)["reply"] == b"the flow's first"
        payloads = [i.to_bytes(4, "big") + bytes(SIZE - 4) for i in range(count)]
        before = delivered(net)
        with net.enforcer.paused():
            s1.send([datagram(net, net.addr("s1"), address, sport, port, p) for p in payloads])
            wait_until(lambda: delivered(net) - before >= count, "the burst did not reach the fw")
        got = conn.udp_receive(count, timeout=NEGATIVE)
        assert got["from"] == [[net.addr("s1"), sport]], got
        return buffer, socket_memory(net, port)["d"], got, payloads


@pytest.mark.clause("RAB-07")
def test_increase_receive_buffer_on_a_firewall_client_s_udp_bind(net: Net) -> None:
    """A Firewall client's UDP bind is a socket of the fw, which the relay reads. A burst
    of more payload than the socket's default buffer holds, arriving while the relay reads
    nothing (the enforcer paused), loses datagrams at that socket (its drop count); with
    INCREASE_RECEIVE_BUFFER the socket's buffer is the increased one (the bind says so) and
    the same burst reaches the client whole."""
    default, dropped, got, sent = socket_burst(net, NO_FLAGS)
    count = len(sent)
    assert dropped > 0, f"all {count} datagrams fit the default buffer ({default} B): this check cannot tell"
    assert got["received"] == count - dropped, got
    buffer, dropped, got, sent = socket_burst(net, INCREASE, count)
    assert buffer >= 4 * count * SIZE, f"the increased buffer ({buffer} B) is too small for this check"
    assert dropped == 0 and got["received"] == count and got["digest"] == multiset_digest(sent), got
