"""Pieces the benchmarks share: processes in testbed nodes, iperf3, medians, tables.

Everything here runs on the host and drives the namespaces of one ``Testbed``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from testbed.build import Testbed

ROOT = Path(__file__).resolve().parent.parent
CLIENT, SERVER, FW = "c1", "s1", "fw"
CLIENT_ADDR = "192.0.2.11"
SERVER_ADDR = "198.51.100.21"
IPERF_PORT = 5201
READY_TIMEOUT = 10.0


# -- statistics -------------------------------------------------------------------------

def median(xs: Iterable[float | None]) -> float | None:
    """Median of the values that are not None, or None if there are none."""
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# -- processes in nodes -----------------------------------------------------------------

def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """One line from ``proc``'s unbuffered stdout, or None on EOF/timeout."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip() or None


def stop_proc(tb: Testbed, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> tuple[str, str]:
    """SIGTERM ``proc``, reap it, forget it; return (stdout, stderr)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    tb.forget(proc.pid)
    return (out or b"").decode(errors="replace"), (err or b"").decode(errors="replace")


def last_json(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                obj: dict[str, Any] = json.loads(line)
                return obj
    return None


def wait_listening(tb: Testbed, node: str, port: int, proc: subprocess.Popen[Any],
                   timeout: float = READY_TIMEOUT) -> None:
    """Return once ``node`` has a TCP listener on ``port``; raise if ``proc`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = tb.run(node, ["ss", "-Hltn", f"sport = :{port}"], check=False)
        if r.stdout.strip():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {node}:{port}")


def queue_stats(tb: Testbed, queue: int) -> dict[str, int] | None:
    """Kernel counters of one NFQUEUE in fw (/proc/net/netfilter/nfnetlink_queue):
    current length, drops, and ``id_sequence`` (the id of the last packet queued,
    so its growth counts packets)."""
    r = tb.run(FW, ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False)
    for line in r.stdout.splitlines():
        f = line.split()
        if len(f) >= 8 and f[0] == str(queue):
            return {"queue_total": int(f[2]), "queue_dropped": int(f[5]), "user_dropped": int(f[6]),
                    "id_sequence": int(f[7])}
    return None


# -- iperf3 ----------------------------------------------------------------------------

class IperfServer:
    """``iperf3 -s`` on the server node."""

    def __init__(self, tb: Testbed, port: int = IPERF_PORT) -> None:
        self.tb = tb
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = self.tb.popen(SERVER, ["iperf3", "-s", "-B", SERVER_ADDR, "-p", str(self.port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_listening(self.tb, SERVER, self.port, self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError("iperf3 server on s1 did not start listening") from None

    def stop(self) -> None:
        if self.proc is not None:
            stop_proc(self.tb, self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def run_iperf(tb: Testbed, seconds: int, port: int = IPERF_PORT,
              addr: str = SERVER_ADDR, streams: int = 1) -> tuple[float, float, int | None]:
    """(bits/s received, seconds, retransmits) of one iperf3 TCP test c1 -> s1 (``addr``:
    where c1 connects, the server's address unless a redirect leads there; ``streams``
    connections at once, their sum)."""
    r = tb.run(CLIENT, ["iperf3", "-c", addr, "-p", str(port), "-t", str(seconds), "-J",
                        "--connect-timeout", "3000", "-P", str(streams)],
               check=False, timeout=seconds + 20)
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 gave no JSON (exit {r.returncode}): {r.stderr.strip()}") from None
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    recv = end["sum_received"]
    return float(recv["bits_per_second"]), float(recv["seconds"]), end.get("sum_sent", {}).get(
        "retransmits")


def iperf_version() -> str | None:
    r = subprocess.run(["iperf3", "--version"], capture_output=True, text=True, check=False)
    return r.stdout.split("\n", 1)[0].strip() or None


# -- output ----------------------------------------------------------------------------

def format_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to width: the first left-aligned, the middle ones right-aligned,
    and the last one (a note) left as it is."""
    lines = [tuple(head), *(tuple(r) for r in rows)]
    widths = [max(len(r[i]) for r in lines) for i in range(len(head) - 1)]
    out = []
    for r in lines:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:], strict=True)]
        out.append(("  ".join(cells) + ("  " + r[-1] if r[-1] else "")).rstrip())
    return "\n".join(out)


class SignalStop:
    """SIGTERM or SIGINT sets ``stopped`` and makes ``wake`` readable, so that a loop
    waiting in a selector with it registered notices at once (then ``drain`` it).
    ``close`` gives the wake-up back."""

    def __init__(self) -> None:
        self.stopped = False
        self.wake, self._write = socket.socketpair()
        self._write.setblocking(False)
        signal.set_wakeup_fd(self._write.fileno())
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.stopped = True

    def drain(self) -> None:
        self.wake.recv(512)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.wake.close()
        self._write.close()
