"""The NFQUEUE binding's messages and parsing, against byte layouts written out here
from the kernel's headers (no root: the socket is a stand-in).

linux/netlink.h: nlmsghdr is u32 length, u16 type, u16 flags, u32 seq, u32 port id,
host order; nlattr is u16 length (header included, padding not), u16 type, payload
padded to 4 bytes; nlmsgerr is s32 -errno and the refused message's header.
linux/netfilter/nfnetlink.h: nfgenmsg is u8 family, u8 version, be16 res_id; a
message type is subsystem << 8 | message (NFNL_SUBSYS_QUEUE = 3).
linux/netfilter/nfnetlink_queue.h: NFQNL_MSG_PACKET/VERDICT/CONFIG = 0/1/2;
NFQA_PACKET_HDR = 1 (be32 id, be16 hw protocol, u8 hook, packed), NFQA_VERDICT_HDR =
2 (be32 verdict, be32 id), NFQA_MARK = 3, NFQA_TIMESTAMP = 4, NFQA_IFINDEX_INDEV = 5,
NFQA_IFINDEX_OUTDEV = 6, NFQA_HWADDR = 9, NFQA_PAYLOAD = 10, NFQA_CAP_LEN = 13,
NFQA_SKB_INFO = 14 (CSUMNOTREADY 1, GSO 2, CSUM_NOTVERIFIED 4); NFQA_CFG_CMD = 1 (u8
command, pad, be16 pf), NFQA_CFG_PARAMS = 2 (be32 copy range, u8 mode, packed),
NFQA_CFG_QUEUE_MAXLEN = 3, NFQA_CFG_MASK = 4, NFQA_CFG_FLAGS = 5; flags FAIL_OPEN 1,
GSO 4; BIND 1, UNBIND 2; COPY_PACKET 2. linux/netfilter.h: NF_DROP 0, NF_ACCEPT 1.
"""

from __future__ import annotations

import errno
import logging
import random
import re
import socket
import struct
from collections import deque
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer import nfqueue
from enforcer.nfqueue import Packet, Queue, QueueError, Refusal, parse, verdict_message

PACKET, VERDICT, CONFIG = 0x300, 0x301, 0x302
ERROR = 2


def nla(kind: int, payload: bytes, pad: bool = True) -> bytes:
    """An attribute as the kernel writes it (the packet's payload, last, is not padded)."""
    padding = b"\0" * (-len(payload) % 4) if pad else b""
    return struct.pack("=HH", 4 + len(payload), kind) + payload + padding


def nlmsg(kind: int, body: bytes, flags: int = 0, seq: int = 0, port: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, port) + body


def nfgen(queue: int, family: int = 2) -> bytes:
    return bytes([family, 0]) + struct.pack("!H", queue)


def padded(message: bytes) -> bytes:
    return message + b"\0" * (-len(message) % 4)


def packet_message(packet_id: int, payload: bytes, hook: int = 2, *extra: bytes) -> bytes:
    """NFQNL_MSG_PACKET in the kernel's attribute order: header, then ``extra``, then
    the payload."""
    return nlmsg(PACKET, nfgen(5) + nla(1, struct.pack("!IHB", packet_id, 0x0800, hook)) + b"".join(extra)
                 + nla(10, payload, pad=False))


def error_message(code: int, quoted: bytes) -> bytes:
    """NLMSG_ERROR quoting the refused message's header (NETLINK_CAP_ACK)."""
    return nlmsg(ERROR, struct.pack("=i", -code) + quoted[:16])


def u32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("!I", value))


# --- messages ----------------------------------------------------------------------------------

def verdict_layout(queue: int, packet_id: int, verdict: int, attributes: bytes) -> bytes:
    """The verdict message: the sequence number is the packet id, written big-endian (so
    the header an error reply quotes names the packet)."""
    body = nfgen(queue, 0) + nla(2, struct.pack("!II", verdict, packet_id)) + attributes
    return (struct.pack("=IHH", 16 + len(body), VERDICT, 1) + struct.pack("!I", packet_id)
            + struct.pack("=I", 0) + body)


def test_accept_verdict_bytes() -> None:
    message = verdict_message(5, 0x01020304, True)
    assert message == verdict_layout(5, 0x01020304, 1, b"")
    assert len(message) == 32


def test_drop_verdict_bytes() -> None:
    assert verdict_message(65535, 7, False) == verdict_layout(65535, 7, 0, b"")


