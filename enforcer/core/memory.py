"""The memory the caps imply: an upper bound on what the enforcer holds (SPEC rule 16).

A base figure (the idle daemon: the interpreter, its modules, the sockets) plus,
for each kind of state, its cap times what one item takes at most. The per-item
sizes are measured with tracemalloc in ``tests/unit/test_memory.py``, which
fails if one is exceeded (or overstated by much), so the figures stay honest as
the code changes. Each item is measured at its largest: its own client address
(nothing shared with another item), a Firewall client's longest user name, a
UDP bind's full list of recent senders, a user-mode flow with a stream editor
and the largest application filter pinhole ships (FTP). Bytes a stream holds
for retransmission or as a held-back line count against ``buffered_bytes_*``
(overheads included), not here. A SOCKS connection is measured at its largest (a
UDP ASSOCIATE, or a BIND's relay) with the session and bind it makes the engine hold
(counted under those too: the bound errs high), and counts its buffers
(``socks_buffer_bytes`` each way) and a full table of UDP targets.
"""

from __future__ import annotations

from enforcer.core.limits import MIB, Limits
from enforcer.core.packet import ADDRESS_CACHE_SIZE
from enforcer.core.permissions import STALE_EXPIRIES
from enforcer.core.state import POLICY_MEMO, RECENT_DECISIONS

# The idle daemon's resident set (measured: about 60 MiB after its imports), with room
BASE_BYTES = 96 * MIB

# Bytes one item of each kind takes at most (tests/unit/test_memory.py measures them)
ITEM_BYTES = {
    "session": 900,
    "pending": 1250,  # with its expiry entry and one stale one (a sweep keeps no more), and
    # its record of the grant the kernel holds (KernelGrant, indexed by key)
    "finished_action": 450,
    "bind": 6400,  # a UDP bind with RECENT_SENDERS recent senders
    "closed_bind": 1800,
    "user_flow": 3600,  # record, index, stream editor, FTP filter state
    "flow_history": 1250,
    "decision": 600,
    "address": 330,  # packet's cache of address objects (each with its text once made)
    "policy_answer": 480,  # one of the engine's remembered policy answers (POLICY_MEMO of 4 kinds)
    "expiry": 120,  # one stale permission expiry entry
    "socks_connection": 5600,  # its sockets, state, session and bind; buffers apart
    "socks_udp_target": 300,  # one target of a UDP ASSOCIATE
}


def memory_bound(limits: Limits) -> dict[str, int]:
    """The memory (bytes) the caps imply, by part, and its ``total``."""
    parts = {
        "base": BASE_BYTES,
        "caches": RECENT_DECISIONS * ITEM_BYTES["decision"] + ADDRESS_CACHE_SIZE * ITEM_BYTES["address"]
        + STALE_EXPIRIES * ITEM_BYTES["expiry"] + 4 * POLICY_MEMO * ITEM_BYTES["policy_answer"],
        "sessions": limits.sessions_total * ITEM_BYTES["session"],
        "pending": limits.pending_total * ITEM_BYTES["pending"],
        "finished_actions": limits.pending_total * ITEM_BYTES["finished_action"],
        "binds": limits.binds_total * (ITEM_BYTES["bind"] + ITEM_BYTES["closed_bind"]),
        "user_flows": limits.user_flows_total * ITEM_BYTES["user_flow"],
        "flow_history": limits.flow_history * ITEM_BYTES["flow_history"],
        "buffered_bytes": limits.buffered_bytes_total,
        "socks_connections": limits.socks_connections_total * (
            ITEM_BYTES["socks_connection"] + 2 * limits.socks_buffer_bytes
            + limits.socks_udp_targets * ITEM_BYTES["socks_udp_target"]),
    }
    parts["total"] = sum(parts.values())
    return parts
