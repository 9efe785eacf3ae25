"""The permission table: what AllowFutureConnect creates, and the FirewallAction handles.

Lookups are O(1) whatever the table's size: permissions are indexed by the
exact key a new flow presents (IP protocol, client address, target address,
target port; any client port), packed into one integer to keep each entry
small; a key holds one permission, or a list when identical grants share it.
Actions are also indexed by id, pending and finished ones alike (the newest
finished are remembered), and per session by a count and a list of ids; so a
flow that consumes a permission changes no index but its key's. Expiry is
driven by the ``now`` the caller passes in. Pending permissions count against
``pending_total`` and ``pending_per_client`` (``Limits``), which the caller
checks (``quota``) before it adds any.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
import itertools
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from enforcer.core.flags import Flags, flag_names
from enforcer.core.limits import Limits, Quota
from enforcer.core.packet import PROTOCOL_NAMES, IPAddress
from enforcer.core.redirects import Redirect
from enforcer.core.results import InvalidArgument, Terminating

# IP protocol, IP version, client, target and target port packed into one int
PermissionKey = int
_ADDRESS_BASED, _ALLOW_MULTIPLE = int(Flags.ADDRESS_BASED), int(Flags.ALLOW_MULTIPLE)
# Expiry entries of finished permissions kept beyond one per pending one before a sweep
STALE_EXPIRIES = 1024


def pack_key(protocol: int, version: int, client: int, target: int, port: int) -> PermissionKey:
    """One int per key: an IPv4 key's addresses take 32 bits each (a smaller int, quicker
    to make and to hash), an IPv6 key's 128; the last bit says which."""
    if version == 4:
        return (((client << 32 | target) << 16 | port) << 8 | protocol) << 1
    return ((((client << 128) | target) << 16 | port) << 8 | protocol) << 1 | 1


def unpack_key(key: PermissionKey) -> tuple[int, int, int, int, int]:
    """(protocol, version, client, target, port) of a key ``pack_key`` made."""
    version, bits = (6, 128) if key & 1 else (4, 32)
    key >>= 1
    protocol, key = key & 0xFF, key >> 8
    port, key = key & 0xFFFF, key >> 16
    return protocol, version, key >> bits, key & ((1 << bits) - 1), port


class ActionState(enum.Enum):
    PENDING = "pending"
    CONSUMED = "consumed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


# As module names: an enum member looked up on its class runs the enum's Python code
_PENDING, _CONSUMED = ActionState.PENDING, ActionState.CONSUMED


@dataclass(slots=True, eq=False)
class Permission:
    """A FirewallAction: one grant of AllowFutureConnect, or one address of RedirectConnections."""

    id: int
    session_id: int
    client: IPAddress  # the session's client (pending_per_client)
    key: PermissionKey
    flags: Flags
    protocol_name: str
    created: float
    expires: float | None
    external_index: int  # which of the fw's external addresses a NATed flow leaves from
    filter_id: int | None = None
    context: Any = None
    data_filter: str | None = None
    redirect: Redirect | None = None
    state: ActionState = ActionState.PENDING
    admitted: int = 0
    # Set by the shell: the receive buffer (bytes) of what the enforcer holds for the flow
    receive_buffer: int | None = None

    def to_dict(self) -> dict[str, Any]:
        protocol, version, _, target, port = unpack_key(self.key)
        r = self.redirect
        if r is None:  # where its flows go (a redirect's key holds its port on the fw)
            where = [str((ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address)(target)),
                     port]
        else:
            where = [str(r.target), r.target_port]
        out: dict[str, Any] = {"action": self.id, "session": self.session_id,
                               "state": self.state.value, "flags": flag_names(self.flags),
                               "protocol": PROTOCOL_NAMES.get(protocol, str(protocol)),
                               "protocol_name": self.protocol_name,
                               "target": where,
                               "created": self.created, "expires": self.expires,
                               "admitted": self.admitted, "filter": self.filter_id,
                               "data_filter": self.data_filter, "receive_buffer": self.receive_buffer}
        if r is not None:
            out["redirect"] = {"internal": [str(r.internal), r.internal_port],
                               "target": [str(r.target), r.target_port],
                               "mode": "user" if r.user_mode else "kernel"}
        return out


class _SessionActions:
    """A session's permissions: how many are pending, and their ids in the order granted
    (appended on a grant; finished ones are swept out once they outnumber the pending)."""

    __slots__ = ("ids", "pending")

    def __init__(self) -> None:
        self.pending = 0
        self.ids: list[int] = []


