"""The session API as the control socket serves it: typed checks of JSON parameters,
then calls into the core. Filters register here and receive their events.

Every parameter problem is E_INVALIDARG with a message naming the parameter.
"""

from __future__ import annotations

import itertools
import logging
import math
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from enforcer.control import Caller
from enforcer.core.effects import ConnectEvent, Effect, EstablishedConnection, Event
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags, parse_flags
from enforcer.core.fwports import NOTHING_LISTENS, Listening
from enforcer.core.grants import KernelUdpFlows, no_kernel_udp_flows
from enforcer.core.ipfilter import IpFilter
from enforcer.core.packet import TCP, UDP, Endpoint
from enforcer.core.policy import PortRange
from enforcer.core.redirects import MAX_ADDRESSES
from enforcer.core.results import InvalidArgument, IsBusy
from enforcer.core.state import parse_address
from enforcer.protocol import MAX_LISTED, Listing

MAX_CONTEXT_BYTES = 4096
# Its events are encoded deep in the packet path's stack: a context must nest much less
# than the recursion limit that reading a request allows.
MAX_CONTEXT_DEPTH = 32
MAX_FILTERS_PER_CONNECTION = 64  # filters a control connection may register
# The default 'limit' of the listings of whole tables (sessions, actions, binds): 1000
# sessions make a reply of about 150 KB, 1000 actions one of about 250 KB, well under
# the control socket's MAX_UNSENT.
LISTED = 1000
_PROTOCOLS = {"tcp": TCP, "udp": UDP, TCP: TCP, UDP: UDP}

log = logging.getLogger("pinhole.enforcer")


