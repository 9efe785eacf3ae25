"""A sans-I/O SOCKS5 codec: the server side of the handshake, and small client helpers (tests, harness).

The enforcer's SOCKS service owns the sockets; this module only turns the bytes a
client sent into decisions. ``ServerHandshake.feed`` takes whatever arrived (one byte,
or the whole handshake and some payload in one chunk) and returns events for the
service to act on, in order:

* ``Send(data)``: write ``data`` to the client.
* ``Authenticated(user)``: the method negotiation (and, with RFC 1929, the password
  check) is done; ``user`` is ``None`` for the no-authentication method. It comes
  *before* the reply that lets the client in (the login's success status, or the
  choice of the no-authentication method), so that a service that will not have the
  client after all (a cap on its sessions) sends ``refuse()``'s bytes instead, closes,
  and acts on nothing after it: a refused client never sees a success.
* ``RequestReceived(request)``: the client's one request (RFC 1928 section 4). The
  handshake is then over: the service decides, answers with ``reply(...)`` and, for a
  CONNECT, starts relaying.
* ``Payload(data)``: bytes the client sent *after* its request (a client may pipeline
  its first data behind the request without waiting for the reply). They belong to the
  relayed stream, not to SOCKS; every later ``feed`` returns its bytes this way too.
* ``Close()``: the negotiation failed in a way the protocol answers (no acceptable
  method, or the password check said no); send what came before, then close. Nothing
  is emitted after it, and later ``feed`` calls return ``[]``.

Input that breaks the protocol raises ``SocksError``, and nothing else is ever raised
for any bytes (an exception raised by the ``check`` callback is the caller's own and
passes through). The error says what to send before closing: ``reply`` is the SOCKS
reply for a bad request, ``auth_failure`` marks a malformed RFC 1929 message (answered
by a failure status), and in the greeting SOCKS has no way to answer at all;
``SocksError.response()`` gives those bytes. Because a single ``feed`` can complete
a message before reaching a bad one (a pipelined greeting followed by a bad request),
the error carries the ``events`` that call produced before the fault: act on them
first (the client expects the method selection before the error reply). After an
error the handshake is closed like after ``Close()``.

Every SOCKS5 handshake message is length-prefixed and short: a greeting is at most
2 + 255 bytes, an RFC 1929 request 3 + 255 + 255, a request 7 + 255. The parser looks
at each field as soon as it has arrived (an HTTP client that connects here fails on
its first byte) and consumes each message as soon as it is complete, so the bytes held
for an incomplete message never exceed ``MAX_MESSAGE`` whatever a client sends; no
separate cap is needed, and ``ServerHandshake.buffered`` shows the bound holds.

The choice of method is fixed by ``require_auth``: username/password (RFC 1929) when
required and offered, no authentication when not required and offered, otherwise the
0xFF "no acceptable methods" answer. GSSAPI (method 1), which RFC 1928 (section 3) says
compliant implementations MUST support, is deliberately not implemented; a client that
offers only it gets 0xFF.

Lenient points, each deliberate: an empty password is accepted as a field (RFC 1929
says 1 to 255 bytes, but common clients send an empty one for a user without a
password) and left to ``check``; port 0 is accepted in a request (a UDP ASSOCIATE
commonly sends 0.0.0.0:0 for "not known yet"). Strict points: names and passwords
must be UTF-8, and a domain name (ATYP 3) must be 1 to 255 bytes of letters, digits,
``-``, ``_`` and ``.``, so that nothing odd (NUL, spaces, ``/``, non-ASCII) reaches a
resolver or a policy match; the host string is returned as the client sent it, not
case-folded, and an address written as a domain name stays a domain name (ATYP 3).
An IPv6 address is given in its compressed form, an IPv4-mapped one as ``::ffff:a.b.c.d``
(the same on every Python version); it stays ATYP 4, for the policy to judge.

The UDP relay header (RFC 1928 section 7) is ``parse_udp``/``build_udp``; fragmented
datagrams (FRAG not 0) are refused, as the RFC allows a server that does not
reassemble to do. ``UdpAssociation`` decides, for one UDP ASSOCIATE, which datagrams
are the client's and which replies go back to it.
"""

from __future__ import annotations

import enum
import ipaddress
import string
from collections.abc import Callable
from dataclasses import dataclass

from enforcer.core.packet import IPAddress

VERSION = 5
"""The SOCKS protocol version this module speaks."""