def test_verdict_with_mark_bytes() -> None:
    message = verdict_message(5, 9, True, mark=0xF0000001)
    assert message == verdict_layout(5, 9, 1, u32(3, 0xF0000001))
    assert len(message) == 40


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 20, 1499])
@pytest.mark.parametrize("mark", [None, 0x20000000])
def test_verdict_with_payload_is_padded_and_its_length_counts_it(size: int, mark: int | None) -> None:
    payload = (bytes(range(256)) * 6)[:size]
    message = verdict_message(5, 11, True, mark=mark, payload=payload)
    marked = u32(3, mark) if mark is not None else b""
    assert message == verdict_layout(5, 11, 1, marked + nla(10, payload))
    assert len(message) % 4 == 0
    assert struct.unpack_from("=I", message)[0] == len(message)
    assert struct.unpack_from("=H", message, len(message) - len(nla(10, payload)))[0] == 4 + size


def test_largest_payload_fills_the_attribute_length_and_one_more_byte_is_refused() -> None:
    message = verdict_message(5, 1, True, payload=b"x" * 65531)
    assert struct.unpack_from("=H", message, 32)[0] == 0xFFFF
    with pytest.raises(ValueError, match="at most 65531 bytes"):
        verdict_message(5, 1, True, payload=b"x" * 65532)


def test_bind_message_bytes() -> None:
    message = nfqueue.bind_message(7, 1, copy_range=65531, max_len=8192, flags=4, mask=5)
    body = (nfgen(7, 0) + nla(1, bytes([1, 0]) + struct.pack("!H", 0))
            + nla(2, struct.pack("!I", 65531) + bytes([2]))
            + u32(3, 8192) + u32(4, 5) + u32(5, 4))
    assert message == nlmsg(CONFIG, body, flags=0x1 | 0x4, seq=1)


def test_unbind_message_bytes() -> None:
    assert nfqueue.unbind_message(7, 2) == nlmsg(CONFIG, nfgen(7, 0) + nla(1, bytes([2, 0, 0, 0])),
                                                 flags=0x1, seq=2)


# --- parsing -----------------------------------------------------------------------------------

HWADDR = nla(9, struct.pack("!H2x8s", 6, b"\x02\x00\x00\x00\x00\x01"))
TIMESTAMP = nla(4, struct.pack("!QQ", 1_700_000_000, 5))


def parsed(datagram: bytes) -> tuple[list[Packet], list[Refusal], int]:
    packets: list[Packet] = []
    refusals, malformed = parse(datagram, len(datagram), packets)
    return packets, list(refusals), malformed


def test_a_packet_with_every_attribute_read() -> None:
    payload = b"E" + bytes(range(200))
    message = packet_message(7, payload, 2, u32(5, 2), u32(6, 3), u32(3, 0x10), HWADDR, TIMESTAMP,
                             u32(13, 9000), u32(14, 0x1 | 0x2))
    assert parsed(message) == ([Packet(7, 2, 0x10, 2, payload, 9000, False, True)], [], 0)


def test_a_packet_without_the_optional_attributes_gets_the_defaults() -> None:
    assert parsed(packet_message(8, b"abcde", 3)) == ([Packet(8, 3, 0, 0, b"abcde", 5, True, False)], [], 0)


def test_checksum_not_verified_is_not_a_partial_checksum() -> None:
    [packet], _, _ = parsed(packet_message(1, b"x", 0, u32(14, 0x4)))
    assert packet.checksum_ready and not packet.gso


def test_attribute_type_flags_are_masked() -> None:
    """NLA_F_NESTED (1 << 15) and NLA_F_NET_BYTEORDER (1 << 14) are not part of the type."""
    [packet], _, _ = parsed(packet_message(1, b"x", 1, u32(5 | 0x4000, 4), nla(15 | 0x8000, b"")))
    assert packet.indev == 4


def test_several_messages_in_one_datagram() -> None:
    """Two packets (the first one's unpadded payload padded to the next message), the
    kernel refusing a verdict (ENOENT) and acknowledging a config message."""
    first, second = packet_message(1, b"one"), packet_message(2, b"second", 4, u32(3, 9))
    datagram = (padded(first) + padded(second)
                + error_message(errno.ENOENT, verdict_message(5, 0xABCDEF12, True))
                + error_message(0, nfqueue.bind_message(5, 1, copy_range=1, max_len=1, flags=0, mask=0)))
    packets, refusals, malformed = parsed(datagram)
    assert [(p.packet_id, p.hook, p.mark, p.payload) for p in packets] == [(1, 2, 0, b"one"),
                                                                           (2, 4, 9, b"second")]
    assert refusals == [Refusal(VERDICT, 0xABCDEF12, errno.ENOENT), Refusal(CONFIG, 1, 0)]
    assert malformed == 0


