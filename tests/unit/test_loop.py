"""enforcer.loop: no callback stops the loop; listeners out of descriptors pause, then resume."""

from __future__ import annotations

import errno
import os
import re
import selectors
import socket
from collections.abc import Iterator

import pytest

from enforcer.loop import PAUSE_FIRST, PAUSE_LONGEST, Loop


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_failing_callback_is_counted_its_owner_closed_and_the_loop_goes_on(
        pair: tuple[socket.socket, socket.socket]) -> None:
    loop = Loop()
    bad_end, bad_peer = pair
    good_end, good_peer = socket.socketpair()
    calls: list[str] = []

    def bad() -> None:
        calls.append("bad")
        raise ValueError("a client sent something the code did not expect")

    def close() -> None:
        calls.append("closed")
        loop.unwatch(bad_end)

    loop.watch(bad_end, selectors.EVENT_READ, bad, close)
    loop.watch(good_end, selectors.EVENT_READ, lambda: calls.append(good_end.recv(1).decode()))
    bad_peer.send(b"x")
    good_peer.send(b"y")
    loop.run_once(1.0)
    assert sorted(calls) == ["bad", "closed", "y"]
    assert loop.counters["errors: event callback"] == 1
    assert not loop.watched(bad_end) and loop.watched(good_end)
    good_end.close()
    good_peer.close()


@pytest.mark.parametrize("reuse", [False, True], ids=["closed", "fd-reused"])
def test_nothing_is_called_for_what_an_earlier_callback_of_the_turn_unwatched(reuse: bool) -> None:
    """Two sockets ready in one turn; the first one's callback closes the second (a client's
    reset closes the socket of its connect): the second's callback is not called, not even
    when a new socket took its descriptor number meanwhile."""
    loop = Loop()
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    calls: list[str] = []
    replacement: list[socket.socket] = []

    def close_the_second() -> None:
        calls.append("first")
        fd = second.fileno()
        loop.unwatch(second)
        second.close()
        if reuse:
            new = socket.socket(fileno=os.dup2(first_peer.fileno(), fd))
            replacement.append(new)
            loop.watch(new, selectors.EVENT_READ, lambda: calls.append("new"))

    loop.watch(first, selectors.EVENT_READ, close_the_second)
    loop.watch(second, selectors.EVENT_READ, lambda: second.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    first_peer.send(b"x")
    second_peer.send(b"y")
    # the order the selector reports them in: make the first come first
    ready = loop.selector.select(1.0)
    assert {key.fileobj for key, _ in ready} == {first, second}
    loop.selector.select = lambda timeout=None: sorted(ready, key=lambda kv: kv[0].fileobj is not first)
    loop.run_once(1.0)
    assert calls == ["first"] and loop.counters["errors: event callback"] == 0
    for s in (first, first_peer, second_peer, *replacement):
        s.close()


def test_a_failing_close_is_counted_too(pair: tuple[socket.socket, socket.socket]) -> None:
    loop = Loop()
    a, b = pair

    def close() -> None:
        loop.unwatch(a)
        raise OSError("already gone")

    loop.watch(a, selectors.EVENT_READ, lambda: 1 / 0, close)  # type: ignore[func-returns-value]
    b.send(b"x")
    loop.run_once(1.0)
    assert loop.counters["errors: event callback"] == 2


def test_timers_run_when_due_and_guarded() -> None:
    clock = Clock()
    loop = Loop(clock=clock)
    ran: list[int] = []
    loop.call_later(5, lambda: ran.append(5))
    loop.call_later(1, lambda: ran.append(1))
    loop.call_later(2, lambda: 1 / 0)  # type: ignore[func-returns-value]
    loop.run_once(0)
    assert ran == []
    clock.now += 2
    loop.run_once(0)
    assert ran == [1] and loop.counters["errors: timer callback"] == 1
    clock.now += 3
    loop.run_once(0)
    assert ran == [1, 5]
    assert loop.next_timer() is None


def test_select_waits_no_longer_than_the_next_timer() -> None:
    loop = Loop()
    loop.call_later(0.05, lambda: None)
    import time
    started = time.monotonic()
    loop.run_once(5.0)
    assert time.monotonic() - started < 1.0


def test_a_listener_out_of_descriptors_pauses_doubling_and_resumes(
        pair: tuple[socket.socket, socket.socket]) -> None:
    clock = Clock()
    loop = Loop(clock=clock)
    listener, _ = pair
    ready = lambda: None  # noqa: E731
    loop.watch(listener, selectors.EVENT_READ, ready)
    pauses = []
    for _ in range(8):
        loop.pause(listener, selectors.EVENT_READ, ready, OSError(errno.EMFILE, "Too many open files"))
        assert not loop.watched(listener)  # not readable-and-spinning meanwhile
        due = loop.next_timer()
        assert due is not None
        pauses.append(round(due - clock.now, 3))
        clock.now = due
        loop.run_once(0)
        assert loop.watched(listener)
    assert pauses[0] == PAUSE_FIRST
    assert pauses == sorted(pauses) and pauses[-1] == PAUSE_LONGEST
    assert loop.counters["accept paused: EMFILE"] == 8
    loop.accepted(listener)  # it accepted again: the next pause is short again
    loop.pause(listener, selectors.EVENT_READ, ready, OSError(errno.ENFILE, "File table overflow"))
    due = loop.next_timer()
    assert due is not None and round(due - clock.now, 3) == PAUSE_FIRST


def test_a_paused_listener_closed_meanwhile_is_not_watched_again() -> None:
    clock = Clock()
    loop = Loop(clock=clock)
    listener = socket.socket()
    loop.pause(listener, selectors.EVENT_READ, lambda: None, OSError(errno.EMFILE, "x"))
    listener.close()
    clock.now += PAUSE_LONGEST
    loop.run_once(0)
    assert loop.counters["errors: timer callback"] == 0


def test_a_callback_that_holds_the_loop_is_logged_with_the_cpu_it_used(
        caplog: pytest.LogCaptureFixture) -> None:
    """Held for 80 ms by the clock, with next to no CPU of its own (it waited): the log
    tells the two apart (time the process did not run: a wait, or the CPU taken from it)."""
    now = [0.0]
    loop = Loop(clock=lambda: now[0])

    def slow() -> None:
        now[0] += 0.080

    with caplog.at_level("WARNING", logger="pinhole.enforcer.loop"):
        loop.guard(slow, None, "timer")
        loop.guard(lambda: None, None, "timer")
    assert loop.counters["slow callbacks"] == 1
    (record,) = caplog.records
    assert re.fullmatch(r"a timer callback \(.*slow\) held the loop for 80 ms \(0 ms of CPU\)",
                        record.getMessage()), record.getMessage()
