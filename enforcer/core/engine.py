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
from collections.abc import Iterable
from typing import Any, NamedTuple

from enforcer.core.flags import Flags
from enforcer.core.flows import FlowRecord, FlowTable, Mode
from enforcer.core.packet import PROTOCOL_NAMES, TCP, UDP, FlowKey, Ingress, IPAddress, PacketMeta
from enforcer.core.permissions import Permission, PermissionKey, PermissionTable, pack_key
from enforcer.core.policy import IPNetwork, NetworkSet, Policy
from enforcer.core.results import InvalidArgument, IsBusy, NetworkRulesDenied, PolicyRulesDenied
from enforcer.core.sessions import Session, SessionTable


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
    external_index: int = 0  # which external address a NATed flow leaves from

    def to_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict.value, "flow": str(self.key), "reason": self.reason,
                "at": self.at, "session": self.session_id, "protocol": self.protocol,
                "action": self.action_id}


class EstablishedConnection(NamedTuple):
    """Event: a flow was admitted under a permission whose caller passed a session filter."""

    filter_id: int
    context: Any
    action_id: int
    session_id: int
    key: FlowKey
    external: IPAddress | None
    at: float

    def to_dict(self) -> dict[str, Any]:
        k = self.key
        return {"event": "established_connection", "filter": self.filter_id,
                "context": self.context, "action": self.action_id, "session": self.session_id,
                "protocol": PROTOCOL_NAMES.get(k.protocol, str(k.protocol)),
                "client": [str(k.src), k.sport], "target": [str(k.dst), k.dport],
                "external": None if self.external is None else str(self.external), "at": self.at}


def permission_key(protocol: int, client: IPAddress, target: IPAddress, port: int) -> PermissionKey:
    return pack_key(protocol, client.version, int(client), int(target), port)


