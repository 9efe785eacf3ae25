"""What the engine holds, and what every part of it asks of the rest.

``Engine`` (enforcer.core.engine) is built in layers, one module per concern, each
small enough to read in one sitting: this state; events (enforcer.core.events);
grants and their validation (enforcer.core.grants); binds (enforcer.core.binding);
the packet path (enforcer.core.decisions). Each layer uses the ones below it.
"""

from __future__ import annotations

import enum
import functools
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from enforcer.core.binds import DEFAULT_BIND_PORTS, Bind, BindTable
from enforcer.core.budget import ClientBudgets
from enforcer.core.datafilter import DataFilter
from enforcer.core.effects import Effect, KernelGrant, LetGo, RemoveKernelGrant, RemoveRedirect
from enforcer.core.flags import Flags
from enforcer.core.flows import ConntrackTimeouts, FlowRecord, FlowTable
from enforcer.core.ingress import InterfaceNetworks
from enforcer.core.limits import Limits
from enforcer.core.packet import FlowKey, IPAddress, address
from enforcer.core.permissions import Permission, PermissionKey, PermissionTable, pack_key
from enforcer.core.policy import IPNetwork, Policy, PortRange
from enforcer.core.redirects import (
    DEFAULT_KERNEL_REDIRECT_PORTS,
    DEFAULT_USER_REDIRECT_PORTS,
    IPInterface,
    PortPool,
)
from enforcer.core.results import InvalidArgument
from enforcer.core.sessions import Session, SessionTable

RECENT_DECISIONS = 512  # the decisions the engine remembers (the decisions listing)
# Answers of the policy (fixed for an engine's life) remembered per question: the clients,
# targets and protocols in use recur on every grant and new flow
POLICY_MEMO = 4096


class Verdict(enum.Enum):
    ADMIT_KERNEL = "admit-kernel"
    ADMIT_USER = "admit-user"
    DROP = "drop"


class Decision(NamedTuple):
    """What the engine decided about a new flow (the decisions listing keeps the last ones)."""

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


def permission_key(protocol: int, client: IPAddress, target: IPAddress, port: int) -> PermissionKey:
    # The address objects' own ints and version (a new flow makes a key): int() and
    # .version run ipaddress's Python code. Its stub lists neither attribute.
    c: Any = client
    t: Any = target
    return pack_key(protocol, c._version, c._ip, t._ip, port)


_NO_KERNEL_MODE = int(Flags.NO_KERNEL_MODE)


def user_mode(flags: Flags, data_filter: str | None) -> bool:
    """Whether the flows a grant admits run in user mode (fixed at the grant). (The flags
    as a plain int: tested in C, not by the enum's methods, on every new flow.)"""
    return bool(int(flags) & _NO_KERNEL_MODE) or data_filter is not None


def redirect_key(protocol: int, client: IPAddress, internal_port: int) -> PermissionKey:
    """A redirect's key: its port alone names it (ports are unique across internal
    addresses), and target 0 keeps it apart from every AllowFutureConnect key (no
    grant targets the unspecified address)."""
    return pack_key(protocol, client.version, int(client), 0, internal_port)


