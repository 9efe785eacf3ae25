"""Exercises ``enforcer.nfqueue`` against the kernel; run as root inside a throwaway
network namespace (``tests/e2e/test_nfqueue_binding.py`` makes one and runs this there):

    ip netns exec NS python -m tests.e2e.nfqueue_probe

UDP datagrams go from a socket to a socket on lo; iptables sends them to queue 11
(filter OUTPUT, or INPUT for one port) and marks them 0x77 on the way (mangle
OUTPUT); a mangle POSTROUTING rule counts those leaving with mark 0x1234. Each
scenario prints what it saw; the report is one JSON object on stdout, its keys the
scenarios'. Nothing here asserts: the test module does.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from enforcer.nfqueue import Packet, Queue, QueueError

QUEUE = 11
OUT_PORT, IN_PORT = 40001, 40002  # queued at OUTPUT; queued at INPUT
MARK_IN, MARK_SET = 0x77, 0x1234
LOCAL = "127.0.0.1"
UDP_SEGMENT = 103  # linux/udp.h: send one GSO datagram the kernel splits into segments
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32
RULES = [
    ["-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", str(OUT_PORT),
     "-j", "MARK", "--set-mark", hex(MARK_IN)],
    ["-A", "OUTPUT", "-p", "udp", "--dport", str(OUT_PORT), "-j", "NFQUEUE", "--queue-num", str(QUEUE)],
    ["-A", "INPUT", "-p", "udp", "--dport", str(IN_PORT), "-j", "NFQUEUE", "--queue-num", str(QUEUE)],
    ["-t", "mangle", "-A", "POSTROUTING", "-p", "udp", "--dport", str(OUT_PORT),
     "-m", "mark", "--mark", hex(MARK_SET)],
]


def collect(queue: Queue, count: int, timeout: float = 5.0) -> list[Packet]:
    """At least ``count`` queued packets, or what came within ``timeout``."""
    packets: list[Packet] = []
    deadline = time.monotonic() + timeout
    while len(packets) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        select.select([queue.socket], [], [], left)
        packets += queue.receive(64)
    return packets


def arrived(sock: socket.socket, expected: int, timeout: float = 5.0, grace: float = 0.3) -> list[bytes]:
    """The datagrams ``sock`` receives: ``expected`` of them (or what came within
    ``timeout``), then any more that come, until none does for ``grace`` seconds."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        wait = max(deadline - time.monotonic(), 0) if len(got) < expected else grace
        if not select.select([sock], [], [], wait)[0]:
            return got
        got.append(sock.recv(65535))


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def with_udp_data(packet: bytes, data: bytes, how: str = "complete") -> bytes:
    """``packet`` (IPv4/UDP) carrying ``data`` instead, lengths and the IP checksum
    right; its UDP checksum ``complete``, ``wrong`` (complete, off by one), or
    ``partial``: the pseudo-header sum alone, as a packet with a partial checksum
    (CHECKSUM_PARTIAL) holds it."""
    ihl = (packet[0] & 0x0F) * 4
    ip = bytearray(packet[:ihl])
    struct.pack_into("!H", ip, 2, ihl + 8 + len(data))
    struct.pack_into("!H", ip, 10, 0)
    struct.pack_into("!H", ip, 10, checksum(bytes(ip)))
    sport, dport = struct.unpack_from("!HH", packet, ihl)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    pseudo = bytes(ip[12:20]) + struct.pack("!BBH", 0, socket.IPPROTO_UDP, len(udp))
    if how == "partial":
        csum = ~checksum(pseudo) & 0xFFFF
    else:
        csum = checksum(pseudo + udp) or 0xFFFF
        if how == "wrong":
            csum = csum % 0xFFFF + 1
    return bytes(ip) + udp[:6] + struct.pack("!H", csum) + udp[8:]


def summary(packet: Packet) -> dict[str, Any]:
    return {"hook": packet.hook, "mark": packet.mark, "indev": packet.indev, "length": packet.length,
            "payload_length": len(packet.payload), "data": packet.payload[28:44].decode(errors="replace"),
            "checksum_ready": packet.checksum_ready, "gso": packet.gso}


