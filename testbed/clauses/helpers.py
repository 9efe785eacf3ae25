"""Small shared pieces of the clause suite: crafted packets, silent drops, transfers compared
by digest, the mode an admitted flow ran in, and enforcer lookups."""

from __future__ import annotations

import ipaddress
import itertools
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, TCPerror, UDPerror
from scapy.layers.inet6 import IPv6, _ICMPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from testbed import timeouts
from testbed.checks import POLL_INTERVAL, CheckFailed, expect_no_packet, expect_packet, is_noise, matches
from testbed.drivers import Unsupported
from testbed.lab import FLOW_MODE_MARKS, FLOW_MODE_MASK, GUIDS, ONE_WAY_MARK, SOCKS_PORT, SOCKS_USERS
from testbed.plugin import Net
from testbed.session_api import Action, Flags, SessionApiError, SessionCalls


def ip(net: Net, src: str, dst: str) -> Packet:
    return IP(src=src, dst=dst) if net.family == "ipv4" else IPv6(src=src, dst=dst)


def syn(net: Net, src: str, dst: str, sport: int, dport: int) -> Packet:
    return ip(net, src, dst) / TCP(sport=sport, dport=dport, flags="S", seq=1000)


def datagram(net: Net, src: str, dst: str, sport: int, dport: int, payload: bytes) -> Packet:
    return ip(net, src, dst) / UDP(sport=sport, dport=dport) / payload


def checksums_ok(pkt: Packet) -> bool:
    """Whether every checksum in a captured packet is right (IPv4 header, TCP, UDP, ICMP,
    ICMPv6, and a quoted IPv4 header), as Scapy computes them from the packet's bytes.

    A TCP or UDP checksum may also be a *partial* one that matches the addresses: a
    local socket's packets cross veth links with checksum offload pending (the
    receiving stack trusts them), so a capture shows only the pseudo-header sum; the
    kernel's NAT keeps that sum right as it changes addresses. The TCP or UDP checksum
    of a quoted packet is left alone: a quote is usually cut short.
    """
    clean = pkt.copy()
    layer: Packet = clean
    partial_ok = True
    while layer:
        if isinstance(layer, TCP | UDP) and not isinstance(layer, TCPerror | UDPerror):
            partial_ok = _is_partial_checksum(layer)
        if not isinstance(layer, TCPerror | UDPerror):
            for name in ("chksum", "cksum"):
                if name in layer.fields:
                    delattr(layer, name)
        layer = layer.payload
    if bytes(clean) == bytes(pkt):
        return True
    if not partial_ok:
        return False
    # only the transport checksum may differ: every other one must still be right
    for transport in (clean.getlayer(TCP), clean.getlayer(UDP)):
        if transport is not None and not isinstance(transport, TCPerror | UDPerror):
            transport.chksum = pkt[transport.__class__].chksum
    return bytes(clean) == bytes(pkt)


def _is_partial_checksum(layer: Packet) -> bool:
    """Whether a TCP/UDP header's checksum is the folded sum of its pseudo-header alone."""
    under = layer.underlayer
    length = len(bytes(layer))
    if isinstance(under, IP):
        words = (socket.inet_pton(socket.AF_INET, under.src) + socket.inet_pton(socket.AF_INET, under.dst)
                 + struct.pack("!BBH", 0, under.proto, length))
    elif isinstance(under, IPv6):
        words = (socket.inet_pton(socket.AF_INET6, under.src)
                 + socket.inet_pton(socket.AF_INET6, under.dst) + struct.pack("!IxxxB", length, under.nh))
    else:
        return False
    total = sum(struct.unpack(f"!{len(words) // 2}H", words))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return int(layer.chksum) in ({total} if total not in (0, 0xFFFF) else {0, 0xFFFF})


def decisions_for(net: Net, dport: int, src: str | None = None) -> list[dict[str, Any]]:
    """The enforcer's recent decisions about flows to ``dport`` (optionally from ``src``)."""
    out = []
    for d in net.call("decisions", limit=10000):
        flow = d["flow"]
        if flow.endswith(f":{dport}") and (src is None or f" {src}:" in flow or f"[{src}]:" in flow):
            out.append(d)
    return out