class Engine:
    """Decides every new flow: permissions first, then primaries by policy; drops the rest."""

    def __init__(self, policy: Policy, internal_networks: Iterable[IPNetwork],
                 external_addresses: Iterable[IPAddress] = (), *, nat: bool = False,
                 data_filters: Iterable[str] = (), history: int = 512) -> None:
        self.policy = policy
        self.internal_networks = NetworkSet(internal_networks)
        self.external_addresses = tuple(external_addresses)
        self.nat = nat
        self.data_filters = frozenset(data_filters)
        self.sessions = SessionTable()
        self.flows = FlowTable()
        self.permissions = PermissionTable()
        self.counters: Counter[str] = Counter()
        self.recent: deque[Decision] = deque(maxlen=history)
        self.events: list[EstablishedConnection] = []

    # --- packets ------------------------------------------------------------------------
    def decide(self, meta: PacketMeta, now: float, length: int = 0) -> Decision:
        """Decide the first packet of a flow the kernel has not seen before."""
        self.permissions.expire(now)
        decision = self._decide(meta, now, length)
        self.counters[decision.verdict.value] += 1
        self.recent.append(decision)
        return decision

    def user_packet(self, meta: PacketMeta, length: int,
                    now: float) -> tuple[FlowRecord, bool] | None:
        """A packet of a flow the kernel says runs in user mode: count it.

        Returns the flow's record and whether the packet goes the flow's way. The
        flow's conntrack mark is the authority; a flow the table has forgotten still
        passes (None is returned), it just has no counters any more.
        """
        found = self.flows.find(meta.key)
        self.counters["user-mode packets"] += 1
        if found is None:
            return None
        record, forward = found
        record.saw(forward, length, now)
        return found

    def _decide(self, meta: PacketMeta, now: float, length: int) -> Decision:
        key = meta.key

        def drop(reason: str) -> Decision:
            return Decision(Verdict.DROP, key, reason, now)

        if key.protocol == TCP and not meta.starts_tcp_connection:
            return drop(f"TCP packet with flags 0x{meta.tcp_flags:02x} cannot open a connection")
        if meta.ingress is Ingress.EXTERNAL:
            return drop("arrived on the external side and no permission admits it")
        if not self._is_internal(key.src):
            return drop(f"source {key.src} is not on an internal network")

        session = self.sessions.find(key.src)
        perm = self.permissions.match(permission_key(key.protocol, key.src, key.dst, key.dport),
                                      None if session is None else session.id, now)
        if perm is not None:
            return self._admit_permitted(meta, perm, now, length)

        protocol = self.policy.primary_protocol(key.protocol, key.dport)
        if protocol is None:
            name = PROTOCOL_NAMES.get(key.protocol, str(key.protocol))
            return drop(f"no permission admits it and {name}/{key.dport} "
                        "is no protocol's primary port")
        allowed, why = self.policy.protocol_verdict(protocol.name, key.src, None)
        if not allowed:
            return drop(why)
        denial = self.policy.destination_denial(key.dst)
        if denial is not None:
            return drop(denial)

        session = self.sessions.securenat(key.src, now)
        session.primaries += 1
        session.last_activity = now
        record = FlowRecord(key, session.id, protocol.name, Mode.KERNEL, now)
        record.saw(True, length, now)
        self.flows.add(record)
        return Decision(Verdict.ADMIT_KERNEL, key,
                        f"primary connection: {why}",
                        now, session.id, protocol.name)

    def _admit_permitted(self, meta: PacketMeta, perm: Permission, now: float,
                         length: int) -> Decision:
        key = meta.key
        user = Flags.NO_KERNEL_MODE in perm.flags or perm.data_filter is not None
        mode = Mode.USER if user else Mode.KERNEL
        record = FlowRecord(key, perm.session_id, perm.protocol_name, mode, now, perm.id,
                            data_filter=perm.data_filter)
        record.saw(True, length, now)
        self.flows.add(record)
        external = self._external(key.dst.version, perm.external_index) if self.nat else None
        if perm.filter_id is not None:
            self.events.append(EstablishedConnection(perm.filter_id, perm.context, perm.id,
                                                     perm.session_id, key, external, now))
        one_way = key.protocol == UDP and Flags.BIDIRECTIONAL not in perm.flags
        verdict = Verdict.ADMIT_USER if mode is Mode.USER else Verdict.ADMIT_KERNEL
        return Decision(verdict, key,
                        f"secondary {perm.protocol_name} flow admitted by action {perm.id} "
                        f"in {mode.value} mode",
                        now, perm.session_id, perm.protocol_name, perm.id, one_way,
                        perm.external_index)

    def drain_events(self) -> list[EstablishedConnection]:
        events, self.events = self.events, []
        return events

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
        if Flags.TIMEOUT in flags and Flags.ALLOW_MULTIPLE in flags:
            raise InvalidArgument("TIMEOUT and ALLOW_MULTIPLE cannot be combined")
        if protocol not in (TCP, UDP):
            raise InvalidArgument(f"protocol must be TCP (6) or UDP (17), not {protocol}")
        if Flags.BIDIRECTIONAL in flags and protocol == TCP:
            raise InvalidArgument("BIDIRECTIONAL is for UDP only")
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"port {port} is outside 1-65535")
        if data_filter is not None:
            if data_filter not in self.data_filters:
                known = ", ".join(sorted(self.data_filters)) or "none are configured"
                raise InvalidArgument(f"no data filter '{data_filter}' ({known})")
            if protocol != TCP:
                raise InvalidArgument("data filters are for TCP flows")
        session = self.session(session_id)
        if target.version != session.client.version:
            raise InvalidArgument(f"target {target} is not of the client's address family")
        if target.is_unspecified or target.is_multicast or target.is_loopback:
            raise InvalidArgument(f"target {target} is not a unicast host address")
        external_index = self._external_index(target.version, proxy_external_address)
        protocol_def = next((p for p in self.policy.protocols if p.guid == protocol_guid), None)
        if protocol_def is None:
            raise InvalidArgument(f"no protocol is defined with GUID {protocol_guid}")
        allowed, why = self.policy.protocol_verdict(protocol_def.name, session.client, session.user)
        if not allowed:
            raise PolicyRulesDenied(why)
        denial = self.policy.destination_denial(target)
        if denial is not None:
            raise NetworkRulesDenied(denial)
        cap = self.policy.defaults.max_pending_per_session
        if self.permissions.pending_count(session.id) >= cap:
            raise IsBusy(f"session {session.id} already has {cap} pending permissions")
        timeout = self.policy.defaults.permission_timeout if Flags.TIMEOUT in flags else None
        return self.permissions.add(session.id, permission_key(protocol, session.client, target, port),
                                    flags, protocol_def.name, now, timeout, external_index,
                                    filter_id, context, data_filter)

    def expire(self, now: float) -> None:
        """Finish the permissions whose time is up (the shell calls this on a timer)."""
        self.permissions.expire(now)

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
        session = self.session(session_id)
        self.sessions.remove(session)
        return self.permissions.end_session(session.id)

    def session(self, session_id: int) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise InvalidArgument(f"no session {session_id}")
        return session

    # --- helpers --------------------------------------------------------------------------
    def _external(self, version: int, index: int) -> IPAddress:
        return [a for a in self.external_addresses if a.version == version][index]

    def _external_index(self, version: int, requested: IPAddress | None) -> int:
        if requested is None:
            return 0  # the address the session's primaries leave from
        ours = [a for a in self.external_addresses if a.version == version]
        if requested not in ours:
            raise InvalidArgument(f"{requested} is not one of the firewall's external "
                                  f"addresses ({', '.join(map(str, ours)) or 'none'})")
        return ours.index(requested)

    def _is_internal(self, address: IPAddress) -> bool:
        return address in self.internal_networks


def parse_address(text: object, what: str) -> IPAddress:
    if not isinstance(text, str):
        raise InvalidArgument(f"{what} must be an IP address string")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(f"{what} {text!r} is not an IP address") from None
