"""enforcer.core.socks: the sans-I/O SOCKS5 server handshake, replies, and the UDP relay header.

The byte layouts are written out here from RFC 1928 and RFC 1929 rather than taken from the
module's own builders, so an encoding mistake cannot hide behind its mirror image. The fuzz
tests compare the handshake, fed in random fragments, with ``reference``: a plain
whole-stream reading of the same RFC rules, so that any difference (an event too many,
a request read from malformed bytes, an error with the wrong reply) is a failure.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import struct
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.core.socks import (
    BIND,
    CONNECT,
    MAX_MESSAGE,
    NO_AUTH,
    UDP_ASSOCIATE,
    USERPASS,
    Authenticated,
    Close,
    Event,
    Payload,
    Reply,
    Request,
    RequestReceived,
    Send,
    ServerHandshake,
    SocksError,
    UdpAssociation,
    build_udp,
    client_auth,
    client_greeting,
    client_request,
    parse_reply,
    parse_udp,
    reply,
)

USER, PASSWORD = "alice", "s3cret"


def accept_alice(user: str, password: str) -> bool:
    return (user, password) == (USER, PASSWORD)


def never_called(user: str, password: str) -> bool:
    raise AssertionError(f"check called for {user!r} without username/password negotiation")


# Wire bytes, written out from the RFCs.
GREET_NO_AUTH = b"\x05\x01\x00"  # VER 5, NMETHODS 1, METHODS [0]
GREET_USERPASS = b"\x05\x01\x02"  # VER 5, NMETHODS 1, METHODS [2]
AUTH_ALICE = b"\x01\x05alice\x06s3cret"  # VER 1, ULEN, UNAME, PLEN, PASSWD
CONNECT_V4 = b"\x05\x01\x00\x01\x5d\xb8\xd8\x22\x01\xbb"  # CONNECT 93.184.216.34:443
CONNECT_V4_REQUEST = Request(CONNECT, "93.184.216.34", 443, 1)
SELECT_NO_AUTH = Send(b"\x05\x00")
SELECT_USERPASS = Send(b"\x05\x02")
AUTH_OK = Send(b"\x01\x00")
AUTH_REFUSED = Send(b"\x01\x01")
NO_METHOD = Send(b"\x05\xff")


def bytewise(handshake: ServerHandshake, data: bytes) -> list[tuple[int, Event]]:
    """Feed ``data`` one byte at a time; each event with the index of the byte that produced it."""
    return [(i, event) for i in range(len(data)) for event in handshake.feed(data[i : i + 1])]


def merged(events: Iterable[object]) -> list[object]:
    """``events`` with adjacent payloads joined (how payload is cut depends on how it was fed)."""
    out: list[object] = []
    for event in events:
        if isinstance(event, Payload) and out and isinstance(out[-1], Payload):
            out[-1] = Payload(out[-1].data + event.data)
        else:
            out.append(event)
    return out


# --- happy paths --------------------------------------------------------------------------------


def test_no_auth_handshake() -> None:
    hs = ServerHandshake(require_auth=False, check=never_called)
    assert hs.feed(GREET_NO_AUTH) == [Authenticated(None), SELECT_NO_AUTH]
    assert not hs.done
    assert hs.feed(CONNECT_V4) == [RequestReceived(CONNECT_V4_REQUEST)]
    assert hs.done and not hs.closed
    assert hs.user is None
    assert hs.request == CONNECT_V4_REQUEST


def test_userpass_handshake() -> None:
    calls: list[tuple[str, str]] = []

    def check(user: str, password: str) -> bool:
        calls.append((user, password))
        return True

    hs = ServerHandshake(require_auth=True, check=check)
    assert hs.feed(GREET_USERPASS) == [SELECT_USERPASS]
    assert calls == []
    assert hs.feed(AUTH_ALICE) == [Authenticated(USER), AUTH_OK]
    assert calls == [(USER, PASSWORD)]
    assert hs.user == USER
    assert hs.feed(CONNECT_V4) == [RequestReceived(CONNECT_V4_REQUEST)]
    assert hs.done


def test_userpass_names_are_utf8() -> None:
    seen: list[tuple[str, str]] = []
    hs = ServerHandshake(True, lambda u, p: seen.append((u, p)) is None)
    hs.feed(GREET_USERPASS)
    user, password = "zoë", "пароль"
    raw_user, raw_password = user.encode(), password.encode()
    wire = bytes([1, len(raw_user)]) + raw_user + bytes([len(raw_password)]) + raw_password
    assert hs.feed(wire) == [Authenticated(user), AUTH_OK]
    assert seen == [(user, password)]


def test_empty_password_is_left_to_check() -> None:
    seen: list[tuple[str, str]] = []
    hs = ServerHandshake(True, lambda u, p: seen.append((u, p)) is None)
    hs.feed(GREET_USERPASS)
    assert hs.feed(b"\x01\x03bob\x00") == [Authenticated("bob"), AUTH_OK]
    assert seen == [("bob", "")]


@pytest.mark.parametrize("verdict", [False, None, 1, "yes"], ids=repr)
def test_only_true_from_check_accepts(verdict: object) -> None:
    hs = ServerHandshake(True, lambda u, p: verdict)  # type: ignore[arg-type, return-value]
    hs.feed(GREET_USERPASS)
    assert hs.feed(AUTH_ALICE + CONNECT_V4) == [AUTH_REFUSED, Close()]
    assert hs.closed and hs.user is None and hs.request is None
    assert hs.feed(CONNECT_V4) == []


@pytest.mark.parametrize(("require_auth", "stream", "refusal"), [
    (True, GREET_USERPASS + AUTH_ALICE + CONNECT_V4, b"\x01\x01"),
    (False, GREET_NO_AUTH + CONNECT_V4, b"\x05\xff"),
], ids=["login", "no-auth"])
def test_a_service_that_refuses_the_client_sends_no_success(require_auth: bool, stream: bytes,
                                                          refusal: bytes) -> None:
    """Authenticated comes before the reply that lets the client in: a service that will
    not have the client (a cap) stops there and sends refuse()'s bytes, a failure."""
    hs = ServerHandshake(require_auth, accept_alice)
    events = hs.feed(stream)
    at = next(i for i, e in enumerate(events) if isinstance(e, Authenticated))
    sent_before = b"".join(e.data for e in events[:at] if isinstance(e, Send))
    assert sent_before in (b"", bytes(SELECT_USERPASS.data))
    assert events[at + 1] in (AUTH_OK, SELECT_NO_AUTH), "the success follows Authenticated"
    assert hs.refuse() == refusal
    assert hs.closed and hs.buffered == 0 and hs.feed(b"more") == []


