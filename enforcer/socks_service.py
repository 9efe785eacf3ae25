"""The SOCKS5 service Firewall clients use (RFC 1928, RFC 1929 user/password).

A Firewall-client session is a client IP and user; it lasts while the client has a
connection to this service open. Each connection makes one request. CONNECT
asks the fw to connect for the client, and the engine judges it as it judges a
SecureNAT flow (policy, or a permission of the session or an ADDRESS_BASED one of
its IP). BIND is BindForClient: the fw listens on an external address at once and
tells the client, and what arrives is discarded at packet level until
RetroactiveAllowBind approves the bind. UDP ASSOCIATE relays datagrams through a
UDP bind. The fw relays every byte in this process, in the daemon's one event
loop, leaving from an external address.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import selectors
import socket
from collections.abc import Callable

from enforcer.config import SocksSettings
from enforcer.core import socks
from enforcer.core.binds import Bind
from enforcer.core.datafilter import DataFilter, Direction
from enforcer.core.engine import Engine, Verdict
from enforcer.core.flows import FlowRecord
from enforcer.core.packet import TCP, UDP, IPAddress
from enforcer.core.results import SessionApiError
from enforcer.core.socks import Reply
from enforcer.loop import OUT_OF_RESOURCES, Loop

log = logging.getLogger("pinhole.enforcer.socks")

BUFFER = 256 * 1024  # bytes held for a slow side before the other is no longer read
CONNECT_TIMEOUT = 10.0
_CONNECT_ERRORS = {errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
                   errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
                   errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
                   errno.ETIMEDOUT: Reply.TTL_EXPIRED}


def _family(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


class SocksService:
    def __init__(self, engine: Engine, loop: Loop, clock: Callable[[], float],
                 settings: SocksSettings, addresses: list[IPAddress],
                 dispatch: Callable[[], None],
                 stream_filter: Callable[[FlowRecord], DataFilter] | None = None) -> None:
        """``stream_filter`` makes the filter of a relayed connection whose flow has one
        (an application filter on a primary)."""
        self.engine = engine
        self.stream_filter = stream_filter
        self.loop = loop
        self.clock = clock
        self.settings = settings
        self.dispatch = dispatch  # push the engine's events to filters
        self.listeners: list[socket.socket] = []
        self.clients: set[_Client] = set()
        for address in addresses:
            sock = socket.socket(_family(address), socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.version == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((str(address), settings.port))
            sock.listen(128)
            sock.setblocking(False)
            self.loop.watch(sock, selectors.EVENT_READ, functools.partial(self._accept, sock))
            self.listeners.append(sock)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, peer = listener.accept()
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                self.loop.pause(listener, selectors.EVENT_READ,
                                functools.partial(self._accept, listener), exc)
            return
        self.loop.accepted(listener)
        sock.setblocking(False)
        self.clients.add(_Client(self, sock, ipaddress.ip_address(peer[0]), peer[1]))

    def check(self, user: str, password: str) -> bool:
        return self.settings.users.get(user) == password

    def socket_of(self, bind: Bind) -> socket.socket | None:
        """The socket the fw holds for a bind (for its receive buffer)."""
        return next((c.bound for c in self.clients if c.bind is bind), None)

    def tick(self, now: float) -> None:
        """Give up on connects that take too long."""
        for client in list(self.clients):
            if client.deadline is not None and now > client.deadline:
                client.fail(Reply.TTL_EXPIRED, "connect timed out")

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        for sock in self.listeners:
            self.loop.unwatch(sock)
            sock.close()
        self.listeners.clear()


class _Client:
    """One client connection: the handshake, then CONNECT, BIND or UDP ASSOCIATE."""

    def __init__(self, service: SocksService, sock: socket.socket, ip: IPAddress, port: int) -> None:
        self.service = service
        self.engine = service.engine
        self.sock = sock
        self.ip, self.port = ip, port
        self.handshake = socks.ServerHandshake(service.settings.require_auth, service.check)
        self.session: int | None = None
        self.refused: str | None = None  # why the session was refused (a cap): the request fails
        self.early = bytearray()  # what the client sent after its request
        self.flow: FlowRecord | None = None  # the flow a CONNECT made
        self.out = bytearray()  # replies not yet written
        self.peer: socket.socket | None = None  # the other end of the relay
        self.bound: socket.socket | None = None  # BIND listener, or UDP ASSOCIATE's external socket
        self.relay_in: socket.socket | None = None  # UDP ASSOCIATE: where the client sends
        self.udp_client: tuple[str, int] | None = None
        self.allowed: set[tuple[IPAddress, int]] = set()  # UDP destinations admitted
        self.bind: Bind | None = None
        self.deadline: float | None = None
        self.pipe: _Pipe | None = None
        self.closed = False
        service.loop.watch(sock, selectors.EVENT_READ, self._on_control, self.close)

    # --- the handshake --------------------------------------------------------------
    def _on_control(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        if self.handshake.done:  # before the relay starts (a connect in progress)
            self.early += data
            return
        try:
            events = self.handshake.feed(data)
        except socks.SocksError as exc:
            log.debug("SOCKS client %s: %s", self.ip, exc)
            self._act(list(exc.events))
            self._send(exc.response())
            self.close()
            return
        self._act(events)

    def _act(self, events: list[socks.Event]) -> None:
        for event in events:
            if self.closed:
                return
            if isinstance(event, socks.Send):
                self._send(event.data)
            elif isinstance(event, socks.Authenticated):
                try:
                    self.session = self.engine.open_firewall_session(self.ip, event.user,
                                                                     self.service.clock()).id
                except SessionApiError as exc:
                    log.info("SOCKS client %s refused: %s", self.ip, exc)
                    self.refused = str(exc)
            elif isinstance(event, socks.RequestReceived):
                self._request(event.request)
            elif isinstance(event, socks.Payload):
                self.early += event.data
            else:
                self.close()

    def _send(self, data: bytes) -> None:
        """Replies are small: written at once, or kept until the socket can take them."""
        if not data or self.closed:
            return
        self.out += data
        try:
            sent = self.sock.send(self.out)
            del self.out[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self.close()

    def _request(self, request: socks.Request) -> None:
        if self.refused is not None:  # RFC 1929's success is sent: the request fails instead
            self.fail(Reply.GENERAL_FAILURE, self.refused)
            return
        if self.session is None:
            self.close()
            return
        try:
            target = ipaddress.ip_address(request.host)
        except ValueError:
            self.fail(Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"{request.host!r}: the fw resolves no names")
            return
        if request.command == socks.CONNECT:
            self._connect(target, request.port)
        elif request.command == socks.BIND:
            self._bind()
        else:
            self._associate()

    def fail(self, code: Reply, why: str) -> None:
        log.debug("SOCKS client %s: %s", self.ip, why)
        self._send(socks.reply(code, "0.0.0.0", 0))
        self.close()

    # --- CONNECT ------------------------------------------------------------------------
    def _connect(self, target: IPAddress, port: int) -> None:
        assert self.session is not None
        decision = self.engine.client_connect(self.session, TCP, target, port, self.port,
                                              self.service.clock())
        self.service.dispatch()
        # the address the decision chose (relayed flows always leave from one of ours)
        external = self.engine.external_address(target.version, decision.snat or 0)
        if decision.verdict is Verdict.DROP or external is None:
            self.fail(Reply.NOT_ALLOWED, decision.reason)
            return
        out = socket.socket(_family(target), socket.SOCK_STREAM)
        out.setblocking(False)
        try:
            out.bind((str(external), 0))
            code = out.connect_ex((str(target), port))
        except OSError as exc:
            out.close()
            self.fail(Reply.GENERAL_FAILURE, f"connect: {exc}")
            return
        if code not in (0, errno.EINPROGRESS):
            out.close()
            self.fail(_CONNECT_ERRORS.get(code, Reply.GENERAL_FAILURE), errno.errorcode.get(code, str(code)))
            return
        self.peer = out
        self.flow = self.engine.flows.get(decision.key)
        self.deadline = self.service.clock() + CONNECT_TIMEOUT
        self.service.loop.watch(out, selectors.EVENT_WRITE, self._connected, self.close)

    def _connected(self) -> None:
        assert self.peer is not None
        code = self.peer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.deadline = None
        self.service.loop.unwatch(self.peer)
        if code:
            self.fail(_CONNECT_ERRORS.get(code, Reply.GENERAL_FAILURE), errno.errorcode.get(code, str(code)))
            return
        host, port = self.peer.getsockname()[:2]
        self._send(socks.reply(Reply.SUCCEEDED, host, port))
        self._relay(self.peer, self.flow)

    def _relay(self, other: socket.socket, flow: FlowRecord | None = None) -> None:
        """Relay between the client and ``other``; through the filter of ``flow`` if it
        has one."""
        self.service.loop.unwatch(self.sock)
        stream = None
        if flow is not None and (flow.app_filter or flow.data_filter) and \
                self.service.stream_filter is not None:
            stream = self.service.stream_filter(flow)
        self.pipe = _Pipe(self.service.loop, self.sock, other, self.close, stream)
        self.pipe.start(bytes(self.out), bytes(self.early))
        self.out.clear()
        self.early.clear()

    # --- BIND ---------------------------------------------------------------------------
    def _bind(self) -> None:
        assert self.session is not None
        external = self.engine.external_address(self.ip.version)
        if external is None:
            self.fail(Reply.ADDRESS_TYPE_NOT_SUPPORTED, "no external address of the client's family")
            return
        try:
            self.bind = self.engine.bind_for_client(self.session, TCP, external, self.service.clock())
            listener = socket.socket(_family(external), socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((str(external), self.bind.port))
            listener.listen(1)
        except (OSError, SessionApiError) as exc:
            self.fail(Reply.GENERAL_FAILURE, f"bind: {exc}")
            return
        listener.setblocking(False)
        self.bound = listener
        self.service.loop.watch(listener, selectors.EVENT_READ, self._accepted, self.close)
        # BindForClient always succeeds: the fw's external address and port, at once
        self._send(socks.reply(Reply.SUCCEEDED, str(external), self.bind.port))

    def _accepted(self) -> None:
        assert self.bound is not None and self.bind is not None
        try:
            conn, peer = self.bound.accept()
        except OSError:
            return
        self.service.loop.unwatch(self.bound)
        self.bound.close()
        self.bound = None
        self.engine.bind_done(self.bind)
        conn.setblocking(False)
        self._send(socks.reply(Reply.SUCCEEDED, peer[0], peer[1]))
        self._relay(conn)

    # --- UDP ASSOCIATE ----------------------------------------------------------------
    def _associate(self) -> None:
        assert self.session is not None
        external = self.engine.external_address(self.ip.version)
        local = ipaddress.ip_address(self.sock.getsockname()[0])
        if external is None:
            self.fail(Reply.ADDRESS_TYPE_NOT_SUPPORTED, "no external address of the client's family")
            return
        try:
            self.bind = self.engine.bind_for_client(self.session, UDP, external, self.service.clock())
            bound = socket.socket(_family(external), socket.SOCK_DGRAM)
            bound.bind((str(external), self.bind.port))
            relay_in = socket.socket(_family(local), socket.SOCK_DGRAM)
            relay_in.bind((str(local), 0))
        except (OSError, SessionApiError) as exc:
            self.fail(Reply.GENERAL_FAILURE, f"UDP ASSOCIATE: {exc}")
            return
        for s, callback in ((bound, self._from_outside), (relay_in, self._from_client)):
            s.setblocking(False)
            self.service.loop.watch(s, selectors.EVENT_READ, callback, self.close)
        self.bound, self.relay_in = bound, relay_in
        self._send(socks.reply(Reply.SUCCEEDED, str(local), relay_in.getsockname()[1]))

    def _from_client(self) -> None:
        assert self.relay_in is not None and self.bound is not None and self.session is not None
        try:
            data, source = self.relay_in.recvfrom(65535)
        except OSError:
            return
        if ipaddress.ip_address(source[0]) != self.ip:
            return  # only the associated client's datagrams are relayed
        self.udp_client = (source[0], source[1])
        try:
            host, port, payload = socks.parse_udp(data)
            target = ipaddress.ip_address(host)
        except (socks.SocksError, ValueError):
            return
        now = self.service.clock()
        if (target, port) not in self.allowed:
            if self.bind is not None and self.bind.may_answer(target, port, now):
                self.allowed.add((target, port))
            else:
                decision = self.engine.client_connect(self.session, UDP, target, port, source[1], now)
                self.service.dispatch()
                if decision.verdict is Verdict.DROP:
                    return
                self.allowed.add((target, port))
        with contextlib.suppress(OSError):
            self.bound.sendto(payload, (str(target), port))

    def _from_outside(self) -> None:
        assert self.bound is not None and self.relay_in is not None
        try:
            payload, peer = self.bound.recvfrom(65535)
        except OSError:
            return
        if self.bind is not None:
            self.engine.heard(self.bind, ipaddress.ip_address(peer[0]), peer[1], self.service.clock())
        if self.udp_client is not None:
            with contextlib.suppress(OSError):
                self.relay_in.sendto(socks.build_udp(peer[0], peer[1], payload), self.udp_client)

    # --- the end ------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pipe is not None:
            self.pipe.close()
        for s in (self.sock, self.peer, self.bound, self.relay_in):
            if s is None:
                continue
            self.service.loop.unwatch(s)  # the pipe may have done so already
            s.close()
        self.service.clients.discard(self)
        if self.bind is not None:
            self.engine.bind_done(self.bind)
        if self.session is not None:
            self.engine.close_firewall_connection(self.session, self.service.clock())


class _Pipe:
    """Relays bytes both ways between two non-blocking sockets in the event loop."""

    def __init__(self, loop: Loop, a: socket.socket, b: socket.socket,
                 on_close: Callable[[], None], stream: DataFilter | None = None) -> None:
        """``stream``: a filter that sees (and may change) what a sends (OUT) and what b
        sends (BACK)."""
        self.loop = loop
        self.stream = stream
        self.ends = (a, b)
        self.buffers: dict[socket.socket, bytearray] = {a: bytearray(), b: bytearray()}  # to send
        self.eof: dict[socket.socket, bool] = {a: False, b: False}  # nothing more to read
        self.on_close = on_close
        self.done = False
        self.registered: set[socket.socket] = set()

    def start(self, to_a: bytes, to_b: bytes) -> None:
        a, b = self.ends
        self.buffers[a] += to_a
        self.buffers[b] += self.stream.on_data(Direction.OUT, to_b) if self.stream and to_b else to_b
        self._flush()

    def _other(self, s: socket.socket) -> socket.socket:
        return self.ends[1] if s is self.ends[0] else self.ends[0]

    def _ready(self, s: socket.socket) -> None:
        other = self._other(s)
        if not self.eof[s] and len(self.buffers[other]) < BUFFER:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                data = None
            except OSError:
                self.close()
                return
            if data == b"":
                self.eof[s] = True
            elif data:
                if self.stream is not None:
                    data = self.stream.on_data(
                        Direction.OUT if s is self.ends[0] else Direction.BACK, data)
                self.buffers[other] += data
        self._flush()

    def _flush(self) -> None:
        for s in self.ends:
            buf = self.buffers[s]
            if buf:
                try:
                    sent = s.send(buf)
                    del buf[:sent]
                except BlockingIOError:
                    pass
                except OSError:
                    self.close()
                    return
            if not buf and self.eof[self._other(s)]:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_WR)
        if all(self.eof.values()) and not any(self.buffers.values()):
            self.close()
            return
        for s in self.ends:
            events = (0 if self.eof[s] or len(self.buffers[self._other(s)]) >= BUFFER
                      else selectors.EVENT_READ) | (selectors.EVENT_WRITE if self.buffers[s] else 0)
            if events:
                self.loop.watch(s, events, functools.partial(self._ready, s), self.close)
                self.registered.add(s)
            elif s in self.registered:
                self.loop.unwatch(s)
                self.registered.discard(s)

    def close(self) -> None:
        if self.done:
            return
        self.done = True
        for s in self.registered:
            self.loop.unwatch(s)
        self.registered.clear()
        self.on_close()

