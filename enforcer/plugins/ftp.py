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
  fw (``from_fw``), as every other packet does. A Firewall client
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
Malformed lines pass unchanged and open nothing. Every data connection is single
use and expires if unused (``TIMEOUT``).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from enforcer.client import Flags, SessionApiError, SessionCalls
from enforcer.filters import FIRST_UNPRIVILEGED_PORT, Direction, IPAddress, Primary

FTP_GUID = "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101"
MAX_LINE = 512
OPENED_KEPT = 16  # what a control connection opened, kept for logs and tests
# A control connection's refusals logged: a client sending hundreds of commands at a cap
# would otherwise have the enforcer write a line for each (its log and its time)
LOGGED_REFUSALS = 8
# Data connections one segment may open (PORT, EPRT, 227, 229): a client asks for one and
# waits for its transfer; hundreds in one segment would hold the queue (and the other
# clients' first packets behind it) while each is acted on. The rest open nothing.
DATA_CONNECTIONS_PER_SEGMENT = 16
log = logging.getLogger("pinhole.filters.ftp")

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
    if len(parts) != 5 or parts[0] or parts[4].strip() or not parts[3].isdigit():
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
    """One direction's bytes, cut into lines for ``handle``.

    ``hold``: an incomplete line is held back until its end arrives, and each
    complete line is sent as ``handle`` makes it. Otherwise the data passes as it
    came, and ``handle`` only reads the lines.
    """

    hold: bool
    pending: bytes = b""  # the start of an incomplete line
    skipping: bool = False  # inside a line too long to parse

    def feed(self, data: bytes, handle: Callable[[bytes], bytes]) -> bytes:
        text = self.pending + data
        self.pending = b""
        out = []
        start = 0
        while (end := text.find(b"\n", start)) >= 0:
            line = text[start:end + 1]
            start = end + 1
            if self.skipping:
                self.skipping = False
                out.append(line)
            else:
                out.append(handle(line))
        rest = text[start:]
        if rest:
            if self.skipping or len(rest) > MAX_LINE:
                self.skipping = True
                out.append(rest)
            else:
                self.pending = rest
        return b"".join(out) if self.hold else data


@dataclass
class FtpControl:
    """One FTP control connection's filter."""

    primary: Primary
    api: SessionCalls
    opened: list[str] = field(default_factory=list)  # what it opened lately, for logs and tests
    refusals: int = 0  # commands and replies that opened nothing (the first LOGGED_REFUSALS logged)
    asked: int = 0  # data connections asked for in the segment being read

    def __post_init__(self) -> None:
        # Lines are rewritten only where a SecureNAT client is translated (NAT);
        # elsewhere they are only read, and nothing is held back.
        hold = self.primary.translated and not self.primary.firewall_client
        self._lines = {Direction.OUT: _Lines(hold), Direction.BACK: _Lines(hold)}

    def _note(self, what: str) -> None:
        """Keep what was opened, the last OPENED_KEPT only (a connection may last days)."""
        self.opened.append(what)
        del self.opened[:-OPENED_KEPT]

    def _refused(self, why: str, *args: object) -> None:
        """A command or reply that opened nothing: logged, the first LOGGED_REFUSALS only."""
        self.refusals += 1
        if self.refusals <= LOGGED_REFUSALS:
            log.info("session %d: " + why + ("" if self.refusals < LOGGED_REFUSALS else
                                              " (this control connection's further refusals "
                                              "are not logged)"), self.primary.session, *args)

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        handle = self._command if direction is Direction.OUT else self._reply
        self.asked = 0
        return self._lines[direction].feed(data, handle)

    def _may_open(self) -> bool:
        """Whether one more data connection may be opened for this segment."""
        self.asked += 1
        if self.asked <= DATA_CONNECTIONS_PER_SEGMENT:
            return True
        self._refused("more than %d data connections asked for in one segment: nothing opened",
                      DATA_CONNECTIONS_PER_SEGMENT)
        return False

    # --- commands: PORT and EPRT ----------------------------------------------------------
    def _command(self, line: bytes) -> bytes:
        verb, _, argument = line.strip().partition(b" ")
        verb = verb.upper()
        if verb in (b"PORT", b"EPRT") and not self._may_open():
            return line
        if verb == b"PORT":
            found = parse_host_port(argument)
            if found is None:
                return line
            opened = self._active(*found)
            return line if opened is None or not isinstance(opened[0], ipaddress.IPv4Address) \
                else b"PORT " + format_host_port(opened[0], opened[1]) + b"\r\n"
        if verb == b"EPRT":
            found_e = parse_eprt(argument.strip())
            if found_e is None:
                return line
            opened = self._active(*found_e)
            return line if opened is None else b"EPRT " + format_eprt(*opened) + b"\r\n"
        return line

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
    def _reply(self, line: bytes) -> bytes:
        """The client is to connect to the address and port a reply names (EPSV: the
        server's): open it for the client, unless it is a third party or a privileged
        port; where the client sees only the fw, rewrite the reply to the fw's port."""
        extended = line.startswith(b"229 ")
        if not (extended or line.startswith(b"227 ")) or not self._may_open():
            return line
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
