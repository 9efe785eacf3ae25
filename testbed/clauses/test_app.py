"""APP: application filters (FTP, TFTP) with real clients and servers.

Every check runs twice (the ``app`` fixture's ``firewall``): against the enforcer
with its FTP and TFTP filters, and with Linux's own conntrack helpers in its
place, whose results fill the matrix's second group of columns. Files are
compared by SHA-256; data connections nobody opened are shown to be dropped: a
capture at their destination sees nothing of them, or the fw's capture has the probe
arriving and nothing of it leaving, nor any answer to it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from testbed import peers, timeouts
from testbed.agent import Sniffer, TcpConnection
from testbed.checks import expect_no_packet, expect_packet
from testbed.clauses.helpers import (
    anywhere,
    assert_dropped_silently,
    datagram,
    dropped_silently,
    ip,
    probe_port,
    socks_open,
    syn,
)
from testbed.drivers import PUBLISHED_FTP_PORT
from testbed.lab import GUIDS, SOCKS_PORT, SOCKS_USERS
from testbed.peers import BIG_FILE, SMALL_FILE, FtpServer
from testbed.plugin import App
from testbed.session_api import Flags

FINAL_REPLY = r"^\d{3} .*\n"  # the last line of an FTP reply
# After a connection attempt that waited timeouts.NEGATIVE for an answer, how much
# longer a capture at its destination is watched for its SYN
SETTLE = 0.2

PARTIAL_DROP = ("Linux's FTP helper drops a segment that holds only part of a PORT/EPRT "
                "command or PASV/EPSV reply, or a malformed one (nf_conntrack_ftp: "
                "\"partial matching\"); the sender's retransmissions carry the same bytes, "
                "so the control connection stalls")



@pytest.fixture(autouse=True)
def _peers_installed() -> None:
    missing = peers.tools_missing()
    if missing:
        pytest.skip(f"missing FTP/TFTP peers: {', '.join(missing)} (run 'make setup')")


@pytest.fixture
def servers(app: App) -> peers.PeerSet:
    """The lab's real servers (they live as long as the lab)."""
    return app.lab.peers  # type: ignore[no-any-return]


def _modes(app: App, client: peers.FtpClient, modes: tuple[peers.FtpMode, ...]) -> list[peers.FtpMode]:
    """The modes the client has in this family: at least one, or a check would run nothing."""
    found = [m for m in modes if peers.ftp_supports(client, m, app.family)]
    assert found, f"{client} has none of {modes} over {app.family}"
    return found


# Which server each client meets, passive and active: every client meets both
# servers, and every server every client, across APP-FTP-01 and APP-FTP-02.
PARTNERS: dict[str, dict[str, peers.FtpServerKind]] = {
    "passive": {"curl": "vsftpd", "lftp": "pyftpdlib", "ftplib": "vsftpd"},
    "active": {"curl": "pyftpdlib", "lftp": "vsftpd", "ftplib": "pyftpdlib"},
}


def _transfers(app: App, servers: peers.PeerSet, client: peers.FtpClient,
               modes: tuple[peers.FtpMode, ...], kind: peers.FtpServerKind) -> None:
    """Each mode the client has in this family: a download that must arrive whole, in
    that mode; then an upload."""
    server = servers.ftp(app.family, kind)
    ran = _modes(app, client, modes)
    for mode in ran:
        mark = server.log_mark()
        got = peers.ftp_transfer(app.lab.tb, "c1", client, server.address, mode, "get", BIG_FILE)
        assert got.ok and got.sha256 == server.files[BIG_FILE], \
            f"{kind}: {got.describe()}\nserver log:\n{server.log_since(mark)}"
        assert server.data_commands(since=mark) == [mode], server.log_since(mark)
    name = f"up-{client}-{ran[-1]}-{time.monotonic_ns()}.bin"
    sent = peers.ftp_transfer(app.lab.tb, "c1", client, server.address, ran[-1], "put", name)
    assert sent.ok and server.uploaded(name) == sent.sent_sha256, \
        f"{kind}: {sent.describe()}\nserver log:\n{server.log()}"


# --- a scripted FTP client ----------------------------------------------------------------

class Dialogue:
    """An FTP control connection from a client agent, one command at a time."""

    def __init__(self, conn: TcpConnection) -> None:
        self.conn = conn
        self.greeting = conn.talk(b"", until=FINAL_REPLY)

    def send(self, line: bytes, pieces: list[int] | None = None, until: str = FINAL_REPLY) -> bytes:
        return self.conn.talk(line, until=until, pieces=pieces)

    def login(self) -> None:
        reply = self.send(f"USER {peers.FTP_USER}\r\n".encode())
        if reply.startswith(b"331"):  # vsftpd asks no password of anonymous
            reply = self.send(f"PASS {peers.FTP_PASSWORD}\r\n".encode())
        assert reply.startswith(b"230"), (self.greeting, reply)


@contextmanager
def dialogue(app: App, node: str, server: str, port: int = 21) -> Iterator[Dialogue]:
    conn = app.agent(node).tcp_open(server, port)
    assert conn.connected, f"{node}'s control connection to {server}:{port}: {conn.error}"
    try:
        yield Dialogue(conn)
    finally:
        conn.close()


def passive_port(app: App, d: Dialogue, verb: bytes | None = None) -> int:
    """Ask for a passive data port (``verb``, by default PASV over IPv4 and EPSV over
    IPv6): the port the reply names."""
    verb = verb or (b"PASV" if app.family == "ipv4" else b"EPSV")
    if verb == b"PASV":
        return pasv(d)[1]
    reply = d.send(verb + b"\r\n")
    found = re.search(rb"\(\|\|\|(\d+)\|\)", reply)
    assert reply.startswith(b"229") and found, reply
    return int(found.group(1))


def pasv(d: Dialogue) -> tuple[str, int]:
    """Ask for a passive data port with PASV: the address and port the reply names."""
    reply = d.send(b"PASV\r\n")
    found = re.search(rb"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)", reply)
    assert reply.startswith(b"227") and found, reply
    numbers = [int(n) for n in found.groups()]
    return ".".join(map(str, numbers[:4])), numbers[4] * 256 + numbers[5]


def active_verbs(app: App) -> tuple[peers.FtpMode, ...]:
    """The active-mode commands of this family: PORT and EPRT over IPv4, EPRT over IPv6
    (PORT carries an IPv4 address)."""
    return ("PORT", "EPRT") if app.family == "ipv4" else ("EPRT",)


