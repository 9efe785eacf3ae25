"""The session API for Python callers: over the control socket (``Client``), or in the
enforcer's own process for application filters (``enforcer.filters``). Both have the
same methods (``SessionCalls``); only the transport of ``call`` differs.

With them come what a caller passes, gets and catches: ``Flags``, ``Listing`` (what a
listing call returns: a list cut to the call's ``limit``, whose ``more`` says how many
it left out), ``SessionApiError`` (the
base of the result codes' exceptions, each with its ``name`` and ``hresult``) and
``IpFilter``, SPEC.md's IFWXIpFilter (rule 10): a set of inclusive address ranges,
IPv4 and IPv6, with IncludeRange, ExcludeRange, IncludeFilter, ExcludeFilter,
IsIncluded, Compare and Clone, whose ``to_dict()`` is the ``ipfilter`` parameter of
``retroactive_allow_bind`` as the control protocol carries it."""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections import deque
from typing import Any

from enforcer.core.flags import Flags, flag_names
from enforcer.core.ipfilter import IpFilter
from enforcer.core.results import ERRORS, SessionApiError
from enforcer.protocol import Listing, encode

EVENTS_KEPT = 1024  # events a caller keeps until it takes them (next_event, events)


class ControlError(Exception):
    """The control socket could not be reached or answered nonsense."""


class SessionCalls:
    """The session API's methods, on top of ``call(method, **params)``."""

    def call(self, method: str, **params: Any) -> Any:
        raise NotImplementedError

    def allow_future_connect(self, session: int, target: tuple[str, int], *,
                             protocol_guid: str, protocol: str = "tcp", flags: Flags | None = None,
                             proxy_external_address: str | None = None,
                             session_filter: int | None = None, context: Any = None,
                             data_filter: str | None = None) -> Action:
        """Grant the session's client one (or, with ALLOW_MULTIPLE, more) secondary flows."""
        result = self.call("allow_future_connect", session=session, address=target[0],
                           port=target[1], protocol=protocol, flags=flag_names(flags or Flags(0)),
                           protocol_guid=protocol_guid,
                           proxy_external_address=proxy_external_address,
                           filter=session_filter, context=context, data_filter=data_filter)
        return Action(self, int(result["action"]))

    def redirect_connections(self, session: int, targets: list[tuple[str, int]], *,
                             protocol_guid: str, protocol: str = "tcp", flags: Flags | None = None,
                             proxy_external_address: str | None = None,
                             session_filter: int | None = None, context: Any = None,
                             data_filter: str | None = None) -> tuple[tuple[str, int], list[Action]]:
        """Redirect the session's client's connections to consecutive ports on the fw:
        (InternalAddress, one action per target); port InternalAddress+i leads to targets[i]."""
        result = self.call("redirect_connections", session=session,
                           addresses=[[a, p] for a, p in targets], protocol=protocol,
                           flags=flag_names(flags or Flags(0)), protocol_guid=protocol_guid,
                           proxy_external_address=proxy_external_address,
                           filter=session_filter, context=context, data_filter=data_filter)
        address, port = result["internal_address"]
        return (str(address), int(port)), [Action(self, int(a["action"])) for a in result["actions"]]

    def bind_for_client(self, session: int, client_port: int, *, protocol: str = "tcp",
                        from_fw: bool = False) -> tuple[str, int]:
        """Make a SecureNAT client's port reachable from outside for one flow: the address
        and port a peer must use ((the fw's external address, a port) in NAT, the client's
        own otherwise). It admits nothing until ``retroactive_allow_bind``. ``from_fw``:
        the flow reaches the client from the fw's address on its network, not from the
        peer's (for a client that sees only the fw), and the peer uses an external
        address of the fw, routed too."""
        result = self.call("bind_for_client", session=session, protocol=protocol,
                           client_port=client_port, from_fw=from_fw)
        address, port = result["address"]
        return str(address), int(port)

    def retroactive_allow_bind(self, session: int, address: tuple[str, int], *, protocol_guid: str,
                               protocol: str = "tcp", flags: Flags | None = None,
                               ipfilter: list[tuple[str, str]] | None = None) -> bool:
        """Approve a bind of the session for the peers in ``ipfilter`` (inclusive address
        ranges; None: any peer). True for S_OK, False for S_FALSE (approved already)."""
        result = self.call("retroactive_allow_bind", session=session, protocol=protocol,
                           address=address[0], port=address[1], protocol_guid=protocol_guid,
                           flags=flag_names(flags or Flags(0)),
                           ipfilter=None if ipfilter is None else
                           {"ranges": [[low, high] for low, high in ipfilter]})
        return bool(result["result"] == "S_OK")

    def binds(self, session: int | None = None, *, limit: int | None = None,
              after: int | None = None) -> Listing:
        """The binds of a session (of all sessions with None), oldest first, those with an
        id greater than ``after`` (None: from the first): at most ``limit`` (None: the
        enforcer's default); ``more`` says how many were left out."""
        listed: Listing = self.call("binds", session=session, limit=limit, after=after)
        return listed

    def register_filter(self, name: str) -> int:
        """Register a session filter; its events arrive on this client (next_event)."""
        return int(self.call("register_filter", name=name)["filter"])

    def register_connect_events(self, filter_id: int, protocol: str, ports: tuple[int, int]) -> None:
        """Have ``connect`` events sent to the filter for connections admitted to these ports."""
        self.call("register_connect_events", filter=filter_id, protocol=protocol, ports=list(ports))