def test_wrong_password_refused_and_nothing_after() -> None:
    hs = ServerHandshake(True, accept_alice)
    hs.feed(GREET_USERPASS)
    assert hs.feed(b"\x01\x05alice\x05wrong" + CONNECT_V4 + b"data") == [AUTH_REFUSED, Close()]
    assert hs.closed
    assert hs.buffered == 0
    assert hs.feed(CONNECT_V4) == []
    assert hs.feed(b"") == []


def test_check_exception_propagates_and_closes() -> None:
    def broken(user: str, password: str) -> bool:
        raise RuntimeError("backend down")

    hs = ServerHandshake(True, broken)
    hs.feed(GREET_USERPASS)
    with pytest.raises(RuntimeError, match="backend down"):
        hs.feed(AUTH_ALICE)
    assert hs.closed
    assert hs.feed(CONNECT_V4) == []


# --- method selection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("require_auth", "methods", "expected"),
    [
        (False, [NO_AUTH], [Authenticated(None), SELECT_NO_AUTH]),
        (False, [USERPASS, 1, NO_AUTH], [Authenticated(None), SELECT_NO_AUTH]),
        (True, [NO_AUTH, USERPASS], [SELECT_USERPASS]),
        (True, [0x80, USERPASS, 0xFE], [SELECT_USERPASS]),
        (False, [USERPASS], [NO_METHOD, Close()]),
        (True, [NO_AUTH], [NO_METHOD, Close()]),
        (True, [1], [NO_METHOD, Close()]),  # GSSAPI only
        (False, [1, 3, 0xFF], [NO_METHOD, Close()]),
        (False, list(range(1, 256)), [NO_METHOD, Close()]),
        (False, list(range(255)), [Authenticated(None), SELECT_NO_AUTH]),
    ],
)
def test_method_selection(require_auth: bool, methods: list[int], expected: list[Event]) -> None:
    hs = ServerHandshake(require_auth, never_called)
    assert hs.feed(bytes([5, len(methods), *methods])) == expected
    assert hs.closed == (Close() in expected)
    if hs.closed:
        assert hs.feed(GREET_NO_AUTH + CONNECT_V4) == []
    assert hs.user is None and hs.request is None


def test_request_pipelined_behind_refused_greeting_is_ignored() -> None:
    hs = ServerHandshake(True, never_called)
    assert hs.feed(GREET_NO_AUTH + CONNECT_V4 + b"data") == [NO_METHOD, Close()]
    assert hs.request is None and hs.buffered == 0


def test_userpass_chosen_then_request_bytes_are_not_auth() -> None:
    hs = ServerHandshake(True, never_called)
    with pytest.raises(SocksError) as caught:
        hs.feed(GREET_USERPASS + CONNECT_V4)
    assert caught.value.auth_failure and caught.value.reply is None
    assert caught.value.events == (SELECT_USERPASS,)


# --- fragmentation and pipelining ---------------------------------------------------------------


def test_no_auth_byte_at_a_time() -> None:
    hs = ServerHandshake(False, never_called)
    stream = GREET_NO_AUTH + CONNECT_V4
    greeting_end, request_end = len(GREET_NO_AUTH) - 1, len(stream) - 1
    assert bytewise(hs, stream) == [
        (greeting_end, Authenticated(None)),
        (greeting_end, SELECT_NO_AUTH),
        (request_end, RequestReceived(CONNECT_V4_REQUEST)),
    ]


