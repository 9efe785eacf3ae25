"""Data filters on user-mode flows, and the TCP stream editing they need.

A data filter sees a flow's payload and returns it, changed or not. When a
change alters lengths, every later sequence number in that direction, and every
acknowledgement coming back, must be shifted so that both ends still agree
(what Linux's nf_conntrack_seqadj does). And since the filter sees each byte of
a direction once, in order, the enforcer itself must answer for bytes the
sender sends again.

How a direction is kept (``_Side``): every call of the filter is a *chunk*, the
input bytes it was shown and the output it returned, placed in the input and the
output stream; chunks are kept, in order, until the receiver acknowledges their
output. Positions are counted from the stream's first byte, so nothing inside
wraps around; sequence numbers are converted at the edges. Where a chunk's
output has its input's length, input and output match byte for byte; where not,
only at the chunk's edges.

- A segment with new bytes: the new bytes go to the filter, and its output
  leaves in their place.
- A segment with bytes the filter has seen (a retransmission, however the sender
  re-segmented or coalesced it, wherever it starts or ends, with new bytes after
  it or not): it gets the output of the chunks that hold those bytes, whole
  chunks where the filter changed the length (the receiver's TCP trims what it
  has), from where the receiver has acknowledged on, and any new bytes' output
  after it. It is at most as long as the segment that came in, or
  ``SMALL_SEGMENT`` bytes if that is more: it fits wherever that segment did,
  or any path, however many chunks it glues together. So every round of
  retransmissions brings the receiver something new until the stream is whole
  (and the sender hears of it as soon as a chunk's output is complete). If the
  receiver has all of it already, one byte it has leaves instead (a duplicate):
  the receiver acknowledges it at once, and so the sender, whose
  acknowledgement was lost, hears of it.
- A segment beyond a gap (the sender's earlier bytes were lost before the fw)
  is dropped: the filter sees the stream in order, and the sender sends it again.
- An acknowledgement of output is translated to the input whose output has all
  arrived, never further: within a chunk of unchanged length byte for byte,
  else to the chunk's start. Bytes the filter holds back (it returned less than
  it got, until a line is complete, say) count as delivered once everything
  before them has arrived: the filter has them, and their output leaves with a
  later chunk, whose bytes the sender still keeps until that output arrives.
- Memory: kept output, and a fixed cost for each chunk's record, count against
  a ``ByteBudget`` (the flow's, inside its client's and the total). Of a
  segment's new bytes, those that fit go on (a GSO packet carries many
  segments' worth); the rest is dropped before the filter sees it, and the
  sender sends it again once acknowledgements have made room.

Limits: a filter sees segments, not a reassembled stream, so it keeps its own
buffer (and its own bytes are its own); it is not told when the stream ends
(bytes it holds at FIN are lost); SACK blocks are not rewritten; data on a SYN
(TCP Fast Open) is taken off, so the sender sends it again after the handshake.
"""

from __future__ import annotations

import enum
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import NamedTuple, Protocol

from enforcer.core.budget import ByteBudget
from enforcer.core.limits import Limits
from enforcer.core.packet import FlowKey

MOD = 1 << 32
# What a kept chunk's record costs beside its output (measured: ~170 bytes in CPython)
RECORD_COST = 192
# Payload any IPv4 path carries (its least MTU, with IP and TCP headers at their largest):
# an answer to a retransmission may be this long even where the segment was shorter
SMALL_SEGMENT = 576 - 20 - 60
# A flow's budget when its editor is given none: what its client may hold
DEFAULT_BUDGET = Limits.buffered_bytes_per_client


class Direction(enum.Enum):
    OUT = "out"    # client -> target, the way the flow was opened
    BACK = "back"  # target -> client


class DataFilter(Protocol):
    """Observes, and may change, the payload of one user-mode flow."""

    def on_data(self, direction: Direction, data: bytes) -> bytes: ...


DataFilterFactory = Callable[[FlowKey], DataFilter]


class FilterFailed(Exception):
    """A flow's filter failed (it raised, or could not be made): the flow ends. Its data
    never goes on unfiltered (rule 18)."""


class Edited(NamedTuple):
    """A segment as it leaves the fw."""

    seq: int
    ack: int | None
    payload: bytes
    fin: bool  # it keeps its FIN: it had one, and its payload ends where the stream does


def _signed(delta: int) -> int:
    """A difference of sequence numbers as TCP reads it: within half the space."""
    delta %= MOD
    return delta - MOD if delta >= MOD // 2 else delta