def test_an_unpadded_last_message_ends_the_datagram_cleanly() -> None:
    message = packet_message(3, b"abc")
    assert len(message) % 4 == 3
    assert parsed(message)[2] == 0


@pytest.mark.parametrize("datagram", [
    pytest.param(nlmsg(PACKET, nfgen(5) + nla(10, b"no header")), id="no packet header"),
    pytest.param(nlmsg(PACKET, nfgen(5) + nla(1, b"\0\0\0\1")), id="short packet header"),
    pytest.param(nlmsg(PACKET, nfgen(5) + nla(1, bytes(7)) + struct.pack("=HH", 0, 10)),
                 id="attribute of length 0"),
    pytest.param(nlmsg(PACKET, nfgen(5) + nla(1, bytes(7)) + struct.pack("=HH", 200, 10) + b"xx"),
                 id="attribute past the message"),
    pytest.param(nlmsg(PACKET, nfgen(5) + nla(1, bytes(7)) + nla(3, b"\0\0")), id="short mark"),
    pytest.param(nlmsg(ERROR, struct.pack("=i", -2)), id="short error"),
    pytest.param(nlmsg(3, b"\0\0\0\0"), id="another message type"),
])
def test_a_broken_message_is_counted_and_skipped(datagram: bytes) -> None:
    good = packet_message(9, b"fine")
    packets, refusals, malformed = parsed(padded(datagram) + good)
    assert malformed == 1 and refusals == []
    assert [p.packet_id for p in packets] == [9]


@pytest.mark.parametrize("datagram", [
    pytest.param(struct.pack("=IHHII", 8, PACKET, 0, 0, 0), id="length below the header"),
    pytest.param(struct.pack("=IHHII", 4000, PACKET, 0, 0, 0) + bytes(20), id="length past the datagram"),
    pytest.param(b"\1\2\3\4\5", id="shorter than a header"),
])
def test_a_broken_header_ends_the_datagram(datagram: bytes) -> None:
    packets, refusals, malformed = parsed(datagram + packet_message(1, b"after"))
    assert (packets, refusals, malformed) == ([], [], 1)


def test_every_truncation_of_a_datagram_parses_without_raising() -> None:
    first = packet_message(1, b"p" * 50, 2, u32(5, 2), HWADDR, u32(14, 1))
    datagram = padded(first) + packet_message(2, b"q")
    for size in range(len(datagram)):
        packets, _, malformed = parsed(datagram[:size])
        assert len(packets) <= 1 and (malformed or size == 0 or len(packets) == 1)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.data())
def test_garbage_never_raises(noise: bytes, data: st.DataObject) -> None:
    """Random bytes, alone or written over a valid datagram."""
    valid = bytearray(padded(packet_message(4, b"payload", 2, u32(5, 1))) + packet_message(5, b"x"))
    at = data.draw(st.integers(0, len(valid)))
    valid[at:at + len(noise)] = noise
    for datagram in (noise, bytes(valid)):
        packets, _, _ = parsed(datagram)
        for packet in packets:
            assert 0 <= packet.packet_id < 2**32 and 0 <= packet.hook < 256
            assert packet.length >= 0


# --- the queue, over a stand-in socket ---------------------------------------------------------

