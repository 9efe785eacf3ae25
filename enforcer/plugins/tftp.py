"""The TFTP application filter (RFC 1350): a plugin of the filter interface.

A TFTP server answers a read (RRQ) or write request (WRQ) from a new port of its
own, to the port the request came from. The filter reads each request the
client sends to the server's port 69; for a well-formed one it makes the
client's port reachable for one flow (``bind_for_client``: in NAT, the fw's
external address and the same port, which the fw's source translation keeps
unless another flow holds it) and approves it for the server alone
(RetroactiveAllowBind with an IpFilter holding the server). The server's reply
is admitted, and with it the transfer; any other sender, or a second port of
the server's, is not. The bind is approved with BIDIRECTIONAL: the client answers
the server's new port (ACKs for a read, DATA for a write), and a UDP bind without
it only receives. Malformed requests open nothing, and so does a request from a
privileged port (below 1024: SPEC rule 14). Each datagram of the flow is read,
and a client may repeat a refused request in every one: a flow's first refusals
alone are logged (``enforcer.plugins.refusals``).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from enforcer.client import Flags, SessionApiError, SessionCalls
from enforcer.filters import FIRST_UNPRIVILEGED_PORT, Direction, Primary

from .refusals import Refusals  # the plugins' own helper, not the enforcer's

TFTP_GUID = "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2105"
RRQ, WRQ = 1, 2
OPENED_KEPT = 16  # what a request flow opened, kept for logs and tests
MODES = (b"netascii", b"octet", b"mail")
log = logging.getLogger("pinhole.filters.tftp")


def parse_request(datagram: bytes) -> tuple[int, bytes, bytes] | None:
    """(opcode, file name, mode) of a well-formed RRQ or WRQ, else None.

    Options (RFC 2347) may follow the mode; they are not needed here."""
    if len(datagram) < 4:
        return None
    (opcode,) = struct.unpack("!H", datagram[:2])
    if opcode not in (RRQ, WRQ):
        return None
    fields = datagram[2:].split(b"\0")
    # name, mode, then option/value pairs, all NUL-terminated: the split ends in b""
    if len(fields) < 3 or fields[-1] != b"" or not fields[0] or len(fields) % 2 != 1:
        return None
    name, mode = fields[0], fields[1].lower()
    if mode not in MODES:
        return None
    return opcode, name, mode


@dataclass
class TftpRequests:
    """One TFTP primary flow's filter: it reads the client's requests."""

    primary: Primary
    api: SessionCalls
    opened: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._refused = Refusals(log, self.primary.session, "flow")

    @property
    def refusals(self) -> int:
        """Requests that opened nothing."""
        return self._refused.count

    def _note(self, what: str) -> None:
        """Keep what was opened, the last OPENED_KEPT only (a connection may last days)."""
        self.opened.append(what)
        del self.opened[:-OPENED_KEPT]

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        if direction is Direction.OUT and parse_request(data) is not None:
            self._open()
        return data

    def _open(self) -> None:
        p = self.primary
        server = str(p.server[0])
        if p.client[1] < FIRST_UNPRIVILEGED_PORT:
            self._refused("a request from privileged port %d: its reply is not opened", p.client[1])
            return
        try:
            where = self.api.bind_for_client(p.session, p.client[1], protocol="udp")
            self.api.retroactive_allow_bind(p.session, where, protocol="udp",
                                            protocol_guid=TFTP_GUID, flags=Flags.BIDIRECTIONAL,
                                            ipfilter=[(server, server)])
        except SessionApiError as exc:
            self._refused("cannot open the reply to %s:%d: %s", *p.client, exc)
            return
        self._note(f"bind {where[0]}:{where[1]} for {server}")


class TftpFilter:
    """The plugin: a TftpRequests for each TFTP request flow."""

    name = "tftp"
    protocol_guid = TFTP_GUID

    def attach(self, primary: Primary, api: SessionCalls) -> TftpRequests:
        return TftpRequests(primary, api)
