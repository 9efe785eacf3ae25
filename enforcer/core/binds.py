"""Binds a Firewall client made through the fw (BindForClient), and their approval.

A bind always succeeds: the client gets the fw's external address and port at
once. Until RetroactiveAllowBind approves it, whatever arrives for that address
is discarded silently; once approved, only peers its IpFilter includes (all of
them with no filter) get through. A TCP bind takes one connection (SOCKS BIND),
then it is done; a UDP bind lasts as long as its session's association.

A SecureNAT client has no agent to bind for it; an application filter binds
for it instead (active FTP, a TFTP server's reply): such a bind leads to a port
of the client's own (``client``, ``client_port``). Its address is the client's
in the routed topology, and an external address of the fw in NAT, which the
kernel then translates to the client. Where the client sees only the fw (its
filter's primary came by a redirect), the bind's flow reaches it from the fw's
address on its network (``source``), the kernel translating that too. It
takes one flow, TCP or UDP, and expires if nothing has come by ``expires``.

Open binds are capped in total and per client address (``Limits``): at a cap a
new bind is refused (IsBusy). A closed bind is remembered for a while only, so
that a late RetroactiveAllowBind still gets FWX_E_TERMINATING: the table keeps
the last ``binds_total`` closed ones (older ones, and those of an ended session,
are forgotten: NOT_FOUND).
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from enforcer.core.flags import Flags, flag_names
from enforcer.core.ipfilter import IpFilter
from enforcer.core.limits import Limits, Quota
from enforcer.core.packet import PROTOCOL_NAMES, IPAddress

# How long a peer that sent to a BIDIRECTIONAL UDP bind may be answered
RECENT_SENDER_SECONDS = 120.0
# How many such peers a bind remembers (the least recent is forgotten first)
RECENT_SENDERS = 16
# The external ports binds get (below Linux's ephemeral ports, above the well-known)
DEFAULT_BIND_PORTS = (20000, 29999)


class BindState(enum.Enum):
    PENDING = "pending"      # bound, not approved: inbound traffic is discarded
    ALLOWED = "allowed"      # approved by RetroactiveAllowBind
    CLOSED = "closed"        # its connection came (TCP) or its session ended


@dataclass(slots=True, eq=False)
class Bind:
    id: int
    session_id: int
    protocol: int
    address: IPAddress  # the fw's external address the client was given
    port: int
    created: float
    owner: IPAddress  # the client address whose binds_per_client it counts against
    state: BindState = BindState.PENDING
    flags: Flags = field(default_factory=lambda: Flags(0))
    ipfilter: IpFilter | None = None  # None: any peer
    protocol_name: str | None = None
    admitted: int = 0
    discarded: int = 0
    receive_buffer: int | None = None  # set by the shell: the bound socket's, in bytes
    recent: OrderedDict[tuple[IPAddress, int], float] = field(default_factory=OrderedDict)
    # A SecureNAT client's bind: the client's own address and port it leads to
    client: IPAddress | None = None
    client_port: int | None = None
    expires: float | None = None
    pooled: bool = True  # its port came from the bind pool
    # A SecureNAT bind whose flow reaches the client from the fw: the fw's address it then
    # comes from (None: from the peer's own)
    source: IPAddress | None = None

    @property
    def for_securenat(self) -> bool:
        return self.client_port is not None

    @property
    def translated(self) -> bool:
        """A SecureNAT bind whose flow the kernel translates: to the client (its address is
        the fw's, in NAT), or from the fw (``source``)."""
        return self.for_securenat and (self.address != self.client or self.source is not None)

    def admits(self, peer: IPAddress) -> bool:
        return self.state is BindState.ALLOWED and (self.ipfilter is None or self.ipfilter.is_included(peer))

    def heard(self, peer: IPAddress, port: int, now: float) -> None:
        """A datagram from ``peer`` reached the bind (remembered for ``may_answer``)."""
        self.recent[(peer, port)] = now
        self.recent.move_to_end((peer, port))
        if len(self.recent) > RECENT_SENDERS:
            self.recent.popitem(last=False)

    def may_answer(self, peer: IPAddress, port: int, now: float) -> bool:
        """A UDP bind with BIDIRECTIONAL may send back to a peer that sent to it lately."""
        seen = self.recent.get((peer, port))
        return Flags.BIDIRECTIONAL in self.flags and seen is not None and now - seen <= RECENT_SENDER_SECONDS

    def to_dict(self) -> dict[str, Any]:
        return {"bind": self.id, "session": self.session_id,
                "protocol": PROTOCOL_NAMES.get(self.protocol, str(self.protocol)),
                "address": [str(self.address), self.port], "state": self.state.value,
                "flags": flag_names(self.flags), "protocol_name": self.protocol_name,
                "ipfilter": None if self.ipfilter is None else self.ipfilter.to_dict(),
                "admitted": self.admitted, "discarded": self.discarded,
                "receive_buffer": self.receive_buffer, "created": self.created,
                "leads_to": None if self.client is None else [str(self.client), self.client_port],
                "source": None if self.source is None else str(self.source),
                "expires": self.expires}


class BindTable:
    def __init__(self, limits: Limits | None = None, counters: Counter[str] | None = None) -> None:
        limits = limits or Limits()
        self.quota = Quota("binds", limits, counters if counters is not None else Counter())
        self.closed_cap = limits.binds_total  # closed binds remembered
        # of them a session's, so that one client's do not push out everyone else's (and
        # what lists a session's binds stays short)
        self.closed_per_session = limits.binds_per_client
        self._by_address: dict[tuple[int, IPAddress, int], Bind] = {}
        self._by_session: dict[int, dict[int, Bind]] = {}
        # SecureNAT binds by what they lead to: (protocol, client, client port)
        self._by_client: dict[tuple[int, IPAddress, int], Bind] = {}
        self._closed: OrderedDict[int, Bind] = OrderedDict()  # oldest first
        self._ids = itertools.count(1)

    def check(self, owner: IPAddress) -> None:
        """Raise IsBusy (counted) if ``owner`` may not open one more bind."""
        self.quota.check(owner)

    def add(self, session_id: int, protocol: int, address: IPAddress, port: int, now: float,
            owner: IPAddress, **securenat: Any) -> Bind:
        """A new bind (``check`` it first); ``securenat``: client, client_port, expires,
        pooled and source of a SecureNAT client's bind."""
        key = (protocol, address, port)
        if key in self._by_address:
            raise ValueError(f"{PROTOCOL_NAMES[protocol]} {address}:{port} is bound already")
        bind = Bind(next(self._ids), session_id, protocol, address, port, now, owner, **securenat)
        self.quota.take(owner)
        self._by_address[key] = bind
        self._by_session.setdefault(session_id, {})[bind.id] = bind
        if bind.client is not None and bind.client_port is not None:
            self._by_client[(protocol, bind.client, bind.client_port)] = bind
        return bind

    def leading_to(self, protocol: int, client: IPAddress, port: int) -> Bind | None:
        """The open SecureNAT bind that leads to this client's port, if any."""
        return self._by_client.get((protocol, client, port))

    def at(self, protocol: int, address: IPAddress, port: int) -> Bind | None:
        """The open bind on this address and port, if any."""
        return self._by_address.get((protocol, address, port))

    def of_session(self, session_id: int, protocol: int, address: IPAddress | None,
                   port: int) -> Bind | None:
        """The session's bind on ``port`` (and ``address``; None: any address): an open one
        if there is one (a port can serve a closed bind and then a new one)."""
        found = [b for b in self._by_session.get(session_id, {}).values()
                 if b.protocol == protocol and b.port == port and (address is None or b.address == address)]
        return next((b for b in found if b.state is not BindState.CLOSED), found[-1] if found else None)

    def close(self, bind: Bind) -> None:
        """Done: nothing more gets through. It stays listed under its session while it is
        among the last ``closed_cap`` closed, and the last ``closed_per_session`` of its
        session's, so that a late RetroactiveAllowBind is FWX_E_TERMINATING."""
        if bind.state is BindState.CLOSED:
            return
        bind.state = BindState.CLOSED
        if self._by_address.get((bind.protocol, bind.address, bind.port)) is bind:
            del self._by_address[(bind.protocol, bind.address, bind.port)]
        if bind.client is not None and bind.client_port is not None and \
                self._by_client.get((bind.protocol, bind.client, bind.client_port)) is bind:
            del self._by_client[(bind.protocol, bind.client, bind.client_port)]
        self.quota.release(bind.owner)
        bind.recent.clear()  # nothing is answered through a closed bind
        self._closed[bind.id] = bind
        binds = self._by_session.get(bind.session_id, {})
        if bind.id in binds:  # last of its session's: they are listed in the order they closed
            binds[bind.id] = binds.pop(bind.id)
        mine = [b for b in binds.values() if b.state is BindState.CLOSED]
        if len(mine) > self.closed_per_session:
            del self._closed[mine[0].id]
            self._forget(mine[0])
        while len(self._closed) > self.closed_cap:
            self._forget(self._closed.popitem(last=False)[1])

    def _forget(self, bind: Bind) -> None:
        binds = self._by_session.get(bind.session_id)
        if binds is not None:
            binds.pop(bind.id, None)
            if not binds:
                del self._by_session[bind.session_id]

    def end_session(self, session_id: int) -> list[Bind]:
        """Close the session's binds, and forget them."""
        binds = list(self._by_session.pop(session_id, {}).values())
        for bind in binds:
            self.close(bind)
            self._closed.pop(bind.id, None)
        return binds

    def of(self, session_id: int | None) -> list[Bind]:
        if session_id is not None:
            return list(self._by_session.get(session_id, {}).values())
        return [b for binds in self._by_session.values() for b in binds.values()]

    @property
    def closed_count(self) -> int:
        return len(self._closed)

    def __len__(self) -> int:
        return len(self._by_address)