class State:
    """The engine's tables, and the helpers every layer uses."""

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
        # per IP version, in order (a grant and a translated flow ask for theirs)
        self._externals = {version: tuple(a for a in self.external_addresses if a.version == version)
                           for version in (4, 6)}
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
        # what the shell is to do, in order (kernel state, events): ``take_effects``
        self.effects: list[Effect] = []
        # bytes filtered streams hold, per client (the flow's source) and in total
        self.buffered = ClientBudgets(self.limits.buffered_bytes_per_client,
                                      self.limits.buffered_bytes_total)
        self.pools = {False: PortPool(*kernel_redirect_ports, name="kernel-mode redirect"),
                      True: PortPool(*user_redirect_ports, name="user-mode redirect")}
        self._block_pending: dict[tuple[bool, int], int] = {}  # (user mode, base) -> pending
        self.binds = BindTable(self.limits, self.counters)
        self.bind_ports = PortPool(*bind_ports, name="bind")
        self.app_filters = dict(app_filters or {})
        self._expiring_binds: dict[int, Bind] = {}
        # filter -> the (IP protocol, ports) it registered for connect events on
        self.connect_registrations: dict[int, list[tuple[int, PortRange]]] = {}
        # The shell's part of a session's end, however it ends (the SOCKS service closes
        # what of its connections the session held: a BIND's wait, a UDP ASSOCIATE)
        self.on_session_end: Callable[[Session], None] | None = None
        # The stream filter of a user-mode flow with a data or application filter (the
        # shell makes it: filters are plugins); None: no filter runs
        self.stream_filter: Callable[[FlowRecord], DataFilter] | None = None
        self.is_internal = functools.lru_cache(maxsize=POLICY_MEMO)(self.internal_networks.__contains__)
        self.protocol_verdict = functools.lru_cache(maxsize=POLICY_MEMO)(policy.protocol_verdict)
        self.destination_denial = functools.lru_cache(maxsize=POLICY_MEMO)(policy.destination_denial)
        self._host_refusal = functools.lru_cache(maxsize=POLICY_MEMO)(self._host_refusal_of)
        self.protocols_by_guid = {p.guid: p for p in policy.protocols}
        # Whether the kernel can hold grants (the shell says so once it can), and the
        # grants it holds, by their permission's key (one a key, as in the kernel's set)
        self.grants_in_kernel = False
        self.kernel_grants: dict[PermissionKey, KernelGrant] = {}
        # The worker processes ready to take user-mode flows (the shell says which), and how
        # many flows were handed to them (the next goes to the next worker)
        self.workers: tuple[int, ...] = ()
        self.handed_over = 0

    def _finished(self, perm: Permission) -> None:
        """A permission stopped being pending: a grant the kernel holds goes from it, a
        redirect's block may go back to its pool, and a kernel-mode redirect's rules are
        due for removal."""
        grant = self._kernel_grant_of(perm)
        if grant is not None:
            del self.kernel_grants[perm.key]
            self.effects.append(RemoveKernelGrant(grant))
        redirect = perm.redirect
        if redirect is None:
            return
        block = (redirect.user_mode, redirect.block)
        self._block_pending[block] -= 1
        if not self._block_pending[block]:
            del self._block_pending[block]
            self.pools[redirect.user_mode].release(redirect.block)
        if not redirect.user_mode:
            self.effects.append(RemoveRedirect(perm))

    def _kernel_grant_of(self, perm: Permission) -> KernelGrant | None:
        """The grant the kernel holds for this permission, if it holds one."""
        grant = self.kernel_grants.get(perm.key) if self.kernel_grants else None
        return grant if grant is not None and grant.permission is perm else None

    def take_effects(self) -> list[Effect]:
        """What the shell is to do since it last asked, in order: kernel state to add or
        remove, events to send. Every entry point adds to it; ``handle`` returns a
        packet's with its answer."""
        effects, self.effects = self.effects, []
        return effects

    def _record(self, decision: Decision) -> Decision:
        self.counters[decision.verdict._value_] += 1  # not .value: Python code
        self.recent.append(decision)
        return decision

    def session(self, session_id: int) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise InvalidArgument(f"no session {session_id}")
        return session

    def _in_use(self, session_id: int, now: float) -> Session:
        """The session a request names; being named is activity (it is not idle)."""
        session = self.session(session_id)
        self.sessions.touch(session, now)
        return session

    def _released(self, record: FlowRecord, now: float) -> None:
        """A user-mode flow let go: its session's idle time starts (again) now, and the
        worker that holds it forgets it."""
        if record.worker:
            self.effects.append(LetGo(record.key, record.admitted_at, record.worker))
        session = self.sessions.get(record.session_id)
        if session is not None:
            self.sessions.touch(session, now)

    def external_address(self, version: int, index: int = 0) -> IPAddress | None:
        """The fw's ``index``-th external address of an IP version, if it has one."""
        ours = self._externals[version]
        return ours[index] if index < len(ours) else None

    def _external(self, version: int, index: int) -> IPAddress:
        return self._externals[version][index]

    def _has_external(self, version: int) -> bool:
        return bool(self._externals[version])

    def _external_index(self, version: int, requested: IPAddress | None, translated: bool) -> int:
        """The index of the external address a grant's flows leave from. ``translated``:
        they will be source-translated, so the family needs an external address."""
        ours = self._externals[version]
        if translated and not ours:
            raise InvalidArgument(f"the firewall has no external IPv{version} address for the "
                                  "flow to leave from")
        if requested is None:
            return 0  # the address the session's primaries leave from
        if requested not in ours:
            raise InvalidArgument(f"{requested} is not one of the firewall's external "
                                  f"addresses ({', '.join(map(str, ours)) or 'none'})")
        return ours.index(requested)

    def _target_refusal(self, target: IPAddress, client: IPAddress) -> str | None:
        """Why ``target`` can be no target of ``client``'s secondary or relayed flow (rule
        14: never the fw itself), or None."""
        t: Any = target  # the class's own version: .version runs Python (the stub lacks it)
        c: Any = client
        if t._version != c._version:
            return f"target {target} is not of the client's address family"
        return self._host_refusal(target)

    def _host_refusal_of(self, target: IPAddress) -> str | None:
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


def parse_address(text: object, what: str) -> IPAddress:
    if not isinstance(text, str):
        raise InvalidArgument(f"{what} must be an IP address string")
    try:
        return address(text)
    except ValueError:
        raise InvalidArgument(f"{what} {text!r} is not an IP address") from None
