"""TcpStreamEditor: a filter sees each byte of a direction once (retransmissions get the
recorded output again, overlaps are trimmed), may hold bytes back, and both ends still
agree on sequence numbers (pure; a simulated receiver reassembles what leaves the fw)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.core.datafilter import MAX_UNACKNOWLEDGED, MOD, Direction, TcpStreamEditor

OUT, BACK = Direction.OUT, Direction.BACK
SERVER_SEQ = 7000  # the receiver's own sequence number (it sends no data here)


class Counting:
    """A length-changing filter whose output differs on every call: "<n:data>" for the
    n-th call of a direction. A retransmission shown to it again would change the stream."""

    def __init__(self) -> None:
        self.calls: list[tuple[Direction, bytes]] = []

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        self.calls.append((direction, data))
        return b"<%d:%s>" % (len(self.calls), data)


class Lines:
    """Holds a partial line back; a complete line has b"ab" replaced by b"XYZ" and b"cc"
    removed, and is upper-cased (OUT only; BACK passes unchanged)."""

    def __init__(self) -> None:
        self.partial = b""
        self.seen = b""  # every byte shown to it, in order

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        assert data, "a filter is never shown an empty segment"
        if direction is BACK:
            return data
        self.seen += data
        complete, newline, self.partial = (self.partial + data).rpartition(b"\n")
        return whole(complete + newline)


def whole(stream: bytes) -> bytes:
    """What Lines makes of a stream of complete lines seen at once."""
    return stream.replace(b"ab", b"XYZ").replace(b"cc", b"").upper()


class Identity:
    def __init__(self) -> None:
        self.seen = b""

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        self.seen += data
        return data


class Receiver:
    """The far end of OUT: places each payload by its sequence number, and acknowledges
    what it has contiguously from ``isn``. Overlapping copies must agree byte for byte."""

    def __init__(self, isn: int) -> None:
        self.isn = isn
        self.bytes: dict[int, int] = {}

    def take(self, seq: int, payload: bytes) -> None:
        if not payload:
            return
        start = (seq - self.isn) % MOD
        assert start < MOD // 2, f"segment at {seq} is before the stream's start {self.isn}"
        for i, byte in enumerate(payload):
            if start + i in self.bytes:
                assert self.bytes[start + i] == byte, f"byte {start + i} differs in a second copy"
            self.bytes[start + i] = byte

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
        return (self.isn + self.contiguous) % MOD


def send(editor: TcpStreamEditor, receiver: Receiver, seq: int, payload: bytes, *,
         lost: bool = False) -> tuple[int, bytes]:
    """The sender's segment through the fw to the receiver (unless ``lost`` after the fw):
    (seq, payload) as it left the fw."""
    out_seq, ack, out = editor.edit(OUT, seq % MOD, SERVER_SEQ, payload)
    assert ack == SERVER_SEQ  # BACK carries no data: its acks are not shifted
    if not lost:
        receiver.take(out_seq, out)
    return out_seq, out


def not_after(a: int, b: int) -> bool:
    """Sequence number a is b or before it (modulo 2**32)."""
    return (b - a) % MOD < MOD // 2


def acknowledge(editor: TcpStreamEditor, ack: int) -> int:
    """The receiver's pure ack through the fw: the ack the sender gets."""
    seq, translated, payload = editor.edit(BACK, SERVER_SEQ, ack % MOD, b"")
    assert (seq, payload) == (SERVER_SEQ, b"")
    assert translated is not None
    return translated


# --- retransmissions ---------------------------------------------------------------------------

def test_a_retransmission_gets_the_recorded_output_and_the_filter_is_not_called_again() -> None:
    f = Counting()
    editor = TcpStreamEditor(f)
    first = editor.edit(OUT, 1000, 500, b"ab")
    assert first == (1000, 500, b"<1:ab>")  # 2 bytes became 6: +4 from 1002 on
    second = editor.edit(OUT, 1002, 500, b"cd")
    assert second == (1006, 500, b"<2:cd>")
    # both sent again, in any order, with a newer ack: same seq and payload, ack translated anew
    assert editor.edit(OUT, 1002, 501, b"cd") == (1006, 501, b"<2:cd>")
    assert editor.edit(OUT, 1000, 502, b"ab") == (1000, 502, b"<1:ab>")
    assert editor.edit(OUT, 1000, None, b"ab") == (1000, None, b"<1:ab>")
    assert f.calls == [(OUT, b"ab"), (OUT, b"cd")]
    # new data continues after the recorded outputs
    assert editor.edit(OUT, 1004, 502, b"e") == (1004 + 8, 502, b"<3:e>")


