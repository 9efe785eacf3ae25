"""What the kernel admitted by the grants it holds: the packets its grants chain logs to an
NFLOG group (linux/netfilter/nfnetlink_log.h), read over raw netlink with the standard
library.

The kernel sends each notice as it logs the packet (a threshold of one), before the
packet goes on; the enforcer reads them when it would be awake anyway, never woken for
them: ``bench.kernel_grants`` measured that a listener woken for each notice doubled the
first SYN's delay (it runs during the handshake, on the same CPUs).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

from enforcer.dataplane import (
    NETLINK_NETFILTER,
    NLM_F_ACK,
    NLM_F_REQUEST,
    SO_RCVBUFFORCE,
    DataplaneError,
    _attribute,
    _netlink,
    _request,
    netlink_attributes,
    netlink_messages,
)

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 4, 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
# Bytes of each packet logged: an IPv6 header with extension headers, and the transport
# header's ports and flags
COPY = 160
RECEIVE_BUFFER = 8 << 20  # a burst of notices waits here (each about 250 bytes)


def packets(data: bytes) -> Iterator[bytes]:
    """The logged packets (their first ``COPY`` bytes) in one datagram of notices."""
    for kind, start, end in netlink_messages(data):
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            for attr, a, b in netlink_attributes(data, start + 4, end):  # after nfgenmsg
                if attr == NFULA_PAYLOAD:
                    yield data[a:b]


def bind_group(group: int, *, threshold: int = 100, flush_ms: int = 10, copy: int = COPY,
               receive_buffer: int = RECEIVE_BUFFER) -> socket.socket:
    """A netlink socket bound to NFLOG group ``group``, copying ``copy`` bytes of each
    packet, sent once ``threshold`` packets wait or ``flush_ms`` (rounded up to the
    kernel's 10 ms) after the first; DataplaneError if the kernel refuses (another
    socket has the group, say)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
        sock.settimeout(2.0)
        kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
        body = (_attribute(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
                + _attribute(NFULA_CFG_MODE, struct.pack("!IBx", copy, NFULNL_COPY_PACKET))
                + _attribute(NFULA_CFG_QTHRESH, struct.pack("!I", threshold))
                + _attribute(NFULA_CFG_TIMEOUT, struct.pack("!I", max(1, -(-flush_ms // 10)))))
        errors = _request(sock, _netlink(kind, NLM_F_REQUEST | NLM_F_ACK, 1, socket.AF_UNSPEC, group, body),
                          {1}, f"binding NFLOG group {group}")
        if errors:
            raise DataplaneError(f"cannot bind NFLOG group {group}: {os.strerror(errors[0])}")
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Notices:
    """The grants chain's log: the first packets of the flows the kernel admitted by a
    grant it held, each sent as it is logged. ``lost`` counts the times the kernel could not deliver some (the
    socket's buffer was full): their grants then stay pending in the enforcer, which
    admits nothing by them, until they expire or end."""

    def __init__(self, group: int) -> None:
        self.socket = bind_group(group, threshold=1)
        self.lost = 0

    def read(self, limit: int = 64) -> list[bytes]:
        """The packets waiting, from at most ``limit`` datagrams; never blocks."""
        out: list[bytes] = []
        for _ in range(limit):
            try:
                data = self.socket.recv(65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.lost += 1
                continue
            out += packets(data)
        return out

    def close(self) -> None:
        self.socket.close()