class Params:
    """The parameters of one request, read with checks."""

    def __init__(self, params: dict[str, Any], allowed: set[str]) -> None:
        unknown = set(params) - allowed
        if unknown:
            raise InvalidArgument(f"unexpected parameters: {', '.join(sorted(unknown))}")
        self.params = params

    def has(self, name: str) -> bool:
        return self.params.get(name) is not None

    def integer(self, name: str, *, default: int | None = None, low: int = 0,
            high: int = 2**63 - 1) -> int:
        value = self.params.get(name, default)
        if value is None:
            raise InvalidArgument(f"'{name}' is required")
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgument(f"'{name}' must be an integer, not {type(value).__name__}")
        if not low <= value <= high:
            raise InvalidArgument(f"'{name}' must be from {low} to {high}")
        return value

    def protocol(self) -> int:
        protocol = self.params.get("protocol", "tcp")
        # the type first: a list is not hashable, and 6.0 == 6
        if type(protocol) not in (str, int) or protocol not in _PROTOCOLS:
            raise InvalidArgument("'protocol' must be \"tcp\", \"udp\", 6 or 17")
        return _PROTOCOLS[protocol]

    def flags(self) -> Flags:
        value = self.params.get("flags")
        if value is not None and not isinstance(value, int | list):
            raise InvalidArgument("'flags' must be an integer or a list of flag names")
        return parse_flags(value)

    def guid(self, name: str) -> uuid.UUID:
        text = self.string(name)
        try:
            return uuid.UUID(str(text))
        except ValueError:
            raise InvalidArgument(f"'{name}' {text!r} is not a GUID") from None

    def address(self, name: str) -> Any:
        return parse_address(self.params.get(name), f"'{name}'")

    def endpoint(self, value: object, what: str) -> Endpoint:
        if not isinstance(value, list) or len(value) != 2:
            raise InvalidArgument(f"{what} must be [address, port]")
        port = value[1]
        if not isinstance(port, int) or isinstance(port, bool):
            raise InvalidArgument(f"{what}: the port must be an integer")
        return parse_address(value[0], what), port

    def seconds(self, name: str) -> float | None:
        """An optional finite number of seconds (absent or null: None)."""
        value = self.params.get(name)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise InvalidArgument(f"'{name}' must be a number of seconds")
        return float(value)

    def limit(self, default: int) -> int:
        """A listing's optional 'limit' (absent or null: ``default``)."""
        return self.integer("limit", low=1, high=MAX_LISTED) if self.has("limit") else default

    def after(self) -> int:
        """A listing's optional cursor 'after': list only what has a greater id (absent or
        null: 0, from the first)."""
        return self.integer("after", low=0) if self.has("after") else 0

    def boolean(self, name: str) -> bool:
        """An optional true or false (absent or null: false)."""
        value = self.params.get(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise InvalidArgument(f"'{name}' must be true or false, not {type(value).__name__}")
        return value

    def string(self, name: str, *, required: bool = True, max_len: int = 256) -> str | None:
        value = self.params.get(name)
        if value is None:
            if required:
                raise InvalidArgument(f"'{name}' is required")
            return None
        if not isinstance(value, str) or len(value) > max_len:
            raise InvalidArgument(f"'{name}' must be a string of at most {max_len} characters")
        return value


def _listing(items: Iterable[Any], limit: int, total: int) -> Listing:
    """The first ``limit`` of ``items`` (``total`` of them) as dicts, and how many more
    there were."""
    listed = [item.to_dict() for item in itertools.islice(items, limit)]
    return Listing(listed, more=total - len(listed))


def _by_id_after(items: Iterable[Any], p: Params) -> list[Any]:
    """A table's items whose ``id`` is greater than the request's ``after``, in id order:
    a listing takes up from the last id the one before it returned."""
    after = p.after()
    return sorted((item for item in items if item.id > after), key=lambda item: item.id)


def _depth(value: Any) -> int:
    """How many lists and objects deep a JSON value goes, counted level by level (not by
    recursion: the value may be nested too deeply for that)."""
    depth, level = 0, [value]
    while containers := [v for v in level if isinstance(v, list | dict)]:
        depth += 1
        level = [item for c in containers for item in (c.values() if isinstance(c, dict) else c)]
    return depth


class SessionApi:
    """Control-socket handlers for sessions, permissions and filters."""

    def __init__(self, engine: Engine, clock: Callable[[], float],
                 apply: Callable[[list[Effect]], None] | None = None, *,
                 listening: Callable[[], Listening] = lambda: NOTHING_LISTENS,
                 kernel_udp_flows: KernelUdpFlows = no_kernel_udp_flows) -> None:
        """``apply`` is the shell's: it does what the engine asked for (kernel state,
        events), after each call and before its answer; if it raises, the call fails (and
        the shell has withdrawn the grant or bind it could not make). By default only
        events are delivered. While ``hold`` is set (the engine is deciding a packet,
        whose answer carries them) nothing is applied. ``listening`` says what the fw's
        own sockets listen on now (no SecureNAT bind takes such a port of the fw);
        ``kernel_udp_flows`` the ports of an internal address of the fw by which a
        client's UDP flows were redirected in the kernel, as conntrack holds them (no
        UDP redirect of the client takes such a port)."""
        self.engine = engine
        self.clock = clock
        self.apply = apply or self.deliver_events
        self.hold = False
        self.listening = listening
        self.kernel_udp_flows = kernel_udp_flows
        self._filters: dict[int, tuple[str, Caller]] = {}
        self._filter_ids = itertools.count(1)

    def handlers(self) -> dict[str, Callable[[dict[str, Any], Caller], Any]]:
        return {
            "ping": self.ping,
            "sessions": self.sessions,
            "flows": self.flows,
            "decisions": self.decisions,
            "allow_future_connect": self.allow_future_connect,
            "redirect_connections": self.redirect_connections,
            "register_connect_events": self.register_connect_events,
            "bind_for_client": self.bind_for_client,
            "retroactive_allow_bind": self.retroactive_allow_bind,
            "binds": self.binds,
            "cancel": self.cancel,
            "action": self.action,
            "actions": self.actions,
            "end_session": self.end_session,
            "register_filter": self.register_filter,
        }

    # --- introspection ------------------------------------------------------------------
    def ping(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        Params(params, set())
        return {"pong": True}

    def sessions(self, params: dict[str, Any], caller: Caller) -> Listing:
        """The sessions, oldest first (those with an id greater than ``after``): at most
        ``limit``."""
        p = Params(params, {"limit", "after"})
        sessions = _by_id_after(self.engine.sessions, p)
        return _listing(sessions, p.limit(LISTED), len(sessions))

    def flows(self, params: dict[str, Any], caller: Caller) -> Listing:
        """The ``limit`` flows seen last, newest first."""
        limit = Params(params, {"limit"}).limit(100)
        return _listing(self.engine.flows.newest(limit), limit, len(self.engine.flows))

    def decisions(self, params: dict[str, Any], caller: Caller) -> Listing:
        """The last ``limit`` decisions (made at ``since`` or later), oldest first."""
        p = Params(params, {"limit", "since"})
        limit = p.limit(100)
        since = p.seconds("since")
        recent = list(self.engine.recent)
        if since is not None:
            recent = [d for d in recent if d.at >= since]
        return _listing(recent[-limit:], limit, len(recent))

    # --- permissions --------------------------------------------------------------------
    def _own_filter(self, p: Params, caller: Caller) -> int:
        """The request's ``filter``: one registered on the caller's connection (its events
        go to that filter alone, rule 12: never to another connection's)."""
        filter_id = p.integer("filter", low=1)
        registered = self._filters.get(filter_id)
        if registered is None or registered[1] is not caller:
            raise InvalidArgument(f"no filter {filter_id} is registered on this connection")
        return filter_id

    def _grant_params(self, p: Params, caller: Caller) -> dict[str, Any]:
        """The parameters AllowFutureConnect and RedirectConnections share, checked."""
        filter_id = self._own_filter(p, caller) if p.has("filter") else None
        context = p.params.get("context")
        if _depth(context) > MAX_CONTEXT_DEPTH:
            raise InvalidArgument(f"'context' is nested more than {MAX_CONTEXT_DEPTH} deep")
        if len(repr(context)) > MAX_CONTEXT_BYTES:
            raise InvalidArgument(f"'context' is larger than {MAX_CONTEXT_BYTES} bytes")
        return {"proxy_external_address": p.address("proxy_external_address")
                if p.has("proxy_external_address") else None,
                "filter_id": filter_id, "context": context,
                "data_filter": p.string("data_filter", required=False, max_len=64)}

    def allow_future_connect(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        p = Params(params, {"session", "address", "port", "protocol", "flags", "protocol_guid",
                            "proxy_external_address", "filter", "context", "data_filter"})
        session = p.integer("session", low=1)
        target = p.address("address")
        port = p.integer("port", low=0, high=2**31)
        protocol, flags, guid = p.protocol(), p.flags(), p.guid("protocol_guid")
        perm = self.engine.allow_future_connect(session, target, port, protocol, flags, guid,
                                                self.clock(), **self._grant_params(p, caller))
        self.settle()
        return perm.to_dict()

    def redirect_connections(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """RedirectConnections: ``addresses`` is the list of [address, port] to redirect to."""
        p = Params(params, {"session", "addresses", "protocol", "flags", "protocol_guid",
                            "proxy_external_address", "filter", "context", "data_filter"})
        session = p.integer("session", low=1)
        addresses = params.get("addresses")
        if not isinstance(addresses, list) or not 1 <= len(addresses) <= MAX_ADDRESSES:
            raise InvalidArgument(f"'addresses' must be a list of 1 to {MAX_ADDRESSES} "
                                  "[address, port] pairs")
        targets = [p.endpoint(a, f"'addresses[{i}]'") for i, a in enumerate(addresses)]
        protocol, flags, guid = p.protocol(), p.flags(), p.guid("protocol_guid")
        (internal, base), perms = self.engine.redirect_connections(
            session, targets, protocol, flags, guid, self.clock(), **self._grant_params(p, caller),
            kernel_udp_flows=self.kernel_udp_flows)
        self.settle()
        return {"internal_address": [str(internal), base], "actions": [a.to_dict() for a in perms]}

    def settle(self) -> None:
        """Apply what the engine asked for in this call (unless a packet's answer will)."""
        if not self.hold:
            effects = self.engine.take_effects()
            if effects:
                self.apply(effects)

    def bind_for_client(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """A SecureNAT client's port made reachable for one inbound flow (pending until
        retroactive_allow_bind): the bind, whose ``address`` is what the peer must use.
        ``from_fw``: the flow reaches the client from the fw's address (its ``source``), and
        the bind is on an external address of the fw, routed too."""
        p = Params(params, {"session", "protocol", "client_port", "from_fw"})
        session = p.integer("session", low=1)
        client_port = p.integer("client_port", low=0, high=2**31)
        bind, _ = self.engine.bind_for_securenat(session, p.protocol(), client_port, self.clock(),
                                                   self.listening(), from_fw=p.boolean("from_fw"))
        self.settle()
        return bind.to_dict()

    def retroactive_allow_bind(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """RetroactiveAllowBind: ``address`` may be the any-address ("0.0.0.0", "::");
        ``ipfilter`` absent or null: any peer; {"ranges": []}: none."""
        p = Params(params, {"session", "protocol", "address", "port", "protocol_guid", "flags",
                            "ipfilter"})
        session = p.integer("session", low=1)
        address = p.address("address")
        port = p.integer("port", low=0, high=2**31)
        protocol, flags, guid = p.protocol(), p.flags(), p.guid("protocol_guid")
        ipfilter = IpFilter.from_dict(params["ipfilter"]) if p.has("ipfilter") else None
        bind, approved_now = self.engine.retroactive_allow_bind(
            session, protocol, None if address.is_unspecified else address, port, guid, flags,
            ipfilter, self.clock())
        self.settle()
        return {"result": "S_OK" if approved_now else "S_FALSE", "hresult": 0 if approved_now else 1,
                "bind": bind.to_dict()}

    def binds(self, params: dict[str, Any], caller: Caller) -> Listing:
        """The binds of a session (of every session without one), oldest first (those with
        an id greater than ``after``): at most ``limit``."""
        p = Params(params, {"session", "limit", "after"})
        session = p.integer("session", low=1) if p.has("session") else None
        binds = _by_id_after(self.engine.binds.of(session), p)
        return _listing(binds, p.limit(LISTED), len(binds))

    def cancel(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        action = Params(params, {"action"}).integer("action", low=1)
        cancelled = self.engine.cancel(action, self.clock())
        self.settle()
        return cancelled.to_dict()

    def action(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        action = Params(params, {"action"}).integer("action", low=1)
        return self.engine.action(action, self.clock()).to_dict()

    def actions(self, params: dict[str, Any], caller: Caller) -> Listing:
        """The pending actions of a session (of every session without one), oldest first
        (those with an id greater than ``after``): at most ``limit``."""
        p = Params(params, {"session", "limit", "after"})
        session = p.integer("session", low=1) if p.has("session") else None
        pending = _by_id_after(self.engine.pending(session, self.clock()), p)
        return _listing(pending, p.limit(LISTED), len(pending))

    def end_session(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        session = Params(params, {"session"}).integer("session", low=1)
        cancelled = self.engine.end_session(session, self.clock())
        self.settle()
        return {"session": session, "cancelled": [a.id for a in cancelled]}

    # --- filters and their events -------------------------------------------------------
    def register_filter(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """Register a session filter; its events are pushed on this connection."""
        name = Params(params, {"name"}).string("name", max_len=64)
        if sum(c is caller for _, c in self._filters.values()) >= MAX_FILTERS_PER_CONNECTION:
            raise IsBusy(f"a connection registers at most {MAX_FILTERS_PER_CONNECTION} filters")
        filter_id = next(self._filter_ids)
        self._filters[filter_id] = (str(name), caller)
        return {"filter": filter_id, "name": name}

    def register_connect_events(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """Ask for a ``connect`` event for every connection admitted to these ports."""
        p = Params(params, {"filter", "protocol", "ports"})
        filter_id = self._own_filter(p, caller)
        ports = params.get("ports")
        if not isinstance(ports, list) or len(ports) != 2 or \
                not all(isinstance(v, int) and not isinstance(v, bool) for v in ports) or \
                not 1 <= ports[0] <= ports[1] <= 65535:
            raise InvalidArgument("'ports' must be [low, high] with 1 <= low <= high <= 65535")
        protocol = p.protocol()
        self.engine.register_connect_events(filter_id, protocol, PortRange(ports[0], ports[1]))
        return {"filter": filter_id, "protocol": protocol, "ports": ports}

    def disconnected(self, caller: Caller) -> None:
        for fid in [f for f, (_, c) in self._filters.items() if c is caller]:
            del self._filters[fid]
            self.engine.forget_filter(fid)

    def deliver_events(self, effects: list[Effect]) -> None:
        """What a shell without a kernel does with effects: deliver the events alone."""
        for effect in effects:
            if isinstance(effect, (EstablishedConnection, ConnectEvent)):
                self.deliver(effect)

    def deliver(self, event: Event) -> None:
        """Push an event to the filter it is for, if that filter is still registered. One
        that cannot be sent (a context a filter in this process made, that is no JSON) is
        logged: its flow and the enforcer go on."""
        registered = self._filters.get(event.filter_id)
        if registered is None:
            return
        try:
            registered[1].push(event.to_dict())
        except Exception:
            log.exception("cannot send a %s event to filter %d", type(event).__name__,
                          event.filter_id)
