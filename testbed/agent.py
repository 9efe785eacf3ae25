"""One long-lived helper process per network namespace.

Scapy caches interfaces and routes when it is imported, so everything that works
at packet level runs in a process started *inside* the namespace:
``ip netns exec <netns> python -m testbed.agent``. The caller talks to it over
the process's stdin/stdout, one JSON object per line:

- request:  ``{"id": 7, "method": "send", "params": {...}}``
- response: ``{"id": 7, "result": ...}`` or ``{"id": 7, "error": "message"}``
- the agent's first line is ``{"event": "ready", "pid": ...}``.

Every request is served in its own thread, so a sniffer and a sender (or a
server and a client) in the same agent work together. Packets travel as
base64-encoded raw bytes plus the name of their outermost Scapy layer, and are
rebuilt on the caller's side.

Caller side: :class:`Agent`, :class:`Sniffer`, :class:`ServerHandle`,
:class:`AgentError`. Agent side: :func:`serve` (run by ``python -m testbed.agent``).
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import ipaddress
import itertools
import json
import os
import pickle
import random
import re
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from socksio import SOCKSError

from testbed import socks5, timeouts

__all__ = ["Agent", "AgentError", "ServerHandle", "Sniffer"]

# How long the caller waits for the agent to import Scapy and report ready.
START_TIMEOUT = 30.0
# Default time limit for calls that do not carry their own timeout.
CALL_TIMEOUT = 15.0
# Margin added to calls that carry their own timeout (socket operations).
CALL_MARGIN = 10.0
# How long close() waits for each step (EOF, SIGTERM) before escalating.
CLOSE_STEP = 3.0
# A capture socket's receive buffer: what arrives while the sniffer's thread waits for the
# CPU waits there (a check's whole traffic, a 1 MB transfer each way included) instead of
# being dropped; Scapy asks for 64 KiB. Set past net.core.rmem_max (root): SO_RCVBUFFORCE.
CAPTURE_BUFFER = 32 << 20
SO_RCVBUFFORCE = 33  # Linux; Python's socket module lacks it
# A capture socket's kernel counters (struct tpacket_stats: packets, drops; reading resets
# them): a drop is a packet the socket's buffer had no room for.
SOL_PACKET, PACKET_STATISTICS = 263, 6
_TPACKET_STATS = struct.Struct("II")
# How long a stopping capture may read what its socket holds (a busy interface keeps
# filling it; what arrived after the stop is not the capture's).
DRAIN_LIMIT = 5.0
# What is left then is counted as lost, up to this many packets (read unparsed)
DISCARD_LIMIT = 1 << 20


class AgentError(RuntimeError):
    """An agent reported an error, died, or did not answer in time."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def _family(addr: str) -> socket.AddressFamily:
    try:
        version = ipaddress.ip_address(addr).version
    except ValueError:
        raise ValueError(f"not an IPv4 or IPv6 address: {addr!r}") from None
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def _fmt_addr(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


# ---------------------------------------------------------------------------
# Caller side
# ---------------------------------------------------------------------------

_LAYER_CACHE: dict[str, Any] = {}


def load_layers() -> None:
    """Register the Scapy layers the testbed sends and dissects, on both ends of an agent's
    channel: Ethernet, ARP and Linux cooked captures, IPv4 and IPv6 with ICMP, TCP and
    UDP. Not ``scapy.all``: its two thousand layers took 0.6 s of CPU at each agent's start
    (a few hundred starts in a run), and every port they name would dissect payloads
    the testbed sends as raw bytes."""
    import scapy.layers.inet
    import scapy.layers.inet6
    import scapy.layers.l2  # noqa: F401


def _layer_class(name: str) -> Any:
    """The Scapy packet class called ``name`` (falls back to Raw)."""
    if not _LAYER_CACHE:
        from scapy.config import conf

        load_layers()
        for cls in conf.layers:
            _LAYER_CACHE.setdefault(cls.__name__, cls)
    from scapy.packet import Raw

    return _LAYER_CACHE.get(name, Raw)


def _rebuild(cls_name: str, data: bytes, ts: float) -> Any:
    pkt = _layer_class(cls_name)(data)
    pkt.time = ts
    return pkt


def _encode_packets(pkts: Any) -> list[str]:
    """Encode packets layer by layer (class and explicitly set fields), unbuilt.

    Building happens in the agent, so defaults that depend on the namespace
    (source addresses, routes) are filled in there, not in the caller's namespace.
    """
    from scapy.packet import NoPayload, Packet

    items: Iterable[Any] = [pkts] if isinstance(pkts, Packet) else pkts
    out = []
    for p in items:
        if not isinstance(p, Packet):
            raise TypeError(f"send() wants Scapy packets, got {type(p).__name__}")
        layers = []
        layer = p
        while not isinstance(layer, NoPayload):
            layers.append((type(layer), dict(layer.fields)))
            layer = layer.payload
        out.append(_b64(pickle.dumps(layers)))
    return out


def _decode_packet(data: str) -> Any:
    pkt = None
    for cls, fields in pickle.loads(_unb64(data)):
        layer = cls()
        layer.fields.update(fields)
        pkt = layer if pkt is None else pkt / layer
    return pkt


class _Pending:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: str | None = None


_LIVE_AGENTS: weakref.WeakSet[Agent] = weakref.WeakSet()


@atexit.register
def _close_live_agents() -> None:
    for agent in list(_LIVE_AGENTS):
        with contextlib.suppress(Exception):
            agent.close()


class Agent:
    """A helper process inside network namespace ``netns``, called ``name`` in messages."""

    def __init__(self, proc: subprocess.Popen[bytes], netns: str, name: str) -> None:
        self._proc = proc
        self.netns = netns
        self.name = name
        self.pid: int = proc.pid
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._wlock = threading.Lock()
        self._ready = threading.Event()
        self._dead = False
        self._closed = False
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self._reader = threading.Thread(
            target=self._read_stdout, name=f"agent-{name}-out", daemon=True
        )
        self._errreader = threading.Thread(
            target=self._read_stderr, name=f"agent-{name}-err", daemon=True
        )
        self._reader.start()
        self._errreader.start()
        _LIVE_AGENTS.add(self)

    # -- life cycle ---------------------------------------------------------

    @classmethod
    def start(cls, netns: str, name: str, *, start_timeout: float = START_TIMEOUT) -> Agent:
        """Start an agent in ``netns`` and wait until it has imported Scapy."""
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (pkg_root, env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        cmd = ["ip", "netns", "exec", netns, sys.executable, "-m", "testbed.agent"]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                close_fds=True,
            )
        except FileNotFoundError as exc:
            raise AgentError(
                f"agent {name} (netns {netns}): cannot run 'ip' ({exc}); install iproute2"
            ) from None
        agent = cls(proc, netns, name)
        deadline = time.monotonic() + start_timeout
        while not agent._ready.wait(0.05):
            if agent._dead:
                agent.close()
                raise AgentError(agent._describe_death("exited while starting"))
            if time.monotonic() > deadline:
                agent.close()
                raise AgentError(
                    f"agent {name} (netns {netns}): not ready after {start_timeout:.0f} s"
                    f"{agent._stderr_text()}"
                )
        return agent

    def close(self) -> None:
        """Stop the agent process and reap it. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        proc = self._proc
        if proc.poll() is None:
            with contextlib.suppress(OSError), self._wlock:
                if proc.stdin:
                    proc.stdin.close()
            try:
                proc.wait(CLOSE_STEP)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(CLOSE_STEP)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(OSError):
                        proc.kill()
                    proc.wait()
        else:
            with contextlib.suppress(OSError):
                if proc.stdin:
                    proc.stdin.close()
        self._reader.join(CLOSE_STEP)
        self._errreader.join(CLOSE_STEP)
        for stream in (proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                if stream:
                    stream.close()
        self._fail_pending(f"agent {self.name} (netns {self.netns}) was closed")
        _LIVE_AGENTS.discard(self)

    @property
    def alive(self) -> bool:
        return not self._dead and self._proc.poll() is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Agent {self.name} netns={self.netns} pid={self.pid}>"

    # -- plumbing -----------------------------------------------------------

    def _read_stdout(self) -> None:
        stream = self._proc.stdout
        assert stream is not None
        try:
            for raw in stream:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    self._stderr_tail.append("stdout (not JSON): " + raw.decode(errors="replace"))
                    continue
                if msg.get("event") == "ready":
                    self._ready.set()
                    continue
                with self._lock:
                    pending = self._pending.pop(msg.get("id"), None)
                if pending is None:
                    continue
                pending.result = msg.get("result")
                pending.error = msg.get("error")
                pending.done.set()
        except (OSError, ValueError):
            pass
        finally:
            self._dead = True
            # Give the process a moment to exit so the message can carry its status.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(1.0)
            self._fail_pending(self._describe_death("died"))

    def _read_stderr(self) -> None:
        stream = self._proc.stderr
        assert stream is not None
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                self._stderr_tail.append(raw.decode(errors="replace").rstrip("\n"))

    def _stderr_text(self) -> str:
        lines = [ln for ln in list(self._stderr_tail) if ln.strip()]
        if not lines:
            return ""
        return "\n  agent stderr (last lines):\n    " + "\n    ".join(lines[-15:])

    def _describe_death(self, what: str) -> str:
        rc = self._proc.poll()
        status = "still running" if rc is None else f"exit status {rc}"
        return f"agent {self.name} (netns {self.netns}, pid {self.pid}) {what} ({status})" + (
            self._stderr_text()
        )

    def _fail_pending(self, message: str) -> None:
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            p.error = message
            p.done.set()

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             timeout: float | None = None) -> Any:
        """Call ``method`` in the agent; raise :class:`AgentError` on error/death/timeout."""
        limit = CALL_TIMEOUT if timeout is None else timeout
        if self._closed:
            raise AgentError(f"agent {self.name} (netns {self.netns}) is closed")
        if self._dead or self._proc.poll() is not None:
            raise AgentError(self._describe_death("is dead"))
        req_id = next(self._ids)
        pending = _Pending()
        with self._lock:
            self._pending[req_id] = pending
        line = json.dumps({"id": req_id, "method": method, "params": params or {}}) + "\n"
        try:
            with self._wlock:
                stdin = self._proc.stdin
                assert stdin is not None
                stdin.write(line.encode())
                stdin.flush()
        except (OSError, ValueError):
            with self._lock:
                self._pending.pop(req_id, None)
            raise AgentError(self._describe_death("cannot be written to")) from None
        if not pending.done.wait(limit):
            with self._lock:
                self._pending.pop(req_id, None)
            raise AgentError(
                f"agent {self.name} (netns {self.netns}): {method} got no answer "
                f"within {limit:.1f} s" + self._stderr_text()
            )
        if pending.error is not None:
            if pending.error.startswith(f"agent {self.name} "):
                raise AgentError(pending.error)
            raise AgentError(f"agent {self.name} (netns {self.netns}): {method}: {pending.error}")
        return pending.result

    # -- packets --------------------------------------------------------------

    def send(self, pkts: Any, *, iface: str | None = None) -> None:
        """Send a packet or list of packets.

        Without ``iface``: layer 3 through a raw socket (the kernel routes and
        resolves neighbours; spoofed sources are fine). With ``iface``: layer 2
        on that interface, adding an Ether header (next-hop MAC resolved) if missing.
        """
        self.call("send", {"pkts": _encode_packets(pkts), "iface": iface},
                  timeout=CALL_TIMEOUT + timeouts.POSITIVE)

    def sniff(self, iface: str, *, bpf: str | None = None, buffer: int = CAPTURE_BUFFER) -> Sniffer:
        """Start capturing on ``iface`` (``buffer``: the capture socket's receive buffer,
        bytes); returns once the capture is really running."""
        res = self.call("sniff_start", {"iface": iface, "bpf": bpf, "buffer": buffer})
        return Sniffer(self, int(res["sid"]), iface, bpf, buffer)

    # -- real sockets -----------------------------------------------------------

    def tcp_server(self, addr: str, port: int) -> ServerHandle:
        """Listen on addr:port (port 0 picks one); echo every byte back."""
        res = self.call("tcp_server", {"addr": addr, "port": port})
        return ServerHandle(self, int(res["hid"]), "tcp", res["addr"], int(res["port"]))

    def udp_server(self, addr: str, port: int, *, echo: bool = True) -> ServerHandle:
        """Bind a UDP socket on addr:port; echo each datagram back if ``echo``."""
        res = self.call("udp_server", {"addr": addr, "port": port, "echo": echo})
        return ServerHandle(self, int(res["hid"]), "udp", res["addr"], int(res["port"]))

    def tcp_connect(self, addr: str, port: int, *, send_bytes: int = 0,
                    timeout: float | None = None, bind: str | None = None,
                    source_port: int = 0, reset: bool = False) -> dict[str, Any]:
        """Connect (from ``source_port``, 0: any), send ``send_bytes`` bytes, read the echo
        back, close (with ``reset``, by a RST: the port is then free for a connection to
        the same place at once, with no TIME_WAIT).

        Returns ``{"connected", "sent", "received", "error", "local"}``, and with
        ``send_bytes`` the SHA-256 of the bytes sent and of those that came back
        (``digest``, ``echo_digest``); a refused or timed-out connection gives
        ``connected: False`` and an explanatory error.
        """
        t = timeouts.POSITIVE if timeout is None else timeout
        res = self.call(
            "tcp_connect",
            {"addr": addr, "port": port, "send_bytes": send_bytes, "timeout": t, "bind": bind,
             "source_port": source_port, "reset": reset},
            timeout=2 * t + CALL_MARGIN,
        )
        res["local"] = tuple(res["local"]) if res.get("local") else None
        return dict(res)

    def tcp_open(self, addr: str, port: int, *, timeout: float | None = None,
                 bind: str | None = None) -> TcpConnection:
        """Connect and keep the connection open: ``.connected``, ``.exchange(n)``, ``.close()``."""
        t = timeouts.POSITIVE if timeout is None else timeout
        res = self.call("tcp_open", {"addr": addr, "port": port, "timeout": t, "bind": bind},
                        timeout=t + CALL_MARGIN)
        return TcpConnection(self, res)

    def tcp_probes(self, addr: str, port: int, payloads: list[bytes], *,
                   timeout: float | None = None) -> list[dict[str, Any]]:
        """One connection per payload, which is sent at once; then every connection is read
        until its peer closes it or ``timeout`` passes (the waits overlap). Returns, per
        payload, ``{"connected", "received" (bytes), "closed" (by the peer), "error"}``."""
        t = timeouts.POSITIVE if timeout is None else timeout
        res = self.call("tcp_probes", {"addr": addr, "port": port, "timeout": t,
                                       "payloads": [_b64(p) for p in payloads]},
                        timeout=t + CALL_MARGIN + 0.05 * len(payloads))
        for probe in res:
            probe["received"] = _unb64(probe["received"])
        return list(res)

    def probe_start(self, proto: str, addr: str, port: int, payload: bytes = b"") -> dict[str, Any]:
        """A probe that must come to nothing, from a real socket, without waiting for an
        answer: a TCP connection attempt or a UDP datagram. Returns ``{"pid", "local",
        "error"}`` (``local``: the socket's address, None if nothing was sent)."""
        res = self.call("probe_start", {"proto": proto, "addr": addr, "port": port,
                                        "payload": _b64(payload)})
        res["local"] = tuple(res["local"]) if res.get("local") else None
        return dict(res)

    def probe_outcome(self, pid: int) -> dict[str, Any]:
        """What has come of a ``probe_start`` probe by now: ``{"connected", "reply" (bytes
        or None), "error"}``; it is forgotten then."""
        res = self.call("probe_outcome", {"pid": pid})
        res["reply"] = None if res.get("reply") is None else _unb64(res["reply"])
        return dict(res)

    def udp_send(self, addr: str, port: int, payload: bytes, *, expect_reply: bool,
                 timeout: float | None = None, bind: str | None = None) -> dict[str, Any]:
        """Send one datagram; if ``expect_reply``, wait up to ``timeout`` for an answer.

        Returns ``{"sent", "reply", "local", "error"}``; ``reply`` is bytes or None.
        """
        t = timeouts.POSITIVE if timeout is None else timeout
        res = self.call(
            "udp_send",
            {"addr": addr, "port": port, "payload": _b64(payload),
             "expect_reply": expect_reply, "timeout": t, "bind": bind},
            timeout=t + CALL_MARGIN,
        )
        res["reply"] = None if res.get("reply") is None else _unb64(res["reply"])
        res["local"] = tuple(res["local"]) if res.get("local") else None
        return dict(res)

    def udp_burst(self, addr: str, port: int, count: int, size: int | list[int], *,
                  expect_replies: bool, timeout: float | None = None,
                  first_answered: bool = False) -> dict[str, Any]:
        """Send ``count`` datagrams of ``size`` bytes (or of the sizes listed, one each)
        from one socket, at once; if ``expect_replies``, collect answers until ``timeout``
        passes without one. With ``first_answered``, the first datagram goes alone and the
        rest only once its answer is back (within ``timeout``; none is an error and ends
        the burst): they then travel a flow the firewall has admitted both ways, however
        long its verdict on the first took.

        Returns ``{"sent", "local", "digest", "replies", "reply_digest", "error"}``:
        order-independent digests of the datagrams sent and received (the first
        datagram's answer counted with the rest).
        """
        t = timeouts.POSITIVE if timeout is None else timeout
        res = self.call("udp_burst", {"addr": addr, "port": port, "count": count, "size": size,
                                      "expect_replies": expect_replies, "timeout": t,
                                      "first_answered": first_answered},
                        timeout=(2 if first_answered else 1) * t + 30 + CALL_MARGIN)
        res["local"] = tuple(res["local"]) if res.get("local") else None
        return dict(res)

    def connect_flood(self, addr: str, port: int, count: int) -> dict[str, Any]:
        """``count`` new TCP connections started and dropped at once (a SYN each, from a
        new source port each): the cheapest new-flow flood a real client can send.
        Returns ``{"sent", "seconds"}``."""
        return dict(self.call("connect_flood", {"addr": addr, "port": port, "count": count},
                              timeout=60 + CALL_MARGIN))

    def datagram_flood(self, addr: str, port: int, count: int, payload: bytes) -> dict[str, Any]:
        """``count`` datagrams, each from a new socket (a new flow each). Returns
        ``{"sent", "seconds"}``."""
        return dict(self.call("datagram_flood", {"addr": addr, "port": port, "count": count,
                                                 "payload": _b64(payload)}, timeout=60 + CALL_MARGIN))

    def socks(self, proxy: tuple[str, int], user: str | None, password: str | None, command: str,
              host: str, port: int, *, timeout: float | None = None,
              udp_port: int = 0) -> SocksConnection:
        """A SOCKS5 request through ``proxy`` (command: connect, bind or udp): the
        connection stays open; ``.reply`` is the server's (first) reply. UDP ASSOCIATE:
        the datagrams go from ``udp_port`` (0: a port the kernel picks at the first)."""
        t = timeouts.POSITIVE if timeout is None else timeout
        res = self.call("socks_open", {"proxy": list(proxy), "user": user, "password": password,
                                       "command": command, "host": host, "port": port, "timeout": t,
                                       "udp_port": udp_port},
                        timeout=t + CALL_MARGIN)
        return SocksConnection(self, res)

    def socks_step(self, proxy: tuple[str, int], user: str, password: str, step: str,
                   target: tuple[str, int], udp_target: tuple[str, int], *,
                   timeout: float | None = None) -> dict[str, Any]:
        """A SOCKS client taken to ``step`` (SOCKS_STEPS), then reset (SO_LINGER 0; the
        step "connect-exchange" closes normally). ``target`` is CONNECT's, an echo server;
        ``udp_target`` a UDP echo server. Returns ``{"step", "reached", "compared", "error"}``:
        ``compared`` whether what came back was what was sent (for the steps that relay)."""
        t = timeouts.POSITIVE if timeout is None else timeout
        return dict(self.call("socks_step", {"proxy": list(proxy), "user": user, "password": password,
                                             "step": step, "target": list(target),
                                             "udp_target": list(udp_target), "timeout": t},
                              timeout=4 * t + CALL_MARGIN))

    def socks_storm(self, proxy: tuple[str, int], user: str, password: str, *, idle: int,
                    steps: int, idle_at_once: int, target: tuple[str, int],
                    udp_target: tuple[str, int], seconds: float, handshake_timeout: float,
                    step_gap: float = 0.0) -> dict[str, Any]:
        """``idle`` connections that never finish their handshake (at most ``idle_at_once``
        open; half send nothing, half half a greeting), each held until the service closes
        it, while ``steps`` more go through socks_step, every step in turn, ``step_gap``
        seconds apart; all within ``seconds``. One closed sooner than the service's
        ``handshake_timeout`` was refused. Returns what happened to them (see
        m_socks_storm)."""
        return dict(self.call("socks_storm", {
            "proxy": list(proxy), "user": user, "password": password, "idle": idle, "steps": steps,
            "idle_at_once": idle_at_once, "target": list(target), "udp_target": list(udp_target),
            "seconds": seconds, "handshake_timeout": handshake_timeout, "step_gap": step_gap},
            timeout=seconds + CALL_MARGIN + 30))

    def ping(self) -> dict[str, Any]:
        return dict(self.call("ping"))


class TcpConnection:
    """A TCP connection held open in an agent (see Agent.tcp_open)."""

    def __init__(self, agent: Agent, opened: dict[str, Any]) -> None:
        self.agent = agent
        self.connected = bool(opened["connected"])
        self.error: str | None = opened.get("error")
        self.local = tuple(opened["local"]) if opened.get("local") else None
        self._cid: int | None = opened.get("cid")

    def exchange(self, send_bytes: int, *, timeout: float | None = None) -> dict[str, Any]:
        """Send bytes and read their echo: ``{"sent", "received", "error", "digest",
        "echo_digest"}`` (the SHA-256 of the bytes sent and of those that came back)."""
        if self._cid is None:
            raise AgentError(f"agent {self.agent.name}: the connection is not open ({self.error})")
        t = timeouts.POSITIVE if timeout is None else timeout
        return dict(self.agent.call("tcp_exchange", {"cid": self._cid, "send_bytes": send_bytes,
                                                     "timeout": t}, timeout=2 * t + CALL_MARGIN))

    def talk(self, data: bytes, expect: int = 1 << 20, *, timeout: float | None = None,
             until: str | None = None, pieces: list[int] | None = None) -> bytes:
        """Send ``data`` and return up to ``expect`` bytes read back (fewer on timeout).

        ``until``: stop reading once what came back matches this regular expression
        (on the bytes as latin-1, multiline). ``pieces``: send ``data`` in writes of
        these sizes (the rest last), each its own segment (no Nagle, a pause between).
        """
        if self._cid is None:
            raise AgentError(f"agent {self.agent.name}: the connection is not open ({self.error})")
        t = timeouts.POSITIVE if timeout is None else timeout
        return _unb64(self.agent.call("tcp_talk", {"cid": self._cid, "payload": _b64(data),
                                                   "expect": expect, "timeout": t, "until": until,
                                                   "pieces": pieces},
                                      timeout=t + CALL_MARGIN + 0.1 * len(pieces or ())))

    def close(self) -> None:
        if self._cid is not None and self.agent.alive:
            self.agent.call("tcp_close", {"cid": self._cid})
        self._cid = None

    def ended(self, timeout: float | None = None) -> bool:
        """Whether the peer ends the connection (FIN or RST) within ``timeout``; what it
        sends until then is read and dropped."""
        if self._cid is None:
            raise AgentError(f"agent {self.agent.name}: the connection is not open ({self.error})")
        t = timeouts.POSITIVE if timeout is None else timeout
        return bool(self.agent.call("tcp_ended", {"cid": self._cid, "timeout": t},
                                    timeout=t + CALL_MARGIN))

    def reset(self) -> None:
        """Close with a reset (SO_LINGER 0): the peer gets a RST, not a FIN."""
        if self._cid is not None and self.agent.alive:
            self.agent.call("tcp_close", {"cid": self._cid, "reset": True})
        self._cid = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SocksConnection(TcpConnection):
    """A SOCKS5 control connection: after CONNECT or BIND's second reply it carries the
    relayed stream (``exchange``, ``talk``); after UDP ASSOCIATE, ``udp`` relays datagrams."""

    def __init__(self, agent: Agent, opened: dict[str, Any]) -> None:
        super().__init__(agent, opened)
        self.reply: dict[str, Any] | None = opened.get("reply")

    def accept(self, timeout: float | None = None) -> dict[str, Any] | None:
        """BIND: wait for the second reply (a peer connected through the bind); None if none came."""
        t = timeouts.POSITIVE if timeout is None else timeout
        res = self.agent.call("socks_second_reply", {"cid": self._cid, "timeout": t},
                              timeout=t + CALL_MARGIN)
        return None if res is None else dict(res)

    def udp(self, host: str | None, port: int, payload: bytes, *, expect_reply: bool,
            timeout: float | None = None) -> dict[str, Any]:
        """UDP ASSOCIATE: send a datagram to host:port through the relay (host None: send
        nothing); with ``expect_reply``, wait for one to arrive: ``{"reply", "from"}``."""
        t = timeouts.POSITIVE if timeout is None else timeout
        res = self.agent.call("socks_udp", {"cid": self._cid, "host": host, "port": port,
                                            "payload": _b64(payload), "expect_reply": expect_reply,
                                            "timeout": t}, timeout=t + CALL_MARGIN)
        res["reply"] = None if res.get("reply") is None else _unb64(res["reply"])
        return dict(res)

    def udp_receive(self, count: int, *, timeout: float | None = None) -> dict[str, Any]:
        """UDP ASSOCIATE: read what the relay sends until ``count`` datagrams came or
        ``timeout`` passed without one: ``{"received", "digest", "from"}`` (the digest of
        their payloads, as ``multiset_digest``; the senders, each once)."""
        t = timeouts.POSITIVE if timeout is None else timeout
        return dict(self.agent.call("socks_udp_receive", {"cid": self._cid, "count": count, "timeout": t},
                                    timeout=t * (count + 1) + CALL_MARGIN))


class Sniffer:
    """A capture running in an agent. ``packets()`` returns what arrived so far."""

    def __init__(self, agent: Agent, sid: int, iface: str, bpf: str | None,
                 buffer: int = CAPTURE_BUFFER) -> None:
        self.agent = agent
        self.sid = sid
        self.iface = iface
        self.bpf = bpf
        self.buffer = buffer
        self._packets: list[Any] = []
        self._stopped = False
        self._lock = threading.Lock()
        self.lost = 0  # packets the capture's socket had no room for (then packets() raises)

    @property
    def label(self) -> str:
        """Where this sniffer listens, for messages: node, namespace and interface."""
        return f"node {self.agent.name} (netns {self.agent.netns}), interface {self.iface}"

    def _fetch(self) -> None:
        res = self.agent.call("sniff_packets", {"sid": self.sid, "since": len(self._packets)})
        for cls_name, data, ts in res["packets"]:
            self._packets.append(_rebuild(cls_name, _unb64(data), float(ts)))
        if res.get("error"):
            raise AgentError(
                f"agent {self.agent.name} (netns {self.agent.netns}): sniffer on "
                f"{self.iface} failed: {res['error']}"
            )
        self.lost = int(res["lost"])

    def packets(self) -> list[Any]:
        """Every packet captured so far (Scapy packets with ``.time`` set). Raises
        AgentError once the capture has lost a packet: what it shows is then not all that
        arrived, and a check by it (that nothing came, above all) would conclude from part
        of the traffic."""
        with self._lock:
            if not self._stopped:
                self._fetch()
            if self.lost:
                raise AgentError(
                    f"the capture on {self.label} lost {self.lost} packets (its socket's "
                    f"{self.buffer} B buffer was full): it cannot show what arrived")
            return list(self._packets)

    def stop(self) -> None:
        """Stop capturing (idempotent), after taking what the capture's socket holds;
        ``packets()`` still returns what was captured (or says it lost some)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if not self.agent.alive:
                return
            self.agent.call("sniff_stop", {"sid": self.sid})
            self._fetch()
            with contextlib.suppress(AgentError):
                self.agent.call("sniff_forget", {"sid": self.sid})

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Sniffer {self.label} bpf={self.bpf!r}>"


class ServerHandle:
    """A TCP or UDP echo server running in an agent."""

    def __init__(self, agent: Agent, hid: int, proto: str, addr: str, port: int) -> None:
        self.agent = agent
        self.hid = hid
        self.proto = proto
        self.addr = addr
        self.port = port
        self._closed = False

    def stats(self) -> dict[str, Any]:
        """``accepted`` (connections, or datagrams for UDP), ``bytes_in``, ``bytes_out``, ``peers``."""
        res = dict(self.agent.call("server_stats", {"hid": self.hid}))
        res["peers"] = [tuple(p) for p in res["peers"]]
        return res

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.agent.alive:
            self.agent.call("server_close", {"hid": self.hid})

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ServerHandle {self.proto} {_fmt_addr(self.addr, self.port)} in {self.agent.name}>"


# ---------------------------------------------------------------------------
# Agent side (runs inside the namespace)
# ---------------------------------------------------------------------------


class _SniffState:
    def __init__(self) -> None:
        self.packets: list[list[Any]] = []
        self.lock = threading.Lock()
        self.started = threading.Event()
        self.sniffer: Any = None
        self.socket: Any = None  # the capture socket the sniffer reads (closed with it)
        self.lost = 0  # packets the socket had no room for (PACKET_STATISTICS, summed)

    def add(self, pkt: Any) -> None:
        item = [type(pkt).__name__, _b64(bytes(pkt)), float(pkt.time)]
        with self.lock:
            self.packets.append(item)

    def count_losses(self) -> int:
        """The packets the socket has had no room for so far (while it is open)."""
        if self.socket is not None and not self.socket.closed:
            self.lost += self.drops()
        return self.lost

    def drops(self) -> int:
        """The socket's drops since they were last read (reading resets them)."""
        raw = self.socket.ins.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        return int(_TPACKET_STATS.unpack(raw)[1])

    def drain(self, stopped_at: float) -> None:
        """Take what the socket still holds that arrived before ``stopped_at`` (the
        sniffer's thread has stopped: Scapy's loop ends at its stop without reading the
        socket again, and a thread behind its traffic left the rest unread). What it cannot
        read within DRAIN_LIMIT counts as lost (with what came after the stop among it, if
        any: the capture is then incomplete anyway)."""
        deadline = time.monotonic() + DRAIN_LIMIT
        sock = self.socket
        while select.select([sock.ins], [], [], 0)[0]:
            if time.monotonic() >= deadline:  # what is left unread counts as lost
                self.lost += self._discard(sock.ins)
                return
            pkt = sock.recv()
            if pkt is None:  # one the socket reads and drops (an outgoing copy on lo, say)
                continue
            if float(pkt.time) > stopped_at:
                return
            self.add(pkt)

    @staticmethod
    def _discard(sock: socket.socket) -> int:
        """Read and count what ``sock`` holds, unparsed (at most DISCARD_LIMIT packets: a
        flood may keep filling it); at least 1."""
        count = 0
        with contextlib.suppress(BlockingIOError):
            while count < DISCARD_LIMIT:
                sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
                count += 1
        return max(1, count)


class _EchoServer:
    def __init__(self, proto: str, sock: socket.socket, echo: bool) -> None:
        self.proto = proto
        self.sock = sock
        self.echo = echo
        self.lock = threading.Lock()
        self.accepted = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.peers: list[tuple[str, int]] = []
        self.conns: set[socket.socket] = set()
        self.closed = False
        self.digest = 0  # UDP: of the datagrams received, in any order (see _multiset_digest)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "accepted": self.accepted,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "peers": [list(p) for p in self.peers],
                "digest": f"{self.digest:064x}",
            }

    def close(self) -> None:
        with self.lock:
            self.closed = True
            conns = list(self.conns)
        for s in [self.sock, *conns]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    # TCP
    def accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with self.lock:
                if self.closed:
                    conn.close()
                    return
                self.accepted += 1
                self.peers.append((peer[0], peer[1]))
                self.conns.add(conn)
            threading.Thread(target=self._echo_conn, args=(conn,), daemon=True).start()

    def _echo_conn(self, conn: socket.socket) -> None:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                with self.lock:  # counted before sending: the peer may ask right after
                    self.bytes_in += len(data)
                    self.bytes_out += len(data)
                try:
                    conn.sendall(data)
                except OSError:
                    with self.lock:
                        self.bytes_out -= len(data)
                    raise
        except OSError:
            pass
        finally:
            with self.lock:
                self.conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    # UDP
    def udp_loop(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            with self.lock:
                if self.closed:
                    return
                self.accepted += 1
                self.bytes_in += len(data)
                self.digest = _multiset_digest(self.digest, data)
                if (peer[0], peer[1]) not in self.peers:
                    self.peers.append((peer[0], peer[1]))
            if self.echo:
                with self.lock:  # counted before sending: the peer may ask right after
                    self.bytes_out += len(data)
                try:
                    self.sock.sendto(data, peer)
                except OSError:
                    with self.lock:
                        self.bytes_out -= len(data)


_PATTERN = bytes(range(256)) * 256  # 64 KiB repeating pattern for the bursts' datagrams

# The bytes a TCP echo sends (tcp_connect, tcp_exchange): a piece of a random walk over the
# byte values that climbs by 1, 2 or 3 each byte, from a random offset. No piece of it
# recurs at another offset (a segment dropped, repeated or put elsewhere changes the
# digest of what arrives) and no echo sends the bytes of another; no byte comes twice in
# a row and it never descends (bulk data that a filter editing marks such as "!!" or
# "ping", the tests' data filter, leaves alone); a line end comes every 256 bytes or so.
_WALK_SIZE = 1 << 21  # twice the largest echo the suite sends
_STEP = bytes(1 + r % 3 for r in range(256))


@functools.cache
def _walk() -> bytes:
    steps = os.urandom(_WALK_SIZE).translate(_STEP)
    return bytes(b & 0xFF for b in itertools.accumulate(steps))


def _echo_bytes(size: int) -> bytes:
    walk = _walk()
    if size > len(walk):
        raise ValueError(f"an echo of {size} bytes: at most {len(walk)}")
    start = random.randrange(len(walk) - size + 1)
    return walk[start:start + size]


def _needs_routes(pkt: Any) -> bool:
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    for cls in (IP, IPv6):
        layer = pkt.getlayer(cls)
        if layer is not None and "src" not in layer.fields:
            return True
    return False


def _echo(sock: socket.socket, where: str, send_bytes: int, timeout: float) -> dict[str, Any]:
    """Send ``send_bytes`` bytes (see _echo_bytes) and read the echo back; the socket
    stays open. ``digest`` and ``echo_digest`` are the SHA-256 of the bytes sent and of
    those that came back: the caller compares them."""
    res: dict[str, Any] = {"sent": 0, "received": 0, "error": None}
    data = _echo_bytes(send_bytes)
    echoed = hashlib.sha256()
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    deadline = time.monotonic() + timeout
    sent = received = 0
    eof = False
    try:
        while received < send_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                res["error"] = (f"echo from {where} timed out after {timeout:g} s: "
                                f"sent {sent} of {send_bytes} bytes, got {received} back")
                break
            for _key, mask in sel.select(min(left, 0.5)):
                if mask & selectors.EVENT_WRITE and sent < send_bytes:
                    with contextlib.suppress(BlockingIOError):
                        sent += sock.send(data[sent:sent + 65536])
                    if sent >= send_bytes:
                        sel.modify(sock, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        eof = True
                        break
                    echoed.update(chunk)
                    received += len(chunk)
            if eof:
                res["error"] = (f"{where} closed the connection after {received} of "
                                f"{send_bytes} bytes came back")
                break
    except OSError as exc:
        res["error"] = f"transfer with {where} failed: {exc.strerror or exc}"
    finally:
        sel.close()
        sock.setblocking(True)
    res["sent"] = sent
    res["received"] = received
    res["digest"] = hashlib.sha256(data[:sent]).hexdigest()
    res["echo_digest"] = echoed.hexdigest()
    return res


class _AgentServer:
    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._wlock = threading.Lock()
        self._ids = itertools.count(1)
        self._sniffers: dict[int, _SniffState] = {}
        self._servers: dict[int, _EchoServer] = {}
        self._lock = threading.Lock()
        self._raw: dict[int, socket.socket] = {}
        self._conns: dict[int, tuple[socket.socket, str]] = {}
        # probes that must come to nothing (probe_start): id -> (socket, "tcp" or "udp", where)
        self._probes: dict[int, tuple[socket.socket, str, str]] = {}
        # SOCKS UDP ASSOCIATE: connection id -> (our UDP socket, the relay's address)
        self._udp: dict[int, tuple[socket.socket, tuple[str, int]]] = {}

    def write(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self._wlock:
            self._out.write(data)
            self._out.flush()

    def run(self, inp: IO[bytes]) -> None:
        self.write({"event": "ready", "pid": os.getpid()})
        for raw in inp:
            try:
                req = json.loads(raw)
            except ValueError:
                continue
            threading.Thread(target=self._handle, args=(req,), daemon=True).start()
        self.shutdown()

    def _handle(self, req: dict[str, Any]) -> None:
        req_id = req.get("id")
        method = str(req.get("method"))
        fn: Callable[..., Any] | None = getattr(self, "m_" + method, None)
        try:
            if fn is None:
                raise ValueError(f"unknown method {method!r}")
            result = fn(**(req.get("params") or {}))
            msg: dict[str, Any] = {"id": req_id, "result": result}
        except Exception as exc:  # report every failure to the caller
            text = str(exc) or repr(exc)
            msg = {"id": req_id, "error": f"{type(exc).__name__}: {text}"}
        with contextlib.suppress(OSError, ValueError):
            self.write(msg)

    def shutdown(self) -> None:
        with self._lock:
            sniffers = list(self._sniffers.values())
            servers = list(self._servers.values())
        for st in sniffers:
            with contextlib.suppress(Exception):
                if st.sniffer is not None and st.sniffer.running:
                    st.sniffer.stop(join=False)
        for srv in servers:
            srv.close()
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
            probes = list(self._probes.values())
            self._probes.clear()
        for sock, _ in conns:
            sock.close()
        for sock, _, _ in probes:
            sock.close()

    # -- methods ----------------------------------------------------------------

    def m_ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "netns_inode": os.stat("/proc/self/ns/net").st_ino}

    def _raw_socket(self, family: int) -> socket.socket:
        with self._lock:
            sock = self._raw.get(family)
            if sock is None:
                sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
                if family == socket.AF_INET:
                    sock.setsockopt(socket.SOL_IP, socket.IP_HDRINCL, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                self._raw[family] = sock
            return sock

    def m_send(self, pkts: list[str], iface: str | None = None) -> None:
        from scapy.layers.inet import IP
        from scapy.layers.inet6 import IPv6
        from scapy.layers.l2 import Ether
        from scapy.sendrecv import sendp

        built = [_decode_packet(data) for data in pkts]
        if any(_needs_routes(p) for p in built):
            # Scapy picks default source addresses from routes cached at import;
            # the topology may have changed since then.
            from scapy.config import conf

            conf.route.resync()
            conf.route6.resync()
        if iface is None:
            for p in built:
                if isinstance(p, IP):
                    self._raw_socket(socket.AF_INET).sendto(bytes(p), (p.dst, 0))
                elif isinstance(p, IPv6):
                    self._raw_socket(socket.AF_INET6).sendto(
                        bytes(p), (p.dst, 0, 0, self._scope_id(p.dst))
                    )
                else:
                    raise ValueError(
                        f"layer-3 send needs an IP or IPv6 packet, got {p.summary()}; "
                        "pass iface= to send at layer 2"
                    )
            return
        frames = []
        for p in built:
            if isinstance(p, Ether):
                frames.append(p)
                continue
            if isinstance(p, IP | IPv6):
                src_mac, dst_mac = self._macs_for(iface, p.dst, 6 if isinstance(p, IPv6) else 4)
                frames.append(Ether(src=src_mac, dst=dst_mac) / p)
            else:
                raise ValueError(
                    f"cannot add an Ether header to {p.summary()}: give a full Ether frame"
                )
        sendp(frames, iface=iface, verbose=False)

    @staticmethod
    def _scope_id(dst: str) -> int:
        addr = ipaddress.IPv6Address(dst)
        if not (addr.is_link_local or addr.is_multicast):
            return 0
        out = subprocess.run(["ip", "-6", "-j", "route", "get", dst], capture_output=True,
                             text=True, timeout=5)
        try:
            dev = json.loads(out.stdout)[0]["dev"]
            return socket.if_nametoindex(dev)
        except (ValueError, LookupError, OSError):
            return 0

    @staticmethod
    def _ip_json(args: list[str]) -> Any:
        out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout or "[]")

    def _macs_for(self, iface: str, dst: str, version: int) -> tuple[str, str]:
        """Source MAC of ``iface`` and the MAC of the next hop towards ``dst``."""
        from scapy.arch import get_if_hwaddr

        src_mac = get_if_hwaddr(iface)
        addr = ipaddress.ip_address(dst)
        if addr.is_multicast:
            if version == 4:
                b = addr.packed
                return src_mac, f"01:00:5e:{b[1] & 0x7F:02x}:{b[2]:02x}:{b[3]:02x}"
            b = addr.packed
            return src_mac, "33:33:" + ":".join(f"{x:02x}" for x in b[-4:])
        if version == 4 and dst == "255.255.255.255":
            return src_mac, "ff:ff:ff:ff:ff:ff"
        fam = "-4" if version == 4 else "-6"
        nexthop = dst
        try:
            routes = self._ip_json([fam, "route", "get", dst, "oif", iface])
            if routes and routes[0].get("gateway"):
                nexthop = routes[0]["gateway"]
        except (RuntimeError, ValueError):
            pass
        deadline = time.monotonic() + timeouts.POSITIVE
        probed = False
        while True:
            neigh = self._ip_json([fam, "neigh", "show", nexthop, "dev", iface])
            for n in neigh:
                states = n.get("state", [])
                if n.get("lladdr") and "FAILED" not in states and "INCOMPLETE" not in states:
                    return src_mac, str(n["lladdr"])
            if not probed:
                mac = self._probe_neighbour(iface, nexthop, version)
                if mac:
                    return src_mac, mac
                probed = True
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"cannot resolve the MAC address of next hop {nexthop} on {iface} "
                    f"(no ARP/neighbour-discovery answer within {timeouts.POSITIVE} s)"
                )
            time.sleep(0.05)

    @staticmethod
    def _probe_neighbour(iface: str, nexthop: str, version: int) -> str | None:
        from scapy.arch import get_if_addr, get_if_hwaddr
        from scapy.layers.inet6 import ICMPv6ND_NA, neighsol
        from scapy.layers.l2 import ARP, Ether
        from scapy.sendrecv import srp1

        if version == 4:
            ans = srp1(
                Ether(dst="ff:ff:ff:ff:ff:ff", src=get_if_hwaddr(iface))
                / ARP(op=1, pdst=nexthop, psrc=get_if_addr(iface), hwsrc=get_if_hwaddr(iface)),
                iface=iface, timeout=timeouts.POSITIVE, verbose=False,
            )
            return None if ans is None else str(ans[ARP].hwsrc)
        from scapy.interfaces import resolve_iface

        src = None
        for a in _AgentServer._ip_json(["-6", "addr", "show", "dev", iface]):
            for info in a.get("addr_info", []):
                if info.get("scope") == "link":
                    src = info["local"]
        if src is None:
            return None
        ans = neighsol(  # type: ignore[no-untyped-call]
            nexthop, src, resolve_iface(iface), timeout=timeouts.POSITIVE
        )
        if ans is not None and ICMPv6ND_NA in ans:
            return str(ans[Ether].src)
        return None

    def m_sniff_start(self, iface: str, bpf: str | None = None,
                      buffer: int = CAPTURE_BUFFER) -> dict[str, Any]:
        from scapy.config import conf
        from scapy.sendrecv import AsyncSniffer

        def failed(exc: BaseException | None) -> RuntimeError:
            return RuntimeError(f"sniffer on {iface} (bpf {bpf!r}) did not start: {exc!r}")

        st = _SniffState()
        try:
            st.socket = conf.L2listen(iface=iface, filter=bpf or None)
        except Exception as exc:  # no such interface, a filter that does not compile
            raise failed(exc) from None
        # what arrives while the sniffer's thread waits for the CPU is kept, not dropped
        st.socket.ins.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer)
        # Scapy opens the socket before it attaches the filter, and with a tiny buffer: what
        # it dropped until then is traffic the capture does not take, before it started
        # (Scapy discards what it queued); not a loss of the capture's
        st.drops()
        st.sniffer = AsyncSniffer(opened_socket=st.socket, prn=st.add, store=False,
                                  started_callback=st.started.set)
        st.sniffer.start()
        deadline = time.monotonic() + 10.0
        while not st.started.wait(0.01):
            thread = st.sniffer.thread
            if st.sniffer.exception is not None or (thread is not None and not thread.is_alive()):
                st.socket.close()
                raise failed(st.sniffer.exception)
            if time.monotonic() > deadline:
                with contextlib.suppress(Exception):
                    st.sniffer.stop(join=False)
                st.socket.close()
                raise RuntimeError(f"sniffer on {iface} did not start within 10 s")
        sid = next(self._ids)
        with self._lock:
            self._sniffers[sid] = st
        return {"sid": sid}

    def _sniffer(self, sid: int) -> _SniffState:
        with self._lock:
            st = self._sniffers.get(sid)
        if st is None:
            raise KeyError(f"no sniffer {sid}")
        return st

    def m_sniff_packets(self, sid: int, since: int = 0) -> dict[str, Any]:
        st = self._sniffer(sid)
        with st.lock:
            pkts = st.packets[since:]
        exc = st.sniffer.exception
        return {
            "packets": pkts,
            "running": bool(st.sniffer.running),
            "error": None if exc is None else repr(exc),
            "lost": st.count_losses(),
        }

    def m_sniff_stop(self, sid: int) -> None:
        st = self._sniffer(sid)
        stopped_at = time.time()
        if st.sniffer.running:
            st.sniffer.stop(join=True)
        if not st.socket.closed:
            st.drain(stopped_at)
            st.count_losses()
        st.socket.close()

    def m_sniff_forget(self, sid: int) -> None:
        with self._lock:
            self._sniffers.pop(sid, None)

    def _server(self, hid: int) -> _EchoServer:
        with self._lock:
            srv = self._servers.get(hid)
        if srv is None:
            raise KeyError(f"no server {hid}")
        return srv

    def _register(self, srv: _EchoServer) -> dict[str, Any]:
        hid = next(self._ids)
        with self._lock:
            self._servers[hid] = srv
        name = srv.sock.getsockname()
        return {"hid": hid, "addr": name[0], "port": name[1]}

    def m_tcp_server(self, addr: str, port: int) -> dict[str, Any]:
        fam = _family(addr)
        sock = socket.socket(fam, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on TCP {_fmt_addr(addr, port)}: {exc.strerror}") from None
        srv = _EchoServer("tcp", sock, echo=True)
        res = self._register(srv)
        threading.Thread(target=srv.accept_loop, daemon=True).start()
        return res

    def m_udp_server(self, addr: str, port: int, echo: bool = True) -> dict[str, Any]:
        fam = _family(addr)
        sock = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # for bursts
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot bind UDP {_fmt_addr(addr, port)}: {exc.strerror}") from None
        srv = _EchoServer("udp", sock, echo=echo)
        res = self._register(srv)
        threading.Thread(target=srv.udp_loop, daemon=True).start()
        return res

    def m_server_stats(self, hid: int) -> dict[str, Any]:
        return self._server(hid).stats()

    def m_server_close(self, hid: int) -> None:
        with self._lock:
            srv = self._servers.pop(hid, None)
        if srv is not None:
            srv.close()

    def m_tcp_connect(self, addr: str, port: int, send_bytes: int = 0,
                      timeout: float = 3.0, bind: str | None = None, source_port: int = 0,
                      reset: bool = False) -> dict[str, Any]:
        sock, res = self._tcp_connect(addr, port, timeout, bind, source_port)
        try:
            if sock is not None and send_bytes > 0:
                res.update(_echo(sock, _fmt_addr(addr, port), send_bytes, timeout))
            return res
        finally:
            if sock is not None:
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()

    def m_tcp_open(self, addr: str, port: int, timeout: float = 3.0,
                   bind: str | None = None) -> dict[str, Any]:
        """Connect and keep the connection open for tcp_exchange/tcp_close."""
        sock, res = self._tcp_connect(addr, port, timeout, bind)
        if sock is not None:
            with self._lock:
                cid = next(self._ids)
                self._conns[cid] = (sock, _fmt_addr(addr, port))
            res["cid"] = cid
        return res

    def m_tcp_exchange(self, cid: int, send_bytes: int, timeout: float = 3.0) -> dict[str, Any]:
        sock, where = self._conn(cid)
        return _echo(sock, where, send_bytes, timeout)

    def m_tcp_talk(self, cid: int, payload: str, expect: int, timeout: float = 3.0,
                   until: str | None = None, pieces: list[int] | None = None) -> str:
        """Send these bytes (in ``pieces``, each its own segment) and return the next
        ``expect`` bytes that come back, or fewer once they match ``until``."""
        sock, _ = self._conn(cid)
        data = _unb64(payload)
        sock.settimeout(timeout)  # (not what the last call's reading left)
        if pieces:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for size in pieces:
                sock.sendall(data[:size])
                data = data[size:]
                time.sleep(0.05)
        if data:  # (nothing to send: no wait for room in a full send buffer)
            sock.sendall(data)
        pattern = re.compile(until, re.M) if until else None
        received = b""
        deadline = time.monotonic() + timeout
        try:
            while len(received) < expect and not (pattern and pattern.search(received.decode("latin-1"))):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
                chunk = sock.recv(expect - len(received))
                if not chunk:
                    break
                received += chunk
        except TimeoutError:
            pass
        return _b64(received)

    def m_tcp_ended(self, cid: int, timeout: float = 3.0) -> bool:
        sock, _ = self._conn(cid)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                if not sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:  # a reset
                return True
        return False

    def m_tcp_close(self, cid: int, reset: bool = False) -> None:
        sock, _ = self._conn(cid)
        with self._lock:
            del self._conns[cid]
            udp = self._udp.pop(cid, None)
        if reset or _unacknowledged(sock):
            _reset(sock)
        else:
            sock.close()
        if udp is not None:
            udp[0].close()

    def m_probe_start(self, proto: str, addr: str, port: int, payload: str = "") -> dict[str, Any]:
        """Send a probe from a real socket and return at once: a TCP connection attempt
        (its SYN), or a datagram. ``probe_outcome`` says later what came of it."""
        if proto not in ("tcp", "udp"):
            raise ValueError(f"no probe over {proto!r}")
        where = _fmt_addr(addr, port)
        sock = socket.socket(_family(addr), socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if proto == "tcp":
                code = sock.connect_ex((addr, port))
                if code not in (0, errno.EINPROGRESS):
                    raise OSError(code, os.strerror(code))
            else:
                sock.connect((addr, port))
                sock.send(_unb64(payload))
            local = list(sock.getsockname()[:2])
        except OSError as exc:
            sock.close()
            return {"pid": None, "local": None, "error": f"{proto} to {where} failed: {exc.strerror or exc}"}
        with self._lock:
            pid = next(self._ids)
            self._probes[pid] = (sock, proto, where)
        return {"pid": pid, "local": local, "error": None}

    def m_probe_outcome(self, pid: int) -> dict[str, Any]:
        """What has come of a probe by now: a TCP one ``connected`` or failed (``error``:
        refused, unreachable), a UDP one got a ``reply`` or an ICMP error; nothing of
        either when it is still unanswered. The probe is forgotten."""
        with self._lock:
            sock, proto, where = self._probes.pop(pid)
        res: dict[str, Any] = {"connected": False, "reply": None, "error": None}
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(sock, selectors.EVENT_WRITE if proto == "tcp" else selectors.EVENT_READ)
                if not sel.select(0):
                    return res
            if proto == "tcp":
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    res["error"] = f"connect to {where} failed: {os.strerror(code)}"
                else:
                    res["connected"] = True
            else:
                try:
                    res["reply"] = _b64(sock.recv(65535))
                except OSError as exc:  # an ICMP error (ECONNREFUSED: port unreachable)
                    res["error"] = f"UDP to {where}: {exc.strerror or exc}"
        finally:
            sock.close()
        return res

    def m_tcp_probes(self, addr: str, port: int, payloads: list[str],
                     timeout: float = 3.0) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        with selectors.DefaultSelector() as selector:
            for payload in payloads:
                sock, res = self._tcp_connect(addr, port, timeout, None)
                res.update(received=bytearray(), closed=False)
                results.append(res)
                if sock is None:
                    continue
                try:
                    sock.sendall(_unb64(payload))
                except OSError as exc:  # the peer closed already: what it sent is still read
                    res["error"] = f"send: {exc.strerror or exc}"
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, res)
            deadline = time.monotonic() + timeout
            while selector.get_map() and (left := deadline - time.monotonic()) > 0:
                for key, _ in selector.select(left):
                    conn, res = key.fileobj, key.data
                    assert isinstance(conn, socket.socket)
                    try:
                        chunk = conn.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError as exc:  # a reset ends it as a close does
                        res["error"] = f"recv: {exc.strerror or exc}"
                        chunk = b""
                    if chunk:
                        res["received"] += chunk
                        continue
                    res["closed"] = True
                    selector.unregister(conn)
                    conn.close()
            for key in list(selector.get_map().values()):
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
        for res in results:
            res["received"] = _b64(bytes(res["received"]))
        return results

    def _conn(self, cid: int) -> tuple[socket.socket, str]:
        with self._lock:
            found = self._conns.get(cid)
        if found is None:
            raise ValueError(f"no open connection {cid}")
        return found

    def _tcp_connect(self, addr: str, port: int, timeout: float, bind: str | None,
                     source_port: int = 0) -> tuple[socket.socket | None, dict[str, Any]]:
        where = _fmt_addr(addr, port)
        res: dict[str, Any] = {"connected": False, "sent": 0, "received": 0,
                               "error": None, "local": None}
        sock = socket.socket(_family(addr), socket.SOCK_STREAM)
        try:
            if source_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if bind or source_port:
                sock.bind((bind or "", source_port))
            sock.settimeout(timeout)
            sock.connect((addr, port))
        except TimeoutError:
            res["local"] = list(sock.getsockname()[:2])
            res["error"] = (f"connect to {where} timed out after {timeout:g} s "
                            "(no answer to the SYN: dropped or filtered?)")
            sock.close()
            return None, res
        except OSError as exc:
            with contextlib.suppress(OSError):
                res["local"] = list(sock.getsockname()[:2])
            res["error"] = f"connect to {where} failed: {exc.strerror or exc}"
            sock.close()
            return None, res
        res["connected"] = True
        res["local"] = list(sock.getsockname()[:2])
        return sock, res

    def m_socks_open(self, proxy: list[Any], user: str | None, password: str | None, command: str,
                     host: str, port: int, timeout: float = 3.0, udp_port: int = 0) -> dict[str, Any]:
        sock, res = self._tcp_connect(proxy[0], int(proxy[1]), timeout, None)
        if sock is None:
            return res
        try:
            sock.settimeout(timeout)
            sock.sendall(socks5.greeting(user))
            socks5.check_method(_recv_exactly(sock, 2), user)
            if user is not None:
                sock.sendall(socks5.login(user, str(password)))
                socks5.check_login(_recv_exactly(sock, 2))
            sock.sendall(socks5.request(command, host, port))
            res["reply"] = _read_socks_reply(sock)
        except (OSError, SOCKSError) as exc:
            sock.close()
            res.update(connected=False, error=f"SOCKS: {_socks_failure(exc)}")
            return res
        udp = None
        if command == "udp" and res["reply"]["code"] == 0:
            udp = socket.socket(_family(res["reply"]["address"]), socket.SOCK_DGRAM)
            # what the relay sends arrives whole here: a loss is the fw's
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            if udp_port:
                udp.bind((sock.getsockname()[0], udp_port))
        with self._lock:
            cid = next(self._ids)
            self._conns[cid] = (sock, _fmt_addr(host, port))
            if udp is not None:
                self._udp[cid] = (udp, (res["reply"]["address"], res["reply"]["port"]))
        res["cid"] = cid
        return res

    def m_socks_second_reply(self, cid: int, timeout: float = 3.0) -> dict[str, Any] | None:
        sock, _ = self._conn(cid)
        sock.settimeout(timeout)
        try:
            return _read_socks_reply(sock)
        except TimeoutError:
            return None

    def m_socks_udp(self, cid: int, host: str | None, port: int, payload: str, expect_reply: bool,
                    timeout: float = 3.0) -> dict[str, Any]:
        udp, relay = self._udp[cid]
        if host is not None:
            udp.sendto(socks5.datagram(host, port, _unb64(payload)), relay)
        res: dict[str, Any] = {"reply": None, "from": None}
        if expect_reply:
            udp.settimeout(timeout)
            try:
                data = udp.recv(65535)
            except TimeoutError:
                return res
            peer_host, peer_port, body = socks5.parse_datagram(data)
            res.update(reply=_b64(body), **{"from": [peer_host, peer_port]})
        return res

    def m_socks_udp_receive(self, cid: int, count: int, timeout: float = 3.0) -> dict[str, Any]:
        udp, _ = self._udp[cid]
        udp.settimeout(timeout)
        received, digest, senders = 0, 0, []
        while received < count:
            try:
                data = udp.recv(65535)
            except TimeoutError:
                break
            peer_host, peer_port, body = socks5.parse_datagram(data)
            received += 1
            digest = _multiset_digest(digest, body)
            if [peer_host, peer_port] not in senders:
                senders.append([peer_host, peer_port])
        return {"received": received, "digest": f"{digest:064x}", "from": senders}

    def m_socks_step(self, proxy: list[Any], user: str, password: str, step: str, target: list[Any],
                     udp_target: list[Any], timeout: float = 3.0) -> dict[str, Any]:
        return _socks_step((proxy[0], int(proxy[1])), user, password, step,
                           (target[0], int(target[1])), (udp_target[0], int(udp_target[1])), timeout)

    def m_socks_storm(self, proxy: list[Any], user: str, password: str, idle: int, steps: int,
                      idle_at_once: int, target: list[Any], udp_target: list[Any],
                      seconds: float, handshake_timeout: float,
                      step_gap: float = 0.0) -> dict[str, Any]:
        """Idle handshakes held open beside resets at every step (Agent.socks_storm). An idle
        connection closed by the service sooner than its ``handshake_timeout`` (counted from
        the connection's accept, which comes after its connect) was refused (a cap); later,
        it timed out. A busy service refuses late, so no shorter time tells. Returns
        ``{"idle": {"opened", "refused", "timed_out", "left_open", "longest"}, "steps":
        {step: [reached, not reached]}, "compared": [equal, different], "errors": [a few],
        "seconds"}``."""
        server = (proxy[0], int(proxy[1]))
        halves = [b"", socks5.greeting(user)[:2]]
        timeout = 3.0
        started = time.monotonic()
        until = started + seconds
        held: dict[socket.socket, float] = {}
        out: dict[str, Any] = {"idle": {"opened": 0, "refused": 0, "timed_out": 0, "left_open": 0,
                                        "longest": 0.0},
                               "steps": {step: [0, 0] for step in SOCKS_STEPS}, "compared": [0, 0],
                               "step_seconds": {}, "errors": []}
        idle_out = out["idle"]
        done_steps, next_step = 0, started

        def reap(wait: float) -> None:
            """Count the idle connections the service has closed, by how long they lasted."""
            for key, _ in selector.select(wait):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if sock.recv(64) and sock in held:
                        continue  # what the service answered (the method): wait for the close
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                lasted = time.monotonic() - held.pop(sock)
                idle_out["refused" if lasted < handshake_timeout else "timed_out"] += 1
                idle_out["longest"] = max(idle_out["longest"], round(lasted, 3))
                selector.unregister(sock)
                sock.close()

        with selectors.DefaultSelector() as selector:
            while (idle_out["opened"] < idle or held or done_steps < steps) and time.monotonic() < until:
                while idle_out["opened"] < idle and len(held) < idle_at_once:
                    sock = socket.socket(_family(server[0]), socket.SOCK_STREAM)
                    idle_out["opened"] += 1
                    begun = time.monotonic()  # before its SYN: no accept comes sooner
                    try:
                        sock.settimeout(timeout)
                        sock.connect(server)
                        sock.sendall(halves[idle_out["opened"] % 2])
                    except OSError as exc:  # refused at once, before the bytes went
                        sock.close()
                        idle_out["refused"] += 1
                        if len(out["errors"]) < 10:
                            out["errors"].append(f"idle connection: {exc}")
                        continue
                    sock.setblocking(False)
                    held[sock] = begun
                    selector.register(sock, selectors.EVENT_READ)
                    reap(0)  # those closed meanwhile: a burst takes a while to open
                if done_steps < steps and time.monotonic() >= next_step:
                    next_step += step_gap
                    step = SOCKS_STEPS[done_steps % len(SOCKS_STEPS)]
                    at = time.monotonic()
                    res = _socks_step(server, user, password, step, (target[0], int(target[1])),
                                      (udp_target[0], int(udp_target[1])), timeout)
                    out["step_seconds"][step] = round(out["step_seconds"].get(step, 0.0)
                                                      + time.monotonic() - at, 3)
                    out["steps"][step][0 if res["reached"] else 1] += 1
                    if res["compared"] is not None:
                        out["compared"][0 if res["compared"] else 1] += 1
                    if res["error"] and len(out["errors"]) < 10 and res["reached"]:
                        out["errors"].append(f"{step}: {res['error']}")
                    done_steps += 1
                reap(0.05 if done_steps >= steps else max(0.0, min(0.05, next_step - time.monotonic())))
            idle_out["left_open"] = len(held)
            for sock in held:
                selector.unregister(sock)
                sock.close()
        out["seconds"] = round(time.monotonic() - started, 2)
        return out

    def m_connect_flood(self, addr: str, port: int, count: int) -> dict[str, Any]:
        started, sent = time.monotonic(), 0
        for _ in range(count):
            with socket.socket(_family(addr), socket.SOCK_STREAM) as sock:
                sock.setblocking(False)
                if sock.connect_ex((addr, port)) in (errno.EINPROGRESS, 0):
                    sent += 1  # the SYN is out; closing now sends nothing more
        return {"sent": sent, "seconds": time.monotonic() - started}

    def m_datagram_flood(self, addr: str, port: int, count: int, payload: str) -> dict[str, Any]:
        data, started, sent = _unb64(payload), time.monotonic(), 0
        for _ in range(count):
            with socket.socket(_family(addr), socket.SOCK_DGRAM) as sock, \
                    contextlib.suppress(OSError):
                sent += sock.sendto(data, (addr, port)) > 0
        return {"sent": sent, "seconds": time.monotonic() - started}

    def m_udp_burst(self, addr: str, port: int, count: int, size: int | list[int],
                    expect_replies: bool, timeout: float = 3.0,
                    first_answered: bool = False) -> dict[str, Any]:
        where = _fmt_addr(addr, port)
        res: dict[str, Any] = {"sent": 0, "local": None, "digest": None, "replies": 0,
                               "reply_digest": None, "error": None}
        sent = replies = 0
        sock = socket.socket(_family(addr), socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.settimeout(timeout)
            sock.connect((addr, port))
            res["local"] = list(sock.getsockname()[:2])
            sizes = size if isinstance(size, list) else [size] * count
            for i in range(count):
                data = _burst_payload(i, sizes[i])
                sock.send(data)
                sent = _multiset_digest(sent, data)
                res["sent"] += 1
                if first_answered and i == 0:
                    try:
                        replies = _multiset_digest(replies, sock.recv(65535))
                    except TimeoutError:
                        res["error"] = f"no answer to the first datagram to {where} within {timeout:g} s"
                        break
                    res["replies"] += 1
            while expect_replies and res["error"] is None and res["replies"] < count:
                try:
                    replies = _multiset_digest(replies, sock.recv(65535))
                except TimeoutError:
                    break
                res["replies"] += 1
        except OSError as exc:
            res["error"] = f"UDP burst to {where} failed: {exc.strerror or exc}"
        finally:
            sock.close()
        res["digest"] = f"{sent:064x}"
        res["reply_digest"] = f"{replies:064x}"
        return res

    def m_udp_send(self, addr: str, port: int, payload: str, expect_reply: bool,
                   timeout: float = 3.0, bind: str | None = None) -> dict[str, Any]:
        data = _unb64(payload)
        where = _fmt_addr(addr, port)
        res: dict[str, Any] = {"sent": 0, "reply": None, "local": None, "error": None}
        sock = socket.socket(_family(addr), socket.SOCK_DGRAM)
        try:
            if bind:
                sock.bind((bind, 0))
            sock.connect((addr, port))
            res["local"] = list(sock.getsockname()[:2])
            res["sent"] = sock.send(data)
            if expect_reply:
                sock.settimeout(timeout)
                try:
                    res["reply"] = _b64(sock.recv(65535))
                except TimeoutError:
                    res["error"] = f"no reply from {where} within {timeout:g} s"
                except ConnectionRefusedError:
                    res["error"] = f"{where} refused (ICMP port unreachable)"
        except OSError as exc:
            res["error"] = f"UDP to {where} failed: {exc.strerror or exc}"
        finally:
            sock.close()
        return res


def _unacknowledged(sock: socket.socket) -> int:
    """The bytes a TCP socket has sent or queued that its peer has not acknowledged
    (SIOCOUTQ). A connection closed with such bytes is reset instead: closed normally, the
    kernel would retransmit them for minutes (a firewall that stalled it, as the conntrack
    helpers do, drops every copy) into the captures of the checks that come after."""
    try:
        queued: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return queued
    except OSError:
        return 0


def _reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# Where a SOCKS client can stop (Agent.socks_step): in the handshake, just after a request
# (before its reply), and in each command's later states
SOCKS_STEPS = ("connected", "half-greeting", "greeted", "half-login", "logged-in", "half-request",
               "requested-connect", "requested-bind", "requested-udp", "connect-replied",
               "connect-relaying", "connect-exchange", "bind-waiting", "bind-early", "udp-associated",
               "udp-relaying")
EARLY_BYTES = 32768  # what "bind-early" sends before a peer comes


def _socks_step(proxy: tuple[str, int], user: str, password: str, step: str,
                target: tuple[str, int], udp_target: tuple[str, int], timeout: float) -> dict[str, Any]:
    if step not in SOCKS_STEPS:
        raise ValueError(f"no SOCKS step {step!r}")
    res: dict[str, Any] = {"step": step, "reached": False, "compared": None, "error": None}
    sock = socket.socket(_family(proxy[0]), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each piece its own segment, at once
    anywhere = "0.0.0.0" if sock.family == socket.AF_INET else "::"
    command, host, port = ("connect", *target)
    if "bind" in step:
        command, host, port = "bind", anywhere, 0
    elif "udp" in step:
        command, host, port = "udp", anywhere, 0
    greeting, login = socks5.greeting(user), socks5.login(user, password)
    request = socks5.request(command, host, port)
    stages: list[tuple[str, bytes, Callable[[bytes], None] | None]] = [
        # (the step that stops before, what to send, what checks the 2 bytes answered)
        ("half-greeting", greeting[:2], None), ("", greeting[2:], lambda got: socks5.check_method(got, user)),
        ("half-login", login[:len(login) // 2], None), ("", login[len(login) // 2:], socks5.check_login),
        ("half-request", request[:5], None), ("", request[5:], None)]
    stop_before = {"connected": "half-greeting", "greeted": "half-login", "logged-in": "half-request"}
    try:
        sock.connect(proxy)
        for name, data, check in stages:
            if step in (name, stop_before.get(step)) and name:
                if step == name:
                    sock.sendall(data)
                break
            sock.sendall(data)
            if check is not None:
                check(_recv_exactly(sock, 2))
        else:
            if not step.startswith("requested"):
                reply = _read_socks_reply(sock)
                if reply["code"] != 0:
                    raise SOCKSError(f"SOCKS reply {reply['code']} ({reply['name']})")
                res.update(_socks_after_reply(sock, step, reply, udp_target))
        res["reached"] = True
    except (OSError, SOCKSError) as exc:
        res["error"] = _socks_failure(exc)
    finally:
        if step == "connect-exchange":
            sock.close()
        else:
            _reset(sock)
    return res


def _socks_after_reply(sock: socket.socket, step: str, reply: dict[str, Any],
                       udp_target: tuple[str, int]) -> dict[str, Any]:
    """What a step does once the request's reply came: data relayed and compared."""
    if step in ("connect-relaying", "connect-exchange"):
        data = os.urandom(1000)
        sock.sendall(data)
        return {"compared": _recv_exactly(sock, len(data)) == data}
    if step == "bind-early":
        sock.sendall(b"x" * EARLY_BYTES)
    elif step == "udp-relaying":
        with socket.socket(sock.family, socket.SOCK_DGRAM) as udp:
            udp.bind((sock.getsockname()[0], 0))
            udp.settimeout(sock.gettimeout())
            data = os.urandom(100)
            udp.sendto(socks5.datagram(*udp_target, data), (reply["address"], reply["port"]))
            host, port, body = socks5.parse_datagram(udp.recv(65535))
            return {"compared": body == data and (host, port) == udp_target}
    return {}


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("the SOCKS server closed the connection")
        data += chunk
    return data


def _read_socks_reply(sock: socket.socket) -> dict[str, Any]:
    """One SOCKS5 reply, read without taking a byte of what follows it."""
    head = _recv_exactly(sock, socks5.REPLY_HEAD)
    data = head + _recv_exactly(sock, socks5.reply_size(head) - len(head))
    return socks5.parse_reply(data)._asdict()


def _socks_failure(exc: OSError | SOCKSError) -> str:
    """Why a SOCKS conversation stopped, for a result's error."""
    return str(getattr(exc, "strerror", None) or exc)


def _multiset_digest(digest: int, data: bytes) -> int:
    """Add a datagram to an order-independent digest: the sum of SHA-256 values. Datagrams
    may be reordered on the way (a flow's first ones wait in the enforcer's queue while
    later ones pass), so what is compared is which datagrams arrived, not their order."""
    return (digest + int.from_bytes(hashlib.sha256(data).digest(), "big")) % (1 << 256)


def multiset_digest(datagrams: list[bytes]) -> str:
    """The digest an agent reports (``digest`` of a UDP server's stats, of a burst, of
    ``SocksConnection.udp_receive``) for these datagrams, in any order."""
    digest = 0
    for data in datagrams:
        digest = _multiset_digest(digest, data)
    return f"{digest:064x}"


def _burst_payload(i: int, size: int) -> bytes:
    return (i.to_bytes(4, "big") + _PATTERN[i % 256:] * (1 + size // 65536))[:size]


def serve() -> None:
    """Agent main loop: JSON requests on stdin, JSON responses on the original stdout."""
    # Keep the protocol channel private: anything printed (Scapy included) goes to stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out = os.fdopen(out_fd, "wb", buffering=0)
    # The agent exits when the caller goes away (stdin EOF); SIGTERM too, quietly.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    from scapy.config import conf

    conf.verb = 0
    _layer_class("Ether")  # (the layers, once)
    server = _AgentServer(out)
    server.run(sys.stdin.buffer)
    # Daemon threads (sniffers, servers) end with the process.
    with contextlib.suppress(OSError):
        out.close()
    os._exit(0)


if __name__ == "__main__":
    serve()
