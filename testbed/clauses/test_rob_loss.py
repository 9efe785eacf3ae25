"""ROB-06: a filtered TCP stream survives loss after the fw (SPEC rule 18).

The filtered stream is an FTP control connection in NAT: the FTP filter holds each
line back until it is complete and rewrites PASV/EPSV replies and PORT/EPRT commands
to other lengths, so every byte the receiver gets must come from what the filter
made, wherever the sender's retransmissions start and end.

- Crafted: the server's end of a control connection is Scapy's (on s1, a port of its
  own), reached by a redirect with the FTP filter on it; the client is a real socket
  on c1. Replies are dropped at c1 (iptables there: after the fw) and sent again
  coalesced, from the middle of a line, with new bytes after them, or ahead of a gap.
  The client's socket gets exactly what the filter made, once; the acknowledgements
  the server sees never run ahead of what the client has.
- Real loss, with real peers: iptables' statistic match in the fw drops a share of the
  TCP segments leaving it (both ways; control and data connections) while ftplib
  downloads in every mode, and uploads, through a published vsftpd; and a command sent
  in pieces loses its rewritten form after the fw once, so that Linux sends it again
  as it likes (it collapses small segments on retransmission). Files arrive whole
  (SHA-256), commands as the filter made them, in bounded time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import pytest
from scapy.layers.inet import TCP
from scapy.packet import Packet

from testbed import peers, timeouts
from testbed.checks import expect_no_packet, expect_packet
from testbed.clauses.helpers import ip
from testbed.clauses.test_app import (  # noqa: F401 (autouse: skips where peers are missing)
    _modes,
    _peers_installed,
    active_command,
    dialogue,
    published,
)
from testbed.lab import GUIDS
from testbed.plugin import App

MOD = 1 << 32  # TCP sequence numbers are counted modulo 2**32 (RFC 9293)
CRAFTED_PORT = 2100  # the crafted server's port on s1 (real servers keep port 21)
DATA_PORT = 5000  # the data port its PASV/EPSV replies name
LOSS = 0.05  # the share of segments leaving the fw that are dropped, for real loss
# Seconds a transfer may wait for any one thing under LOSS: TCP's exponential backoff
# after a few losses in a row takes some, a stalled stream takes forever
BOUND = 20.0
PUT_SIZE = 256 << 10

T = TypeVar("T")


def _tool(app: App) -> str:
    return "iptables" if app.family == "ipv4" else "ip6tables"


@contextmanager
def rule(app: App, node: str, spec: str) -> Iterator[None]:
    """An iptables rule in ``node`` ("TABLE CHAIN MATCH... -j TARGET", first in its
    chain) for the block; removed afterwards, whatever happened."""
    table, chain, *match = spec.split()
    app.lab.tb.run(node, [_tool(app), "-w", "-t", table, "-I", chain, *match])
    try:
        yield
    finally:
        app.lab.tb.run(node, [_tool(app), "-w", "-t", table, "-D", chain, *match], check=False)


def dropped(app: App, node: str, table: str, chain: str) -> int:
    """How many packets the DROP rules of a chain have dropped."""
    listed = app.lab.tb.run(node, [_tool(app), "-w", "-t", table, "-L", chain, "-v", "-x", "-n"])
    return sum(int(line.split()[0]) for line in listed.stdout.splitlines()
               if line.split()[2:3] == ["DROP"])


def reassembled(packets: list[Packet], isn: int) -> bytes:
    """The stream the TCP payloads of a capture make, placed by sequence number from
    ``isn`` (the first byte's): as far as it is contiguous. Copies must agree."""
    placed: dict[int, int] = {}
    for p in packets:
        payload = bytes(p[TCP].payload)
        start = (p[TCP].seq - isn) % MOD
        for i, byte in enumerate(payload):
            assert placed.setdefault(start + i, byte) == byte, \
                f"two copies of byte {start + i} differ: the fw sent other bytes again"
    n = 0
    while n in placed:
        n += 1
    return bytes(placed[i] for i in range(n))


def made_by_fw(at_client: Any, server: CraftedServer, lines: int) -> bytes:
    """What the fw has sent of the server's stream, seen at the client (where it may have
    been dropped), once it holds ``lines`` lines."""
    deadline = time.monotonic() + timeouts.POSITIVE
    while (made := reassembled(at_client.packets(), server.first)).count(b"\n") < lines:
        assert time.monotonic() < deadline, f"the fw sent {made!r} of the server's {lines} lines"
        time.sleep(0.02)
    return made


class CraftedServer:
    """The server end of a TCP connection on s1, every segment of it crafted: it answers
    the client's SYN, then sends the bytes of its stream as the test says, and reads the
    client's acknowledgements. s1's kernel, with no socket for it, is kept from resetting
    the connection. Stream offsets count from the first byte after the SYN."""

    ISN = MOD - 20  # near the wrap: the stream crosses it

    def __init__(self, app: App) -> None:
        self.app = app
        self.agent = app.agent("s1")
        self.address = app.addr("s1")
        self.peer: tuple[str, int] = ("", 0)
        self.ack = 0  # the client's next sequence number
        self.first = (self.ISN + 1) % MOD  # the sequence number of the stream's first byte
        self._held = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as held:
            held.enter_context(rule(self.app, "s1", f"filter OUTPUT -p tcp --sport {CRAFTED_PORT} "
                                                    "--tcp-flags RST RST -j DROP"))
            self.sniffer = held.enter_context(
                self.agent.sniff(self.app.iface("s1"), bpf=f"tcp port {CRAFTED_PORT}"))
            self._held = held.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._held.close()

    def accept(self, connect: Callable[[], T]) -> T:
        """Run ``connect`` (the client's connection through the fw) while answering its SYN."""
        with ThreadPoolExecutor(1) as pool:
            connecting = pool.submit(connect)
            syn = expect_packet(self.sniffer, TCP(dport=CRAFTED_PORT, flags="S"))
            self.peer = (syn[TCP].underlayer.src, syn[TCP].sport)
            self.ack = (syn[TCP].seq + 1) % MOD
            self.agent.send(self._segment("SA", self.ISN))
            return connecting.result()

    def send(self, start: int, data: bytes) -> None:
        """The stream's bytes from offset ``start`` on, in one segment."""
        self.agent.send(self._segment("PA", (self.first + start) % MOD) / data)

    def _segment(self, flags: str, seq: int) -> Packet:
        return ip(self.app, self.address, self.peer[0]) / TCP(
            sport=CRAFTED_PORT, dport=self.peer[1], flags=flags, seq=seq, ack=self.ack)

    def acknowledged(self) -> list[int]:
        """The stream offsets the client's acknowledgements name, as they reach the server
        (an earlier test's connection may still be closing)."""
        return [(p[TCP].ack - self.first) % MOD for p in self.sniffer.packets()
                if (p[TCP].underlayer.src, p[TCP].sport) == self.peer and p[TCP].flags.A]

    def wait_acknowledged(self, offset: int) -> None:
        """Until the client acknowledges the stream up to ``offset``, and never beyond."""
        deadline = time.monotonic() + timeouts.POSITIVE
        while offset not in self.acknowledged() and time.monotonic() < deadline:
            time.sleep(0.02)
        acks = self.acknowledged()
        assert offset in acks, f"the client never acknowledged offset {offset}: {acks}"
        assert max(acks) == offset, f"acknowledged past what was sent ({offset}): {acks}"


def pasv_reply(app: App) -> bytes:
    """The server's passive-mode reply: to be rewritten to name the fw."""
    if app.family == "ipv4":
        host = app.addr("s1").replace(".", ",")
        return f"227 Entering Passive Mode ({host},{DATA_PORT >> 8},{DATA_PORT & 255}).\r\n".encode()
    return f"229 Entering Extended Passive Mode (|||{DATA_PORT}|)\r\n".encode()


def assert_rewritten(app: App, made: bytes) -> None:
    """``made`` is the passive-mode reply as the filter rewrites it: a port of the fw, to
    which one redirect action (the filter saw the reply once) leads to the server's."""
    address = app.fw_internal()
    if app.family == "ipv4":
        found = re.fullmatch(rb"227 Entering Passive Mode \((\d+,\d+,\d+,\d+),(\d+),(\d+)\)\.\r\n",
                             made)
        assert found and found.group(1) == address.replace(".", ",").encode(), made
        port = int(found.group(2)) * 256 + int(found.group(3))
    else:
        found = re.fullmatch(rb"229 Entering Extended Passive Mode \(\|\|\|(\d+)\|\)\r\n", made)
        assert found, made
        port = int(found.group(1))
    leading = [a["redirect"]["internal"] for a in app.call("actions")
               if a.get("redirect", {}).get("target") == [app.addr("s1"), DATA_PORT]]
    assert leading == [[address, port]], (made, leading)


@dataclass
class Control:
    """A control connection from c1 through a redirect (the FTP filter on it) to the
    crafted server: the server, the client's socket, a capture at c1 of what the fw sends
    the client, and the redirect (the fw's address and port the client connected to)."""

    server: CraftedServer
    conn: Any
    at_client: Any
    via: list[Any]

    def counted(self, app: App) -> int:
        """How many of the server's packets the fw has seen on this flow."""
        flows = [f for f in app.call("flows", limit=1000) if f["redirect"] == self.via]
        assert len(flows) == 1, flows
        return int(flows[0]["packets_back"])


@contextmanager
def control_connection(app: App) -> Iterator[Control]:
    with app.client() as api:
        (address, port), _ = api.redirect_connections(
            app.session("c1"), [(app.addr("s1"), CRAFTED_PORT)], protocol_guid=GUIDS["FTP"],
            data_filter="ftp")
    c1 = app.agent("c1")
    with CraftedServer(app) as server, \
            c1.sniff(app.iface("c1"), bpf=f"tcp and src port {port}") as at_client:
        conn = server.accept(lambda: c1.tcp_open(address, port))
        assert conn.connected, f"the client's connection through the redirect: {conn.error}"
        try:
            yield Control(server, conn, at_client, [address, port])
        finally:
            conn.close()


@contextmanager
def lost_at_client(app: App) -> Iterator[None]:
    """What the fw sends the client is dropped on arrival (a capture there still sees it)."""
    with rule(app, "c1", f"filter INPUT -p tcp -s {app.fw_internal()} -j DROP"):
        yield


# --- crafted: the server sends again as it likes ---------------------------------------------

@pytest.mark.clause("ROB-06")
@pytest.mark.topologies("nat")
def test_replies_lost_after_the_fw_arrive_when_sent_again_coalesced(app: App) -> None:
    """A greeting and a passive-mode reply in three segments (the reply split), all lost
    after the fw, then sent again as one segment: the client gets the greeting and the
    rewritten reply, once; the server hears of all of it, and of no more."""
    greeting, reply = b"220 crafted\r\n", pasv_reply(app)
    stream = greeting + reply
    with control_connection(app) as c:
        with lost_at_client(app):
            c.server.send(0, greeting)
            c.server.send(len(greeting), reply[:20])
            c.server.send(len(greeting) + 20, reply[20:])
            made = made_by_fw(c.at_client, c.server, lines=2)
        assert made.startswith(greeting), made
        assert_rewritten(app, made[len(greeting):])
        c.server.wait_acknowledged(0)  # the client has nothing yet
        c.server.send(0, stream)
        assert c.conn.talk(b"", expect=len(made)) == made
        c.server.wait_acknowledged(len(stream))


@pytest.mark.clause("ROB-06")
@pytest.mark.topologies("nat")
def test_bytes_sent_again_from_mid_line_with_new_ones_or_ahead_of_a_gap(app: App) -> None:
    """A reply in two segments (the fw holds the first back until the second ends the
    line), lost after the fw, sent again from the middle of the first part: the whole
    rewritten line arrives, once. A line lost, then sent again with a new one in one
    segment: both arrive. A line ahead of a gap: the fw drops it (it saw it; nothing
    reached the client) until the gap is filled and the line comes again."""
    greeting, reply = b"220 crafted\r\n", pasv_reply(app)
    one, two, three, four = b"200 one\r\n", b"200 two\r\n", b"200 three\r\n", b"200 four\r\n"
    with control_connection(app) as c:
        c.server.send(0, greeting)
        assert c.conn.talk(b"", expect=len(greeting)) == greeting
        at = len(greeting)
        with lost_at_client(app):
            c.server.send(at, reply[:20])
            c.server.send(at + 20, reply[20:])
            made = made_by_fw(c.at_client, c.server, lines=2)[at:]
        assert_rewritten(app, made)
        c.server.send(at + 10, reply[10:30])  # from the middle of the part held back
        assert c.conn.talk(b"", expect=len(made)) == made
        c.server.send(at + 30, reply[30:])  # the rest again: the client has it already
        at += len(reply)
        c.server.wait_acknowledged(at)
        with lost_at_client(app):
            c.server.send(at, one)
            made_by_fw(c.at_client, c.server, lines=3)
        c.server.send(at, one + two)
        assert c.conn.talk(b"", expect=len(one + two)) == one + two
        at += len(one + two)
        c.server.wait_acknowledged(at)
        before = c.counted(app)
        c.server.send(at + len(three), four)  # ahead of "three"
        expect_no_packet(c.at_client, lambda p: TCP in p and b"four" in bytes(p[TCP].payload))
        assert c.counted(app) == before + 1, "the segment ahead of the gap never reached the fw"
        c.server.send(at, three)
        c.server.send(at + len(three), four)
        assert c.conn.talk(b"", expect=len(three + four)) == three + four
        c.server.wait_acknowledged(at + len(three + four))


# --- real loss, real peers ---------------------------------------------------------------------

@contextmanager
def random_loss_after_the_fw(app: App) -> Iterator[Callable[[], int]]:
    """``LOSS`` of the TCP segments leaving the fw (SYNs aside, whose retransmission
    takes a second) dropped at random, both ways, in the fw's mangle POSTROUTING: after
    the enforcer has seen and edited them. Yields how many have been dropped so far."""
    with rule(app, "fw", "mangle POSTROUTING -p tcp ! --tcp-flags SYN SYN -m statistic "
                         f"--mode random --probability {LOSS} -j DROP"):
        yield lambda: dropped(app, "fw", "mangle", "POSTROUTING")


@pytest.mark.clause("ROB-06")
@pytest.mark.topologies("nat")
def test_ftp_in_every_mode_through_random_loss_after_the_fw(app: App) -> None:
    """With one in twenty of the segments leaving the fw lost (control and data
    connections, both ways), ftplib downloads in every mode, then uploads, through a
    published vsftpd whose replies and the client's commands the filter rewrites to
    other lengths: every file arrives whole, and nothing stalls (no wait of the client's
    is longer than BOUND seconds)."""
    server = app.lab.peers.ftp(app.family, "vsftpd")
    address, port = published(app, server.address)
    tb = app.lab.tb
    modes = _modes(app, "ftplib", peers.FTP_MODES)
    with random_loss_after_the_fw(app) as lost:
        for mode in modes:
            got = peers.ftp_transfer(tb, "c1", "ftplib", address, mode, "get", peers.BIG_FILE,
                                     BOUND, port=port)
            assert got.ok and got.sha256 == server.files[peers.BIG_FILE], \
                f"{got.describe()}\nserver log:\n{server.log()}"
        name = f"up-loss-{time.monotonic_ns()}.bin"
        sent = peers.ftp_transfer(tb, "c1", "ftplib", address, modes[-1], "put", name, BOUND,
                                  put_size=PUT_SIZE, port=port)
        assert sent.ok and server.uploaded(name) == sent.sent_sha256, \
            f"{sent.describe()}\nserver log:\n{server.log()}"
        assert lost() > 0, "no segment was lost: the loss rule matched nothing"


@pytest.mark.clause("ROB-06")
@pytest.mark.topologies("nat")
def test_a_command_in_pieces_whose_rewritten_form_is_lost_is_sent_again(app: App) -> None:
    """PORT/EPRT sent in three segments (the fw holds the first two back, and rewrites the
    line when the third ends it); the segment carrying the rewritten command is lost after
    the fw, once: Linux sends the command again as it likes (it may collapse the pieces),
    and the server gets it as the filter made it, at once; its data connection works."""
    server = app.lab.peers.ftp(app.family, "vsftpd")
    verb = "PORT" if app.family == "ipv4" else "EPRT"
    c1 = app.agent("c1")
    with c1.tcp_server(app.addr("c1"), 0) as listener, \
            dialogue(app, "c1", server.address) as d:
        d.login()
        mark = server.log_mark()
        # (an earlier check's closed bind may lead to the same port: the listener's is any free one)
        earlier = {b["bind"] for b in app.call("binds")}
        with rule(app, "fw", f"mangle POSTROUTING -p tcp --dport 21 -m string --algo bm "
                             f"--string {verb} -m statistic --mode nth --every 1000 "
                             "--packet 0 -j DROP"):
            # the reply must come within the wait of a positive check (timeouts.POSITIVE)
            reply = d.send(active_command(app, app.addr("c1"), listener.port), pieces=[3, 7, 5])
            assert dropped(app, "fw", "mangle", "POSTROUTING") == 1, "nothing was lost"
        assert reply.startswith(b"200"), (reply, server.log_since(mark))
        logged = re.findall(rf'"{verb} ([^"]*)"', server.log_since(mark))
        bind = [b["address"] for b in app.call("binds") if b["bind"] not in earlier
                and b["leads_to"] == [app.addr("c1"), listener.port]]
        assert len(logged) == 1 and len(bind) == 1, (logged, bind)
        address, port = bind[0]
        assert address == app.fw_external(0)
        expected = (f"{address.replace('.', ',')},{port >> 8},{port & 255}"
                    if verb == "PORT" else f"|2|{address}|{port}|")
        assert logged == [expected]
        d.send(f"RETR {peers.SMALL_FILE}\r\n".encode())
        deadline = time.monotonic() + timeouts.POSITIVE
        while not listener.stats()["peers"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p[0] for p in listener.stats()["peers"]] == [server.address]