def test_old_bytes_that_are_not_a_recorded_segment_leave_empty() -> None:
    f = Counting()
    editor = TcpStreamEditor(f)
    editor.edit(OUT, 1000, None, b"abcd")  # "<1:abcd>": +4 from 1004 on
    editor.edit(OUT, 1004, None, b"ef")    # "<2:ef>": +8 from 1006 on
    # same seq, another length; a part of a segment; two segments coalesced; a middle piece
    for seq, payload in ((1000, b"ab"), (1000, b"abcdef"), (1002, b"cd"), (1004, b"e"), (1005, b"f")):
        assert editor.edit(OUT, seq, None, payload)[2] == b"", (seq, payload)
    assert len(f.calls) == 2


def test_the_other_direction_is_independent() -> None:
    f = Counting()
    editor = TcpStreamEditor(f)
    assert editor.edit(OUT, 1000, 50, b"x") == (1000, 50, b"<1:x>")       # OUT +4 from 1001
    # BACK data at the very seq OUT used is new to BACK: the filter sees it
    assert editor.edit(BACK, 1000, 1005, b"y") == (1000, 1001, b"<2:y>")  # BACK +4 from 1001
    assert editor.edit(BACK, 1000, 1005, b"y") == (1000, 1001, b"<2:y>")  # replayed
    # OUT's ack of BACK's bytes (its view: 1005) is the server's 1001
    assert editor.edit(OUT, 1001, 1005, b"z") == (1005, 1001, b"<3:z>")
    assert [d for d, _ in f.calls] == [OUT, BACK, OUT]


# --- overlaps -----------------------------------------------------------------------------------

def test_a_segment_overlapping_old_bytes_is_trimmed_to_its_new_part() -> None:
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    assert send(editor, receiver, 1000, b"ab\n") == (1000, b"XYZ\n")  # +1 from 1003 on
    # the sender sends "ab\nab\n" again from 1000 (a coalesced retransmission plus new data)
    assert send(editor, receiver, 1000, b"ab\nab\n") == (1004, b"XYZ\n")
    assert f.seen == b"ab\nab\n"  # each byte once
    assert receiver.data() == b"XYZ\nXYZ\n"
    # and the trimmed part is a recorded segment of its own (seq 1003, length 3)
    assert editor.edit(OUT, 1003, SERVER_SEQ, b"ab\n") == (1004, SERVER_SEQ, b"XYZ\n")
    assert acknowledge(editor, receiver.ack) == 1006
    assert f.seen == b"ab\nab\n"


def test_an_overlap_of_one_old_byte() -> None:
    f = Identity()
    editor = TcpStreamEditor(f)
    editor.edit(OUT, 1000, None, b"abc")
    assert editor.edit(OUT, 1002, None, b"cde") == (1003, None, b"de")
    assert f.seen == b"abcde"


# --- holding bytes back -----------------------------------------------------------------------

def test_a_partial_line_is_held_back_and_sent_with_its_end() -> None:
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    # "ab" of "abc\n" arrives alone: nothing leaves yet (an empty segment at 1000)
    assert send(editor, receiver, 1000, b"ab") == (1000, b"")
    assert receiver.data() == b""
    # the receiver acknowledges nothing new: the sender must not count "ab" as delivered
    assert acknowledge(editor, receiver.ack) == 1000
    # "c\n" completes the line: "XYZC\n" leaves where "ab" would have
    assert send(editor, receiver, 1002, b"c\n") == (1000, b"XYZC\n")
    assert receiver.data() == b"XYZC\n"
    # the receiver acks 1005, which is the sender's 1004: the whole "abc\n"
    assert acknowledge(editor, receiver.ack) == 1004
    # the next line follows at +1
    assert send(editor, receiver, 1004, b"d\n") == (1005, b"D\n")
    assert acknowledge(editor, receiver.ack) == 1006
    assert receiver.data() == whole(b"abc\nd\n")


def test_a_held_segment_sent_again_is_still_empty_and_not_shown_again() -> None:
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    send(editor, receiver, 1000, b"ab")
    assert send(editor, receiver, 1000, b"ab") == (1000, b"")
    assert f.seen == b"ab"
    assert send(editor, receiver, 1002, b"\n") == (1000, b"XYZ\n")
    assert send(editor, receiver, 1000, b"ab") == (1000, b"")
    assert f.seen == b"ab\n"
    assert receiver.data() == b"XYZ\n"
    assert acknowledge(editor, receiver.ack) == 1003