def active_command(app: App, address: str, port: int, verb: peers.FtpMode | None = None) -> bytes:
    """``verb`` naming address:port; by default the family's first (PORT over IPv4)."""
    verb = verb or active_verbs(app)[0]
    if verb == "PORT":
        return f"PORT {address.replace('.', ',')},{port >> 8},{port & 255}\r\n".encode()
    return f"EPRT |{1 if app.family == 'ipv4' else 2}|{address}|{port}|\r\n".encode()


def active_commands(app: App, address: str, port: int) -> list[bytes]:
    """Every active-mode command of this family naming address:port."""
    return [active_command(app, address, port, verb) for verb in active_verbs(app)]


def named_endpoint(line: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """The address and port a PORT (h1,h2,h3,h4,p1,p2) or EPRT (|af|address|port|) line
    names."""
    verb, _, argument = line.strip().partition(" ")
    if verb.upper() == "PORT":
        numbers = [int(n) for n in argument.split(",")]
        return ipaddress.ip_address(".".join(map(str, numbers[:4]))), numbers[4] * 256 + numbers[5]
    fields = argument.split(argument[:1])
    return ipaddress.ip_address(fields[2]), int(fields[3])


def endpoints_named(server: FtpServer, mark: int) -> list[tuple[str, int]]:
    """Where the PORT and EPRT commands the server got since ``mark`` send it (as the fw
    left them: in NAT, rewritten to a port of the fw's, or not)."""
    return [(str(address), port) for address, port in
            (named_endpoint(line) for line in server.command_lines(since=mark)
             if line[:4].upper() in ("PORT", "EPRT"))]


def opened_nothing(app: App) -> str | None:
    """What the firewall has opened that nothing used yet: the enforcer's pending
    actions and binds, or the kernel's expectations (None: nothing)."""
    if app.kernel_helpers:
        listed = app.lab.tb.run("fw", ["conntrack", "-L", "expect"], check=False).stdout.strip()
        return listed or None
    pending = app.call("actions")
    binds = [b for b in app.call("binds") if b["state"] != "closed"]
    return f"actions {pending}, binds {binds}" if pending or binds else None


# A scripted FTP server for what real servers never send: a PASV reply naming
# another host or a privileged port, one split across segments, or a malformed one.
# It answers PASV/EPSV with a listener of its own on the next of the data ports given
# (0: any; the list is used round and round), names it (at the address given) in a
# reply sent in N pieces, and serves a line of data to whoever connects; "SAY <text>"
# gets <text> as its reply (in N pieces too); anything else gets "200".
FAKE_SERVER = r"""
import itertools, socket, sys, threading, time
address, named, pieces = sys.argv[1], sys.argv[2], int(sys.argv[3])
data_ports = itertools.cycle([int(p) for p in sys.argv[4].split(",")])
family = socket.AF_INET6 if ":" in address else socket.AF_INET
listener = socket.socket(family)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((address, 21))
listener.listen(8)
print("ready", flush=True)

def serve(data):
    data.settimeout(5)
    try:
        conn, _ = data.accept()
        conn.sendall(b"pinhole data\n")
        conn.close()
    except OSError:
        pass
    data.close()

def send(conn, reply):
    step = max(1, -(-len(reply) // pieces))
    for i in range(0, len(reply), step):
        conn.sendall(reply[i:i + step])
        time.sleep(0.05)

while True:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sendall(b"220 scripted\r\n")
    for line in conn.makefile("rb"):
        command = line.strip().upper()
        if command in (b"PASV", b"EPSV"):
            data = socket.socket(family)
            data.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # a port named again
            data.bind((address, next(data_ports)))
            data.listen(1)
            port = data.getsockname()[1]
            threading.Thread(target=serve, args=(data,), daemon=True).start()
            if command == b"PASV":
                host = named.replace(".", ",")
                send(conn, f"227 Entering Passive Mode ({host},{port >> 8},{port & 255}).\r\n".encode())
            else:
                send(conn, f"229 Entering Extended Passive Mode (|||{port}|)\r\n".encode())
        elif command.startswith(b"SAY "):
            send(conn, line[4:].rstrip(b"\r\n") + b"\r\n")
        elif command == b"QUIT":
            conn.sendall(b"221 bye\r\n")
            break
        else:
            conn.sendall(b"200 ok\r\n")
    conn.close()
"""


@contextmanager
def fake_server(app: App, node: str, names: str, pieces: int = 1,
                data_ports: tuple[int, ...] = (0,)) -> Iterator[str]:
    """FAKE_SERVER on ``node``'s address port 21, naming ``names`` in PASV replies and
    ``data_ports`` in turn."""
    tb = app.lab.tb
    address = app.addr(node)
    proc = tb.popen(node, [sys.executable, "-c", FAKE_SERVER, address, names, str(pieces),
                           ",".join(map(str, data_ports))],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", \
            "the scripted FTP server did not start"
        yield address
    finally:
        proc.kill()
        proc.wait()
        tb.forget(proc.pid)


def assert_dropped(app: App, node: str, to: tuple[str, int], watch: str, what: str,
                   arrives_on: int | None = None) -> None:
    """``node``'s connection to ``to`` is dropped silently, and a capture on ``watch``
    (where it would arrive: on port ``arrives_on``, by default ``to``'s) sees no SYN of
    it: the firewall dropped it."""
    address, port = to
    port_there = port if arrives_on is None else arrives_on
    with app.agent(watch).sniff(app.iface(watch), bpf=f"tcp dst port {port_there}") as seen:
        with dropped_silently(app, node) as drop:
            drop.tcp(what, address, port)
        expect_no_packet(seen, TCP(dport=port_there, flags="S"), timeout=SETTLE)


# --- APP-FTP-01: passive -------------------------------------------------------------------

@pytest.mark.clause("APP-FTP-01")
@pytest.mark.parametrize("client", peers.FTP_CLIENTS)
def test_passive_ftp_with_real_clients_and_servers(app: App, servers: peers.PeerSet,
                                                   client: peers.FtpClient) -> None:
    """PASV and EPSV downloads arrive whole, from vsftpd or pyftpdlib; an upload too."""
    _transfers(app, servers, client, ("PASV", "EPSV"), PARTNERS["passive"][client])


@pytest.mark.clause("APP-FTP-01")
def test_a_passive_data_port_opens_once_and_for_the_client_alone(app: App,
                                                                  servers: peers.PeerSet) -> None:
    """Another client's connection to the data port, and the client's second one, are dropped."""
    server = servers.ftp(app.family, "vsftpd")
    with dialogue(app, "c1", server.address) as d:
        d.login()
        port = passive_port(app, d)
        assert_dropped(app, "c2", (server.address, port), "s1", "c2 used c1's data port")
        first = app.agent("c1").tcp_open(server.address, port)
        assert first.connected, f"the data connection the server offered failed: {first.error}"
        assert_dropped(app, "c1", (server.address, port), "s1", "c1's second data connection")
        first.close()
    assert opened_nothing(app) is None


# --- APP-FTP-02: active ---------------------------------------------------------------------

@pytest.mark.clause("APP-FTP-02")
@pytest.mark.parametrize("client", peers.FTP_CLIENTS)
def test_active_ftp_with_real_clients_and_servers(app: App, servers: peers.PeerSet,
                                                  client: peers.FtpClient) -> None:
    """PORT and EPRT downloads (the server connects back) arrive whole; an upload too."""
    _transfers(app, servers, client, ("PORT", "EPRT"), PARTNERS["active"][client])


@pytest.mark.clause("APP-FTP-02")
def test_the_active_data_connection_is_open_to_the_server_alone(app: App,
                                                                 servers: peers.PeerSet) -> None:
    """While PORT/EPRT waits for the server, another host's connection to it is dropped
    (to the port the command named and, in NAT, to the fw's port of that number); then
    the server's own connection arrives."""
    server = servers.ftp(app.family, "vsftpd")  # it connects when RETR comes, not at PORT
    c1 = app.agent("c1")
    seen_as = app.source_seen_by_server("c1")
    with c1.tcp_server(app.addr("c1"), 0) as listener, dialogue(app, "c1", server.address) as d:
        port = listener.port
        d.login()
        mark = server.log_mark()
        assert d.send(active_command(app, app.addr("c1"), port)).startswith(b"200")
        # where the command the server got sends it: in NAT a port of the fw's, whichever
        for to in dict.fromkeys([(seen_as, port), *endpoints_named(server, mark)]):
            assert_dropped(app, "s2", to, "c1", f"s2 reached c1's active data port by {to}",
                           arrives_on=port)
        reply = d.send(f"RETR {SMALL_FILE}\r\n".encode())
        assert reply.startswith(b"150") or reply.startswith(b"125"), reply
        deadline = time.monotonic() + timeouts.POSITIVE
        while not listener.stats()["peers"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p[0] for p in listener.stats()["peers"]] == [server.address]


# --- APP-FTP-03: the client sees only the fw -------------------------------------------------

def published(app: App, server: str) -> tuple[str, int]:
    """Where c1 reaches the FTP server at ``server`` (s1's address: the kernel helpers'
    fw publishes s1's alone) on the fw: the enforcer redirects a port of its own with the
    FTP filter on the connection (RedirectConnections, data_filter "ftp"); the kernel
    helpers' fw has a destination NAT rule."""
    if app.kernel_helpers:
        return app.fw_internal(), PUBLISHED_FTP_PORT
    session = next((s["id"] for s in app.call("sessions") if s["client"] == app.addr("c1")), None)
    if session is None:  # a primary connection makes c1's session
        with dialogue(app, "c1", server) as d:
            # it ends before the check watches c1: the server closes, c1 resets, nothing follows
            assert d.send(b"QUIT\r\n").startswith(b"221"), "the server did not take QUIT"
            assert d.conn.ended(), "the server did not close the connection after QUIT"
            d.conn.reset()
        session = next(s["id"] for s in app.call("sessions") if s["client"] == app.addr("c1"))
    with app.client() as api:
        (address, port), _ = api.redirect_connections(
            session, [(server, 21)], protocol_guid=GUIDS["FTP"], data_filter="ftp",
            flags=Flags.ALLOW_MULTIPLE)
    return address, port


# What shows, at c1, that a transfer through a published server met the fw alone
# (libpcap's tcp[] offsets are IPv4 only: over IPv6 the TCP flags are at a fixed offset)
SYN = {"ipv4": "tcp[tcpflags] & tcp-syn != 0", "ipv6": "ip6[6] == 6 and ip6[53] & 0x02 != 0"}
PASSIVE: tuple[peers.FtpMode, ...] = ("PASV", "EPSV")  # the modes where the client opens the data connection


def capture_at_client(app: App, fw: str, server: str, control_port: int) -> Sniffer:
    """A capture at c1 of what shows whom it meets: every TCP segment that is not between c1
    and ``fw``, every packet with the ``server``'s address, every SYN (the connections opened),
    and the control connection's segments from the fw (what c1 is told)."""
    c1 = app.addr("c1")
    pair = f"((src host {c1} and dst host {fw}) or (src host {fw} and dst host {c1}))"
    family = "ip" if app.family == "ipv4" else "ip6"  # (not a late packet of another family's check)
    sniffer: Sniffer = app.agent("c1").sniff(app.iface("c1"), bpf=(
        f"{family} and ((tcp and not {pair}) or host {server} or ({SYN[app.family]}) or "
        f"(tcp and src host {fw} and src port {control_port}))"))
    return sniffer


def assert_met_the_fw_alone(app: App, captured: list[Packet], fw: str, control_port: int,
                            mode: peers.FtpMode, copies: int) -> bytes:
    """Every packet captured at c1 is between c1 and ``fw`` (none names the server), and
    they show the control connection and ``copies`` data connections opened the way
    ``mode`` opens them (passive: by c1; active: by the fw, to c1). Returns what the fw
    said on the control connection."""
    c1, layer = app.addr("c1"), IP if app.family == "ipv4" else IPv6
    strays = [p for p in captured if {p[layer].src, p[layer].dst} != {c1, fw}]
    assert not strays, (f"{mode}: c1 met others than the fw's {fw}:\n"
                        + "\n".join(p.summary() for p in strays[:10]))
    # bare SYNs, each connection once (by its initial sequence number too: a data connection
    # may come again from and to the same ports as the one before it)
    opened = {(p[layer].src, p[TCP].sport, p[layer].dst, p[TCP].dport, p[TCP].seq) for p in captured
              if TCP in p and p[TCP].flags & 0x12 == 0x02}
    control = {o for o in opened if (o[0], o[2], o[3]) == (c1, fw, control_port)}
    assert len(control) == 1, f"{mode}: one control connection expected, saw {sorted(opened)}"
    data = [(src, dst) for src, _, dst, _, _ in opened - control]
    by = (c1, fw) if mode in PASSIVE else (fw, c1)
    assert data == [by] * copies, \
        f"{mode}: {copies} data connections from {by[0]} to {by[1]} expected, saw {data}"
    return b"".join(bytes(p[TCP].payload) for p in captured
                    if TCP in p and p[layer].src == fw and p[TCP].sport == control_port)


@pytest.mark.clause("APP-FTP-03")
@pytest.mark.topologies("nat")
@pytest.mark.parametrize("client", peers.FTP_CLIENTS)
def test_through_a_published_server_the_client_sees_only_the_fw(
        app: App, servers: peers.PeerSet, client: peers.FtpClient) -> None:
    """Every mode, twice over one control connection to the fw: the files arrive whole
    (sequence numbers stay right as rewritten replies and commands change lengths); every
    packet c1 sends or receives, control and data connections alike, has the fw's internal
    address as its far end; every address c1 is told is the fw's."""
    through_a_published_server(app, servers, client, peers.FTP_MODES)


@pytest.mark.clause("APP-FTP-02")
@pytest.mark.topologies("routed")
@pytest.mark.parametrize("client", peers.FTP_CLIENTS)
def test_active_ftp_through_a_server_published_on_a_routed_fw(
        app: App, servers: peers.PeerSet, client: peers.FtpClient) -> None:
    """A routed fw that publishes a server (a redirect, which leaves from the fw's external
    address) as APP-FTP-03 does in NAT: the server sees the fw alone, so PORT and EPRT must
    name the fw too, or vsftpd refuses them ("500 Illegal PORT command": port_promiscuous=NO,
    its default, as here); the files arrive whole and c1 meets the fw alone."""
    through_a_published_server(app, servers, client, ("PORT", "EPRT"))


def through_a_published_server(app: App, servers: peers.PeerSet, client: peers.FtpClient,
                               modes: tuple[peers.FtpMode, ...]) -> None:
    """c1 gets a file twice over one control connection to vsftpd published on the fw, in
    each of ``modes`` it has (its data connections opened by the side the mode says),
    meeting the fw alone and told no address of the server's."""
    server = servers.ftp(app.family, "vsftpd")
    address, port = published(app, server.address)
    assert address == app.fw_internal("c1"), f"published on {address}, not the fw's address facing c1"
    copies = 2
    for mode in _modes(app, client, modes):
        mark = server.log_mark()
        with capture_at_client(app, address, server.address, port) as at_client:
            got = peers.ftp_transfer(app.lab.tb, "c1", client, address, mode, "get", BIG_FILE,
                                     port=port, copies=copies)
            assert got.ok and got.sha256 == server.files[BIG_FILE], \
                f"{got.describe()}\nserver log:\n{server.log_since(mark)}"
            assert server.data_commands(since=mark) == [mode] * copies, server.log_since(mark)
        told = assert_met_the_fw_alone(app, at_client.packets(), address, port, mode, copies)
        if mode in PASSIVE:
            reply = b"227 " if mode == "PASV" else b"229 "
            assert told.count(reply) == copies, told
        if mode == "PASV":
            assert address.replace(".", ",").encode() in told, told
        assert server.address.replace(".", ",").encode() not in told, told


# --- APP-FTP-04: a Firewall client's active FTP ----------------------------------------------

# dante's socksify (1.4.2) does no IPv6: its config takes no IPv6 proxy address ("gateway
# must be an IP-address or qualified domainname, but type of 2001:db8:1::1.1080 is IPv6
# address"), and through an IPv4 proxy its library hands IPv6 sockets back to the system
# ("Rconnect(): unsupported address family '10' ... fallback to system connect(2)",
# "Rbind(): ... unsupported af IPv6 address, system fallback"): the client would be a
# SecureNAT client. Over IPv6 the scripted check below, with the agent's own SOCKS
# client, stands in for it.
@pytest.mark.clause("APP-FTP-04")
@pytest.mark.parametrize("family", ["ipv4"])
@pytest.mark.parametrize("client", ["curl", "lftp"])
def test_firewall_client_active_ftp_through_a_socks_bind(app: App, servers: peers.PeerSet,
                                                         client: peers.FtpClient) -> None:
    """Under dante's socksify, the client's data socket is a SOCKS BIND on the fw; the FTP
    filter approves it for the server alone, whose connection brings the file: with PORT,
    and with EPRT where the client sends it over IPv4 (curl)."""
    server = servers.ftp(app.family, "vsftpd")
    route = peers.SocksRoute(app.fw_internal(), SOCKS_PORT, "alice",
                             SOCKS_USERS["alice"])
    for mode in _modes(app, client, ("PORT", "EPRT")):
        mark = server.log_mark()
        began = time.monotonic()  # the enforcer's clock (CLOCK_MONOTONIC, on this host)
        got = peers.ftp_transfer(app.lab.tb, "c1", client, server.address, mode, "get", BIG_FILE,
                                 socks=route)
        assert got.ok and got.sha256 == server.files[BIG_FILE], \
            f"{got.describe()}\nserver log:\n{server.log_since(mark)}"
        assert server.data_commands(since=mark) == [mode], server.log_since(mark)
        # this transfer's data connection came from the server to a bind on the fw's
        # external address (not another mode's: only decisions since it began)
        inbound = [d for d in app.call("decisions", since=began)
                   if d["reason"].startswith("inbound to bind") and d["verdict"] == "admit-kernel"]
        assert inbound, app.call("decisions", limit=10)
        assert inbound[-1]["flow"].split()[1].rsplit(":", 1)[0] == server.address
        assert inbound[-1]["flow"].split()[3].rsplit(":", 1)[0] == app.fw_external(0)


# The reply that ends a transfer command, after its preliminary 1xx
TRANSFER_DONE = r"^[2-5]\d\d .*\n"


@pytest.mark.clause("APP-FTP-04")
def test_a_firewall_client_s_bind_admits_the_server_alone(app: App,
                                                          servers: peers.PeerSet) -> None:
    """alice on c1 (the agent's SOCKS client) talks FTP to vsftpd on s1 through the fw
    (SOCKS CONNECT), binds through it (SOCKS BIND) and names the bind in PORT, or EPRT: the
    filter approves the bind for the server alone. s2's SYN to it reaches the fw and goes
    no further, unanswered, and alice is told of no connection; then the server's data
    connection brings the file whole."""
    server = servers.ftp(app.family, "vsftpd")  # it connects when RETR comes
    external = app.fw_external(0)
    with socks_open(app, "c1", "alice", "connect", server.address, 21) as control:
        assert control.reply is not None and control.reply["code"] == 0, (control.error, control.reply)
        d = Dialogue(control)
        d.login()
        for verb in active_verbs(app):
            with socks_open(app, "c1", "alice", "bind", anywhere(app), 0) as bind:
                assert bind.reply is not None and bind.reply["code"] == 0, (bind.error, bind.reply)
                assert bind.reply["address"] == external, bind.reply
                port = int(bind.reply["port"])
                reply = d.send(active_command(app, external, port, verb))
                assert reply.startswith(b"200"), (verb, reply)
                assert_stopped_at_fw(app, "s2", external, (port,), active=True)
                assert bind.accept(timeout=0.2) is None, f"s2 got through the bind ({verb})"
                reply = d.send(f"RETR {SMALL_FILE}\r\n".encode(), until=TRANSFER_DONE)
                assert reply.startswith(b"150") and b"\n226 " in reply, (verb, reply)
                second = bind.accept()
                assert second is not None and second["code"] == 0, (verb, second)
                assert second["address"] == server.address, (verb, second)
                data = bind.talk(b"")  # until the server closes it
                assert hashlib.sha256(data).hexdigest() == server.files[SMALL_FILE], (verb, data)


# --- APP-FTP-05: anti-bounce ----------------------------------------------------------------

@pytest.mark.clause("APP-FTP-05")
def test_a_third_party_in_port_or_eprt_opens_nothing(app: App, servers: peers.PeerSet) -> None:
    """c1 naming another host (c2) in PORT and EPRT opens nothing, and the commands reach
    the server (pyftpdlib on s2) unchanged (in NAT, no rewrite made them name the fw). A
    SYN from s2, the host that would connect, to c2's port they name, handed to the fw
    (in NAT s2 has no route there), reaches it and goes no further, unanswered; c2's
    listener sees nobody."""
    server = servers.ftp(app.family, "pyftpdlib")
    with app.agent("c2").tcp_server(app.addr("c2"), 0) as victim, \
            dialogue(app, "c1", server.address) as d:
        d.login()
        commands = active_commands(app, app.addr("c2"), victim.port)
        mark = server.log_mark()
        for command in commands:
            assert d.send(command)[:1] in (b"2", b"5"), command  # the server's answer
        assert server.command_lines(since=mark) == [c.decode().strip() for c in commands], \
            server.log_since(mark)
        assert_stopped_at_fw(app, "s2", app.addr("c2"), (victim.port,), active=True)
        assert victim.stats()["peers"] == []
        assert opened_nothing(app) is None


@pytest.mark.clause("APP-FTP-05")
@pytest.mark.parametrize("family", ["ipv4"])  # PASV is IPv4 only; EPSV names no address
def test_a_third_party_in_a_pasv_reply_opens_nothing(app: App, servers: peers.PeerSet) -> None:
    """A server (scripted, s2) naming another host (s1) in its PASV reply opens nothing:
    c1's SYN to s1's port named reaches the fw and goes no further, unanswered."""
    servers.free("s2")
    with fake_server(app, "s2", names=app.addr("s1")) as address, dialogue(app, "c1", address) as d:
        port = passive_port(app, d, verb=b"PASV")
        assert_stopped_at_fw(app, "c1", app.addr("s1"), (port,))
        assert opened_nothing(app) is None


@pytest.mark.clause("APP-FTP-05")
@pytest.mark.topologies("nat")  # a server published on the fw: the filter rewrites its replies
@pytest.mark.parametrize("family", ["ipv4"])  # PASV is IPv4 only; EPSV names no address
def test_a_third_party_in_a_published_server_s_pasv_reply_opens_nothing(
        app: App, servers: peers.PeerSet) -> None:
    """The same through a server published on the fw (c1 reaches s1's FTP by a port of
    the fw's): s1's PASV reply naming s2 opens nothing. c1's SYN to where the reply it got
    names (the fw's port, had the reply been rewritten, or s2's) and to s2's port reaches
    the fw and goes no further, unanswered."""
    servers.free("s1")
    with fake_server(app, "s1", names=app.addr("s2")) as server:
        address, port = published(app, server)
        with dialogue(app, "c1", address, port) as d:
            before = opened_nothing(app)  # (the enforcer's: the redirect that publishes s1)
            told = pasv(d)
            for target, data_port in dict.fromkeys([told, (app.addr("s2"), told[1])]):
                assert_stopped_at_fw(app, "c1", target, (data_port,))
            assert opened_nothing(app) == before


# --- APP-FTP-06: split and malformed ---------------------------------------------------------

# A command's first writes: inside its verb, then inside its address
SPLIT = (3, 7, 5)


def a_line_begun(start: bytes) -> Callable[[Packet], bool]:
    """A template for the fw's capture: a segment that begins a line with ``start`` and
    does not end it (a command or reply split across segments)."""
    def begun(pkt: Packet) -> bool:
        """A segment holding the start of the line, not its end."""
        return Raw in pkt and pkt[Raw].load.startswith(start) and not pkt[Raw].load.endswith(b"\n")
    return begun


@pytest.mark.clause("APP-FTP-06")
def test_a_port_or_eprt_command_split_across_segments_still_opens_its_data_connection(
        app: App, servers: peers.PeerSet) -> None:
    """ftplib sends PORT and EPRT (EPRT only over IPv6) in writes of 3, 7 and 5 bytes and
    the rest (the fw's capture has the first alone): each server's download still arrives
    whole, and the command the server got names where c1 is reached: routed, c1; in NAT
    the fw's external address, the filter's rewrite."""
    app.helpers_deviate(PARTIAL_DROP)
    seen_as = ipaddress.ip_address(app.source_seen_by_server("c1"))
    for kind in peers.FTP_SERVERS:
        server = servers.ftp(app.family, kind)
        for verb in active_verbs(app):
            mark, since = server.log_mark(), time.time()
            got = peers.ftp_transfer(app.lab.tb, "c1", "ftplib", server.address, verb, "get",
                                     BIG_FILE, pieces=SPLIT)
            assert got.ok and got.sha256 == server.files[BIG_FILE], \
                f"{kind}: {got.describe()}\nserver log:\n{server.log_since(mark)}"
            expect_packet(app.fw_received(app.topology.fw_internal_iface, since),
                          a_line_begun(verb[:SPLIT[0]].encode()))
            (line,) = [c for c in server.command_lines(since=mark) if c.startswith(verb)]
            assert named_endpoint(line)[0] == seen_as, f"{kind} got {line!r}"


@pytest.mark.clause("APP-FTP-06")
def test_a_pasv_or_epsv_reply_split_across_segments_still_opens_its_data_connection(
        app: App, servers: peers.PeerSet) -> None:
    """A server (scripted, s2) sends its PASV and EPSV replies (EPSV only over IPv6) in
    four segments (the fw's capture has the first alone): each opens the data port it
    names, whose line arrives whole."""
    app.helpers_deviate(PARTIAL_DROP)
    servers.free("s2")
    verbs = (b"PASV", b"EPSV") if app.family == "ipv4" else (b"EPSV",)
    with fake_server(app, "s2", names=app.addr("s2"), pieces=4) as address, \
            dialogue(app, "c1", address) as d:
        for verb in verbs:
            since = time.time()
            port = passive_port(app, d, verb=verb)
            expect_packet(app.fw_received(app.topology.fw_external_iface, since),
                          a_line_begun(b"227" if verb == b"PASV" else b"229"))
            with app.agent("c1").tcp_open(address, port) as data:
                assert data.connected, f"the data port of a split {verb!r} reply stayed shut: {data.error}"
                assert data.talk(b"", until=r"\n") == b"pinhole data\n"


@contextmanager
def sent_twice(app: App) -> Iterator[None]:
    """Every FTP control segment, both ways, reaches the fw twice (as a retransmission
    would): iptables' TEE target in c1 and in the servers sends a copy of each to the fw."""
    tool = "iptables" if app.family == "ipv4" else "ip6tables"
    rules = [("c1", f"-p tcp --dport 21 -j TEE --gateway {app.fw_internal()}"),
             *((node, f"-p tcp --sport 21 -j TEE --gateway {app.fw_external(0)}")
               for node in ("s1", "s2"))]
    added = []
    try:
        for node, rule in rules:
            app.lab.tb.run(node, [tool, "-w", "-t", "mangle", "-A", "POSTROUTING", *rule.split()])
            added.append((node, rule))
        yield
    finally:
        for node, rule in added:
            app.lab.tb.run(node, [tool, "-w", "-t", "mangle", "-D", "POSTROUTING", *rule.split()],
                           check=False)


@pytest.mark.clause("APP-FTP-06")
def test_control_segments_sent_twice_open_each_data_connection_once(
        app: App, servers: peers.PeerSet) -> None:
    """With every control segment arriving twice, each mode still brings the file whole
    (in NAT, through PORT/EPRT rewritten to other lengths), and nothing is opened twice."""
    with sent_twice(app):
        for kind in peers.FTP_SERVERS:
            server = servers.ftp(app.family, kind)
            for mode in _modes(app, "ftplib", peers.FTP_MODES):
                got = peers.ftp_transfer(app.lab.tb, "c1", "ftplib", server.address, mode, "get",
                                         SMALL_FILE)
                assert got.ok and got.sha256 == server.files[SMALL_FILE], \
                    f"{kind}: {got.describe()}\nserver log:\n{server.log()}"
    assert opened_nothing(app) is None


MALFORMED = [b"PORT 999,1,1,1,1,1\r\n", b"PORT 192,0,2,11\r\n", b"PORT 192,0,2,11,0,0\r\n",
             b"EPRT |9|192.0.2.11|40000|\r\n", b"EPRT |2|2001:db8:1::11|70000|\r\n",
             b"EPRT |1|not an address|1|\r\n", b"EPRT\r\n", b"PORT\r\n",
             b"\x00\xff\xfe PORT 1,2,3\r\n", b"X" * 1000 + b" PORT 192,0,2,11,156,64\r\n"]


def assert_still_working(app: App, d: Dialogue, server: str) -> None:
    """After malformed input: nothing is opened, the control connection still answers, a
    good PASV/EPSV opens its data port, and the enforcer runs on without errors."""
    assert opened_nothing(app) is None
    assert d.send(b"NOOP\r\n").startswith(b"200")
    port = passive_port(app, d)
    with app.agent("c1").tcp_open(server, port) as data:
        assert data.connected, f"after malformed input, a good PASV/EPSV no longer works: {data.error}"
    if not app.kernel_helpers:
        assert app.enforcer.running and app.call("status")["counters"].get("errors", 0) == 0


@pytest.mark.clause("APP-FTP-06")
def test_malformed_commands_open_nothing_and_break_nothing(app: App, servers: peers.PeerSet) -> None:
    """Malformed PORT/EPRT commands, junk and an over-long line open nothing; the control
    connection and the firewall go on working."""
    app.helpers_deviate(PARTIAL_DROP)
    server = servers.ftp(app.family, "pyftpdlib")
    with dialogue(app, "c1", server.address) as d:
        d.login()
        for line in MALFORMED:
            reply = d.send(line)
            assert reply[:1] in (b"2", b"5"), f"{line[:40]!r}: {reply!r}"
        assert_still_working(app, d, server.address)


def malformed_replies(app: App) -> list[bytes]:
    """PASV and EPSV replies that name no data port: numbers out of range, too few, port 0,
    EPSV's delimiters wrong or unclosed, a port of 1000 digits, junk before the code."""
    s2 = app.topology.address("s2", "ipv4").replace(".", ",")
    return [b"227 Entering Passive Mode (999,51,100,22,156,64).",
            f"227 Entering Passive Mode ({s2},156).".encode(),
            f"227 Entering Passive Mode ({s2},0,0).".encode(),
            b"229 Entering Extended Passive Mode (|||70000|)",
            b"229 Entering Extended Passive Mode (|||0|)",
            b"229 Entering Extended Passive Mode (|!|40000|)",
            b"229 Entering Extended Passive Mode (|||40000)",
            b"229 Entering Extended Passive Mode (|||" + b"9" * 1000 + b"|)",
            b"\x00\xff\xfe 229 Entering Extended Passive Mode (|||40000|)"]


@pytest.mark.clause("APP-FTP-06")
def test_malformed_replies_open_nothing_and_break_nothing(app: App, servers: peers.PeerSet) -> None:
    """A server (scripted, s2) sends malformed PASV/EPSV replies, each whole and each in
    four segments: they reach the client as sent and open nothing; the control connection
    and the firewall go on working."""
    app.helpers_deviate(PARTIAL_DROP)
    servers.free("s2")
    for pieces in (1, 4):
        with fake_server(app, "s2", names=app.addr("s2"), pieces=pieces) as address, \
                dialogue(app, "c1", address) as d:
            for reply in malformed_replies(app):
                got = d.send(b"SAY " + reply + b"\r\n", until=r"\n")
                assert got == reply + b"\r\n", f"in {pieces} pieces, {reply[:40]!r} came as {got[:60]!r}"
            assert_still_working(app, d, address)


# --- APP-FTP-07: data ports ------------------------------------------------------------------

PRIVILEGED = (22, 1023)
FTP_DATA = 20  # where an active-mode server's data connections come from (vsftpd's, Debian's)
HELPERS_ANY_PORT = ("Linux's FTP helper expects the data connection a PORT/EPRT command or a "
                    "PASV/EPSV reply names whatever its port (nf_conntrack_ftp checks none), and "
                    "in NAT nf_nat_ftp gives it the same port of the fw when no other expectation "
                    "holds it, whatever listens there")


def assert_stopped_at_fw(app: App, node: str, target: str, ports: tuple[int, ...], *,
                         active: bool = False) -> None:
    """SYNs from ``node`` to ``target`` on each of ``ports``, handed to the fw (whether or
    not ``node`` has a route there), reach it (its capture has them) and go no further:
    the fw sends none of them on, nor any answer to them (no SYN-ACK, RST or ICMP error).
    ``active``: they come as an active-mode server's data connection would, from port 20
    (a firewall that admits by that port lets them in), and from a port of no meaning."""
    to_fw = Ether(src=app.mac(node), dst=app.mac("fw", app.topology.fw_iface_facing(node)))
    src = app.addr(node)
    assert_dropped_silently(app, [(node, to_fw / syn(app, src, target, sport, port))
                                  for port in ports
                                  for sport in ((FTP_DATA, probe_port()) if active else (probe_port(),))])


def assert_not_led_to_the_client(app: App, ports: tuple[int, ...],
                                 named: list[tuple[str, int]]) -> None:
    """NAT, after PORT/EPRT commands naming c1's ``ports``: s1's SYNs to the fw's external
    address on each of those port numbers (where nf_nat_ftp would bind a data connection
    to c1), and to wherever the commands the server got name (``named``: a port the fw
    chose, whatever its number), from port 20 as the server's would come and from another,
    are dropped silently (they reach the fw, and nothing answers them), and none reaches
    c1 on any of ``ports``: the fw's port is its own
    (whose services the lockdown base keeps from outside), not a way in."""
    bpf = "tcp and (" + " or ".join(f"dst port {p}" for p in ports) + ")"
    src, fw = app.addr("s1"), app.fw_external(0)
    targets = list(dict.fromkeys([(fw, port) for port in ports] + named))
    to_fw = Ether(src=app.mac("s1"), dst=app.mac("fw", app.topology.fw_iface_facing("s1")))
    sport = 42000 + (time.monotonic_ns() // 1000) % 10000  # a tuple no earlier probe used
    with app.agent("c1").sniff(app.iface("c1"), bpf=bpf) as at_client:
        with dropped_silently(app, "s1") as drop:
            drop.send("a SYN from s1 to a port of the fw's own, or where a command names",
                      *(to_fw / syn(app, src, address, from_port, port)
                        for i, (address, port) in enumerate(targets)
                        for from_port in (FTP_DATA, sport + i)))
        expect_no_packet(at_client, TCP(flags="S"), timeout=SETTLE)


def assert_active_ftp_works(app: App, server: FtpServer) -> None:
    """A real client's active download (PORT over IPv4, EPRT over IPv6) arrives whole:
    what opened nothing before was the data port's doing."""
    mode: peers.FtpMode = "PORT" if app.family == "ipv4" else "EPRT"
    got = peers.ftp_transfer(app.lab.tb, "c1", "ftplib", server.address, mode, "get", BIG_FILE)
    assert got.ok and got.sha256 == server.files[BIG_FILE], \
        f"{got.describe()}\nserver log:\n{server.log()}"


def wait_until_listed(app: App, port: int) -> None:
    """Until the enforcer's reading of the fw's sockets (kept briefly) has the listener
    on its external address port ``port``."""
    address = app.fw_external(0)
    entry = f"tcp {address}:{port}" if app.family == "ipv4" else f"tcp [{address}]:{port}"
    deadline = time.monotonic() + timeouts.POSITIVE
    while entry not in app.call("status")["listening"]:
        assert time.monotonic() < deadline, f"the enforcer does not see the fw listen on {entry}"
        time.sleep(0.05)


@pytest.mark.clause("APP-FTP-07")
def test_a_privileged_port_in_port_or_eprt_opens_nothing(app: App, servers: peers.PeerSet) -> None:
    """PORT/EPRT naming c1's port 22 or 1023 open nothing. Routed, the server's would-be
    connections to c1 stop at the fw; in NAT, where they would go to the fw's ports of
    those numbers (a listener of the fw's there), none leads to c1. Then active FTP
    brings a file whole."""
    app.helpers_deviate(HELPERS_ANY_PORT)
    server = servers.ftp(app.family, "vsftpd")
    c1 = app.addr("c1")
    with ExitStack() as stack:
        if app.nat:  # the fw listens on its ports of those numbers
            for port in PRIVILEGED:
                stack.enter_context(app.agent("fw").tcp_server(app.fw_external(0), port))
        d = stack.enter_context(dialogue(app, "c1", server.address))
        d.login()
        mark = server.log_mark()
        for port in PRIVILEGED:
            for command in active_commands(app, c1, port):
                assert d.send(command)[:1] in (b"2", b"5"), command  # the server's answer
        if app.nat:
            assert_not_led_to_the_client(app, PRIVILEGED, endpoints_named(server, mark))
        else:
            assert_stopped_at_fw(app, "s1", c1, PRIVILEGED, active=True)
        assert opened_nothing(app) is None
    assert_active_ftp_works(app, server)


@pytest.mark.clause("APP-FTP-07")
@pytest.mark.topologies("nat")
def test_a_port_the_fw_listens_on_is_no_data_port(app: App, servers: peers.PeerSet) -> None:
    """NAT: a PORT/EPRT naming c1's port P, where the fw listens on its external address
    port P, opens nothing; s1's would-be data connection to the fw's port P does not
    lead to c1, whose listener on P sees nobody. Then active FTP brings a file."""
    app.helpers_deviate(HELPERS_ANY_PORT)
    server = servers.ftp(app.family, "vsftpd")
    with app.agent("fw").tcp_server(app.fw_external(0), 0) as fw_listener, \
            app.agent("c1").tcp_server(app.addr("c1"), fw_listener.port) as at_client:
        port = fw_listener.port
        if not app.kernel_helpers:
            wait_until_listed(app, port)
        with dialogue(app, "c1", server.address) as d:
            d.login()
            mark = server.log_mark()
            for command in active_commands(app, app.addr("c1"), port):
                assert d.send(command)[:1] in (b"2", b"5"), command
            assert_not_led_to_the_client(app, (port,), endpoints_named(server, mark))
            assert at_client.stats()["accepted"] == 0
            assert opened_nothing(app) is None
    assert_active_ftp_works(app, server)


@pytest.mark.clause("APP-FTP-07")
def test_a_privileged_port_in_a_pasv_or_epsv_reply_opens_nothing(app: App,
                                                                 servers: peers.PeerSet) -> None:
    """A server (scripted, s2) naming its port 22, then 1023, in PASV/EPSV replies (EPSV
    only over IPv6) opens nothing: c1's connections there stop at the fw. Its next reply,
    naming an unprivileged port on the same control connection, opens that port."""
    app.helpers_deviate(HELPERS_ANY_PORT)
    servers.free("s2")
    verbs = (b"PASV", b"EPSV") if app.family == "ipv4" else (b"EPSV", b"EPSV")
    with fake_server(app, "s2", names=app.addr("s2"), data_ports=(*PRIVILEGED, 0)) as address, \
            dialogue(app, "c1", address) as d:
        assert [passive_port(app, d, verb=verb) for verb in verbs] == list(PRIVILEGED)
        assert_stopped_at_fw(app, "c1", address, PRIVILEGED)
        assert opened_nothing(app) is None
        port = passive_port(app, d)
        with app.agent("c1").tcp_open(address, port) as data:
            assert data.connected, f"the unprivileged data port {port} stayed shut: {data.error}"
            assert data.talk(b"", until=r"\n") == b"pinhole data\n"


@pytest.mark.clause("APP-FTP-07")
@pytest.mark.topologies("nat")  # a server published on the fw: the filter rewrites its replies
def test_a_privileged_port_in_a_published_server_s_pasv_or_epsv_reply_opens_nothing(
        app: App, servers: peers.PeerSet) -> None:
    """The same through a server published on the fw (c1 reaches s1's FTP by a port of
    the fw's): s1's replies naming its port 22, then 1023 (where it listens), open
    nothing. c1's connection to where each reply it got names (the fw's port: EPSV's, or
    a rewritten PASV's; else s1's) does not open, and its SYNs to s1's port reach the fw
    and go no further, unanswered. The next reply, naming an unprivileged port, opens the
    data connection where it names, and its line arrives."""
    app.helpers_deviate(HELPERS_ANY_PORT)
    servers.free("s1")
    verbs = (b"PASV", b"EPSV") if app.family == "ipv4" else (b"EPSV", b"EPSV")
    with fake_server(app, "s1", names=app.addr("s1"), data_ports=(*PRIVILEGED, 0)) as server:
        address, port = published(app, server)
        with dialogue(app, "c1", address, port) as d:
            before = opened_nothing(app)  # (the enforcer's: the redirect that publishes s1)
            for verb, privileged in zip(verbs, PRIVILEGED, strict=True):
                told = passive_endpoint(app, d, verb, address)
                with app.agent("c1").tcp_open(*told, timeout=timeouts.NEGATIVE) as probe:
                    assert not probe.connected, \
                        f"{told}, which the {verb!r} reply naming s1's port {privileged} gave, opened"
                assert_stopped_at_fw(app, "c1", server, (privileged,))
            assert opened_nothing(app) == before
            told = passive_endpoint(app, d, verbs[0], address)
            with app.agent("c1").tcp_open(*told) as data:
                assert data.connected, f"the unprivileged data port {told} stayed shut: {data.error}"
                assert data.talk(b"", until=r"\n") == b"pinhole data\n"


def passive_endpoint(app: App, d: Dialogue, verb: bytes, control: str) -> tuple[str, int]:
    """Where a PASV or EPSV reply tells the client to connect: EPSV names a port of the
    control connection's address (``control``)."""
    return pasv(d) if verb == b"PASV" else (control, passive_port(app, d, verb=verb))


# --- APP-TFTP-01 ----------------------------------------------------------------------------

@pytest.mark.clause("APP-TFTP-01")
@pytest.mark.parametrize("client", peers.TFTP_CLIENTS)
def test_tftp_read_and_write_with_real_clients(app: App, servers: peers.PeerSet,
                                               client: peers.TftpClient) -> None:
    """tftpd-hpa answers from a new port; the file arrives whole both ways."""
    server = servers.tftp(app.family)
    got = peers.tftp_transfer(app.lab.tb, "c1", client, server.address, "get", BIG_FILE)
    assert got.ok and got.sha256 == server.files[BIG_FILE], got.describe() + server.log()
    name = f"up-{client}-{time.monotonic_ns()}.bin"
    sent = peers.tftp_transfer(app.lab.tb, "c1", client, server.address, "put", name)
    assert sent.ok and server.uploaded(name) == sent.sent_sha256, sent.describe() + server.log()


@pytest.mark.clause("APP-TFTP-01")
@pytest.mark.parametrize("sport", [20123, 61523, 63523], ids=["bind-pool", "kernel-redirect-pool",
                                                              "user-redirect-pool"])
def test_a_request_from_a_port_in_the_fws_own_ranges_is_answered(app: App, servers: peers.PeerSet,
                                                                 sport: int) -> None:
    """A client port in one of the fw's port ranges (Windows and macOS clients take ports
    up to 65535): the server answers the port the fw's source NAT kept, the client's own,
    and its reply reaches the client; the bind is on that port (in NAT, of the fw's)."""
    server = servers.tftp(app.family)
    c1 = app.agent("c1")
    rrq = b"\x00\x01" + SMALL_FILE.encode() + b"\x00octet\x00"
    with c1.sniff(app.iface("c1"), bpf=f"udp dst port {sport}") as at_client:
        c1.send(datagram(app, app.addr("c1"), server.address, sport, 69, rrq))
        reply = expect_packet(at_client, ip(app, server.address, app.addr("c1")) / UDP(dport=sport))
    assert bytes(reply[UDP].payload)[:4] == b"\x00\x03\x00\x01", "not the file's first block"


@pytest.mark.clause("APP-TFTP-01")
def test_only_the_servers_reply_is_admitted(app: App, servers: peers.PeerSet) -> None:
    """After a read request, the server's reply from its new port reaches the client; a
    datagram from the server's other ports, or from another host, does not."""
    server = servers.tftp(app.family)
    c1 = app.agent("c1")
    sport = 47000 + (time.monotonic_ns() // 1000) % 1000
    seen_as = app.source_seen_by_server("c1")
    rrq = b"\x00\x01" + SMALL_FILE.encode() + b"\x00octet\x00"
    with c1.sniff(app.iface("c1"), bpf=f"udp dst port {sport}") as at_client, \
            app.agent("s1").sniff(app.iface("s1"), bpf="udp dst port 69") as at_server:
        c1.send(datagram(app, app.addr("c1"), server.address, sport, 69, rrq))
        reply = expect_packet(at_client, ip(app, server.address, app.addr("c1")) / UDP(dport=sport))
        tid = reply[UDP].sport
        assert tid != 69, "the server answered from port 69"
        # the port the request came from as the server saw it: the one its reply went to
        # (in NAT, a port of the fw's, whichever the fw chose)
        seen_port = expect_packet(at_server, ip(app, seen_as, server.address) / UDP(dport=69))[UDP].sport
    with c1.sniff(app.iface("c1"), bpf=f"udp dst port {sport}") as at_client:
        with dropped_silently(app, "s1") as from_s1, dropped_silently(app, "s2") as from_s2:
            from_s1.send("a datagram from another port of the server", datagram(
                app, server.address, seen_as, tid + 1, seen_port, b"\x00\x03\x00\x01x"))
            from_s2.send("a datagram from another host", datagram(
                app, app.addr("s2"), seen_as, tid, seen_port, b"\x00\x03\x00\x01x"))
        expect_no_packet(at_client, UDP(dport=sport), timeout=0)
