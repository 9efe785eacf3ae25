"""The session API as the harness knows it, written from SPEC.md and the README alone.

The checks judge a firewall from outside, so what they expect of its session API is
defined here and not taken from the reference enforcer: a mistake in the enforcer's
own definitions must not sit on both sides of a check.

- ``Flags``: the permission flags of SPEC.md "Constants". Their bits are the harness's
  own; they travel by name.
- ``SessionApiError`` and one subclass per error code of SPEC.md "Result codes"
  (``ERRORS``, by name): an error reply becomes the class its code names.
- ``wire_ipfilter``: an IpFilter (SPEC.md rule 10) as the session API takes it.
- ``SessionCalls``: the calls the checks make (README "The session API"), built on
  ``call(method, **params)``; ``Action``: a FirewallAction held by the harness.
- ``ControlClient``: those calls over the enforcer's control protocol (README "The
  enforcer"): one JSON object per line on a UNIX socket. A request is ``{"id", "method",
  "params"}``; its reply ``{"id", "result"}`` (a listing cut to its limit also says
  ``"more"``, which the harness does not read) or ``{"id", "error": {"name", "hresult",
  "message"}}``; an event for a filter registered on the connection is pushed as an
  object with ``"event"`` and no ``"id"``.
"""

from __future__ import annotations

import enum
import itertools
import json
import socket
import time
from collections import deque
from collections.abc import Iterable
from typing import Any


class Flags(enum.Flag):
    """Permission flags (SPEC.md "Constants"): single bits; on the wire, their names."""

    ADDRESS_BASED = enum.auto()
    ALLOW_MULTIPLE = enum.auto()
    TIMEOUT = enum.auto()
    NO_KERNEL_MODE = enum.auto()
    BIDIRECTIONAL = enum.auto()
    INCREASE_RECEIVE_BUFFER = enum.auto()


def flag_names(flags: Flags) -> list[str]:
    """The names the control protocol takes for ``flags`` (README: "names or bits")."""
    return [member.name for member in Flags if member in flags and member.name is not None]


# An IpFilter as the session API takes it (README): {"ranges": [[low, high], ...]}
IpFilterWire = dict[str, list[list[str]]]


def wire_ipfilter(ranges: Iterable[tuple[str, str]]) -> IpFilterWire:
    """An IpFilter's wire form: inclusive (low, high) address ranges; none: no peer."""
    return {"ranges": [[low, high] for low, high in ranges]}


class SessionApiError(Exception):
    """An error reply of the session API. ``name`` is its result code (SPEC.md "Result
    codes"): a subclass's own, or on this class whatever code the reply named, one the
    SPEC does not define. ``message`` is the firewall's text (``str()`` of the error)."""

    name = ""
    hresult: int | None = None

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(message)
        self.message = message
        if name:
            self.name = name


class InvalidArgument(SessionApiError):
    name, hresult = "E_INVALIDARG", 0x80070057


class NotFound(SessionApiError):
    name, hresult = "NOT_FOUND", 0x80070490


class Terminating(SessionApiError):
    name, hresult = "FWX_E_TERMINATING", 0xC0040001


class PolicyRulesDenied(SessionApiError):
    name, hresult = "FWX_E_POLICY_RULES_DENIED", 0xC004000D


class NetworkRulesDenied(SessionApiError):
    name, hresult = "FWX_E_NETWORK_RULES_DENIED", 0xC0040012


class IsBusy(SessionApiError):
    name, hresult = "FWX_E_IS_BUSY", 0xC0040011


# SPEC.md's error codes, by name (S_OK and S_FALSE are results, not errors)
ERRORS: dict[str, type[SessionApiError]] = {
    cls.name: cls for cls in (InvalidArgument, NotFound, Terminating, PolicyRulesDenied,
                              NetworkRulesDenied, IsBusy)}


class ControlError(Exception):
    """The control socket could not be reached, or what came back breaks the protocol."""


