"""The mark bits this enforcer owns, on packets (a verdict's) and on conntrack entries:
how the core says what the kernel is to do with a flow, and how the rules it renders
(``enforcer.dataplane``) read it back. Pure values and functions."""

from __future__ import annotations

MARK_MODE = 0x30000000     # how an admitted flow runs
MARK_KERNEL = 0x10000000   #   in kernel mode: the kernel forwards the rest of it
MARK_USER = 0x20000000     #   in user mode: every packet is queued to the enforcer
MARK_ONE_WAY = 0x40000000  # replies (target -> client) are not admitted
MARK_SNAT = 0x0F000000     # 1 + index of the external address a flow leaves from (0: none)
MARK_SNAT_SHIFT = 24
# The worker process that reads a user-mode flow's packets (1-15: its queue is the main
# queue's number plus this; 0: the main process, on the main queue)
MARK_WORKER = 0x000F0000
MARK_WORKER_SHIFT = 16
MAX_WORKERS = MARK_WORKER >> MARK_WORKER_SHIFT
MARK_MASK = MARK_MODE | MARK_ONE_WAY | MARK_SNAT | MARK_WORKER  # what the connmark keeps (forwarded flows)
# Packet-only bits:
MARK_REWRITTEN = 0x80000000  # the enforcer redirected this packet before routing: let it pass
MARK_PORT = 0x0000FFFF       # a kernel-mode redirect rule's port, on a flow's first packet
# A flow to a Firewall client's UDP bind (a socket of the fw): its connmark is
# MARK_KERNEL | MARK_LOCAL | the bind's port, so that the kernel hands its datagrams
# to the socket and a closed bind's flows can be forgotten by that mark alone.
MARK_LOCAL = 0x00800000
MARK_LOCAL_KEPT = MARK_MODE | MARK_LOCAL | MARK_PORT  # what the connmark keeps of such a flow
# A new flow's packet while this enforcer runs: the kernel's grants (single-use
# permissions it matches itself) admit only packets with this bit, which a table that
# lives only as long as the enforcer's process sets (``enforcer.dataplane.LiveTable``):
# a crashed or killed enforcer's grants admit nothing (rule 15).
MARK_LIVE = 0x00400000
MARK_OWNED = MARK_MASK | MARK_REWRITTEN | MARK_PORT | MARK_LOCAL | MARK_LIVE
MAX_EXTERNAL_ADDRESSES = MARK_SNAT >> MARK_SNAT_SHIFT


def mark_for(user_mode: bool, one_way: bool, snat: int | None) -> int:
    """The mark an admitting verdict sets (pure)."""
    return ((MARK_USER if user_mode else MARK_KERNEL) | (MARK_ONE_WAY if one_way else 0)
            | (0 if snat is None else ((snat + 1) << MARK_SNAT_SHIFT) & MARK_SNAT))


def worker_mark(worker: int) -> int:
    """The bits that send a user-mode flow's packets to worker ``worker``'s queue (pure)."""
    return (worker << MARK_WORKER_SHIFT) & MARK_WORKER


def local_mark(port: int) -> int:
    """The mark admitting a flow to a Firewall client's UDP bind on ``port`` (pure)."""
    return MARK_KERNEL | MARK_LOCAL | (port & MARK_PORT)


def redirect_port(mark: int) -> int | None:
    """The redirect port a kernel-mode redirect rule marked a flow's first packet with."""
    return (mark & MARK_PORT) or None


def is_user_mode(mark: int) -> bool:
    """Whether a queued packet's mark (restored from its flow) says user mode."""
    return mark & MARK_MODE == MARK_USER
