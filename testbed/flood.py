"""Hostile volume (ROB-01): one client floods the fw while another opens connections
through it, and the other's first SYNs are timed from its interface to the server's.

Used by the ROB-01 checks and by ``make bench``. Every kind of flood the issue names
runs at once, each in its own thread: new-flow SYNs, TFTP requests (each a new flow
the TFTP filter reads), PORT lines on one FTP control connection (each one the FTP
filter acts on), and grant calls on the control socket.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from testbed.lab import ENFORCER_MAPS_TABLE, GUIDS
from testbed.session_api import Flags, SessionApiError

VICTIM_PORT = 30080  # where the measured client connects (a grant of its own admits it)
FLOOD_GRANT_PORTS = 40000  # the first target port of the flooder's grant calls
TFTP_REQUEST = b"\x00\x01flood.bin\x00octet\x00"
PORT_LINES_PER_CHUNK = 250
CONTROL_WAIT = 60.0  # seconds the flooder tries its FTP control connection


@dataclass
class Delays:
    """First-SYN delays through the fw, in seconds, one per connection."""

    seconds: list[float]
    opened: int
    attempted: int

    def percentile(self, p: float) -> float:
        ordered = sorted(self.seconds)
        if not ordered:
            return float("inf")
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]

    @property
    def p99(self) -> float:
        return self.percentile(99)

    def summary(self) -> str:
        if not self.seconds:
            return f"{self.opened}/{self.attempted} opened, no SYN timed"
        return (f"{self.opened}/{self.attempted} opened; first-SYN delay median "
                f"{statistics.median(self.seconds) * 1e3:.2f} ms, p99 {self.p99 * 1e3:.2f} ms, "
                f"max {max(self.seconds) * 1e3:.2f} ms")


def _syn_filter(family: str, port: int) -> str:
    """BPF for the bare SYNs to ``port`` (libpcap's tcp[] offsets are IPv4 only)."""
    if family == "ipv4":
        return f"ip and tcp dst port {port} and tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn"
    return f"ip6 and tcp dst port {port} and ip6[6] == 6 and ip6[53] & 0x12 == 0x02"


def first_syn_delays(net: Any, client: str, server: str, count: int,
                     port: int = VICTIM_PORT) -> Delays:
    """``count`` sequential connections from ``client`` to ``server``:``port``, each
    echoing 64 bytes, up to the first that fails (no echo, or not the bytes sent, by
    digest); each one's first SYN is timed from the client's interface to the
    server's (kernel capture times, one clock), matched by its sequence number (translation keeps it)."""
    from scapy.layers.inet import TCP

    c, s = net.agent(client), net.agent(server)
    address = net.addr(server)
    bpf = _syn_filter(net.family, port)
    opened = 0
    with s.tcp_server(address, port), s.sniff(net.iface(server), bpf=bpf) as at_server, \
            c.sniff(net.iface(client), bpf=bpf) as at_client:
        for _ in range(count):
            result = c.tcp_connect(address, port, send_bytes=64)
            if not (result["connected"] and result["received"] == 64
                    and result["echo_digest"] == result["digest"]):
                break  # (the measurement has failed: no need to wait out the others)
            opened += 1
        deadline = time.monotonic() + 5
        while len(at_server.packets()) < opened and time.monotonic() < deadline:
            time.sleep(0.05)
        sent: dict[int, float] = {}
        for pkt in at_client.packets():
            sent.setdefault(int(pkt[TCP].seq), float(pkt.time))
        arrived: dict[int, float] = {}
        for pkt in at_server.packets():
            arrived.setdefault(int(pkt[TCP].seq), float(pkt.time))
    delays = [arrived[seq] - t for seq, t in sent.items() if seq in arrived]
    return Delays(delays, opened, count)


def kernel_refusals(net: Any) -> int:
    """New flows the fw's kernel dropped before the queue for being beyond a client's rate
    or flow caps (the counters of the cap rules in the grants chain, this family)."""
    listing = net.lab.tb.run("fw", ["nft", "list", "chain", "inet", ENFORCER_MAPS_TABLE, "grants"]).stdout
    family = "ip" if net.family == "ipv4" else "ip6"
    return sum(int(m.group(1)) for m in re.finditer(
        rf"add @(?:new_flow_rate|flows)_{family} \{{.*\}} counter packets (\d+) bytes \d+ drop", listing))


@dataclass
class FloodCounts:
    syns: int = 0
    tftp_requests: int = 0
    port_lines: int = 0
    grant_calls: int = 0
    grants_refused: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.syns} SYNs, {self.tftp_requests} TFTP requests, {self.port_lines} PORT lines, "
                f"{self.grant_calls} grant calls ({self.grants_refused} refused) in {self.seconds:.1f} s")


