"""Worker processes: where one core is not enough for the user-mode flows' packets.

With ``dataplane.workers = N`` the enforcer starts N worker processes
(``enforcer.worker``), worker k reading queue ``dataplane.queue + k``. The main
process still reads the main queue: every new flow's first packet, and the flows a
worker cannot carry alone: a flow with a data or application filter (an application
filter calls the session API, which only the main process serves; and the byte budgets
of the streams filters hold back, rule 16, are one process's to keep exact), a user-mode
redirect (its client's packets are queued before conntrack, where no connmark can steer
them), flows to binds, the ICMP errors the fw sends. When it admits any other user-mode
flow, it picks the next worker that is ready, puts the worker's number in the flow's
mark (``enforcer.core.marks.MARK_WORKER``: the kernel's rules send every later packet
of the flow to that worker's queue) and hands the worker a copy of the flow's record
before the verdict leaves. The worker reads what the main process sent before each
batch of packets, so it knows a flow before the flow's second packet can reach it.

The main process never waits for a worker: it writes to a non-blocking socket (a full
one, a worker that does not read, costs the flow: its packets are dropped there, the
enforcer fails closed), and reads what workers send when the loop finds it ready:
``ready`` once a worker has bound its queue, and what each saw of its flows (packets,
bytes, last seen, FINs: what the flows listing shows and what the main process lets
flows go by) and its counters, ``QUIET_REPORT`` after its queue runs dry and at least
every ``REPORT_INTERVAL`` while it is busy. A worker that dies loses nothing the main
process does not hold: a successor starts in its place (at most once per
``RESTART_DELAY``, doubling while successors fail), and the main process hands it
the dead one's flows. Until then the dead worker's queue has no reader: the kernel
drops its packets (or passes them, only with ``fail_open``), and no new flow goes there.
A worker says something at least every ``HEARTBEAT`` (an empty report when it has nothing
to tell); one that has said nothing for ``SILENCE_LIMIT`` (a starting one: for
``START_TIMEOUT``) is taken to hang, whatever holds it: the main process kills it and it
is replaced as a dead one is.

Messages are pickled tuples on a SOCK_SEQPACKET socket pair, one message a datagram:
between two processes of the same program, run as root, over a socket no one else has.
"""

from __future__ import annotations

import logging
import pickle
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from enforcer.config import Config
from enforcer.core.flows import ConntrackTimeouts, Figures, FlowRecord
from enforcer.core.packet import FlowKey
from enforcer.dataplane import Interfaces

log = logging.getLogger("pinhole.workers")

REPORT_INTERVAL = 0.25  # seconds between a worker's reports of what it saw, while busy
QUIET_REPORT = 0.01  # seconds after its queue runs dry: figures reach the listing soon
RESTART_DELAY = 1.0  # seconds before a dead worker's successor starts (doubling, to 60)
START_TIMEOUT = 10.0  # seconds the enforcer waits at start for its workers to bind their queues
HEARTBEAT = 1.0  # seconds: a worker with nothing to report says so at least this often
SILENCE_LIMIT = 5.0  # seconds a ready worker may say nothing before it is taken to hang
# Each way, asked for (the kernel grants up to net.core.wmem_max/rmem_max, doubled: 416 KiB
# by default, room for hundreds of hand-overs), and the largest message it can carry
SOCKET_BUFFER = 4 << 20
MESSAGE_SIZE = 1 << 20
FLOWS_PER_MESSAGE = 256  # flows' figures (or records) per message (about 50 KiB)


class WorkerError(Exception):
    """A worker cannot be started, or cannot be told something."""


@dataclass(frozen=True)
class Setup:
    """What a worker is told at its start (its first message)."""

    index: int  # 1..N: its queue is the main queue's number plus this
    config: Config
    interfaces: Interfaces
    conntrack: ConntrackTimeouts
    log_level: int


def send(sock: socket.socket, message: tuple[Any, ...]) -> None:
    """One message (raises BlockingIOError on a full non-blocking socket, OSError)."""
    sock.send(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))


def receive(sock: socket.socket) -> Iterator[tuple[Any, ...] | None]:
    """The messages waiting on a non-blocking socket; None for its end (the peer is gone)."""
    while True:
        try:
            data = sock.recv(MESSAGE_SIZE)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""
        if not data:
            yield None
            return
        yield pickle.loads(data)


