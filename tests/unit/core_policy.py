"""The policy the decision core's unit tests share (test_engine, test_redirects,
test_binds): FTP, DNS and SSH (which a deny rule takes from everyone) for the lab's
client networks, HTTP for c1 only, and the denied network; and a data filter that
changes a stream's length (test_handle_any_input, test_engine_bookkeeping)."""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

from enforcer.core.binds import Bind
from enforcer.core.datafilter import Direction
from enforcer.core.effects import (
    ConnectEvent,
    EstablishedConnection,
    Event,
    ForgetBindFlows,
    RemoveRedirect,
    UnmapBind,
)
from enforcer.core.engine import Engine
from enforcer.core.flows import FlowRecord
from enforcer.core.packet import TCP, FlowKey, Ingress, PacketMeta
from enforcer.core.permissions import Permission
from enforcer.core.policy import policy_from_dict

POLICY_DATA: dict[str, list[dict[str, Any]]] = {
    "protocol": [
        {"name": "FTP", "guid": "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101", "ip_protocol": "tcp",
         "ports": [21]},
        {"name": "HTTP", "guid": "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2102", "ip_protocol": "tcp",
         "ports": [80]},
        {"name": "SSH", "guid": "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2103", "ip_protocol": "tcp",
         "ports": [22]},
        {"name": "DNS", "guid": "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2104", "ip_protocol": "udp",
         "ports": [53]},
    ],
    "protocol_rule": [
        {"name": "nobody uses SSH", "action": "deny", "protocols": ["SSH"], "clients": ["0.0.0.0/0", "::/0"]},
        {"name": "clients", "action": "allow", "protocols": ["FTP", "DNS", "SSH"],
         "clients": ["192.0.2.0/24", "2001:db8:1::/64"]},
        {"name": "c1 HTTP", "action": "allow", "protocols": ["HTTP"], "clients": ["192.0.2.11/32"]},
    ],
    "site_rule": [
        {"name": "denied net", "action": "deny", "destinations": ["203.0.113.0/24", "2001:db8:3::/64"]},
        {"name": "servers", "action": "allow", "destinations": ["198.51.100.0/24", "2001:db8:2::/64"]},
    ],
}
POLICY = policy_from_dict(POLICY_DATA)
GUID = {p["name"]: uuid.UUID(p["guid"]) for p in POLICY_DATA["protocol"]}  # name -> its GUID
# The networks behind the fw's one internal interface
INTERNAL = {"int0": (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8:1::/64"))}
SYN = 0x02


def pkt(src: str, dst: str, dport: int, *, proto: int = TCP, flags: int = SYN, sport: int = 40000,
        ingress: Ingress = Ingress.INTERNAL, interface: str = "") -> PacketMeta:
    """A new flow's first packet (TCP: a SYN unless ``flags`` say otherwise), arrived on
    ``interface`` on the ``ingress`` side."""
    if proto != TCP:
        flags = 0
    return PacketMeta(FlowKey(proto, ipaddress.ip_address(src), sport, ipaddress.ip_address(dst), dport),
                      ingress, flags, interface)


def events_of(engine: Engine) -> list[Event]:
    """The events among what the engine asked the shell to do since it last asked."""
    return [e for e in engine.take_effects() if isinstance(e, (EstablishedConnection, ConnectEvent))]


def retired(engine: Engine) -> list[Permission]:
    """The kernel-mode redirects whose kernel NAT the engine asked to remove since."""
    return [e.permission for e in engine.take_effects() if isinstance(e, RemoveRedirect)]


def retired_binds(engine: Engine) -> list[Bind]:
    """The closed binds whose kernel state the engine asked to undo since."""
    return [e.bind for e in engine.take_effects() if isinstance(e, (UnmapBind, ForgetBindFlows))]


class Stretch:
    """A data filter that changes a stream's length both ways (each 'a' the client
    sends becomes two; each 'b' the server sends goes) and holds back what follows a
    '|' until the next call."""

    def __init__(self) -> None:
        self.held = b""

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        if direction is Direction.BACK:
            return data.replace(b"b", b"")
        data, self.held = self.held + data.replace(b"a", b"aa"), b""
        if b"|" in data:
            data, self.held = data.split(b"|", 1)
        return data


def stretch_filter(record: FlowRecord) -> Stretch:
    """An engine's ``stream_filter``: a Stretch for each filtered flow."""
    return Stretch()