class Probe:
    def __init__(self) -> None:
        self.rx_out = self._receiver(OUT_PORT)
        self.rx_in = self._receiver(IN_PORT)
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    @staticmethod
    def _receiver(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 * 1024 * 1024)  # the overflow's 200
        sock.bind((LOCAL, port))
        return sock

    def send(self, *datagrams: bytes, port: int = OUT_PORT) -> None:
        for data in datagrams:
            self.tx.sendto(data, (LOCAL, port))

    def accept_and_drop(self) -> dict[str, Any]:
        with Queue(QUEUE) as queue:
            self.send(b"keep-1", b"drop-1", b"keep-2", b"drop-2")
            packets = collect(queue, 4)
            for packet in packets:
                queue.verdict(packet.packet_id, packet.payload.endswith(b"keep-1")
                              or packet.payload.endswith(b"keep-2"))
            queue.flush()
            return {"queued": [summary(p) for p in packets], "ids": [p.packet_id for p in packets],
                    "arrived": [d.decode() for d in arrived(self.rx_out, 2)]}

    def marks(self) -> dict[str, Any]:
        with Queue(QUEUE) as queue:
            before = mark_counter()
            self.send(b"mark-1", b"mark-2", b"mark-3", b"plain-1", b"plain-2")
            for packet in collect(queue, 5):
                marked = b"mark-" in packet.payload
                queue.verdict(packet.packet_id, True, mark=MARK_SET if marked else None)
            queue.flush()
            got = arrived(self.rx_out, 5)
            return {"counted": mark_counter() - before, "arrived": len(got)}

    def payloads(self) -> dict[str, Any]:
        with Queue(QUEUE) as queue:
            errors = udp_checksum_errors()
            self.send(b"original", b"original, checksum off")
            packets = collect(queue, 2)
            for packet, new, how in zip(packets, (b"rewritten, longer than before", b"never seen"),
                                        ("complete", "wrong"), strict=False):
                queue.verdict(packet.packet_id, True, payload=with_udp_data(packet.payload, new, how))
            queue.flush()
            return {"queued": len(packets), "arrived": [d.decode() for d in arrived(self.rx_out, 1)],
                    "checksum_errors": udp_checksum_errors() - errors}

    def full_batches(self) -> dict[str, Any]:
        """120 datagrams of 1400 bytes, each accepted with its bytes as the verdict's
        payload: more verdict bytes than one batch (SEND_SIZE), so a full one is sent."""
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 * 1024 * 1024)  # (they wait queued)
        with sender, Queue(QUEUE) as queue:
            for i in range(120):
                sender.sendto(b"%04d" % i + bytes(1396), (LOCAL, OUT_PORT))
            packets = collect(queue, 120)
            for packet in packets:
                # (its bytes again, with a complete checksum: lo's is left to the device)
                queue.verdict(packet.packet_id, True,
                              payload=with_udp_data(packet.payload, packet.payload[28:]))
            queue.flush()
            return {"queued": len(packets), "arrived": len(arrived(self.rx_out, 120)),
                    "verdict_errors": queue.verdict_errors,
                    "send_buffer": queue.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)}

    def input_hook(self) -> dict[str, Any]:
        with Queue(QUEUE) as queue:
            self.send(b"inbound", port=IN_PORT)
            packets = collect(queue, 1)
            for packet in packets:
                queue.verdict(packet.packet_id, True)
            queue.flush()
            return {"queued": [summary(p) for p in packets], "lo": socket.if_nametoindex("lo"),
                    "arrived": [d.decode() for d in arrived(self.rx_in, 1)]}

    def gso(self) -> dict[str, Any]:
        """One UDP GSO send of four 1000-byte segments, with the queue's GSO flag on and off."""
        result = {}
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, 1000)
        for flag in (True, False):
            with Queue(QUEUE, gso=flag) as queue:
                sender.sendto(b"g" * 4000, (LOCAL, OUT_PORT))
                packets = collect(queue, 4 if not flag else 1, timeout=1.0)
                for packet in packets:
                    queue.verdict(packet.packet_id, True)
                queue.flush()
                result["on" if flag else "off"] = {
                    "queued": [summary(p) for p in packets],
                    "arrived": [len(d) for d in arrived(self.rx_out, 4)]}
        sender.close()
        return result

    def gso_payload(self) -> dict[str, Any]:
        """New content for a UDP GSO send (four segments of 1000 bytes): the kernel makes
        each segment's checksum from the super-packet's checksum field, so that must stay
        the pseudo-header sum (partial); a complete checksum there spoils every segment."""
        result = {}
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, 1000)
        with Queue(QUEUE, gso=True) as queue:
            for how, fill in (("partial", b"P"), ("complete", b"C")):
                sender.sendto(b"g" * 4000, (LOCAL, OUT_PORT))
                packets = collect(queue, 1)
                for packet in packets:
                    queue.verdict(packet.packet_id, True,
                                  payload=with_udp_data(packet.payload, fill * 4000, how))
                queue.flush()
                got = arrived(self.rx_out, 4 if how == "partial" else 0)
                result[how] = {"queued_gso": [p.gso for p in packets],
                               "arrived": [(len(d), "".join(sorted(set(d.decode())))) for d in got]}
        sender.close()
        return result

    def truncated(self) -> dict[str, Any]:
        with Queue(QUEUE, copy_range=64) as queue:
            self.send(b"t" * 500)
            packets = collect(queue, 1)
            for packet in packets:
                queue.verdict(packet.packet_id, True)
            queue.flush()
            return {"queued": [summary(p) for p in packets],
                    "arrived": [len(d) for d in arrived(self.rx_out, 1)]}

    def second_bind(self) -> dict[str, Any]:
        with Queue(QUEUE):
            try:
                Queue(QUEUE).close()
            except QueueError as exc:
                return {"error": str(exc)}
            return {"error": None}

    def overflow(self) -> dict[str, Any]:
        """A receive buffer far too small for 200 datagrams sent unread; without and with
        fail-open (the kernel then accepts what it could not queue)."""
        result = {}
        for fail_open in (False, True):
            with Queue(QUEUE, receive_buffer=4096, fail_open=fail_open) as queue:
                self.send(*(b"o" * 1000 for _ in range(200)))
                packets = []
                while select.select([queue.socket], [], [], 0.2)[0]:
                    batch = queue.receive(1000)
                    for packet in batch:
                        queue.verdict(packet.packet_id, True)
                    queue.flush()
                    packets += batch
                got = arrived(self.rx_out, 200 if fail_open else len(packets))
                result["fail_open" if fail_open else "fail_closed"] = {
                    "overflows": queue.overflows, "read": len(packets), "user_dropped": user_dropped(),
                    "arrived": len(got)}
        return result

    def refused_verdict(self) -> dict[str, Any]:
        with Queue(QUEUE) as queue:
            queue.verdict(987654, True)
            queue.flush()
            select.select([queue.socket], [], [], 5.0)  # the kernel answers as it reads the verdict
            packets = queue.receive(10)
            return {"verdict_errors": queue.verdict_errors, "packets": len(packets)}

    def close_unbinds(self) -> dict[str, Any]:
        queue = Queue(QUEUE)
        listed = queue_listed()
        queue.close()
        queue.close()  # idempotent
        after = queue_listed()
        with Queue(QUEUE):
            rebound = queue_listed()
        return {"listed_while_bound": listed, "listed_after_close": after, "rebound": rebound}


