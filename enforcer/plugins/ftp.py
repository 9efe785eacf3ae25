"""The FTP application filter (RFC 959, RFC 2428): a plugin of the filter interface.

It watches FTP control connections and opens each data connection the two ends
agree on, and nothing else:

- ``227`` (PASV) and ``229`` (EPSV) replies: the client is to connect to the
  server: AllowFutureConnect to that address and port. Where the client sees
  only the fw (its control connection was redirected to the server by the fw),
  the reply is rewritten to name a port on the fw that RedirectConnections
  leads to the server's. Clients that ignore PASV's address (curl and ftplib do
  by default) connect to the control connection's peer, the fw, and get there too.
- ``PORT`` and ``EPRT`` commands: the server is to connect to the client.
  A SecureNAT client's port is made reachable with ``bind_for_client`` (in NAT,
  an external port of the fw; the command is rewritten to name it) and approved
  with RetroactiveAllowBind for the server alone (IpFilter). Where the client
  sees only the fw, the bind asks that the server's connection reach it from the
  fw (``from_fw``), as every other packet does, and the server, which sees only
  the fw too, is told a port of the fw's (routed too). A Firewall client
  has bound through the fw already (SOCKS BIND) and names that bind: it is
  approved the same way.
- Anti-bounce: an address other than the control connection's peer (replies)
  or the client's own or its bind's (commands) opens nothing, and the line
  passes unchanged (as Linux's FTP helper and OpenBSD's ftp-proxy do by default).
  So does a privileged data port (below 1024, as OpenBSD's ftp-proxy refuses),
  and, in NAT, a port the fw listens on (the session API refuses that bind).

Lines are reassembled across segments. Where a line may be rewritten (a
translated SecureNAT client), an incomplete line is held back
until its end arrives; a line longer than ``MAX_LINE`` is passed on unparsed.
Only the lines that may open a data connection are read one by one; a regular
expression finds them, and the others pass as they came, so that a segment of
thousands of short lines costs about what one long line does. Malformed lines
pass unchanged and open nothing. Every data connection is single use and expires
if unused (``TIMEOUT``).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from enforcer.client import Flags, SessionApiError, SessionCalls
from enforcer.filters import FIRST_UNPRIVILEGED_PORT, Direction, IPAddress, Primary

from .refusals import Refusals  # the plugins' own helper, not the enforcer's

FTP_GUID = "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101"
MAX_LINE = 512
OPENED_KEPT = 16  # what a control connection opened, kept for logs and tests
# Data connections one segment may open (PORT, EPRT, 227, 229): a client asks for one and
# waits for its transfer; hundreds in one segment would hold the queue (and the other
# clients' first packets behind it) while each is acted on. The rest are not read.
DATA_CONNECTIONS_PER_SEGMENT = 16
log = logging.getLogger("pinhole.filters.ftp")

# The whole lines that ask for a data connection. A command's verb is its first word,
# after any leading white space, in any case, ended by a space or the end of the line
# (group 1: the verb; 2: what follows the space).
_COMMAND = re.compile(rb"(?im)^[ \t\r\x0b\x0c]*+(PORT|EPRT)(?: ([^\n]*)|[ \t\r\x0b\x0c]*)\n")
# A reply's code starts its line (group 1: 7 for PASV's reply, 9 for EPSV's).
_REPLY = re.compile(rb"(?m)^22([79]) [^\n]*\n")
_NUMBERS = re.compile(rb"(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})")
_EPSV = re.compile(rb"\((.)\1\1(\d{1,5})\1\)")


def parse_host_port(text: bytes) -> tuple[ipaddress.IPv4Address, int] | None:
    """The address and port of ``h1,h2,h3,h4,p1,p2`` (PORT's argument, PASV's reply)."""
    found = _NUMBERS.search(text)
    if found is None:
        return None
    numbers = [int(n) for n in found.groups()]
    if any(n > 255 for n in numbers):
        return None
    port = numbers[4] * 256 + numbers[5]
    if port == 0:
        return None
    return ipaddress.IPv4Address(bytes(numbers[:4])), port


def format_host_port(address: ipaddress.IPv4Address, port: int) -> bytes:
    return ",".join(str(n) for n in (*address.packed, port >> 8, port & 255)).encode()


def parse_eprt(argument: bytes) -> tuple[IPAddress, int] | None:
    """EPRT's ``<d>af<d>address<d>port<d>`` (RFC 2428)."""
    if len(argument) < 7:
        return None
    d = argument[:1]
    if not 33 <= d[0] <= 126:
        return None
    parts = argument.split(d)
    # (a port of at most 5 digits: int() of thousands of digits raises, and takes time)
    if len(parts) != 5 or parts[0] or parts[4].strip() or not parts[3].isdigit() or \
            len(parts[3]) > 5:
        return None
    af, text, port_text = parts[1], parts[2], parts[3]
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    port = int(port_text)
    if (af, address.version) not in ((b"1", 4), (b"2", 6)) or not 1 <= port <= 65535:
        return None
    return address, port


