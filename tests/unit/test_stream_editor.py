"""TcpStreamEditor: a filter sees each byte of a direction once; whatever the sender sends
again (re-segmented, coalesced, from the middle of a chunk, with new bytes after it) gets
what the filter made of those bytes; acknowledgements never tell the sender of output the
receiver lacks; what it keeps is bounded by a ByteBudget (pure; a simulated receiver
reassembles what leaves the fw as TCP does)."""

from __future__ import annotations

import ipaddress
import itertools
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.core import datafilter
from enforcer.core.budget import ByteBudget
from enforcer.core.datafilter import (
    MOD,
    RECORD_COST,
    SMALL_SEGMENT,
    Direction,
    Edited,
    TcpStreamEditor,
)
from enforcer.core.flows import FlowRecord, FlowTable, Mode
from enforcer.core.packet import FlowKey

OUT, BACK = Direction.OUT, Direction.BACK
SERVER_SEQ = 7000  # the receiver's own sequence number (it sends no data here)


class Counting:
    """A length-changing filter whose output differs on every call: "<n:data>" for the
    n-th call. A retransmission shown to it again would change the stream."""

    def __init__(self) -> None:
        self.calls: list[tuple[Direction, bytes]] = []

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        self.calls.append((direction, data))
        return b"<%d:%s>" % (len(self.calls), data)


class Lines:
    """Holds a partial line back; a complete line has b"ab" replaced by b"XYZ" and b"cc"
    removed, and is upper-cased. ``directions``: those it edits (others pass unchanged)."""

    def __init__(self, directions: tuple[Direction, ...] = (OUT,)) -> None:
        self.directions = directions
        self.partial = {d: b"" for d in Direction}
        self.seen = {d: b"" for d in Direction}  # every byte shown to it, in order
        # per direction, each call's end in the input and in the output stream
        self.calls: dict[Direction, list[tuple[int, int]]] = {d: [] for d in Direction}
        self.made = {d: 0 for d in Direction}

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        assert data, "a filter is never shown an empty segment"
        self.seen[direction] += data
        if direction in self.directions:
            complete, newline, self.partial[direction] = \
                (self.partial[direction] + data).rpartition(b"\n")
            out = whole(complete + newline)
        else:
            out = data
        self.made[direction] += len(out)
        self.calls[direction].append((len(self.seen[direction]), self.made[direction]))
        return out


def whole(stream: bytes) -> bytes:
    """What Lines makes of a stream of complete lines seen at once."""
    return stream.replace(b"ab", b"XYZ").replace(b"cc", b"").upper()


class PortRewriter:
    """An FTP filter in NAT, reduced: lines are held until complete, and a PORT command
    naming the client (192,0,2,11) is rewritten to name the fw (198,51,100,1): 2 bytes more."""

    def __init__(self) -> None:
        self.partial = b""
        self.seen = b""

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        self.seen += data
        complete, newline, self.partial = (self.partial + data).rpartition(b"\n")
        return (complete + newline).replace(b"PORT 192,0,2,11,", b"PORT 198,51,100,1,")


class Identity:
    def __init__(self) -> None:
        self.seen = b""

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        self.seen += data
        return data


class Receiver:
    """The far end of a direction: places each payload by its sequence number, and
    acknowledges what it has contiguously from ``isn``. Overlapping copies must agree
    byte for byte; a FIN must come where the stream ends."""

    def __init__(self, isn: int, length: int | None = None) -> None:
        self.isn = isn
        self.length = length  # of the whole output, where a test sends a FIN
        self.bytes: dict[int, int] = {}
        self.fin = False

    def take(self, seq: int, payload: bytes, fin: bool = False) -> bool:
        """Place a segment: whether TCP acknowledges it at once (data, a FIN, or an empty
        segment from before what it has: an old one, as a keepalive probe)."""
        start = (seq - self.isn) % MOD
        if not payload and not fin:
            return start >= MOD // 2 or start < self.contiguous
        assert start < MOD // 2, f"segment at {seq} is before the stream's start {self.isn}"
        for i, byte in enumerate(payload):
            if start + i in self.bytes:
                assert self.bytes[start + i] == byte, f"byte {start + i} differs in a second copy"
            self.bytes[start + i] = byte
        if fin:
            assert start + len(payload) == self.length, \
                f"a FIN at {start + len(payload)}; the stream's output ends at {self.length}"
            self.fin = True
        return True

    @property
    def contiguous(self) -> int:
        n = 0
        while n in self.bytes:
            n += 1
        return n

    def data(self) -> bytes:
        return bytes(self.bytes[i] for i in range(self.contiguous))

    @property
    def ack(self) -> int:
        n = self.contiguous
        return (self.isn + n + (self.fin and n == self.length)) % MOD