class FakeNetlink:
    """What Queue needs of a netlink socket. Datagrams to read are queued in ``incoming``
    (an exception instead is raised by that read); a config message asking for an
    acknowledgement is answered with ``answer`` (an errno, 0: success, None: silence)."""

    instances: ClassVar[list[FakeNetlink]] = []
    answer: ClassVar[int | None] = 0

    def __init__(self, family: int, kind: int, protocol: int) -> None:
        assert (family, protocol) == (16, 12)  # AF_NETLINK, NETLINK_NETFILTER
        self.sent: list[bytes] = []
        self.incoming: deque[bytes | OSError] = deque()
        self.options: dict[tuple[int, int], int] = {}
        self.blocking = True
        self.closed = False
        self.fail_send: OSError | None = None
        FakeNetlink.instances.append(self)

    def bind(self, address: tuple[int, int]) -> None:
        assert address == (0, 0)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options[level, option] = value

    def settimeout(self, timeout: float) -> None:
        self.blocking = True

    def setblocking(self, flag: bool) -> None:
        self.blocking = flag

    def send(self, data: bytes) -> int:
        if self.fail_send is not None:
            raise self.fail_send
        self.sent.append(bytes(data))
        _length, kind, flags, _seq, _port = struct.unpack_from("=IHHII", data)
        if kind == CONFIG and flags & 0x4 and self.answer is not None:
            self.incoming.append(error_message(self.answer, data))
        return len(data)

    def recv_into(self, buffer: bytearray, size: int, flags: int) -> int:
        assert size == 0 and flags == 0x20  # the whole buffer; MSG_TRUNC: the datagram's real size
        if not self.incoming:
            raise TimeoutError if self.blocking else BlockingIOError(errno.EAGAIN, "nothing")
        item = self.incoming.popleft()
        if isinstance(item, OSError):
            raise item
        size = min(len(item), len(buffer))
        buffer[:size] = item[:size]
        return len(item)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> type[FakeNetlink]:
    FakeNetlink.instances = []
    FakeNetlink.answer = 0
    monkeypatch.setattr(nfqueue.socket, "socket", FakeNetlink)
    monkeypatch.setattr(nfqueue, "PROC_QUEUES", tmp_path / "nfnetlink_queue")
    return FakeNetlink


def sock(queue: Queue) -> FakeNetlink:
    socket: Any = queue.socket
    assert isinstance(socket, FakeNetlink)
    return socket


def test_the_bind_is_one_acknowledged_config_message(fake: type[FakeNetlink]) -> None:
    queue = Queue(7, max_len=100, gso=True, fail_open=False)
    netlink = sock(queue)
    assert netlink.sent == [nfqueue.bind_message(7, 1, copy_range=65531, max_len=100, flags=0x4, mask=0x5)]
    # SO_RCVBUFFORCE, SO_SNDBUFFORCE, NETLINK_CAP_ACK
    assert netlink.options == {(1, 33): 8 * 1024 * 1024, (1, 32): nfqueue.SEND_BUFFER, (270, 10): 1}
    assert not netlink.blocking


def test_bind_options_reach_the_message(fake: type[FakeNetlink]) -> None:
    queue = Queue(7, copy_range=128, gso=False, fail_open=True, receive_buffer=1 << 20)
    assert sock(queue).sent == [nfqueue.bind_message(7, 1, copy_range=128, max_len=8192, flags=0x1, mask=0x5)]
    assert sock(queue).options[1, 33] == 1 << 20


def test_packets_that_come_before_the_acknowledgement_are_kept(fake: type[FakeNetlink],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fake.answer = None

    class Early(FakeNetlink):
        def send(self, data: bytes) -> int:
            self.incoming.extend([packet_message(1, b"early"), error_message(0, data)])
            return super().send(data)

    monkeypatch.setattr(nfqueue.socket, "socket", Early)
    queue = Queue(7)
    assert [p.payload for p in queue.receive(64)] == [b"early"]


@pytest.mark.parametrize(("code", "holder", "message"), [
    (errno.EPERM, "    7  31337     0 2 65531     0     0        0  1\n",
     "cannot bind NFQUEUE 7: it is already bound by another socket (netlink port id 31337"),
    (errno.EPERM, None, "cannot bind NFQUEUE 7: not permitted (binding a queue needs CAP_NET_ADMIN)"),
    (errno.EOPNOTSUPP, None, "does not support the queue flags"),
    (errno.EINVAL, None, "is nfnetlink_queue available?"),
    (errno.ENOMEM, None, "cannot bind NFQUEUE 7: Cannot allocate memory"),
])
def test_a_refused_bind_raises_the_reason_and_closes_the_socket(
        fake: type[FakeNetlink], code: int, holder: str | None, message: str) -> None:
    if holder is not None:
        nfqueue.PROC_QUEUES.write_text("    3   1000     0 2 65531     0     0        0  1\n" + holder)
    fake.answer = code
    with pytest.raises(QueueError, match=re.escape(message)):
        Queue(7)
    assert fake.instances[-1].closed


def test_no_answer_to_the_bind_raises(fake: type[FakeNetlink]) -> None:
    fake.answer = None
    with pytest.raises(QueueError, match="did not answer the bind of NFQUEUE 7"):
        Queue(7)
    assert fake.instances[-1].closed


def test_no_netlink_socket_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: int) -> None:
        raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")

    monkeypatch.setattr(nfqueue.socket, "socket", refuse)
    with pytest.raises(QueueError, match="cannot open a netfilter netlink socket: Protocol not supported"):
        Queue(7)