class Flood:
    """One client's hostile volume, every kind at once, while the ``with`` block runs
    (and until each kind has sent all of its count)."""

    def __init__(self, net: Any, node: str, server: str, *, syns: int = 20_000, tftp: int = 2_000,
                 port_lines: int = 2_000, grants: int = 10_000) -> None:
        self.net, self.node, self.server = net, node, server
        self.want = FloodCounts(syns, tftp, port_lines, grants)
        self.counts = FloodCounts()
        self._threads: list[threading.Thread] = []
        self._started = 0.0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Flood:
        try:
            return self._start()
        except BaseException:  # what it opened goes: the next check's server needs port 21
            self._stack.close()
            raise

    def _start(self) -> Flood:
        net, agent = self.net, self.net.agent(self.node)
        address = net.addr(self.server)
        session = net.session(self.node)
        # the FTP server the PORT lines go to (the filter reads them on the way)
        self._stack.enter_context(net.agent(self.server).tcp_server(address, 21))
        # An earlier flood's connections may hold the flooder at its user-mode flow cap
        # until the fw's conntrack forgets them: its control connection is tried until then.
        deadline = time.monotonic() + CONTROL_WAIT
        while True:
            control = self._stack.enter_context(agent.tcp_open(address, 21))
            if control.connected or time.monotonic() >= deadline:
                break
            time.sleep(0.5)  # (a refusal comes at once)
        if not control.connected:
            raise RuntimeError(f"the flooder's FTP control connection failed for {CONTROL_WAIT:g} s: "
                               f"{control.error}")
        base = [int(b) for b in net.addr(self.node).split(".")] if net.family == "ipv4" else None
        self._started = time.monotonic()

        def syns() -> None:
            self.counts.syns = int(agent.connect_flood(address, 21, self.want.syns)["sent"])

        def tftp() -> None:
            self.counts.tftp_requests = int(agent.datagram_flood(address, 69, self.want.tftp_requests,
                                                                 TFTP_REQUEST)["sent"])

        def port_lines() -> None:
            # in chunks, each read back (the filter may rewrite the lines: NAT) up to the
            # echo of its last line, so that neither end's buffers fill while the other waits
            for first in range(0, self.want.port_lines, PORT_LINES_PER_CHUNK):
                lines = []
                for i in range(first, min(first + PORT_LINES_PER_CHUNK, self.want.port_lines)):
                    port = 20000 + i
                    lines.append(f"PORT {','.join(map(str, base))},{port >> 8},{port & 255}\r\n"
                                 if base else f"EPRT |2|{net.addr(self.node)}|{port}|\r\n")
                mark = f"NOOP flood chunk {first}"
                control.talk(("".join(lines) + mark + "\r\n").encode(), until=mark, timeout=30)
                self.counts.port_lines += len(lines)

        def grants() -> None:
            with net.client() as api:
                for i in range(self.want.grant_calls):
                    self.counts.grant_calls += 1
                    try:
                        api.allow_future_connect(session, (address, FLOOD_GRANT_PORTS + i % 20000),
                                                 protocol_guid=GUIDS["FTP"], flags=Flags.TIMEOUT)
                    except SessionApiError:
                        self.counts.grants_refused += 1

        for work in (syns, tftp, port_lines, grants):
            thread = threading.Thread(target=self._guarded, args=(work,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _guarded(self, work: Any) -> None:
        try:
            work()
        except Exception as exc:  # reported by the check, not lost in a thread
            self.counts.errors.append(f"{work.__name__}: {exc}")

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for thread in self._threads:
            thread.join(120)
        self.counts.seconds = time.monotonic() - self._started
        self._stack.close()