@dataclass
class PermissionTable:
    limits: Limits = field(default_factory=Limits)
    counters: Counter[str] = field(default_factory=Counter)  # where refusals are counted
    _by_key: dict[PermissionKey, Permission | list[Permission]] = field(default_factory=dict)
    # Every pending permission and the last finished ones, by id: finishing one changes
    # no index but its key's (a new flow's match costs the fewest lookups)
    _actions: dict[int, Permission] = field(default_factory=dict)
    _finished: deque[int] = field(default_factory=deque)  # ids, the oldest first
    _by_session: dict[int, _SessionActions] = field(default_factory=dict)
    _expiry: list[tuple[float, int]] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # called once for each permission that stops being pending, however it stops
    on_finish: Callable[[Permission], None] | None = None

    def __post_init__(self) -> None:
        self.quota = Quota("pending", self.limits, self.counters)
        # finished actions remembered (an action's state, FWX_E_TERMINATING on Cancel):
        # as many as may be pending
        self.finished_capacity = self.limits.pending_total

    def add(self, session_id: int, client: IPAddress, key: PermissionKey, flags: Flags,
            protocol_name: str,
            now: float, timeout: float | None, external_index: int,
            filter_id: int | None = None, context: Any = None,
            data_filter: str | None = None, redirect: Redirect | None = None) -> Permission:
        expires = None if timeout is None else now + timeout
        perm = Permission(next(self._ids), session_id, client, key, flags, protocol_name, now,
                          expires, external_index, filter_id, context, data_filter, redirect)
        self.quota.take(client)
        present = self._by_key.setdefault(key, perm)
        if isinstance(present, list):
            present.append(perm)
        elif present is not perm:
            self._by_key[key] = [present, perm]
        self._actions[perm.id] = perm
        session = self._by_session.get(session_id)
        if session is None:
            session = self._by_session[session_id] = _SessionActions()
        session.pending += 1
        session.ids.append(perm.id)
        if expires is not None:
            heapq.heappush(self._expiry, (expires, perm.id))
            if len(self._expiry) > 2 * len(self) + STALE_EXPIRIES:
                # entries of permissions finished early linger until their time: drop them
                self._expiry = [(p.expires, p.id) for session_id in self._by_session
                                for p in self.pending(session_id) if p.expires is not None]
                heapq.heapify(self._expiry)
        return perm

    def pending_count(self, session_id: int) -> int:
        session = self._by_session.get(session_id)
        return 0 if session is None else session.pending

    def match(self, key: PermissionKey, session_id: int | None, now: float,
              where: Callable[[Permission], bool] | None = None) -> Permission | None:
        """The oldest pending permission a new flow with this key may use (and that
        ``where`` accepts), consumed if single use."""
        found = self._by_key.get(key)
        if found is None:
            return None
        for perm in found if isinstance(found, list) else (found,):
            if perm.expires is not None and perm.expires <= now:
                continue  # expired but not yet swept: never used
            bits = int(perm.flags)  # a plain int: tested in C, not by the enum's methods
            if perm.session_id != session_id and not bits & _ADDRESS_BASED:
                continue
            if where is not None and not where(perm):
                continue
            perm.admitted += 1
            if not bits & _ALLOW_MULTIPLE:
                self._finish(perm, _CONSUMED)
            return perm
        return None

    def use(self, perm: Permission) -> None:
        """A pending single-use permission was used where the table did not match it (the
        kernel held it): consumed."""
        perm.admitted += 1
        self._finish(perm, _CONSUMED)

    def expire(self, now: float) -> list[Permission]:
        """Finish every pending permission whose time is up; return them."""
        out = []
        while self._expiry and self._expiry[0][0] <= now:
            _, pid = heapq.heappop(self._expiry)
            perm = self._pending(pid)
            if perm is not None:
                self._finish(perm, ActionState.EXPIRED)
                out.append(perm)
        return out

    def next_expiry(self) -> float | None:
        while self._expiry and self._pending(self._expiry[0][1]) is None:
            heapq.heappop(self._expiry)
        return self._expiry[0][0] if self._expiry else None

    def get(self, action_id: int) -> Permission:
        perm = self._actions.get(action_id)
        if perm is None:
            raise InvalidArgument(f"no action {action_id}")
        return perm

    def cancel(self, action_id: int, now: float) -> Permission:
        """Stop new matches. Flows already admitted are not touched."""
        self.expire(now)
        perm = self.get(action_id)
        if perm.state is not ActionState.PENDING:
            raise Terminating(f"action {action_id} is {perm.state.value}, not pending")
        self._finish(perm, ActionState.CANCELLED)
        return perm

    def end_session(self, session_id: int) -> list[Permission]:
        """Cancel every pending permission of a session."""
        perms = self.pending(session_id)
        for perm in perms:
            self._finish(perm, ActionState.CANCELLED)
        return perms

    def pending(self, session_id: int | None = None) -> list[Permission]:
        """Pending permissions (of one session, or all), the oldest first."""
        if session_id is None:
            return [p for p in self._actions.values() if p.state is _PENDING]
        session = self._by_session.get(session_id)
        if session is None:
            return []
        return [p for p in map(self._pending, session.ids) if p is not None]

    def __len__(self) -> int:
        return self.quota.used  # every pending permission, and only those, holds its quota

    def _pending(self, action_id: int) -> Permission | None:
        perm = self._actions.get(action_id)
        return perm if perm is not None and perm.state is _PENDING else None

    def _finish(self, perm: Permission, state: ActionState) -> None:
        perm.state = state
        self.quota.release(perm.client)
        present = self._by_key.pop(perm.key)
        if isinstance(present, list):  # identical grants: the others stay
            present.remove(perm)
            self._by_key[perm.key] = present[0] if len(present) == 1 else present
        session = self._by_session[perm.session_id]
        session.pending -= 1
        if not session.pending:
            del self._by_session[perm.session_id]
        elif len(session.ids) > 2 * session.pending + 1:
            # its finished ones outnumber its pending ones: sweep them out (amortized O(1))
            session.ids = [p.id for p in self.pending(perm.session_id)]
        self._finished.append(perm.id)
        if len(self._finished) > self.finished_capacity:
            del self._actions[self._finished.popleft()]
        if self.on_finish is not None:
            self.on_finish(perm)
