"""What the core asks the shell to do: kernel state to add or remove, events to send.

Every entry point of the engine (a queued packet, a session API call, the timer) adds
to one list, in order; the shell applies a call's before its answer, and a packet's
around its verdict: what a later packet depends on before the verdict leaves, the rest
after (``BEFORE_VERDICT``). Plain values: a unit test reads them as the shell would.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from enforcer.core.binds import Bind
from enforcer.core.flows import FlowRecord
from enforcer.core.packet import PROTOCOL_NAMES, Endpoint, FlowKey, IPAddress
from enforcer.core.permissions import Permission


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


class AddRedirect(NamedTuple):
    """A kernel-mode redirect was granted: the kernel is to translate its connections (NAT
    map elements) before the grant's call returns. If it cannot, the grant is withdrawn."""

    permission: Permission


class RemoveRedirect(NamedTuple):
    """A kernel-mode redirect admits nothing more: its kernel translation goes."""

    permission: Permission


class KernelGrant(NamedTuple):
    """A single-use kernel-mode AllowFutureConnect grant that the kernel holds: a new flow
    from the permission's client to ``target``:``port`` by ``protocol`` is admitted there,
    with ``mark``, by its first packet, which uses it up; the enforcer hears of it after
    (``Engine.kernel_admitted``) and does for the flow what it does for one it admits."""

    permission: Permission
    protocol: int
    target: IPAddress
    port: int
    mark: int


class AddKernelGrant(NamedTuple):
    """The kernel is to hold a grant before the grant's call returns. If it cannot, the
    grant stays the enforcer's to match (``Engine.keep_grant``): nothing fails."""

    grant: KernelGrant


class RemoveKernelGrant(NamedTuple):
    """A grant the kernel held has ended (used, expired, cancelled): it goes from the
    kernel (what is left of it: a used grant's mark)."""

    grant: KernelGrant


class MapBind(NamedTuple):
    """A new translated SecureNAT bind: the kernel is to send its flow to the client. If it
    cannot, the bind is withdrawn."""

    bind: Bind


class UnmapBind(NamedTuple):
    """A translated SecureNAT bind closed: its kernel translation goes."""

    bind: Bind


class ForgetBindFlows(NamedTuple):
    """A Firewall client's UDP bind closed: the kernel forgets the flows it admitted (they
    must not reach the port's next bind)."""

    bind: Bind


class GrowReceiveBuffer(NamedTuple):
    """INCREASE_RECEIVE_BUFFER: the buffers this grant's or bind's datagrams wait in grow;
    the shell writes the size they have into its ``receive_buffer``."""

    holder: Permission | Bind


class HandOver(NamedTuple):
    """A user-mode flow just admitted runs in worker process ``worker`` (its mark sends
    its later packets to that worker's queue): the worker is to hold a copy of its record
    before the verdict leaves, so that it knows the flow's next packet."""

    record: FlowRecord
    worker: int


class LetGo(NamedTuple):
    """A flow a worker holds was let go (conntrack has forgotten it, or a new flow took
    its key): the worker forgets it too (the record of that admission: a new flow with
    the key may be there already)."""

    key: FlowKey
    admitted_at: float
    worker: int


Event = EstablishedConnection | ConnectEvent
# What a later packet may depend on (kernel state to add): applied before the verdict
# leaves, as a grant's call returns only once it is in place. The rest (removals, events)
# waits for the verdict: a SecureNAT bind's NAT is removed as its flow's first packet is
# admitted, and that packet must still be translated on its way out.
BEFORE_VERDICT = (AddRedirect, AddKernelGrant, MapBind, GrowReceiveBuffer, HandOver)

Effect = (AddRedirect | RemoveRedirect | AddKernelGrant | RemoveKernelGrant | MapBind | UnmapBind
          | ForgetBindFlows | GrowReceiveBuffer | HandOver | LetGo | EstablishedConnection
          | ConnectEvent)
