"""Application filters: the plugin interface.

An application filter watches the *primary* connections of one protocol (an FTP
control connection, a TFTP request) and opens their secondary connections with
the session API, as a third-party filter would: it gets no other access to the
enforcer. A plugin is an object with

- ``name``: what the config's ``[filters] enable`` list calls it;
- ``protocol_guid``: the GUID of the protocol whose primaries it watches (a
  ``[[protocol]]`` of the config must have it);
- ``attach(primary, api) -> StreamFilter``: called for each primary connection
  of that protocol when its first data arrives.

A grant may also attach a filter to the connection it admits: ``data_filter``
may name an application filter as well as a configured data filter. A control
connection published through the fw (``redirect_connections`` with
``data_filter="ftp"``) is watched that way, and the filter is told the address
the client connected to (``Primary.via``).

The ``StreamFilter`` it returns sees the connection's data (``on_data``): for
TCP the byte stream in segments, each byte once and in order, and what it
returns is sent instead (it may change lengths and may hold bytes back until a
line is complete; the enforcer keeps sequence numbers right); for UDP each
datagram. A primary that has a filter runs in user mode. A Firewall client's
primaries (relayed by the SOCKS service) are shown to the filter the same way.

``api`` has the methods of ``enforcer.client.Client`` (``allow_future_connect``,
``redirect_connections``, ``bind_for_client``, ``retroactive_allow_bind``,
``binds``, ...), served in the enforcer's process: calls return at once and raise
the same ``SessionApiError`` subclasses. Events for a session filter registered
through it (``register_filter``) collect in ``api.events``. A filter's exception is logged
once, and its connection ends (SPEC rule 18): the data it failed on and every later
packet of the connection are dropped, never passed unfiltered.

A filter opens no secondary connection to a privileged port (below
``FIRST_UNPRIVILEGED_PORT``; SPEC rule 14). In NAT the session API refuses a
bind on such a port of the fw, or on one the fw listens on, whatever the filter
checked; a grant whose target is the fw's own address is refused everywhere.

Plugins are found through the ``pinhole.filters`` entry point group: a package
declares, in its pyproject.toml,

    [project.entry-points."pinhole.filters"]
    ftp = "mypackage.ftp:FtpFilter"

where the target is the plugin object or a class that makes it (called with no
arguments). ``enforcer.plugins.ftp`` and ``enforcer.plugins.tftp`` are examples.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import deque
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from enforcer.client import EVENTS_KEPT, SessionCalls
from enforcer.control import Caller, Handler
from enforcer.core.datafilter import Direction
from enforcer.core.fwports import FIRST_UNPRIVILEGED_PORT
from enforcer.core.results import InvalidArgument

ENTRY_POINT_GROUP = "pinhole.filters"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
log = logging.getLogger("pinhole.filters")


@dataclass(frozen=True)
class Primary:
    """A primary connection, as its filter is told about it."""

    session: int
    protocol: str  # "tcp" or "udp"
    client: tuple[IPAddress, int]  # the client's address and port
    server: tuple[IPAddress, int]  # the server's address and port
    translated: bool  # the server sees the fw's external address, not the client's
    firewall_client: bool  # a Firewall client's connection (SOCKS), not a SecureNAT one
    # The fw's address and port the client connected to, when the fw redirected the
    # connection to the server (RedirectConnections): the client sees only the fw.
    via: tuple[IPAddress, int] | None = None


class StreamFilter(Protocol):
    def on_data(self, direction: Direction, data: bytes) -> bytes: ...


class AppFilter(Protocol):
    name: str
    protocol_guid: str

    def attach(self, primary: Primary, api: SessionCalls) -> StreamFilter: ...


class LocalCaller(Caller):
    """The in-process caller of the session API: events pushed to it are kept."""

    def __init__(self) -> None:  # no control connection behind it
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)

    def push(self, message: dict[str, Any]) -> None:
        self.events.append(message)


class InProcessCalls(SessionCalls):
    """The session API in the enforcer's process: the control socket's handlers,
    called directly."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.handlers = handlers
        self.caller = LocalCaller()

    @property
    def events(self) -> deque[dict[str, Any]]:
        """Events pushed to the session filters registered through this API, oldest first."""
        return self.caller.events

    def call(self, method: str, **params: Any) -> Any:
        handler = self.handlers.get(method)
        if handler is None:
            raise InvalidArgument(f"no method {method!r}")
        return handler({k: v for k, v in params.items() if v is not None}, self.caller)


class PluginError(Exception):
    """A plugin named in the config cannot be used; the message says why."""


def installed() -> dict[str, str]:
    """The plugins installed: name -> entry point target."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load(names: list[str]) -> dict[str, AppFilter]:
    """The plugins ``names`` (the config's ``[filters] enable``), loaded."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    plugins: dict[str, AppFilter] = {}
    for name in names:
        if name not in found:
            known = ", ".join(sorted(found)) or "none is installed"
            raise PluginError(f"no application filter '{name}' is installed ({known})")
        try:
            target = found[name].load()
            plugin = target() if isinstance(target, type) else target
        except Exception as exc:  # a third party's import or constructor failed
            raise PluginError(f"application filter '{name}' ({found[name].value}) cannot be "
                              f"loaded: {exc}") from None
        for attribute in ("protocol_guid", "attach"):
            if not hasattr(plugin, attribute):
                raise PluginError(f"application filter '{name}' ({found[name].value}) has no "
                                  f"'{attribute}'")
        plugins[name] = plugin
    return plugins


__all__ = ["ENTRY_POINT_GROUP", "FIRST_UNPRIVILEGED_PORT", "AppFilter", "Direction",
           "InProcessCalls", "Primary", "SessionCalls", "StreamFilter", "installed", "load"]
