"""Data filters on user-mode flows, and the TCP sequence arithmetic they need.

A data filter sees a flow's payload and returns it, changed or not. When a
change alters a segment's length, every later sequence number in that
direction, and every acknowledgement coming back, must be shifted so that
both ends still agree: the same bookkeeping as Linux's nf_conntrack_seqadj
(offset before and after the last correction point), kept here per flow.

Limits of this groundwork: a filter sees segments, not a reassembled stream
(a token split across two segments is seen in two halves), SACK blocks are
not rewritten, and a retransmitted segment is filtered again (so a filter
must give the same output for the same input).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from enforcer.core.packet import FlowKey

MOD = 1 << 32


class Direction(enum.Enum):
    OUT = "out"    # client -> target, the way the flow was opened
    BACK = "back"  # target -> client


class DataFilter(Protocol):
    """Observes, and may change, the payload of one user-mode flow."""

    def on_data(self, direction: Direction, data: bytes) -> bytes: ...


DataFilterFactory = Callable[[FlowKey], DataFilter]


def _after(a: int, b: int) -> bool:
    """Sequence number a comes after b (modulo 2**32, as TCP compares them)."""
    return 0 < (a - b) % MOD < MOD // 2


@dataclass
class SequenceShift:
    """How far one direction's sequence numbers have moved."""

    correction_pos: int | None = None  # original seq of the last length change
    offset_before: int = 0
    offset_after: int = 0

    def offset(self, seq: int) -> int:
        if self.correction_pos is None or not _after(seq, self.correction_pos):
            return self.offset_before
        return self.offset_after

    def record(self, seq: int, delta: int) -> None:
        """A segment starting at original ``seq`` changed length by ``delta``."""
        if self.correction_pos is None or self.offset_before == self.offset_after \
                or _after(seq, self.correction_pos):
            self.correction_pos = seq
            self.offset_before = self.offset_after
            self.offset_after += delta


@dataclass
class TcpStreamEditor:
    """Runs a filter over a TCP flow's segments and keeps sequence numbers consistent."""

    data_filter: DataFilter
    shifts: dict[Direction, SequenceShift] = field(
        default_factory=lambda: {d: SequenceShift() for d in Direction})

    def edit(self, direction: Direction, seq: int, ack: int | None,
             payload: bytes) -> tuple[int, int | None, bytes]:
        """(seq, ack, payload) of a segment as it must leave the firewall."""
        this = self.shifts[direction]
        other = self.shifts[Direction.BACK if direction is Direction.OUT else Direction.OUT]
        new_payload = self.data_filter.on_data(direction, payload) if payload else payload
        new_seq = (seq + this.offset(seq)) % MOD
        new_ack = None
        if ack is not None:
            # The ack counts the other direction's bytes as the receiver saw them:
            # take the other direction's offset back out.
            new_ack = (ack - other.offset((ack - other.offset_before) % MOD)) % MOD
        if len(new_payload) != len(payload):
            this.record(seq, len(new_payload) - len(payload))
        return new_seq, new_ack, new_payload