AUTH_VERSION = 1
"""The version of the RFC 1929 username/password sub-negotiation."""

NO_AUTH = 0
USERPASS = 2
NO_ACCEPTABLE = 0xFF

CONNECT = 1
BIND = 2
UDP_ASSOCIATE = 3
COMMANDS = frozenset({CONNECT, BIND, UDP_ASSOCIATE})

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

AUTH_SUCCESS = 0
AUTH_FAILURE = 1

MAX_MESSAGE = 3 + 255 + 255
"""The longest handshake message (an RFC 1929 request with 255-byte name and password)."""

_DOMAIN_CHARS = frozenset((string.ascii_letters + string.digits + "-_.").encode())
_ADDRESS_LENGTH = {ATYP_IPV4: 4, ATYP_IPV6: 16}


class Reply(enum.IntEnum):
    """The REP field of a server reply (RFC 1928 section 6)."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


@dataclass(frozen=True)
class Send:
    """Bytes to write to the client."""

    data: bytes


@dataclass(frozen=True)
class Authenticated:
    """Negotiation is done; ``user`` is the accepted RFC 1929 name, ``None`` without authentication."""

    user: str | None


@dataclass(frozen=True)
class Request:
    """A client's request. ``host`` is an IP address string for ATYP 1 and 4, a domain name for ATYP 3."""

    command: int
    host: str
    port: int
    atyp: int


@dataclass(frozen=True)
class RequestReceived:
    """The client's request is complete; the handshake is over."""

    request: Request


@dataclass(frozen=True)
class Payload:
    """Bytes the client sent after its request: data for the relayed stream."""

    data: bytes


@dataclass(frozen=True)
class Close:
    """Close the connection after sending what came before."""


Event = Send | Authenticated | RequestReceived | Payload | Close


class SocksError(Exception):
    """Bytes that break the protocol (or arguments a builder cannot encode).

    ``reply`` is the SOCKS reply to send before closing, when the protocol has one for
    the fault (a bad request); ``auth_failure`` is true for a malformed RFC 1929 message,
    answered with a failure status. ``events`` are what the failing ``feed`` call produced
    before the fault, to act on first. ``response()`` gives the bytes to send.
    """

    def __init__(self, message: str, reply: Reply | None = None, auth_failure: bool = False) -> None:
        super().__init__(message)
        self.reply = reply
        self.auth_failure = auth_failure
        self.events: tuple[Event, ...] = ()

    def response(self) -> bytes:
        """The bytes to send the client before closing (empty when SOCKS has no answer for the fault)."""
        if self.reply is not None:
            return reply(self.reply, "0.0.0.0", 0)
        if self.auth_failure:
            return bytes([AUTH_VERSION, AUTH_FAILURE])
        return b""


