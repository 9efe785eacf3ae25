"""The SOCKS5 service Firewall clients use (RFC 1928, RFC 1929 user/password).

A Firewall-client session is a client IP and user; it lasts while that user has a
connection to this service open. Each connection makes one request. CONNECT
asks the fw to connect for the client, and the engine judges it as it judges a
SecureNAT flow (policy, or a permission of the session or an ADDRESS_BASED one of
its IP). BIND is BindForClient: the fw listens on an external address at once and
tells the client, and what arrives is discarded at packet level until
RetroactiveAllowBind approves the bind. UDP ASSOCIATE relays datagrams through a
UDP bind, for the one client endpoint that asked (``socks.UdpAssociation``). The fw
relays every byte in this process, in the daemon's one event loop, leaving from an
external address.

The service answers only the internal side: a connection from an address on no
internal network is closed unserved, and a relay takes datagrams from its client
alone (the fw's rules drop both from outside before they arrive). Everything a
client can make it hold is capped (``Limits``, SPEC rule 16): connections per
client and in total (at a cap a new one is closed at once), the time to finish the
handshake, the time a BIND waits for its peer, the bytes held in each direction
(a client that sends more before its relay starts is not read until it starts),
and a UDP ASSOCIATE's targets. A session refused at a cap gets a failure, never a
success first. Every refusal is counted, and logged a few a client (``RefusalLog``):
connections to the service are not under the kernel's caps on new flows. Whatever a
client does, whenever it resets, nothing raises out of the event loop; a session's
end closes the BIND waits and UDP ASSOCIATEs it held, while relays already running go
on (their flows were admitted).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import selectors
import socket
import struct
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from enforcer.config import SocksSettings
from enforcer.core import socks
from enforcer.core.binds import Bind
from enforcer.core.datafilter import DataFilter, Direction, FilterFailed
from enforcer.core.engine import Engine
from enforcer.core.flows import FlowRecord
from enforcer.core.limits import Quota
from enforcer.core.packet import TCP, UDP, IPAddress
from enforcer.core.results import SessionApiError
from enforcer.core.sessions import Session
from enforcer.core.socks import Reply
from enforcer.core.state import Verdict
from enforcer.loop import OUT_OF_RESOURCES, Loop

log = logging.getLogger("pinhole.enforcer.socks")

CONNECT_TIMEOUT = 10.0
READ_SIZE = 65536  # the most one recv() takes
REFUSALS_LOGGED_EVERY = 10.0  # s: after a client's first refusal, a line sums up its others
REFUSING_CLIENTS_APART = 1024  # clients whose refusals are summed up each apart
_CONNECT_ERRORS = {errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
                   errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
                   errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
                   errno.ETIMEDOUT: Reply.TTL_EXPIRED}


def _family(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def _digest(password: str) -> bytes:
    return hashlib.sha256(password.encode()).digest()


K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """What waits for one kind of timeout (connections, clients), in the order theirs
    fall due: one timeout for all, on a monotonic clock, so the order they came in. A
    pass looks only at what is due."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._due: dict[K, float] = {}

    def add(self, key: K, now: float) -> None:
        """Start the wait of ``key`` (one not waiting: the order is the adding's)."""
        self._due[key] = now + self.timeout

    def discard(self, key: K) -> None:
        self._due.pop(key, None)

    def due(self, now: float) -> list[K]:
        """What is due at ``now``, no longer waiting."""
        out = []
        for key, at in self._due.items():
            if at > now:
                break
            out.append(key)
        for key in out:
            del self._due[key]
        return out

    def next(self) -> float | None:
        return next(iter(self._due.values()), None)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def __len__(self) -> int:
        return len(self._due)