def test_settings_out_of_range_raise() -> None:
    with pytest.raises(QueueError, match="not from 0 to 65535"):
        Queue(65536)
    with pytest.raises(QueueError, match="max_len must be from 1"):
        Queue(5, max_len=0)
    with pytest.raises(QueueError, match="copy_range not negative"):
        Queue(5, copy_range=-1)


def test_receive_stops_at_the_limit_and_goes_on_next_time(fake: type[FakeNetlink]) -> None:
    queue = Queue(5)
    sock(queue).incoming.extend(packet_message(i, b"p") for i in range(1, 101))
    assert [p.packet_id for p in queue.receive(64)] == list(range(1, 65))
    assert [p.packet_id for p in queue.receive(64)] == list(range(65, 101))
    assert queue.receive(64) == []


def ip4(source: str, tag: int) -> bytes:
    """An IPv4 packet's first bytes from ``source`` (the queue reads no more of them)."""
    return bytes([0x45, 0, 0, 20, 0, tag, 0, 0, 64, 6, 0, 0]) + socket.inet_aton(source) + bytes(4)


def ip6(source: str, tag: int) -> bytes:
    return bytes([0x60, 0, 0, tag, 0, 0, 6, 64]) + socket.inet_pton(socket.AF_INET6, source) + bytes(16)


def test_a_flood_from_one_source_holds_anothers_packets_back_by_one_packet_each(
        fake: type[FakeNetlink]) -> None:
    """The sources take turns, a packet each, a new one at the end of the turns; each
    source's packets keep the kernel's order; IPv6 sources are told apart by address (and
    what is neither IPv4 nor IPv6 shares one turn)."""
    queue = Queue(5)
    incoming = sock(queue).incoming
    incoming.extend(packet_message(i, ip4("192.0.2.12", i)) for i in range(50))
    assert [p.packet_id for p in queue.receive(10)] == list(range(10))
    late = [ip4("192.0.2.11", 1), ip6("2001:db8::11", 2), ip6("2001:db8::12", 3), b"\x00", b"\x45"]
    incoming.extend(packet_message(100 + i, p) for i, p in enumerate(late))
    assert [p.packet_id for p in queue.receive(12)] == [10, 100, 101, 102, 103, 11, 104, 12, 13, 14, 15, 16]
    assert [p.packet_id for p in queue.receive(64)] == list(range(17, 50))
    assert not queue.waiting and queue._held_bytes == 0


def test_a_turn_ends_at_its_limit_or_its_time_and_the_rest_waits(fake: type[FakeNetlink]) -> None:
    queue = Queue(5)
    sock(queue).incoming.extend(packet_message(i, ip4("192.0.2.12", 0)) for i in range(1, 11))
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0  # each packet takes a second
        return now[0]

    assert [p.packet_id for p in queue.turn(64, 3.0, clock)] == [1, 2, 3]  # the third passes it
    assert queue.waiting and not sock(queue).incoming  # all read, the rest held
    assert [p.packet_id for p in queue.turn(4, float("inf"), clock)] == [4, 5, 6, 7]
    assert [p.packet_id for p in queue.receive(64)] == [8, 9, 10] and not queue.waiting


def test_reading_stops_while_the_held_payload_is_at_its_cap(fake: type[FakeNetlink],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nfqueue, "HELD_BYTES", 3 * 1000)
    queue = Queue(5)
    sock(queue).incoming.extend(packet_message(i, ip4("192.0.2.12", 0) + bytes(980)) for i in range(1, 6))
    queue.read()
    assert len(sock(queue).incoming) == 2  # three read: the kernel keeps the rest
    assert queue.take() is not None
    queue.read()
    assert len(sock(queue).incoming) == 1


