"""Caps on everything a client or a peer can make the enforcer hold (SPEC rule 16).

A pure value: the config fills it from ``[limits]``; the core and the shells read
it. At a cap the new request is refused (FWX_E_IS_BUSY, a SOCKS failure reply, or
a drop) and counted; what is already held is never evicted for it.

``Quota`` keeps the use of one kind of state against its two caps (in total and
per client address); ``memory_bound`` is the memory the caps imply.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, fields

from enforcer.core.packet import IPAddress
from enforcer.core.results import IsBusy

KIB = 1 << 10
MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    # Sessions. A SecureNAT client has one (its IP); a Firewall client one per user.
    sessions_total: int = 65536
    sessions_per_client: int = 16
    session_idle_timeout: float = 900.0  # an idle SecureNAT session ends after this (seconds)
    # Pending permissions (beside [defaults] max_pending_per_session)
    pending_total: int = 65536
    pending_per_client: int = 4096
    # Open binds (BindForClient, SOCKS BIND and UDP ASSOCIATE); closed ones are forgotten
    binds_total: int = 4096
    binds_per_client: int = 64
    # User-mode flows: the enforcer holds their state (filters, translation, counters)
    user_flows_total: int = 65536
    user_flows_per_client: int = 1024
    # Kernel-mode flows the enforcer remembers (the flows listing, events, a UDP flow's
    # later datagrams); the oldest is forgotten first, and nothing is refused for it
    flow_history: int = 16384
    # Every forwarded flow of a client address the kernel tracks (kernel and user mode),
    # enforced in the kernel before the queue
    flows_per_client: int = 4096
    # New flows a client address may start per second before the queue (0: no limit); a
    # burst of a tenth of that is let through at once
    new_flows_per_second: int = 500
    # Bytes held for filtered streams (output kept for retransmission, held-back lines)
    buffered_bytes_total: int = 64 * MIB
    buffered_bytes_per_client: int = 8 * MIB
    # Firewall clients' SOCKS connections (every one, from accept on, before
    # authentication too); at a cap a new connection is closed at once
    socks_connections_total: int = 1024
    socks_connections_per_client: int = 256
    # How long a SOCKS connection may take to send its request (greeting, login, request;
    # seconds): a slow or idle one is closed
    socks_handshake_timeout: float = 10.0
    # How long a SOCKS BIND waits for its peer (seconds): then it fails (reply 6)
    socks_bind_timeout: float = 60.0
    # Bytes a SOCKS connection holds in each direction: what its client sends before the
    # relay starts (then the client is no longer read), and what waits for a slow side
    socks_buffer_bytes: int = 64 * KIB
    # Targets one UDP ASSOCIATE sends to (each admitted once); at the cap a datagram to
    # a new one is dropped
    socks_udp_targets: int = 64

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# The lowest value of each key (new_flows_per_second may be 0: no limit)
MINIMUM = {f.name: (0 if f.name == "new_flows_per_second" else 1) for f in fields(Limits)}
# The highest of a count (the kernel holds flows_per_client and a rate's burst in 32 bits)
# and of a time (seconds; a kernel grant's timeout is made of a permission's)
MAXIMUM_COUNT = 2**32 - 1
MAXIMUM_SECONDS = 365 * 86400.0
# How many clients status lists beside a per-client cap's highest use
TOP_CLIENTS = 3


class Quota:
    """The use of one kind of state (``kind``: sessions, pending, binds, user_flows,
    socks_connections) against its caps ``<kind>_total`` and ``<kind>_per_client`` of
    Limits.

    Refusals are counted in ``counters`` as ``refused: <cap>``, so that they show
    with the engine's other counters.
    """

    def __init__(self, kind: str, limits: Limits, counters: Counter[str]) -> None:
        self.kind = kind
        self.total_cap: int = getattr(limits, f"{kind}_total")
        self.client_cap: int = getattr(limits, f"{kind}_per_client")
        self.counters = counters
        self.used = 0
        self.by_client: dict[IPAddress, int] = {}

    def fits(self, client: IPAddress, count: int = 1) -> bool:
        return self.used + count <= self.total_cap and \
            self.by_client.get(client, 0) + count <= self.client_cap

    def refuse(self, client: IPAddress, count: int = 1) -> str:
        """Count a refusal (on the cap that is in the way) and say why."""
        held = self.by_client.get(client, 0)
        if held + count > self.client_cap:
            name, cap, why = f"{self.kind}_per_client", self.client_cap, f"{client} holds {held}"
        else:
            name, cap, why = f"{self.kind}_total", self.total_cap, f"{self.used} are held"
        self.counters[f"refused: {name}"] += 1
        return f"the {name} cap ({cap}) is reached: {why}"

    def check(self, client: IPAddress, count: int = 1) -> None:
        """Raise IsBusy (counted) unless ``count`` more fit."""
        if not self.fits(client, count):
            raise IsBusy(self.refuse(client, count))

    def take(self, client: IPAddress, count: int = 1) -> None:
        self.used += count
        self.by_client[client] = self.by_client.get(client, 0) + count

    def release(self, client: IPAddress, count: int = 1) -> None:
        self.used -= count
        left = self.by_client[client] - count
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]

    def status(self) -> dict[str, dict[str, object]]:
        """Both caps, their use (per client: the highest, and the top clients) and
        their refusals. Looks at every client: for the status call, not a packet."""
        top = heapq.nlargest(TOP_CLIENTS, self.by_client.items(), key=lambda item: item[1])
        return {
            f"{self.kind}_total": {"cap": self.total_cap, "used": self.used,
                                   "refused": self.counters[f"refused: {self.kind}_total"]},
            f"{self.kind}_per_client": {
                "cap": self.client_cap, "highest": top[0][1] if top else 0,
                "top": [[str(client), used] for client, used in top],
                "refused": self.counters[f"refused: {self.kind}_per_client"]},
        }
