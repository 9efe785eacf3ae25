"""ROB-04 at the SOCKS service's codec: random and truncated messages, seeded.

``ServerHandshake.feed`` gets a hundred thousand streams in random pieces: random
bytes, and handshakes of both methods with fields out of range, bytes changed,
inserted or removed, and cut short. test_socks.py compares the parser with a
reference reading of the RFCs; this checks, at volume, what the service relies
on whatever arrives:

- only ``SocksError`` is raised, once, and what it says to send is what the RFCs
  have at that point: nothing in the greeting, an RFC 1929 failure status in the
  authentication, a failure reply (never "succeeded") in the request;
- a ``Close`` follows a refusal (no acceptable method, a failed login) and nothing
  comes after it or after an error;
- a login succeeds only when ``check`` said yes, and a request is received only
  after a login (or the no-authentication method), with its fields in range;
- while incomplete, no more than one message is held.
"""

from __future__ import annotations

import ipaddress
import os
import random
import time

from enforcer.core.socks import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    COMMANDS,
    MAX_MESSAGE,
    NO_AUTH,
    USERPASS,
    Authenticated,
    Close,
    Payload,
    RequestReceived,
    Send,
    ServerHandshake,
    SocksError,
    parse_reply,
)

SEED = int(os.environ.get("PINHOLE_FUZZ_SEED", "20261204"))
STREAMS = 100_000
USERS = {"alice": "alice-secret"}


class Login:
    """``check``, recording what it answered."""

    def __init__(self) -> None:
        self.said_yes = 0

    def __call__(self, user: str, password: str) -> bool:
        ok = USERS.get(user) == password
        self.said_yes += ok
        return ok


def handshake(rng: random.Random, require_auth: bool) -> bytes:
    """A handshake near enough to valid to get deep: the greeting, a login, a request."""
    methods = rng.sample((NO_AUTH, 1, USERPASS, 0x80, 0xFF), rng.randrange(1, 4))
    if rng.random() < 0.7:  # mostly, the method the server wants is offered
        methods.append(USERPASS if require_auth else NO_AUTH)
    out = bytes((5, len(methods), *methods))
    if require_auth or rng.random() < 0.2:
        user = rng.choice((b"alice", b"alice", b"alice", b"bob", b"", b"\xff\xfe", b"a" * 255))
        password = rng.choice((b"alice-secret", b"alice-secret", b"wrong", b"", b"\xc3"))
        out += bytes((1, len(user))) + user + bytes((len(password),)) + password
    atyp = rng.choice((ATYP_IPV4, ATYP_IPV4, ATYP_IPV6, ATYP_DOMAIN, 0, 5))
    if atyp == ATYP_DOMAIN:
        name = rng.choice((b"example.org", b"a", b"bad name", b"\x00", b"x" * 255, b""))
        address = bytes((len(name),)) + name
    else:
        address = rng.randbytes({ATYP_IPV4: 4, ATYP_IPV6: 16}.get(atyp, rng.randrange(20)))
    command = rng.choice((*COMMANDS, 0, 4, 0xFF))
    out += bytes((5, command, rng.choice((0, 0, 0, 1)), atyp)) + address + rng.randbytes(2)
    return out + rng.randbytes(rng.choice((0, 0, 3, 100)))  # data pipelined behind the request


def stream(rng: random.Random, require_auth: bool) -> bytes:
    if rng.random() < 0.2:
        return rng.randbytes(rng.randrange(600))
    data = bytearray(handshake(rng, require_auth))
    for _ in range(rng.choice((0, 0, 1, 2, 3))):  # bytes changed, inserted, removed
        at = rng.randrange(len(data))
        change = rng.randrange(3)
        if change == 0:
            data[at] = rng.getrandbits(8)
        elif change == 1:
            data.insert(at, rng.getrandbits(8))
        elif len(data) > 1:
            del data[at]
    if rng.random() < 0.3:
        del data[rng.randrange(len(data)):]
    return bytes(data)


def run(rng: random.Random, data: bytes, require_auth: bool) -> str:
    """Feed ``data`` in random pieces and check the handshake's contract as it goes;
    returns how it ended: "request", "refused", "error" or "incomplete"."""
    login = Login()
    hs = ServerHandshake(require_auth, login)
    sent: list[bytes] = []  # what the client was told, in order
    authenticated = False
    end = "incomplete"
    at = 0
    while at < len(data):
        size = rng.choice((1, 1, 2, 3, 7, 64, 1000))
        piece, at = data[at:at + size], at + size
        if end in ("refused", "error"):
            assert hs.feed(piece) == [], "events after the handshake ended"
            continue
        try:
            events = hs.feed(piece)
        except SocksError as error:
            events = list(error.events)
            assert hs.closed
            response = error.response()
            end = "error"
        for event in events:
            if isinstance(event, Send):
                sent.append(event.data)
                if event.data in (b"\x01\x00", b"\x05\x00"):
                    # the success comes after Authenticated, which a service may refuse
                    assert authenticated, "a success reply before Authenticated"
                if event.data == b"\x01\x00":
                    assert login.said_yes, "a login succeeded that check refused"
            elif isinstance(event, Authenticated):
                assert not authenticated and event.user in (None, *USERS)
                assert (event.user is None) != require_auth
                authenticated = True
            elif isinstance(event, RequestReceived):
                request = event.request
                assert authenticated and end == "incomplete" and request.command in COMMANDS
                assert 0 <= request.port <= 0xFFFF and request.atyp in (ATYP_IPV4, ATYP_IPV6, ATYP_DOMAIN)
                if request.atyp != ATYP_DOMAIN:
                    assert ipaddress.ip_address(request.host).version == (4 if request.atyp == 1 else 6)
                end = "request"
            elif isinstance(event, Close):
                assert sent[-1] in (b"\x05\xff", b"\x01\x01"), "a close that follows no refusal"
                end = "refused"
            else:
                assert isinstance(event, Payload) and end == "request" and event.data
        if end == "error":
            if not sent:  # the greeting: SOCKS has no answer, the service just closes
                assert response == b""
            elif not authenticated:  # RFC 1929: a failure status
                assert sent[-1] == b"\x05\x02" and response == b"\x01\x01"
            else:  # a request: a failure reply, never "succeeded"
                parsed = parse_reply(response)
                assert parsed is not None and parsed[0] != 0 and parsed[3] == len(response) == 10
        assert hs.buffered <= MAX_MESSAGE
    return end


def test_random_and_truncated_messages_get_an_answer_or_a_clean_close() -> None:
    rng = random.Random(SEED)
    ends: dict[str, int] = {}
    started = time.perf_counter()
    for _ in range(STREAMS):
        require_auth = rng.random() < 0.6
        end = run(rng, stream(rng, require_auth), require_auth)
        ends[end] = ends.get(end, 0) + 1
    print(f"{STREAMS} streams in {time.perf_counter() - started:.1f} s: {ends}")
    # every way of ending was reached, and well-formed requests are among them
    assert set(ends) == {"request", "refused", "error", "incomplete"} and min(ends.values()) > 1000, ends
