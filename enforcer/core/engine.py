"""The decision core: packet metadata and the time in, a decision out.

No sockets, clocks or threads: the shells pass ``now`` and act on the Decision.
Data flows one way: parsed packet -> permission or policy lookup -> decision ->
state change (a permission consumed, a flow recorded, an event queued).
"""

from __future__ import annotations

import enum
import ipaddress
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from enforcer.core.binds import DEFAULT_BIND_PORTS, Bind, BindState, BindTable
from enforcer.core.flags import Flags
from enforcer.core.flows import ConntrackTimeouts, FlowRecord, FlowTable, Mode
from enforcer.core.fwports import NOTHING_LISTENS, Listening, privileged
from enforcer.core.ingress import InterfaceNetworks
from enforcer.core.ipfilter import IpFilter
from enforcer.core.limits import Limits
from enforcer.core.packet import PROTOCOL_NAMES, TCP, UDP, FlowKey, Ingress, IPAddress, PacketMeta
from enforcer.core.permissions import Permission, PermissionKey, PermissionTable, pack_key
from enforcer.core.policy import IPNetwork, Policy, PortRange, ProtocolDef
from enforcer.core.redirects import (
    DEFAULT_KERNEL_REDIRECT_PORTS,
    DEFAULT_USER_REDIRECT_PORTS,
    MAX_ADDRESSES,
    Endpoint,
    IPInterface,
    PortPool,
    Redirect,
)
from enforcer.core.results import (
    InvalidArgument,
    IsBusy,
    NetworkRulesDenied,
    NotFound,
    PolicyRulesDenied,
    Terminating,
)
from enforcer.core.sessions import Session, SessionTable

# How long after a UDP flow's admission its further "new" datagrams are taken as its own
SAME_FLOW_WINDOW = 1.0
RECENT_DECISIONS = 512  # the decisions the engine remembers (the decisions listing)
# The flags RetroactiveAllowBind takes
BIND_FLAGS = Flags.BIDIRECTIONAL | Flags.INCREASE_RECEIVE_BUFFER
# The flags RedirectConnections takes (its page lists no others)
REDIRECT_FLAGS = Flags.ALLOW_MULTIPLE | Flags.TIMEOUT | Flags.NO_KERNEL_MODE | Flags.INCREASE_RECEIVE_BUFFER


class Verdict(enum.Enum):
    ADMIT_KERNEL = "admit-kernel"
    ADMIT_USER = "admit-user"
    DROP = "drop"


class Decision(NamedTuple):
    verdict: Verdict
    key: FlowKey
    reason: str
    at: float
    session_id: int | None = None
    protocol: str | None = None
    action_id: int | None = None
    one_way: bool = False  # replies (target -> client) are not admitted
    snat: int | None = None  # which external address the flow leaves from, if translated

    def to_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict.value, "flow": str(self.key), "reason": self.reason,
                "at": self.at, "session": self.session_id, "protocol": self.protocol,
                "action": self.action_id}


def _endpoint(endpoint: Endpoint | None) -> list[object] | None:
    return None if endpoint is None else [str(endpoint[0]), endpoint[1]]


class EstablishedConnection(NamedTuple):
    """Event: a flow was admitted under a permission whose caller passed a session filter."""

    filter_id: int
    context: Any
    action_id: int
    session_id: int
    key: FlowKey  # as it leaves the fw: client -> target
    external: IPAddress | None
    at: float
    internal: Endpoint | None = None  # the redirect port the client connected to

    def to_dict(self) -> dict[str, Any]:
        k = self.key
        return {"event": "established_connection", "filter": self.filter_id,
                "context": self.context, "action": self.action_id, "session": self.session_id,
                "protocol": PROTOCOL_NAMES.get(k.protocol, str(k.protocol)),
                "client": [str(k.src), k.sport], "target": [str(k.dst), k.dport],
                "internal": _endpoint(self.internal),
                "external": None if self.external is None else str(self.external), "at": self.at}


class ConnectEvent(NamedTuple):
    """Event: a connection was admitted to a port a filter registered for connect events on."""

    filter_id: int
    secondary: bool  # opened under a permission (False: a primary connection)
    protocol_name: str
    action_id: int | None
    session_id: int
    key: FlowKey  # as it leaves the fw: client -> target
    external: IPAddress | None
    at: float
    internal: Endpoint | None = None

    def to_dict(self) -> dict[str, Any]:
        k = self.key
        return {"event": "connect", "filter": self.filter_id, "secondary": self.secondary,
                "protocol": PROTOCOL_NAMES.get(k.protocol, str(k.protocol)),
                "protocol_name": self.protocol_name, "action": self.action_id,
                "session": self.session_id, "client": [str(k.src), k.sport],
                "target": [str(k.dst), k.dport], "internal": _endpoint(self.internal),
                "external": None if self.external is None else str(self.external), "at": self.at}


