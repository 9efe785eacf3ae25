"""What the fw's own sockets listen on, asked of the kernel of its network namespace.

TCP sockets in state LISTEN, and every UDP socket bound to a port, count as
listening. They are asked of the kernel with sock_diag netlink (as ``ss`` does,
through pyroute2's DiagSocket): the kernel then looks at the listening sockets
alone, about 2 ms for the four dumps here. ``/proc/self/net/{tcp,tcp6,udp,udp6}``
give the same answer and are read where sock_diag is missing (a kernel without
inet_diag), but reading ``tcp`` walks the whole connection hash table: about 4 ms
here even with no connection at all. Neither starts a child process. A reading is
used for ``MAX_AGE`` seconds, so that a flood of requests that need it (PORT
commands, say) asks the kernel at most that often. The core gets it as a value
(``enforcer.core.fwports.Listening``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from pyroute2 import DiagSocket
from pyroute2.netlink.exceptions import NetlinkError

from enforcer.core.fwports import Listening
from enforcer.core.packet import TCP, UDP, IPAddress

MAX_AGE = 0.5  # seconds a reading is used for
TCP_LISTEN = 10  # include/net/tcp_states.h
Sockets = set[tuple[int, IPAddress, int]]
log = logging.getLogger("pinhole.listening")

# What each dump asks for: TCP listeners only (the kernel then skips established
# connections), every UDP socket.
DUMPS = ((socket.AF_INET, TCP, 1 << TCP_LISTEN), (socket.AF_INET6, TCP, 1 << TCP_LISTEN),
         (socket.AF_INET, UDP, 0xFFF), (socket.AF_INET6, UDP, 0xFFF))


def read_diag() -> Listening:
    found: Sockets = set()
    try:
        with DiagSocket() as diag:
            diag.bind()
            for family, protocol, states in DUMPS:
                for msg in diag.get_sock_stats(family=family, protocol=protocol, states=states):
                    port = msg["idiag_sport"]
                    if port:
                        found.add((protocol, _unmapped(ipaddress.ip_address(msg["idiag_src"])), port))
    except NetlinkError as exc:
        raise OSError(exc.code, f"sock_diag: {exc}") from None
    return Listening(frozenset(found))


# --- /proc/net ------------------------------------------------------------------------------
PROC_NET = Path("/proc/self/net")
TABLES = {"tcp": (TCP, 4), "tcp6": (TCP, 6), "udp": (UDP, 4), "udp6": (UDP, 6)}  # (protocol, version)


def parse_table(lines: Iterable[str], protocol: int, version: int) -> Sockets:
    """The listening (TCP) or bound (UDP) sockets of one table's lines (header included).
    The kernel prints an address as 32-bit words in host byte order, states in hex."""
    found: Sockets = set()
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or not fields[0].endswith(":") or ":" not in fields[1]:
            continue  # the header
        address, _, port = fields[1].partition(":")
        if (protocol == TCP and int(fields[3], 16) != TCP_LISTEN) or not int(port, 16):
            continue
        packed = b"".join(int(address[i:i + 8], 16).to_bytes(4, sys.byteorder)
                          for i in range(0, len(address), 8))
        ip = ipaddress.IPv4Address(packed) if version == 4 else ipaddress.IPv6Address(packed)
        found.add((protocol, _unmapped(ip), int(port, 16)))
    return found


def read_proc(root: Path = PROC_NET) -> Listening:
    """From the /proc tables (one the kernel lacks, IPv6 say, lists nothing)."""
    found: Sockets = set()
    for name, (protocol, version) in TABLES.items():
        try:
            found |= parse_table((root / name).read_text().splitlines(), protocol, version)
        except OSError as exc:
            log.debug("cannot read %s: %s", root / name, exc)
    return Listening(frozenset(found))


def _unmapped(address: IPAddress) -> IPAddress:
    """An IPv6 socket bound to an IPv4 address (::ffff:a.b.c.d) listens on that address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ListeningSockets:
    """``current()``: the fw's listening sockets, asked again once the last answer is
    older than ``max_age`` seconds."""

    def __init__(self, clock: Callable[[], float], *, max_age: float = MAX_AGE,
                 diag: Callable[[], Listening] = read_diag,
                 proc: Callable[[], Listening] = read_proc) -> None:
        self.clock = clock
        self.max_age = max_age
        self._diag: Callable[[], Listening] | None = diag
        self._proc = proc
        self._value = Listening()
        self._read_at: float | None = None

    def current(self) -> Listening:
        now = self.clock()
        if self._read_at is None or now - self._read_at >= self.max_age:
            self._value = self._read()
            self._read_at = now
        return self._value

    def _read(self) -> Listening:
        if self._diag is not None:
            try:
                return self._diag()
            except OSError as exc:
                log.warning("sock_diag is unavailable (%s); reading /proc/net instead, which "
                            "is slower with many connections", exc)
                self._diag = None
        return self._proc()
