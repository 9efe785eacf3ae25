"""The packet path: a queued packet and the time in, one answer out.

``handle`` is the one entry point: the shell reads a packet off the queue and passes
its bytes, the netfilter hook it was queued at, its mark, the side and interface it
came in on, its length and whether its checksum is complete; the answer says accept
or drop, the mark to set, the packet's new bytes if they changed, and the effects
(kernel state, events) the shell applies before the verdict leaves. Everything it
decides, counts and rewrites is here, so every path (a new flow, a user-mode flow's
packet, a user-mode redirect, a flow to a bind, an ICMP error about a user-mode
flow) is a unit test without root.

Which path a packet takes is what the kernel's rules say about it (enforcer.dataplane):
the hook it was queued at, and the mark its flow carries (enforcer.core.marks).
"""

from __future__ import annotations

from typing import NamedTuple

from enforcer.core.binding import Binding
from enforcer.core.binds import Bind, BindState
from enforcer.core.datafilter import Direction, FilterFailed, TcpStreamEditor
from enforcer.core.effects import Effect, EstablishedConnection, HandOver
from enforcer.core.flags import Flags
from enforcer.core.flows import FlowRecord, Mode
from enforcer.core.marks import (
    MARK_OWNED,
    MARK_REWRITTEN,
    is_user_mode,
    local_mark,
    mark_for,
    redirect_port,
    worker_mark,
)
from enforcer.core.packet import (
    PROTOCOL_NAMES,
    TCP,
    UDP,
    FlowKey,
    Headers,
    Ingress,
    IPAddress,
    Malformed,
    PacketMeta,
    complete_checksum,
    icmp_error_inner,
    parse,
    parse_segment,
    rebuild,
    rebuild_udp,
    rewrite,
    rewrite_icmp_error,
    segments_checksum,
    udp_payload,
)
from enforcer.core.permissions import Permission
from enforcer.core.policy import ProtocolDef
from enforcer.core.redirects import Redirect
from enforcer.core.sessions import Session
from enforcer.core.state import Decision, Verdict, permission_key, user_mode

# The netfilter hooks packets are queued at (linux/netfilter.h NF_INET_*)
HOOK_PREROUTING = 0  # a user-mode redirect port's packet, before conntrack
HOOK_INPUT = 1  # a new flow to a Firewall client's bind (a socket of the fw)
HOOK_FORWARD = 2  # a new flow through the fw, or a user-mode flow's packet
HOOK_OUTPUT = 3  # an ICMP error the fw sends about a user-mode flow
# The enum members of the new-flow path as module names: looked up on its class, a member
# runs the enum's Python code
_KERNEL, _USER = Mode.KERNEL, Mode.USER
_ADMIT_KERNEL, _ADMIT_USER, _DROP = Verdict.ADMIT_KERNEL, Verdict.ADMIT_USER, Verdict.DROP
_EXTERNAL = Ingress.EXTERNAL
_new_object = object.__new__
# How long after a UDP flow's admission its further "new" datagrams are taken as its own
SAME_FLOW_WINDOW = 1.0


class QueuedPacket(NamedTuple):
    """A packet as the queue hands it over."""

    data: bytes
    hook: int = HOOK_FORWARD
    mark: int = 0
    ingress: Ingress = Ingress.EXTERNAL
    interface: str = ""  # the interface it arrived on ("": none, the fw's own packet)
    length: int | None = None  # its length, when ``data`` is a truncated copy
    checksum_ready: bool = True  # False: the kernel had not completed its TCP/UDP checksum
    gso: bool = False  # a GSO packet: the kernel makes its segments after the verdict


class Answer(NamedTuple):
    """What the shell does with a queued packet: its verdict, the mark to set (None:
    leave it), its new bytes (None: unchanged), and the effects to apply, in order,
    before the verdict leaves."""

    accept: bool
    reason: str
    mark: int | None = None
    packet: bytes | None = None
    effects: tuple[Effect, ...] = ()