@dataclass(slots=True)
class _Chunk:
    """One call of the filter: input positions [start, end) made ``output``, which
    starts at output position ``out_start``."""

    start: int
    end: int
    out_start: int
    output: bytes

    @property
    def out_end(self) -> int:
        return self.out_start + len(self.output)

    @property
    def exact(self) -> bool:
        """Its output has its input's length: they match byte for byte."""
        return len(self.output) == self.end - self.start


_START = attrgetter("start")
_OUT_START = attrgetter("out_start")


class _Side:
    """One direction of a flow: input and output positions, and the chunks whose
    output the receiver has not acknowledged."""

    def __init__(self, origin: int) -> None:
        self.origin = origin  # the sequence number of position 0, in both streams
        self.seen = 0  # input: after the last byte the filter has seen
        self.written = 0  # output: after the last byte it made
        self.acked = 0  # output: the receiver has acknowledged everything before this
        self.chunks: list[_Chunk] = []  # those from index ``first`` on are kept
        self.first = 0
        self.acked_byte = b""  # the last output byte of the chunks forgotten
        self.held = 0  # bytes charged to the budget for the chunks kept

    # --- positions ---------------------------------------------------------------------
    def position(self, seq: int) -> int:
        """The input position of a sequence number (near the stream's end)."""
        return self.seen + _signed(seq - self.origin - self.seen)

    def seq(self, position: int) -> int:
        return (self.origin + position) % MOD

    def _chunk_at(self, position: int) -> _Chunk | None:
        """The kept chunk whose input holds ``position``."""
        i = bisect_right(self.chunks, position, lo=self.first, key=_START) - 1
        if i >= self.first and position < self.chunks[i].end:
            return self.chunks[i]
        return None

    def _chunk_out(self, out: int) -> _Chunk | None:
        """The kept chunk whose output holds output position ``out``."""
        i = bisect_right(self.chunks, out, lo=self.first, key=_OUT_START) - 1
        if i >= self.first and out < self.chunks[i].out_end:
            return self.chunks[i]
        return None

    def _linear(self, position: int) -> int:
        """The output position of an input position outside the kept chunks: shifted as
        the chunks' nearest edge is."""
        if position >= self.seen or self.first == len(self.chunks):
            return position + self.written - self.seen
        head = self.chunks[self.first]
        return position + head.out_start - head.start

    def out_from(self, position: int) -> int:
        """Where the output for the input from ``position`` on starts."""
        chunk = self._chunk_at(position)
        if chunk is None:
            return self._linear(position)
        return chunk.out_start + (position - chunk.start if chunk.exact else 0)

    def out_to(self, position: int) -> int:
        """Where the output for the input before ``position`` ends."""
        chunk = self._chunk_at(position - 1)
        if chunk is None:
            return self._linear(position)
        return chunk.out_start + position - chunk.start if chunk.exact else chunk.out_end

    def output(self, start: int, stop: int) -> bytes:
        """The kept output between two output positions."""
        i = bisect_right(self.chunks, start, lo=self.first, key=_OUT_START) - 1
        parts = []
        while start < stop:
            chunk = self.chunks[i]
            parts.append(chunk.output[start - chunk.out_start:stop - chunk.out_start])
            start = max(start, chunk.out_end)
            i += 1
        return b"".join(parts)

    def byte_before(self, out: int) -> bytes:
        """The output byte before output position ``out`` (``acked`` or after it)."""
        chunk = self._chunk_out(out - 1)
        if chunk is None:
            return self.acked_byte
        return chunk.output[out - 1 - chunk.out_start:out - chunk.out_start]

    def nothing_new(self, ack: int | None, fin: bool) -> Edited:
        """A segment that brings the receiver nothing new: its FIN, where the stream ends;
        else a byte the receiver has (the one before its acknowledgement; before any, an
        empty segment there, as a keepalive probe), which it acknowledges at once, so that
        the sender hears how far it is."""
        if fin:
            return Edited(self.seq(self.written), ack, b"", True)
        return Edited(self.seq(self.acked - 1), ack, self.byte_before(self.acked), False)

    # --- the stream --------------------------------------------------------------------
    def record(self, chunk: _Chunk, budget: ByteBudget) -> None:
        cost = len(chunk.output) + RECORD_COST
        budget.charge(cost)
        self.held += cost
        self.chunks.append(chunk)
        self.seen, self.written = chunk.end, chunk.out_end

    def acknowledge(self, ack: int, budget: ByteBudget) -> int:
        """The receiver acknowledges output up to sequence number ``ack``: forget what it
        has, and say which input sequence number the sender is to hear of."""
        out = self.written + _signed(ack - self.origin - self.written)
        if self.acked <= out <= self.written + 1:  # + 1: the FIN
            self.acked = min(out, self.written)
            self._forget(out, budget)
        if self.first == len(self.chunks):
            return self.seq(out + self.seen - self.written)
        head = self.chunks[self.first]
        if out <= head.out_start:
            return self.seq(out + head.start - head.out_start)
        if head.exact and out < head.out_end:
            return self.seq(head.start + out - head.out_start)
        return self.seq(head.start)

    def _forget(self, out: int, budget: ByteBudget) -> None:
        """Forget the chunks whose output (possibly none) all comes before ``out``."""
        chunks = self.chunks
        while self.first < len(chunks) and chunks[self.first].out_end <= out:
            chunk = chunks[self.first]
            cost = len(chunk.output) + RECORD_COST
            budget.give(cost)
            self.held -= cost
            self.acked_byte = chunk.output[-1:] or self.acked_byte
            self.first += 1
        if self.first > 64 and 2 * self.first > len(chunks):
            del chunks[:self.first]
            self.first = 0

    def release(self, budget: ByteBudget) -> None:
        budget.give(self.held)
        self.held = 0
        del self.chunks[:]
        self.first = 0


