"""The daemon's one event loop: readiness callbacks, timers, and the guard around them.

No callback can stop the loop. An exception is logged and counted, what the
callback belonged to (a client's connection, say) is closed, and the loop goes
on. A listener that runs out of file descriptors pauses for a while instead of
spinning on a socket that stays readable.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import selectors
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pinhole.enforcer.loop")

# accept() errors that mean "no resources now", not "this connection is bad"
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PAUSE_FIRST, PAUSE_LONGEST = 0.05, 1.0  # seconds a listener out of resources rests
SLOW = 0.05  # a callback that holds the loop longer than this (s) is logged and counted


@dataclass(frozen=True, slots=True)
class Watch:
    """What to call when a file object is ready, and what to close if that call fails."""

    ready: Callable[[], None]
    close: Callable[[], None] | None = None


class Loop:
    def __init__(self, counters: Counter[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.selector = selectors.DefaultSelector()
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.clock = clock
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._paused: dict[int, float] = {}  # listener fd -> its last pause (s)

    # --- file objects -------------------------------------------------------------------
    def watch(self, fileobj: Any, events: int, ready: Callable[[], None],
              close: Callable[[], None] | None = None) -> None:
        """Call ``ready`` when ``fileobj`` is ready for ``events`` (registered or changed)."""
        watch = Watch(ready, close)
        try:
            self.selector.modify(fileobj, events, watch)
        except KeyError:
            self.selector.register(fileobj, events, watch)

    def unwatch(self, fileobj: Any) -> None:
        """Stop watching ``fileobj`` (nothing happens if it was not watched)."""
        with contextlib.suppress(KeyError, ValueError):  # not registered, or closed already
            self.selector.unregister(fileobj)

    def watched(self, fileobj: Any) -> bool:
        try:
            self.selector.get_key(fileobj)
        except (KeyError, ValueError):
            return False
        return True

    def pause(self, fileobj: Any, events: int, ready: Callable[[], None], why: OSError) -> None:
        """A listener whose accept() failed for want of resources (EMFILE, ENFILE, ...):
        unwatched for a while (doubling up to PAUSE_LONGEST while it goes on), then
        watched again."""
        fd = fileobj.fileno()
        pause = min(PAUSE_LONGEST, self._paused.get(fd, PAUSE_FIRST / 2) * 2)
        self._paused[fd] = pause
        self.counters[f"accept paused: {errno.errorcode.get(why.errno or 0, why.errno)}"] += 1
        log.warning("cannot accept connections (%s): pausing the listener for %.2f s", why, pause)
        self.unwatch(fileobj)

        def resume() -> None:
            if fileobj.fileno() >= 0:  # not closed meanwhile
                self.watch(fileobj, events, ready)

        self.call_later(pause, resume)

    def accepted(self, fileobj: Any) -> None:
        """A listener accepted again: its next pause starts short."""
        self._paused.pop(fileobj.fileno(), None)

    # --- timers -------------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (self.clock() + delay, next(self._order), callback))

    def next_timer(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    # --- running ------------------------------------------------------------------------
    def run_once(self, timeout: float) -> None:
        """Wait up to ``timeout`` (less if a timer is due sooner), then run what is ready
        and the timers that are due, each under the guard."""
        due = self.next_timer()
        if due is not None:
            timeout = max(0.0, min(timeout, due - self.clock()))
        ready = self.selector.select(timeout)
        now, turn = self.clock(), next(self._order)  # timers set during this turn wait for the next
        registered = self.selector.get_map()
        for key, _ in ready:
            # An earlier callback of this turn may have unwatched (and closed) it: a client's
            # reset, read first, closes the socket of its connect, which was ready too.
            current = registered.get(key.fd)
            if current is None or current.fileobj is not key.fileobj:
                continue
            watch: Watch = key.data
            self.guard(watch.ready, watch.close, "event")
        while self._timers and self._timers[0][0] <= now and self._timers[0][1] < turn:
            _, _, callback = heapq.heappop(self._timers)
            self.guard(callback, None, "timer")

    def guard(self, call: Callable[[], None], close: Callable[[], None] | None, what: str) -> None:
        """Run ``call``; if it raises, log and count it and close what it belonged to. One
        that holds the loop longer than SLOW is logged and counted too."""
        started, cpu = self.clock(), time.thread_time()
        try:
            call()
        except Exception:
            self.counters[f"errors: {what} callback"] += 1
            log.exception("a %s callback failed%s", what,
                          "; closing what it served" if close is not None else "")
            if close is not None:
                try:
                    close()
                except Exception:
                    self.counters[f"errors: {what} callback"] += 1
                    log.exception("closing after a failed %s callback failed too", what)
        took = self.clock() - started
        if took > SLOW:
            self.counters["slow callbacks"] += 1
            log.warning("a %s callback (%s) held the loop for %.0f ms (%.0f ms of CPU)", what,
                        getattr(call, "__qualname__", call), took * 1e3,
                        (time.thread_time() - cpu) * 1e3)

    def close(self) -> None:
        self.selector.close()