def send(editor: TcpStreamEditor, receiver: Receiver, seq: int, payload: bytes, *,
         lost: bool = False, fin: bool = False) -> tuple[int, bytes]:
    """The sender's segment through the fw to the receiver (unless ``lost`` after the fw):
    (seq, payload) as it left the fw."""
    edited = editor.edit(OUT, seq % MOD, SERVER_SEQ, payload, fin=fin)
    assert edited is not None
    assert edited.ack == SERVER_SEQ  # BACK carries no data: its acks are not shifted
    if not lost:
        receiver.take(edited.seq, edited.payload, edited.fin)
    return edited.seq, edited.payload


def acknowledge(editor: TcpStreamEditor, ack: int) -> int:
    """The receiver's pure ack through the fw: the ack the sender gets."""
    edited = editor.edit(BACK, SERVER_SEQ, ack % MOD, b"")
    assert edited == Edited(SERVER_SEQ, edited.ack, b"", False)
    assert edited.ack is not None
    return edited.ack


# --- retransmissions ---------------------------------------------------------------------------

def test_a_retransmission_gets_the_recorded_output_and_the_filter_is_not_called_again() -> None:
    f = Counting()
    editor = TcpStreamEditor(f)
    assert editor.edit(OUT, 1000, 500, b"ab") == (1000, 500, b"<1:ab>", False)  # +4 from 1002
    assert editor.edit(OUT, 1002, 500, b"cd") == (1006, 500, b"<2:cd>", False)
    # both sent again, in any order, with a newer ack: same seq and payload
    assert editor.edit(OUT, 1002, 501, b"cd") == (1006, 501, b"<2:cd>", False)
    assert editor.edit(OUT, 1000, 502, b"ab") == (1000, 502, b"<1:ab>", False)
    assert editor.edit(OUT, 1000, None, b"ab") == (1000, None, b"<1:ab>", False)
    assert f.calls == [(OUT, b"ab"), (OUT, b"cd")]
    # new data continues after the recorded outputs
    assert editor.edit(OUT, 1004, 502, b"e") == (1004 + 8, 502, b"<3:e>", False)


def test_old_bytes_in_any_segmentation_get_the_whole_chunks_that_hold_them() -> None:
    """Re-segmented, coalesced, starting or ending inside a chunk whose length changed:
    the chunks' outputs, from the first one's start (the receiver trims what it has)."""
    f = Counting()
    editor = TcpStreamEditor(f)
    editor.edit(OUT, 1000, None, b"abcd")  # "<1:abcd>" at 1000: +4 from 1004 on
    editor.edit(OUT, 1004, None, b"ef")    # "<2:ef>" at 1008: +8 from 1006 on
    both = b"<1:abcd><2:ef>"
    for seq, payload, out_seq, out in (
            (1000, b"ab", 1000, b"<1:abcd>"),        # the start of a chunk
            (1002, b"cd", 1000, b"<1:abcd>"),        # its end
            (1001, b"bc", 1000, b"<1:abcd>"),        # its middle
            (1000, b"abcdef", 1000, both),           # two, coalesced
            (1003, b"de", 1000, both),               # across their border
            (1005, b"f", 1008, b"<2:ef>")):          # the second alone
        assert editor.edit(OUT, seq, None, payload) == (out_seq, None, out, False), (seq, payload)
    assert len(f.calls) == 2


def test_output_lost_after_the_fw_comes_with_a_resegmented_retransmission() -> None:
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    stream = b"ab\nccx\nab cc ab\nyy\n"
    send(editor, receiver, 1000, stream[:4])                   # "XYZ\n" arrives
    send(editor, receiver, 1004, stream[4:9], lost=True)       # "X\n" lost, "ab" held
    send(editor, receiver, 1009, stream[9:16], lost=True)      # " cc ab\n": line lost
    assert receiver.data() == b"XYZ\n"
    ack = acknowledge(editor, receiver.ack)
    assert ack == 1004  # the sender hears of the first line only
    # it sends the rest again in other pieces, and the last line new
    for start, stop in ((4, 6), (6, 13), (13, 20)):
        send(editor, receiver, 1000 + start, stream[start:stop])
    assert receiver.data() == whole(stream)
    assert f.seen[OUT] == stream  # each byte once
    assert acknowledge(editor, receiver.ack) == 1000 + len(stream)


def test_command_segments_lost_after_the_fw_come_back_coalesced() -> None:
    """Small command segments, all lost after the fw, sent again as one segment (as Linux
    collapses them on retransmission): one segment carries what the filter made of all."""
    f = PortRewriter()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    lines = [b"USER anonymous\r\n", b"PORT 192,0,2,11,4,1\r\n", b"TYPE I\r\n"]
    seq = 1000
    for line in lines:
        send(editor, receiver, seq, line, lost=True)
        seq += len(line)
    assert acknowledge(editor, receiver.ack) == 1000
    stream = b"".join(lines)
    out_seq, out = send(editor, receiver, 1000, stream)
    expected = b"USER anonymous\r\nPORT 198,51,100,1,4,1\r\nTYPE I\r\n"
    assert (out_seq, out) == (1000, expected)
    assert f.seen == stream
    assert acknowledge(editor, receiver.ack) == 1000 + len(stream)