class TcpStreamEditor:
    """Runs a filter over a TCP flow's segments: answers retransmissions from what it
    made of them, and keeps sequence and acknowledgement numbers consistent."""

    def __init__(self, data_filter: DataFilter, budget: ByteBudget | None = None) -> None:
        self.data_filter = data_filter
        self.budget = ByteBudget(DEFAULT_BUDGET) if budget is None else budget
        self._sides: dict[Direction, _Side] = {}  # each from its first segment on

    @property
    def held(self) -> int:
        """Bytes held for the flow (kept output and the chunks' records), both ways."""
        return sum(side.held for side in self._sides.values())

    def release(self) -> None:
        """Give everything held back to the budget: the flow is gone."""
        for side in self._sides.values():
            side.release(self.budget)

    def edit(self, direction: Direction, seq: int, ack: int | None, payload: bytes, *,
             syn: bool = False, fin: bool = False) -> Edited | None:
        """A segment as it must leave the firewall, or None when it is to be dropped (it
        arrived ahead of a gap, or its new bytes do not fit the budget). ``syn``, ``fin``:
        the segment's flags (a SYN's sequence number is the one before the stream's first
        byte; a FIN follows its payload)."""
        other = self._sides.get(Direction.BACK if direction is Direction.OUT else Direction.OUT)
        if ack is not None and other is not None:
            ack = other.acknowledge(ack, self.budget)
        this = self._sides.get(direction)
        if this is None:
            this = self._sides[direction] = _Side((seq + 1) % MOD if syn else seq)
        if syn:
            return Edited(seq, ack, b"", fin)
        start = this.position(seq)
        end = start + len(payload)
        if start > this.seen and (payload or fin):
            return None  # a gap before it: the filter must see the stream in order
        if not payload:
            return Edited(this.seq(this.out_from(start)), ack, b"", fin and start == this.seen)
        old = start < this.seen
        if end > this.seen:
            new = payload[this.seen - start:]
            room = max(0, self.budget.room - RECORD_COST)
            if len(new) > room:
                # what fits goes on and the rest is dropped (a GSO packet carries many
                # segments' worth): the sender sends it again once acks make room
                new, fin, end = new[:room], False, this.seen + room
            if new:
                self._take(direction, this, new)
            elif not old:
                return None  # no room at all
        if not old:
            made = this.chunks[-1].output
            if made:
                return Edited(this.seq(this.written - len(made)), ack, made, fin)
            return this.nothing_new(ack, fin)  # the filter holds all of it back
        # bytes the filter has seen: what it made of them, from where the receiver is
        first = max(this.out_from(start), this.acked)
        last = this.out_to(end)
        fin = fin and end == this.seen
        if first >= last:
            return this.nothing_new(ack, fin)
        last = min(last, first + max(len(payload), SMALL_SEGMENT))
        return Edited(this.seq(first), ack, this.output(first, last),
                      fin and last == this.written)

    def _take(self, direction: Direction, side: _Side, data: bytes) -> None:
        """Show new bytes to the filter, and hold what it made of them (charged as their
        own length, which the caller found room for: a filter that lengthens them
        overdraws the budget by the difference)."""
        made = self.data_filter.on_data(direction, data)
        side.record(_Chunk(side.seen, side.seen + len(data), side.written, made), self.budget)