def mark_counter() -> int:
    """Packets the mangle POSTROUTING rule counted (those that left with MARK_SET)."""
    out = subprocess.run(["iptables-save", "-c", "-t", "mangle"], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        if "--mark" in line and line.startswith("[") and "POSTROUTING" in line:
            return int(line[1:line.index(":")])
    raise RuntimeError(f"no mark counter in:\n{out}")


def queue_row() -> list[str] | None:
    """The queue's row of /proc/net/netfilter/nfnetlink_queue: number, port id, waiting,
    copy mode, copy range, queue drops, user drops (the socket was full), last id, 1."""
    for line in Path("/proc/net/netfilter/nfnetlink_queue").read_text().splitlines():
        if line.split()[0] == str(QUEUE):
            return line.split()
    return None


def queue_listed() -> bool:
    return queue_row() is not None


def user_dropped() -> int:
    row = queue_row()
    return int(row[6]) if row else -1


def udp_checksum_errors() -> int:
    """Udp InCsumErrors of /proc/net/snmp."""
    names, values = (line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
                     if line.startswith("Udp:"))
    return int(values[names.index("InCsumErrors")])


def main() -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for rule in RULES:
        subprocess.run(["iptables", *rule], check=True)
    probe = Probe()
    scenarios: dict[str, Callable[[], dict[str, Any]]] = {
        "accept_and_drop": probe.accept_and_drop, "marks": probe.marks, "payloads": probe.payloads,
        "full_batches": probe.full_batches,
        "input_hook": probe.input_hook, "gso": probe.gso, "gso_payload": probe.gso_payload,
        "truncated": probe.truncated,
        "second_bind": probe.second_bind, "overflow": probe.overflow,
        "refused_verdict": probe.refused_verdict, "close_unbinds": probe.close_unbinds,
    }
    report: dict[str, Any] = {}
    for name, scenario in scenarios.items():
        try:
            report[name] = scenario()
        except Exception as exc:  # reported, so one broken scenario does not hide the others
            report[name] = {"failed": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