def wait_for(sock: socket.socket, timeout: float) -> tuple[Any, ...] | None:
    """The next message, waiting at most ``timeout`` (at start only); None: none came, or
    the peer is gone. The socket is left non-blocking."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(MESSAGE_SIZE)
    except OSError:  # a timeout, a reset
        data = b""
    finally:
        sock.setblocking(False)
    return pickle.loads(data) if data else None


def socket_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (ours, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    ours.setblocking(False)
    theirs.setblocking(False)
    return ours, theirs


def report_messages(figures: Iterable[tuple[FlowKey, float, Figures]],
                    counters: Counter[str]) -> Iterator[tuple[Any, ...]]:
    """A worker's report, cut into messages: ("seen", flows' figures, counters' growth)."""
    batch: list[tuple[FlowKey, float, Figures]] = []
    for item in figures:
        batch.append(item)
        if len(batch) == FLOWS_PER_MESSAGE:
            yield ("seen", batch, Counter())
            batch = []
    yield ("seen", batch, counters)


class Worker:
    """One worker process, as the main process sees it."""

    def __init__(self, index: int, queue: int) -> None:
        self.index = index
        self.queue = queue
        self.process: subprocess.Popen[bytes] | None = None
        self.socket: socket.socket | None = None
        self.ready = False
        self.starts = 0
        self.delay = RESTART_DELAY
        self.due = 0.0  # when a dead one may start again
        self.heard = 0.0  # when the main process last heard from it (or started it)
        # flows to hand it that its socket had no room for yet (a successor's, at its start)
        self.backlog: list[FlowRecord] = []

    def start(self, setup: Setup, now: float) -> None:
        ours, theirs = socket_pair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "enforcer.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            send(ours, ("setup", setup))
        except OSError as exc:
            ours.close()
            raise WorkerError(f"cannot start worker {self.index}: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        self.socket = ours
        self.ready = False
        self.starts += 1
        self.heard = now

    def gone(self, now: float) -> None:
        """Its socket ended: it died (or is going)."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        if self.ready:
            self.delay = RESTART_DELAY  # it had worked: the next one starts soon
        else:
            self.delay = min(60.0, self.delay * 2)
        self.ready = False
        self.backlog = []  # its successor is handed the flows anew
        self.due = now + self.delay
        self.reap()

    def silent(self, now: float) -> bool:
        """Whether it runs and has said nothing for longer than it may."""
        return self.socket is not None and \
            now - self.heard > (SILENCE_LIMIT if self.ready else START_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL, at once (it is reaped later, by ``reap``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def reap(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            self.process = None

    def stop(self) -> None:
        """Close its socket (it then exits) and wait a moment for it; kill it if need be."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        if self.process is not None:
            try:
                self.process.wait(2.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def status(self, now: float) -> dict[str, object]:
        """``silent_s``: seconds since the main process last heard from it (None: it is
        not running; past ``SILENCE_LIMIT`` it is killed)."""
        return {"worker": self.index, "queue": self.queue, "ready": self.ready,
                "pid": None if self.process is None else self.process.pid, "starts": self.starts,
                "silent_s": None if self.socket is None else round(now - self.heard, 1)}


class WorkerPool:
    """The main process's side of its workers."""

    def __init__(self, setup: Setup, clock: Callable[[], float] = time.monotonic) -> None:
        """``setup``: what every worker is told (its ``index`` each worker's own)."""
        self.setup = setup
        self.clock = clock
        dp = setup.config.dataplane
        self.workers = {k: Worker(k, dp.queue + k) for k in range(1, dp.workers + 1)}

    def start(self) -> None:
        """Start every worker and wait (at most ``START_TIMEOUT``) until each has bound its
        queue: at start only, before the loop runs."""
        for worker in self.workers.values():
            worker.start(self._setup_of(worker), self.clock())
        deadline = self.clock() + START_TIMEOUT
        for worker in self.workers.values():
            assert worker.socket is not None
            message = wait_for(worker.socket, max(0.1, deadline - self.clock()))
            if message is None:
                raise WorkerError(f"worker {worker.index} did not start (it exited, or did not "
                                  f"bind its queue within {START_TIMEOUT:g} s)")
            if message[0] == "failed":
                raise WorkerError(f"worker {worker.index}: {message[1]}")
            worker.ready = True
            worker.heard = self.clock()

    def _setup_of(self, worker: Worker) -> Setup:
        return replace(self.setup, index=worker.index)

    @property
    def ready(self) -> tuple[int, ...]:
        return tuple(k for k, w in self.workers.items() if w.ready)

    def hand_over(self, record: FlowRecord, index: int) -> None:
        """Tell a worker of a flow it now holds (raises WorkerError if it cannot be told)."""
        self._tell(index, ("add", [record]))

    def flush(self, index: int) -> None:
        """Send what a worker's socket has room for of its backlog, of the flows still
        held (the rest at a later call; raises WorkerError if it cannot be written to)."""
        worker = self.workers[index]
        while worker.backlog and worker.socket is not None:
            batch = [r for r in worker.backlog[:FLOWS_PER_MESSAGE]
                     if r.held_as is not None and r.worker == index]
            if batch:
                try:
                    send(worker.socket, ("add", batch))
                except BlockingIOError:
                    return
                except OSError as exc:
                    worker.backlog = []
                    raise WorkerError(f"cannot write to worker {index}: "
                                      f"{exc.strerror or exc}") from None
            del worker.backlog[:FLOWS_PER_MESSAGE]

    @property
    def backlogged(self) -> list[int]:
        return [k for k, w in self.workers.items() if w.backlog]

    def let_go(self, key: FlowKey, admitted_at: float, index: int) -> None:
        self._tell(index, ("forget", key, admitted_at))

    def _tell(self, index: int, message: tuple[Any, ...]) -> None:
        worker = self.workers[index]
        if worker.socket is None:
            raise WorkerError(f"worker {index} is not running")
        try:
            send(worker.socket, message)
        except BlockingIOError:
            raise WorkerError(f"worker {index} is not reading (its socket is full)") from None
        except OSError as exc:
            raise WorkerError(f"cannot write to worker {index}: {exc.strerror or exc}") from None

    def read(self, index: int) -> tuple[list[tuple[Any, ...]], bool]:
        """What worker ``index`` sent, and whether it has gone (its socket ended: stop
        watching it, then say ``lost``)."""
        worker = self.workers[index]
        if worker.socket is None:
            return [], False
        messages: list[tuple[Any, ...]] = []
        for message in receive(worker.socket):
            if message is None:
                log.error("worker %d (pid %s) exited", index,
                          None if worker.process is None else worker.process.pid)
                return messages, True
            worker.heard = self.clock()
            if message[0] == "ready":
                worker.ready = True
                log.info("worker %d reads queue %d", index, worker.queue)
            elif message[0] == "failed":
                log.error("worker %d cannot run: %s", index, message[1])
            messages.append(message)
        return messages, False

    def lost(self, index: int) -> None:
        """Worker ``index``'s socket ended (``read`` said so, and it is watched no more)."""
        self.workers[index].gone(self.clock())

    def silent(self, now: float) -> list[int]:
        """The running workers that have said nothing for longer than they may."""
        return [k for k, w in self.workers.items() if w.silent(now)]

    def kill(self, index: int) -> None:
        """Kill a worker taken to hang (then say ``lost``: its successor starts as a dead
        one's does)."""
        worker = self.workers[index]
        log.error("worker %d (pid %s) has said nothing for %.1f s: killed", index,
                  None if worker.process is None else worker.process.pid,
                  self.clock() - worker.heard)
        worker.kill()

    def due(self, now: float) -> list[Worker]:
        """The dead workers whose successors may start now (each reaped if it has exited)."""
        out = []
        for worker in self.workers.values():
            worker.reap()
            if worker.socket is None and now >= worker.due:
                out.append(worker)
        return out

    def restart(self, worker: Worker) -> bool:
        """Start a dead worker's successor; False if it could not start (tried again later)."""
        try:
            worker.start(self._setup_of(worker), self.clock())
        except WorkerError as exc:
            log.error("%s", exc)
            worker.gone(self.clock())
            return False
        return True

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()

    def status(self) -> list[dict[str, object]]:
        now = self.clock()
        return [w.status(now) for w in self.workers.values()]
