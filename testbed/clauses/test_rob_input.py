"""ROB-04: malformed and random input at every interface of the fw, end to end.

Packets: seeded random and malformed frames (random protocols, every TCP flag
combination, fragments, IPv6 extension headers, truncated headers, bad lengths and
header fields) sent from a client to the fw's internal interface and from a server to
its external one, addressed through the fw and to the fw's own addresses, its
redirect and bind ports included. None of them is one that policy or a permission
lets open a flow (those the generator makes are turned into near misses: a bare SYN
gets a FIN, a datagram another port), so nothing may cross: every frame the fw sends
a host is checked against what was sent (each packet carries its number in the IPv4
ID or IPv6 flow label), and every admission in the enforcer's decision log is checked
against the lab policy and the test's own grants, worked out here. Then the grants
made before the packets are still pending, the enforcer still admits them and an
allowed primary (their data compared), and it logged no error.

Control requests and SOCKS messages: malformed lines on the control socket and
malformed handshakes to the SOCKS service each get the error answer they call for
(or a clean close), never a success; then the enforcer goes on serving and deciding.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import (
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from testbed.checks import expect_no_packet
from testbed.clauses.helpers import FTP_GUID, NEGATIVE, assert_echoed, fw_session, grant, socks_open
from testbed.fuzz import Allowed, Fuzz, flow_of
from testbed.lab import CONTROL_REQUEST_LIMIT, SOCKS_PORT, SOCKS_USERS
from testbed.plugin import Net
from testbed.session_api import ERRORS, Flags

SEED = int(os.environ.get("PINHOLE_FUZZ_SEED", "20261204"))
PACKETS = 600  # per side
BATCH = 150  # packets per send: what the enforcer decides of them stays within its decision log
GRANTED, REDIRECTED = 30001, 30002  # the grant's and the redirect's target ports on s1


def signature(data: bytes, hops: int = 0) -> tuple[int, int, int, int] | None:
    """(IP version, number, protocol or first next header, TTL ``hops`` on): the same for
    a packet sent and its copy forwarded ``hops`` routers on."""
    if len(data) >= 20 and data[0] >> 4 == 4:
        return 4, int.from_bytes(data[4:6], "big"), data[9], data[8] + hops
    if len(data) >= 40 and data[0] >> 4 == 6:
        return 6, int.from_bytes(data[1:4], "big") & 0xFFFFF, data[6], data[7] + hops
    return None


# --- helpers --------------------------------------------------------------------------------------

def last_decision_at(net: Net) -> float:
    recent = net.call("decisions", limit=1)
    return float(recent[-1]["at"]) if recent else 0.0


def decisions_since(net: Net, at: float) -> list[dict[str, Any]]:
    """The decisions after ``at``, once the enforcer has caught up with what was sent;
    all of them (the log keeps 512: fewer must be new)."""
    count, steady = -1, 0
    while steady < 3:
        new = [d for d in net.call("decisions", limit=10000) if d["at"] > at]
        steady = steady + 1 if len(new) == count else 0
        count = len(new)
        time.sleep(0.05)
    assert count < 512, f"{count} decisions in one batch: the log may have lost some"
    return new


@contextmanager
def enforcer_watch(net: Net) -> Iterator[None]:
    """The enforcer must live through the block without an error: its packet path counts
    none, and its log gains no traceback. (Another firewall: the block's packets judge it.)"""
    if not net.own_enforcer:
        yield
        return
    errors = net.call("status")["counters"].get("errors", 0)
    log = net.enforcer.log_path
    offset = log.stat().st_size if log.exists() else 0
    yield
    assert net.enforcer.running, f"the enforcer died:\n{net.enforcer.log_tail()}"
    assert net.call("ping") == {"pong": True}
    assert net.call("status")["counters"].get("errors", 0) == errors, "the packet path raised"
    with log.open("rb") as f:
        f.seek(offset)
        written = f.read().decode(errors="replace")
    assert "Traceback" not in written, f"the enforcer logged an exception:\n{written[-3000:]}"


def still_deciding(net: Net) -> None:
    """An allowed primary still opens and carries data both ways (compared), and a
    datagram of one is answered."""
    c1, s1, s2 = net.agent("c1"), net.agent("s1"), net.agent("s2")
    with s1.tcp_server(net.addr("s1"), 21), s2.udp_server(net.addr("s2"), 53):
        assert_echoed(c1.tcp_connect(net.addr("s1"), 21, send_bytes=50_000), 50_000, "an allowed primary")
        answer = net.agent("c2").udp_send(net.addr("s2"), 53, b"still deciding", expect_reply=True)
        assert answer["reply"] == b"still deciding", answer


# --- packets at every interface ------------------------------------------------------------------

@pytest.mark.clause("ROB-04")
def test_random_and_malformed_packets_at_every_fw_interface_admit_nothing(net: Net) -> None:
    """1200 random and malformed packets from both sides, through the fw and to its own
    addresses: nothing crosses, the decision log admits nothing, grants made before are
    still pending and work, and so does a primary."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    fw_int_mac = net.mac("fw", net.topology.fw_internal_iface)
    fw_ext_mac = net.mac("fw", net.topology.fw_external_iface)
    senders = {"internal": (c1, net.iface("c1"), net.mac("c1"), fw_int_mac),
               "external": (s1, net.iface("s1"), net.mac("s1"), fw_ext_mac)}
    any_address = "0.0.0.0" if net.family == "ipv4" else "::"
    rng = random.Random(f"{SEED}-{net.lab.variant}-{net.family}")
    with enforcer_watch(net), net.client() as api, \
            socks_open(net, "c1", "alice", "bind", any_address, 0) as bound:
        # pending before the packets come: a grant, a user-mode redirect, a SOCKS bind
        action = grant(net, api, (net.addr("s1"), GRANTED))
        (internal, port), (redirect,) = api.redirect_connections(
            net.session("c1"), [(net.addr("s1"), REDIRECTED)], protocol_guid=FTP_GUID,
            flags=Flags.NO_KERNEL_MODE)
        assert bound.connected and bound.reply is not None and bound.reply["code"] == 0, bound.error
        bind_port = int(bound.reply["port"])
        allowed = Allowed(net)
        allowed.grant(action.id, ("tcp", net.addr("c1"), net.addr("s1"), GRANTED))
        allowed.grant(redirect.id, ("tcp", net.addr("c1"), internal, port),
                      ("tcp", net.addr("c1"), net.addr("s1"), REDIRECTED))
        fuzz = Fuzz(net, rng, allowed, [GRANTED, REDIRECTED, port, bind_port])
        malformed = net.call("status")["counters"].get("malformed", 0)
        sent: dict[tuple[int, int, int, int], tuple[str, bytes]] = {}
        decided: list[dict[str, Any]] = []
        count = 0
        sniffers = {node: net.agent(node).sniff(net.iface(node)) for node in ("c1", "c2", "s1", "s2")}
        marker = last_decision_at(net)

        def catch_up() -> None:
            nonlocal marker
            new = decisions_since(net, marker)
            decided.extend(new)
            marker = new[-1]["at"] if new else marker

        try:
            for _ in range(PACKETS // BATCH):
                for side, (agent, iface, mac, fw_mac) in senders.items():
                    packets = [fuzz.packet(side) for _ in range(BATCH)]
                    if side == "internal":  # at the redirect port, before conntrack: a TCP
                        # header longer than the packet (parse refuses it)
                        ip = IP(src=net.addr("c1"), dst=internal) if net.family == "ipv4" else \
                            IPv6(src=net.addr("c1"), dst=internal)
                        packets.append(bytes(ip / TCP(sport=40000, dport=port, flags="S", dataofs=15)))
                    count += len(packets)
                    for data in packets:
                        sig = signature(data)
                        if sig is not None:
                            sent[sig] = (side, data)
                    ethertype = 0x0800 if net.family == "ipv4" else 0x86DD
                    agent.send([Ether(src=mac, dst=fw_mac, type=ethertype) / Raw(d) for d in packets],
                               iface=iface)
                    catch_up()
            time.sleep(NEGATIVE)  # for anything still on its way
            catch_up()
        finally:
            for sniffer in sniffers.values():
                sniffer.stop()

        # nothing crossed: no copy of a packet sent, from the fw's MAC, at any host
        crossed, from_fw = [], 0
        for node, sniffer in sniffers.items():
            fw_mac = fw_int_mac if node.startswith("c") else fw_ext_mac
            for frame in sniffer.packets():
                if Ether not in frame or frame[Ether].src != fw_mac:
                    continue
                from_fw += 1
                found = sent.get(signature(bytes(frame[Ether].payload), hops=1) or (0, 0, 0, 0))
                if found is not None:
                    crossed.append(f"{found[0]} side -> {node}: {frame.summary()}")
        assert not crossed, "packets crossed the fw that nothing allows:\n" + "\n".join(crossed[:20])

        # the decision log: the packets reached the enforcer from both sides and at the
        # fw's own addresses, and it admitted nothing that the policy or the grants do not
        admitted = [d for d in decided if d["verdict"] != "drop"]
        assert all(allowed.decision(d) for d in admitted), admitted
        flows = [flow_of(d["flow"]) for d in decided]
        internal_net = ipaddress.ip_network(net.topology.internal_network(net.family))
        assert any(ipaddress.ip_address(f[1]) in internal_net for f in flows), "none from the inside"
        assert any(ipaddress.ip_address(f[1]) not in internal_net for f in flows), "none from the outside"
        assert any((f[3], f[4]) == (internal, port) for f in flows), "none at the redirect port"
        assert any(f[3] in (net.fw_external(0), net.fw_external(1)) for f in flows), "none at a bind port"
        now_malformed = net.call("status")["counters"].get("malformed", 0)
        assert now_malformed > malformed
        print(f"{count} packets sent, {len(decided)} decided, {len(admitted)} admitted, "
              f"{now_malformed - malformed} refused as malformed; {from_fw} frames from the fw "
              "at the hosts, none a copy of one sent")

        # what was pending still is, and works; what was bound got nothing
        assert action.state == "pending" and redirect.state == "pending"
        (bind,) = [b for b in net.call("binds", session=fw_session(net, "c1", "alice"))
                   if b["address"][1] == bind_port]
        assert bind["state"] == "pending" and bind["admitted"] == 0, bind
        assert bound.accept(timeout=0.2) is None, "a peer connected through a bind nobody approved"
        with s1.tcp_server(net.addr("s1"), GRANTED), s1.tcp_server(net.addr("s1"), REDIRECTED):
            for dst, dport in ((net.addr("s1"), GRANTED), (internal, port)):
                assert_echoed(c1.tcp_connect(dst, dport, send_bytes=20_000), 20_000,
                              f"the connection to {dst} port {dport}, pending through the fuzzing")
        assert action.state == "consumed" and redirect.state == "consumed"
        still_deciding(net)


# --- control requests ----------------------------------------------------------------------------

def control_lines(net: Net, rng: random.Random) -> list[bytes]:
    """Malformed requests: random bytes, valid ones cut short or with bytes changed,
    wrong types, numbers Python will not convert, deep nesting."""
    session = net.session("c1")
    valid = [json.dumps({"id": i, "method": m, "params": p}).encode() for i, (m, p) in enumerate([
        ("allow_future_connect", {"session": 10**6, "address": net.addr("s1"), "port": 20021,
                                  "protocol_guid": FTP_GUID}),
        ("retroactive_allow_bind", {"session": 10**6, "address": net.fw_external(), "port": 1,
                                    "protocol_guid": FTP_GUID, "ipfilter": {"ranges": []}}),
        ("decisions", {"limit": 3}), ("binds", {}), ("action", {"action": 10**6}),
    ])]
    lines = [rng.randbytes(rng.randrange(1, 120)).replace(b"\n", b"") for _ in range(100)]
    for line in valid:
        lines += [line[:rng.randrange(len(line))] for _ in range(20)]
        for _ in range(20):
            broken = bytearray(line)
            broken[rng.randrange(len(broken))] = rng.choice(b'{}[]":,0\\\xff ')
            lines.append(bytes(broken).replace(b"\n", b""))
    base = {"session": session, "address": net.addr("s1"), "port": 20021, "protocol_guid": FTP_GUID}
    wrongs: list[dict[str, Any]] = [
        {"protocol": ["tcp"]}, {"protocol": {}}, {"protocol": 6.0}, {"session": [session]}, {"address": 1},
        {"port": "21"}, {"flags": {"TIMEOUT": 1}}, {"protocol_guid": []}, {"filter": "1"},
        {"context": [0] * 4000}, {"extra": 1}]
    for wrong in wrongs:
        lines.append(json.dumps({"id": "typed", "method": "allow_future_connect",
                                 "params": {**base, **wrong}}).encode())
    lines += [b'{"id": ' + b"7" * 5000 + b', "method": "ping"}',
              b'{"id": 1, "method": "ping", "params": {"x": ' + b"-" + b"9" * 4400 + b"}}",
              b"[" * 10000, b'{"id": 2, "method": "ping", "params": {"a": NaN}}', b"\xff\xfe{\x00}",
              b'{"id": 3, "method": "\\ud800"}']
    return lines


@pytest.mark.clause("ROB-04")
def test_malformed_control_requests_get_error_replies_and_the_enforcer_goes_on(net: Net) -> None:
    """Random, cut short, altered and mistyped requests on the control socket each get a
    reply (a documented error, never an internal one); a line longer than the limit
    closes its connection, and so does a client that hangs up before reading its
    replies; the enforcer then serves and decides as before."""
    rng = random.Random(f"{SEED}-control-{net.family}")
    lines = control_lines(net, rng)
    documented = set(ERRORS)
    with enforcer_watch(net):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(net.enforcer.control_socket()))
            reader = sock.makefile("rb")
            for line in lines:
                sock.sendall(line + b"\n")
                answer = reader.readline()
                assert answer, f"no reply to {line[:100]!r}:\n{net.enforcer.log_tail()}"
                reply = json.loads(answer)
                # (a listing cut to its limit says how many more beside its result)
                assert set(reply) in ({"id", "result"}, {"id", "result", "more"}, {"id", "error"}), \
                    (line[:100], reply)
                if "more" in reply:
                    assert isinstance(reply["result"], list) and type(reply["more"]) is int \
                        and reply["more"] > 0, (line[:100], reply)
                if "error" in reply:
                    assert reply["error"]["name"] in documented, (line[:100], reply)
        # no newline within the limit; a request cut off by a hang-up; requests whose
        # replies nobody reads
        for tail in (b"x" * (CONTROL_REQUEST_LIMIT + 1), b'{"id": 1, "method": "pi',
                     b'{"method": "ping"}\n' * 50):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(net.enforcer.control_socket()))
                sock.sendall(tail)
                if len(tail) > CONTROL_REQUEST_LIMIT:  # answered, then closed
                    reader = sock.makefile("rb")
                    assert "request too large" in json.loads(reader.readline())["error"]["message"]
                    assert reader.readline() == b""
        with net.client() as api, net.agent("s1").tcp_server(net.addr("s1"), GRANTED):
            action = grant(net, api, (net.addr("s1"), GRANTED))
            assert_echoed(net.agent("c1").tcp_connect(net.addr("s1"), GRANTED, send_bytes=20_000), 20_000,
                          "the granted connection")
            assert action.state == "consumed"
        still_deciding(net)


# --- SOCKS messages ------------------------------------------------------------------------------

def reply(code: int) -> bytes:
    """A SOCKS5 failure reply as the service sends it (RFC 1928 section 6)."""
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


GENERAL_FAILURE, NOT_ALLOWED, HOST_UNREACHABLE, NO_COMMAND, NO_ADDRESS_TYPE = 1, 2, 4, 7, 8
SELECTED, LOGGED_IN = b"\x05\x02", b"\x05\x02\x01\x00"


def socks_cases(net: Net, rng: random.Random) -> list[tuple[bytes, bytes, bool]]:
    """(what a client sends, what the service must answer, whether it then closes)."""
    password = SOCKS_USERS["alice"].encode()
    login = b"\x05\x01\x02" + b"\x01\x05alice" + bytes((len(password),)) + password

    def to(host: str, port: int, command: int = 1) -> bytes:
        packed = ipaddress.ip_address(host).packed
        return bytes((5, command, 0, 1 if len(packed) == 4 else 4)) + packed + port.to_bytes(2, "big")

    s1, denied = net.addr("s1"), net.addr("s2", 1)
    mapped = f"::ffff:{net.topology.address('s1', 'ipv4')}"  # s1's IPv4 address, written as IPv6
    cases = [
        (b"\x04\x01\x00\x15\xc6\x33\x64\x15alice\x00", b"", True),  # SOCKS4
        (b"\x05\x00", b"", True),  # no method offered
        (b"GET / HTTP/1.1\r\nHost: fw\r\n\r\n", b"", True),
        (b"\x05\x01\x00", b"\x05\xff", True),  # no authentication: not acceptable
        (b"\x05\x02\x00\x01", b"\x05\xff", True),
        (b"\x05\x01\x02\x02\x05alice\x01x", SELECTED + b"\x01\x01", True),  # RFC 1929 version 2
        (b"\x05\x01\x02\x01\x00\x00", SELECTED + b"\x01\x01", True),  # no user name
        (b"\x05\x01\x02\x01\x05alice\x05wrong", SELECTED + b"\x01\x01", True),
        (b"\x05\x01\x02\x01\x03eve\x00", SELECTED + b"\x01\x01", True),
        (b"\x05\x01\x02\x01\x02\xff\xfe\x01x", SELECTED + b"\x01\x01", True),  # not UTF-8
        (login + b"\x04" + to(s1, 21)[1:], LOGGED_IN + reply(GENERAL_FAILURE), True),
        (login + to(s1, 21, command=0), LOGGED_IN + reply(NO_COMMAND), True),
        (login + to(s1, 21, command=0xFF), LOGGED_IN + reply(NO_COMMAND), True),
        (login + b"\x05\x01\x01" + to(s1, 21)[3:], LOGGED_IN + reply(GENERAL_FAILURE), True),
        (login + b"\x05\x01\x00\x05\x00\x15", LOGGED_IN + reply(NO_ADDRESS_TYPE), True),
        (login + b"\x05\x01\x00\x03\x08bad name\x00\x15", LOGGED_IN + reply(HOST_UNREACHABLE), True),
        (login + b"\x05\x01\x00\x03\x00\x00\x15", LOGGED_IN + reply(GENERAL_FAILURE), True),
        (login + b"\x05\x01\x00\x03\x0bexample.org\x00\x15", LOGGED_IN + reply(NO_ADDRESS_TYPE), True),
        (login + to(s1, 22), LOGGED_IN + reply(NOT_ALLOWED), True),  # SSH: nobody's
        (login + to(denied, 21), LOGGED_IN + reply(NOT_ALLOWED), True),  # the denied network
        (login + to(s1, 30500) + b"pipelined", LOGGED_IN + reply(NOT_ALLOWED), True),  # no grant
        (login + to(mapped, 21), LOGGED_IN + reply(NOT_ALLOWED), True),  # another form of s1
        (login[:2], b"", False),  # cut short: the service waits for the rest
        (login[:9], SELECTED, False),
        (login + to(s1, 21)[:6], LOGGED_IN, False),
    ]
    for _ in range(24):  # a random greeting and what follows: never a login, never a success
        cases.append((b"\x05" + rng.randbytes(rng.randrange(1, 60)), b"?", False))
    return cases


@pytest.mark.clause("ROB-04")
def test_malformed_socks_messages_get_the_answer_they_call_for(net: Net) -> None:
    """Broken greetings, logins and requests to the SOCKS service (RFC 1928, 1929) each get
    their failure answer and a close, cut-short ones only what came before; random ones
    never a login or a success; no denied CONNECT leaves the fw; then a valid CONNECT
    relays, compared, and the enforcer goes on deciding."""
    rng = random.Random(f"{SEED}-socks-{net.family}")
    cases = socks_cases(net, rng)
    c1, s1, s2 = net.agent("c1"), net.agent("s1"), net.agent("s2")
    with enforcer_watch(net), s1.sniff(net.iface("s1")) as at_s1, s2.sniff(net.iface("s2")) as at_s2:
        # those the service closes, up to the positive timeout; the others wait a second
        closing = [case for case in cases if case[2]]
        waiting = [case for case in cases if not case[2]]
        proxy = (net.fw_internal(), SOCKS_PORT)
        probes = c1.tcp_probes(*proxy, [c for c, _, _ in closing]) + \
            c1.tcp_probes(*proxy, [c for c, _, _ in waiting], timeout=1.0)
        for (sent, expected, closes), probe in zip(closing + waiting, probes, strict=True):
            what = f"{sent[:40]!r}: got {probe['received']!r}, closed {probe['closed']}"
            assert probe["connected"], what
            if expected == b"?":
                assert probe["received"] in (b"", b"\x05\xff", SELECTED, SELECTED + b"\x01\x01"), what
                continue
            assert probe["received"] == expected, what
            if closes:
                assert probe["closed"], what
        # the denied CONNECTs reached the service (they were answered) and left no SYN
        expect_no_packet(at_s1, TCP(dport=22, flags="S"))
        expect_no_packet(at_s1, TCP(dport=30500, flags="S"), timeout=0)
        expect_no_packet(at_s2, IP(dst=net.addr("s2", 1)) / TCP(flags="S") if net.family == "ipv4"
                         else IPv6(dst=net.addr("s2", 1)) / TCP(flags="S"), timeout=0)
    # every session the probes opened ended with its connection
    deadline = time.monotonic() + 3
    while any(s["kind"] == "firewall-client" for s in net.call("sessions")):
        assert time.monotonic() < deadline, net.call("sessions")
        time.sleep(0.05)
    with s1.tcp_server(net.addr("s1"), 21) as server, \
            socks_open(net, "c1", "alice", "connect", net.addr("s1"), 21) as relayed:
        assert relayed.reply is not None and relayed.reply["code"] == 0, (relayed.error, relayed.reply)
        assert_echoed(relayed.exchange(20_000), 20_000, "alice's relayed connection")
        assert server.stats()["accepted"] == 1
    still_deciding(net)
