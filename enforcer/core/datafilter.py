"""Data filters on user-mode flows, and the TCP sequence arithmetic they need.

A data filter sees a flow's payload and returns it, changed or not. When a
change alters a segment's length, every later sequence number in that
direction, and every acknowledgement coming back, must be shifted so that
both ends still agree: the same bookkeeping as Linux's nf_conntrack_seqadj
(offset before and after the last correction point), kept here per flow.

A filter sees each byte of a direction once, in order: a segment that repeats
bytes it has already seen (a retransmission) is not shown to it again; the
enforcer sends what the filter made of them the first time (a segment's output
is kept until the receiver acknowledges it), or just the new part of a
segment that overlaps old bytes. A filter may hold bytes back (a command
split across segments: it returns nothing until the line is complete); the
sequence numbers follow. Limits: a filter sees segments, not a reassembled
stream, so it keeps its own buffer; segments that arrive out of order are
shown to it as they arrive, and SACK blocks are not rewritten.
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


@dataclass(slots=True)
class _Sent:
    """What left the fw for a segment: kept to be sent again if the segment is."""

    length: int  # the segment's original payload length
    seq: int  # the sequence number it left with
    payload: bytes


MAX_UNACKNOWLEDGED = 4096  # segments kept per direction for retransmissions


@dataclass
class TcpStreamEditor:
    """Runs a filter over a TCP flow's segments and keeps sequence numbers consistent."""

    data_filter: DataFilter
    shifts: dict[Direction, SequenceShift] = field(
        default_factory=lambda: {d: SequenceShift() for d in Direction})
    # per direction: the original sequence number after the last byte the filter saw
    _next: dict[Direction, int] = field(default_factory=dict)
    # per direction, by original sequence number, in order: output not yet acknowledged
    _sent: dict[Direction, dict[int, _Sent]] = field(
        default_factory=lambda: {d: {} for d in Direction})

    def edit(self, direction: Direction, seq: int, ack: int | None,
             payload: bytes) -> tuple[int, int | None, bytes]:
        """(seq, ack, payload) of a segment as it must leave the firewall."""
        this = self.shifts[direction]
        other_direction = Direction.BACK if direction is Direction.OUT else Direction.OUT
        other = self.shifts[other_direction]
        new_ack = None
        if ack is not None:
            self._acknowledged(other_direction, ack)
            # The ack counts the other direction's bytes as the receiver saw them:
            # take the other direction's offset back out.
            new_ack = (ack - other.offset((ack - other.offset_before) % MOD)) % MOD
        if not payload:
            return (seq + this.offset(seq)) % MOD, new_ack, payload
        expected = self._next.get(direction)
        if expected is not None and not _after((seq + len(payload)) % MOD, expected):
            # nothing new: send again what the filter made of it
            sent = self._sent[direction].get(seq)
            if sent is not None and sent.length == len(payload):
                return sent.seq, new_ack, sent.payload
            return (seq + this.offset(seq)) % MOD, new_ack, b""
        if expected is not None and _after(expected, seq):  # partly old: only the new part
            payload = payload[(expected - seq) % MOD:]
            seq = expected
        new_payload = self.data_filter.on_data(direction, payload)
        new_seq = (seq + this.offset(seq)) % MOD
        if len(new_payload) != len(payload):
            this.record(seq, len(new_payload) - len(payload))
        self._next[direction] = (seq + len(payload)) % MOD
        sent_map = self._sent[direction]
        sent_map[seq] = _Sent(len(payload), new_seq, new_payload)
        if len(sent_map) > MAX_UNACKNOWLEDGED:
            del sent_map[next(iter(sent_map))]
        return new_seq, new_ack, new_payload

    def _acknowledged(self, direction: Direction, ack: int) -> None:
        """The receiver of ``direction`` has everything before ``ack`` (as it was sent)."""
        sent_map = self._sent[direction]
        while sent_map:
            first = next(iter(sent_map))
            sent = sent_map[first]
            if _after((sent.seq + len(sent.payload)) % MOD, ack):
                break
            del sent_map[first]
