"""The fw's listening sockets (SPEC rule 14): the core's value (enforcer.core.fwports) and
the shell that asks the kernel for it (enforcer.listening: sock_diag, /proc/net, a cache)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from enforcer.core.fwports import FIRST_UNPRIVILEGED_PORT, NOTHING_LISTENS, Listening, privileged
from enforcer.core.packet import TCP, UDP
from enforcer.listening import ListeningSockets, parse_table, read_diag, read_proc

ip = ipaddress.ip_address
EXT4, EXT6 = ip("198.51.100.1"), ip("2001:db8:2::1")


# --- the value ------------------------------------------------------------------------------

def test_privileged_ports_are_those_below_1024() -> None:
    assert FIRST_UNPRIVILEGED_PORT == 1024
    assert [p for p in (0, 1, 22, 1023, 1024, 65535) if privileged(p)] == [0, 1, 22, 1023]


def test_a_socket_covers_its_address_and_a_wildcard_every_address_of_its_family() -> None:
    fw = Listening(frozenset({(TCP, EXT4, 8080), (TCP, ip("0.0.0.0"), 22), (UDP, ip("::"), 53),
                              (TCP, EXT6, 443)}))
    assert fw.covers(TCP, EXT4, 8080) and not fw.covers(TCP, ip("198.51.100.2"), 8080)
    assert fw.covers(TCP, ip("198.51.100.2"), 22) and not fw.covers(TCP, EXT6, 22)
    # an IPv6 wildcard takes IPv4 too (dual stack, unless IPV6_V6ONLY, which is not shown)
    assert fw.covers(UDP, EXT4, 53) and fw.covers(UDP, EXT6, 53) and not fw.covers(TCP, EXT4, 53)
    assert fw.covers(TCP, EXT6, 443) and not fw.covers(TCP, EXT4, 443)
    assert not fw.covers(UDP, EXT4, 8080) and not fw.covers(TCP, EXT4, 8081)
    assert not NOTHING_LISTENS.covers(TCP, EXT4, 22)


def test_the_status_view_lists_them_sorted() -> None:
    fw = Listening(frozenset({(UDP, ip("::"), 53), (TCP, EXT4, 8080), (TCP, ip("0.0.0.0"), 22),
                              (TCP, EXT6, 443)}))
    assert fw.to_list() == ["tcp 0.0.0.0:22", "tcp 198.51.100.1:8080", "tcp [2001:db8:2::1]:443",
                            "udp [::]:53"]


# --- /proc/net ------------------------------------------------------------------------------

def _word_hex(packed: bytes) -> str:
    """An address as the kernel prints it: 32-bit words in host byte order."""
    return "".join(f"{int.from_bytes(packed[i:i + 4], sys.byteorder):08X}"
                   for i in range(0, len(packed), 4))


def _line(n: int, address: str, port: int, state: int) -> str:
    local = f"{_word_hex(ip(address).packed)}:{port:04X}"
    remote = f"{'0' * len(local.split(':')[0])}:0000"
    return f"  {n}: {local} {remote} {state:02X} 00000000:00000000 00:00000000 00000000 0 0 1 1"


HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"


def test_proc_tables_give_tcp_listeners_and_bound_udp_sockets() -> None:
    tcp = [HEADER, _line(0, "198.51.100.1", 8080, 0x0A), _line(1, "0.0.0.0", 22, 0x0A),
           _line(2, "198.51.100.1", 40000, 0x01)]  # an established connection
    assert parse_table(tcp, TCP, 4) == {(TCP, EXT4, 8080), (TCP, ip("0.0.0.0"), 22)}
    tcp6 = [HEADER, _line(0, "::", 2121, 0x0A), _line(1, "::ffff:198.51.100.1", 21, 0x0A),
            _line(2, "2001:db8:2::1", 50000, 0x06)]  # TIME_WAIT
    assert parse_table(tcp6, TCP, 6) == {(TCP, ip("::"), 2121), (TCP, EXT4, 21)}
    udp = [HEADER, _line(0, "0.0.0.0", 69, 0x07), _line(1, "198.51.100.1", 5353, 0x01),
           _line(2, "0.0.0.0", 0, 0x07)]  # not bound to a port
    assert parse_table(udp, UDP, 4) == {(UDP, ip("0.0.0.0"), 69), (UDP, EXT4, 5353)}
    assert parse_table([HEADER, "", "garbage"], UDP, 6) == set()


@pytest.mark.skipif(sys.byteorder != "little", reason="the sample is from a little-endian host")
def test_a_line_as_this_kernel_prints_it() -> None:
    line = "   0: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0  0 1 1"
    assert parse_table([HEADER, line], TCP, 4) == {(TCP, ip("127.0.0.1"), 631)}


def test_read_proc_reads_the_four_tables_and_skips_a_missing_one(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text("\n".join([HEADER, _line(0, "198.51.100.1", 8080, 0x0A)]))
    (tmp_path / "udp6").write_text("\n".join([HEADER, _line(0, "::", 53, 0x07)]))
    (tmp_path / "udp").write_text(HEADER + "\n")  # and no tcp6: a kernel without IPv6
    assert read_proc(tmp_path).sockets == {(TCP, EXT4, 8080), (UDP, ip("::"), 53)}


# --- both readers, on this namespace's real sockets ---------------------------------------------

@contextlib.contextmanager
def some_sockets() -> Iterator[tuple[set[tuple[int, object, int]], set[int]]]:
    """A TCP listener, a UDP socket and a connected TCP pair on loopback (IPv6 too where
    the host has it): (what a reader must report, the pair's client ports, which it must
    not)."""
    families = [(socket.AF_INET, "127.0.0.1")]
    if socket.has_ipv6 and Path("/proc/net/if_inet6").exists():
        families.append((socket.AF_INET6, "::1"))
    with contextlib.ExitStack() as stack:
        listeners: set[tuple[int, object, int]] = set()
        clients: set[int] = set()
        for family, address in families:
            server = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            server.bind((address, 0))
            server.listen()
            listeners.add((TCP, ip(address), server.getsockname()[1]))
            datagrams = stack.enter_context(socket.socket(family, socket.SOCK_DGRAM))
            datagrams.bind((address, 0))
            listeners.add((UDP, ip(address), datagrams.getsockname()[1]))
            client = stack.enter_context(socket.create_connection(server.getsockname()[:2]))
            stack.enter_context(server.accept()[0])
            clients.add(client.getsockname()[1])
        yield listeners, clients


@pytest.mark.parametrize("reader", [read_diag, read_proc], ids=["sock_diag", "proc"])
def test_each_reader_finds_this_namespace_s_listeners(reader: Callable[[], Listening]) -> None:
    with some_sockets() as (listeners, clients):
        got = reader().sockets
    assert listeners <= got
    assert not [s for s in got if s[0] == TCP and s[2] in clients]


# --- the cache --------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_answer_is_used_for_max_age_seconds() -> None:
    clock = Clock()
    answers = iter([Listening(frozenset({(TCP, EXT4, n)})) for n in (1, 2, 3)])
    asked: list[float] = []

    def diag() -> Listening:
        asked.append(clock.now)
        return next(answers)

    cache = ListeningSockets(clock, max_age=0.5, diag=diag)
    assert cache.current().covers(TCP, EXT4, 1)
    clock.now += 0.49
    assert cache.current().covers(TCP, EXT4, 1)
    clock.now += 0.01
    assert cache.current().covers(TCP, EXT4, 2)
    assert cache.current().covers(TCP, EXT4, 2)
    assert asked == [100.0, 100.5]


def test_without_sock_diag_the_proc_tables_are_read(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    tried: list[str] = []

    def diag() -> Listening:
        tried.append("diag")
        raise OSError(93, "Protocol not supported")

    def proc() -> Listening:
        tried.append("proc")
        return Listening(frozenset({(UDP, EXT4, 69)}))

    cache = ListeningSockets(clock, max_age=0.5, diag=diag, proc=proc)
    with caplog.at_level(logging.WARNING, logger="pinhole.listening"):
        assert cache.current().covers(UDP, EXT4, 69)
        clock.now += 1
        assert cache.current().covers(UDP, EXT4, 69)
    assert tried == ["diag", "proc", "proc"]  # sock_diag is not asked again
    assert [r.getMessage() for r in caplog.records if "sock_diag is unavailable" in r.getMessage()] \
        != [] and len(caplog.records) == 1
