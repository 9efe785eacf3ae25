"""Both ends of the new-flow benchmark (P4), each run inside a testbed node.

Server (in s1)::

    python -m bench.flows server --addr 198.51.100.21 --ftp-port 21 --sink-port 6000

listens on ``--sink-port`` (accepts and closes every connection) and on
``--ftp-port`` with just enough FTP for the benchmark: a ``220`` greeting, and
for every ``PASV`` a fresh listening socket on an ephemeral port announced as
``227 Entering Passive Mode (h1,h2,h3,h4,p1,p2)``; it accepts one connection
there and closes it. Prints ``ready`` once both listeners are up; SIGTERM ends it.

Client (in c1), one JSON line on stdout::

    python -m bench.flows connects --addr A --port P --count N [--concurrency K]
    python -m bench.flows pasv --addr A --count N [--grant SOCKET --session ID]

``connects`` opens N TCP connections to A:P, at most K at a time (non-blocking
connect), and closes each once it is established: the time from ``connect()``
to established (one SYN / SYN-ACK exchange through the firewall) per connection,
and the wall time of all N. ``pasv`` opens one FTP control connection to A:21 and
N times sends ``PASV``, reads the ``227`` reply and times the ``connect()`` of
the data connection to the announced port. With ``--grant`` it first grants
that data connection through the enforcer's control socket (an
AllowFutureConnect for the session, single use), as an FTP application filter
would on seeing the ``227``, and times the grant too.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import selectors
import socket
import sys
import threading
import time
from typing import Any

FTP_GUID = "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101"
CONNECT_TIMEOUT = 2.0
PASV_RE = re.compile(rb"227 [^(]*\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)")


# -- server ----------------------------------------------------------------------------

def _listener(addr: str, port: int, backlog: int = 1024) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(backlog)
    return s


def _sink(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        conn.close()


def _ftp_session(conn: socket.socket, addr: str) -> None:
    with conn:
        conn.sendall(b"220 pinhole bench\r\n")
        buf = b""
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = line.strip().upper()
                if cmd == b"PASV":
                    with _listener(addr, 0, 1) as data_l:
                        port = data_l.getsockname()[1]
                        h = addr.replace(".", ",")
                        conn.sendall(f"227 Entering Passive Mode ({h},{port >> 8},{port & 255})\r\n"
                                     .encode())
                        data_l.settimeout(CONNECT_TIMEOUT + 1)
                        try:
                            data_conn, _ = data_l.accept()
                            data_conn.close()
                        except TimeoutError:
                            pass
                elif cmd == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"502 not here\r\n")


def _ftp(listener: socket.socket, addr: str) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_ftp_session, args=(conn, addr), daemon=True).start()


def serve(args: argparse.Namespace) -> int:
    sink = _listener(args.addr, args.sink_port)
    ftp = _listener(args.addr, args.ftp_port)
    threading.Thread(target=_sink, args=(sink,), daemon=True).start()
    threading.Thread(target=_ftp, args=(ftp, args.addr), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    return 0


# -- client ----------------------------------------------------------------------------

def connects(addr: str, port: int, count: int, concurrency: int) -> dict[str, Any]:
    """N connections, at most K in flight; per-connection connect time and the wall time."""
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    failed = 0
    started = 0
    t0 = time.perf_counter()
    while started < count or sel.get_map():
        while started < count and len(sel.get_map()) < concurrency:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            t = time.perf_counter()
            rc = s.connect_ex((addr, port))
            if rc not in (0, errno.EINPROGRESS):
                failed += 1
                s.close()
            else:
                sel.register(s, selectors.EVENT_WRITE, t)
            started += 1
        now = time.perf_counter()
        for key, _ in sel.select(timeout=0.05):
            done = key.fileobj
            assert isinstance(done, socket.socket)
            sel.unregister(done)
            if done.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                latencies.append(time.perf_counter() - key.data)
            else:
                failed += 1
            done.close()
        for key in list(sel.get_map().values()):
            if now - key.data > CONNECT_TIMEOUT:
                sel.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                failed += 1
    elapsed = time.perf_counter() - t0
    return {"latencies_us": [round(x * 1e6, 1) for x in latencies], "failed": failed,
            "elapsed": elapsed, "count": count, "concurrency": concurrency}


def _read_reply(ctl: socket.socket, buf: bytearray) -> bytes:
    while b"\n" not in buf:
        data = ctl.recv(4096)
        if not data:
            raise ConnectionError("control connection closed")
        buf += data
    i = buf.index(b"\n")
    line = bytes(buf[:i + 1])
    del buf[:i + 1]
    return line


def pasv(addr: str, count: int, grant: str | None, session: int | None) -> dict[str, Any]:
    """N PASV + data connect()s over one control connection to addr:21."""
    api = None
    if grant is not None:
        from enforcer.client import Client

        api = Client(grant)
    connect_us: list[float] = []
    grant_us: list[float] = []
    failed = 0
    ctl = socket.create_connection((addr, 21), timeout=CONNECT_TIMEOUT)
    ctl.settimeout(CONNECT_TIMEOUT + 2)
    buf = bytearray()
    try:
        _read_reply(ctl, buf)  # 220
        for _ in range(count):
            ctl.sendall(b"PASV\r\n")
            m = PASV_RE.search(_read_reply(ctl, buf))
            if m is None:
                raise RuntimeError("no 227 reply to PASV")
            h = ".".join(m.group(i).decode() for i in range(1, 5))
            port = int(m.group(5)) * 256 + int(m.group(6))
            if api is not None:
                assert session is not None
                t = time.perf_counter()
                api.allow_future_connect(session, (h, port), protocol_guid=FTP_GUID)
                grant_us.append((time.perf_counter() - t) * 1e6)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(CONNECT_TIMEOUT)
            t = time.perf_counter()
            try:
                s.connect((h, port))
                connect_us.append((time.perf_counter() - t) * 1e6)
            except OSError:
                failed += 1
            finally:
                s.close()
        ctl.sendall(b"QUIT\r\n")
    finally:
        ctl.close()
        if api is not None:
            api.close()
    return {"connect_us": [round(x, 1) for x in connect_us], "grant_us": [round(x, 1) for x in grant_us],
            "failed": failed, "count": count}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--addr", required=True)
    s.add_argument("--ftp-port", type=int, default=21)
    s.add_argument("--sink-port", type=int, default=6000)
    c = sub.add_parser("connects")
    c.add_argument("--addr", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--count", type=int, default=300)
    c.add_argument("--concurrency", type=int, default=1)
    p = sub.add_parser("pasv")
    p.add_argument("--addr", required=True)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--grant", help="the enforcer's control socket: grant each data connection")
    p.add_argument("--session", type=int)
    args = ap.parse_args(argv)
    if args.cmd == "server":
        return serve(args)
    if args.cmd == "connects":
        out = connects(args.addr, args.port, args.count, args.concurrency)
    else:
        out = pasv(args.addr, args.count, args.grant, args.session)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