def test_a_retransmission_from_the_middle_of_a_lengthened_line_gets_the_whole_line() -> None:
    f = PortRewriter()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    send(editor, receiver, 1000, b"NOOP\r\n")
    acknowledge(editor, receiver.ack)
    # "PORT 19" is held (a byte the receiver has leaves instead: it acknowledges at once);
    # the rest completes the line, which grows by 2: lost after the fw
    assert send(editor, receiver, 1006, b"PORT 19") == (1005, b"\n")
    assert send(editor, receiver, 1013, b"2,0,2,11,4,1\r\n", lost=True) == \
        (1006, b"PORT 198,51,100,1,4,1\r\n")
    # the receiver has all before the line: the held "PORT 19" counts as delivered (the
    # filter has it), the rest is what the sender still has
    assert acknowledge(editor, receiver.ack) == 1013
    # sent again from the middle (its own first byte, or a later one): the whole line
    for seq, payload in ((1013, b"2,0,"), (1019, b"11,4,1\r\n"), (1015, b"0")):
        assert editor.edit(OUT, seq, SERVER_SEQ, payload) == \
            (1006, SERVER_SEQ, b"PORT 198,51,100,1,4,1\r\n", False)
    send(editor, receiver, 1017, b"2,11")
    assert receiver.data() == b"NOOP\r\nPORT 198,51,100,1,4,1\r\n"
    assert acknowledge(editor, receiver.ack) == 1027


def test_old_and_new_bytes_in_one_segment() -> None:
    """What the filter made of the old bytes, then the new bytes' output, in one segment;
    the old part only from where the receiver has acknowledged."""
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    send(editor, receiver, 1000, b"ab\n")                  # "XYZ\n", +1
    send(editor, receiver, 1003, b"cc1\n", lost=True)      # "1\n", -2
    acknowledge(editor, receiver.ack)
    # old "ab\ncc1\n" with new "ab\n": the receiver has "XYZ\n", so "1\n" and "XYZ\n"
    assert send(editor, receiver, 1000, b"ab\ncc1\nab\n") == (1004, b"1\nXYZ\n")
    assert f.seen[OUT] == b"ab\ncc1\nab\n"
    # all of it acknowledged: a segment repeating it with new bytes carries the new only
    assert acknowledge(editor, receiver.ack) == 1010
    assert send(editor, receiver, 1003, b"cc1\nab\n2\n") == (1010, b"2\n")
    assert receiver.data() == whole(b"ab\ncc1\nab\n2\n")


def test_reordered_segments() -> None:
    """A segment ahead of a gap is dropped (the filter sees the stream in order); old
    segments arriving in any order get their chunks."""
    f = Counting()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    assert editor.edit(OUT, 999, None, b"", syn=True) == (999, None, b"", False)
    assert editor.edit(OUT, 1003, SERVER_SEQ, b"cd") is None  # ahead of "abc"
    assert editor.edit(OUT, 1003, SERVER_SEQ, b"", fin=True) is None  # a FIN ahead of it too
    send(editor, receiver, 1000, b"a", lost=True)
    send(editor, receiver, 1001, b"bc", lost=True)
    send(editor, receiver, 1003, b"cd")
    assert send(editor, receiver, 1001, b"bc") == (1005, b"<2:bc>")  # late copies
    assert send(editor, receiver, 1000, b"a") == (1000, b"<1:a>")
    assert receiver.data() == b"<1:a><2:bc><3:cd>"
    assert f.calls == [(OUT, b"a"), (OUT, b"bc"), (OUT, b"cd")]


def test_a_retransmission_the_receiver_has_whole_gets_a_byte_it_has() -> None:
    """The sender did not hear the receiver's acknowledgement: what it sends again leaves
    as one byte the receiver has, so that the receiver acknowledges at once."""
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    send(editor, receiver, 1000, b"ab\n")
    send(editor, receiver, 1003, b"cd\n")
    assert acknowledge(editor, receiver.ack) == 1006  # the sender does not get this
    assert send(editor, receiver, 1003, b"cd\n") == (1006, b"\n")  # a duplicate
    assert send(editor, receiver, 1000, b"ab\ncd\n") == (1006, b"\n")
    # new bytes the filter holds back: the same, and then the sender hears of them
    assert send(editor, receiver, 1006, b"ab") == (1006, b"\n")
    assert acknowledge(editor, receiver.ack) == 1008
    assert send(editor, receiver, 1006, b"ab") == (1006, b"\n")
    assert receiver.data() == b"XYZ\nCD\n"