class RefusalLog:
    """Refused connections, logged a few a client: its first refusal at once, then at
    most one line each REFUSALS_LOGGED_EVERY seconds saying how many more it had and
    the last (the counters count each). A client without one in that time is
    forgotten. Beyond REFUSING_CLIENTS_APART clients at once, the others' refusals are
    logged as one client's."""

    def __init__(self) -> None:
        # by client (None: the others), until its next line may be logged
        self._waits: Deadlines[IPAddress | None] = Deadlines(REFUSALS_LOGGED_EVERY)
        self._unlogged: dict[IPAddress | None, tuple[int, str]] = {}  # how many, the last

    def refused(self, client: IPAddress, what: str, now: float) -> None:
        """A refusal of ``client``: ``what`` says it."""
        key = client if client in self._waits or len(self._waits) < REFUSING_CLIENTS_APART else None
        if key in self._waits:
            count, _ = self._unlogged.get(key, (0, ""))
            self._unlogged[key] = (count + 1, what)
            return
        log.info("SOCKS: %s", what)
        self._waits.add(key, now)

    def tick(self, now: float) -> None:
        """Sum up the refusals not logged of each client whose wait is over."""
        for key in self._waits.due(now):
            count, last = self._unlogged.pop(key, (0, ""))
            if count:
                log.info("SOCKS: %d more refusals of %s since the last line about it (the last: %s)",
                         count, "other clients" if key is None else key, last)
                self._waits.add(key, now)

    def __len__(self) -> int:
        """Clients it holds state for."""
        return len(self._waits)


class SocksService:
    def __init__(self, engine: Engine, loop: Loop, clock: Callable[[], float],
                 settings: SocksSettings, addresses: list[IPAddress],
                 dispatch: Callable[[], None],
                 stream_filter: Callable[[FlowRecord], DataFilter] | None = None) -> None:
        """Listen on ``addresses`` (the fw's internal ones). ``stream_filter`` makes the
        filter of a relayed connection whose flow has one (an application filter on a
        primary). The service takes the engine's ``on_session_end``."""
        self.engine = engine
        self.limits = engine.limits
        self.stream_filter = stream_filter
        self.loop = loop
        self.clock = clock
        self.settings = settings
        self.dispatch = dispatch  # push the engine's events to filters
        self.quota = Quota("socks_connections", self.limits, engine.counters)
        self.listeners: list[socket.socket] = []
        self.clients: set[_Client] = set()
        self.by_session: dict[int, set[_Client]] = {}  # authenticated clients, by session
        # until the request; CONNECT: until the target answers; BIND: until the peer comes
        self.handshakes: Deadlines[_Client] = Deadlines(self.limits.socks_handshake_timeout)
        self.connects: Deadlines[_Client] = Deadlines(CONNECT_TIMEOUT)
        self.binds: Deadlines[_Client] = Deadlines(self.limits.socks_bind_timeout)
        self.refusals = RefusalLog()
        self._digests = {user: _digest(password) for user, password in settings.users.items()}
        self._nobody = os.urandom(32)  # what an unknown user's password is compared with
        engine.on_session_end = self._session_ended
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
        ip = ipaddress.ip_address(peer[0])
        if not self.engine.is_internal(ip):
            # The weak-host model delivers what reaches an internal address from outside;
            # the fw's rules drop it first, and this holds without them (fail_open).
            self.engine.counters["socks: refused a client from outside"] += 1
            self.refusals.refused(ip, f"refused {ip}, which is on no internal network", self.clock())
            sock.close()
            return
        if not self.quota.fits(ip):
            self.refusals.refused(ip, f"refused a connection of {ip}: {self.quota.refuse(ip)}",
                                  self.clock())
            sock.close()
            return
        self.quota.take(ip)
        sock.setblocking(False)
        client = _Client(self, sock, ip, peer[1])
        self.clients.add(client)
        self.handshakes.add(client, self.clock())

    def forget(self, client: _Client) -> None:
        """A client closed: what it held goes back."""
        self.clients.discard(client)
        self.quota.release(client.ip)
        for deadlines in (self.handshakes, self.connects, self.binds):
            deadlines.discard(client)
        if client.session is not None:
            self.by_session.get(client.session, set()).discard(client)

    def check(self, user: str, password: str) -> bool:
        """An RFC 1929 login, compared in constant time (as long for an unknown user)."""
        wanted = self._digests.get(user, self._nobody)
        return hmac.compare_digest(_digest(password), wanted) and user in self._digests

    def socket_of(self, bind: Bind) -> socket.socket | None:
        """The socket the fw holds for a bind (for its receive buffer)."""
        return next((c.bound for c in self.clients if c.bind is bind), None)

    def _session_ended(self, session: Session) -> None:
        for client in list(self.by_session.pop(session.id, ())):
            client.session_ended()

    def tick(self, now: float) -> None:
        """Close what waited too long: a handshake, a connect, a BIND's peer. Each under
        the loop's guard: one client's failure stops no other. Then log the refusals
        due a line (at most a second late: the daemon ticks at least once a second)."""
        for client in self.handshakes.due(now):
            self.engine.counters["socks: handshake timed out"] += 1
            self.loop.guard(client.close, None, "SOCKS timer")
        for client in self.connects.due(now):
            self.loop.guard(functools.partial(client.fail, Reply.TTL_EXPIRED, "connect timed out"),
                            client.close, "SOCKS timer")
        for client in self.binds.due(now):
            self.engine.counters["socks: bind timed out"] += 1
            self.loop.guard(functools.partial(client.fail, Reply.TTL_EXPIRED, "no peer came"),
                            client.close, "SOCKS timer")
        self.refusals.tick(now)

    def next_deadline(self) -> float | None:
        """When ``tick`` next has a wait to end (the refusals' lines need no wakeup of
        their own: they wait for a tick that comes anyway)."""
        due = [d for d in (self.handshakes.next(), self.connects.next(), self.binds.next())
               if d is not None]
        return min(due) if due else None

    def limits_status(self) -> dict[str, dict[str, object]]:
        """The SOCKS caps, their use and refusals (``status``); looks at every client."""
        counters = self.engine.counters
        held = [c.held() for c in self.clients]
        targets = [len(c.association.targets) for c in self.clients if c.association is not None]
        return {
            **self.quota.status(),
            "socks_handshake_timeout": {"cap": self.limits.socks_handshake_timeout,
                                        "closed": counters["socks: handshake timed out"]},
            "socks_bind_timeout": {"cap": self.limits.socks_bind_timeout,
                                   "failed": counters["socks: bind timed out"]},
            "socks_buffer_bytes": {"cap": self.limits.socks_buffer_bytes,
                                   "highest": max(held, default=0),
                                   "clients_held": counters["socks: client held, buffer full"]},
            "socks_udp_targets": {"cap": self.limits.socks_udp_targets,
                                  "highest": max(targets, default=0),
                                  "refused": counters["refused: socks_udp_targets"]},
        }

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        for sock in self.listeners:
            self.loop.unwatch(sock)
            sock.close()
        self.listeners.clear()
        if self.engine.on_session_end == self._session_ended:
            self.engine.on_session_end = None


