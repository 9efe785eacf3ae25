"""What the engine holds is what its caps count (SPEC rule 16), whatever the order of
calls and packets: a hypothesis state machine drives one Engine, with small caps, through
the session API (grants of every kind, redirects, binds and their approval, cancels,
session ends, Firewall clients' connections), packets of every path through
``Engine.handle`` (each kind of new flow, a filtered flow's data each way, a redirect's,
a bind's, ICMP errors, now and then with bytes changed), and the clock (expiry, idle
sessions). After every step:

- the engine never failed on a packet (``errors``), and the API raised only its
  documented errors;
- each cap's count, in total and per client, is what its table holds: pending
  permissions, sessions, open binds, held user-mode flows; the byte budgets hold what
  the held flows' stream editors hold, and nothing once none does;
- every redirect port block in use belongs to a pending redirect, and back in its pool
  once none does.

A count that drifted from its table would refuse too early (a leak) or let a client past
its cap; either would show here. Packets are made with Scapy (documentation addresses)."""

from __future__ import annotations

import ipaddress
from collections import Counter

from core_policy import GUID, INTERNAL, POLICY, stretch_filter
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw

from enforcer.core import marks
from enforcer.core.binds import BindState
from enforcer.core.decisions import HOOK_FORWARD, HOOK_INPUT, HOOK_OUTPUT, HOOK_PREROUTING, QueuedPacket
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.ipfilter import IpFilter
from enforcer.core.limits import Limits, Quota
from enforcer.core.packet import TCP as TCP_PROTOCOL
from enforcer.core.packet import UDP as UDP_PROTOCOL
from enforcer.core.packet import Ingress, IPAddress
from enforcer.core.results import SessionApiError

ip = ipaddress.ip_address
CLIENTS = ("192.0.2.11", "192.0.2.12", "2001:db8:1::11")
SERVERS = {4: "198.51.100.21", 6: "2001:db8:2::21"}
FW_INT, EXT, EXT6 = "192.0.2.1", "198.51.100.1", "2001:db8:2::1"
FTP = GUID["FTP"]
PORTS = (20000, 20001, 20002)
FLAGS = st.sampled_from([Flags(0), Flags.NO_KERNEL_MODE, Flags.ALLOW_MULTIPLE,
                         Flags.ALLOW_MULTIPLE | Flags.NO_KERNEL_MODE, Flags.TIMEOUT,
                         Flags.BIDIRECTIONAL, Flags.ADDRESS_BASED | Flags.NO_KERNEL_MODE])
# Small caps, so that the machine meets them
LIMITS = Limits(sessions_total=4, sessions_per_client=2, pending_total=8, pending_per_client=5,
                binds_total=3, binds_per_client=2, user_flows_total=4, user_flows_per_client=3,
                buffered_bytes_total=6000, buffered_bytes_per_client=4000,
                session_idle_timeout=50.0)