def test_a_line_held_over_three_segments() -> None:
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(5000)
    assert send(editor, receiver, 5000, b"x\na") == (5000, b"X\n")
    # the held "a" counts as delivered: it leaves with whatever completes its line
    assert acknowledge(editor, receiver.ack) == 5003
    assert send(editor, receiver, 5003, b"bb") == (5002, b"")
    assert acknowledge(editor, receiver.ack) == 5003  # a segment held whole does not
    assert send(editor, receiver, 5005, b"ab\n") == (5002, b"XYZBXYZ\n")
    assert acknowledge(editor, receiver.ack) == 5008
    assert receiver.data() == whole(b"x\nabbab\n")
    # a pure ack/FIN after it leaves at the shifted place (+2 from 5008 on)
    assert editor.edit(OUT, 5008, SERVER_SEQ, b"") == (5010, SERVER_SEQ, b"")


# --- pruning on ack -------------------------------------------------------------------------------

def test_output_is_kept_until_the_receiver_acknowledges_it() -> None:
    f = Counting()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    send(editor, receiver, 1000, b"a")   # "<1:a>" at 1000-1005
    send(editor, receiver, 1001, b"b")   # "<2:b>" at 1005-1010
    # an ack short of the first output's end prunes nothing
    assert acknowledge(editor, 1004) == 1000
    assert editor.edit(OUT, 1000, None, b"a")[2] == b"<1:a>"
    # an ack of the first output alone: the first is forgotten, the second replayed
    assert acknowledge(editor, 1005) == 1001
    assert editor.edit(OUT, 1000, None, b"a")[2] == b""
    assert editor.edit(OUT, 1001, None, b"b") == (1005, None, b"<2:b>")
    # everything acknowledged: nothing is replayed any more, and the filter is not asked
    assert acknowledge(editor, 1010) == 1002
    assert editor.edit(OUT, 1001, None, b"b")[2] == b""
    assert len(f.calls) == 2


def test_a_data_segment_s_ack_prunes_the_other_direction() -> None:
    f = Counting()
    editor = TcpStreamEditor(f)
    editor.edit(OUT, 1000, 50, b"a")   # "<1:a>" at 1000-1005
    editor.edit(BACK, 50, 1005, b"r")  # BACK data acknowledging all of OUT
    assert editor.edit(OUT, 1000, 51, b"a")[2] == b""
    assert editor.edit(BACK, 50, 1005, b"r")[2] == b"<2:r>"  # BACK's own output is kept


def test_at_most_max_unacknowledged_segments_are_kept() -> None:
    f = Identity()
    editor = TcpStreamEditor(f)
    for i in range(MAX_UNACKNOWLEDGED + 1):
        editor.edit(OUT, 10 + i, None, b"x")
    assert editor.edit(OUT, 10, None, b"x")[2] == b""   # the oldest is forgotten
    assert editor.edit(OUT, 11, None, b"x")[2] == b"x"  # the next is kept
    assert editor.edit(OUT, 10 + MAX_UNACKNOWLEDGED, None, b"x")[2] == b"x"
    assert len(f.seen) == MAX_UNACKNOWLEDGED + 1


# --- wraparound -----------------------------------------------------------------------------------

def test_hold_back_replay_and_trimming_across_the_wrap() -> None:
    f = Lines()
    editor = TcpStreamEditor(f)
    isn = MOD - 3
    receiver = Receiver(isn)
    assert send(editor, receiver, isn, b"ab") == (isn, b"")        # held at MOD-3, MOD-2
    assert send(editor, receiver, MOD - 1, b"c\n") == (isn, b"XYZC\n")  # ends at 1 (orig)
    # the same segment again (seq MOD-1, wrapping): the recorded output, the filter not called
    assert editor.edit(OUT, MOD - 1, SERVER_SEQ, b"c\n") == (isn, SERVER_SEQ, b"XYZC\n")
    assert f.seen == b"abc\n"
    assert acknowledge(editor, receiver.ack) == 1                  # out 2 -> orig 1
    # pruned across the wrap: the line's output is acknowledged, so no longer replayed
    assert editor.edit(OUT, MOD - 1, SERVER_SEQ, b"c\n")[2] == b""
    # a segment across the wrap from old bytes: trimmed to the new part at 1
    assert send(editor, receiver, MOD - 1, b"c\nab\n") == (2, b"XYZ\n")
    assert f.seen == b"abc\nab\n"
    # its new part, sent again as a segment of its own, is replayed
    assert editor.edit(OUT, 1, SERVER_SEQ, b"ab\n") == (2, SERVER_SEQ, b"XYZ\n")
    assert receiver.data() == whole(b"abc\nab\n")
    assert acknowledge(editor, receiver.ack) == 4


def test_acks_of_the_other_direction_wrap_too() -> None:
    editor = TcpStreamEditor(Counting())
    # BACK grows by 4 just before the wrap; OUT's acks of it come back shifted
    assert editor.edit(BACK, MOD - 1, None, b"z") == (MOD - 1, None, b"<1:z>")
    assert editor.edit(OUT, 10, 4, b"") == (10, 0, b"")             # out 4 -> orig 0
    assert editor.edit(BACK, 0, None, b"y") == (4, None, b"<2:y>")  # orig 0 leaves at 4