def test_before_any_output_a_retransmission_leaves_as_a_keepalive_probe() -> None:
    editor = TcpStreamEditor(Lines())
    assert editor.edit(OUT, 1000, None, b"ab") == (999, None, b"", False)  # held
    assert editor.edit(OUT, 1000, None, b"ab") == (999, None, b"", False)


# --- FIN ----------------------------------------------------------------------------------------

def test_a_fin_stays_only_where_the_stream_ends() -> None:
    f = Counting()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000, length=2 * len(b"<1:aaaa>"))
    send(editor, receiver, 1000, b"aaaa", lost=True)
    send(editor, receiver, 1004, b"bbbb", lost=True, fin=True)
    # sent again with the FIN, but an answer cut short (more than the segment and than
    # SMALL_SEGMENT) must not carry it
    with mock.patch.object(datafilter, "SMALL_SEGMENT", 4):
        edited = editor.edit(OUT, 1000, SERVER_SEQ, b"aaaabbbb", fin=True)
    assert edited == (1000, SERVER_SEQ, b"<1:aaaa>", False)
    receiver.take(edited.seq, edited.payload, edited.fin)
    assert send(editor, receiver, 1000, b"aaaabbbb", fin=True) == (1000, b"<1:aaaa><2:bbbb>")
    assert receiver.fin
    # everything arrived: a FIN sent again alone, or with old bytes, stays at the end
    assert acknowledge(editor, receiver.ack) == 1009  # data and FIN
    assert editor.edit(OUT, 1008, None, b"", fin=True) == (1016, None, b"", True)
    assert editor.edit(OUT, 1006, None, b"bb", fin=True) == (1016, None, b"", True)
    assert editor.edit(OUT, 1006, None, b"bb") == (1015, None, b">", False)


def test_the_ack_of_a_fin_reaches_the_sender_though_the_filter_holds_bytes() -> None:
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000, length=4)
    send(editor, receiver, 1000, b"ab\nab", fin=True)  # "ab" is held, and lost at the FIN
    assert receiver.data() == b"XYZ\n" and receiver.fin
    assert acknowledge(editor, receiver.ack) == 1006


def test_data_on_a_syn_is_taken_off() -> None:
    """TCP Fast Open: the peer acknowledges the SYN alone, the sender sends the data again
    after the handshake, and the filter sees it then."""
    f = Counting()
    editor = TcpStreamEditor(f)
    assert editor.edit(OUT, 999, None, b"early", syn=True) == (999, None, b"", False)
    assert editor.edit(OUT, 1000, 1, b"early") == (1000, 1, b"<1:early>", False)


# --- size and progress ----------------------------------------------------------------------------

def test_a_coalesced_retransmission_is_cut_to_its_own_length_and_the_rest_follows() -> None:
    """Many lost chunks that each grew, sent again as one segment: at most as long as that
    segment (or SMALL_SEGMENT); the receiver's acknowledgement moves the sender to where
    the rest starts."""
    f = Counting()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    stream = bytes(range(256)) * 4  # 1024 bytes in 8 chunks of 128: each output is longer
    for i in range(0, len(stream), 128):
        send(editor, receiver, 1000 + i, stream[i:i + 128], lost=True)
    expected = b"".join(b"<%d:%s>" % (n + 1, stream[i:i + 128])
                        for n, i in enumerate(range(0, len(stream), 128)))
    rounds = 0
    ack = acknowledge(editor, receiver.ack)
    while ack != 1000 + len(stream):
        there = receiver.contiguous
        seq, out = send(editor, receiver, ack, stream[(ack - 1000):])  # from the sender's una
        assert seq == 1000 + there  # from where the receiver is
        assert len(out) <= max(len(stream) - (ack - 1000), SMALL_SEGMENT)
        new_ack = acknowledge(editor, receiver.ack)
        assert (new_ack - ack) % MOD > 0, "a round that brought the sender nothing"
        ack, rounds = new_ack, rounds + 1
    assert receiver.data() == expected
    assert rounds == 2


def test_a_chunk_larger_than_the_segment_comes_in_pieces() -> None:
    """A filter that doubles a segment: its output was too big for the path, say. The
    segment sent again gets pieces of its own length, each new to the receiver, until
    the chunk is complete; only then does the sender hear of it."""
    class Double:
        def on_data(self, direction: Direction, data: bytes) -> bytes:
            return data * 2

    editor = TcpStreamEditor(Double())
    receiver = Receiver(1000)
    segment = bytes(range(200)) * 5  # 1000 bytes > SMALL_SEGMENT
    send(editor, receiver, 1000, segment, lost=True)
    assert acknowledge(editor, receiver.ack) == 1000
    for got in (1000, 2000):
        assert receiver.contiguous == got - 1000
        assert send(editor, receiver, 1000, segment) == (1000 + got - 1000, (segment * 2)[got - 1000:got])
        assert acknowledge(editor, receiver.ack) == (1000 if got == 1000 else 2000)
    assert receiver.data() == segment * 2


