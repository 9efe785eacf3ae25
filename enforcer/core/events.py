"""Events: what the engine tells session filters about the flows it admits."""

from __future__ import annotations

from enforcer.core.effects import ConnectEvent
from enforcer.core.flows import FlowRecord
from enforcer.core.packet import TCP, UDP
from enforcer.core.policy import PortRange
from enforcer.core.results import InvalidArgument, IsBusy
from enforcer.core.state import State

# Port ranges a filter may ask connect events for (each admitted flow looks at them all)
MAX_CONNECT_REGISTRATIONS = 64


class Events(State):
    """Connect-event registrations, and the events a flow's admission sends (as effects)."""

    def register_connect_events(self, filter_id: int, protocol: int, ports: PortRange) -> None:
        """Notify ``filter_id`` of every connection admitted to these ports."""
        if protocol not in (TCP, UDP):
            raise InvalidArgument(f"protocol must be TCP (6) or UDP (17), not {protocol}")
        registered = self.connect_registrations.setdefault(filter_id, [])
        if len(registered) >= MAX_CONNECT_REGISTRATIONS:
            raise IsBusy(f"filter {filter_id} has {MAX_CONNECT_REGISTRATIONS} port ranges "
                         "registered, the most it may")
        registered.append((protocol, ports))

    def forget_filter(self, filter_id: int) -> None:
        self.connect_registrations.pop(filter_id, None)

    def _connect_events(self, record: FlowRecord, *, secondary: bool, now: float) -> None:
        if not self.connect_registrations:
            return
        key = record.key
        external = None if record.snat is None else self._external(key.dst.version, record.snat)
        for filter_id, registered in self.connect_registrations.items():
            if any(proto == key.protocol and key.dport in ports for proto, ports in registered):
                self.effects.append(ConnectEvent(filter_id, secondary, record.protocol,
                                                record.action_id, record.session_id, key,
                                                external, now, record.redirect))