class _Client:
    """One client connection: the handshake, then CONNECT, BIND or UDP ASSOCIATE."""

    def __init__(self, service: SocksService, sock: socket.socket, ip: IPAddress, port: int) -> None:
        self.service = service
        self.engine = service.engine
        self.sock = sock
        self.ip, self.port = ip, port
        self.handshake = socks.ServerHandshake(service.settings.require_auth, service.check)
        self.session: int | None = None
        self.early = bytearray()  # what the client sent after its request, before the relay
        self.reading = True  # the client's socket is watched (not while early is full)
        self.flow: FlowRecord | None = None  # the flow a CONNECT made
        self.out = bytearray()  # replies not yet written
        self.peer: socket.socket | None = None  # CONNECT's socket to the target, BIND's peer
        self.bound: socket.socket | None = None  # BIND listener, or UDP ASSOCIATE's external socket
        self.relay_in: socket.socket | None = None  # UDP ASSOCIATE: where the client sends
        self.association: socks.UdpAssociation | None = None
        self.bind: Bind | None = None
        self.pipe: _Pipe | None = None
        self.closed = False
        service.loop.watch(sock, selectors.EVENT_READ, self._on_control, self.close)

    def held(self) -> int:
        """Bytes held for the client or its peer (status)."""
        if self.pipe is not None:
            return max(len(b) for b in self.pipe.buffers.values())
        return len(self.early)

    # --- the handshake --------------------------------------------------------------
    def _on_control(self) -> None:
        room = self.service.limits.socks_buffer_bytes - len(self.early)
        try:
            data = self.sock.recv(READ_SIZE if self.association is not None else min(READ_SIZE, room))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        if self.association is not None:
            return  # the connection only holds the association: what comes on it is dropped
        if self.handshake.done:  # before the relay starts (a connect or a BIND's peer awaited)
            self._keep(data)
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

    def _keep(self, data: bytes) -> None:
        """Bytes for the relay that has not started: held up to the cap, then the client
        is not read until it starts (TCP's window holds the rest at the client)."""
        self.early += data
        if len(self.early) >= self.service.limits.socks_buffer_bytes and self.reading:
            self.engine.counters["socks: client held, buffer full"] += 1
            self.service.loop.unwatch(self.sock)
            self.reading = False

    def _act(self, events: list[socks.Event]) -> None:
        for event in events:
            if self.closed:
                return
            if isinstance(event, socks.Send):
                self._send(event.data)
            elif isinstance(event, socks.Authenticated):
                self._open_session(event.user)
            elif isinstance(event, socks.RequestReceived):
                self.service.handshakes.discard(self)
                self._request(event.request)
            elif isinstance(event, socks.Payload):
                self._keep(event.data)
            else:
                self.close()

    def _open_session(self, user: str | None) -> None:
        """The session, before the reply that lets the client in: at a cap the client
        gets the handshake's refusal instead, and the connection closes."""
        try:
            session = self.engine.open_firewall_session(self.ip, user, self.service.clock())
        except SessionApiError as exc:
            self.service.refusals.refused(self.ip, f"client {self.ip} refused: {exc}",
                                          self.service.clock())
            self._send(self.handshake.refuse())
            self.close()
            return
        self.session = session.id
        self.service.by_session.setdefault(session.id, set()).add(self)

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
        if self.session is None:
            self.fail(Reply.GENERAL_FAILURE, "no session")
            return
        try:
            target = ipaddress.ip_address(request.host)
        except ValueError:
            self.fail(Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"{request.host!r}: the fw resolves no names")
            return
        if request.command == socks.CONNECT:
            self._connect(self.session, target, request.port)
        elif request.command == socks.BIND:
            self._bind(self.session)
        else:
            self._associate(self.session, target, request.port)

    def fail(self, code: Reply, why: str) -> None:
        log.debug("SOCKS client %s: %s", self.ip, why)
        self._send(socks.reply(code, "0.0.0.0", 0))
        self.close()

    # --- CONNECT ------------------------------------------------------------------------
    def _connect(self, session: int, target: IPAddress, port: int) -> None:
        decision = self.engine.client_connect(session, TCP, target, port, self.port,
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
        self.service.connects.add(self, self.service.clock())
        self.service.loop.watch(out, selectors.EVENT_WRITE, self._connected, self.close)

    def _connected(self) -> None:
        assert self.peer is not None
        self.service.connects.discard(self)
        self.service.loop.unwatch(self.peer)
        code = self.peer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.fail(_CONNECT_ERRORS.get(code, Reply.GENERAL_FAILURE), errno.errorcode.get(code, str(code)))
            return
        try:
            host, port = self.peer.getsockname()[:2]
        except OSError as exc:  # the target reset at once
            self.fail(Reply.GENERAL_FAILURE, f"connect: {exc}")
            return
        self._send(socks.reply(Reply.SUCCEEDED, host, port))
        self._relay(self.peer, self.flow)

    def _relay(self, other: socket.socket, flow: FlowRecord | None = None) -> None:
        """Relay between the client and ``other``; through the filter of ``flow`` if it
        has one."""
        if self.closed:  # the reply could not be written: the client is gone
            return
        self.service.loop.unwatch(self.sock)
        stream = None
        if flow is not None and (flow.app_filter or flow.data_filter) and \
                self.service.stream_filter is not None:
            stream = self.service.stream_filter(flow)
        self.pipe = _Pipe(self.service.loop, self.sock, other, self.close,
                          self.service.limits.socks_buffer_bytes, stream)
        out, early = bytes(self.out), bytes(self.early)
        self.out.clear()
        self.early.clear()
        self.pipe.start(out, early)

    # --- BIND ---------------------------------------------------------------------------
    def _bind(self, session: int) -> None:
        external = self.engine.external_address(self.ip.version)
        if external is None:
            self.fail(Reply.ADDRESS_TYPE_NOT_SUPPORTED, "no external address of the client's family")
            return
        try:
            self.bind = self.engine.bind_for_client(session, TCP, external, self.service.clock())
        except SessionApiError as exc:
            self.fail(Reply.GENERAL_FAILURE, f"bind: {exc}")
            return
        listener = socket.socket(_family(external), socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((str(external), self.bind.port))
            listener.listen(1)
        except OSError as exc:
            listener.close()
            self.fail(Reply.GENERAL_FAILURE, f"bind: {exc}")
            return
        listener.setblocking(False)
        self.bound = listener
        self.service.loop.watch(listener, selectors.EVENT_READ, self._accepted, self.close)
        self.service.binds.add(self, self.service.clock())
        # BindForClient always succeeds: the fw's external address and port, at once
        self._send(socks.reply(Reply.SUCCEEDED, str(external), self.bind.port))

    def _accepted(self) -> None:
        assert self.bound is not None and self.bind is not None
        try:
            conn, peer = self.bound.accept()
        except OSError:
            return  # gone before it was taken (a reset): the bind waits on
        self.service.binds.discard(self)
        self.service.loop.unwatch(self.bound)
        self.bound.close()
        self.bound = None
        self.engine.bind_done(self.bind)
        self.peer = conn
        conn.setblocking(False)
        self._send(socks.reply(Reply.SUCCEEDED, peer[0], peer[1]))
        self._relay(conn)

    # --- UDP ASSOCIATE ----------------------------------------------------------------
    def _associate(self, session: int, requested: IPAddress, port: int) -> None:
        try:
            association = socks.UdpAssociation(self.ip, requested, port,
                                               self.service.limits.socks_udp_targets)
        except socks.SocksError as exc:
            self.fail(exc.reply or Reply.GENERAL_FAILURE, str(exc))
            return
        external = self.engine.external_address(self.ip.version)
        if external is None:
            self.fail(Reply.ADDRESS_TYPE_NOT_SUPPORTED, "no external address of the client's family")
            return
        try:
            local = ipaddress.ip_address(self.sock.getsockname()[0])
            self.bind = self.engine.bind_for_client(session, UDP, external, self.service.clock())
        except (OSError, SessionApiError) as exc:
            self.fail(Reply.GENERAL_FAILURE, f"UDP ASSOCIATE: {exc}")
            return
        made: list[socket.socket] = []
        try:
            for address in (external, local):  # the relay's port is the bind's, on both sides
                made.append(socket.socket(_family(address), socket.SOCK_DGRAM))
                made[-1].bind((str(address), self.bind.port))
        except OSError as exc:
            for s in made:
                s.close()
            self.fail(Reply.GENERAL_FAILURE, f"UDP ASSOCIATE: {exc}")
            return
        self.bound, self.relay_in = made
        self.association = association
        for s, callback in ((self.bound, self._from_outside), (self.relay_in, self._from_client)):
            s.setblocking(False)
            self.service.loop.watch(s, selectors.EVENT_READ, callback, self.close)
        self.early.clear()  # nothing is relayed from the TCP connection of an association
        if not self.reading:
            self.service.loop.watch(self.sock, selectors.EVENT_READ, self._on_control, self.close)
            self.reading = True
        self._send(socks.reply(Reply.SUCCEEDED, str(local), self.bind.port))

    def _from_client(self) -> None:
        assert self.relay_in is not None and self.bound is not None
        assert self.association is not None and self.bind is not None
        try:
            data, source = self.relay_in.recvfrom(65535)
        except OSError:
            return
        counters = self.engine.counters
        if not self.association.from_client(ipaddress.ip_address(source[0]), source[1]):
            counters["socks: UDP from another source dropped"] += 1
            return
        try:
            host, port, payload = socks.parse_udp(data)
            target = ipaddress.ip_address(host)
        except (socks.SocksError, ValueError):
            counters["socks: malformed UDP dropped"] += 1
            return
        now = self.service.clock()
        if self.association.target(target, port) is None and \
                not self.bind.may_answer(target, port, now):
            if self.association.full:
                counters["refused: socks_udp_targets"] += 1
                return
            assert self.session is not None  # the association ends with its session
            decision = self.engine.client_connect(self.session, UDP, target, port, source[1], now)
            self.service.dispatch()
            if decision.verdict is Verdict.DROP:
                return
            self.association.add_target(target, port, two_way=not decision.one_way)
        with contextlib.suppress(OSError):
            self.bound.sendto(payload, (str(target), port))

    def _from_outside(self) -> None:
        assert self.bound is not None and self.relay_in is not None
        assert self.association is not None and self.bind is not None
        try:
            payload, peer = self.bound.recvfrom(65535)
        except OSError:
            return
        address, port = ipaddress.ip_address(peer[0]), peer[1]
        admitted = self.bind.admits(address)
        if not self.association.relays_from(address, port, admitted):
            one_way = self.association.target(address, port) is False
            self.engine.counters["socks: UDP reply dropped, one way" if one_way else
                                 "socks: UDP from an unknown peer dropped"] += 1
            return
        if admitted:
            self.engine.heard(self.bind, address, port, self.service.clock())
        endpoint = self.association.endpoint
        if endpoint is None:
            return  # the client has not sent yet: nowhere to relay to
        with contextlib.suppress(OSError):
            self.relay_in.sendto(socks.build_udp(peer[0], port, payload), (str(endpoint[0]), endpoint[1]))

    # --- the end ------------------------------------------------------------------------
    def session_ended(self) -> None:
        """The session ended (``end_session``): a BIND's wait fails and a UDP ASSOCIATE
        ends, as its bind did; a request not yet made is not served; a connect under
        way and a running relay go on (their flow was admitted)."""
        self.session = None
        if self.pipe is not None or self.peer is not None:
            return
        if self.bound is not None and self.association is None:
            self.fail(Reply.GENERAL_FAILURE, "the session ended before the peer came")
        else:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.service.forget(self)
        if self.pipe is not None:
            self.pipe.close()
        for s in (self.sock, self.peer, self.bound, self.relay_in):
            if s is None:
                continue
            self.service.loop.unwatch(s)  # the pipe may have done so already
            s.close()
        if self.bind is not None:
            self.engine.bind_done(self.bind)
        if self.session is not None:
            self.engine.close_firewall_connection(self.session, self.service.clock())


class _Pipe:
    """Relays bytes both ways between two non-blocking sockets in the event loop, holding
    at most ``limit`` bytes for each (then the other side is not read until it drains)."""

    def __init__(self, loop: Loop, a: socket.socket, b: socket.socket,
                 on_close: Callable[[], None], limit: int, stream: DataFilter | None = None) -> None:
        """``stream``: a filter that sees (and may change) what a sends (OUT) and what b
        sends (BACK)."""
        self.loop = loop
        self.stream = stream
        self.limit = limit
        self.ends = (a, b)
        self.buffers: dict[socket.socket, bytearray] = {a: bytearray(), b: bytearray()}  # to send
        self.eof: dict[socket.socket, bool] = {a: False, b: False}  # nothing more to read
        self.on_close = on_close
        self.done = False
        self.registered: set[socket.socket] = set()

    def start(self, to_a: bytes, to_b: bytes) -> None:
        a, b = self.ends
        self.buffers[a] += to_a
        if self.stream is not None and to_b:
            filtered = self._filter(Direction.OUT, to_b)
            if filtered is None:
                return
            to_b = filtered
        self.buffers[b] += to_b
        self._flush()

    def _filter(self, direction: Direction, data: bytes) -> bytes | None:
        """What the stream's filter makes of ``data``; None when it failed: the relay is
        then reset both ways (a FIN would pass a cut stream off as a whole one)."""
        assert self.stream is not None
        try:
            return self.stream.on_data(direction, data)
        except FilterFailed:
            for s in self.ends:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close()
            return None

    def _other(self, s: socket.socket) -> socket.socket:
        return self.ends[1] if s is self.ends[0] else self.ends[0]

    def _ready(self, s: socket.socket) -> None:
        other = self._other(s)
        room = self.limit - len(self.buffers[other])
        if not self.eof[s] and room > 0:
            try:
                data = s.recv(min(READ_SIZE, room))
            except BlockingIOError:
                data = None
            except OSError:
                self.close()
                return
            if data == b"":
                self.eof[s] = True
            elif data:
                if self.stream is not None:
                    filtered = self._filter(Direction.OUT if s is self.ends[0] else Direction.BACK,
                                            data)
                    if filtered is None:
                        return
                    data = filtered
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
            events = (0 if self.eof[s] or len(self.buffers[self._other(s)]) >= self.limit
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
