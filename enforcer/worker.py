"""One worker process: the later packets of the user-mode flows the main process handed it
(``enforcer.workers`` says how the two share the work).

Run by the main process as ``python -m enforcer.worker FD``, FD its end of a socket
pair. It binds its queue, says ``ready``, and then decides each packet of its flows with
its own decision core (the same ``handle`` as the main process: rule 17's ingress check,
the flow's record, its counts), reading what the main process sent before each batch of
packets. It touches no rule and no kernel state; when the main process goes
(the socket ends) or a signal stops it, it unbinds its queue and exits.
"""

from __future__ import annotations

import logging
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable

from enforcer import daemon
from enforcer.core.engine import Engine
from enforcer.nfqueue import Queue, QueueError
from enforcer.workers import (
    HEARTBEAT,
    QUIET_REPORT,
    REPORT_INTERVAL,
    START_TIMEOUT,
    Setup,
    receive,
    report_messages,
    send,
    wait_for,
)

log = logging.getLogger("pinhole.worker")

# Bytes of each packet the kernel copies to the worker. Its flows' packets pass as they
# came (no filter, no redirect: the verdict carries no payload), so it reads their
# headers alone, and any ICMP error about them whole (at most 1280 bytes, RFC 4443;
# ICMPv4's at most 576, RFC 1812), not the 64 KiB of a GSO packet twice over.
COPY_RANGE = 1280


class WorkerProcess:
    """A worker's state and loop."""

    def __init__(self, sock: socket.socket, setup: Setup, clock: Callable[[], float]) -> None:
        self.sock = sock
        self.setup = setup
        self.clock = clock
        # no filters: a filtered flow stays in the main process
        self.engine: Engine = daemon.build_engine(setup.config, setup.interfaces, setup.conntrack,
                                                  [], {})
        self.arrived_on = daemon.Arrivals(setup.interfaces)
        self.reported: Counter[str] = Counter()
        self.since = clock()
        self.said = self.since  # when it last sent something
        self.queue: Queue | None = None

    def bind(self) -> None:
        """Bind its queue: GSO, failing open only as configured; the buffer a flow's
        datagrams wait in is the increased one (every packet of its flows waits there)."""
        dp = self.setup.config.dataplane
        self.queue = Queue(dp.queue + self.setup.index, max_len=daemon.QUEUE_LENGTH, gso=True,
                           fail_open=dp.fail_open, copy_range=COPY_RANGE,
                           receive_buffer=max(dp.receive_buffer or 0, dp.increased_receive_buffer))

    def run(self) -> None:
        assert self.queue is not None
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ)
        selector.register(self.queue.socket, selectors.EVENT_READ)
        next_report = self.clock() + REPORT_INTERVAL
        while True:
            # (packets held from the last turn go on at once)
            selector.select(0.0 if self.queue.waiting else max(0.0, next_report - self.clock()))
            # what the main process sent first: a flow's hand-over came before its packets
            if not self.from_main():
                return
            if self.on_queue():  # all read: what the flows did is told soon
                next_report = min(next_report, self.clock() + QUIET_REPORT)
            now = self.clock()
            if now >= next_report:
                self.report(now)
                next_report = now + REPORT_INTERVAL

    def from_main(self) -> bool:
        """Take what the main process sent; False once it has gone."""
        now = self.clock()
        for message in receive(self.sock):
            if message is None:
                return False
            if message[0] == "add":
                for record in message[1]:
                    self.engine.take_over(record, now)
            elif message[0] == "forget":
                self.engine.let_go(message[1], message[2], now)
        return True

    def on_queue(self) -> bool:
        """One turn of the queue (as the main process's, ``Daemon.on_queue``): each packet
        decided and its verdict buffered, then all sent in one go; whether there were some
        and none is left waiting."""
        assert self.queue is not None
        taken = 0
        for packet in self.queue.turn(daemon.PACKETS_PER_TURN, self.clock() + daemon.TURN_SECONDS,
                                      self.clock):
            taken += 1
            try:
                answer = self.engine.handle(daemon.queued_packet(packet, self.arrived_on),
                                            self.clock())
                self.queue.verdict(packet.packet_id, answer.accept, mark=answer.mark,
                                   payload=answer.packet)
            except Exception:  # a bug in the shell: drop the packet, and keep enforcing
                log.exception("dropping a packet the worker failed to pass on")
                self.queue.verdict(packet.packet_id, False)
        self.queue.flush()
        return taken > 0 and not self.queue.waiting

    def report(self, now: float) -> None:
        """What it saw of its flows since the last report, and its counters' growth; the
        flows conntrack has forgotten let go (as the main process lets them go). A report
        the main process has no room for now is sent whole next time. With nothing to
        tell, an empty one at least every ``HEARTBEAT``: the main process takes a worker
        that says nothing to hang."""
        self.engine.flows.expire(now)
        figures = [(r.key, r.admitted_at, r.figures())
                   for r in self.engine.flows.seen_since(self.since)]
        counters = self.engine.counters - self.reported
        if not figures and not counters and now < self.said + HEARTBEAT:
            return
        try:
            for message in report_messages(figures, counters):
                send(self.sock, message)
        except BlockingIOError:
            return
        self.since = self.said = now
        self.reported = Counter(self.engine.counters)


def main(argv: list[str] | None = None) -> int:
    """A worker's life; it ends quietly (1) once the main process has gone, which may be
    at any moment (another worker failed to start, say): its socket then breaks."""
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    try:
        return _serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        return 1


def _serve(sock: socket.socket) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process says when to stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    message = wait_for(sock, START_TIMEOUT)
    if message is None or message[0] != "setup":
        return 1
    setup: Setup = message[1]
    logging.basicConfig(level=setup.log_level,
                        format=f"%(asctime)s worker {setup.index} %(levelname)s %(name)s: %(message)s")
    try:
        worker = WorkerProcess(sock, setup, time.monotonic)
        worker.bind()
    except QueueError as exc:
        send(sock, ("failed", str(exc)))
        return 1
    assert worker.queue is not None
    try:
        daemon.settle_heap()
        send(sock, ("ready",))
        worker.run()
    finally:
        worker.queue.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