Event = EstablishedConnection | ConnectEvent


def permission_key(protocol: int, client: IPAddress, target: IPAddress, port: int) -> PermissionKey:
    return pack_key(protocol, client.version, int(client), int(target), port)


def user_mode(flags: Flags, data_filter: str | None) -> bool:
    """Whether the flows a grant admits run in user mode (fixed at the grant)."""
    return Flags.NO_KERNEL_MODE in flags or data_filter is not None


def redirect_key(protocol: int, client: IPAddress, internal_port: int) -> PermissionKey:
    """A redirect's key: its port alone names it (ports are unique across internal
    addresses), and target 0 keeps it apart from every AllowFutureConnect key (no
    grant targets the unspecified address)."""
    return pack_key(protocol, client.version, int(client), 0, internal_port)


class Engine:
    """Decides every new flow: permissions first, then primaries by policy; drops the rest.

    Everything a client or a peer can make it hold is capped (``limits``, SPEC rule
    16): at a cap the new request is refused and counted (``refused: <cap>`` in
    ``counters``), never what is held evicted. A SecureNAT session is in use, and
    so not idle, while it has new flows, session API calls name it, or it holds a
    user-mode flow (whose filter may call the API at any time; its idle time starts
    when the last one is let go); pending permissions and open binds do not keep
    it: an idle session ends as ``end_session`` ends one.
    """

    def __init__(self, policy: Policy, internal_networks: Mapping[str, Iterable[IPNetwork]],
                 external_addresses: Iterable[IPAddress] = (), *, nat: bool = False,
                 data_filters: Iterable[str] = (), history: int = RECENT_DECISIONS,
                 internal_addresses: Iterable[IPInterface] = (),
                 kernel_redirect_ports: tuple[int, int] = DEFAULT_KERNEL_REDIRECT_PORTS,
                 user_redirect_ports: tuple[int, int] = DEFAULT_USER_REDIRECT_PORTS,
                 bind_ports: tuple[int, int] = DEFAULT_BIND_PORTS,
                 app_filters: Mapping[str, str] | None = None, limits: Limits | None = None,
                 conntrack: ConntrackTimeouts | None = None) -> None:
        """``internal_networks``: internal interface name -> the networks behind it;
        ``app_filters``: protocol name -> the application filter that watches its
        primary connections (they then run in user mode); ``conntrack``: the kernel's
        timeouts, which a user-mode flow's state outlives."""
        self.policy = policy
        self.limits = limits or Limits()
        self.counters: Counter[str] = Counter()
        self.ingress = InterfaceNetworks(internal_networks)
        self.internal_networks = self.ingress.internal
        self.external_addresses = tuple(external_addresses)
        self.internal_addresses = tuple(internal_addresses)
        # no grant leads to the fw itself (rule 14: not to a port the fw listens on)
        self.own_addresses = frozenset((*self.external_addresses,
                                        *(i.ip for i in self.internal_addresses)))
        self.nat = nat
        self.data_filters = frozenset(data_filters)
        self.sessions = SessionTable(self.limits, self.counters)
        self.flows = FlowTable(self.limits, self.counters, conntrack, on_release=self._released)
        self.permissions = PermissionTable(self.limits, self.counters, on_finish=self._finished)
        self.recent: deque[Decision] = deque(maxlen=history)
        self.events: list[Event] = []
        self.pools = {False: PortPool(*kernel_redirect_ports, name="kernel-mode redirect"),
                      True: PortPool(*user_redirect_ports, name="user-mode redirect")}
        self._block_pending: dict[tuple[bool, int], int] = {}  # (user mode, base) -> pending
        self.retired: list[Permission] = []  # finished redirects whose kernel rules must go
        self.binds = BindTable(self.limits, self.counters)
        self.bind_ports = PortPool(*bind_ports, name="bind")
        self.app_filters = dict(app_filters or {})
        self.retired_binds: list[Bind] = []  # closed binds whose kernel state must go (bind_done)
        self._expiring_binds: dict[int, Bind] = {}
        # filter -> the (IP protocol, ports) it registered for connect events on
        self.connect_registrations: dict[int, list[tuple[int, PortRange]]] = {}
        # The shell's part of a session's end, however it ends (the SOCKS service closes
        # what of its connections the session held: a BIND's wait, a UDP ASSOCIATE)
        self.on_session_end: Callable[[Session], None] | None = None

    # --- packets ------------------------------------------------------------------------
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
        decision = self._same_datagram_flow(meta, now, length)
        if decision is None:
            if redirect_port is None:
                decision = self._decide(meta, now, length)
            else:
                decision = self._decide_kernel_redirect(meta, redirect_port, now, length)
        return self._record(decision)

    def _record(self, decision: Decision) -> Decision:
        self.counters[decision.verdict.value] += 1
        self.recent.append(decision)
        return decision

    def redirect_packet(self, meta: PacketMeta, length: int, now: float) -> FlowRecord | None:
        """A client's packet to a user-mode redirect port: the flow it belongs to (a new
        one if a pending permission admits it), or None when it is to be dropped.

        The enforcer rewrites every such packet itself, before the kernel tracks it.
        """
        found = self.flows.find_held(meta.key)
        # A SYN on a flow that has had replies is a new connection from the same client
        # port (kernel mode refuses one too): it needs a permission of its own. Before
        # any reply, a SYN is the first one sent again.
        if found is not None and found[1] and found[0].redirect is not None and \
                not (meta.starts_tcp_connection and found[0].packets_back):
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
            perm, refused = self._match_redirect(key, key.dport, now,
                                                 lambda r: r.user_mode and r.internal == key.dst)
            reason = refused or f"no user-mode redirect of this client's is pending on port {key.dport}"
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

    def _match_redirect(self, key: FlowKey, port: int, now: float,
                        where: Callable[[Redirect], bool]) -> tuple[Permission | None, str | None]:
        return self._match(redirect_key(key.protocol, key.src, port), key.src, now,
                           lambda p: p.redirect is not None and where(p.redirect))

    def _match(self, pkey: PermissionKey, client: IPAddress, now: float,
               where: Callable[[Permission], bool] | None = None) -> tuple[Permission | None, str | None]:
        """The permission a new flow of ``client`` uses (consumed if single use), or
        (None, why) when only grants of user-mode flows match and the client may hold
        no more user-mode flows (the refusal is counted; nothing is consumed)."""
        refused = False

        def usable(perm: Permission) -> bool:
            nonlocal refused
            if where is not None and not where(perm):
                return False
            if user_mode(perm.flags, perm.data_filter) and not self.flows.fits(client):
                refused = True
                return False
            return True

        session = self.sessions.find(client)
        perm = self.permissions.match(pkey, None if session is None else session.id, now, usable)
        if perm is None and refused:
            return None, f"refused: {self.flows.quota.refuse(client)}"
        return perm, None

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

    def _same_datagram_flow(self, meta: PacketMeta, now: float, length: int) -> Decision | None:
        """A UDP flow's later datagrams that were queued before the kernel had recorded
        the first one's verdict arrive as new: they get that verdict again, and neither
        use a permission nor make events a second time."""
        if meta.key.protocol != UDP:
            return None
        found = self.flows.find(meta.key)
        if found is None or not found[1] or now - found[0].admitted_at > SAME_FLOW_WINDOW:
            return None
        record = found[0]
        if record.inbound != (meta.ingress is Ingress.EXTERNAL):
            return None  # the flow's key, from the other side: not the flow's datagram
        self.flows.saw(record, True, length, now)
        verdict = Verdict.ADMIT_USER if record.mode is Mode.USER else Verdict.ADMIT_KERNEL
        return Decision(verdict, meta.key, "a later datagram of a flow just admitted", now,
                        record.session_id, record.protocol, record.action_id, record.one_way,
                        record.snat)

    def _decide(self, meta: PacketMeta, now: float, length: int) -> Decision:
        key = meta.key

        def drop(reason: str) -> Decision:
            return Decision(Verdict.DROP, key, reason, now)

        if key.protocol == TCP and not meta.starts_tcp_connection:
            return drop(f"TCP packet with flags 0x{meta.tcp_flags:02x} cannot open a connection")
        if meta.ingress is Ingress.EXTERNAL:
            bind = self.binds.leading_to(key.protocol, key.dst, key.dport)
            if bind is not None:
                return self._to_bind(bind, meta, now, length)
            return drop("arrived on the external side and no permission admits it")
        if not self.is_internal(key.src):
            return drop(f"source {key.src} is not on an internal network")

        perm, refused = self._match(permission_key(key.protocol, key.src, key.dst, key.dport),
                                    key.src, now)
        if perm is not None:
            return self._admit_permitted(key, perm, now, length, meta.tcp_flags)
        if refused is not None:
            return drop(refused)
        protocol, why = self._judge_primary(key, None)
        if protocol is None:
            return drop(why)
        mode = Mode.USER if protocol.name in self.app_filters else Mode.KERNEL
        session = self.sessions.find(key.src)
        # a new session and a user-mode flow need room; nothing is made unless both have it
        if session is None and not self.sessions.fits(key.src):
            return drop(f"refused: {self.sessions.quota.refuse(key.src)}")
        if mode is Mode.USER and not self.flows.fits(key.src):
            return drop(f"refused: {self.flows.quota.refuse(key.src)}")
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
        allowed, why = self.policy.protocol_verdict(protocol.name, key.src, user)
        if not allowed:
            return None, why
        denial = self.policy.destination_denial(key.dst)
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

    # --- Firewall clients ---------------------------------------------------------------
    def open_firewall_session(self, client: IPAddress, user: str | None, now: float) -> Session:
        """A Firewall client's control connection opened: the session of its IP and user."""
        if not self.is_internal(client):
            raise InvalidArgument(f"{client} is not on an internal network")
        session = self.sessions.firewall_client(client, user, now)
        session.connections += 1
        self.sessions.touch(session, now)
        return session

    def close_firewall_connection(self, session_id: int, now: float) -> None:
        """A control connection closed; with the session's last one, the session ends."""
        session = self.sessions.get(session_id)
        if session is None:
            return  # ended already (end_session)
        session.connections -= 1
        if session.connections <= 0:
            self.end_session(session_id, now)

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

    def bind_for_client(self, session_id: int, protocol: int, address: IPAddress, now: float) -> Bind:
        """BindForClient: a port on the fw's external ``address`` for the session's client
        (the shell then binds it). Granted at once; what arrives for it is discarded
        until RetroactiveAllowBind. Raises IsBusy at a binds cap or when no bind port is
        free."""
        session = self._in_use(session_id, now)
        self.binds.check(session.client)
        port = self.bind_ports.allocate(1)
        return self.binds.add(session.id, protocol, address, port, now, session.client)

    def bind_for_securenat(self, session_id: int, protocol: int, client_port: int,
                           now: float, listening: Listening = NOTHING_LISTENS, *,
                           from_fw: bool = False) -> tuple[Bind, bool]:
        """Make a SecureNAT client's port reachable from outside, for one flow, once
        RetroactiveAllowBind approves it (an application filter calls this for active
        FTP, say). Routed: the bind is the client's own address and port. NAT: an
        external address of the fw, and the client's port if it is free and none of the
        fw's own (the shell maps it to the client), else a port from the bind pool. The
        same client port asked again gives the same open bind. Unused, it expires after
        the permission timeout. Returns the bind and whether it is new.

        ``from_fw``: the flow is to reach the client from the fw's address on the
        client's network (``Bind.source``; the shell has the kernel translate it), for
        a client that sees only the fw (its primary came by a redirect). The same
        client port bound with the other choice is IsBusy.

        In NAT it never takes a privileged port of the fw or one that ``listening`` (the
        fw's sockets) covers on that address (rule 14): a privileged client port, or a
        listened one outside the fw's port pools, is InvalidArgument; a pool port is
        never a listened one."""
        if protocol not in (TCP, UDP):
            raise InvalidArgument(f"protocol must be TCP (6) or UDP (17), not {protocol}")
        if not 1 <= client_port <= 65535:
            raise InvalidArgument(f"the client port must be 1-65535, not {client_port}")
        session = self._in_use(session_id, now)
        if session.kind != "securenat":
            raise InvalidArgument(f"session {session.id} is a Firewall client's: it binds "
                                  "through the fw itself (SOCKS BIND)")
        source = self._internal_address_for(session.client) if from_fw else None
        existing = self.binds.leading_to(protocol, session.client, client_port)
        if existing is not None and existing.session_id == session.id:
            if existing.source != source:
                raise IsBusy(f"{session.client} port {client_port} is bound already, "
                             f"{'not ' if source is not None else ''}to be reached from the fw")
            return existing, False
        self.binds.check(session.client)
        expires = now + self.policy.defaults.permission_timeout
        address, port, pooled = session.client, client_port, False
        if self.nat:
            external = self.external_address(session.client.version)
            if external is None:
                raise InvalidArgument(f"the firewall has no external IPv{session.client.version} "
                                      "address to bind on")
            address = external
            if privileged(port):
                raise InvalidArgument(f"port {port} of the firewall's {address} is privileged: "
                                      "no bind takes it")
            if self.binds.at(protocol, address, port) is not None or port in self.bind_ports or \
                    any(port in pool for pool in self.pools.values()):
                port = self.bind_ports.allocate(
                    1, avoid=lambda p: listening.covers(protocol, external, p))
                pooled = True
            elif listening.covers(protocol, address, port):
                raise InvalidArgument(f"the firewall listens on {PROTOCOL_NAMES[protocol]} "
                                      f"{address} port {port}: no bind takes it")
        elif self.binds.at(protocol, address, port) is not None:
            raise IsBusy(f"{session.client} port {client_port} is bound already")
        bind = self.binds.add(session.id, protocol, address, port, now, session.client,
                              client=session.client, client_port=client_port, expires=expires,
                              pooled=pooled, source=source)
        self._expiring_binds[bind.id] = bind
        return bind, True

    def withdraw_bind(self, bind: Bind) -> None:
        """A new SecureNAT bind the shell could not set up: gone, with nothing to undo."""
        self.bind_done(bind)
        if bind in self.retired_binds:
            self.retired_binds.remove(bind)

    def drain_retired_binds(self) -> list[Bind]:
        retired, self.retired_binds = self.retired_binds, []
        return retired

    def heard(self, bind: Bind, peer: IPAddress, port: int, now: float) -> None:
        """A datagram from ``peer`` reached a UDP bind: the client may answer it (with
        BIDIRECTIONAL) for a while."""
        bind.heard(peer, port, now)

    def external_address(self, version: int, index: int = 0) -> IPAddress | None:
        """The fw's ``index``-th external address of an IP version, if it has one."""
        ours = [a for a in self.external_addresses if a.version == version]
        return ours[index] if index < len(ours) else None

    def retroactive_allow_bind(self, session_id: int, protocol: int, address: IPAddress | None,
                               port: int, protocol_guid: uuid.UUID, flags: Flags,
                               ipfilter: IpFilter | None, now: float) -> tuple[Bind, bool]:
        """Approve a bind of the session (``address`` None: the any-address): (the bind,
        True for S_OK) or (the bind, False for S_FALSE: it was approved already).

        Raises InvalidArgument, NotFound, Terminating or PolicyRulesDenied.
        """
        if protocol not in (TCP, UDP):
            raise InvalidArgument(f"protocol must be TCP (6) or UDP (17), not {protocol}")
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"the port must be nonzero (1-65535), not {port}")
        if flags & ~BIND_FLAGS:
            names = ", ".join(f.name or "" for f in Flags if f in flags & ~BIND_FLAGS)
            raise InvalidArgument(f"RetroactiveAllowBind does not take {names}")
        if Flags.BIDIRECTIONAL in flags and protocol == TCP:
            raise InvalidArgument("BIDIRECTIONAL is for UDP only")
        session = self._in_use(session_id, now)
        protocol_def = next((p for p in self.policy.protocols if p.guid == protocol_guid), None)
        if protocol_def is None:
            raise InvalidArgument(f"no protocol is defined with GUID {protocol_guid}")
        bind = self.binds.of_session(session.id, protocol, address, port)
        if bind is None:
            where = "any address" if address is None else str(address)
            raise NotFound(f"session {session.id} has no {PROTOCOL_NAMES[protocol]} bind on "
                           f"{where} port {port}")
        if bind.state is BindState.CLOSED:
            raise Terminating(f"bind {bind.id} is closed")
        allowed, why = self.policy.protocol_verdict(protocol_def.name, session.client, session.user)
        if not allowed:
            raise PolicyRulesDenied(why)
        if bind.state is BindState.ALLOWED:
            return bind, False
        bind.state = BindState.ALLOWED
        bind.flags = flags
        bind.ipfilter = None if ipfilter is None else ipfilter.clone()
        bind.protocol_name = protocol_def.name
        return bind, True

    def inbound(self, meta: PacketMeta, now: float, length: int = 0) -> Decision:
        """The first packet of a flow to one of the fw's own addresses on a bind port (a
        Firewall client's bind)."""
        key = meta.key
        bind = self.binds.at(key.protocol, key.dst, key.dport)
        if bind is None:
            return self._record(Decision(Verdict.DROP, key,
                                         f"nothing is bound on {key.dst} port {key.dport}", now))
        decision = self._same_datagram_flow(meta, now, length)
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

    def bind_done(self, bind: Bind) -> None:
        """The bind took its connection (TCP), or its association ended: it is closed and
        its port goes back to the pool (a connection it took keeps its socket). What the
        kernel holds for it is due for removal (``drain_retired_binds``): a SecureNAT
        bind's NAT (``Bind.translated``), and the flows a Firewall client's UDP bind
        admitted (the kernel passes their datagrams to its socket; none may reach the
        port's next bind)."""
        if bind.state is not BindState.CLOSED:
            self.binds.close(bind)
            if bind.pooled:
                self.bind_ports.release(bind.port)
            self._expiring_binds.pop(bind.id, None)
            if bind.translated or (not bind.for_securenat and bind.protocol == UDP and bind.admitted):
                self.retired_binds.append(bind)

    def _admit_permitted(self, key: FlowKey, perm: Permission, now: float, length: int,
                         tcp_flags: int = 0, *, relayed: bool = False) -> Decision:
        """Admit the flow ``key`` (as it leaves the fw) under a permission that matched
        (``relayed``: by the SOCKS service, for a Firewall client)."""
        mode = Mode.USER if user_mode(perm.flags, perm.data_filter) else Mode.KERNEL
        redirect = perm.redirect
        # Redirected flows always leave from an external address: the client spoke to the fw.
        snat = perm.external_index if self.nat or redirect is not None else None
        one_way = key.protocol == UDP and Flags.BIDIRECTIONAL not in perm.flags and redirect is None
        record = FlowRecord(key, perm.session_id, perm.protocol_name, mode, now, perm.id,
                            data_filter=perm.data_filter, snat=snat, one_way=one_way,
                            redirect=None if redirect is None else redirect.internal_endpoint,
                            relayed=relayed)
        record.saw(True, length, now, tcp_flags)
        self.flows.add(record, now)
        session = self.sessions.get(perm.session_id)
        if session is not None:
            self.sessions.touch(session, now)
        external = None if snat is None else self._external(key.dst.version, snat)
        if perm.filter_id is not None:
            self.events.append(EstablishedConnection(perm.filter_id, perm.context, perm.id,
                                                     perm.session_id, key, external, now,
                                                     record.redirect))
        self._connect_events(record, secondary=True, now=now)
        verdict = Verdict.ADMIT_USER if mode is Mode.USER else Verdict.ADMIT_KERNEL
        what = "redirected" if redirect is not None else "secondary"
        return Decision(verdict, key, f"{what} {perm.protocol_name} flow admitted by action "
                        f"{perm.id} in {mode.value} mode", now, perm.session_id,
                        perm.protocol_name, perm.id, one_way, snat)

    def _connect_events(self, record: FlowRecord, *, secondary: bool, now: float) -> None:
        key = record.key
        external = None if record.snat is None else self._external(key.dst.version, record.snat)
        for filter_id, registered in self.connect_registrations.items():
            if any(proto == key.protocol and key.dport in ports for proto, ports in registered):
                self.events.append(ConnectEvent(filter_id, secondary, record.protocol,
                                                record.action_id, record.session_id, key,
                                                external, now, record.redirect))

    def drain_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def register_connect_events(self, filter_id: int, protocol: int, ports: PortRange) -> None:
        """Notify ``filter_id`` of every connection admitted to these ports."""
        if protocol not in (TCP, UDP):
            raise InvalidArgument(f"protocol must be TCP (6) or UDP (17), not {protocol}")
        self.connect_registrations.setdefault(filter_id, []).append((protocol, ports))

    def forget_filter(self, filter_id: int) -> None:
        self.connect_registrations.pop(filter_id, None)

    # --- the session API ----------------------------------------------------------------
    def allow_future_connect(self, session_id: int, target: IPAddress, port: int, protocol: int,
                             flags: Flags, protocol_guid: uuid.UUID, now: float, *,
                             proxy_external_address: IPAddress | None = None,
                             filter_id: int | None = None, context: Any = None,
                             data_filter: str | None = None) -> Permission:
        """Grant a secondary connection from the session's client to target:port.

        Raises InvalidArgument, PolicyRulesDenied, NetworkRulesDenied or IsBusy, and
        then creates nothing.
        """
        self.permissions.expire(now)
        if Flags.BIDIRECTIONAL in flags and protocol == TCP:
            raise InvalidArgument("BIDIRECTIONAL is for UDP only")
        session, protocol_def, external_index = self._check_grant(
            session_id, [(target, port)], protocol, flags, protocol_guid, proxy_external_address,
            data_filter, now, redirect=False)
        timeout = self.policy.defaults.permission_timeout if Flags.TIMEOUT in flags else None
        return self.permissions.add(session.id, session.client,
                                    permission_key(protocol, session.client, target, port),
                                    flags, protocol_def.name, now, timeout, external_index,
                                    filter_id, context, data_filter)

    def redirect_connections(self, session_id: int, targets: list[Endpoint], protocol: int,
                             flags: Flags, protocol_guid: uuid.UUID, now: float, *,
                             proxy_external_address: IPAddress | None = None,
                             filter_id: int | None = None, context: Any = None,
                             data_filter: str | None = None) -> tuple[Endpoint, list[Permission]]:
        """Redirect connections to N consecutive ports on the fw's internal address that
        faces the session's client, port base+i to targets[i]: (InternalAddress, actions).

        Raises as allow_future_connect does (IsBusy also when no block of N ports is
        free), and then creates nothing.
        """
        self.permissions.expire(now)
        if not 1 <= len(targets) <= MAX_ADDRESSES:
            raise InvalidArgument(f"give 1 to {MAX_ADDRESSES} connect addresses, not {len(targets)}")
        if flags & ~REDIRECT_FLAGS:
            names = ", ".join(f.name or "" for f in Flags if f in flags & ~REDIRECT_FLAGS)
            raise InvalidArgument(f"RedirectConnections does not take {names}")
        session, protocol_def, external_index = self._check_grant(
            session_id, targets, protocol, flags, protocol_guid, proxy_external_address, data_filter,
            now, redirect=True)
        internal = self._internal_address_for(session.client)
        in_user_mode = user_mode(flags, data_filter)
        base = self.pools[in_user_mode].allocate(len(targets))  # the last check: nothing to undo
        self._block_pending[(in_user_mode, base)] = len(targets)
        timeout = self.policy.defaults.permission_timeout if Flags.TIMEOUT in flags else None
        actions = []
        for i, (target, port) in enumerate(targets):
            redirect = Redirect(protocol, session.client, internal, base + i, target, port, base,
                                in_user_mode)
            actions.append(self.permissions.add(
                session.id, session.client, redirect_key(protocol, session.client, base + i), flags,
                protocol_def.name, now, timeout, external_index, filter_id, context, data_filter,
                redirect))
        return (internal, base), actions

    def _check_grant(self, session_id: int, targets: list[Endpoint], protocol: int, flags: Flags,
                     protocol_guid: uuid.UUID, proxy_external_address: IPAddress | None,
                     data_filter: str | None, now: float, *,
                     redirect: bool) -> tuple[Session, ProtocolDef, int]:
        """What every grant checks, in this order; returns the session, the protocol and
        the index of the external address the flows leave from."""
        if Flags.TIMEOUT in flags and Flags.ALLOW_MULTIPLE in flags:
            raise InvalidArgument("TIMEOUT and ALLOW_MULTIPLE cannot be combined")
        if protocol not in (TCP, UDP):
            raise InvalidArgument(f"protocol must be TCP (6) or UDP (17), not {protocol}")
        for _, port in targets:
            if not 1 <= port <= 65535:
                raise InvalidArgument(f"port {port} is outside 1-65535")
        if data_filter is not None:
            if data_filter not in self.data_filters:
                known = ", ".join(sorted(self.data_filters)) or "none are configured"
                raise InvalidArgument(f"no data filter '{data_filter}' ({known})")
            if protocol != TCP:
                raise InvalidArgument("data filters are for TCP flows")
        session = self._in_use(session_id, now)
        for target, _ in targets:
            refusal = self._target_refusal(target, session.client)
            if refusal is not None:
                raise InvalidArgument(refusal)
        external_index = self._external_index(session.client.version, proxy_external_address,
                                              translated=self.nat or redirect)
        protocol_def = next((p for p in self.policy.protocols if p.guid == protocol_guid), None)
        if protocol_def is None:
            raise InvalidArgument(f"no protocol is defined with GUID {protocol_guid}")
        allowed, why = self.policy.protocol_verdict(protocol_def.name, session.client, session.user)
        if not allowed:
            raise PolicyRulesDenied(why)
        for target, _ in targets:
            denial = self.policy.destination_denial(target)
            if denial is not None:
                raise NetworkRulesDenied(denial)
        cap = self.policy.defaults.max_pending_per_session
        if self.permissions.pending_count(session.id) + len(targets) > cap:
            self.counters["refused: max_pending_per_session"] += 1
            raise IsBusy(f"session {session.id} would have more than {cap} pending permissions")
        self.permissions.quota.check(session.client, len(targets))
        return session, protocol_def, external_index

    def _target_refusal(self, target: IPAddress, client: IPAddress) -> str | None:
        """Why ``target`` can be no target of ``client``'s secondary or relayed flow (rule
        14: never the fw itself), or None."""
        if target.version != client.version:
            return f"target {target} is not of the client's address family"
        if target.is_unspecified or target.is_multicast or target.is_loopback:
            return f"target {target} is not a unicast host address"
        if target in self.own_addresses:
            return f"target {target} is the firewall's own address"
        return None

    def _internal_address_for(self, client: IPAddress) -> IPAddress:
        for interface in self.internal_addresses:
            if client in interface.network:
                return interface.ip
        raise InvalidArgument(f"the firewall has no address on {client}'s network")

    def _finished(self, perm: Permission) -> None:
        """A permission stopped being pending: a redirect's block may go back to its pool,
        and a kernel-mode redirect's rules are due for removal."""
        redirect = perm.redirect
        if redirect is None:
            return
        block = (redirect.user_mode, redirect.block)
        self._block_pending[block] -= 1
        if not self._block_pending[block]:
            del self._block_pending[block]
            self.pools[redirect.user_mode].release(redirect.block)
        if not redirect.user_mode:
            self.retired.append(perm)

    def drain_retired(self) -> list[Permission]:
        retired, self.retired = self.retired, []
        return retired

    def expire(self, now: float) -> None:
        """Finish the permissions and SecureNAT binds whose time is up, let go of the
        user-mode flows conntrack has forgotten, and end idle SecureNAT sessions (the
        shell calls this on a timer). Each looks only at what it finishes."""
        self.permissions.expire(now)
        while self._expiring_binds:  # in the order they expire: one timeout for all
            bind = next(iter(self._expiring_binds.values()))
            if bind.expires is None or bind.expires > now:
                break
            self.bind_done(bind)
        self.flows.expire(now)
        for session in self.sessions.idle(now, lambda s: self.flows.holds(s.id)):
            self._end(session)
            self.counters["sessions ended idle"] += 1

    def pending(self, session_id: int | None, now: float) -> list[Permission]:
        self.permissions.expire(now)
        return self.permissions.pending(session_id)

    def cancel(self, action_id: int, now: float) -> Permission:
        return self.permissions.cancel(action_id, now)

    def action(self, action_id: int, now: float) -> Permission:
        self.permissions.expire(now)
        return self.permissions.get(action_id)

    def end_session(self, session_id: int, now: float) -> list[Permission]:
        """The session ends: its pending permissions are cancelled; admitted flows live on."""
        self.permissions.expire(now)  # what has already expired is expired, not cancelled
        return self._end(self.session(session_id))

    def _end(self, session: Session) -> list[Permission]:
        self.sessions.remove(session)
        for bind in self.binds.of(session.id):
            self.bind_done(bind)
        self.binds.end_session(session.id)
        cancelled = self.permissions.end_session(session.id)
        if self.on_session_end is not None:
            self.on_session_end(session)
        return cancelled

    def session(self, session_id: int) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise InvalidArgument(f"no session {session_id}")
        return session

    def _released(self, record: FlowRecord, now: float) -> None:
        """A user-mode flow let go: its session's idle time starts (again) now."""
        session = self.sessions.get(record.session_id)
        if session is not None:
            self.sessions.touch(session, now)

    def _in_use(self, session_id: int, now: float) -> Session:
        """The session a request names; being named is activity (it is not idle)."""
        session = self.session(session_id)
        self.sessions.touch(session, now)
        return session

    def limits_status(self) -> dict[str, dict[str, object]]:
        """Every cap (``status``), with its use and its refusals where the core enforces
        it (the kernel enforces flows_per_client and new_flows_per_second, the stream
        editors buffered_bytes_*)."""
        out: dict[str, dict[str, object]] = {name: {"cap": cap}
                                             for name, cap in self.limits.to_dict().items()}
        for quota in (self.sessions.quota, self.permissions.quota, self.binds.quota,
                      self.flows.quota):
            out.update(quota.status())
        out["session_idle_timeout"] = {"cap": self.limits.session_idle_timeout,
                                       "ended": self.counters["sessions ended idle"]}
        out["flow_history"] = {"cap": self.limits.flow_history, "used": self.flows.history_count}
        out["max_pending_per_session"] = {
            "cap": self.policy.defaults.max_pending_per_session,
            "refused": self.counters["refused: max_pending_per_session"]}
        return out

    # --- helpers --------------------------------------------------------------------------
    def _external(self, version: int, index: int) -> IPAddress:
        return [a for a in self.external_addresses if a.version == version][index]

    def _has_external(self, version: int) -> bool:
        return any(a.version == version for a in self.external_addresses)

    def _external_index(self, version: int, requested: IPAddress | None, translated: bool) -> int:
        """The index of the external address a grant's flows leave from. ``translated``:
        they will be source-translated, so the family needs an external address."""
        ours = [a for a in self.external_addresses if a.version == version]
        if translated and not ours:
            raise InvalidArgument(f"the firewall has no external IPv{version} address for the "
                                  "flow to leave from")
        if requested is None:
            return 0  # the address the session's primaries leave from
        if requested not in ours:
            raise InvalidArgument(f"{requested} is not one of the firewall's external "
                                  f"addresses ({', '.join(map(str, ours)) or 'none'})")
        return ours.index(requested)

    def is_internal(self, address: IPAddress) -> bool:
        """Whether ``address`` is on one of the internal networks."""
        return address in self.internal_networks


def parse_address(text: object, what: str) -> IPAddress:
    if not isinstance(text, str):
        raise InvalidArgument(f"{what} must be an IP address string")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(f"{what} {text!r} is not an IP address") from None