NEGATIVE = timeouts.NEGATIVE


# --- silent drops ---------------------------------------------------------------------------

def is_icmp(pkt: Packet) -> bool:
    """Any ICMP or ICMPv6 message, error or not (Scapy leaves an ICMPv6 type it does not
    know as raw bytes after the IPv6 header)."""
    if IPv6 in pkt and pkt[IPv6].nh == socket.IPPROTO_ICMPV6:
        return True
    return any(isinstance(layer, ICMP | _ICMPv6) for layer in pkt.iterpayloads())


def probe_headers(probe: Packet) -> Packet:
    """A template of a probe's IP and TCP or UDP headers as the fw receives it: no Ether
    header, no payload (a capture may dissect that as something else: DNS, say)."""
    template: Packet = (probe.payload if isinstance(probe, Ether) else probe).copy()
    template[TCP if TCP in template else UDP].remove_payload()
    return template


def answers_to(reached: list[tuple[Packet, float]]) -> Callable[[Packet], bool]:
    """A template of what a silent drop never brings about: for each probe (its headers,
    and the time it reached the fw), anything to its source address from then on that is
    TCP or UDP from its destination address to its source port (a reset, a reply), or an
    ICMP message of any kind, but one that quotes another flow's packet."""
    probes = []
    for headers, at in reached:
        layer = TCP if TCP in headers else UDP
        under = headers[layer].underlayer
        probes.append((ipaddress.ip_address(under.src), ipaddress.ip_address(under.dst), layer,
                       int(headers[layer].sport), at))

    def about(pkt: Packet, layer: type[Packet], sport: int) -> bool:
        """Whether an ICMP message may be about the probe: it quotes no TCP or UDP header,
        or the probe's."""
        quoted = TCPerror if layer is TCP else UDPerror
        for kind in (TCPerror, UDPerror):
            if kind in pkt:
                return kind is quoted and int(pkt[kind].sport) == sport
        return True

    def an_answer_to_a_probe(pkt: Packet) -> bool:
        """to a probe's source, after it reached the fw: from its destination to its port,
        or ICMP of any kind (but about another flow)"""
        outer = pkt.getlayer(IP) if IP in pkt else pkt.getlayer(IPv6)
        if outer is None or is_noise(pkt):
            return False
        src, dst = ipaddress.ip_address(outer.src), ipaddress.ip_address(outer.dst)
        icmp = is_icmp(pkt)
        return any(dst == source and float(pkt.time) >= at
                   and (about(pkt, layer, sport) if icmp
                        else src == destination and layer in pkt and pkt[layer].dport == sport)
                   for source, destination, layer, sport, at in probes)
    return an_answer_to_a_probe


def sent_on(arrived: list[Packet]) -> Callable[[Packet], bool]:
    """A template of a probe the fw passed on, translated or not: for each probe (as the
    fw received it, when its capture says), a packet from then on with its protocol and
    source port and, for TCP, its sequence number (a translation keeps both; a
    connection's initial one is random), for UDP its payload."""
    probes = []
    for pkt in arrived:
        layer = TCP if TCP in pkt else UDP
        probes.append((layer, int(pkt[layer].sport),
                       int(pkt[TCP].seq) if layer is TCP else bytes(pkt[UDP].payload),
                       float(pkt.time)))

    def the_probe_sent_on(pkt: Packet) -> bool:
        """a probe passed on: its protocol, source port and sequence number or payload"""
        return any(layer in pkt and float(pkt.time) >= at and int(pkt[layer].sport) == sport
                   and (int(pkt[TCP].seq) if layer is TCP else bytes(pkt[UDP].payload)) == which
                   for layer, sport, which, at in probes)
    return the_probe_sent_on


# Once the firewall has decided a probe, how long an answer to it (a reset, an ICMP
# error, a reply through the fw) may take to arrive and be captured: two veth hops and a
# capture's read take milliseconds on an idle machine; this leaves room for a busy one.
# A SYN let through is answered by the server's kernel; a datagram by a process (an
# agent's echo server), which a loaded machine may keep waiting longer.
SETTLE_GRACE = {"tcp": 0.25, "udp": 0.6}