def _dropped(reason: str) -> Answer:
    return Answer(False, reason)


class Decisions(Binding):
    """Every queued packet, decided."""

    def handle(self, queued: QueuedPacket, now: float) -> Answer:
        """The one entry point of the packet path. Never raises: a packet the engine
        cannot decide (a bug) is dropped and counted (``errors``), as one it cannot read
        is (``malformed``)."""
        try:
            answer = self._handle(queued, now)
            if queued.gso and answer.packet is not None:
                answer = answer._replace(packet=segments_checksum(answer.packet))
        except Exception as exc:  # fail closed on a bug, and keep enforcing
            self.counters["errors"] += 1
            answer = _dropped(f"the enforcer failed to decide it: {type(exc).__name__}: {exc}")
        return answer._replace(effects=tuple(self.take_effects())) if self.effects else answer

    def _handle(self, queued: QueuedPacket, now: float) -> Answer:
        # What cannot be read, or not rewritten from the bytes at hand (a copy cut short
        # of a packet a path rewrites), is dropped as unreadable: not a bug of the engine's
        try:
            return self._path(queued, now)
        except Malformed as exc:
            self.counters["malformed"] += 1
            return _dropped(f"malformed: {exc}")

    def _path(self, queued: QueuedPacket, now: float) -> Answer:
        meta = parse(queued.data, queued.ingress, queued.interface)
        refused = self.judge_ingress(meta, now)
        if refused is not None:
            return _dropped(refused.reason)
        length = len(queued.data) if queued.length is None else queued.length
        if queued.hook == HOOK_PREROUTING:
            return self._to_redirect_port(queued, meta, length, now)
        if queued.hook == HOOK_INPUT:
            return self._to_fw(queued, meta, length, now)
        if queued.hook == HOOK_OUTPUT or is_user_mode(queued.mark):
            return self._user_mode(queued, meta, length, now)
        return self._first_packet(queued, meta, length, now)

    def _first_packet(self, queued: QueuedPacket, meta: PacketMeta, length: int,
                      now: float) -> Answer:
        """The first packet of a flow, after routing: admit it (and say how) or drop it."""
        decision = self.decide(meta, now, length, redirect_port(queued.mark))
        if decision.verdict is Verdict.DROP:
            return _dropped(decision.reason)
        mark = (queued.mark & ~MARK_OWNED) | mark_for(decision.verdict is Verdict.ADMIT_USER,
                                                       decision.one_way, decision.snat)
        packet = None
        if decision.verdict is Verdict.ADMIT_USER:
            record = self.flows.get(meta.key)
            if record is not None:
                mark |= worker_mark(record.worker)  # its later packets: to its worker's queue
                if record.app_filter or record.data_filter:
                    # a datagram carries data from the first, and so may a SYN (TCP Fast
                    # Open): the flow's filter sees the one, and the other leaves without
                    # its data (the client sends it again once the handshake is done)
                    filtered = self._filtered(queued, queued.data, meta.headers, record,
                                              forward=True)
                    if isinstance(filtered, Answer):
                        return filtered
                    packet = None if filtered is queued.data else filtered
        return Answer(True, decision.reason, mark, packet)

    def _to_redirect_port(self, queued: QueuedPacket, meta: PacketMeta, length: int,
                          now: float) -> Answer:
        """A client's packet to a user-mode redirect port, before conntrack: rewritten to
        its target here, so that the kernel tracks (and source-translates) the flow as it
        leaves the fw."""
        record = self.redirect_packet(meta, length, now)
        if record is None:
            return _dropped(self.recent[-1].reason if self.recent else "no redirect")
        out = rewrite(self._ready(queued, meta.headers), dst=(record.key.dst, record.key.dport),
                      headers=meta.headers)
        if record.data_filter is not None:
            filtered = self._filtered(queued._replace(checksum_ready=True), out, meta.headers,
                                      record, forward=True)
            if isinstance(filtered, Answer):
                return filtered
            out = filtered
        mark = (queued.mark & ~MARK_OWNED) | MARK_REWRITTEN | mark_for(True, False, record.snat)
        return Answer(True, f"redirected to {record.key.dst} port {record.key.dport}", mark, out)

    def _to_fw(self, queued: QueuedPacket, meta: PacketMeta, length: int, now: float) -> Answer:
        """The first packet of a flow to a Firewall client's bind (a socket of the fw)."""
        decision = self.inbound(meta, now, length)
        if decision.verdict is Verdict.DROP:
            return _dropped(decision.reason)
        mark = None
        if meta.key.protocol == UDP:  # its later datagrams go to the bind's socket in the kernel
            mark = (queued.mark & ~MARK_OWNED) | local_mark(meta.key.dport)
        return Answer(True, decision.reason, mark)

    def _user_mode(self, queued: QueuedPacket, meta: PacketMeta, length: int,
                   now: float) -> Answer:
        """A packet of a user-mode flow (or an ICMP error about one), after routing."""
        found = self.user_packet(meta, length, now)
        if found is None:
            related = self.related(icmp_error_inner(queued.data, meta.headers))
            if related is None:  # of no flow the enforcer knows: never passed unfiltered
                return _dropped("of no user-mode flow the enforcer holds")
            record, forward = related
            if record.redirect is not None and forward:
                # An error about a packet the client sent by a redirect: it comes back
                # from the redirect's address, quoting what the client sent.
                address, port = record.redirect
                return Answer(True, f"an ICMP error about {record.key}", None, rewrite_icmp_error(
                    queued.data, outer_src=address, inner_dst=(address, port), headers=meta.headers))
            return Answer(True, f"an ICMP error about {record.key}")
        record, forward = found
        out = queued.data
        if record.redirect is not None:
            if forward:  # the client's packets of a redirected flow all come by the redirect
                self.counters["dropped: not by the redirect"] += 1
                return _dropped("a redirected flow's packet that did not come by the redirect")
            out = rewrite(self._ready(queued, meta.headers), src=record.redirect, headers=meta.headers)
            queued = queued._replace(checksum_ready=True)
        if record.data_filter is not None or record.app_filter is not None:
            filtered = self._filtered(queued, out, meta.headers, record, forward)
            if isinstance(filtered, Answer):
                return filtered
            out = filtered
        return Answer(True, "a user-mode flow's packet", None, None if out is queued.data else out)

    @staticmethod
    def _ready(queued: QueuedPacket, headers: Headers | None) -> bytes:
        """The packet with a complete checksum, ready for an incremental rewrite."""
        return queued.data if queued.checksum_ready else complete_checksum(queued.data, headers)

    def _filtered(self, queued: QueuedPacket, data: bytes, headers: Headers | None,
                  record: FlowRecord, forward: bool) -> bytes | Answer:
        """The packet after the flow's filter (for TCP, sequence numbers shifted to match),
        or its drop: a TCP segment ahead of a gap in the stream (the sender sends it
        again), and every packet of a flow whose filter has failed, that one's on (the
        flow ends; it never goes on unfiltered). ``data`` has ``headers``; its checksum
        is complete if ``queued.checksum_ready``."""
        if self.stream_filter is None:
            return data
        if record.filter_failed:
            self.counters["dropped: its flow's filter failed"] += 1
            return _dropped("of a flow whose filter failed")
        try:
            filtered = self._through_filter(queued, data, headers, record, forward)
        except FilterFailed:
            self.flows.filter_failed(record)  # let go once silent for a little while
            if record.editor is not None:  # what it held goes back to its client's budget
                record.editor.release()
                record.editor = None
            self.counters["filters failed: flows ended"] += 1
            self.counters["dropped: its flow's filter failed"] += 1
            return _dropped("its flow's filter failed: the flow ends")
        if filtered is None:
            return _dropped("ahead of a gap in the filtered stream")
        return filtered

    def _through_filter(self, queued: QueuedPacket, data: bytes, headers: Headers | None,
                        record: FlowRecord, forward: bool) -> bytes | None:
        """``_filtered``'s work: raises FilterFailed; None for a segment ahead of a gap."""
        assert self.stream_filter is not None
        direction = Direction.OUT if forward else Direction.BACK
        if record.key.protocol == UDP:
            if record.stream is None:
                record.stream = self.stream_filter(record)
            payload = udp_payload(data, headers)
            new = record.stream.on_data(direction, payload)
            return data if new == payload else rebuild_udp(data, new, headers)
        if record.editor is None:
            record.editor = TcpStreamEditor(self.stream_filter(record),
                                            self.buffered.of(record.key.src))
        segment = parse_segment(data, headers)
        edited = record.editor.edit(direction, segment.seq, segment.ack, segment.payload,
                                    syn=segment.syn, fin=segment.fin)
        if edited is None:
            return None
        if edited == (segment.seq, segment.ack, segment.payload, segment.fin):
            return data
        if not queued.checksum_ready and edited[2] == segment.payload:
            # only numbers change, by an incremental update: on a complete checksum
            data = complete_checksum(data, headers)
        return rebuild(data, segment, *edited)

    def judge_ingress(self, meta: PacketMeta, now: float) -> Decision | None:
        """Rule 17, the first look at every packet: a drop (recorded and counted) when its
        source is not behind the interface it arrived on, else None. The shell asks this
        before any other entry point, so that nothing of a session, permission, bind or
        flow is looked up or used for a spoofed packet."""
        refusal = self.ingress.refusal(meta)
        if refusal is None:
            return None
        self.counters["dropped: source not behind its interface"] += 1
        return self._record(Decision(Verdict.DROP, meta.key, refusal, now))

    def decide(self, meta: PacketMeta, now: float, length: int = 0,
               redirect_port: int | None = None) -> Decision:
        """Decide the first packet of a flow the kernel has not seen before.

        ``redirect_port`` is the internal port a kernel-mode redirect rule sent the
        packet on from (its destination is then already the redirect's target).
        """
        self.permissions.expire(now)
        decision = self._same_datagram_flow(meta, now, length, redirect_port)
        if decision is None:
            if redirect_port is None:
                decision = self._decide(meta, now, length)
            else:
                decision = self._decide_kernel_redirect(meta, redirect_port, now, length)
        return self._record(decision)

    def redirect_packet(self, meta: PacketMeta, length: int, now: float) -> FlowRecord | None:
        """A client's packet to a user-mode redirect port: the flow it belongs to (a new
        one if a pending permission admits it), or None when it is to be dropped.

        The enforcer rewrites every such packet itself, before the kernel tracks it.
        """
        found = self.flows.find_held(meta.key)
        # A SYN on a flow past its handshake is a new connection from the same client port
        # (kernel mode refuses one too): it needs a permission of its own. Before that, a
        # SYN is the first one sent again (its SYN-ACK may have been lost on the way back).
        if found is not None and found[1] and found[0].redirect is not None and \
                not (meta.starts_tcp_connection and found[0].opened):
            record = found[0]
            self.flows.saw(record, True, length, now, meta.tcp_flags)
            self.counters["user-mode packets"] += 1
            return record
        self.permissions.expire(now)
        key = meta.key

        reason = None
        perm = None
        if key.protocol == TCP and not meta.starts_tcp_connection:
            reason = (f"TCP packet with flags 0x{meta.tcp_flags:02x} to a redirect port "
                      "belongs to no redirected connection")
        elif meta.ingress is not Ingress.INTERNAL or not self.is_internal(key.src):
            reason = f"{key.src} is not an internal client on the internal side"
        else:
            # The flow a redirect would make (the client's port to the target: rewritten
            # before conntrack, the kernel tracks that) must be no other flow's the enforcer
            # holds, such as the client's connection from the same port by another redirect
            # port to the same target: it would take that one's place. A TCP connection of
            # the same addresses and ports closed both ways, or reset, is no such flow: the
            # SYN starts a new one in its place (as conntrack lets it; the client may reuse
            # its port once its side is closed)
            taken: list[FlowKey] = []

            def usable(r: Redirect) -> bool:
                if not (r.user_mode and r.internal == key.dst):
                    return False
                made = FlowKey(key.protocol, key.src, key.sport, *r.target_endpoint)
                held = self.flows.find_held(made)
                if held is not None and not (held[1] and held[0].closed):
                    taken.append(made)
                    return False
                return True

            perm, refused = self._match_redirect(key, key.dport, now, usable)
            reason = refused or (f"the flow it would make, {taken[0]}, is another the fw holds"
                                 if taken else
                                 f"no user-mode redirect of this client's is pending on port {key.dport}")
        if perm is None or perm.redirect is None:
            self._record(Decision(Verdict.DROP, key, reason, now))
            return None
        outbound = FlowKey(key.protocol, key.src, key.sport, *perm.redirect.target_endpoint)
        self._record(self._admit_permitted(outbound, perm, now, length, meta.tcp_flags))
        return self.flows.get(outbound)

    def _decide_kernel_redirect(self, meta: PacketMeta, port: int, now: float,
                                length: int) -> Decision:
        key = meta.key
        perm, refused = None, None
        if meta.ingress is Ingress.INTERNAL and (key.protocol != TCP or meta.starts_tcp_connection):
            perm, refused = self._match_redirect(key, port, now, lambda r: not r.user_mode and
                                                 r.target_endpoint == (key.dst, key.dport))
        if perm is None:
            return Decision(Verdict.DROP, key, refused or f"no kernel-mode redirect of this "
                            f"client's to {key.dst}:{key.dport} is pending on port {port}", now)
        return self._admit_permitted(key, perm, now, length, meta.tcp_flags)

    def user_packet(self, meta: PacketMeta, length: int,
                    now: float) -> tuple[FlowRecord, bool] | None:
        """A packet of a flow the kernel says runs in user mode: count it.

        Returns the flow's record and whether the packet goes the flow's way, or None
        when the enforcer holds no such flow (it may be an ICMP error about one:
        ``related`` says).
        """
        found = self.flows.find_held(meta.key)
        self.counters["user-mode packets"] += 1
        if found is None:
            return None
        record, forward = found
        self.flows.saw(record, forward, length, now, meta.tcp_flags)
        return found

    def related(self, inner: FlowKey | None) -> tuple[FlowRecord, bool] | None:
        """The user-mode flow a user-mode packet that ``user_packet`` did not know is
        about: an ICMP error's (``inner``: the key of the packet it quotes), with whether
        that packet went the flow's way. None: the enforcer holds no such flow, and the
        packet is to be dropped, never passed unfiltered (counted)."""
        found = None if inner is None else self.flows.find_held(inner)
        if found is None:
            self.counters["dropped: unknown user-mode flow"] += 1
        return found

    def kernel_admitted(self, data: bytes, now: float) -> None:
        """A new flow the kernel admitted by a grant it held (``data``: the start of its
        first packet, as the kernel logged it): the grant is used, and the flow recorded
        and its events sent, as for a flow the enforcer admits. Never raises."""
        try:
            meta = parse(data, Ingress.INTERNAL)
            key = meta.key
            grant = self.kernel_grants.get(permission_key(key.protocol, key.src, key.dst, key.dport))
            if grant is None:  # ended (cancelled, expired) as the kernel used it
                self.counters["kernel grants: used as they ended"] += 1
                self._record(Decision(_ADMIT_KERNEL, key, "admitted in the kernel by a "
                                      "grant that ended as it was used", now))
                return
            self.counters["kernel grants: used"] += 1
            self.permissions.use(grant.permission)
            decision = self._admit_permitted(key, grant.permission, now, 0, meta.tcp_flags)
            self._record(decision._replace(reason=f"{decision.reason}, by the kernel"))
        except Malformed:
            self.counters["kernel grants: unreadable notices"] += 1
        except Exception:  # a bug: the flow is admitted already; the enforcer goes on
            self.counters["errors"] += 1

    def _same_datagram_flow(self, meta: PacketMeta, now: float, length: int,
                            redirect_port: int | None) -> Decision | None:
        """A UDP flow's later datagrams that were queued before the kernel had recorded
        the first one's verdict arrive as new: they get that verdict again, and neither
        use a permission nor make events a second time. A datagram is the flow's only if
        it came the flow's way: from its side, by its kernel-mode redirect port or by
        none, and forwarded (the SOCKS service's relayed flows are not: a datagram with
        the same addresses and ports is another flow, which needs its own admission)."""
        if meta.key.protocol != UDP:
            return None
        found = self.flows.find(meta.key)
        if found is None or not found[1] or now - found[0].admitted_at > SAME_FLOW_WINDOW:
            return None
        record = found[0]
        if record.inbound != (meta.ingress is Ingress.EXTERNAL) or record.relayed or \
                (None if record.redirect is None else record.redirect[1]) != redirect_port:
            return None
        self.flows.saw(record, True, length, now)
        verdict = Verdict.ADMIT_USER if record.mode is Mode.USER else Verdict.ADMIT_KERNEL
        return Decision(verdict, meta.key, "a later datagram of a flow just admitted", now,
                        record.session_id, record.protocol, record.action_id, record.one_way,
                        record.snat)

    def _decide(self, meta: PacketMeta, now: float, length: int) -> Decision:
        key = meta.key
        if key.protocol == TCP and not meta.starts_tcp_connection:
            return Decision(_DROP, key, f"TCP packet with flags 0x{meta.tcp_flags:02x} cannot "
                            "open a connection", now)
        if meta.ingress is _EXTERNAL:
            bind = self.binds.leading_to(key.protocol, key.dst, key.dport)
            if bind is not None:
                return self._to_bind(bind, meta, now, length)
            return Decision(_DROP, key, "arrived on the external side and no permission admits it",
                            now)
        if not self.is_internal(key.src):
            return Decision(_DROP, key, f"source {key.src} is not on an internal network", now)

        perm, refused = self._match(permission_key(key.protocol, key.src, key.dst, key.dport),
                                    key.src, now)
        if perm is not None:
            return self._admit_permitted(key, perm, now, length, meta.tcp_flags)
        if refused is not None:
            return Decision(_DROP, key, refused, now)
        protocol, why = self._judge_primary(key, None)
        if protocol is None:
            return Decision(_DROP, key, why, now)
        mode = Mode.USER if protocol.name in self.app_filters else Mode.KERNEL
        session = self.sessions.find(key.src)
        # a new session and a user-mode flow need room; nothing is made unless both have it
        if session is None and not self.sessions.fits(key.src):
            return Decision(_DROP, key, f"refused: {self.sessions.quota.refuse(key.src)}", now)
        if mode is Mode.USER and not self.flows.fits(key.src):
            return Decision(_DROP, key, f"refused: {self.flows.quota.refuse(key.src)}", now)
        session = session or self.sessions.securenat(key.src, now)
        # the kernel translates a primary only where the family has an external address
        snat = 0 if self.nat and self._has_external(key.dst.version) else None
        return self._admit_primary(key, session, protocol, mode, snat, why, now, length,
                                   meta.tcp_flags)

    def _judge_primary(self, key: FlowKey, user: str | None) -> tuple[ProtocolDef | None, str]:
        """Whether policy allows ``key`` as a primary connection: (the protocol, why) or
        (None, why not)."""
        protocol = self.policy.primary_protocol(key.protocol, key.dport)
        if protocol is None:
            name = PROTOCOL_NAMES.get(key.protocol, str(key.protocol))
            return None, f"no permission admits it and {name}/{key.dport} is no protocol's primary port"
        allowed, why = self.protocol_verdict(protocol.name, key.src, user)
        if not allowed:
            return None, why
        denial = self.destination_denial(key.dst)
        if denial is not None:
            return None, denial
        return protocol, why

    def _admit_primary(self, key: FlowKey, session: Session, protocol: ProtocolDef, mode: Mode,
                       snat: int | None, why: str, now: float, length: int, tcp_flags: int = 0,
                       *, relayed: bool = False) -> Decision:
        session.primaries += 1
        self.sessions.touch(session, now)
        record = FlowRecord(key, session.id, protocol.name, mode, now, snat=snat,
                            app_filter=self.app_filters.get(protocol.name), relayed=relayed)
        record.saw(True, length, now, tcp_flags)
        self.flows.add(record, now)
        self._connect_events(record, secondary=False, now=now)
        verdict = Verdict.ADMIT_USER if mode is Mode.USER else Verdict.ADMIT_KERNEL
        return Decision(verdict, key, f"primary connection: {why}", now, session.id, protocol.name,
                        snat=snat)

    def client_connect(self, session_id: int, protocol: int, target: IPAddress, port: int,
                       client_port: int, now: float) -> Decision:
        """A Firewall client asks the fw to connect (or send a datagram) for it: a
        permission of its session (or an ADDRESS_BASED one of its IP) or policy decides.
        The fw relays the flow in user space, leaving from an external address; it
        relays nothing to itself (a target of another family, loopback, or the fw's own
        address is dropped). ``one_way`` in the decision: the target's replies are not
        to be relayed (a UDP permission without BIDIRECTIONAL)."""
        self.permissions.expire(now)
        session = self._in_use(session_id, now)
        key = FlowKey(protocol, session.client, client_port, target, port)
        refusal = self._target_refusal(target, session.client)
        if refusal is not None:  # the relay would reach the fw's own services
            return self._record(Decision(Verdict.DROP, key, refusal, now, session.id))
        perm = self.permissions.match(permission_key(protocol, session.client, target, port),
                                      session.id, now)
        if perm is not None:
            decision = self._admit_permitted(key, perm, now, 0, relayed=True)
            return self._record(decision._replace(verdict=Verdict.ADMIT_USER))
        protocol_def, why = self._judge_primary(key, session.user)
        if protocol_def is None:
            return self._record(Decision(Verdict.DROP, key, why, now, session.id))
        snat = 0 if self._has_external(target.version) else None
        return self._record(self._admit_primary(key, session, protocol_def, Mode.USER, snat, why,
                                                now, 0, relayed=True))

    def inbound(self, meta: PacketMeta, now: float, length: int = 0) -> Decision:
        """The first packet of a flow to one of the fw's own addresses on a bind port (a
        Firewall client's bind)."""
        key = meta.key
        bind = self.binds.at(key.protocol, key.dst, key.dport)
        if bind is None:
            return self._record(Decision(Verdict.DROP, key,
                                         f"nothing is bound on {key.dst} port {key.dport}", now))
        decision = self._same_datagram_flow(meta, now, length, None)
        return self._record(self._to_bind(bind, meta, now, length) if decision is None else decision)

    def _to_bind(self, bind: Bind, meta: PacketMeta, now: float, length: int) -> Decision:
        """A new flow for a bind: admitted if the bind is approved and its IpFilter
        includes the peer; a SecureNAT bind is then done (it takes one flow). A UDP flow is
        one way unless the bind has BIDIRECTIONAL: the client's answers to the peer (the
        flow's reply direction) do not pass."""
        key = meta.key

        def drop(reason: str) -> Decision:
            bind.discarded += 1
            return Decision(Verdict.DROP, key, reason, now)

        if key.protocol == TCP and not meta.starts_tcp_connection:
            return drop(f"TCP packet with flags 0x{meta.tcp_flags:02x} cannot open a connection")
        if bind.expires is not None and now >= bind.expires:
            self.bind_done(bind)
            return drop(f"bind {bind.id} expired unused")
        if bind.state is not BindState.ALLOWED:
            return drop(f"bind {bind.id} is {bind.state.value}, not approved by RetroactiveAllowBind")
        if not bind.admits(key.src):
            return drop(f"{key.src} is not in bind {bind.id}'s IpFilter")
        bind.admitted += 1
        if key.protocol == UDP:
            bind.heard(key.src, key.sport, now)
        session = self.sessions.get(bind.session_id)
        if session is not None:
            self.sessions.touch(session, now)
        one_way = key.protocol == UDP and Flags.BIDIRECTIONAL not in bind.flags
        record = FlowRecord(key, bind.session_id, str(bind.protocol_name), Mode.KERNEL, now,
                            inbound=meta.ingress is Ingress.EXTERNAL, one_way=one_way)
        record.saw(True, length, now, meta.tcp_flags)
        self.flows.add(record, now)
        if bind.for_securenat:
            self.bind_done(bind)
        return Decision(Verdict.ADMIT_KERNEL, key, f"inbound to bind {bind.id}", now,
                        bind.session_id, bind.protocol_name, one_way=one_way)

    def _admit_permitted(self, key: FlowKey, perm: Permission, now: float, length: int,
                         tcp_flags: int = 0, *, relayed: bool = False) -> Decision:
        """Admit the flow ``key`` (as it leaves the fw) under a permission that matched
        (``relayed``: by the SOCKS service, for a Firewall client)."""
        in_user_mode = user_mode(perm.flags, perm.data_filter)
        mode = _USER if in_user_mode else _KERNEL
        redirect = perm.redirect
        one_way, snat = self._leaving(perm, key.protocol, relayed=relayed)
        # made and initialized apart: a class called with keywords first packs them in a dict
        record = _new_object(FlowRecord)
        FlowRecord.__init__(record, key, perm.session_id, perm.protocol_name, mode, now, perm.id,
                            data_filter=perm.data_filter, snat=snat, one_way=one_way,
                            redirect=None if redirect is None else redirect.internal_endpoint,
                            relayed=relayed)
        record.saw(True, length, now, tcp_flags)
        self.flows.add(record, now)
        if in_user_mode and self.workers and perm.data_filter is None and redirect is None \
                and not relayed:
            self._hand_over(record)
        session = self.sessions.get(perm.session_id)
        if session is not None:
            self.sessions.touch(session, now)
        external = None if snat is None else self._external(key.dst.version, snat)
        if perm.filter_id is not None:
            self.effects.append(EstablishedConnection(perm.filter_id, perm.context, perm.id,
                                                     perm.session_id, key, external, now,
                                                     record.redirect))
        self._connect_events(record, secondary=True, now=now)
        verdict = _ADMIT_USER if in_user_mode else _ADMIT_KERNEL
        what = "redirected" if redirect is not None else "secondary"
        return Decision(verdict, key, f"{what} {perm.protocol_name} flow admitted by action "
                        f"{perm.id} in {mode._value_} mode", now, perm.session_id,
                        perm.protocol_name, perm.id, one_way, snat)

    def _hand_over(self, record: FlowRecord) -> None:
        """A user-mode flow just admitted, without a filter and not redirected, goes to the
        next worker process (``enforcer.workers`` says why the others stay)."""
        workers = self.workers
        record.worker = workers[self.handed_over % len(workers)]
        self.handed_over += 1
        self.effects.append(HandOver(record, record.worker))