class SessionCalls:
    """The session API calls the checks make, on top of ``call(method, **params)``
    (README "The session API": the methods and their parameters). Optional parameters
    left at None are not sent. Use it as a context manager."""

    def call(self, method: str, **params: Any) -> Any:
        raise NotImplementedError

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event pushed for a filter registered here, or None within ``timeout``."""
        raise NotImplementedError

    def raw(self, data: bytes) -> dict[str, Any]:
        """Send ``data`` as it is (a malformed request, say) and return the reply."""
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to close by default."""

    def __enter__(self) -> SessionCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, **params: Any) -> Any:
        return self.call(method, **{k: v for k, v in params.items() if v is not None})

    def allow_future_connect(self, session: int, target: tuple[str, int], *, protocol_guid: str,
                             protocol: str = "tcp", flags: Flags | None = None,
                             proxy_external_address: str | None = None,
                             session_filter: int | None = None, context: Any = None,
                             data_filter: str | None = None) -> Action:
        """AllowFutureConnect: the session's client may open a flow to ``target``."""
        result = self._call("allow_future_connect", session=session, address=target[0],
                            port=target[1], protocol=protocol, protocol_guid=protocol_guid,
                            flags=flag_names(flags or Flags(0)),
                            proxy_external_address=proxy_external_address,
                            filter=session_filter, context=context, data_filter=data_filter)
        return Action(self, int(result["action"]))

    def redirect_connections(self, session: int, targets: list[tuple[str, int]], *,
                             protocol_guid: str, protocol: str = "tcp", flags: Flags | None = None,
                             proxy_external_address: str | None = None,
                             session_filter: int | None = None, context: Any = None,
                             data_filter: str | None = None) -> tuple[tuple[str, int], list[Action]]:
        """RedirectConnections: (InternalAddress, one action per target, in order); port
        InternalAddress + i leads to ``targets[i]``."""
        result = self._call("redirect_connections", session=session,
                            addresses=[list(target) for target in targets], protocol=protocol,
                            protocol_guid=protocol_guid, flags=flag_names(flags or Flags(0)),
                            proxy_external_address=proxy_external_address,
                            filter=session_filter, context=context, data_filter=data_filter)
        address, port = result["internal_address"]
        return (str(address), int(port)), [Action(self, int(a["action"])) for a in result["actions"]]

    def bind_for_client(self, session: int, client_port: int, *, protocol: str = "tcp",
                        from_fw: bool = False) -> tuple[str, int]:
        """A SecureNAT client's port made a bind: the address a peer is to use."""
        result = self._call("bind_for_client", session=session, protocol=protocol,
                            client_port=client_port, from_fw=from_fw)
        address, port = result["address"]
        return str(address), int(port)

    def retroactive_allow_bind(self, session: int, address: tuple[str, int], *, protocol_guid: str,
                               protocol: str = "tcp", flags: Flags | None = None,
                               ipfilter: list[tuple[str, str]] | None = None) -> bool:
        """RetroactiveAllowBind for the peers in ``ipfilter``'s inclusive ranges (None: any
        peer): True for S_OK, False for S_FALSE (approved before)."""
        result = self._call("retroactive_allow_bind", session=session, protocol=protocol,
                            address=address[0], port=address[1], protocol_guid=protocol_guid,
                            flags=flag_names(flags or Flags(0)),
                            ipfilter=None if ipfilter is None else wire_ipfilter(ipfilter))
        if result["result"] not in ("S_OK", "S_FALSE"):
            raise ControlError(f"retroactive_allow_bind answered {result['result']!r}, "
                               "neither S_OK nor S_FALSE")
        return bool(result["result"] == "S_OK")

    def binds(self, session: int | None = None) -> list[dict[str, Any]]:
        """The binds of ``session`` (None: of every session)."""
        return list(self._call("binds", session=session))

    def register_filter(self, name: str) -> int:
        """A session filter whose events come to this connection (``next_event``)."""
        return int(self.call("register_filter", name=name)["filter"])

    def register_connect_events(self, filter_id: int, protocol: str, ports: tuple[int, int]) -> None:
        """``connect`` events to ``filter_id`` for connections admitted to ``ports``."""
        self.call("register_connect_events", filter=filter_id, protocol=protocol, ports=list(ports))