def flow_name(headers: Packet) -> str:
    """A probe's flow as a firewall's decision log names it (``Firewall.decided``)."""
    layer = TCP if TCP in headers else UDP
    under = headers[layer].underlayer

    def endpoint(address: str, port: int) -> str:
        text = str(ipaddress.ip_address(address))
        return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"
    return (f"{'tcp' if layer is TCP else 'udp'} {endpoint(under.src, int(headers[layer].sport))}"
            f" -> {endpoint(under.dst, int(headers[layer].dport))}")


class _Probe:
    """A probe sent: what it is, its headers as the fw receives them, when it was sent
    (time.monotonic()) and when it reached the fw (once seen there)."""

    def __init__(self, what: str, headers: Packet) -> None:
        self.what = what
        self.headers = headers
        self.sent_monotonic = time.monotonic()
        self.arrived: Packet | None = None  # as the fw received it
        self.settled = False

    @property
    def reached(self) -> float | None:
        return None if self.arrived is None else float(self.arrived.time)


class Drop:
    """Probes from one node that the fw must drop silently (see ``dropped_silently``).
    Each names itself (``what``) for the failure messages.

    A probe is watched only while something could still come of it: until it has reached
    the fw and the firewall has decided it (``Firewall.decided``, or ``holds_packets``
    after its arrival), then ``SETTLE_GRACE`` for an answer to arrive; or, while the
    firewall cannot tell, ``timeouts.NEGATIVE`` after it was sent."""

    def __init__(self, net: Net, node: str, since: float) -> None:
        self.net = net
        self.node = node
        self.agent = net.agent(node)
        self.since = since
        self.probes: list[_Probe] = []
        self.arrived = net.fw_received(net.topology.fw_iface_facing(node), since)

    def tcp(self, what: str, address: str, port: int) -> None:
        """A real connection attempt: it must not connect, nor be refused."""
        outcome = self._from_socket(what, "tcp", address, port, b"", TCP(dport=port, flags="S"))
        assert not outcome["connected"], f"{what}: connected, but the firewall should have dropped it"
        assert outcome["error"] is None, \
            f"{what}: {outcome['error']}, but a drop must be silent: no reset, no ICMP"

    def udp(self, what: str, address: str, port: int, payload: bytes) -> None:
        """A datagram from a real socket: nothing may answer it."""
        outcome = self._from_socket(what, "udp", address, port, payload, UDP(dport=port))
        assert outcome["reply"] is None, \
            f"{what}: answered with {outcome['reply']!r}, but the firewall should have dropped it"
        assert outcome["error"] is None, \
            f"{what}: {outcome['error']}, but a drop must be silent: no ICMP"

    def _from_socket(self, what: str, proto: str, address: str, port: int, payload: bytes,
                     transport: Packet) -> dict[str, Any]:
        """Send from a real socket, wait until nothing can still come of it; its outcome."""
        probe = _Probe(what, transport)
        started = self.agent.probe_start(proto, address, port, payload)
        local = started["local"]
        assert local is not None, f"{what}: the probe was never sent: {started['error']}"
        transport.sport = int(local[1])
        probe.headers = ip(self.net, str(local[0]), address) / transport
        self.probes.append(probe)
        self._settle()
        outcome: dict[str, Any] = self.agent.probe_outcome(started["pid"])
        return outcome

    def send(self, what: str, *packets: Packet) -> None:
        """Crafted probes: an IP packet is routed by the node, a frame (with its Ether
        header) goes out on the node's interface as it is."""
        assert packets, f"{what}: no packet to send"
        frames = [p for p in packets if isinstance(p, Ether)]
        routed = [p for p in packets if not isinstance(p, Ether)]
        self.probes += [_Probe(what, probe_headers(p)) for p in packets]
        if frames:
            self.agent.send(frames, iface=self.net.iface(self.node))
        if routed:
            self.agent.send(routed)

    def sent(self, what: str, headers: Packet) -> None:
        """A probe the node has just sent by other means (its echo server's reply, say):
        its IP and TCP or UDP headers as the fw receives them."""
        self.probes.append(_Probe(what, headers))

    def _settle(self) -> None:
        """Wait until nothing can still come of any probe (see the class)."""
        waiting = [p for p in self.probes if not p.settled]
        if not waiting:
            return
        firewall = self.net.enforcer
        holds: float | None = firewall.holds_packets
        # (the watch is timed on the monotonic clock, which no clock step moves; the
        # capture's times, and so ``now`` beside them, are the wall clock's)
        limit = max(p.sent_monotonic for p in waiting) + NEGATIVE
        earliest = min(p.sent_monotonic for p in waiting)
        while time.monotonic() < limit:
            now = time.time()
            captured = self.arrived.packets()
            for p in waiting:
                if p.arrived is None:
                    p.arrived = next((got for got in captured if matches(p.headers, got)), None)
            if all(p.reached is not None for p in waiting):
                last = max(p.reached or 0.0 for p in waiting)
                if ((holds is not None and now >= last + holds)
                        or firewall.decided([flow_name(p.headers) for p in waiting], earliest)):
                    grace = max(SETTLE_GRACE["udp" if UDP in p.headers else "tcp"] for p in waiting)
                    time.sleep(max(0.0, min(grace, limit - time.monotonic())))
                    break
            time.sleep(POLL_INTERVAL)
        for p in waiting:
            p.settled = True

    def check(self, back: Any) -> None:
        """Every probe reached the fw (after ``since``) on its interface facing the node,
        and, once nothing could still come of them, nothing has answered any: not at the
        node (``back``, its capture), and nothing the fw sent; nor did the fw send any
        on, translated or not (``sent_on``)."""
        assert self.probes, f"no probe was sent from {self.node}: this drop shows nothing"
        self._settle()
        for p in self.probes:
            if p.arrived is None:  # (not seen while settling: the capture once more)
                try:
                    p.arrived = expect_packet(self.arrived, p.headers, timeout=0)
                except CheckFailed as exc:
                    raise CheckFailed(f"{p.what}: the probe never reached the fw, so that nothing "
                                      f"came of it shows nothing\n{exc}") from None
        answer = answers_to([(p.headers, p.reached) for p in self.probes if p.reached is not None])
        whats = "; ".join(dict.fromkeys(p.what for p in self.probes))
        fw_sent = self.net.fw_sent(self.since)
        for where, sniffer in ((f"at {self.node}, the sender", back), ("sent by the fw", fw_sent)):
            try:
                expect_no_packet(sniffer, answer, timeout=0)
            except CheckFailed as exc:
                raise CheckFailed(f"{whats}: answered ({where}), but a drop must be silent: no "
                                  f"reset, no ICMP, no reply\n{exc}") from None
        try:
            expect_no_packet(fw_sent, sent_on([p.arrived for p in self.probes if p.arrived is not None]),
                             timeout=0)
        except CheckFailed as exc:
            raise CheckFailed(f"{whats}: the fw sent it on, but it must be dropped\n{exc}") from None


