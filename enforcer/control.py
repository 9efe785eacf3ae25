"""The control socket: a UNIX stream socket, root only, serving the session API.

Non-blocking and driven by the daemon's one event loop. A bad request gets an
error reply naming the problem; the connection (and the daemon) go on serving.
No client can hold the loop: replies and events are queued and written as the
socket takes them (a client that lets more than ``MAX_UNSENT`` bytes pile up is
dropped; a reply larger than that on its own is answered with an error instead),
and a connection gets at most ``REQUESTS_PER_TURN`` requests answered before the
loop turns to other work. A listing returns at most its ``limit`` of items: the
reply then says how many it left out (``Listing``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from enforcer.core.results import InvalidArgument, SessionApiError
from enforcer.loop import OUT_OF_RESOURCES, Loop
from enforcer.protocol import MAX_REQUEST, Listing, encode

MAX_UNSENT = 4 << 20  # bytes of replies and events a client may leave unread
REQUESTS_PER_TURN = 64


class Caller:
    """One client connection, as a handler sees it: it can be pushed events."""

    def __init__(self, server: ControlServer, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn

    def push(self, message: dict[str, Any]) -> None:
        """Send an unsolicited message (an event: it has no "id")."""
        self.server.send(self.conn, message)


log = logging.getLogger("pinhole.enforcer.control")
Handler = Callable[[dict[str, Any], Caller], Any]


class ControlServer:
    def __init__(self, path: str, handlers: dict[str, Handler], loop: Loop,
                 on_disconnect: Callable[[Caller], None] = lambda caller: None) -> None:
        self.path = Path(path)
        self.handlers = handlers
        self.loop = loop
        self.path.parent.mkdir(parents=True, exist_ok=True)
        refuse_if_served(self.path)
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: root only
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old)
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.on_disconnect = on_disconnect
        self._buffers: dict[socket.socket, bytearray] = {}  # requests read, not yet answered
        self._unsent: dict[socket.socket, bytearray] = {}
        self._callers: dict[socket.socket, Caller] = {}
        # connections with complete requests left for a later turn (one timer each): not
        # read meanwhile, so that a client that sends without end holds one read's bytes
        self._waiting: set[socket.socket] = set()
        loop.watch(self.sock, selectors.EVENT_READ, self._accept)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self.loop.pause(self.sock, selectors.EVENT_READ, self._accept, exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # that one gave up: the next may not have
                raise
            self.loop.accepted(self.sock)
            try:
                self._admit(conn)
            except OSError:
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != 0:
            conn.sendall(encode({"id": None, "error": InvalidArgument(
                "the control socket is for root only").to_dict()}))
            conn.close()
            return
        conn.setblocking(False)
        self._buffers[conn] = bytearray()
        self._unsent[conn] = bytearray()
        self._callers[conn] = Caller(self, conn)
        self._arm(conn)

    def _arm(self, conn: socket.socket) -> None:
        """Watch a connection for requests, unless answers are queued up (then for room
        to write them: a client must read before it is read again) or requests wait for
        a later turn (then not at all until they are answered)."""
        if self._unsent[conn]:
            self.loop.watch(conn, selectors.EVENT_WRITE, lambda: self._write(conn),
                            lambda: self._drop(conn))
        elif conn in self._waiting:
            self.loop.unwatch(conn)
        else:
            self.loop.watch(conn, selectors.EVENT_READ, lambda: self._read(conn),
                            lambda: self._drop(conn))

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        self._buffers[conn] += data
        self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        """Answer up to REQUESTS_PER_TURN complete requests; the rest on a later turn."""
        buf = self._buffers.get(conn)
        if buf is None:
            return
        for _ in range(REQUESTS_PER_TURN):
            end = buf.find(b"\n")
            if end < 0:
                break
            line = bytes(buf[:end])
            del buf[: end + 1]
            self._reply(conn, self.handle_line(line, self._callers[conn]))
            if conn not in self._buffers:
                return  # dropped while answering
        else:
            if b"\n" in buf:
                if conn not in self._waiting:
                    self._waiting.add(conn)
                    self.loop.call_later(0, lambda: self._next_turn(conn))
                self._arm(conn)
                return
        if len(buf) > MAX_REQUEST:
            # No newline within the limit: answer, then close, since the rest of
            # this line cannot be told apart from the next request.
            self._reply(conn, _error(None, InvalidArgument(
                f"request too large: more than {MAX_REQUEST} bytes without a newline")))
            self._flush(conn)
            self._drop(conn)

    def _next_turn(self, conn: socket.socket) -> None:
        """Answer the requests a connection left for this turn; read it again once none is
        left."""
        self._waiting.discard(conn)
        if conn in self._buffers:
            self._answer(conn)
        if conn in self._buffers:
            self._arm(conn)

    def handle_line(self, line: bytes, caller: Caller) -> dict[str, Any]:
        """Answer one request line (public for tests)."""
        if len(line) > MAX_REQUEST:
            return _error(None, InvalidArgument(f"request too large: {len(line)} bytes > {MAX_REQUEST}"))
        try:
            # Decoded here: json.loads(bytes) would also accept UTF-16 and UTF-32.
            request = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            return _error(None, InvalidArgument(f"request is not valid JSON: not UTF-8 ({exc.reason})"))
        except ValueError as exc:
            # JSONDecodeError, and the plain ValueError of a number with more digits
            # than Python converts (sys.get_int_max_str_digits)
            return _error(None, InvalidArgument(f"request is not valid JSON: {exc}"))
        except RecursionError:
            return _error(None, InvalidArgument("request is not valid JSON: nested too deeply"))
        if not isinstance(request, dict):
            return _error(None, InvalidArgument("request must be a JSON object"))
        rid = request.get("id")
        # The reply echoes the id: a scalar only (a list or an object may be nested too
        # deeply to encode).
        if rid is not None and type(rid) not in (int, str):
            return _error(None, InvalidArgument(
                f"'id' must be an integer, a string or null, not {type(rid).__name__}"))
        method = request.get("method")
        params = request.get("params", {})
        if not isinstance(method, str):
            return _error(rid, InvalidArgument("request needs a string 'method'"))
        if not isinstance(params, dict):
            return _error(rid, InvalidArgument("'params' must be a JSON object"))
        handler = self.handlers.get(method)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return _error(rid, InvalidArgument(f"unknown method '{method}' (known: {known})"))
        try:
            result = handler(params, caller)
        except SessionApiError as exc:
            return _error(rid, exc)
        except Exception as exc:  # a bug in a handler must not take the firewall down
            log.exception("control method %s failed", method)
            return _error(rid, SessionApiError(f"internal error in '{method}': {exc!r}"))
        if isinstance(result, Listing) and result.more:
            return {"id": rid, "result": result, "more": result.more}
        return {"id": rid, "result": result}

    def _reply(self, conn: socket.socket, reply: dict[str, Any]) -> None:
        """Send a reply; one larger than MAX_UNSENT on its own would drop the client
        however it reads: it gets an error reply instead."""
        data = encode(reply)
        if len(data) > MAX_UNSENT:
            data = encode(_error(reply["id"], InvalidArgument(
                f"reply too large: {len(data)} bytes, more than the {MAX_UNSENT} a client may "
                "leave unread; ask with a smaller 'limit'")))
        self._queue(conn, data)

    def send(self, conn: socket.socket, message: dict[str, Any]) -> None:
        """Send an event (``Caller.push``)."""
        self._queue(conn, encode(message))

    def _queue(self, conn: socket.socket, data: bytes) -> None:
        """Queue an encoded message and write what the socket takes now; a client that
        leaves more than MAX_UNSENT bytes unread is dropped."""
        unsent = self._unsent.get(conn)
        if unsent is None:
            return
        unsent += data
        if len(unsent) > MAX_UNSENT:
            log.warning("dropping a control client that does not read its replies")
            self._drop(conn)
            return
        self._flush(conn)

    def _flush(self, conn: socket.socket) -> None:
        unsent = self._unsent.get(conn)
        if not unsent:
            return
        try:
            del unsent[:conn.send(unsent)]
        except BlockingIOError:
            pass
        except OSError:
            self._drop(conn)
            return
        self._arm(conn)

    def _write(self, conn: socket.socket) -> None:
        self._flush(conn)
        if conn in self._unsent and not self._unsent[conn]:
            self._answer(conn)  # requests that waited for the replies to go

    def _drop(self, conn: socket.socket) -> None:
        if conn in self._buffers:
            del self._buffers[conn]
            del self._unsent[conn]
            self._waiting.discard(conn)
            self.on_disconnect(self._callers.pop(conn))
            self.loop.unwatch(conn)
            conn.close()

    def close(self) -> None:
        for conn in list(self._buffers):
            self._drop(conn)
        self.loop.unwatch(self.sock)
        self.sock.close()
        self.path.unlink(missing_ok=True)


def refuse_if_served(path: Path) -> None:
    """Raise if a live daemon answers on ``path`` (a leftover socket file is fine), or if
    something other than a socket is there (the server would put its socket in its place)."""
    if not path.is_socket():
        if path.exists() or path.is_symlink():
            raise SocketInUse(f"{path} exists and is not a socket: not replacing it")
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return
    finally:
        probe.close()
    raise SocketInUse(f"another enforcer is serving {path}")


class SocketInUse(Exception):
    """The control socket's path is a live enforcer's, or not a socket."""


def _error(rid: Any, exc: SessionApiError) -> dict[str, Any]:
    return {"id": rid, "error": exc.to_dict()}
