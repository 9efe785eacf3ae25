"""TCP sequence bookkeeping for data filters that change lengths (pure)."""

from __future__ import annotations

from enforcer.core.datafilter import MOD, Direction, TcpStreamEditor


class Grow:
    """OUT: "a" becomes "aaa" (+2 per a); BACK untouched."""

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        return data.replace(b"a", b"aaa") if direction is Direction.OUT else data


def test_segments_after_a_change_are_shifted_and_acks_shifted_back() -> None:
    editor = TcpStreamEditor(Grow())
    # client sends "xa" at seq 1000: becomes "xaaa", +2
    assert editor.edit(Direction.OUT, 1000, 500, b"xa") == (1000, 500, b"xaaa", False)
    # the next client segment starts at original 1002: the server expects 1004
    assert editor.edit(Direction.OUT, 1002, 500, b"zz") == (1004, 500, b"zz", False)
    # the server acknowledges 1006 (its view); the client must see 1004 (its view)
    assert editor.edit(Direction.BACK, 500, 1006, b"") == (500, 1004, b"", False)
    # an ack for the first segment only (server view 1004 -> client view 1002)
    assert editor.edit(Direction.BACK, 500, 1004, b"") == (500, 1002, b"", False)


def test_a_retransmitted_changed_segment_keeps_its_original_place() -> None:
    editor = TcpStreamEditor(Grow())
    editor.edit(Direction.OUT, 1000, None, b"a")
    assert editor.edit(Direction.OUT, 1000, None, b"a") == (1000, None, b"aaa", False)
    assert editor.edit(Direction.OUT, 1001, None, b"b") == (1003, None, b"b", False)


def test_offsets_accumulate_over_several_changes() -> None:
    editor = TcpStreamEditor(Grow())
    editor.edit(Direction.OUT, 1, None, b"a")        # +2 from 2 on
    editor.edit(Direction.OUT, 2, None, b"aa")       # +4 more from 4 on
    assert editor.edit(Direction.OUT, 4, None, b"b").seq == 4 + 6
    # and back: the receiver's ack of all of it (5 + 6) is the sender's 5
    assert editor.edit(Direction.BACK, 9, 11, b"").ack == 5


def test_sequence_numbers_wrap_around() -> None:
    editor = TcpStreamEditor(Grow())
    start = MOD - 1
    assert editor.edit(Direction.OUT, start, None, b"a") == (start, None, b"aaa", False)
    # original next seq wraps to 0; shifted by 2
    assert editor.edit(Direction.OUT, 0, None, b"b").seq == 2
    # the peer's ack of everything (its view: start + 3 = 2 mod 2**32) maps back to 0
    assert editor.edit(Direction.BACK, 7, 2, b"").ack == 0


def test_no_change_no_shift() -> None:
    editor = TcpStreamEditor(Grow())
    assert editor.edit(Direction.BACK, 10, 20, b"abc") == (10, 20, b"abc", False)