@contextmanager
def dropped_silently(net: Net, node: str) -> Iterator[Drop]:
    """The probes sent from ``node`` in the block (``Drop.tcp``, ``udp``, ``send``, ``sent``)
    are dropped silently. A real socket's probe must not connect or get a reply; when the
    block ends, each probe is shown to have reached the fw on its interface facing
    ``node`` (the fw's capture: any firewall's), and nothing to have answered any of
    them: no reset, no reply, no ICMP message of any kind (but one about another flow),
    neither at ``node`` (its capture) nor sent by the fw to a probe's source (a spoofed
    one's too), watched while anything could still come of them (``Drop``); nor to have
    been sent on by the fw (``sent_on``: its source port with its sequence number or
    payload, translated or not). That nothing reached the far end some other way is the
    check's to show, where it would arrive."""
    since = time.time()
    with net.agent(node).sniff(net.iface(node)) as back:
        drop = Drop(net, node, since)
        yield drop
        drop.check(back)


# Crafted probes' source ports: below Linux's ephemeral ports (32768-60999), so that no
# real connection shares one
PROBE_PORTS = itertools.cycle(range(31000, 32000))


def probe_port() -> int:
    return next(PROBE_PORTS)


def assert_dropped_silently(net: Net, probes: list[tuple[str, Packet]]) -> None:
    """Send each (node, packet or frame; a packet's source port from ``probe_port``): it is
    dropped silently (``dropped_silently``: it reaches the fw on the node's interface, and
    nothing answers it) and goes no further: the fw sends nothing that carries a probe's
    port, translated or not, and s1 sees none."""
    with dropped_silently_meanwhile(net, *dict.fromkeys(node for node, _ in probes)) as send:
        for node, probe in probes:
            send(node, f"{node}'s probe", probe)