def format_eprt(address: IPAddress, port: int) -> bytes:
    return f"|{1 if address.version == 4 else 2}|{address}|{port}|".encode()


def parse_epsv_reply(line: bytes) -> int | None:
    """The port of a ``229 ... (|||port|)`` reply."""
    found = _EPSV.search(line)
    if found is None:
        return None
    port = int(found.group(2))
    return port if 1 <= port <= 65535 else None


@dataclass
class _Lines:
    """One direction's bytes, cut into lines; those ``wanted`` matches go to ``handle``.

    ``hold``: an incomplete line is held back until its end arrives, and each
    wanted line is sent as ``handle`` makes it, the others as they came.
    Otherwise the data passes as it came, and ``handle`` only reads the lines.
    """

    hold: bool
    wanted: re.Pattern[bytes]  # a whole line, its end included
    pending: bytes = b""  # the start of an incomplete line
    skipping: bool = False  # inside a line too long to parse

    def feed(self, data: bytes, handle: Callable[[re.Match[bytes]], bytes]) -> tuple[bytes, int]:
        """What is sent for ``data``, and how many wanted lines in it were passed on
        unread: those after its first DATA_CONNECTIONS_PER_SEGMENT."""
        text = self.pending + data
        self.pending = b""
        start = 0
        if self.skipping:  # the rest of a line too long to parse passes as it is
            start = text.find(b"\n") + 1
            self.skipping = start == 0
            if self.skipping:
                return data, 0
        end = text.rfind(b"\n", start) + 1 or start  # the end of the last complete line
        out = [text[:start]]
        found = self.wanted.finditer(text, start, end)
        for line in itertools.islice(found, DATA_CONNECTIONS_PER_SEGMENT):
            # a line too long to parse passes unread, however it came (whole or in pieces)
            made = line[0] if line.end() - line.start() > MAX_LINE + 1 else handle(line)
            out += (text[start:line.start()], made)
            start = line.end()
        beyond = next(found, None)  # the rest are counted in C (subn), not one by one
        unread = 0 if beyond is None else 1 + self.wanted.subn(b"", text[beyond.end():end])[1]
        out.append(text[start:end])
        rest = text[end:]
        if len(rest) > MAX_LINE:
            self.skipping = True
            out.append(rest)
        else:
            self.pending = rest
        return b"".join(out) if self.hold else data, unread