class Bookkeeping(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = Engine(POLICY, INTERNAL, [ip(EXT), ip(EXT6)], nat=True,
                             data_filters=["stretch"], limits=LIMITS,
                             internal_addresses=[ipaddress.ip_interface(f"{FW_INT}/24")],
                             user_redirect_ports=(63000, 63009), kernel_redirect_ports=(62000, 62009),
                             bind_ports=(40000, 40004))
        self.engine.stream_filter = stretch_filter
        self.now = 1.0
        self.actions: list[int] = []
        self.granted: list[tuple[str, int, bool]] = []  # client, port, UDP
        self.redirect_ports: list[tuple[str, int, bool]] = []  # client, port, user mode
        self.bind_ports: list[tuple[int, int]] = []  # protocol, port
        self.sport = 30000
        # per open TCP flow (client, server, sport, dport): the next sequence number each way
        self.streams: dict[tuple[str, str, int, int], list[int]] = {}

    # --- helpers ---------------------------------------------------------------------------
    def sessions(self) -> list[int]:
        return [s.id for s in self.engine.sessions] + [999]  # and one that never was

    def handle(self, pkt: Packet, hook: int = HOOK_FORWARD, mark: int = 0, *, inside: bool = True,
               flips: tuple[tuple[int, int], ...] = ()) -> bool:
        data = bytearray(bytes(pkt))
        for at, value in flips:
            if at < len(data):
                data[at] = value
        queued = QueuedPacket(bytes(data), hook, mark,
                              Ingress.INTERNAL if inside else Ingress.EXTERNAL,
                              "int0" if inside else ("ext0" if hook != HOOK_OUTPUT else ""),
                              checksum_ready=hook != HOOK_PREROUTING)
        answer = self.engine.handle(queued, self.now)
        assert self.engine.counters["errors"] == 0, answer.reason
        self.engine.take_effects()
        return answer.accept

    def api(self, call: str, *args: object, **kwargs: object) -> object:
        try:
            result = getattr(self.engine, call)(*args, **kwargs)
        except SessionApiError:
            return None
        finally:
            self.engine.take_effects()
        return result

    # --- the session API -------------------------------------------------------------------
    @initialize()
    def sessions_to_start_with(self) -> None:
        for client in CLIENTS:
            self.primary(client)

    @rule(client=st.sampled_from(CLIENTS))
    def primary(self, client: str) -> None:
        """A primary FTP connection: the client's SecureNAT session, if it has room."""
        family = ip(client).version
        self.sport += 1
        layer = IP if family == 4 else IPv6
        self.handle(layer(src=client, dst=SERVERS[family]) / TCP(sport=self.sport, dport=21, flags="S"))

    @rule(data=st.data(), port=st.sampled_from(PORTS), udp=st.booleans(), flags=FLAGS,
          filtered=st.booleans())
    def grant(self, data: st.DataObject, port: int, udp: bool, flags: Flags, filtered: bool) -> None:
        session = data.draw(st.sampled_from(self.sessions()))
        found = self.engine.sessions.get(session)
        family = found.client.version if found is not None else 4
        perm = self.api("allow_future_connect", session, ip(SERVERS[family]), port,
                        UDP_PROTOCOL if udp else TCP_PROTOCOL, flags, FTP, self.now,
                        data_filter="stretch" if filtered and not udp else None)
        if perm is not None and found is not None:
            self.actions.append(perm.id)  # type: ignore[attr-defined]
            self.granted.append((str(found.client), port, udp))

    @rule(data=st.data(), port=st.sampled_from(PORTS), udp=st.booleans(), filtered=st.booleans())
    def user_mode_flow(self, data: st.DataObject, port: int, udp: bool, filtered: bool) -> None:
        """A user-mode grant and its flow's first packet at once (the state the caps on
        user-mode flows and buffered bytes count)."""
        before = len(self.granted)
        self.grant(data, port, udp, Flags(0) if filtered and not udp else Flags.NO_KERNEL_MODE,
                   filtered)
        if len(self.granted) > before:
            client, port, udp = self.granted[-1]
            self.new_flow(data, client, port, udp, False, [])

    @rule(data=st.data(), count=st.integers(1, 3), user=st.booleans())
    def redirect(self, data: st.DataObject, count: int, user: bool) -> None:
        session = data.draw(st.sampled_from(self.sessions()))
        found = self.engine.sessions.get(session)
        if found is not None and found.client.version != 4:
            return  # the fw has an internal address for IPv4 clients only here
        made = self.api("redirect_connections", session,
                        [(ip(SERVERS[4]), 8080 + i) for i in range(count)], TCP_PROTOCOL,
                        Flags.NO_KERNEL_MODE if user else Flags(0), FTP, self.now)
        if made is not None and found is not None:
            (_, base), perms = made  # type: ignore[misc]
            self.actions.extend(p.id for p in perms)
            self.redirect_ports.extend((str(found.client), base + i, user) for i in range(count))

    @rule(client=st.sampled_from(CLIENTS[:2]), user=st.sampled_from(["alice", "bob"]))
    def firewall_session(self, client: str, user: str) -> None:
        self.api("open_firewall_session", ip(client), user, self.now)

    @rule(data=st.data(), udp=st.booleans(), approve=st.booleans(), flags=FLAGS)
    def bind(self, data: st.DataObject, udp: bool, approve: bool, flags: Flags) -> None:
        session = data.draw(st.sampled_from(self.sessions()))
        protocol = UDP_PROTOCOL if udp else TCP_PROTOCOL
        bind = self.api("bind_for_client", session, protocol, ip(EXT), self.now)
        if bind is None:
            return
        self.bind_ports.append((protocol, bind.port))  # type: ignore[attr-defined]
        if approve:
            self.api("retroactive_allow_bind", session, protocol, ip(EXT),
                     bind.port, FTP, flags & Flags.BIDIRECTIONAL,  # type: ignore[attr-defined]
                     IpFilter.from_dict({"ranges": [[SERVERS[4], SERVERS[4]]]}), self.now)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if self.actions:
            self.api("cancel", data.draw(st.sampled_from(self.actions)), self.now)

    @rule(data=st.data())
    def end_session(self, data: st.DataObject) -> None:
        self.api("end_session", data.draw(st.sampled_from(self.sessions())), self.now)

    @rule(data=st.data())
    def close_firewall_connection(self, data: st.DataObject) -> None:
        self.api("close_firewall_connection", data.draw(st.sampled_from(self.sessions())), self.now)

    @rule(step=st.sampled_from([0.1, 1.0, 20.0, 61.0, 400.0]))
    def time_passes(self, step: float) -> None:
        self.now += step
        self.engine.expire(self.now)

    # --- packets ---------------------------------------------------------------------------
    @rule(data=st.data(), client=st.sampled_from(CLIENTS), port=st.sampled_from(PORTS),
          udp=st.booleans(), aimed=st.booleans(),
          flips=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=2))
    def new_flow(self, data: st.DataObject, client: str, port: int, udp: bool, aimed: bool,
                 flips: list[tuple[int, int]]) -> None:
        """A new flow's first packet: at random, or aimed at a grant made before (which
        may have been used, cancelled or expired since)."""
        if aimed and self.granted:
            client, port, udp = data.draw(st.sampled_from(self.granted))
        family = ip(client).version
        server = SERVERS[family]
        self.sport += 1
        layer = IP if family == 4 else IPv6
        if udp:
            pkt = layer(src=client, dst=server) / UDP(sport=self.sport, dport=port) / Raw(b"ab|ab")
        else:
            pkt = layer(src=client, dst=server) / TCP(sport=self.sport, dport=port, flags="S", seq=0)
        if self.handle(pkt, flips=tuple(flips)) and not udp and not flips:
            self.streams[(client, server, self.sport, port)] = [1, 1]

    @rule(data=st.data(), outward=st.booleans(), payload=st.sampled_from([b"abc", b"xa|y", b"bbb" * 100]),
          fin=st.booleans(), rst=st.booleans())
    def stream_data(self, data: st.DataObject, outward: bool, payload: bytes, fin: bool, rst: bool) -> None:
        """A segment of a TCP flow admitted before, either way, as a user-mode flow's."""
        if not self.streams:
            return
        key = data.draw(st.sampled_from(sorted(self.streams)))
        client, server, sport, dport = key
        seqs = self.streams[key]
        layer = IP if ip(client).version == 4 else IPv6
        flags = "R" if rst else "FPA" if fin else "PA"
        mark = marks.mark_for(True, False, 0)
        if outward:
            pkt = layer(src=client, dst=server) / TCP(sport=sport, dport=dport, flags=flags,
                                                      seq=seqs[0], ack=seqs[1]) / Raw(payload)
            seqs[0] += len(payload)
        else:
            pkt = layer(src=server, dst=client) / TCP(sport=dport, dport=sport, flags=flags,
                                                      seq=seqs[1], ack=seqs[0]) / Raw(payload)
            seqs[1] += len(payload)
        self.handle(pkt, mark=mark, inside=outward)
        if rst:
            del self.streams[key]

    @rule(data=st.data(), after=st.booleans())
    def to_redirect(self, data: st.DataObject, after: bool) -> None:
        """A client's SYN to a redirect port (kernel mode: as the kernel's rule passes it
        on; user mode: to the port itself), or a reply of the target's."""
        if not self.redirect_ports:
            return
        client, port, user = data.draw(st.sampled_from(self.redirect_ports))
        self.sport += 1
        if after:
            reply = IP(src=SERVERS[4], dst=client) / TCP(sport=8080, dport=self.sport, flags="SA")
            self.handle(reply, mark=marks.mark_for(True, False, 0), inside=False)
        elif user:
            self.handle(IP(src=client, dst=FW_INT) / TCP(sport=self.sport, dport=port, flags="S"),
                        HOOK_PREROUTING)
        else:
            self.handle(IP(src=client, dst=SERVERS[4]) / TCP(sport=self.sport, dport=8080, flags="S"),
                        mark=port)

    @rule(data=st.data(), stranger=st.booleans())
    def to_bind(self, data: st.DataObject, stranger: bool) -> None:
        if not self.bind_ports:
            return
        protocol, port = data.draw(st.sampled_from(self.bind_ports))
        peer = "198.51.100.99" if stranger else SERVERS[4]
        self.sport += 1
        layer = UDP(sport=self.sport, dport=port) / Raw(b"x") if protocol == UDP_PROTOCOL \
            else TCP(sport=self.sport, dport=port, flags="S")
        self.handle(IP(src=peer, dst=EXT) / layer, HOOK_INPUT, inside=False)

    @rule(data=st.data(), outgoing=st.booleans())
    def icmp_error(self, data: st.DataObject, outgoing: bool) -> None:
        """An ICMP error about a flow admitted before (the fw's own, or a router's)."""
        if not self.streams:
            return
        client, server, sport, dport = data.draw(st.sampled_from(sorted(self.streams)))
        if ip(client).version != 4:
            return
        quoted = bytes(IP(src=client, dst=server) / TCP(sport=sport, dport=dport))[:28]
        if outgoing:
            self.handle(IP(src=FW_INT, dst=client) / ICMP(type=3, code=4) / quoted, HOOK_OUTPUT,
                        inside=False)
        else:
            self.handle(IP(src=server, dst=client) / ICMP(type=3, code=3) / quoted,
                        mark=marks.mark_for(True, False, 0), inside=False)

    # --- invariants -----------------------------------------------------------------------
    @invariant()
    def caps_count_what_is_held(self) -> None:
        engine = self.engine
        pending = engine.permissions.pending()
        _agree(engine.permissions.quota, Counter(p.client for p in pending))
        _agree(engine.sessions.quota, Counter(s.client for s in engine.sessions))
        binds = [b for b in engine.binds.of(None) if b.state is not BindState.CLOSED]
        _agree(engine.binds.quota, Counter(b.owner for b in binds))
        held = [r for queue in engine.flows._held.values() for r in queue.values()]
        _agree(engine.flows.quota, Counter(r.key.src for r in held))
        editors = sum(r.editor.held for r in held if r.editor is not None)
        assert engine.buffered.total.used == editors
        assert sum(b.used for b in engine.buffered.clients.values()) == editors

    @invariant()
    def redirect_blocks_belong_to_pending_redirects(self) -> None:
        engine = self.engine
        redirects = [p.redirect for p in engine.permissions.pending() if p.redirect is not None]
        blocks = Counter((r.user_mode, r.block) for r in redirects)
        assert engine._block_pending == dict(blocks)
        for user, pool in engine.pools.items():  # the ports of each block in use, and no more
            ports = {r.block + i for r in redirects if r.user_mode is user
                     for i in range(pool._blocks[r.block])}
            assert pool._used == ports


def _agree(quota: Quota, holds: Counter[IPAddress]) -> None:
    """A cap's counts are what its table holds: in total, and per client (no client at 0)."""
    assert quota.used == sum(holds.values()), (quota.kind, quota.used, holds)
    assert quota.by_client == dict(holds), (quota.kind, quota.by_client, holds)


Bookkeeping.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestBookkeeping = Bookkeeping.TestCase
