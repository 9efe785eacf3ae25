"""Issue 13: nothing a SOCKS client or a relay's peer does raises out of the enforcer's
event loop. A client resets (SO_LINGER 0) at every step of every SOCKS path, a session
ends (end_session) while its connections wait or relay, a relay's peer resets or is
unreachable: each time the service goes on (c2's CONNECT relays its bytes back
unchanged), none of the loop's error counters moved, and what c1's connection held is
released (its SOCKS connections, its Firewall-client session).

The service does not depend on the topology (relays always leave from the fw's
external address), so these run routed, in both families.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from testbed import timeouts
from testbed.agent import SOCKS_STEPS
from testbed.clauses.helpers import FTP_GUID, assert_echoed, fw_session, socks_open
from testbed.lab import SOCKS_PORT, SOCKS_USERS
from testbed.plugin import SOCKS_BIND_TIMEOUT, Net

pytestmark = pytest.mark.topologies("routed")

ECHO_PORT, DNS_PORT = 21, 53  # primaries the lab policy allows c1 and c2: echo servers on s1


@pytest.fixture
def echo(socks_net: Net) -> Iterator[Net]:
    """socks_net, with s1 echoing on the FTP port (TCP) and the DNS port (UDP)."""
    s1, dst = socks_net.agent("s1"), socks_net.addr("s1")
    with s1.tcp_server(dst, ECHO_PORT), s1.udp_server(dst, DNS_PORT):
        yield socks_net


def errors(net: Net) -> dict[str, int]:
    return {k: v for k, v in net.call("status")["counters"].items() if k.startswith("errors")}


def socks_held_by(net: Net, node: str) -> int:
    top = net.call("status")["limits"]["socks_connections_per_client"]["top"]
    return next((n for address, n in top if address == net.addr(node)), 0)


def firewall_sessions(net: Net, node: str) -> list[dict[str, Any]]:
    return [s for s in net.call("sessions") if s["kind"] == "firewall-client"
            and s["client"] == net.addr(node)]


def assert_goes_on(net: Net, before: dict[str, int], within: float = timeouts.POSITIVE) -> None:
    """No error counted since ``before``; c1's connections and sessions gone (within
    ``within``); c2 served, its bytes back unchanged."""
    deadline = time.monotonic() + within
    while socks_held_by(net, "c1") or firewall_sessions(net, "c1"):
        assert time.monotonic() < deadline, \
            f"c1 still holds {socks_held_by(net, 'c1')} SOCKS connections, {firewall_sessions(net, 'c1')}"
        time.sleep(0.1)
    assert errors(net) == before, "an exception left the event loop"
    with socks_open(net, "c2", "bob", "connect", net.addr("s1"), ECHO_PORT) as other:
        assert other.reply is not None and other.reply["code"] == 0, (other.error, other.reply)
        assert_echoed(other.exchange(20_000), 20_000, "the other relay")
    assert net.call("ping") == {"pong": True}


def step(net: Net, name: str) -> dict[str, Any]:
    return dict(net.agent("c1").socks_step((net.fw_internal(), SOCKS_PORT), "alice", SOCKS_USERS["alice"],
                                           name, (net.addr("s1"), ECHO_PORT), (net.addr("s1"), DNS_PORT)))


@pytest.mark.parametrize("name", [s for s in SOCKS_STEPS if s != "connect-exchange"])
def test_a_client_reset_at_any_step(echo: Net, name: str) -> None:
    net = echo
    before = errors(net)
    result = step(net, name)
    assert result["reached"], result
    assert result["compared"] in (None, True), f"relayed bytes came back changed: {result}"
    # a client held (its bytes filled the buffer before its relay) is let go by its wait
    assert_goes_on(net, before, within=timeouts.POSITIVE + SOCKS_BIND_TIMEOUT)


def test_a_bind_s_peer_resets_its_relay(echo: Net) -> None:
    """A relay's peer fails: the BIND's peer resets mid-relay; the client's side ends."""
    net, s1 = echo, echo.agent("s1")
    before = errors(net)
    with socks_open(net, "c1", "alice", "bind", "0.0.0.0" if net.family == "ipv4" else "::", 0) as conn:
        assert conn.reply is not None and conn.reply["code"] == 0, conn.reply
        port = int(conn.reply["port"])
        net.call("retroactive_allow_bind", session=fw_session(net, "c1", "alice"), protocol="tcp",
                 address=net.fw_external(), port=port, protocol_guid=FTP_GUID)
        peer = s1.tcp_open(net.fw_external(), port)
        assert peer.connected, peer.error
        assert conn.accept() is not None
        assert peer.talk(b"half a message", expect=0) == b""
        assert conn.talk(b"", expect=14) == b"half a message"
        peer.reset()
        assert conn.ended(), "the relay outlived its peer"
    assert_goes_on(net, before)


def test_a_udp_target_that_is_unreachable(echo: Net) -> None:
    """A relay's peer fails: datagrams to a UDP port nobody listens on bring ICMP port
    unreachable to the association's socket; the association goes on."""
    net = echo
    before = errors(net)
    with socks_open(net, "c1", "alice", "udp", "0.0.0.0" if net.family == "ipv4" else "::", 0) as conn:
        assert conn.reply is not None and conn.reply["code"] == 0, conn.reply
        for _ in range(3):
            conn.udp(net.addr("s2"), DNS_PORT, b"anyone there?", expect_reply=False)  # no server on s2
        time.sleep(0.2)
        echoed = conn.udp(net.addr("s1"), DNS_PORT, b"still relayed", expect_reply=True)
        assert echoed["reply"] == b"still relayed", echoed
    assert_goes_on(net, before)


@pytest.mark.parametrize("command", ["connect", "bind", "udp"])
def test_end_session_while_its_connections_relay_or_wait(echo: Net, command: str) -> None:
    """end_session on a Firewall client's session: a CONNECT's relay goes on (its flow was
    admitted), a BIND's wait fails (reply 1: its bind went with the session), a UDP
    ASSOCIATE ends (its connection is closed); nothing raises."""
    net = echo
    before = errors(net)
    anywhere = "0.0.0.0" if net.family == "ipv4" else "::"
    host, port = (net.addr("s1"), ECHO_PORT) if command == "connect" else (anywhere, 0)
    with socks_open(net, "c1", "alice", command, host, port) as conn:
        assert conn.reply is not None and conn.reply["code"] == 0, conn.reply
        if command == "udp":
            echoed = conn.udp(net.addr("s1"), DNS_PORT, b"before", expect_reply=True)
            assert echoed["reply"] == b"before", echoed
        ended = net.call("end_session", session=fw_session(net, "c1", "alice"))
        assert ended["cancelled"] == []
        assert not firewall_sessions(net, "c1")
        if command == "connect":
            assert_echoed(conn.exchange(50_000), 50_000, "the relay after its session ended")
            assert not conn.ended(timeout=0.2)
        elif command == "bind":
            second = conn.accept()
            assert second is not None and second["code"] == 1, second
        else:
            assert conn.ended(), "the association outlived its session"
    assert_goes_on(net, before)