def test_receive_counts_overflows_refusals_and_garbage_and_returns_the_packets(
        fake: type[FakeNetlink], caplog: pytest.LogCaptureFixture) -> None:
    queue = Queue(5)
    netlink = sock(queue)
    netlink.incoming.extend([
        packet_message(1, b"a"),
        OSError(errno.ENOBUFS, "No buffer space available"),
        b"\xff" * 40,
        error_message(errno.ENOENT, verdict_message(5, 77, True)),
        bytes(nfqueue.RECEIVE_SIZE + 1),  # longer than the buffer: read truncated
        packet_message(2, b"b"),
    ])
    with caplog.at_level(logging.WARNING, logger="pinhole.enforcer"):
        assert [p.packet_id for p in queue.receive(64)] == [1, 2]
    assert (queue.overflows, queue.verdict_errors, queue.malformed) == (1, 1, 2)
    assert "the kernel refused the verdict on packet 77: No such file or directory" in caplog.text


def test_only_the_first_refusals_are_logged(fake: type[FakeNetlink],
                                            caplog: pytest.LogCaptureFixture) -> None:
    queue = Queue(5)
    sock(queue).incoming.extend(error_message(errno.ENOENT, verdict_message(5, i, True)) for i in range(30))
    with caplog.at_level(logging.WARNING, logger="pinhole.enforcer"):
        queue.receive(64)
    assert queue.verdict_errors == 30
    assert len(caplog.records) == nfqueue.LOGGED_VERDICT_ERRORS
    assert "further refusals are counted, not logged" in caplog.records[-1].getMessage()


def test_a_failing_socket_raises_queue_error(fake: type[FakeNetlink]) -> None:
    """A read that fails raises, but not over the packets read before it in the same call:
    they are returned for their verdicts, and the next read raises."""
    queue = Queue(5)
    sock(queue).incoming.extend([packet_message(1, b"a"), OSError(errno.EBADF, "Bad file descriptor"),
                                 OSError(errno.EBADF, "Bad file descriptor")])
    assert [p.packet_id for p in queue.receive(64)] == [1]
    with pytest.raises(QueueError, match="reading NFQUEUE 5 failed: Bad file descriptor"):
        queue.receive(64)


def test_flush_sends_a_batch_in_one_datagram(fake: type[FakeNetlink]) -> None:
    queue = Queue(5)
    netlink = sock(queue)
    netlink.sent.clear()
    queue.flush()
    assert netlink.sent == []
    for i in range(64):
        queue.verdict(i, i % 2 == 0, mark=i if i % 3 == 0 else None)
    assert netlink.sent == []  # buffered until flush
    queue.flush()
    assert netlink.sent == [b"".join(verdict_message(5, i, i % 2 == 0, i if i % 3 == 0 else None)
                                     for i in range(64))]
    queue.flush()
    assert len(netlink.sent) == 1


def test_the_send_buffer_holds_a_whole_batch(fake: type[FakeNetlink]) -> None:
    """Netlink refuses a datagram longer than the send buffer less 32 bytes (EMSGSIZE),
    every verdict in it lost; the buffer is forced (the kernel doubles what it is given),
    not left at net.core.wmem_default."""
    options = sock(Queue(5)).options
    assert 2 * options[socket.SOL_SOCKET, nfqueue.SO_SNDBUFFORCE] - 32 >= nfqueue.SEND_SIZE


def test_flush_splits_what_exceeds_a_datagram(fake: type[FakeNetlink]) -> None:
    queue = Queue(5)
    netlink = sock(queue)
    netlink.sent.clear()
    rng = random.Random(5)
    payloads = [bytes(rng.randrange(20, 65000)) for _ in range(12)]
    for i, payload in enumerate(payloads):
        queue.verdict(i, True, payload=payload)
    queue.flush()
    messages = [verdict_message(5, i, True, payload=payload) for i, payload in enumerate(payloads)]
    assert len(netlink.sent) > 1
    assert all(len(d) <= nfqueue.SEND_SIZE for d in netlink.sent)
    assert b"".join(netlink.sent) == b"".join(messages)