# --- holding bytes back -----------------------------------------------------------------------

def test_a_partial_line_is_held_back_and_sent_with_its_end() -> None:
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    # "ab" of "abc\n" arrives alone: nothing leaves yet (an empty segment before the
    # stream, as a keepalive probe: the receiver acknowledges it at once)
    assert send(editor, receiver, 1000, b"ab") == (999, b"")
    # the receiver has everything before "ab": the sender may count it delivered
    assert acknowledge(editor, receiver.ack) == 1002
    # "c\n" completes the line: "XYZC\n" leaves where "ab" would have
    assert send(editor, receiver, 1002, b"c\n") == (1000, b"XYZC\n")
    assert receiver.data() == b"XYZC\n"
    # short of its end, nothing more; all of it: the sender's 1004
    assert acknowledge(editor, 1004) == 1002
    assert acknowledge(editor, receiver.ack) == 1004
    # the next line follows at +1
    assert send(editor, receiver, 1004, b"d\n") == (1005, b"D\n")
    assert acknowledge(editor, receiver.ack) == 1006
    assert receiver.data() == whole(b"abc\nd\n")


def test_a_line_held_over_three_segments() -> None:
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(5000)
    assert send(editor, receiver, 5000, b"x\na") == (5000, b"X\n")
    assert acknowledge(editor, receiver.ack) == 5003
    assert send(editor, receiver, 5003, b"bb") == (5001, b"\n")
    assert send(editor, receiver, 5005, b"ab\n") == (5002, b"XYZBXYZ\n")
    assert acknowledge(editor, receiver.ack) == 5008
    assert receiver.data() == whole(b"x\nabbab\n")
    # a pure ack/FIN after it leaves at the shifted place (+2 from 5008 on)
    assert editor.edit(OUT, 5008, SERVER_SEQ, b"") == (5010, SERVER_SEQ, b"", False)


def test_an_ack_for_nothing_received_acknowledges_nothing_after_several_changes() -> None:
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    send(editor, receiver, 1000, b"ab\n", lost=True)  # "XYZ\n" (+1)
    send(editor, receiver, 1003, b"ab")               # held
    send(editor, receiver, 1005, b"\n")               # "XYZ\n" released
    assert receiver.contiguous == 0
    assert acknowledge(editor, receiver.ack) == 1000


# --- pruning on ack -------------------------------------------------------------------------------

def test_output_is_kept_until_the_receiver_acknowledges_it() -> None:
    f = Counting()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    send(editor, receiver, 1000, b"a")   # "<1:a>" at 1000-1005
    send(editor, receiver, 1001, b"b")   # "<2:b>" at 1005-1010
    held = editor.held
    assert held == 10 + 2 * RECORD_COST
    # an ack short of the first output's end: nothing is forgotten
    assert acknowledge(editor, 1004) == 1000
    assert editor.held == held
    # the first output acknowledged: forgotten; the second is still replayed
    assert acknowledge(editor, 1005) == 1001
    assert editor.held == 5 + RECORD_COST
    assert editor.edit(OUT, 1001, None, b"b") == (1005, None, b"<2:b>", False)
    assert acknowledge(editor, 1010) == 1002
    assert editor.held == 0
    assert len(f.calls) == 2


def test_a_long_stream_keeps_the_records_of_unacknowledged_chunks_alone() -> None:
    """Chunks the receiver has acknowledged are forgotten as the stream goes on, their
    records too (the list that holds them is compacted: a long flow's state stays as
    small as what is in flight), and what is kept still replays the filter's output."""
    f = Counting()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    side = editor._sides  # (the editor's state, looked at: nothing outside says its size)
    for i in range(1000):
        send(editor, receiver, 1000 + i, b"x")
        if i % 2 == 0:  # every other segment acknowledged (not the last), as delayed acks do
            assert acknowledge(editor, receiver.ack) == 1001 + i
        # compacted once over 64 records are forgotten and they are most of the list
        assert len(side[OUT].chunks) <= 2 * 66
    assert receiver.data() == b"".join(b"<%d:x>" % n for n in range(1, 1001))
    # the last segment, not acknowledged, sent again: its recorded output, no new call
    last = len(b"".join(b"<%d:x>" % n for n in range(1, 1000)))
    assert editor.edit(OUT, 1999, SERVER_SEQ, b"x") == (1000 + last, SERVER_SEQ, b"<1000:x>", False)
    assert len(f.calls) == 1000 and editor.held == len(b"<1000:x>") + RECORD_COST


def test_a_data_segment_s_ack_prunes_the_other_direction() -> None:
    f = Counting()
    editor = TcpStreamEditor(f)
    editor.edit(OUT, 1000, 50, b"a")   # "<1:a>" at 1000-1005
    editor.edit(BACK, 50, 1005, b"r")  # BACK data acknowledging all of OUT
    assert editor.edit(BACK, 50, 1005, b"r").payload == b"<2:r>"  # BACK's own output is kept
    assert editor.held == len(b"<2:r>") + RECORD_COST