class Client(SessionCalls):
    """The session API over the enforcer's control socket."""

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._buf = b""
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.events_dropped = 0  # the oldest events, let go for newer ones

    def _connect(self) -> socket.socket:
        if self._sock is None:
            deadline = time.monotonic() + self.timeout
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(self.path)
                    break
                except BlockingIOError:
                    # a full listen backlog: the daemon is busy, not gone
                    sock.close()
                    if time.monotonic() > deadline:
                        raise ControlError(f"the enforcer at {self.path} is not accepting "
                                           "connections") from None
                    time.sleep(0.01)
                except OSError as exc:  # (a path too long has no strerror)
                    sock.close()
                    raise ControlError(f"cannot reach the enforcer at {self.path}: "
                                       f"{exc.strerror or exc}") from None
            self._sock = sock
        return self._sock

    def call(self, method: str, **params: Any) -> Any:
        """Call a method; an error reply raises the SessionApiError subclass it names. A
        list comes as a Listing (with the reply's ``more``, as the enforcer's own
        handlers return it)."""
        rid = next(self._ids)
        reply = self.raw(encode({"id": rid, "method": method, "params": params}))
        if "error" in reply:
            err = reply["error"]
            raise ERRORS.get(err.get("name"), SessionApiError)(err.get("message", ""))
        result = reply.get("result")
        return Listing(result, reply.get("more", 0)) if isinstance(result, list) else result

    def raw(self, data: bytes) -> dict[str, Any]:
        """Send bytes as they are and read the reply line (for tests of bad input).

        Events that arrive meanwhile are kept for next_event(): the last EVENTS_KEPT of
        them (``events_dropped`` counts those let go).
        """
        sock = self._connect()
        try:
            sock.sendall(data)
        except OSError as exc:
            self.close()
            raise ControlError(f"control socket {self.path}: {exc}") from None
        while True:
            message = self._read_message(self.timeout)
            if message is None:
                raise ControlError(f"the enforcer at {self.path} did not answer "
                                   f"within {self.timeout} s")
            if "event" in message and "id" not in message:
                if len(self.events) == self.events.maxlen:
                    self.events_dropped += 1
                self.events.append(message)
                continue
            return message

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event pushed to this connection (for a registered filter), or None."""
        if self.events:
            return self.events.popleft()
        self._connect()
        return self._read_message(timeout)

    def _read_message(self, timeout: float) -> dict[str, Any] | None:
        sock = self._connect()
        deadline = time.monotonic() + timeout
        try:
            while b"\n" not in self._buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    return None
                if not chunk:
                    raise ControlError("the enforcer closed the control connection")
                self._buf += chunk
        except OSError as exc:
            self.close()
            raise ControlError(f"control socket {self.path}: {exc}") from None
        finally:
            if self._sock is not None:
                self._sock.settimeout(self.timeout)
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
            message = None
        if not isinstance(message, dict):
            raise ControlError(f"{self.path} did not answer in the control protocol: "
                               f"{line[:80]!r}")
        return message

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Action:
    """A FirewallAction held by a client."""

    def __init__(self, client: SessionCalls, action_id: int) -> None:
        self.client = client
        self.id = action_id

    @property
    def state(self) -> str:
        """pending, consumed, expired or cancelled."""
        return str(self.client.call("action", action=self.id)["state"])

    def info(self) -> dict[str, Any]:
        return dict(self.client.call("action", action=self.id))

    def cancel(self) -> None:
        """Stop new matches; raises Terminating if the action is no longer pending."""
        self.client.call("cancel", action=self.id)


__all__ = ["EVENTS_KEPT", "Action", "Client", "ControlError", "Flags", "IpFilter", "Listing",
           "SessionApiError", "SessionCalls"]