def test_userpass_domain_byte_at_a_time() -> None:
    hs = ServerHandshake(True, accept_alice)
    request = b"\x05\x01\x00\x03\x0bexample.com\x00\x50"
    stream = GREET_USERPASS + AUTH_ALICE + request + b"GET"
    ends = [len(GREET_USERPASS) - 1, len(GREET_USERPASS + AUTH_ALICE) - 1, len(stream) - 4]
    assert bytewise(hs, stream) == [
        (ends[0], SELECT_USERPASS),
        (ends[1], Authenticated(USER)),
        (ends[1], AUTH_OK),
        (ends[2], RequestReceived(Request(CONNECT, "example.com", 80, 3))),
        (ends[2] + 1, Payload(b"G")),
        (ends[2] + 2, Payload(b"E")),
        (ends[2] + 3, Payload(b"T")),
    ]


def test_everything_pipelined_in_one_chunk() -> None:
    hs = ServerHandshake(True, accept_alice)
    events = hs.feed(GREET_USERPASS + AUTH_ALICE + CONNECT_V4 + b"GET / HTTP/1.1\r\n")
    assert events == [
        SELECT_USERPASS,
        Authenticated(USER),
        AUTH_OK,
        RequestReceived(CONNECT_V4_REQUEST),
        Payload(b"GET / HTTP/1.1\r\n"),
    ]
    assert type(events[-1].data) is bytes  # type: ignore[union-attr]
    assert hs.buffered == 0


def test_after_request_everything_is_payload() -> None:
    hs = ServerHandshake(False, never_called)
    assert hs.feed(GREET_NO_AUTH + CONNECT_V4) == [
        Authenticated(None),
        SELECT_NO_AUTH,
        RequestReceived(CONNECT_V4_REQUEST),
    ]
    assert hs.feed(b"") == []
    # Even bytes that would be a malformed SOCKS message are only payload now.
    assert hs.feed(b"\x04\x00\xff") == [Payload(b"\x04\x00\xff")]
    assert hs.feed(bytearray(b"more")) == [Payload(b"more")]
    assert hs.request == CONNECT_V4_REQUEST


@pytest.mark.parametrize("split", range(1, len(GREET_USERPASS + AUTH_ALICE + CONNECT_V4)))
def test_any_two_fragments(split: int) -> None:
    stream = GREET_USERPASS + AUTH_ALICE + CONNECT_V4 + b"xy"
    hs = ServerHandshake(True, accept_alice)
    events = hs.feed(stream[:split]) + hs.feed(stream[split:])
    assert merged(events) == [
        SELECT_USERPASS,
        Authenticated(USER),
        AUTH_OK,
        RequestReceived(CONNECT_V4_REQUEST),
        Payload(b"xy"),
    ]


def test_buffer_holds_at_most_one_message() -> None:
    user, password = "u" * 255, "p" * 255
    hs = ServerHandshake(True, lambda u, p: (u, p) == (user, password))
    stream = GREET_USERPASS + bytes([1, 255]) + user.encode() + bytes([255]) + password.encode()
    high = 0
    for i in range(len(stream)):
        hs.feed(stream[i : i + 1])
        high = max(high, hs.buffered)
    assert hs.user == user
    assert high == MAX_MESSAGE - 1  # the whole sub-negotiation but its last byte
    assert hs.buffered == 0


# --- requests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x16", Request(CONNECT, "10.0.0.1", 22, 1)),
        (b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00", Request(UDP_ASSOCIATE, "0.0.0.0", 0, 1)),
        (b"\x05\x02\x00\x01\xff\xff\xff\xff\xff\xff", Request(BIND, "255.255.255.255", 65535, 1)),
        (
            b"\x05\x01\x00\x04" + bytes.fromhex("20010db8000000000000000000000001") + b"\x01\xbb",
            Request(CONNECT, "2001:db8::1", 443, 4),
        ),
        (
            b"\x05\x03\x00\x04" + bytes.fromhex("00000000000000000000ffffc0000201") + b"\x00\x35",
            Request(UDP_ASSOCIATE, "::ffff:192.0.2.1", 53, 4),
        ),
        (b"\x05\x01\x00\x03\x0bExample.COM\x01\xbb", Request(CONNECT, "Example.COM", 443, 3)),
        (b"\x05\x01\x00\x03\x07192.0.2\x00\x50", Request(CONNECT, "192.0.2", 80, 3)),
        (b"\x05\x01\x00\x03\x09192.0.2.1\x00\x50", Request(CONNECT, "192.0.2.1", 80, 3)),
        (b"\x05\x01\x00\x03\x0e_srv._tcp.a-b.\x00\x50", Request(CONNECT, "_srv._tcp.a-b.", 80, 3)),
        (b"\x05\x01\x00\x03\x01x\x00\x01", Request(CONNECT, "x", 1, 3)),
        (b"\x05\x01\x00\x03\xff" + b"a" * 255 + b"\x00\x50", Request(CONNECT, "a" * 255, 80, 3)),
    ],
    ids=lambda value: value.host[:20] if isinstance(value, Request) else "",
)
def test_request_addresses(wire: bytes, expected: Request) -> None:
    hs = ServerHandshake(False, never_called)
    hs.feed(GREET_NO_AUTH)
    assert hs.feed(wire) == [RequestReceived(expected)]
    other = ServerHandshake(False, never_called)
    assert [event for _, event in bytewise(other, GREET_NO_AUTH + wire)][2:] == [RequestReceived(expected)]