@contextmanager
def dropped_silently_meanwhile(net: Net, *nodes: str) -> Iterator[Callable[[str, str, Packet], None]]:
    """As ``assert_dropped_silently``, for probes that ``nodes`` send while the block does
    what else a check must do soon after them (a SecureNAT bind expires unused in the lab's
    2 s: it waits for no negative timeout). The block gets the function that sends one
    (node, what it is, packet or frame); when it ends, each is shown dropped silently and
    gone no further. What else the block does must not be answered with a reset or an ICMP
    error to a node that sends probes."""
    ports: set[int] = set()

    def carries_a_probe(pkt: Packet) -> bool:
        """A probe sent on (translated or not) or an answer to one: a probe's port at
        either end."""
        layer = TCP if TCP in pkt else UDP if UDP in pkt else None
        return layer is not None and bool({pkt[layer].sport, pkt[layer].dport} & ports)

    server_mac = net.mac("s1")

    def a_probe_the_server_got(pkt: Packet) -> bool:
        """A probe (or an answer to one) that the server did not send itself."""
        return carries_a_probe(pkt) and pkt[Ether].src != server_mac

    since = time.time()
    with net.agent("s1").sniff(net.iface("s1")) as at_server:
        with ExitStack() as stack:
            drops = {node: stack.enter_context(dropped_silently(net, node)) for node in nodes}

            def send(node: str, what: str, probe: Packet) -> None:
                ports.add(int(probe[TCP].sport if TCP in probe else probe[UDP].sport))
                drops[node].send(what, probe)
            yield send
        assert ports, "no probe was sent: the drop shows nothing"
        expect_no_packet(net.fw_sent(since), carries_a_probe, timeout=0)
        expect_no_packet(at_server, a_probe_the_server_got, timeout=0)


def talk(net: Net, node: str, address: str, port: int) -> None:
    """``node`` connects to an echo server and gets back what it sent."""
    data = f"{node} on its own connection to {address} port {port}".encode()
    with net.agent(node).tcp_open(address, port) as conn:
        assert conn.connected, f"{node}'s own connection was not admitted: {conn.error}"
        assert conn.talk(data, len(data)) == data, f"{node}'s own connection did not bring back its data"


def exchange_datagram(net: Net, node: str, address: str, port: int) -> None:
    """``node`` sends a datagram to an echo server and gets it back."""
    data = f"{node}'s own datagram to {address} port {port}".encode()
    answer = net.agent(node).udp_send(address, port, data, expect_reply=True)
    assert answer["reply"] == data, f"{node}'s own datagram: {answer}"


