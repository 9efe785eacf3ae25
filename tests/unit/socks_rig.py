"""The SOCKS service on loopback, no root needed (test_socks_service, test_memory).

The service runs in a Loop of its own, driven by ``pump`` in the test's thread, with a
clock the test moves. 127.0.0.0/16 is the internal network (clients connect from
127.0.0.1, or from an address of their own in it); 127.1.0.0/16 is the external one;
127.2.0.0/16 is "outside". Each rig holds an address of each (``claim``) that no other
live rig has: the service listens on the internal one, where a UDP ASSOCIATE's relay
takes the bind's port, and binds on the external one, so that rigs side by side (test
workers) never share a bind port. The engine relays nothing to loopback targets
(rule 14), so CONNECT is checked end to end (tests/e2e, testbed/clauses/test_fwc.py);
the handshake, BIND (a peer connects to the bind itself), UDP ASSOCIATE and the caps
are checked here.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import random
import socket
import struct
from typing import Any

from core_policy import POLICY_DATA

from enforcer.config import SocksSettings
from enforcer.core import socks
from enforcer.core.engine import Engine
from enforcer.core.limits import Limits
from enforcer.core.policy import policy_from_dict
from enforcer.loop import Loop
from enforcer.socks_service import SocksService

USERS = {"alice": "alice-secret", "bob": "bob-secret"}
INTERNAL = {"lo": (ipaddress.ip_network("127.0.0.0/16"),)}
OUTSIDE = "127.2.0.1"
CLAIM_PORT = 20999  # below every bind port range the rigs use, and below the ephemeral ports
# the shared policy, with loopback clients allowed what the lab's are (FTP, DNS)
POLICY = policy_from_dict({**POLICY_DATA, "protocol_rule": [
    *POLICY_DATA["protocol_rule"],
    {"name": "loopback clients", "action": "allow", "protocols": ["FTP", "DNS"],
     "clients": ["127.0.0.0/16"]}]})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def claim(network: str, held: list[socket.socket]) -> ipaddress.IPv4Address:
    """A random address of ``network`` (a /16's first two bytes) that no other live rig
    holds, in this process or another: holding it is having a UDP socket bound to its
    CLAIM_PORT, added to ``held``."""
    while True:
        address = ipaddress.IPv4Address(f"{network}.{random.randrange(256)}.{random.randrange(2, 255)}")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((str(address), CLAIM_PORT))
        except OSError as exc:
            s.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue  # held by another rig
        held.append(s)
        return address


class Rig:
    def __init__(self, require_auth: bool = True, bind_ports: tuple[int, int] = (21000, 21999),
                 **limits: Any) -> None:
        self.clock = Clock()
        self.sockets: list[socket.socket] = []
        self.internal = claim("127.0", self.sockets)
        self.external = claim("127.1", self.sockets)
        self.engine = Engine(POLICY, INTERNAL, (self.external,), bind_ports=bind_ports,
                             limits=Limits(**limits))
        self.loop = Loop(self.engine.counters, self.clock)
        self.service = SocksService(self.engine, self.loop, self.clock,
                                    SocksSettings(0, bind_ports, require_auth, USERS),
                                    [self.internal], lambda: None)
        self.address = self.service.listeners[0].getsockname()[:2]

    @property
    def errors(self) -> int:
        counters = self.engine.counters
        return counters["errors: event callback"] + counters["errors: SOCKS timer callback"]

    def pump(self, turns: int = 4) -> None:
        for _ in range(turns):
            self.loop.run_once(0.002)
            self.service.tick(self.clock())

    def later(self, seconds: float) -> None:
        self.clock.now += seconds
        self.pump()

    def connect(self, source: str | None = None) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sockets.append(s)
        if source is not None:
            s.bind((source, 0))
        s.connect(self.address)
        s.setblocking(False)
        self.pump()
        return s

    def read(self, s: socket.socket, want: int, turns: int = 50) -> bytes:
        """Up to ``want`` bytes, pumping the loop; fewer if the connection ends or nothing
        more comes."""
        got = b""
        for _ in range(turns):
            try:
                chunk = s.recv(want - len(got))
            except BlockingIOError:
                self.pump(1)
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
            if len(got) >= want:
                break
        return got

    def closed(self, s: socket.socket) -> bool:
        """Whether the service closed ``s`` (EOF or reset, after what it sent)."""
        for _ in range(50):
            try:
                if s.recv(65536) == b"":
                    return True
            except BlockingIOError:
                self.pump(1)
            except ConnectionResetError:
                return True
        return False

    def login(self, s: socket.socket, user: str = "alice") -> bytes:
        s.sendall(socks.client_greeting(user) + socks.client_auth(user, USERS[user]))
        return self.read(s, 4)

    def request(self, command: int, host: str = "0.0.0.0", port: int = 0, user: str = "alice",
                source: str | None = None) -> tuple[socket.socket, tuple[socks.Reply, str, int]]:
        """A logged-in connection and its request's reply."""
        s = self.connect(source)
        assert self.login(s, user) == b"\x05\x02\x01\x00"
        s.sendall(socks.client_request(command, host, port))
        return s, self.reply(s)

    def reply(self, s: socket.socket) -> tuple[socks.Reply, str, int]:
        data = self.read(s, 10)
        parsed = socks.parse_reply(data)
        assert parsed is not None, f"no reply: {data!r}"
        return parsed[:3]

    def udp(self, address: str = "127.0.0.1", port: int = 0) -> socket.socket:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sockets.append(u)
        u.bind((address, port))
        u.setblocking(False)
        return u

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.service.close()
        self.loop.close()


def reset(s: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a client that gives up abruptly does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.close()