def test_the_other_direction_is_independent() -> None:
    f = Counting()
    editor = TcpStreamEditor(f)
    assert editor.edit(OUT, 1000, 50, b"x") == (1000, 50, b"<1:x>", False)  # OUT +4 from 1001
    # BACK data at the very seq OUT used is new to BACK: the filter sees it
    assert editor.edit(BACK, 1000, 1005, b"y") == (1000, 1001, b"<2:y>", False)
    assert editor.edit(BACK, 1000, 1005, b"y") == (1000, 1001, b"<2:y>", False)  # replayed
    # OUT's ack of BACK's bytes (its view: 1005) is the server's 1001
    assert editor.edit(OUT, 1001, 1005, b"z") == (1005, 1001, b"<3:z>", False)
    assert [d for d, _ in f.calls] == [OUT, BACK, OUT]


# --- the byte budget --------------------------------------------------------------------------

def test_a_segment_that_does_not_fit_the_budget_waits_for_acks() -> None:
    """Its new bytes are not shown to the filter; once acknowledgements free room, the
    sender's next copy gets through. Old bytes are still answered meanwhile."""
    f = Counting()
    budget = ByteBudget(2 * (RECORD_COST + 10))
    editor = TcpStreamEditor(f, budget)
    receiver = Receiver(1000)
    send(editor, receiver, 1000, b"a" * 5, lost=True)      # "<1:aaaaa>": 9 + RECORD_COST
    send(editor, receiver, 1005, b"b" * 5)                 # 9 + RECORD_COST: 2 bytes left
    assert editor.held == budget.used == 2 * (9 + RECORD_COST)
    assert editor.edit(OUT, 1010, SERVER_SEQ, b"c") is None  # 1 + RECORD_COST: no room
    # old bytes with the new "c": the old ones are answered, the new one not taken
    assert send(editor, receiver, 1000, b"aaaaabbbbbc") == (1000, b"<1:aaaaa><2:bbbbb>")
    assert [data for _, data in f.calls] == [b"aaaaa", b"bbbbb"]
    assert acknowledge(editor, receiver.ack) == 1010  # frees both
    assert editor.held == budget.used == 0
    assert send(editor, receiver, 1010, b"c") == (1018, b"<3:c>")
    assert receiver.data() == b"<1:aaaaa><2:bbbbb><3:c>"


def test_of_a_segment_larger_than_the_room_the_bytes_that_fit_go_on() -> None:
    """A GSO packet carries many segments' worth: of its new bytes, those that fit the
    budget are shown to the filter and go on (its FIN with the rest, not yet); the sender
    sends the rest again once acknowledgements make room, and the stream arrives whole."""
    f = Counting()
    budget = ByteBudget(RECORD_COST + 30)
    editor = TcpStreamEditor(f, budget)
    receiver = Receiver(1000)
    first = editor.edit(OUT, 1000, SERVER_SEQ, b"x" * 100, fin=True)
    assert first is not None and (first.payload, first.fin) == (b"<1:" + b"x" * 30 + b">", False)
    receiver.take(first.seq, first.payload)
    taken = 30
    while taken < 100:  # the sender's copies of what is not yet acknowledged
        taken = acknowledge(editor, receiver.ack) - 1000
        edited = editor.edit(OUT, 1000 + taken, SERVER_SEQ, b"x" * (100 - taken), fin=True)
        assert edited is not None
        receiver.take(edited.seq, edited.payload)
        taken += len(f.calls[-1][1])
    assert [len(data) for _, data in f.calls] == [30, 30, 30, 10]
    assert edited.fin  # with the last bytes
    assert receiver.data() == b"".join(b"<%d:%s>" % (i + 1, b"x" * n)
                                       for i, n in enumerate((30, 30, 30, 10)))


def test_an_editor_gives_back_what_it_holds_when_released() -> None:
    total = ByteBudget(10_000)
    editor = TcpStreamEditor(Counting(), ByteBudget(5_000, parent=total))
    editor.edit(OUT, 1000, None, b"abc")
    editor.edit(BACK, 50, None, b"xyz")
    assert total.used == editor.held == 2 * (len(b"<1:abc>") + RECORD_COST)
    editor.release()
    assert total.used == editor.held == 0