def wait_until(condition: Callable[[], bool], what: str, within: float = timeouts.POSITIVE) -> None:
    """A positive wait: returns as soon as ``condition()`` holds, fails naming ``what``
    after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {within:g} s"
        time.sleep(0.05)


# How long after a permission's deadline a check sends the probe that shows it expired
EXPIRY_MARGIN = 0.3


def wait_past_expiry(action: Action) -> None:
    """Sleep past ``action``'s TIMEOUT deadline without asking the enforcer anything after
    it, so that the probe sent next shows the packet path honours the deadline (and not a
    sweep that a question to the API would make first). The deadline is the action's
    lifetime (its ``expires`` less its ``created``) after its grant, which came before
    the question asked here."""
    info = action.info()
    asked = time.monotonic()
    assert info["expires"] is not None, f"action {action.id} has no deadline: {info}"
    assert info["state"] == "pending", f"action {action.id} is {info['state']} before its deadline"
    lifetime = float(info["expires"]) - float(info["created"])
    time.sleep(max(0.0, asked + lifetime + EXPIRY_MARGIN - time.monotonic()))


FTP_GUID = GUIDS["FTP"]


def grant(net: Net, client: SessionCalls, target: tuple[str, int], *, session_of: str = "c1",
          protocol: str = "tcp", flags: Flags | None = None, **kwargs: Any) -> Action:
    """AllowFutureConnect for ``session_of``'s SecureNAT session, on behalf of FTP.

    In a test run in user mode the grant carries NO_KERNEL_MODE.
    """
    flags = flags or Flags(0)
    if net.mode == "user":
        flags |= Flags.NO_KERNEL_MODE
    return client.allow_future_connect(net.session(session_of), target, protocol_guid=FTP_GUID,
                                       protocol=protocol, flags=flags, **kwargs)


def assert_echoed(result: dict[str, Any], size: int, what: str) -> None:
    """A TCP echo (``Agent.tcp_connect`` with ``send_bytes``, ``TcpConnection.exchange``)
    carried ``size`` bytes each way, and what came back is what was sent: the SHA-256 of
    the echo is that of the bytes sent."""
    assert result.get("connected", True), f"{what}: no connection: {result['error']}"
    assert result["error"] is None and result["sent"] == result["received"] == size, \
        f"{what}: {result['sent']} of {size} bytes sent, {result['received']} came back: {result['error']}"
    assert result["echo_digest"] == result["digest"], \
        f"{what}: the {size} bytes that came back are not those sent (SHA-256 {result['echo_digest']}, " \
        f"sent {result['digest']})"


def _endpoint(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """An endpoint of the flows listing ("192.0.2.11:40000", "[2001:db8::11]:40000")."""
    address, _, port = text.rpartition(":")
    return ipaddress.ip_address(address.strip("[]")), int(port)


def _conntrack_entries(net: Net, protocol: str) -> dict[tuple[Any, Any], tuple[int, bool]]:
    """The fw's conntrack entries of the family and ``protocol`` ("tcp", "udp"), by their
    original direction's (source, destination) endpoints: each one's mark, and whether
    the kernel saw a reply of it."""
    listing = net.lab.tb.run("fw", ["conntrack", "-L", "-f", net.family, "-p", protocol]).stdout
    entries = {}
    for line in listing.splitlines():
        original = re.search(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)", line)
        mark = re.search(r"\bmark=(\d+)", line)
        if original is not None and mark is not None:
            src, dst, sport, dport = original.groups()
            entries[(ipaddress.ip_address(src), int(sport)), (ipaddress.ip_address(dst), int(dport))] = \
                (int(mark.group(1)), "[UNREPLIED]" not in line)
    return entries


# A worker process (README "Worker processes") sends what it saw of its flows within this
# of its queue running dry
WORKER_FIGURES = 0.3
WORKER_FIGURES_SETTLE = 3.0


def _settled_flows(net: Net, action: Action) -> list[dict[str, Any]]:
    """The enforcer's records of the flows ``action`` admitted. Those a worker process
    carried (``worker``) are read again until a worker's report has nothing to add."""
    def listed() -> list[dict[str, Any]]:
        return [f for f in net.call("flows", limit=10000) if f["action"] == action.id]

    flows = listed()
    deadline = time.monotonic() + WORKER_FIGURES_SETTLE
    while any(f["worker"] for f in flows) and time.monotonic() < deadline:
        time.sleep(WORKER_FIGURES)
        again = listed()
        if again == flows:
            break
        flows = again
    return flows


