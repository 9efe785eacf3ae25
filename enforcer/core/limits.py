"""Caps on everything a client or a peer can make the enforcer hold (SPEC rule 16).

A pure value: the config fills it from ``[limits]``; the core and the shells read
it. At a cap the new request is refused (FWX_E_IS_BUSY, a SOCKS failure reply, or
a drop) and counted; what is already held is never evicted for it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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
    # Every forwarded flow of a client address the kernel tracks (kernel and user mode),
    # enforced in the kernel before the queue
    flows_per_client: int = 4096
    # New flows a client address may start per second before the queue (0: no limit); a
    # burst of a tenth of that is let through at once
    new_flows_per_second: int = 500
    # Bytes held for filtered streams (output kept for retransmission, held-back lines)
    buffered_bytes_total: int = 64 * MIB
    buffered_bytes_per_client: int = 8 * MIB

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# The lowest value of each key (new_flows_per_second may be 0: no limit)
MINIMUM = {f.name: (0 if f.name == "new_flows_per_second" else 1) for f in fields(Limits)}