def test_request_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        CONNECT_V4_REQUEST.port = 1  # type: ignore[misc]


# --- errors -------------------------------------------------------------------------------------

GF, CNS, ATNS, HU = (
    Reply.GENERAL_FAILURE,
    Reply.COMMAND_NOT_SUPPORTED,
    Reply.ADDRESS_TYPE_NOT_SUPPORTED,
    Reply.HOST_UNREACHABLE,
)
NO_AUTH_DONE = [Authenticated(None), SELECT_NO_AUTH]
USERPASS_DONE = [SELECT_USERPASS, Authenticated(USER), AUTH_OK]

# (require_auth, valid prefix, events the prefix produces, bad bytes ending at the byte that shows
#  the fault, expected reply, expected auth_failure, a word the message must contain)
ERRORS = {
    "greeting-socks4": (False, b"", [], b"\x04", None, False, "version 4"),
    "greeting-http": (False, b"", [], b"G", None, False, "version 71"),
    "greeting-zero": (True, b"", [], b"\x00", None, False, "version 0"),
    "greeting-no-methods": (False, b"", [], b"\x05\x00", None, False, "NMETHODS"),
    "auth-version-5": (True, GREET_USERPASS, [SELECT_USERPASS], b"\x05", None, True, "version 5"),
    "auth-version-0": (True, GREET_USERPASS, [SELECT_USERPASS], b"\x00", None, True, "version 0"),
    "auth-empty-user": (True, GREET_USERPASS, [SELECT_USERPASS], b"\x01\x00", None, True, "empty username"),
    "auth-user-not-utf8": (True, GREET_USERPASS, [SELECT_USERPASS], b"\x01\x01\xff\x00", None, True, "UTF-8"),
    "auth-pass-not-utf8": (
        True,
        GREET_USERPASS,
        [SELECT_USERPASS],
        b"\x01\x01a\x01\xc3",
        None,
        True,
        "UTF-8",
    ),
    "request-version-4": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x04", GF, False, "version 4"),
    "request-version-1": (True, GREET_USERPASS + AUTH_ALICE, USERPASS_DONE, b"\x01", GF, False, "version 1"),
    "command-0": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x00", CNS, False, "command 0"),
    "command-4": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x04", CNS, False, "command 4"),
    "command-255": (True, GREET_USERPASS + AUTH_ALICE, USERPASS_DONE, b"\x05\xff", CNS, False, "command 255"),
    "reserved-1": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x01\x01", GF, False, "reserved"),
    "reserved-128": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x03\x80", GF, False, "reserved"),
    "atyp-0": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x01\x00\x00", ATNS, False, "address type 0"),
    "atyp-2": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x01\x00\x02", ATNS, False, "address type 2"),
    "atyp-5": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x02\x00\x05", ATNS, False, "address type 5"),
    "atyp-255": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x01\x00\xff", ATNS, False, "address type 255"),
    "domain-empty": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x01\x00\x03\x00", GF, False, "empty domain"),
    "domain-space": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x01\x00\x03\x03a b", HU, False, "domain"),
    "domain-nul": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x01\x00\x03\x03a\x00b", HU, False, "domain"),
    "domain-slash": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x01\x00\x03\x03a/b", HU, False, "domain"),
    "domain-utf8": (False, GREET_NO_AUTH, NO_AUTH_DONE, b"\x05\x01\x00\x03\x02\xc3\xa9", HU, False, "domain"),
    "domain-brackets": (
        False,
        GREET_NO_AUTH,
        NO_AUTH_DONE,
        b"\x05\x01\x00\x03\x05[::1]",
        HU,
        False,
        "domain",
    ),
}


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_error_in_one_chunk(case: tuple[bool, bytes, list[Event], bytes, Reply | None, bool, str]) -> None:
    require_auth, prefix, prior, bad, expected_reply, auth_failure, word = case
    hs = ServerHandshake(require_auth, accept_alice)
    with pytest.raises(SocksError, match=re.escape(word)) as caught:
        hs.feed(prefix + bad + CONNECT_V4)
    error = caught.value
    assert error.reply == expected_reply
    assert error.auth_failure is auth_failure
    assert list(error.events) == prior
    assert hs.closed and hs.request is None and hs.buffered == 0
    assert hs.feed(GREET_NO_AUTH + CONNECT_V4) == []


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_error_found_at_its_byte(
    case: tuple[bool, bytes, list[Event], bytes, Reply | None, bool, str],
) -> None:
    require_auth, prefix, prior, bad, expected_reply, auth_failure, _ = case
    hs = ServerHandshake(require_auth, accept_alice)
    stream = prefix + bad
    assert [event for _, event in bytewise(hs, stream[:-1])] == prior
    with pytest.raises(SocksError) as caught:
        hs.feed(stream[-1:])
    assert caught.value.events == ()
    assert caught.value.reply == expected_reply
    assert caught.value.auth_failure is auth_failure
    assert hs.feed(b"\x05") == []


