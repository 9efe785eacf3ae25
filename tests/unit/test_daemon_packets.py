"""The daemon's packet callback, with a stand-in for NetfilterQueue's packets: an error
after a packet's verdict must not escape into the queue's loop (ROB-04)."""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

from core_policy import INTERNAL, POLICY, POLICY_DATA
from scapy.layers.inet import IP, TCP

from enforcer.api import SessionApi
from enforcer.control import Caller
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.packet import TCP as TCP_PROTOCOL
from enforcer.daemon import Arrivals, Daemon
from enforcer.dataplane import Interfaces
from enforcer.protocol import encode

C1, S1 = "192.0.2.11", "198.51.100.21"
INTERNAL_IF = 3  # the ifindex packets from the clients arrive on
HOOK_FORWARD = 2


class QueuedPacket:
    """What NetfilterQueue hands the callback: one verdict only, a second one raises."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.indev, self.hook, self.mark = INTERNAL_IF, HOOK_FORWARD, 0
        self.verdicts: list[str] = []

    def get_payload(self) -> bytes:
        return self.data

    def get_payload_len(self) -> int:
        return len(self.data)

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def _verdict(self, verdict: str) -> None:
        if self.verdicts:
            raise RuntimeError("Verdict already given for this packet")
        self.verdicts.append(verdict)

    def accept(self) -> None:
        self._verdict("accept")

    def drop(self) -> None:
        self._verdict("drop")


class SocketCaller(Caller):
    """A filter on the control socket: what it is pushed is encoded to be sent."""

    def __init__(self) -> None:  # no server, no socket
        self.sent: list[bytes] = []

    def push(self, message: dict[str, Any]) -> None:
        self.sent.append(encode(message))


def daemon() -> Daemon:
    """The daemon's packet path alone: its engine, session API and clock."""
    d = Daemon.__new__(Daemon)
    d.engine = Engine(POLICY, INTERNAL, [ipaddress.ip_address("198.51.100.1")])
    d.clock = lambda: 5.0
    d.api = SessionApi(d.engine, d.clock)
    d._arrived_on = Arrivals(Interfaces({"int0": INTERNAL_IF}, {}, (), ()))
    return d


def syn(dport: int, sport: int) -> QueuedPacket:
    return QueuedPacket(bytes(IP(src=C1, dst=S1) / TCP(sport=sport, dport=dport, flags="S")))


def test_an_error_after_the_verdict_is_counted_and_the_enforcer_goes_on() -> None:
    # The event of an admitted flow is sent after the packet's verdict; when it could not
    # be encoded (a context that is no JSON, from a filter in the enforcer's process), the
    # handler's drop was a second verdict: RuntimeError out of the queue's callback,
    # which stops the daemon's loop.
    d = daemon()
    caller = SocketCaller()
    fid = d.api.register_filter({"name": "on the socket"}, caller)["filter"]
    primary = syn(21, 40000)
    d.on_packet(primary)
    session = d.engine.sessions.find(ipaddress.ip_address(C1))
    assert primary.verdicts == ["accept"] and session is not None
    ftp = uuid.UUID(POLICY_DATA["protocol"][0]["guid"])
    d.engine.allow_future_connect(session.id, ipaddress.ip_address(S1), 20021, TCP_PROTOCOL, Flags(0),
                                  ftp, 1.0, filter_id=fid, context={"not", "json"})
    granted = syn(20021, 41000)
    d.on_packet(granted)
    assert granted.verdicts == ["accept"] and d.engine.counters["errors"] == 1
    assert caller.sent == []
    later = syn(20021, 41001)  # and it goes on deciding: the grant was single use
    d.on_packet(later)
    assert later.verdicts == ["drop"] and d.engine.counters["errors"] == 1
