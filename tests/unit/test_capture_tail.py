"""testbed.capture's pcap tail: a pcap read while it grows, each record dissected once, a
record still being written left for the next read, a new file under the same path read
anew; and what tcpdump says it lost (no root needed)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import CookedLinuxV2
from scapy.utils import PcapWriter

from testbed.capture import FwPackets, PcapTail, dropped_count, pcap_tail, relied_on_for_absence

SLL2 = 276  # LINKTYPE_LINUX_SLL2


def record(n: int) -> bytes:
    return bytes(CookedLinuxV2(proto=0x0800, ifindex=n) / IP(src="192.0.2.11", dst="198.51.100.21")
                 / UDP(sport=1000 + n, dport=53))


def written(path: Path, count: int, start: int = 0) -> None:
    with PcapWriter(str(path), linktype=SLL2, append=start > 0, sync=True) as w:
        for n in range(start, start + count):
            w.write(CookedLinuxV2(record(n)))


def test_a_growing_pcap_is_read_as_it_grows_each_record_once(tmp_path: Path) -> None:
    path = tmp_path / "fw.pcap"
    tail = PcapTail(path)
    assert tail.read() == []  # no file yet
    path.write_bytes(b"\xd4\xc3")  # tcpdump has begun the header
    assert tail.read() == []
    path.unlink()
    written(path, 3)
    first = tail.read()
    assert [p.ifindex for p in first] == [0, 1, 2]
    written(path, 2, start=3)
    again = tail.read()
    assert [p.ifindex for p in again] == [0, 1, 2, 3, 4]
    assert all(a is b for a, b in zip(first, again, strict=False)), "records were dissected again"
    assert isinstance(again[4][UDP], UDP) and again[4][UDP].sport == 1004


def test_a_record_still_being_written_waits_for_the_next_read(tmp_path: Path) -> None:
    path = tmp_path / "fw.pcap"
    written(path, 1)
    whole = record(7)
    header = struct.pack("<IIII", 1, 500000, len(whole), len(whole))
    with path.open("ab") as f:
        f.write(header[:10])
    tail = PcapTail(path)
    assert len(tail.read()) == 1  # half a record header
    with path.open("ab") as f:
        f.write(header[10:] + whole[:20])
    assert len(tail.read()) == 1  # the header and part of the packet
    with path.open("ab") as f:
        f.write(whole[20:])
    got = tail.read()
    assert [p.ifindex for p in got] == [0, 7] and got[1].time == 1.5


def test_a_new_pcap_under_the_same_path_is_read_anew(tmp_path: Path) -> None:
    path = tmp_path / "fw.pcap"
    written(path, 3)
    tail = PcapTail(path)
    assert len(tail.read()) == 3
    replacement = tmp_path / "new.pcap"
    written(replacement, 1, start=0)
    os.replace(replacement, path)
    assert [p.ifindex for p in tail.read()] == [0]


def test_sniffers_of_one_pcap_share_its_reader(tmp_path: Path) -> None:
    path = tmp_path / "fw.pcap"
    written(path, 4)
    assert pcap_tail(path) is pcap_tail(str(path))
    odd = FwPackets(path, "odd", lambda p: p.ifindex % 2 == 1)
    even = FwPackets(path, "even", lambda p: p.ifindex % 2 == 0)
    assert [p.ifindex for p in odd.packets()] == [1, 3]
    assert [p.ifindex for p in even.packets()] == [0, 2]


def test_what_tcpdump_says_it_lost_is_read_from_its_last_words() -> None:
    listening = ("tcpdump: listening on any, link-type LINUX_SLL2 (Linux cooked v2), "
                 "snapshot length 65535 bytes")
    assert dropped_count([listening]) is None  # running, or killed: it has said nothing
    said = [listening, "12 packets captured", "15 packets received by filter",
            "3 packets dropped by kernel"]
    assert dropped_count(said) == 3
    assert dropped_count([*said[:3], "0 packets dropped by kernel"]) == 0
    assert dropped_count([*said, "1 packet dropped by interface"]) == 4


def test_a_pcap_a_negative_check_relied_on_is_known_until_asked(tmp_path: Path) -> None:
    path = tmp_path / "fw.pcap"
    sent = FwPackets(path, "the fw, sent", lambda p: True)
    assert not relied_on_for_absence(path)
    sent.absence_relied_on()
    assert not relied_on_for_absence(tmp_path / "other.pcap")
    assert relied_on_for_absence(str(path))
    assert not relied_on_for_absence(path)  # forgotten once asked (the next check's is its own)