@pytest.mark.parametrize("how", ["released", "replaced"])
def test_a_flow_the_flow_table_forgets_gives_its_bytes_back(how: str) -> None:
    """Shown in the flow's record (`pinhole ctl flows`), and given back to the client's
    budget when the record goes: let go once conntrack has surely forgotten the flow, or
    replaced by a new flow with its key."""
    client = ByteBudget(10_000)
    table = FlowTable()
    key = FlowKey(6, ipaddress.ip_address("192.0.2.11"), 40000, ipaddress.ip_address("198.51.100.21"),
                  21)
    first = FlowRecord(key, 1, "FTP", Mode.USER, 0.0, app_filter="ftp")
    table.add(first, 0.0)
    first.editor = TcpStreamEditor(Counting(), ByteBudget(5_000, parent=client))
    first.editor.edit(OUT, 1000, None, b"abc")
    assert first.to_dict()["buffered"] == client.used == len(b"<1:abc>") + RECORD_COST
    if how == "released":
        assert table.expire(1000.0) == [first]
    else:
        table.add(FlowRecord(key, 1, "FTP", Mode.USER, 1.0), 1.0)
    assert client.used == 0


# --- wraparound -----------------------------------------------------------------------------------

def test_hold_back_replay_and_trimming_across_the_wrap() -> None:
    f = Lines()
    editor = TcpStreamEditor(f)
    isn = MOD - 3
    receiver = Receiver(isn)
    assert send(editor, receiver, isn, b"ab") == (isn - 1, b"")         # held at MOD-3, MOD-2
    assert send(editor, receiver, MOD - 1, b"c\n") == (isn, b"XYZC\n")  # ends at 1 (orig)
    assert editor.edit(OUT, MOD - 1, SERVER_SEQ, b"c\n") == (isn, SERVER_SEQ, b"XYZC\n", False)
    assert f.seen[OUT] == b"abc\n"
    assert acknowledge(editor, receiver.ack) == 1                       # out 2 -> orig 1
    # a segment across the wrap from old bytes: the new part, at 2
    assert send(editor, receiver, MOD - 1, b"c\nab\n") == (2, b"XYZ\n")
    assert editor.edit(OUT, 1, SERVER_SEQ, b"ab\n") == (2, SERVER_SEQ, b"XYZ\n", False)
    assert receiver.data() == whole(b"abc\nab\n")
    assert acknowledge(editor, receiver.ack) == 4


def test_acks_of_the_other_direction_wrap_too() -> None:
    editor = TcpStreamEditor(Counting())
    # BACK grows by 4 just before the wrap; OUT's acks of it come back shifted
    assert editor.edit(BACK, MOD - 1, None, b"z") == (MOD - 1, None, b"<1:z>", False)
    assert editor.edit(OUT, 10, 4, b"") == (10, 0, b"", False)               # out 4 -> orig 0
    assert editor.edit(BACK, 0, None, b"y") == (4, None, b"<2:y>", False)    # orig 0 leaves at 4


# --- a model: any segmentation, any loss, both ways -----------------------------------------------

PIECES = st.sampled_from([b"a", b"b", b"c", b"ab", b"cc", b"\n", b"aab\n", b"ccc\n", b"xyz"])


class Sender:
    """A TCP sender, by stream positions: everything before ``una`` is acknowledged,
    everything before ``nxt`` has been sent; a FIN follows the stream."""

    def __init__(self, stream: bytes, isn: int) -> None:
        self.stream = stream
        self.isn = isn
        self.una = 0
        self.nxt = 0
        self.sent: list[tuple[int, int]] = []  # what it has sent, for copies that come late

    @property
    def end(self) -> int:
        """After the FIN."""
        return len(self.stream) + 1

    @property
    def done(self) -> bool:
        return self.una == self.end

    def segment(self, start: int, stop: int) -> tuple[int, bytes, bool]:
        """(seq, payload, fin) of the stream between two positions (a FIN at its end)."""
        stop = min(stop, len(self.stream))
        self.nxt = max(self.nxt, stop + (stop == len(self.stream)))
        self.sent.append((start, stop))
        return (self.isn + start) % MOD, self.stream[start:stop], stop == len(self.stream)

    def hear(self, ack: int) -> None:
        position = (ack - self.isn) % MOD
        assert position <= self.nxt, f"acknowledged {position}, never sent past {self.nxt}"
        self.una = max(self.una, position)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_segmentation_loss_and_retransmission_delivers_the_filter_s_output(
        data: st.DataObject) -> None:
    """Both ways: a sender segments at random and sends bytes again (from what it last
    heard of or from further on, re-segmented and coalesced, with new bytes after them,
    or a late copy of an earlier segment); segments and acknowledgements are lost before
    and after the fw for a while. Then the network heals: every round after that brings
    something new, until each receiver has exactly the filter's output and the FIN, and
    each sender has heard of it all. An acknowledgement never tells a sender of output
    its receiver lacks, and an answer to old bytes is never too long."""
    small = data.draw(st.sampled_from([4, SMALL_SEGMENT]), label="SMALL_SEGMENT")
    with mock.patch.object(datafilter, "SMALL_SEGMENT", small):
        _model(data, small)


