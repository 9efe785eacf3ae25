"""Data filters on user-mode flows, and the TCP sequence arithmetic they need.

A data filter sees a flow's payload and returns it, changed or not. When a
change alters a segment's length, every later sequence number in that
direction, and every acknowledgement coming back, must be shifted so that
both ends still agree (what Linux's nf_conntrack_seqadj does).

A filter sees each byte of a direction once, in order. A segment that repeats
bytes it has already seen (a retransmission) is not shown to it again: the
enforcer sends what the filter made of them the first time (each segment's
output is kept until the receiver acknowledges it), or just the new part of a
segment that overlaps old bytes. A segment that arrives ahead of a gap (out of
order) is dropped: the sender sends it again once the gap is filled. A filter
may hold bytes back (a command split across segments: it returns nothing
until the line is complete). Acknowledgements are translated through the
record of what left for what, so a receiver's ack never covers bytes it has
not been sent. Limits: a filter sees segments, not a reassembled stream, so it
keeps its own buffer; it is not told when the stream ends (bytes it holds at
FIN are lost); SACK blocks are not rewritten.
"""

from __future__ import annotations

import enum
from collections import deque
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


@dataclass(slots=True)
class _Sent:
    """What left the fw for a segment: kept to be sent again if the segment is."""

    seq: int  # the segment's original sequence number
    length: int  # and original payload length
    out_seq: int  # the sequence number it left with
    payload: bytes  # what left

    @property
    def out_end(self) -> int:
        return (self.out_seq + len(self.payload)) % MOD


MAX_UNACKNOWLEDGED = 4096  # segments kept per direction for retransmissions


@dataclass
class _Side:
    """One direction of a flow: where its stream is, and its output not yet acknowledged."""

    next: int | None = None  # the original sequence number after the last byte seen
    offset: int = 0  # output minus original sequence number, at the stream's end
    sent: deque[_Sent] = field(default_factory=deque)

    def original(self, ack: int) -> int:
        """The receiver acknowledges ``ack`` of this direction's output: which original
        sequence number the sender is told. Never past what the receiver has: a segment
        counts once all of its output arrived (held-back bytes with the output that
        released them), or byte for byte where the filter left its length alone."""
        while True:  # forget what has arrived: a segment with output, and those held before it
            delivered = next((i for i, r in enumerate(self.sent) if r.payload), None)
            if delivered is None or _after(self.sent[delivered].out_end, ack):
                break
            for _ in range(delivered + 1):
                self.sent.popleft()
        if not self.sent:
            return (ack - self.offset) % MOD
        first = self.sent[0]
        if first.payload and len(first.payload) == first.length and _after(ack, first.out_seq):
            return (first.seq + (ack - first.out_seq)) % MOD  # part of an unchanged segment
        return (ack - (first.out_seq - first.seq)) % MOD if not _after(ack, first.out_seq) \
            else first.seq


@dataclass
class TcpStreamEditor:
    """Runs a filter over a TCP flow's segments and keeps sequence numbers consistent."""

    data_filter: DataFilter
    sides: dict[Direction, _Side] = field(default_factory=lambda: {d: _Side() for d in Direction})

    def edit(self, direction: Direction, seq: int, ack: int | None, payload: bytes, *,
             syn: bool = False) -> tuple[int, int | None, bytes] | None:
        """(seq, ack, payload) of a segment as it must leave the firewall, or None when
        it is to be dropped (it arrived ahead of a gap). ``syn``: it is a SYN, whose
        sequence number is the one before the stream's first byte."""
        this = self.sides[direction]
        other = self.sides[Direction.BACK if direction is Direction.OUT else Direction.OUT]
        new_ack = None if ack is None else other.original(ack)
        if not payload:
            if this.next is None:  # where the stream starts
                this.next = (seq + 1) % MOD if syn else seq
            return (seq + this.offset) % MOD, new_ack, payload
        if this.next is not None and _after(seq, this.next):
            return None  # a gap before it: the filter must see the stream in order
        if this.next is not None and not _after((seq + len(payload)) % MOD, this.next):
            # nothing new: send again what the filter made of it
            sent = next((r for r in this.sent if r.seq == seq and r.length == len(payload)), None)
            if sent is not None:
                return sent.out_seq, new_ack, sent.payload
            return (this.next + this.offset) % MOD, new_ack, b""
        if this.next is not None and _after(this.next, seq):  # partly old: only the new part
            payload = payload[(this.next - seq) % MOD:]
            seq = this.next
        new_payload = self.data_filter.on_data(direction, payload)
        record = _Sent(seq, len(payload), (seq + this.offset) % MOD, new_payload)
        this.offset += len(new_payload) - len(payload)
        this.next = (seq + len(payload)) % MOD
        this.sent.append(record)
        if len(this.sent) > MAX_UNACKNOWLEDGED:
            this.sent.popleft()
        return record.out_seq, new_ack, new_payload