@pytest.mark.parametrize(
    ("error", "response"),
    [
        (SocksError("x", Reply.COMMAND_NOT_SUPPORTED), b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"),
        (SocksError("x", Reply.GENERAL_FAILURE), b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"),
        (SocksError("x", auth_failure=True), b"\x01\x01"),
        (SocksError("x"), b""),
    ],
)
def test_error_response(error: SocksError, response: bytes) -> None:
    assert error.response() == response
    assert str(error) == "x"


def test_error_from_feed_carries_its_response() -> None:
    hs = ServerHandshake(False, never_called)
    with pytest.raises(SocksError) as caught:
        hs.feed(GREET_NO_AUTH + b"\x05\x01\x00\x06")
    assert caught.value.response() == b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00"


# --- replies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "address", "port", "wire"),
    [
        (Reply.SUCCEEDED, "192.0.2.7", 0x1F90, b"\x05\x00\x00\x01\xc0\x00\x02\x07\x1f\x90"),
        (Reply.NOT_ALLOWED, "0.0.0.0", 0, b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"),
        (Reply.TTL_EXPIRED, "255.255.255.255", 65535, b"\x05\x06\x00\x01\xff\xff\xff\xff\xff\xff"),
        (
            Reply.SUCCEEDED,
            "2001:db8::2",
            443,
            b"\x05\x00\x00\x04" + bytes.fromhex("20010db8000000000000000000000002") + b"\x01\xbb",
        ),
        (Reply.CONNECTION_REFUSED, "::", 0, b"\x05\x05\x00\x04" + bytes(16) + b"\x00\x00"),
    ],
)
def test_reply_encoding(code: Reply, address: str, port: int, wire: bytes) -> None:
    assert reply(code, address, port) == wire
    assert parse_reply(wire + b"tail") == (code, address, port, len(wire))
    for cut in range(len(wire)):
        assert parse_reply(wire[:cut]) is None


def test_every_reply_code_round_trips() -> None:
    for code in Reply:
        wire = reply(code, "10.1.2.3", 1080)
        assert wire[1] == code.value
        assert parse_reply(wire) == (code, "10.1.2.3", 1080, 10)
    assert reply(3, "10.1.2.3", 1)[1] == 3  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "address", "port"),
    [
        (Reply.SUCCEEDED, "example.com", 80),
        (Reply.SUCCEEDED, "", 80),
        (Reply.SUCCEEDED, "10.0.0.1", -1),
        (Reply.SUCCEEDED, "10.0.0.1", 65536),
        (9, "10.0.0.1", 80),
        (-1, "10.0.0.1", 80),
    ],
)
def test_reply_refuses_what_it_cannot_encode(code: Reply, address: str, port: int) -> None:
    with pytest.raises(SocksError):
        reply(code, address, port)


def test_parse_reply_domain() -> None:
    assert parse_reply(b"\x05\x00\x00\x03\x04host\x00\x50") == (Reply.SUCCEEDED, "host", 80, 11)


@pytest.mark.parametrize(
    "wire",
    [
        b"\x04\x00\x00\x01\x00\x00\x00\x00\x00\x00",
        b"\x05\x09",
        b"\x05\xff",
        b"\x05\x00\x01",
        b"\x05\x00\x00\x02",
        b"\x05\x00\x00\x03\x00",
        b"\x05\x00\x00\x03\x02\xff\xfe",
    ],
)
def test_parse_reply_errors(wire: bytes) -> None:
    with pytest.raises(SocksError):
        parse_reply(wire)


# --- client helpers -----------------------------------------------------------------------------


def test_client_helpers_bytes() -> None:
    assert client_greeting(None) == GREET_NO_AUTH
    assert client_greeting(USER) == GREET_USERPASS
    assert client_auth(USER, PASSWORD) == AUTH_ALICE
    assert client_auth("é", "") == b"\x01\x02\xc3\xa9\x00"
    assert client_request(CONNECT, "93.184.216.34", 443) == CONNECT_V4
    assert client_request(UDP_ASSOCIATE, "::1", 53) == b"\x05\x03\x00\x04" + bytes(15) + b"\x01\x00\x35"
    assert client_request(BIND, "example.com", 21) == b"\x05\x02\x00\x03\x0bexample.com\x00\x15"
    assert client_request(0x42, "1.2.3.4", 0) == b"\x05\x42\x00\x01\x01\x02\x03\x04\x00\x00"


@pytest.mark.parametrize(
    "call",
    [
        lambda: client_auth("", "pw"),
        lambda: client_auth("u" * 256, "pw"),
        lambda: client_auth("ü" * 128, "pw"),  # 256 bytes in UTF-8
        lambda: client_auth("u", "p" * 256),
        lambda: client_request(CONNECT, "a" * 256, 80),
        lambda: client_request(CONNECT, "", 80),
        lambda: client_request(CONNECT, "bad host", 80),
        lambda: client_request(CONNECT, "exämple.com", 80),
        lambda: client_request(CONNECT, "10.0.0.1", 65536),
        lambda: client_request(CONNECT, "10.0.0.1", -1),
        lambda: client_request(256, "10.0.0.1", 80),
        lambda: client_request(-1, "10.0.0.1", 80),
    ],
)
def test_client_helpers_refuse_bad_arguments(call: Callable[[], bytes]) -> None:
    with pytest.raises(SocksError):
        call()