def _model(data: st.DataObject, small: int) -> None:
    f = Lines(directions=(OUT, BACK))
    limit = data.draw(st.sampled_from([None, 3 * RECORD_COST + 60]), label="budget")
    editor = TcpStreamEditor(f, None if limit is None else ByteBudget(limit))
    senders, receivers = {}, {}
    for d in Direction:
        pieces = data.draw(st.lists(PIECES, max_size=12), label=f"{d.value} pieces")
        stream = b"".join(pieces) + b"\n"
        isn = data.draw(st.one_of(st.integers(0, MOD - 1), st.integers(MOD - 30, MOD - 1)),
                        label=f"{d.value} isn")
        senders[d] = Sender(stream, isn)
        receivers[d] = Receiver(isn, len(whole(stream)))
    mss = data.draw(st.integers(1, 12), label="mss")
    # the handshake as the fw sees it: the server's SYN-ACK, the client's ACK
    isn_out, isn_back = senders[OUT].isn, senders[BACK].isn
    assert editor.edit(BACK, (isn_back - 1) % MOD, isn_out, b"", syn=True) == \
        ((isn_back - 1) % MOD, isn_out, b"", False)
    assert editor.edit(OUT, isn_out, isn_back, b"") == (isn_out, isn_back, b"", False)

    def other(d: Direction) -> Direction:
        return BACK if d is OUT else OUT

    def lost(lossy: bool, one_in: int, where: str) -> bool:
        return lossy and data.draw(st.integers(1, one_in), label=f"lost {where}") == 1

    def through(d: Direction, seq: int, payload: bytes, fin: bool, lossy: bool) -> None:
        """A segment of direction d, carrying the acknowledgement of the other direction,
        from its host through the fw, and on."""
        if lost(lossy, 6, "before the fw"):
            return
        back, sender = receivers[other(d)], senders[other(d)]
        old = (seq - senders[d].isn) % MOD < len(f.seen[d])
        edited = editor.edit(d, seq, back.ack, payload, fin=fin)
        if edited is None:
            return
        assert edited.ack is not None
        # the acknowledgement covers the input of no call whose output has not all arrived
        heard = (edited.ack - sender.isn) % MOD
        for end_in, end_out in f.calls[other(d)]:
            if end_in <= heard:
                assert end_out <= back.contiguous, "an ack told the sender of output not received"
        if old:
            assert len(edited.payload) <= max(len(payload), small), "an answer too long"
        if lost(lossy, 5, "after the fw"):
            return
        answers = receivers[d].take(edited.seq, edited.payload, edited.fin)
        sender.hear(edited.ack)
        if not answers:
            return
        # the receiver acknowledges at once (a pure ack, its seq its own stream's next)
        ack = editor.edit(other(d), (sender.isn + sender.nxt) % MOD, receivers[d].ack, b"")
        assert ack is not None and ack.ack is not None
        if not lost(lossy, 5, "ack after the fw"):
            senders[d].hear(ack.ack)

    def round_of(d: Direction, lossy: bool) -> None:
        s = senders[d]
        if s.una < s.nxt and (not lossy or data.draw(st.booleans(), label="retransmit")):
            # re-segmented or coalesced, maybe with new bytes after: from where the sender
            # last heard of (a timeout), or from further on
            start = data.draw(st.integers(s.una, s.nxt - 1), label="from") if lossy else s.una
            size = data.draw(st.integers(1, 3 * mss), label="retransmission size")
            through(d, *s.segment(start, start + size), lossy)
        if lossy and s.sent and data.draw(st.integers(0, 3), label="a late copy") == 0:
            start, stop = data.draw(st.sampled_from(s.sent), label="copy of")
            through(d, *s.segment(start, stop), lossy)
        for _ in range(data.draw(st.integers(0, 3), label="new segments") if lossy else 2):
            if s.nxt >= s.end:
                break
            front = data.draw(st.integers(0, min(s.nxt, 3)), label="old bytes in front") \
                if lossy else 0
            size = data.draw(st.integers(1, mss), label="segment size")
            through(d, *s.segment(s.nxt - front, s.nxt + size), lossy)

    for _ in range(data.draw(st.integers(0, 10), label="lossy rounds")):
        for d in data.draw(st.permutations(list(Direction)), label="order"):
            round_of(d, lossy=True)

    def progress() -> int:
        return sum(senders[d].una + receivers[d].contiguous + receivers[d].fin for d in Direction)

    before = progress()
    for healed in itertools.count():
        if all(s.done for s in senders.values()):
            break
        assert healed < 200, "no end in sight"
        for d in Direction:
            round_of(d, lossy=False)
        assert progress() > before, f"round {healed} after the loss brought nothing new"
        before = progress()
    for d in Direction:
        assert f.seen[d] == senders[d].stream  # each byte once, in order
        assert receivers[d].data() == whole(senders[d].stream)
        assert len(receivers[d].bytes) == len(whole(senders[d].stream))  # nothing beyond
        assert receivers[d].fin
    assert editor.held == 0 and (limit is None or editor.budget.used == 0)