def test_a_failed_send_is_counted_and_logged(fake: type[FakeNetlink],
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A send the kernel refuses for another reason than memory loses its verdicts: their
    packets wait in the kernel's queue until it goes; counted, logged."""
    queue = Queue(5)
    for i in range(3):
        queue.verdict(i, True)
    sock(queue).fail_send = OSError(errno.EMSGSIZE, "Message too long")
    with caplog.at_level(logging.WARNING, logger="pinhole.enforcer"):
        queue.flush()
    assert queue.verdict_errors == 3 and not queue.unsent
    assert "3 verdicts could not be sent: Message too long" in caplog.text


@pytest.mark.parametrize("error", [errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN, errno.EINTR])
def test_verdicts_a_send_could_not_give_for_want_of_memory_go_at_the_next_flush(
        fake: type[FakeNetlink], caplog: pytest.LogCaptureFixture, error: int) -> None:
    """Kept, in their order, before the verdicts buffered since, and sent at the next flush
    that can (no packet is left in the kernel's queue without one); none counted lost."""
    queue = Queue(5)
    netlink = sock(queue)
    netlink.sent.clear()
    for i in range(3):
        queue.verdict(i, True)
    netlink.fail_send = OSError(error, errno.errorcode[error])
    with caplog.at_level(logging.WARNING, logger="pinhole.enforcer"):
        queue.flush()
        queue.verdict(3, False)
        queue.flush()  # fails again: all four kept
    assert queue.unsent and netlink.sent == [] and queue.verdicts_retried == 3 + 4
    assert "3 verdicts could not be sent" in caplog.text and "next flush" in caplog.text
    netlink.fail_send = None
    queue.flush()
    assert b"".join(netlink.sent) == b"".join(verdict_message(5, i, i < 3) for i in range(4))
    assert not queue.unsent and queue.verdict_errors == 0
    queue.flush()
    assert len(b"".join(netlink.sent)) == len(b"".join(verdict_message(5, i, i < 3) for i in range(4)))


def test_after_a_kept_datagram_the_rest_of_its_flush_waits_behind_it(fake: type[FakeNetlink]) -> None:
    """A flush of several datagrams whose first send fails for want of memory sends none of
    the others past it (the socket would take them): all go at the next flush, in order."""
    queue = Queue(5)
    netlink = sock(queue)
    netlink.sent.clear()
    send = netlink.send
    failures = [OSError(errno.ENOBUFS, "No buffer space available")]

    def send_once_failing(data: bytes) -> int:
        if failures:
            raise failures.pop()
        return send(data)

    netlink.send = send_once_failing  # type: ignore[method-assign]
    payloads = [bytes(40000) for _ in range(8)]  # several datagrams of SEND_SIZE
    for i, payload in enumerate(payloads):
        queue.verdict(i, True, payload=payload)
    queue.flush()
    assert netlink.sent == [] and queue.unsent and queue.verdicts_retried == 8
    queue.flush()
    assert len(netlink.sent) > 1 and not queue.unsent and queue.verdict_errors == 0
    assert b"".join(netlink.sent) == b"".join(verdict_message(5, i, True, payload=payload)
                                               for i, payload in enumerate(payloads))


def test_verdicts_kept_for_a_retry_are_capped(fake: type[FakeNetlink]) -> None:
    """Past UNSENT_BYTES of kept verdicts a failed send's are lost (counted) instead: what
    a long want of memory makes the enforcer hold has a cap."""
    queue = Queue(5)
    sock(queue).fail_send = OSError(errno.ENOBUFS, "No buffer space available")
    payload = bytes(60000)
    count = nfqueue.UNSENT_BYTES // len(verdict_message(5, 0, True, payload=payload)) + 20
    for i in range(count):
        queue.verdict(i, True, payload=payload)
        queue.flush()
    assert 0 < queue._unsent_size <= nfqueue.UNSENT_BYTES
    # each verdict is kept or counted lost: none goes unaccounted
    assert queue.verdict_errors > 0 and queue.verdict_errors + len(queue._unsent) == count


def test_close_sends_what_is_buffered_then_unbinds_once(fake: type[FakeNetlink]) -> None:
    with Queue(5) as queue:
        netlink = sock(queue)
        netlink.sent.clear()
        queue.verdict(3, False)
    assert netlink.sent == [verdict_message(5, 3, False), nfqueue.unbind_message(5, 2)]
    assert netlink.closed
    queue.close()
    assert len(netlink.sent) == 2


def test_keep_freed_memory_sets_mallopts_trim_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, parameter: int, value: int) -> int:
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(nfqueue.ctypes, "CDLL", lambda _name: Libc())
    assert nfqueue.keep_freed_memory()
    assert calls == [(-1, 64 * 1024 * 1024)]  # M_TRIM_THRESHOLD


def test_keep_freed_memory_without_mallopt_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nfqueue.ctypes, "CDLL", lambda _name: object())
    assert not nfqueue.keep_freed_memory()


def test_keep_freed_memory_works_with_this_c_library() -> None:
    assert nfqueue.keep_freed_memory() == hasattr(nfqueue.ctypes.CDLL(None), "mallopt")