def test_client_helpers_drive_the_server() -> None:
    hs = ServerHandshake(True, accept_alice)
    events = hs.feed(client_greeting(USER) + client_auth(USER, PASSWORD))
    events += hs.feed(client_request(UDP_ASSOCIATE, "2001:db8::5", 5353))
    assert events == [*USERPASS_DONE, RequestReceived(Request(UDP_ASSOCIATE, "2001:db8::5", 5353, 4))]


# --- UDP relay header ---------------------------------------------------------------------------


def test_build_udp_bytes() -> None:
    assert build_udp("192.0.2.1", 53, b"q") == b"\x00\x00\x00\x01\xc0\x00\x02\x01\x00\x35q"
    assert build_udp("::1", 1, b"") == b"\x00\x00\x00\x04" + bytes(15) + b"\x01\x00\x01"
    assert build_udp("dns.example", 53, b"xy") == b"\x00\x00\x00\x03\x0bdns.example\x00\x35xy"


@pytest.mark.parametrize("host", ["192.0.2.1", "0.0.0.0", "2001:db8::1", "::ffff:10.0.0.1", "a.example"])
@pytest.mark.parametrize("payload", [b"", b"\x00", b"hello" * 300])
def test_udp_round_trip(host: str, payload: bytes) -> None:
    assert parse_udp(build_udp(host, 40000, payload)) == (host, 40000, payload)