class Action:
    """A FirewallAction: the handle a grant returned."""

    def __init__(self, api: SessionCalls, action_id: int) -> None:
        self.api = api
        self.id = action_id

    def info(self) -> dict[str, Any]:
        """What the firewall says of it (``state``, ``expires``, ...)."""
        return dict(self.api.call("action", action=self.id))

    @property
    def state(self) -> str:
        """pending, consumed, expired or cancelled."""
        return str(self.info()["state"])

    def cancel(self) -> None:
        """Cancel: no new matches (Terminating if it is pending no more)."""
        self.api.call("cancel", action=self.id)


class ControlClient(SessionCalls):
    """The session API over the enforcer's control socket at ``path``: one connection,
    made at the first call. ``timeout``: how long a reply (and a connect to a busy
    socket) may take."""

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._pending = b""
        self._events: deque[dict[str, Any]] = deque()

    def call(self, method: str, **params: Any) -> Any:
        """The result of ``method``; an error reply raises the class its code names."""
        request_id = next(self._ids)
        request = {"id": request_id, "method": method, "params": params}
        reply = self.raw(json.dumps(request).encode() + b"\n")
        if reply.get("id") != request_id:
            raise ControlError(f"{method}: the reply is to request {reply.get('id')!r}, "
                               f"not {request_id}: {reply}")
        if "error" in reply:
            raise _error(method, reply["error"])
        if "result" not in reply:
            raise ControlError(f"{method}: a reply with neither result nor error: {reply}")
        return reply["result"]

    def raw(self, data: bytes) -> dict[str, Any]:
        sock = self._connection()
        sock.settimeout(self.timeout)  # a wait for an event may have left a shorter one
        try:
            sock.sendall(data)
        except OSError as exc:
            self.close()
            raise ControlError(f"sending to the control socket {self.path}: {exc}") from None
        while True:
            message = self._message(self.timeout)
            if message is None:
                raise ControlError(f"no reply from the control socket {self.path} within "
                                   f"{self.timeout} s")
            if not _is_event(message):
                return message
            self._events.append(message)

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        if self._events:
            return self._events.popleft()
        message = self._message(timeout)
        if message is not None and not _is_event(message):
            raise ControlError(f"a reply to no request on the control socket {self.path}: {message}")
        return message

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._pending = b""

    def __enter__(self) -> ControlClient:
        return self

    def _connection(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except BlockingIOError:  # its listen backlog is full: busy, not gone
                sock.close()
                if time.monotonic() > deadline:
                    raise ControlError(f"the control socket {self.path} accepted no connection "
                                       f"within {self.timeout} s") from None
                time.sleep(0.01)
                continue
            except OSError as exc:
                sock.close()
                raise ControlError(f"cannot connect to the control socket {self.path}: "
                                   f"{exc.strerror or exc}") from None
            self._sock = sock
            return sock

    def _message(self, timeout: float) -> dict[str, Any] | None:
        """The next line as a JSON object, or None if none is complete within ``timeout``."""
        sock = self._connection()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return None
            except OSError as exc:
                self.close()
                raise ControlError(f"reading the control socket {self.path}: {exc}") from None
            if not chunk:
                self.close()
                raise ControlError(f"the enforcer closed the control connection {self.path}")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise ControlError(f"a line that is not JSON on the control socket: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise ControlError(f"a line that is not a JSON object on the control socket: {line[:200]!r}")
        return message


def _is_event(message: dict[str, Any]) -> bool:
    return "event" in message and "id" not in message


def _error(method: str, error: Any) -> Exception:
    """The exception an error reply stands for: the class of the code it names, whose
    HRESULT it must carry too (SPEC.md: both are shown)."""
    if not isinstance(error, dict) or not isinstance(error.get("name"), str):
        return ControlError(f"{method}: an error reply that names no result code: {error}")
    cls = ERRORS.get(error["name"], SessionApiError)
    if cls.hresult is not None and _hresult(error.get("hresult")) != cls.hresult:
        return ControlError(f"{method}: the error {cls.name} came with HRESULT "
                            f"{error.get('hresult')!r}, not 0x{cls.hresult:08X}: {error}")
    return cls(str(error.get("message", "")), error["name"])


def _hresult(value: Any) -> int | None:
    """An HRESULT as the reply writes it (README: "0x80070057")."""
    try:
        return int(value, 16) if isinstance(value, str) else None
    except ValueError:
        return None