@dataclass
class FtpControl:
    """One FTP control connection's filter."""

    primary: Primary
    api: SessionCalls
    opened: list[str] = field(default_factory=list)  # what it opened lately, for logs and tests

    def __post_init__(self) -> None:
        # Lines are rewritten only where a SecureNAT client is translated (NAT);
        # elsewhere they are only read, and nothing is held back.
        hold = self.primary.translated and not self.primary.firewall_client
        self._lines = {Direction.OUT: _Lines(hold, _COMMAND), Direction.BACK: _Lines(hold, _REPLY)}
        self._refused = Refusals(log, self.primary.session, "control connection")

    @property
    def refusals(self) -> int:
        """Commands and replies that opened nothing."""
        return self._refused.count

    def _note(self, what: str) -> None:
        """Keep what was opened, the last OPENED_KEPT only (a connection may last days)."""
        self.opened.append(what)
        del self.opened[:-OPENED_KEPT]

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        handle = self._command if direction is Direction.OUT else self._reply
        made, unread = self._lines[direction].feed(data, handle)
        if unread:
            self._refused("%d more data connections asked for in one segment than %d: nothing "
                          "opened for them", unread, DATA_CONNECTIONS_PER_SEGMENT, times=unread)
        return made

    # --- commands: PORT and EPRT ----------------------------------------------------------
    def _command(self, command: re.Match[bytes]) -> bytes:
        line, argument = command[0], (command[2] or b"").strip()
        if command[1].upper() == b"PORT":
            found = parse_host_port(argument)
            if found is None:
                return line
            opened = self._active(*found)
            return line if opened is None or not isinstance(opened[0], ipaddress.IPv4Address) \
                else b"PORT " + format_host_port(opened[0], opened[1]) + b"\r\n"
        found_e = parse_eprt(argument)
        if found_e is None:
            return line
        opened = self._active(*found_e)
        return line if opened is None else b"EPRT " + format_eprt(*opened) + b"\r\n"

    def _active(self, address: IPAddress, port: int) -> tuple[IPAddress, int] | None:
        """The server is to connect to address:port: open it for the server alone and say
        what the server must be told, or None (opened nothing; the line passes as it is)."""
        p = self.primary
        server = str(p.server[0])
        if port < FIRST_UNPRIVILEGED_PORT:
            self._refused("active data connection to privileged port %d refused", port)
            return None
        try:
            if p.firewall_client:
                bind = next((b for b in self.api.binds(p.session)
                             if b["protocol"] == "tcp" and b["state"] == "pending" and
                             ipaddress.ip_address(b["address"][0]) == address and
                             b["address"][1] == port), None)
                if bind is None:
                    self._refused("%s:%d is no bind of this Firewall client's: nothing opened",
                                  address, port)
                    return None
                where = (str(address), port)
            elif address == p.client[0]:
                where = self.api.bind_for_client(p.session, port, protocol="tcp",
                                                 from_fw=p.via is not None)
            else:
                self._refused("active data connection to a third party %s refused", address)
                return None
            self.api.retroactive_allow_bind(p.session, where, protocol_guid=FTP_GUID,
                                            ipfilter=[(server, server)])
        except SessionApiError as exc:
            self._refused("cannot open the data connection to %s:%d: %s", address, port, exc)
            return None
        self._note(f"bind {where[0]}:{where[1]} for {server}")
        return ipaddress.ip_address(where[0]), where[1]

    # --- replies: 227 (PASV) and 229 (EPSV) -----------------------------------------------
    def _reply(self, reply: re.Match[bytes]) -> bytes:
        """The client is to connect to the address and port a reply names (EPSV: the
        server's): open it for the client, unless it is a third party or a privileged
        port; where the client sees only the fw, rewrite the reply to the fw's port."""
        line, extended = reply[0], reply[1] == b"9"
        if extended:
            port = parse_epsv_reply(line)
            found = None if port is None else (self.primary.server[0], port)
        else:
            found = parse_host_port(line[4:])
        if found is None:
            return line
        address, port = found
        if address != self.primary.server[0]:
            self._refused("PASV names a third party %s: nothing opened", address)
            return line
        if port < FIRST_UNPRIVILEGED_PORT:
            self._refused("%s names privileged port %d: nothing opened",
                          "EPSV" if extended else "PASV", port)
            return line
        if self.primary.via is not None:
            return self._redirect(line, address, port, extended=extended)
        self._allow(address, port)
        return line

    def _allow(self, address: IPAddress, port: int) -> None:
        try:
            self.api.allow_future_connect(self.primary.session, (str(address), port),
                                          protocol_guid=FTP_GUID, flags=Flags.TIMEOUT)
        except SessionApiError as exc:
            self._refused("cannot open %s:%d: %s", address, port, exc)
            return
        self._note(f"connect {address}:{port}")

    def _redirect(self, line: bytes, address: IPAddress, port: int, *, extended: bool) -> bytes:
        try:
            (internal, base), _ = self.api.redirect_connections(
                self.primary.session, [(str(address), port)], protocol_guid=FTP_GUID,
                flags=Flags.TIMEOUT)
        except SessionApiError as exc:
            self._refused("cannot redirect to %s:%d: %s", address, port, exc)
            return line
        self._note(f"redirect {internal}:{base} to {address}:{port}")
        if extended:
            return f"229 Entering Extended Passive Mode (|||{base}|)\r\n".encode()
        fw = ipaddress.IPv4Address(internal)
        return b"227 Entering Passive Mode (" + format_host_port(fw, base) + b").\r\n"


class FtpFilter:
    """The plugin: an FtpControl for each FTP control connection."""

    name = "ftp"
    protocol_guid = FTP_GUID

    def attach(self, primary: Primary, api: SessionCalls) -> FtpControl:
        return FtpControl(primary, api)