# --- any segmentation, any retransmissions ---------------------------------------------------------

PIECES = st.sampled_from([b"a", b"b", b"c", b"ab", b"cc", b"\n", b"aab\n", b"ccc\n"])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_segmentation_and_retransmissions_give_the_whole_stream_s_output(data: st.DataObject) -> None:
    """The sender sends the stream in random segments, some with old bytes in front, some
    of them lost after the fw, and sends earlier segments (or any old bytes) again in
    between; in the end it sends the lost ones again as they were."""
    stream = b"".join(data.draw(st.lists(PIECES, max_size=25), label="pieces")) + b"\n"
    isn = data.draw(st.one_of(st.integers(0, MOD - 1), st.integers(MOD - 40, MOD - 1)), label="isn")
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1)) if len(stream) > 1
                            else st.just(set()), label="cuts"))
    bounds = [0, *cuts, len(stream)]
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(isn)
    sent: list[tuple[int, int]] = []  # (start, end) offsets of what the sender has sent
    lost: set[tuple[int, int]] = set()  # new segments whose output has not arrived yet
    last_ack = isn
    for start, end in itertools.pairwise(bounds):
        for _ in range(data.draw(st.integers(0, 2), label="retransmissions")):
            if not sent:
                break
            if data.draw(st.booleans(), label="a segment as it was"):
                s, e = data.draw(st.sampled_from(sent), label="segment")
                lost.discard((s, e))
            else:
                top = sent[-1][1]
                s = data.draw(st.integers(0, top - 1), label="from")
                e = data.draw(st.integers(s + 1, top), label="to")
            send(editor, receiver, isn + s, stream[s:e])
        # a new segment, maybe with old bytes in front, maybe lost after the fw
        s = start - data.draw(st.integers(0, start), label="old bytes in front")
        lose = s == start and data.draw(st.integers(0, 4), label="lost") == 0
        send(editor, receiver, isn + s, stream[s:end], lost=lose)
        sent.append((s, end))
        if lose:
            lost.add((s, end))
        if not data.draw(st.booleans(), label="the receiver acknowledges now"):
            continue  # (retransmissions before an ack are replayed, after it left empty)
        # the receiver acknowledges what it has: the sender never hears of bytes it has
        # not sent and, with nothing lost, of every complete line so far and never of
        # fewer than before (with output lost, the translation of an ack from before
        # several length changes is approximate: see the last tests)
        translated = acknowledge(editor, receiver.ack)
        assert not_after(translated, isn + end)
        if not lost:
            assert stream.rfind(b"\n", 0, end) + 1 <= (translated - isn) % MOD <= end
            assert not_after(last_ack, translated)
            last_ack = translated
    for s, e in sorted(lost):
        send(editor, receiver, isn + s, stream[s:e])
    assert f.seen == stream
    assert receiver.data() == whole(stream)
    assert len(receiver.bytes) == len(whole(stream))  # nothing beyond the stream's output
    assert acknowledge(editor, receiver.ack) == (isn + len(stream)) % MOD


# --- found bugs ---------------------------------------------------------------------------------

def test_a_segment_that_arrives_after_a_later_one_is_not_lost() -> None:
    """A segment ahead of a gap is dropped (the filter sees the stream in order); the
    sender's retransmission of it, once the gap is filled, gets through."""
    f = Identity()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    assert editor.edit(OUT, 999, None, b"", syn=True) == (999, None, b"")  # the stream is at 1000
    assert editor.edit(OUT, 1003, SERVER_SEQ, b"cd\n") is None  # reordered before the fw
    send(editor, receiver, 1000, b"ab\n")
    send(editor, receiver, 1000, b"ab\n")  # and sent again
    assert acknowledge(editor, receiver.ack) == 1003  # the sender sends "cd\n" again
    send(editor, receiver, 1003, b"cd\n")
    assert receiver.data() == b"ab\ncd\n"
    assert f.seen == b"ab\ncd\n"


def test_an_ack_for_nothing_received_acknowledges_nothing_after_several_changes() -> None:
    f = Lines()
    editor = TcpStreamEditor(f)
    receiver = Receiver(1000)
    first = editor.edit(OUT, 1000, SERVER_SEQ, b"ab\n")  # "XYZ\n" (+1): lost on the way
    assert first[2] == b"XYZ\n"
    send(editor, receiver, 1003, b"ab")                  # held back
    send(editor, receiver, 1005, b"\n")                  # "XYZ\n" released
    assert receiver.contiguous == 0
    assert acknowledge(editor, receiver.ack) == 1000