@pytest.mark.parametrize(
    ("datagram", "word"),
    [
        (b"", "shorter"),
        (b"\x00\x00\x00", "shorter"),
        (b"\x00\x01\x00\x01\x7f\x00\x00\x01\x00\x35", "reserved"),
        (b"\x01\x00\x00\x01\x7f\x00\x00\x01\x00\x35", "reserved"),
        (b"\x00\x00\x01\x01\x7f\x00\x00\x01\x00\x35data", "fragment"),
        (b"\x00\x00\x80\x01\x7f\x00\x00\x01\x00\x35data", "fragment"),
        (b"\x00\x00\x00\x02\x7f\x00\x00\x01\x00\x35", "address type 2"),
        (b"\x00\x00\x00\x00", "address type 0"),
        (b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00", "ends inside"),
        (b"\x00\x00\x00\x04" + bytes(16), "ends inside"),
        (b"\x00\x00\x00\x03\x05abc", "ends inside"),
        (b"\x00\x00\x00\x03", "ends inside"),
        (b"\x00\x00\x00\x03\x00\x00\x35", "empty domain"),
        (b"\x00\x00\x00\x03\x03a b\x00\x35", "domain"),
    ],
)
def test_parse_udp_errors(datagram: bytes, word: str) -> None:
    with pytest.raises(SocksError, match=re.escape(word)) as caught:
        parse_udp(datagram)
    assert caught.value.reply is None


@pytest.mark.parametrize(("host", "port"), [("bad host", 1), ("", 1), ("10.0.0.1", 70000), ("a" * 256, 1)])
def test_build_udp_refuses_bad_arguments(host: str, port: int) -> None:
    with pytest.raises(SocksError):
        build_udp(host, port, b"")


# --- fuzzing against a whole-stream reference ---------------------------------------------------

_NAME = re.compile(rb"[A-Za-z0-9_.-]+")


class _Short(Exception):
    pass


def reference(stream: bytes, require_auth: bool, check: Callable[[str, str], bool]) -> list[object]:
    """What a server must emit for ``stream``, read straight from RFC 1928/1929 as one buffer.

    Events as ``ServerHandshake`` names them, then ``("error", reply, auth_failure)`` if the
    stream breaks the protocol; it stops where the stream ends.
    """
    out: list[object] = []
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(stream):
            raise _Short
        pos += n
        return stream[pos - n : pos]

    def error(code: Reply | None, auth: bool = False) -> list[object]:
        return [*out, ("error", code, auth)]

    try:
        if take(1) != b"\x05":
            return error(None)
        count = take(1)[0]
        if count == 0:
            return error(None)
        methods = take(count)
        if require_auth and USERPASS in methods:
            out.append(Send(b"\x05\x02"))
            if take(1) != b"\x01":
                return error(None, True)
            ulen = take(1)[0]
            if ulen == 0:
                return error(None, True)
            raw_user = take(ulen)
            raw_password = take(take(1)[0])
            try:
                user, password = raw_user.decode("utf-8"), raw_password.decode("utf-8")
            except UnicodeDecodeError:
                return error(None, True)
            if check(user, password) is not True:
                return [*out, Send(b"\x01\x01"), Close()]
            out += [Authenticated(user), Send(b"\x01\x00")]
        elif not require_auth and NO_AUTH in methods:
            out += [Authenticated(None), Send(b"\x05\x00")]
        else:
            return [*out, Send(b"\x05\xff"), Close()]
        if take(1) != b"\x05":
            return error(Reply.GENERAL_FAILURE)
        command = take(1)[0]
        if command not in (CONNECT, BIND, UDP_ASSOCIATE):
            return error(Reply.COMMAND_NOT_SUPPORTED)
        if take(1) != b"\x00":
            return error(Reply.GENERAL_FAILURE)
        atyp = take(1)[0]
        if atyp == 1:
            host = str(ipaddress.IPv4Address(take(4)))
        elif atyp == 4:
            v6 = ipaddress.IPv6Address(take(16))
            host = f"::ffff:{v6.ipv4_mapped}" if v6.ipv4_mapped else v6.compressed
        elif atyp == 3:
            length = take(1)[0]
            if length == 0:
                return error(Reply.GENERAL_FAILURE)
            name = take(length)
            if not _NAME.fullmatch(name):
                return error(Reply.HOST_UNREACHABLE)
            host = name.decode()
        else:
            return error(Reply.ADDRESS_TYPE_NOT_SUPPORTED)
        (port,) = struct.unpack("!H", take(2))
        out.append(RequestReceived(Request(command, host, port, atyp)))
        if pos < len(stream):
            out.append(Payload(stream[pos:]))
    except _Short:
        pass
    return out


def fuzz_check(user: str, password: str) -> bool:
    return (user, password) == ("alice", "pw")


def run(stream: bytes, require_auth: bool, cuts: list[int]) -> list[object]:
    """Feed ``stream`` in pieces of the sizes ``cuts`` (cycled; 0 is an empty feed) and return what came
    out, checking the handshake's invariants after every piece."""
    hs = ServerHandshake(require_auth, fuzz_check)
    out: list[object] = []
    pos, i = 0, 0
    failed = False
    while pos < len(stream):
        size = cuts[i % len(cuts)] if cuts else len(stream)
        chunk, pos, i = stream[pos : pos + size], pos + size, i + 1
        try:
            events = hs.feed(chunk)
        except SocksError as e:
            assert not failed and not hs.done
            out += [*e.events, ("error", e.reply, e.auth_failure)]
            assert hs.closed
            failed = True
            continue
        if failed or Close() in out:
            assert events == [], "events after Close or an error"
        assert all(event.data for event in events if isinstance(event, Send | Payload)), "empty data"
        out += events
        assert hs.buffered <= MAX_MESSAGE
        assert hs.done == any(isinstance(event, RequestReceived) for event in out)
        assert hs.closed == (failed or Close() in out)
    return merged(out)


@st.composite
def handshakes(draw: st.DrawFn) -> tuple[bool, bytes]:
    """A handshake near enough to valid to get deep into the parser: usually coherent (the
    method the server wants, credentials iff it wants them), sometimes not, then perhaps a
    byte or two changed and the end cut off."""
    require_auth = draw(st.booleans())
    coherent = draw(st.integers(0, 3)) > 0
    wanted = USERPASS if require_auth else NO_AUTH
    methods = draw(st.lists(st.sampled_from([NO_AUTH, USERPASS, 1, 0xFF]), max_size=4))
    if coherent:
        methods.insert(draw(st.integers(0, len(methods))), wanted)
    stream = bytes([5, len(methods), *methods])
    if require_auth if coherent else draw(st.booleans()):
        user = draw(st.sampled_from([b"alice", b"alice", b"bob", b"\xc3\xa9", b"\xff", b""]))
        password = draw(st.sampled_from([b"pw", b"pw", b"", b"nope", b"\xc3"]))
        stream += bytes([1, len(user)]) + user + bytes([len(password)]) + password
    command = draw(st.sampled_from([CONNECT, BIND, UDP_ASSOCIATE, 0, 4]))
    atyp = draw(st.sampled_from([1, 3, 4, 3, 0, 2]))
    if atyp == 3:
        name = draw(st.text(alphabet="ab9.-_ /é\x00", max_size=12)).encode()
        address = bytes([len(name)]) + name
    else:
        address = draw(st.binary(min_size=4, max_size=16))
    stream += bytes([5, command, 0, atyp]) + address + draw(st.binary(min_size=2, max_size=2))
    stream += draw(st.binary(max_size=8))
    mutable = bytearray(stream)
    for index, value in draw(
        st.lists(st.tuples(st.integers(0, len(stream) - 1), st.integers(0, 255)), max_size=2)
    ):
        mutable[index] = value
    if draw(st.booleans()):
        del mutable[draw(st.integers(0, len(mutable))) :]
    return require_auth, bytes(mutable)


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CUTS = st.lists(st.integers(0, 9), max_size=12).filter(lambda cuts: not cuts or any(cuts))


@FUZZ
@given(stream=st.binary(max_size=700), require_auth=st.booleans(), cuts=CUTS)
def test_fuzz_random_bytes(stream: bytes, require_auth: bool, cuts: list[int]) -> None:
    ours = run(stream, require_auth, cuts)
    expected = reference(stream, require_auth, fuzz_check)
    assert any(isinstance(e, RequestReceived) for e in ours) == any(
        isinstance(e, RequestReceived) for e in expected
    )
    assert ours == expected


@FUZZ
@given(case=handshakes(), cuts=CUTS)
def test_fuzz_near_valid_handshakes(case: tuple[bool, bytes], cuts: list[int]) -> None:
    require_auth, stream = case
    ours = run(stream, require_auth, cuts)
    expected = reference(stream, require_auth, fuzz_check)
    assert any(isinstance(e, RequestReceived) for e in ours) == any(
        isinstance(e, RequestReceived) for e in expected
    )
    assert ours == expected
    assert run(stream, require_auth, []) == expected  # one chunk
    assert run(stream, require_auth, [1]) == expected  # one byte at a time
    for end in range(len(stream)):  # every fault is found as soon as its byte is in
        assert run(stream[:end], require_auth, []) == reference(stream[:end], require_auth, fuzz_check)


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    """Random bytes, or a relay header near enough to valid, with a byte or two changed."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=64))
    atyp = draw(st.sampled_from([1, 3, 4, 3, 0, 2]))
    if atyp == 3:
        name = draw(st.text(alphabet="ab9.-_ /\x00", max_size=12)).encode()
        address = bytes([len(name)]) + name
    else:
        address = draw(st.binary(min_size=4, max_size=16))
    datagram = bytearray(bytes([0, 0, 0, atyp]) + address + draw(st.binary(min_size=2, max_size=12)))
    for index, value in draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 255)), max_size=2)):
        datagram[index] = value
    return bytes(datagram)


@FUZZ
@given(datagram=datagrams())
def test_fuzz_parse_udp(datagram: bytes) -> None:
    try:
        host, port, payload = parse_udp(datagram)
    except SocksError as e:
        assert e.reply is None
        return
    assert datagram[:3] == b"\x00\x00\x00"  # RSV 0, FRAG 0
    rebuilt = build_udp(host, port, payload)
    assert parse_udp(rebuilt) == (host, port, payload)
    if datagram[3] != 3:  # a domain name that reads as an address is rebuilt as an address
        assert rebuilt == datagram


@FUZZ
@given(data=st.binary(max_size=40))
def test_fuzz_parse_reply(data: bytes) -> None:
    try:
        parsed = parse_reply(data)
    except SocksError:
        return
    if parsed is None:
        return
    code, address, port, used = parsed
    assert used <= len(data)
    if data[3] != 3:
        assert reply(code, address, port) == data[:used]


# --- UDP ASSOCIATE: whose datagrams, which replies (FWC-02, FWC-03) -----------------------------

CLIENT = ipaddress.ip_address("192.0.2.11")
NEIGHBOUR = ipaddress.ip_address("192.0.2.12")
TARGET = ipaddress.ip_address("198.51.100.21")


@pytest.mark.parametrize("requested", ["0.0.0.0", "::", "192.0.2.11"])
def test_an_association_is_for_the_endpoint_the_client_named(requested: str) -> None:
    """DST.ADDR and DST.PORT name the endpoint; the client's own address or zeros."""
    assoc = UdpAssociation(CLIENT, ipaddress.ip_address(requested), 40000, 8)
    assert assoc.endpoint == (CLIENT, 40000)
    assert assoc.from_client(CLIENT, 40000)
    assert not assoc.from_client(CLIENT, 40001), "another port of the client's address"
    assert not assoc.from_client(NEIGHBOUR, 40000), "another host"
    assert assoc.endpoint == (CLIENT, 40000)


def test_with_zeros_the_first_datagram_fixes_the_port() -> None:
    assoc = UdpAssociation(CLIENT, ipaddress.ip_address("0.0.0.0"), 0, 8)
    assert assoc.endpoint is None
    assert not assoc.from_client(NEIGHBOUR, 41000), "another host's datagram fixes nothing"
    assert assoc.endpoint is None
    assert assoc.from_client(CLIENT, 41000) and assoc.endpoint == (CLIENT, 41000)
    assert not assoc.from_client(CLIENT, 41001) and assoc.from_client(CLIENT, 41000)


def test_an_association_for_another_address_is_not_allowed() -> None:
    with pytest.raises(SocksError, match="not the client's address") as caught:
        UdpAssociation(CLIENT, NEIGHBOUR, 40000, 8)
    assert caught.value.reply is Reply.NOT_ALLOWED


def test_replies_come_from_two_way_targets_exactly_or_from_admitted_peers() -> None:
    assoc = UdpAssociation(CLIENT, ipaddress.ip_address("0.0.0.0"), 0, 2)
    assert assoc.target(TARGET, 53) is None and not assoc.full
    assoc.add_target(TARGET, 53, two_way=True)
    assoc.add_target(TARGET, 9999, two_way=False)
    assert assoc.full
    assert assoc.relays_from(TARGET, 53, peer_admitted=False)
    assert not assoc.relays_from(TARGET, 9999, peer_admitted=False), "one way: no replies"
    assert not assoc.relays_from(TARGET, 54, peer_admitted=False), "another port of the target"
    assert not assoc.relays_from(NEIGHBOUR, 53, peer_admitted=False)
    assert assoc.relays_from(TARGET, 9999, peer_admitted=True), "a peer the bind admits"
    assert (assoc.target(TARGET, 53), assoc.target(TARGET, 9999)) == (True, False)
