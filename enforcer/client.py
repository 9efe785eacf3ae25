"""A small Python client for the control socket."""

from __future__ import annotations

import itertools
import json
import socket
import time
from typing import Any

from enforcer.core.results import ERRORS, SessionApiError
from enforcer.protocol import encode


class ControlError(Exception):
    """The control socket could not be reached or answered nonsense."""


class Client:
    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        if self._sock is None:
            deadline = time.monotonic() + self.timeout
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(self.path)
                    break
                except BlockingIOError:
                    # a full listen backlog: the daemon is busy, not gone
                    sock.close()
                    if time.monotonic() > deadline:
                        raise ControlError(f"the enforcer at {self.path} is not accepting "
                                           "connections") from None
                    time.sleep(0.01)
                except OSError as exc:
                    sock.close()
                    raise ControlError(f"cannot reach the enforcer at {self.path}: "
                                       f"{exc.strerror}") from None
            self._sock = sock
        return self._sock

    def call(self, method: str, **params: Any) -> Any:
        """Call a method; an error reply raises the SessionApiError subclass it names."""
        rid = next(self._ids)
        reply = self.raw(encode({"id": rid, "method": method, "params": params}))
        if "error" in reply:
            err = reply["error"]
            raise ERRORS.get(err.get("name"), SessionApiError)(err.get("message", ""))
        return reply.get("result")

    def raw(self, data: bytes) -> dict[str, Any]:
        """Send bytes as they are and read one reply line (for tests of bad input)."""
        sock = self._connect()
        try:
            sock.sendall(data)
            while b"\n" not in self._buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlError("the enforcer closed the control connection")
                self._buf += chunk
        except OSError as exc:
            self.close()
            raise ControlError(f"control socket {self.path}: {exc}") from None
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise ControlError(f"unexpected reply {reply!r}")
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Client", "ControlError", "SessionApiError"]