class _State(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    REQUEST = "request"
    DONE = "done"
    CLOSED = "closed"


class ServerHandshake:
    """The server side of one client connection's SOCKS5 handshake (see the module docstring).

    ``check(user, password)`` decides an RFC 1929 login; only a return of exactly ``True``
    accepts it. ``user`` and ``request`` are set as the matching events are emitted.
    """

    def __init__(self, require_auth: bool, check: Callable[[str, str], bool]) -> None:
        self.require_auth = require_auth
        self.check = check
        self.user: str | None = None
        self.request: Request | None = None
        self._state = _State.GREETING
        self._buf = bytearray()

    def __repr__(self) -> str:
        return f"ServerHandshake(state={self._state.value}, user={self.user!r}, buffered={self.buffered})"

    @property
    def done(self) -> bool:
        """The request has been received: everything fed from now on is ``Payload``."""
        return self._state is _State.DONE

    @property
    def closed(self) -> bool:
        """The handshake failed (``Close()``, ``SocksError``, ``check`` raised): ``feed`` returns ``[]``."""
        return self._state is _State.CLOSED

    @property
    def buffered(self) -> int:
        """How many bytes are held for a message not yet complete (never more than ``MAX_MESSAGE``)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        """Take the next bytes from the client and return the events they complete, in order."""
        if self._state is _State.CLOSED:
            return []
        if self._state is _State.DONE:
            return [Payload(bytes(data))] if data else []
        self._buf += data
        events: list[Event] = []
        try:
            while self._step(events):
                pass
        except SocksError as error:
            error.events = tuple(events)
            self._close()
            raise
        except BaseException:
            self._close()
            raise
        return events

    def refuse(self) -> bytes:
        """The service will not have the client it just authenticated: the bytes to send
        instead of the reply that followed ``Authenticated`` (RFC 1929's failure status
        after a login, "no acceptable methods" without one). The handshake is closed."""
        self._close()
        if self.user is None:
            return bytes([VERSION, NO_ACCEPTABLE])
        return bytes([AUTH_VERSION, AUTH_FAILURE])

    def _close(self) -> None:
        self._state = _State.CLOSED
        self._buf.clear()

    def _step(self, events: list[Event]) -> bool:
        """Parse the message the state expects; False if it is not complete yet or the handshake is over."""
        if self._state is _State.GREETING:
            return self._greeting(events)
        if self._state is _State.AUTH:
            return self._auth(events)
        if self._state is _State.REQUEST:
            return self._request(events)
        return False

    def _greeting(self, events: list[Event]) -> bool:
        buf = self._buf
        if not buf:
            return False
        if buf[0] != VERSION:
            hint = " (a SOCKS4 client?)" if buf[0] == 4 else ""
            raise SocksError(f"greeting: version {buf[0]}, expected {VERSION}{hint}")
        if len(buf) < 2:
            return False
        count = buf[1]
        if count == 0:
            raise SocksError("greeting: NMETHODS is 0, no method offered")
        if len(buf) < 2 + count:
            return False
        methods = bytes(buf[2 : 2 + count])
        del buf[: 2 + count]
        if self.require_auth and USERPASS in methods:
            events.append(Send(bytes([VERSION, USERPASS])))
            self._state = _State.AUTH
        elif not self.require_auth and NO_AUTH in methods:
            events += [Authenticated(None), Send(bytes([VERSION, NO_AUTH]))]
            self._state = _State.REQUEST
        else:
            events += [Send(bytes([VERSION, NO_ACCEPTABLE])), Close()]
            self._close()
        return True

    def _auth(self, events: list[Event]) -> bool:
        buf = self._buf
        if not buf:
            return False
        if buf[0] != AUTH_VERSION:
            raise SocksError(
                f"username/password: version {buf[0]}, expected {AUTH_VERSION}", auth_failure=True
            )
        if len(buf) < 2:
            return False
        ulen = buf[1]
        if ulen == 0:
            raise SocksError("username/password: empty username", auth_failure=True)
        if len(buf) < 3 + ulen:
            return False
        plen = buf[2 + ulen]
        if len(buf) < 3 + ulen + plen:
            return False
        raw_user = bytes(buf[2 : 2 + ulen])
        raw_password = bytes(buf[3 + ulen : 3 + ulen + plen])
        del buf[: 3 + ulen + plen]
        try:
            user = raw_user.decode()
            password = raw_password.decode()
        except UnicodeDecodeError:
            raise SocksError("username/password: not UTF-8", auth_failure=True) from None
        if self.check(user, password) is True:
            self.user = user
            events += [Authenticated(user), Send(bytes([AUTH_VERSION, AUTH_SUCCESS]))]
            self._state = _State.REQUEST
        else:
            events += [Send(bytes([AUTH_VERSION, AUTH_FAILURE])), Close()]
            self._close()
        return True

    def _request(self, events: list[Event]) -> bool:
        buf = self._buf
        if not buf:
            return False
        if buf[0] != VERSION:
            raise SocksError(f"request: version {buf[0]}, expected {VERSION}", Reply.GENERAL_FAILURE)
        if len(buf) < 2:
            return False
        command = buf[1]
        if command not in COMMANDS:
            raise SocksError(f"request: unknown command {command}", Reply.COMMAND_NOT_SUPPORTED)
        if len(buf) < 3:
            return False
        if buf[2] != 0:
            raise SocksError(f"request: reserved byte is {buf[2]}, not 0", Reply.GENERAL_FAILURE)
        parsed = _parse_address(buf, 3, "request", Reply.GENERAL_FAILURE)
        if parsed is None:
            return False
        atyp, host, port, end = parsed
        del buf[:end]
        self.request = Request(command, host, port, atyp)
        events.append(RequestReceived(self.request))
        if buf:
            events.append(Payload(bytes(buf)))
            buf.clear()
        self._state = _State.DONE
        return False


def _parse_address(
    data: bytes | bytearray, offset: int, what: str, error_reply: Reply | None
) -> tuple[int, str, int, int] | None:
    """ATYP, DST.ADDR and DST.PORT at ``offset``: (atyp, host, port, end offset), or None if incomplete.

    A fault raises ``SocksError``. Its reply is None when ``error_reply`` is (outside a request);
    otherwise it is the reply SOCKS has for the fault (address type not supported, host
    unreachable), or ``error_reply`` for a field that is simply malformed.
    """

    def fail(message: str, specific: Reply | None) -> SocksError:
        return SocksError(f"{what}: {message}", None if error_reply is None else specific)

    if len(data) <= offset:
        return None
    atyp = data[offset]
    start = offset + 1
    if atyp in _ADDRESS_LENGTH:
        end = start + _ADDRESS_LENGTH[atyp]
        if len(data) < end + 2:
            return None
        host = _address_text(bytes(data[start:end]))
    elif atyp == ATYP_DOMAIN:
        if len(data) <= start:
            return None
        length = data[start]
        if length == 0:
            raise fail("empty domain name", error_reply)
        end = start + 1 + length
        if len(data) < end:
            return None
        name = bytes(data[start + 1 : end])
        if not _DOMAIN_CHARS.issuperset(name):
            raise fail(f"invalid domain name {name!r}", Reply.HOST_UNREACHABLE)
        if len(data) < end + 2:
            return None
        host = name.decode("ascii")
    else:
        raise fail(f"unknown address type {atyp}", Reply.ADDRESS_TYPE_NOT_SUPPORTED)
    port = int.from_bytes(data[end : end + 2], "big")
    return atyp, host, port, end + 2


def _address_text(packed: bytes) -> str:
    """The text of a packed IPv4 or IPv6 address; an IPv4-mapped IPv6 address is written
    ``::ffff:a.b.c.d`` (what Python 3.13 prints, and 3.11 does not), whatever the Python version.
    """
    if len(packed) == 4:
        return str(ipaddress.IPv4Address(packed))
    address = ipaddress.IPv6Address(packed)
    if address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def _encode_address(host: str, port: int) -> bytes:
    """ATYP, ADDR and PORT for ``host`` (an IP literal gets ATYP 1 or 4, anything else is a domain name)."""
    if not 0 <= port <= 0xFFFF:
        raise SocksError(f"port {port} out of range")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii", "replace")
        if not 1 <= len(name) <= 255 or not _DOMAIN_CHARS.issuperset(name):
            raise SocksError(f"{host!r} is neither an IP address nor a valid domain name") from None
        head = bytes([ATYP_DOMAIN, len(name)]) + name
    else:
        head = bytes([ATYP_IPV4 if address.version == 4 else ATYP_IPV6]) + address.packed
    return head + port.to_bytes(2, "big")


def reply(code: Reply, address: str, port: int) -> bytes:
    """A server reply (RFC 1928 section 6): ``code`` with BND.ADDR/BND.PORT ``address``:``port``.

    ``address`` must be an IP address (ATYP 1 or 4 follows its family); ``0.0.0.0`` and port 0
    are the usual filler for a failure.
    """
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise SocksError(f"reply address {address!r} is not an IP address") from None
    try:
        code = Reply(code)
    except ValueError:
        raise SocksError(f"reply code {code} is not a SOCKS5 reply") from None
    return bytes([VERSION, code, 0]) + _encode_address(address, port)


def parse_udp(data: bytes) -> tuple[str, int, bytes]:
    """Split a client's UDP relay datagram (RFC 1928 section 7) into (host, port, payload).

    Fragments (FRAG not 0) are refused: this server does not reassemble. The ``SocksError``
    has no reply; a bad datagram is dropped.
    """
    if len(data) < 4:
        raise SocksError(f"udp: {len(data)}-byte datagram is shorter than a header")
    if data[0] or data[1]:
        raise SocksError("udp: reserved bytes are not 0")
    if data[2]:
        raise SocksError(f"udp: fragment {data[2]}, fragmentation is not supported")
    parsed = _parse_address(data, 3, "udp", None)
    if parsed is None:
        raise SocksError("udp: datagram ends inside its header")
    _, host, port, end = parsed
    return host, port, bytes(data[end:])


def build_udp(host: str, port: int, payload: bytes) -> bytes:
    """A UDP relay datagram (RFC 1928 section 7, FRAG 0) carrying ``payload`` from or to ``host``:``port``."""
    return b"\0\0\0" + _encode_address(host, port) + bytes(payload)


def client_greeting(user: str | None) -> bytes:
    """A client's greeting: offering username/password when there is a ``user``, else no authentication."""
    return bytes([VERSION, 1, NO_AUTH if user is None else USERPASS])


def client_auth(user: str, password: str) -> bytes:
    """A client's RFC 1929 username/password request."""
    name, secret = user.encode(), password.encode()
    if not 1 <= len(name) <= 255 or len(secret) > 255:
        raise SocksError("username must be 1 to 255 bytes and password at most 255 bytes (UTF-8)")
    return bytes([AUTH_VERSION, len(name)]) + name + bytes([len(secret)]) + secret


def client_request(command: int, host: str, port: int) -> bytes:
    """A client's request; any ``command`` byte is encoded, so that tests can send unknown ones."""
    if not 0 <= command <= 0xFF:
        raise SocksError(f"command {command} is not a byte")
    return bytes([VERSION, command, 0]) + _encode_address(host, port)


def parse_reply(data: bytes) -> tuple[Reply, str, int, int] | None:
    """A server reply at the start of ``data``: (code, address, port, bytes consumed), None if incomplete."""
    if not data:
        return None
    if data[0] != VERSION:
        raise SocksError(f"reply: version {data[0]}, expected {VERSION}")
    if len(data) < 2:
        return None
    try:
        code = Reply(data[1])
    except ValueError:
        raise SocksError(f"reply: unknown code {data[1]}") from None
    if len(data) < 3:
        return None
    if data[2] != 0:
        raise SocksError(f"reply: reserved byte is {data[2]}, not 0")
    parsed = _parse_address(data, 3, "reply", None)
    if parsed is None:
        return None
    _, address, port, end = parsed
    return code, address, port, end


class UdpAssociation:
    """What one UDP ASSOCIATE relays (RFC 1928 section 7), decided without I/O.

    The client's endpoint: the request's DST.ADDR and DST.PORT name the address and
    port the client will send from, zeros what it does not know yet; the first
    datagram from the client's address fixes what was left open. Only the client's
    own address may be named (the relay would send a third party what arrives for
    the client). A datagram from any other source, another port of the client's
    address included, is not the client's; replies go to that endpoint alone.

    Targets: each address and port the client sends to is admitted once (the caller
    asks the engine) and remembered with whether its replies may come back
    (``two_way``), at most ``max_targets`` of them.
    """

    def __init__(self, client: IPAddress, requested: IPAddress, port: int, max_targets: int) -> None:
        """``requested``/``port``: the request's DST.ADDR and DST.PORT. A named address
        that is not ``client``'s raises SocksError with reply 2 (not allowed)."""
        if not requested.is_unspecified and requested != client:
            raise SocksError(f"UDP ASSOCIATE: {requested} is not the client's address {client}",
                             Reply.NOT_ALLOWED)
        self.client = client
        self.port: int | None = port or None
        self.max_targets = max_targets
        self.targets: dict[tuple[IPAddress, int], bool] = {}  # (address, port) -> two way

    @property
    def endpoint(self) -> tuple[IPAddress, int] | None:
        """Where the client sends from and replies go (None until it is known)."""
        return None if self.port is None else (self.client, self.port)

    def from_client(self, address: IPAddress, port: int) -> bool:
        """Whether a datagram from ``address``:``port`` is the client's (the first one
        from its address fixes a port the request left open)."""
        if address != self.client:
            return False
        if self.port is None:
            self.port = port
        return port == self.port

    def target(self, address: IPAddress, port: int) -> bool | None:
        """Whether a target admitted before is two way (None: not admitted yet)."""
        return self.targets.get((address, port))

    @property
    def full(self) -> bool:
        """No room for another target."""
        return len(self.targets) >= self.max_targets

    def add_target(self, address: IPAddress, port: int, two_way: bool) -> None:
        """A target the engine admitted (the caller checked ``full`` first)."""
        self.targets[(address, port)] = two_way

    def relays_from(self, address: IPAddress, port: int, peer_admitted: bool) -> bool:
        """Whether a datagram from ``address``:``port`` goes to the client: the reply of
        a two-way target (that address and port exactly), or a peer the bind admits
        (``peer_admitted``: approved by RetroactiveAllowBind, in its IpFilter)."""
        return peer_admitted or self.targets.get((address, port)) is True
