"""The harness's side of SOCKS5 (RFC 1928, RFC 1929), independent of the enforcer's codec:
a mistake there must not sit on both sides of a check.

socksio (a sans-I/O client library) builds the greeting, the login and the requests, and
reads the method choice, the login status and the reply codes and IP addresses. What it
lacks is written here from the RFCs: the framing of a reply read from a stream, the checks
it skips (a reply's VER of the method choice, RSV), a domain name in a reply (socksio 1.0.0
keeps the length octet in it), and the UDP relay header (RFC 1928 section 7), which it
does not implement at all.

Malformed or unexpected answers raise socksio.ProtocolError; a refusal (no acceptable
method, a failed login) raises socksio.SOCKSError. Both name what came.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import NamedTuple

from socksio import (
    ProtocolError,
    SOCKS5AType,
    SOCKS5AuthMethod,
    SOCKS5AuthMethodsRequest,
    SOCKS5AuthReply,
    SOCKS5Command,
    SOCKS5CommandRequest,
    SOCKS5Reply,
    SOCKS5UsernamePasswordRequest,
    SOCKSError,
)
from socksio.socks5 import SOCKS5UsernamePasswordReply

COMMANDS = {"connect": SOCKS5Command.CONNECT, "bind": SOCKS5Command.BIND,
            "udp": SOCKS5Command.UDP_ASSOCIATE}
VERSION = 5
# Every reply is at least VER, REP, RSV, ATYP, one byte of address (an IPv4 address or a
# name's length) and the port: reading this much first never takes a byte of what follows
REPLY_HEAD = 5
ATYP_IPV4, ATYP_NAME, ATYP_IPV6 = 1, 3, 4


def greeting(user: str | None) -> bytes:
    """The method selection message: username/password (RFC 1929) alone when there is a
    user, else no authentication alone."""
    return SOCKS5AuthMethodsRequest([_method(user)]).dumps()


def check_method(answer: bytes, user: str | None) -> None:
    """The server's method choice: it must be the one ``greeting(user)`` offered."""
    if answer[:1] != bytes([VERSION]):
        raise ProtocolError(f"the method choice {answer!r} is not SOCKS version 5")
    chosen = SOCKS5AuthReply.loads(answer).method
    if chosen is SOCKS5AuthMethod.NO_ACCEPTABLE_METHODS:
        raise SOCKSError("the SOCKS server accepts none of the methods offered (X'FF')")
    if chosen is not _method(user):
        raise ProtocolError(f"the SOCKS server chose {chosen.name}, which was not offered")


def login(user: str, password: str) -> bytes:
    """RFC 1929's username/password request."""
    name, secret = user.encode(), password.encode()
    if not (0 < len(name) < 256 and 0 < len(secret) < 256):
        raise ValueError(f"RFC 1929: a user name and a password are 1 to 255 bytes ({user!r})")
    return SOCKS5UsernamePasswordRequest(name, secret).dumps()


def check_login(answer: bytes) -> None:
    """RFC 1929's status: version 1, status 0 for success."""
    if not SOCKS5UsernamePasswordReply.loads(answer).success:
        raise SOCKSError(f"the SOCKS login failed: the status was {answer!r}")


def request(command: str, host: str, port: int) -> bytes:
    """A request (``command``: connect, bind or udp) for host:port; a host that is no IP
    address goes as a domain name."""
    return SOCKS5CommandRequest.from_address(COMMANDS[command], (host, port)).dumps()


class Reply(NamedTuple):
    code: int  # REP
    name: str  # its RFC 1928 meaning, as socksio names it
    address: str  # BND.ADDR
    port: int  # BND.PORT


def reply_size(head: bytes) -> int:
    """The length of the reply that starts with these REPLY_HEAD bytes."""
    return 3 + _address_size(head, 3)


def parse_reply(data: bytes) -> Reply:
    """One whole reply (frame it with REPLY_HEAD and ``reply_size``)."""
    if len(data) < REPLY_HEAD or len(data) != reply_size(data):
        raise ProtocolError(f"a SOCKS reply of {len(data)} bytes for its address type: {data!r}")
    if data[2] != 0:
        raise ProtocolError(f"a SOCKS reply's RSV is {data[2]:#04x}, not 0: {data!r}")
    parsed = SOCKS5Reply.loads(data)  # VER, REP and an IP address
    address = (_name(data[5:-2]) if parsed.atype is SOCKS5AType.DOMAIN_NAME else parsed.addr)
    return Reply(parsed.reply_code[0], parsed.reply_code.name, address, parsed.port)


def datagram(host: str, port: int, data: bytes) -> bytes:
    """A datagram for a UDP relay (RFC 1928 section 7): RSV 0, FRAG 0 (a whole datagram),
    the destination (an IP address) and the data."""
    ip = ipaddress.ip_address(host)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes([0, 0, 0, atyp]) + ip.packed + port.to_bytes(2, "big") + data


def parse_datagram(packet: bytes) -> tuple[str, int, bytes]:
    """What a UDP relay sent: (source host, source port, data). A fragment (FRAG not 0),
    which the relay has no reason to send, is refused like every malformed header."""
    if len(packet) < 5:
        raise ProtocolError(f"a relayed datagram of {len(packet)} bytes has no header: {packet!r}")
    if packet[:2] != b"\x00\x00":
        raise ProtocolError(f"a relayed datagram's RSV is {packet[:2].hex()}, not 0000")
    if packet[2] != 0:
        raise ProtocolError(f"a relayed datagram is fragment {packet[2]}: FRAG must be 0")
    end = 3 + _address_size(packet, 3)
    if len(packet) < end:
        raise ProtocolError(f"a relayed datagram's header is cut short: {packet!r}")
    raw = packet[4:end - 2]
    if packet[3] == ATYP_NAME:
        host = _name(raw[1:])
    else:
        host = socket.inet_ntop(socket.AF_INET if packet[3] == ATYP_IPV4 else socket.AF_INET6, raw)
    return host, int.from_bytes(packet[end - 2:end], "big"), packet[end:]


def _method(user: str | None) -> SOCKS5AuthMethod:
    return SOCKS5AuthMethod.NO_AUTH_REQUIRED if user is None else SOCKS5AuthMethod.USERNAME_PASSWORD


def _address_size(data: bytes, at: int) -> int:
    """ATYP, the address and the port starting at ``data[at]``, in bytes (``data`` holds
    at least ATYP and the address's first byte)."""
    atyp = data[at]
    if atyp == ATYP_IPV4:
        return 1 + 4 + 2
    if atyp == ATYP_IPV6:
        return 1 + 16 + 2
    if atyp == ATYP_NAME:
        return 1 + 1 + data[at + 1] + 2
    raise ProtocolError(f"address type {atyp} is none of IPv4 (1), a domain name (3), IPv6 (4)")


def _name(raw: bytes) -> str:
    return raw.decode("ascii", "backslashreplace")
