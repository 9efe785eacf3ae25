"""Accept-all NFQUEUE consumers, one per Python binding, for ``bench.bindings``.

Run inside the firewall namespace::

    python -m bench.consumers --binding netfilterqueue|fnfqueue|pinhole [--queue 5] [--gso]

The consumer binds the queue, prints ``ready`` on stdout, then accepts every
packet and counts it. On SIGTERM (or SIGINT) it prints one JSON line with its
counters and exits. Its ``cpu_seconds`` is the process's CPU time since ``ready``,
user and system; the kernel's work on a verdict, the rest of the packet's
forwarding included, counts as the consumer's system time. If the binding cannot
be imported or bound, it prints one JSON line ``{"error": ...}`` instead of
``ready`` and exits with status 2.

The NetfilterQueue consumer is shaped like the enforcer's data plane
(``enforcer/daemon.py``): ``max_len=8192``, a selector on the queue descriptor
and ``run(block=False)``. The fnfqueue consumer follows the fnfqueue traps in
FIELD_NOTES.md: a large netlink receive buffer, batched receive, and
``BufferOverflowException`` caught and cleared with ``reset()``. The pinhole
consumer is the enforcer's own binding (``enforcer/nfqueue.py``) in the shape the
enforcer's loop would use it: a selector on its socket, ``receive(64)``, a verdict
each, ``flush()`` after each batch.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import SignalStop

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
QUEUE_MAXLEN = 8192  # as the enforcer binds its queue
FNFQUEUE_RCVBUF = 64 * 1024 * 1024
FNFQUEUE_BATCH = 64
PINHOLE_BATCH = 64  # as the enforcer decides queued packets a turn


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def run_netfilterqueue(queue: int, gso: bool) -> int:
    if gso:
        _emit({"error": "NetfilterQueue 1.1.0 cannot set NFQA_CFG_F_GSO"})
        return 2
    try:
        from netfilterqueue import NetfilterQueue
    except ImportError as exc:
        _emit({"error": f"netfilterqueue not installed: {exc}"})
        return 2

    counters = {"packets": 0}

    def on_packet(pkt: Any) -> None:
        counters["packets"] += 1
        pkt.accept()

    nfq = NetfilterQueue()
    try:
        nfq.bind(queue, on_packet, max_len=QUEUE_MAXLEN)
    except OSError as exc:
        _emit({"error": f"cannot bind queue {queue}: {exc}"})
        return 2

    queue_sock = socket.socket(fileno=os.dup(nfq.get_fd()))
    try:
        seconds, cpu = serve(queue_sock, lambda: nfq.run(block=False))
        _emit({
            "binding": "netfilterqueue",
            "packets": counters["packets"],
            "overflows": None,  # NetfilterQueue swallows ENOBUFS silently
            "seconds": seconds,
            "cpu_seconds": cpu,
        })
    finally:
        nfq.unbind()
        queue_sock.close()
    return 0


def serve(sock: socket.socket, readable: Callable[[], None]) -> tuple[float, float]:
    """Say ``ready``, then call ``readable`` whenever ``sock`` is, until SIGTERM or SIGINT:
    (wall seconds, CPU seconds) it took."""
    stop = SignalStop()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "queue")
    sel.register(stop.wake, selectors.EVENT_READ, "wake")
    started, cpu_started = time.monotonic(), time.process_time()
    _ready()
    try:
        while not stop.stopped:
            for key, _ in sel.select(timeout=1.0):
                if key.data == "queue":
                    readable()
                else:
                    stop.drain()
    finally:
        stop.close()
        sel.close()
    return round(time.monotonic() - started, 3), round(time.process_time() - cpu_started, 3)


class _Stop(Exception):
    pass


def run_fnfqueue(queue: int, gso: bool) -> int:
    try:
        import fnfqueue
    except ImportError as exc:
        _emit({"error": f"fnfqueue not installed: {exc}"})
        return 2

    def on_signal(_signum: int, _frame: object) -> None:
        # The main thread blocks in a Condition wait inside fnfqueue's
        # iterator; lock waits are interruptible, so raising here ends it.
        raise _Stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    packets = 0
    overflows = 0
    # alloc_size must be >= chunk_size: the reader thread tops its buffer pool
    # up by alloc_size and dies (ValueError) if that is less than one chunk.
    conn = fnfqueue.Connection(alloc_size=2 * FNFQUEUE_BATCH, chunk_size=FNFQUEUE_BATCH)
    try:
        # fnfqueue leaves the netlink socket at the system default receive
        # buffer, which overflows at once under load: force a large one.
        s = socket.socket(fileno=os.dup(conn._conn.fd))
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, FNFQUEUE_RCVBUF)
            rcvbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        finally:
            s.close()
        q = conn.bind(queue)
        q.set_mode(fnfqueue.MAX_PAYLOAD, fnfqueue.COPY_PACKET)
        q.set_maxlen(QUEUE_MAXLEN)
        if gso:
            q.gso = True  # only ever set: clearing a flag in 1.1.2 sets it
    except OSError as exc:
        _emit({"error": f"cannot bind queue {queue}: {exc}"})
        conn.close()
        return 2

    started, cpu_started = time.monotonic(), time.process_time()
    _ready()
    try:
        while True:
            try:
                for pkt in conn:
                    pkt.accept()
                    packets += 1
                break  # the iterator ends only when the connection is closed
            except fnfqueue.BufferOverflowException:
                overflows += 1
                conn.reset()
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _emit({
            "binding": "fnfqueue",
            "packets": packets,
            "overflows": overflows,
            "rcvbuf": rcvbuf,
            "gso": gso,
            "seconds": round(time.monotonic() - started, 3),
            "cpu_seconds": round(time.process_time() - cpu_started, 3),
        })
        conn.close()
    return 0


def run_pinhole(queue: int, gso: bool) -> int:
    from enforcer.nfqueue import Queue, QueueError, keep_freed_memory

    keep_freed_memory()  # as the enforcer would at start: GSO batches are megabytes of payloads
    try:
        nfq = Queue(queue, max_len=QUEUE_MAXLEN, gso=gso)
    except QueueError as exc:
        _emit({"error": str(exc)})
        return 2

    counts = {"packets": 0, "gso_packets": 0}

    def decide() -> None:
        batch = nfq.receive(PINHOLE_BATCH)
        for pkt in batch:
            nfq.verdict(pkt.packet_id, True)
            counts["gso_packets"] += pkt.gso
        nfq.flush()
        counts["packets"] += len(batch)

    try:
        seconds, cpu = serve(nfq.socket, decide)
        _emit({
            "binding": "pinhole",
            **counts,
            "overflows": nfq.overflows,
            "verdict_errors": nfq.verdict_errors,
            "rcvbuf": nfq.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            "gso": gso,
            "seconds": seconds,
            "cpu_seconds": cpu,
        })
    finally:
        nfq.close()
    return 0


RUNNERS = {"netfilterqueue": run_netfilterqueue, "fnfqueue": run_fnfqueue, "pinhole": run_pinhole}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binding", required=True, choices=sorted(RUNNERS))
    ap.add_argument("--queue", type=int, default=5)
    ap.add_argument("--gso", action="store_true", help="ask the kernel for GSO super-packets")
    args = ap.parse_args(argv)
    return RUNNERS[args.binding](args.queue, args.gso)


if __name__ == "__main__":
    sys.exit(main())