def assert_ran_in_mode(net: Net, action: Action, mode: str | None = None) -> list[dict[str, Any]]:
    """Every flow ``action`` admitted (one at least) ran in ``mode`` (the row's: net.mode),
    shown by what a flow of the other mode cannot show: the enforcer lists it in that mode;
    its conntrack entry's mark, by which the kernel routes its packets, is that mode's
    (user: every packet to the enforcer's queue; kernel: the rest of the flow stays in the
    kernel); and of the replies the kernel saw (a two-way flow's), the enforcer counted
    some in user mode, none in kernel mode. Call it while the flows' conntrack entries live
    (a connection's, 10 s to 2 min after it closes). Returns the enforcer's records of the
    flows (a worker process's, once its figures have come).

    Only the enforcer shows its flows: with another firewall a user row is n/a
    (Unsupported), and a kernel row, its flows' one way, has nothing to show ([])."""
    mode = mode or net.mode
    assert mode in FLOW_MODE_MARKS, f"no mode {mode!r} to show"
    if not net.own_enforcer:
        if mode == "user":
            raise Unsupported("showing which mode a flow ran in")
        return []
    listed = _settled_flows(net, action)
    assert listed, f"the enforcer lists no flow that action {action.id} admitted: none ran in {mode} mode"
    entries: dict[str, dict[tuple[Any, Any], tuple[int, bool]]] = {}
    for flow in listed:
        what = f"{flow['flow']}, admitted by action {action.id} in a {mode}-mode row"
        protocol, src, _, dst = flow["flow"].split()
        if protocol not in entries:
            entries[protocol] = _conntrack_entries(net, protocol)
        # a kernel-mode redirect's entry is the flow to the fw's redirect port
        targets = {_endpoint(dst)}
        if flow["redirect"] is not None:
            targets.add((ipaddress.ip_address(flow["redirect"][0]), int(flow["redirect"][1])))
        found = [entry for (origin, target), entry in entries[protocol].items()
                 if origin == _endpoint(src) and target in targets]
        assert len(found) == 1, f"{what}: {len(found)} conntrack entries of it in the fw, not one"
        mark, replied = found[0]
        assert flow["mode"] == mode, f"{what}: the enforcer ran it in {flow['mode']} mode"
        assert mark & FLOW_MODE_MASK == FLOW_MODE_MARKS[mode], \
            f"{what}: its conntrack mark {mark:#010x} is not {mode} mode's ({FLOW_MODE_MARKS[mode]:#010x} " \
            f"of {FLOW_MODE_MASK:#010x})"
        if mode == "kernel":
            assert flow["packets_back"] == 0, \
                f"{what}: the enforcer saw {flow['packets_back']} of its replies, which the kernel carries"
        elif replied and not mark & ONE_WAY_MARK:
            assert flow["packets_back"] > 0, \
                f"{what}: the kernel saw a reply of it, the enforcer none, as if the kernel carried them"
    return listed


def pending_actions(net: Net, session_of: str = "c1") -> list[dict[str, Any]]:
    return list(net.call("actions", session=net.session(session_of)))


def wait_for_state(action: Action, state: str, within: float) -> None:
    deadline = time.monotonic() + within
    while action.state != state:
        assert time.monotonic() < deadline, f"action {action.id} is {action.state}, not {state}"
        time.sleep(0.1)


def socks_open(net: Net, node: str, user: str, command: str, host: str, port: int,
               timeout: float | None = None, udp_port: int = 0) -> Any:
    """A SOCKS5 request from ``node`` to the fw's SOCKS service as ``user``: a Firewall
    client's control connection (agent.SocksConnection), which is its session. A UDP
    ASSOCIATE's datagrams go from ``udp_port`` (0: the kernel's choice)."""
    proxy = (net.fw_internal(node), SOCKS_PORT)
    return net.agent(node).socks(proxy, user, SOCKS_USERS[user], command, host, port, timeout=timeout,
                                 udp_port=udp_port)


def anywhere(net: Net) -> str:
    """The unspecified address of the family (a SOCKS request's "not known")."""
    return "0.0.0.0" if net.family == "ipv4" else "::"


def fw_session(net: Net, node: str, user: str) -> int:
    """The newest Firewall-client session of ``node``'s user."""
    ids = [s["id"] for s in net.call("sessions") if s["kind"] == "firewall-client"
           and s["client"] == net.addr(node) and s["user"] == user]
    assert ids, f"no Firewall-client session of {user} on {node}"
    return int(max(ids))


def refused(net: Net, error: type[SessionApiError], message: str) -> Any:
    """``pytest.raises`` for a session call that SPEC.md answers with ``error``: its result
    code, from any firewall; from pinhole's enforcer, also a message naming the problem
    (``message``, a regular expression; another firewall's texts are its own)."""
    return pytest.raises(error, match=message if net.own_enforcer else None)
