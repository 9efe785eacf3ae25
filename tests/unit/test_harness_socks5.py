"""testbed.socks5: the harness's SOCKS5 client messages, checked against byte strings
written out by hand from RFC 1928 and RFC 1929 (never against the enforcer's codec)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from socksio import ProtocolError, SOCKSError

from testbed import socks5


def test_the_greeting_offers_the_one_method_it_will_use() -> None:
    assert socks5.greeting("alice") == b"\x05\x01\x02"  # VER, NMETHODS, username/password
    assert socks5.greeting(None) == b"\x05\x01\x00"  # no authentication required


@pytest.mark.parametrize(("answer", "user"), [(b"\x05\x02", "alice"), (b"\x05\x00", None)])
def test_the_method_offered_is_accepted(answer: bytes, user: str | None) -> None:
    socks5.check_method(answer, user)


@pytest.mark.parametrize(("answer", "user", "error", "match"), [
    (b"\x05\xff", "alice", SOCKSError, "none of the methods offered"),
    (b"\x05\x00", "alice", ProtocolError, "chose NO_AUTH_REQUIRED, which was not offered"),
    (b"\x05\x02", None, ProtocolError, "chose USERNAME_PASSWORD, which was not offered"),
    (b"\x04\x02", "alice", ProtocolError, "not SOCKS version 5"),
    (b"\x05\x80", "alice", ProtocolError, "Malformed"),  # a private method, never offered
    (b"\x05", "alice", ProtocolError, "not SOCKS version 5|Malformed"),
])
def test_a_method_not_offered_is_refused(answer: bytes, user: str | None, error: type[Exception],
                                         match: str) -> None:
    with pytest.raises(error, match=match):
        socks5.check_method(answer, user)


def test_the_login_is_rfc_1929s() -> None:
    assert socks5.login("alice", "s3cret") == b"\x01\x05alice\x06s3cret"
    assert socks5.login("u", "p" * 255) == b"\x01\x01u\xff" + b"p" * 255
    for user, password in (("", "x"), ("alice", ""), ("a" * 256, "x"), ("alice", "p" * 256)):
        with pytest.raises(ValueError, match="1 to 255 bytes"):
            socks5.login(user, password)


def test_only_status_zero_of_version_one_is_a_success() -> None:
    socks5.check_login(b"\x01\x00")
    for answer in (b"\x01\x01", b"\x05\x00", b"\x01\xff", b"\x01"):
        with pytest.raises(SOCKSError, match="login failed"):
            socks5.check_login(answer)


@pytest.mark.parametrize(("command", "host", "port", "wire"), [
    ("connect", "192.0.2.1", 21, b"\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x15"),
    ("bind", "0.0.0.0", 0, b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"),
    ("udp", "::", 0, b"\x05\x03\x00\x04" + bytes(16) + b"\x00\x00"),
    ("connect", "2001:db8::21", 65535, b"\x05\x01\x00\x04\x20\x01\x0d\xb8" + bytes(11) + b"\x21\xff\xff"),
    ("connect", "server.example", 80, b"\x05\x01\x00\x03\x0eserver.example\x00\x50"),
])
def test_requests(command: str, host: str, port: int, wire: bytes) -> None:
    assert socks5.request(command, host, port) == wire


@pytest.mark.parametrize(("wire", "expected"), [
    (b"\x05\x00\x00\x01\xc0\x00\x02\x01\x9c\x41", (0, "SUCCEEDED", "192.0.2.1", 40001)),
    (b"\x05\x02\x00\x01" + bytes(6), (2, "CONNECTION_NOT_ALLOWED_BY_RULESET", "0.0.0.0", 0)),
    (b"\x05\x06\x00\x04\x20\x01\x0d\xb8" + bytes(11) + b"\x01\x00\x16",
     (6, "TTL_EXPIRED", "2001:db8::1", 22)),
    (b"\x05\x01\x00\x03\x02fw\x04\x00", (1, "GENERAL_SERVER_FAILURE", "fw", 1024)),
    (b"\x05\x08\x00\x03\x00\x00\x00", (8, "ADDRESS_TYPE_NOT_SUPPORTED", "", 0)),
])
def test_replies_are_framed_and_read(wire: bytes, expected: tuple[int, str, str, int]) -> None:
    assert socks5.reply_size(wire[:socks5.REPLY_HEAD]) == len(wire)
    assert tuple(socks5.parse_reply(wire)) == expected


@pytest.mark.parametrize(("wire", "match"), [
    (b"\x04\x00\x00\x01" + bytes(6), "Malformed"),  # VER 4
    (b"\x05\x00\x01\x01" + bytes(6), "RSV is 0x01"),
    (b"\x05\x09\x00\x01" + bytes(6), "Malformed"),  # REP 9: unassigned
    (b"\x05\x00\x00\x09" + bytes(6), "address type 9"),
    (b"\x05\x00\x00\x01" + bytes(5), "of 9 bytes"),  # the port cut short
    (b"\x05\x00\x00\x01" + bytes(7), "of 11 bytes"),  # a byte too many
    (b"\x05\x00\x00\x04" + bytes(6), "of 10 bytes"),  # an IPv6 reply as long as an IPv4 one
    (b"\x05\x00", "of 2 bytes"),
])
def test_a_malformed_reply_is_refused(wire: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        socks5.parse_reply(wire)


@pytest.mark.parametrize(("host", "port", "wire"), [
    ("198.51.100.21", 53, b"\x00\x00\x00\x01\xc6\x33\x64\x15\x00\x35"),
    ("2001:db8::53", 5353, b"\x00\x00\x00\x04\x20\x01\x0d\xb8" + bytes(10) + b"\x00\x53\x14\xe9"),
])
def test_relay_datagrams_carry_rfc_1928s_header(host: str, port: int, wire: bytes) -> None:
    assert socks5.datagram(host, port, b"query") == wire + b"query"
    assert socks5.parse_datagram(wire + b"answer") == (host, port, b"answer")
    assert socks5.parse_datagram(wire) == (host, port, b"")


def test_a_relayed_datagram_may_name_its_source() -> None:
    assert socks5.parse_datagram(b"\x00\x00\x00\x03\x02s1\x00\x35data") == ("s1", 53, b"data")


@pytest.mark.parametrize(("wire", "match"), [
    (b"\x00\x01\x00\x01\xc6\x33\x64\x15\x00\x35", "RSV is 0001"),
    (b"\x00\x00\x01\x01\xc6\x33\x64\x15\x00\x35", "fragment 1"),
    (b"\x00\x00\x00\x02\xc6\x33\x64\x15\x00\x35", "address type 2"),
    (b"\x00\x00\x00\x01\xc6\x33\x64\x15\x00", "cut short"),
    (b"\x00\x00\x00\x04" + bytes(17), "cut short"),
    (b"\x00\x00\x00\x03\x05s1\x00\x35", "cut short"),
    (b"\x00\x00\x00\x01", "no header"),
])
def test_a_malformed_relayed_datagram_is_refused(wire: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        socks5.parse_datagram(wire)


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(0, 65535), st.binary())
def test_a_datagram_reads_back_as_written(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                          port: int, data: bytes) -> None:
    wire = socks5.datagram(str(ip), port, data)
    assert wire[:4] == bytes([0, 0, 0, 1 if ip.version == 4 else 4])
    assert wire[4:4 + len(ip.packed)] == ip.packed
    host, got_port, body = socks5.parse_datagram(wire)
    assert (ipaddress.ip_address(host), got_port, body) == (ip, port, data)
