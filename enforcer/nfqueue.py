"""NFQUEUE over raw netlink: the enforcer's own binding, standard library only.

One ``Queue`` is one netlink socket (``NETLINK_NETFILTER``) bound to one queue
number. It reads the packets the kernel queues and writes verdicts in batches::

    queue = Queue(5, gso=True)           # QueueError if the kernel refuses
    selector.register(queue.socket, selectors.EVENT_READ)
    ...
    for packet in queue.receive(64):     # non-blocking; [] when nothing is waiting
        # (the sources of the packets waiting take turns: Turns, below)
        queue.verdict(packet.packet_id, True, mark=0x10000000)
    queue.flush()                        # every buffered verdict, in one send()
    ...
    queue.close()

``Queue(number, *, max_len=8192, copy_range=0xFFFF, gso=True, fail_open=False,
receive_buffer=None)`` binds the queue with one NFQNL_MSG_CONFIG message that carries
the bind command, copy mode PACKET with ``copy_range`` (the kernel caps it at 65531),
``NFQA_CFG_QUEUE_MAXLEN`` and the GSO and FAIL_OPEN flags (both set or cleared, as
asked), and waits for the kernel's acknowledgement, so a refusal raises
``QueueError`` from the constructor with the reason (the queue bound by another
socket, no CAP_NET_ADMIN, a flag the kernel lacks). One message leaves no moment in
which the queue is bound without a copy mode (packets queued then are dropped).
``receive_buffer`` is the socket's receive buffer in bytes (SO_RCVBUFFORCE, so above
net.core.rmem_max; the kernel doubles it), ``DEFAULT_RECEIVE_BUFFER`` when None. Its
send buffer holds a batch of verdicts whatever net.core.wmem_default is (SEND_BUFFER).

Turns. ``read()`` holds what the kernel has queued (until none is waiting, or
``HELD_BYTES`` of payload are held); ``take()`` gives the held packets out with their
sources (IP source addresses) taking turns, a packet each, so that one client's flood
holds another client's packet back by a packet of each busy source, not by the flood's
whole backlog; each source's packets keep their order. ``turn(limit, until, clock)``
is a turn of the packet path: ``read()``, then ``take()`` until ``limit`` packets are
taken or the clock has passed ``until``; ``waiting`` says packets are left held for the
next turn (which then need not wait for the socket). ``receive(limit)`` is a turn with
no time limit. Reading never raises for what the kernel sends: a receive-buffer
overflow (ENOBUFS: the kernel dropped, or with fail_open accepted, packets it could
not deliver) adds one to ``overflows``; an error the kernel returns for an earlier
verdict adds one to ``verdict_errors`` (the first few are logged on
"pinhole.enforcer"); anything unparsable adds one to ``malformed`` and is skipped.
Only a failing socket raises (``QueueError``).

``verdict(packet_id, accept, *, mark=None, payload=None)`` buffers one verdict: the
packet's new mark if given, its new content if given (``payload``: the whole IP
packet, at most 65531 bytes). ``flush()`` sends what is buffered, many verdicts a
datagram, no acknowledgements asked (the kernel still reports failures, which
``receive`` counts). A send the kernel could not take for want of memory is kept and
sent again at the next ``flush()`` (``unsent``; counted in ``verdicts_retried``), up
to UNSENT_BYTES; any other failed send loses its verdicts (``verdict_errors``), whose
packets then wait in the kernel's queue until it goes. ``close()`` flushes, unbinds
and closes; it is idempotent, and a ``Queue`` is also a context manager that closes on
exit.

Memory. ``keep_freed_memory()``, called once at the process's start, keeps glibc from
returning each batch's payloads (with GSO, up to 64 of 64 KiB) to the system only to
fault them in again for the next batch (see its docstring for what that costs).

Checksums. With ``gso=True`` (NFQA_CFG_F_GSO) the kernel queues GSO packets whole
(``Packet.gso``; up to 64 KiB, one verdict for all their segments) and does not
complete a partial checksum before copying: a locally sent or offloaded packet comes
with ``checksum_ready`` False and a TCP/UDP checksum field holding only the
pseudo-header sum. Do not verify checksums of such packets. With ``gso=False`` the
kernel completes the checksum and segments GSO packets before queueing them, each
segment a packet of its own. Either way, a verdict with a payload makes the kernel
treat the packet as CHECKSUM_NONE, so the checksums in a payload are what is sent:

- not GSO: complete, correct IP and TCP/UDP checksums (one left partial is dropped);
- GSO: the kernel segments the packet after the verdict and makes each segment's
  TCP/UDP checksum then. TCP starts afresh (a complete checksum was checked to work);
  UDP (UDP_SEGMENT sends) starts from the super-packet's checksum field, which must
  therefore be the pseudo-header sum for the new length, not complemented, as it came
  (a complete checksum there spoils every segment). The IP header checksum is always
  to be complete.

A payload of a packet read truncated (``length > len(payload)``, beyond
``copy_range``) would cut the packet short: decide on such a packet without one.

Sources: linux/netlink.h, linux/netfilter/nfnetlink.h and nfnetlink_queue.h for the
numbers and layouts; net/netfilter/nfnetlink_queue.c for the behaviour above, which
tests/e2e/test_nfqueue_binding.py checks against the running kernel. The
netlink header is in host byte order, nfnetlink's res_id and every NFQA_* value in
network byte order, attributes 4-byte aligned.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

log = logging.getLogger("pinhole.enforcer")

# linux/netlink.h
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # an error reply quotes the header of the refused message, not all of it
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
# linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_queue.h
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = NFNL_SUBSYS_QUEUE << 8 | 0
NFQNL_MSG_VERDICT = NFNL_SUBSYS_QUEUE << 8 | 1
NFQNL_MSG_CONFIG = NFNL_SUBSYS_QUEUE << 8 | 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK, NFQA_IFINDEX_INDEV = 1, 2, 3, 5
NFQA_PAYLOAD, NFQA_CAP_LEN, NFQA_SKB_INFO = 10, 13, 14
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO = 0x1, 0x4
NFQA_SKB_CSUMNOTREADY, NFQA_SKB_GSO = 0x1, 0x2
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
NF_DROP, NF_ACCEPT = 0, 1

MAX_PAYLOAD = 0xFFFF - 4  # an attribute's length is 16 bits, its header included
DEFAULT_RECEIVE_BUFFER = 8 * 1024 * 1024
# one datagram: headers and attributes (a few hundred bytes) and at most MAX_PAYLOAD
RECEIVE_SIZE = 0x10000 + 4096
# Payload bytes read from the kernel and held for the sources' turns (Queue.take), at most:
# as much as the socket's default buffer (which the kernel doubles) holds
HELD_BYTES = 16 * 1024 * 1024
SEND_SIZE = 128 * 1024  # at most this many bytes of verdicts a datagram (under the send buffer)
# The send buffer asked for (the kernel doubles it): netlink refuses a datagram longer than
# the buffer less 32 bytes (EMSGSIZE) and all its verdicts with it, and the default buffer
# is net.core.wmem_default's, which a host may set below a batch
SEND_BUFFER = SEND_SIZE
CONFIG_TIMEOUT = 2.0  # the kernel answers a config message at once; this only guards a bug
LOGGED_VERDICT_ERRORS = 10
# A send of verdicts the kernel could not take for want of memory is tried again at the
# next flush (their packets wait in the kernel's queue meanwhile), up to this many bytes of
# verdicts; past them, or on another error, the verdicts are lost (counted) and their
# packets stay queued until the queue goes
RETRIED_SEND_ERRORS = frozenset({errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN, errno.EINTR})
UNSENT_BYTES = 4 * 1024 * 1024
M_TRIM_THRESHOLD = -1  # malloc.h: mallopt's parameter for how much freed heap is kept
FREED_MEMORY_KEPT = 64 * 1024 * 1024
PROC_QUEUES = Path("/proc/net/netfilter/nfnetlink_queue")

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, port id
_ATTR = struct.Struct("=HH")  # nlattr: length (header included), type
_U32 = struct.Struct("!I")
_PACKET_HDR = struct.Struct("!IHB")  # nfqnl_msg_packet_hdr: packet id, hw protocol, hook
_ERROR = struct.Struct("=iIHHI")  # nlmsgerr: -errno; the refused message's length, type, flags, seq
_NFGENMSG = struct.Struct("!BBH")  # family, version (0), res_id (the queue number)


def _host(fmt: str, value: int) -> int:
    """``value`` as a host-order field of a big-endian ``struct.Struct``: its native bytes
    read back big-endian (so one pack writes host-order and network-order fields)."""
    return int.from_bytes(struct.pack("=" + fmt, value), "big")


# A verdict, packed in one go by a big-endian Struct whose host-order fields (netlink's
# length, type, flags, the attributes' length and type) are given as _host() constants.
# Its sequence number is the packet id, so an error reply (quoting the header) names it.
_VERDICT = struct.Struct(">IHHIIBBHHHII")  # header, nfgenmsg, NFQA_VERDICT_HDR (verdict, id)
_VERDICT_MARK = struct.Struct(">IHHIIBBHHHIIHHI")  # the same, then NFQA_MARK
_V_TYPE, _V_FLAGS = _host("H", NFQNL_MSG_VERDICT), _host("H", NLM_F_REQUEST)
_V_HDR_LEN, _V_HDR_TYPE = _host("H", 12), _host("H", NFQA_VERDICT_HDR)
_V_MARK_LEN, _V_MARK_TYPE = _host("H", 8), _host("H", NFQA_MARK)
_V_LEN, _V_MARK_TOTAL = _host("I", _VERDICT.size), _host("I", _VERDICT_MARK.size)


class QueueError(Exception):
    """The queue could not be bound or configured, or its socket failed."""


class Packet(NamedTuple):
    """One queued packet, as read."""

    packet_id: int
    hook: int  # NF_INET_* (0 prerouting, 1 input, 2 forward, 3 output, 4 postrouting)
    mark: int  # NFQA_MARK, 0 if absent
    indev: int  # NFQA_IFINDEX_INDEV, 0 if absent
    payload: bytes  # the IP packet, up to the copy range
    length: int  # the packet's real length (NFQA_CAP_LEN if truncated, else len(payload))
    checksum_ready: bool  # False: NFQA_SKB_CSUMNOTREADY, a partial TCP/UDP checksum
    gso: bool  # NFQA_SKB_GSO: a GSO packet, longer than the device's MTU


class Refusal(NamedTuple):
    """An NLMSG_ERROR reply: the type of the message it answers, that message's sequence
    number (for a verdict: its packet id), and the errno (0: an acknowledgement)."""

    kind: int
    seq: int
    code: int


_CLEAN: tuple[Sequence[Refusal], int] = ((), 0)
_U32_ATTRIBUTES = frozenset({NFQA_IFINDEX_INDEV, NFQA_MARK, NFQA_SKB_INFO, NFQA_CAP_LEN})
# the per-packet calls, bound once
_unpack_attr, _unpack_u32, _unpack_packet_hdr = _ATTR.unpack_from, _U32.unpack_from, _PACKET_HDR.unpack_from
_make_packet = Packet._make


def attribute(kind: int, payload: bytes) -> bytes:
    """A netlink attribute: length (header included, padding not), type, payload padded
    to 4 bytes."""
    return _ATTR.pack(4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def message(kind: int, flags: int, seq: int, queue: int, attributes: bytes) -> bytes:
    """An nfnetlink message to ``queue``: netlink header, nfgenmsg (AF_UNSPEC, version 0,
    res_id = the queue number), attributes."""
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue) + attributes
    return _HEADER.pack(_HEADER.size + len(body), kind, flags, seq, 0) + body


def bind_message(queue: int, seq: int, *, copy_range: int, max_len: int, flags: int, mask: int) -> bytes:
    """NFQNL_MSG_CONFIG binding ``queue`` and configuring it at once (acknowledged)."""
    return message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, queue,
                   attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))
                   + attribute(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET))
                   + attribute(NFQA_CFG_QUEUE_MAXLEN, _U32.pack(max_len))
                   + attribute(NFQA_CFG_MASK, _U32.pack(mask))
                   + attribute(NFQA_CFG_FLAGS, _U32.pack(flags)))


def unbind_message(queue: int, seq: int) -> bytes:
    """NFQNL_MSG_CONFIG unbinding ``queue`` (no acknowledgement asked)."""
    return message(NFQNL_MSG_CONFIG, NLM_F_REQUEST, seq, queue,
                   attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, 0)))


def verdict_message(queue: int, packet_id: int, accept: bool, mark: int | None = None,
                    payload: bytes | None = None) -> bytes:
    """NFQNL_MSG_VERDICT: NFQA_VERDICT_HDR, then NFQA_MARK and NFQA_PAYLOAD if given."""
    verdict = NF_ACCEPT if accept else NF_DROP
    if payload is None:
        if mark is None:
            return _VERDICT.pack(_V_LEN, _V_TYPE, _V_FLAGS, packet_id, 0, 0, 0, queue,
                                 _V_HDR_LEN, _V_HDR_TYPE, verdict, packet_id)
        return _VERDICT_MARK.pack(_V_MARK_TOTAL, _V_TYPE, _V_FLAGS, packet_id, 0, 0, 0, queue,
                                  _V_HDR_LEN, _V_HDR_TYPE, verdict, packet_id,
                                  _V_MARK_LEN, _V_MARK_TYPE, mark)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a verdict carries at most {MAX_PAYLOAD} bytes of payload, not {len(payload)}")
    data = attribute(NFQA_PAYLOAD, payload)
    if mark is None:
        head = _VERDICT.pack(_host("I", _VERDICT.size + len(data)), _V_TYPE, _V_FLAGS, packet_id, 0, 0, 0,
                             queue, _V_HDR_LEN, _V_HDR_TYPE, verdict, packet_id)
    else:
        head = _VERDICT_MARK.pack(_host("I", _VERDICT_MARK.size + len(data)), _V_TYPE, _V_FLAGS, packet_id,
                                  0, 0, 0, queue, _V_HDR_LEN, _V_HDR_TYPE, verdict, packet_id,
                                  _V_MARK_LEN, _V_MARK_TYPE, mark)
    return head + data


def source(payload: bytes) -> bytes:
    """A queued packet's source address, as its IP header has it (b"" for a packet that is
    neither IPv4 nor IPv6): the key of the turns ``Queue.take`` gives its sender."""
    version = payload[0] >> 4 if payload else 0
    return payload[12:16] if version == 4 else payload[8:24] if version == 6 else b""


def parse(data: bytes | bytearray | memoryview, size: int,
          packets: list[Packet]) -> tuple[Sequence[Refusal], int]:
    """Read the netlink messages in ``data[:size]`` (one datagram): append the queued
    packets to ``packets``; return the NLMSG_ERROR replies and how many messages could
    not be parsed (each skipped; a broken header ends the datagram). Never raises for
    what ``data`` holds."""
    refusals: list[Refusal] = []
    malformed = 0
    offset = 0
    while offset + 16 <= size:
        length, kind, _flags, _seq, _port = _HEADER.unpack_from(data, offset)
        end = offset + length
        if length < 16 or end > size:
            return refusals, malformed + 1
        if kind == NFQNL_MSG_PACKET:
            packet = _packet(data, offset + 20, end)
            if packet is None:
                malformed += 1
            else:
                packets.append(packet)
        elif kind == NLMSG_ERROR:
            if length < 36:
                malformed += 1
            else:
                code, _length, refused, _flags, seq = _ERROR.unpack_from(data, offset + 16)
                if refused == NFQNL_MSG_VERDICT:  # its seq was packed big-endian: the packet id
                    seq = _U32.unpack_from(data, offset + 28)[0]
                refusals.append(Refusal(refused, seq, -code))
        else:
            malformed += 1
        offset += (length + 3) & ~3
    if offset < size:  # bytes left that cannot hold a header
        malformed += 1
    return (refusals, malformed) if refusals or malformed else _CLEAN


def _packet(data: bytes | bytearray | memoryview, offset: int, end: int) -> Packet | None:
    """The NFQNL_MSG_PACKET whose attributes span ``data[offset:end]``, or None if they
    do not parse or lack NFQA_PACKET_HDR."""
    packet_id = hook = length = -1
    mark = indev = info = 0
    payload = b""
    try:
        while offset + 4 <= end:
            alen, kind = _unpack_attr(data, offset)
            if alen < 4 or offset + alen > end:
                return None
            kind &= NLA_TYPE_MASK
            if kind == NFQA_PAYLOAD:
                payload = bytes(data[offset + 4:offset + alen])
            elif kind == NFQA_PACKET_HDR:
                if alen < 11:
                    return None
                packet_id, _protocol, hook = _unpack_packet_hdr(data, offset + 4)
            elif kind in _U32_ATTRIBUTES:
                if alen != 8:
                    return None
                value = _unpack_u32(data, offset + 4)[0]
                if kind == NFQA_IFINDEX_INDEV:
                    indev = value
                elif kind == NFQA_MARK:
                    mark = value
                elif kind == NFQA_SKB_INFO:
                    info = value
                else:
                    length = value
            offset += (alen + 3) & ~3
    except struct.error:
        return None
    if packet_id < 0:
        return None
    return _make_packet((packet_id, hook, mark, indev, payload, len(payload) if length < 0 else length,
                         not info & NFQA_SKB_CSUMNOTREADY, bool(info & NFQA_SKB_GSO)))


class Queue:
    """One NFQUEUE, bound over its own netlink socket (see the module's docstring)."""

    def __init__(self, number: int, *, max_len: int = 8192, copy_range: int = 0xFFFF, gso: bool = True,
                 fail_open: bool = False, receive_buffer: int | None = None) -> None:
        if not 0 <= number <= 0xFFFF:
            raise QueueError(f"queue number {number} is not from 0 to 65535")
        if not 0 < max_len < 2**32 or copy_range < 0:
            raise QueueError(f"NFQUEUE {number}: max_len must be from 1 to 4294967295 and copy_range "
                             f"not negative (not {max_len} and {copy_range})")
        self.number = number
        self.overflows = 0  # ENOBUFS reads: the kernel could not deliver some packets
        self.verdict_errors = 0  # verdicts the kernel refused (or that could not be sent)
        self.verdicts_retried = 0  # verdicts whose send failed for want of memory, kept to retry
        self.malformed = 0  # messages read that did not parse (skipped)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._unsent: list[bytes] = []  # verdicts a failed send kept for the next flush
        self._unsent_size = 0
        # packets read and not yet taken, by source, and the order the sources take turns in
        self._held: dict[bytes, deque[Packet]] = {}
        self._turns: deque[bytes] = deque()
        self._held_bytes = 0
        self._buffer = bytearray(RECEIVE_SIZE)
        self._view = memoryview(self._buffer)
        self._closed = False
        try:
            self.socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise QueueError(f"cannot open a netfilter netlink socket: {exc.strerror or exc}") from None
        try:
            self.socket.bind((0, 0))
            self.socket.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.socket.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE,
                                   DEFAULT_RECEIVE_BUFFER if receive_buffer is None else receive_buffer)
            self.socket.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SEND_BUFFER)
        except OSError as exc:
            self.socket.close()
            raise QueueError(f"cannot set up the netlink socket of NFQUEUE {number}: "
                             f"{exc.strerror or exc}") from None
        flags = (NFQA_CFG_F_GSO if gso else 0) | (NFQA_CFG_F_FAIL_OPEN if fail_open else 0)
        try:
            self._bind(bind_message(number, 1, copy_range=min(copy_range, MAX_PAYLOAD), max_len=max_len,
                                    flags=flags, mask=NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN))
        except BaseException:
            self.socket.close()
            raise
        self.socket.setblocking(False)

    def _bind(self, request: bytes) -> None:
        """Send the bind (sequence number 1) and wait for its answer, keeping any packet
        that comes first."""
        self.socket.settimeout(CONFIG_TIMEOUT)
        early: list[Packet] = []
        try:
            self.socket.send(request)
            while True:
                try:
                    size = self.socket.recv_into(self._buffer, 0, socket.MSG_TRUNC)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    self.overflows += 1
                    continue
                if size > RECEIVE_SIZE:
                    continue
                refusals, _ = parse(self._view, size, early)
                self._hold(early)
                early.clear()
                for refusal in refusals:
                    if refusal.kind == NFQNL_MSG_CONFIG and refusal.seq == 1:
                        if refusal.code:
                            raise QueueError(self._bind_failure(refusal.code))
                        return
        except TimeoutError:
            raise QueueError(f"the kernel did not answer the bind of NFQUEUE {self.number}") from None
        except OSError as exc:
            raise QueueError(f"cannot bind NFQUEUE {self.number}: {exc.strerror or exc}") from None

    def _bind_failure(self, code: int) -> str:
        what = f"cannot bind NFQUEUE {self.number}"
        if code == errno.EPERM:
            holder = _holder(self.number)
            if holder is None:
                return f"{what}: not permitted (binding a queue needs CAP_NET_ADMIN)"
            return (f"{what}: it is already bound by another socket (netlink port id {holder}, "
                    "usually the process id of the program that holds it)")
        if code == errno.EOPNOTSUPP:
            return f"{what}: this kernel does not support the queue flags asked for (GSO, fail-open)"
        if code == errno.EINVAL:
            return f"{what}: the kernel refused the configuration (is nfnetlink_queue available?)"
        return f"{what}: {os.strerror(code)}"

    def receive(self, limit: int) -> list[Packet]:
        """Up to ``limit`` packets, without waiting: ``turn`` with no time limit."""
        return list(self.turn(limit, math.inf, time.monotonic))

    def turn(self, limit: int, until: float, clock: Callable[[], float]) -> Iterator[Packet]:
        """One turn of the packet path: what the kernel has queued is read (``read``), then
        held packets are taken (``take``) until ``limit`` are, or ``clock()`` has passed
        ``until`` once one is; the rest wait for the next turn (``waiting``)."""
        self.read()
        for _ in range(limit):
            packet = self.take()
            if packet is None:
                return
            yield packet
            if clock() >= until:
                return

    def read(self) -> None:
        """Hold what the kernel has queued, without waiting, until HELD_BYTES of payload are
        held (the rest stays in the socket's buffer, and behind it in the kernel's queue)."""
        recv_into, buffer, view = self.socket.recv_into, self._buffer, self._view
        packets: list[Packet] = []
        while self._held_bytes < HELD_BYTES:
            try:
                size = recv_into(buffer, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    continue
                if self._turns:  # those held get their verdicts (a packet without one is
                    break        # held until the queue goes); a lasting error fails the next read
                raise QueueError(f"reading NFQUEUE {self.number} failed: {exc.strerror or exc}") from None
            if size > RECEIVE_SIZE:  # longer than any message the kernel builds
                self.malformed += 1
                continue
            refusals, malformed = parse(view, size, packets)
            if malformed:
                self.malformed += malformed
            if refusals:
                self._refused(refusals)
            if packets:
                self._hold(packets)
                packets.clear()

    def _hold(self, packets: Iterable[Packet]) -> None:
        for packet in packets:
            key = source(packet.payload)
            held = self._held.get(key)
            if held is None:
                held = self._held[key] = deque()
                self._turns.append(key)
            held.append(packet)
            self._held_bytes += len(packet.payload)

    def take(self) -> Packet | None:
        """The next held packet, None if none is: the sources of held packets (``source``)
        take turns, a packet each, a source new to the turns joining at their end, and each
        source's packets come in the order the kernel queued them. A client's flood
        therefore holds another's packet back by one packet of each source ahead of it, not
        by the flood's whole backlog; and a flow's packets from one side keep their order."""
        turns = self._turns
        if not turns:
            return None
        key = turns.popleft()
        held = self._held[key]
        packet = held.popleft()
        if held:
            turns.append(key)
        else:
            del self._held[key]
        self._held_bytes -= len(packet.payload)
        return packet

    @property
    def waiting(self) -> bool:
        """Packets are held, read from the kernel and not yet taken: the next turn need not
        wait for the socket."""
        return bool(self._turns)

    def _refused(self, refusals: Sequence[Refusal]) -> None:
        for refusal in refusals:
            if not refusal.code:
                continue
            self.verdict_errors += 1
            if self.verdict_errors <= LOGGED_VERDICT_ERRORS:
                about = (f"the verdict on packet {refusal.seq}" if refusal.kind == NFQNL_MSG_VERDICT
                         else f"message type {refusal.kind:#x}")
                log.warning("NFQUEUE %d: the kernel refused %s: %s%s", self.number, about,
                            os.strerror(refusal.code),
                            " (further refusals are counted, not logged)"
                            if self.verdict_errors == LOGGED_VERDICT_ERRORS else "")

    def verdict(self, packet_id: int, accept: bool, *, mark: int | None = None,
                payload: bytes | None = None) -> None:
        """Buffer the verdict on one packet (sent by ``flush``)."""
        data = verdict_message(self.number, packet_id, accept, mark, payload)
        self._pending.append(data)
        self._pending_size += len(data)

    @property
    def unsent(self) -> bool:
        """Whether verdicts a failed send kept wait for the next ``flush``."""
        return bool(self._unsent)

    def flush(self) -> None:
        """Send the verdicts a failed send kept, then the buffered ones: one datagram, or
        several of at most SEND_SIZE bytes."""
        if not self._pending and not self._unsent:
            return
        pending, size = self._unsent + self._pending, self._unsent_size + self._pending_size
        self._unsent, self._unsent_size, self._pending, self._pending_size = [], 0, [], 0
        if size <= SEND_SIZE:
            self._send(pending)
        else:
            batch: list[bytes] = []
            size = 0
            for data in pending:
                if batch and size + len(data) > SEND_SIZE:
                    self._send(batch)
                    batch, size = [], 0
                batch.append(data)
                size += len(data)
            self._send(batch)

    def _send(self, messages: list[bytes]) -> None:
        """Send one datagram of verdicts. Once one datagram of a flush is kept for the next,
        the rest of the flush is kept after it untried: verdicts go in the order given."""
        data = b"".join(messages)
        failure = None
        if not self._unsent:
            try:
                self.socket.send(data)
                return
            except OSError as exc:
                failure = exc
        if (failure is None or failure.errno in RETRIED_SEND_ERRORS) and \
                self._unsent_size + len(data) <= UNSENT_BYTES:
            self._unsent += messages
            self._unsent_size += len(data)
            self.verdicts_retried += len(messages)
            if failure is not None:
                log.warning("NFQUEUE %d: %d verdicts could not be sent (%s): sent again at the "
                            "next flush", self.number, len(messages), failure.strerror or failure)
            return
        self.verdict_errors += len(messages)  # the packets stay queued until the queue goes
        log.warning("NFQUEUE %d: %d verdicts could not be sent: %s", self.number, len(messages),
                    "too many kept for the next flush" if failure is None
                    else failure.strerror or failure)

    def close(self) -> None:
        """Send what is buffered, unbind (the kernel drops what is still queued) and close."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
            self.socket.send(unbind_message(self.number, 2))
        except OSError:
            pass  # closing the socket unbinds the queue too
        finally:
            self.socket.close()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def keep_freed_memory(limit: int = FREED_MEMORY_KEPT) -> bool:
    """Have glibc's malloc keep up to ``limit`` bytes of freed heap for reuse (mallopt's
    M_TRIM_THRESHOLD) instead of returning it to the system at once; False where the C
    library has no mallopt. The setting is the whole process's: call this once, at start.

    A batch of GSO packets holds up to 64 payloads of 64 KiB at once. With glibc's default
    threshold (128 KiB), freeing a batch gives those megabytes back to the kernel and the
    next batch faults them in again page by page: about 70 us a payload on the 2-core VM,
    against about 1 us with the memory kept."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    return mallopt is not None and mallopt(M_TRIM_THRESHOLD, limit) == 1


def _holder(number: int) -> int | None:
    """The netlink port id that holds queue ``number`` (from /proc), or None."""
    try:
        lines = PROC_QUEUES.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 1 and fields[0] == str(number):
            return int(fields[1])
    return None
