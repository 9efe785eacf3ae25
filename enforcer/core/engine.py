"""The decision core: packet metadata and the time in, a decision out.

No sockets, clocks or threads: the shells pass ``now`` and act on the Decision.
Data flows one way: parsed packet -> flow lookup -> decision -> state change.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

from enforcer.core.flows import FlowRecord, FlowTable, Mode
from enforcer.core.packet import PROTOCOL_NAMES, FlowKey, Ingress, IPAddress, PacketMeta
from enforcer.core.policy import IPNetwork, Policy
from enforcer.core.sessions import SessionTable


class Verdict(enum.Enum):
    ADMIT_KERNEL = "admit-kernel"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    key: FlowKey
    reason: str
    at: float
    session_id: int | None = None
    protocol: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict.value, "flow": str(self.key), "reason": self.reason,
                "at": self.at, "session": self.session_id, "protocol": self.protocol}


class Engine:
    """Decides every new flow; admits primaries that policy allows, drops the rest."""

    def __init__(self, policy: Policy, internal_networks: Iterable[IPNetwork],
                 *, history: int = 512) -> None:
        self.policy = policy
        self.internal_networks = tuple(internal_networks)
        self.sessions = SessionTable()
        self.flows = FlowTable()
        self.counters: Counter[str] = Counter()
        self.recent: deque[Decision] = deque(maxlen=history)

    def decide(self, meta: PacketMeta, now: float) -> Decision:
        """Decide the first packet of a flow the kernel has not seen before."""
        decision = self._decide(meta, now)
        self.counters[decision.verdict.value] += 1
        self.recent.append(decision)
        return decision

    def _decide(self, meta: PacketMeta, now: float) -> Decision:
        key = meta.key

        def drop(reason: str) -> Decision:
            return Decision(Verdict.DROP, key, reason, now)

        if key.protocol == 6 and not meta.starts_tcp_connection:
            return drop(f"TCP packet with flags 0x{meta.tcp_flags:02x} cannot open a connection")
        if meta.ingress is Ingress.EXTERNAL:
            return drop("arrived on the external side and no permission admits it")
        if not self._is_internal(key.src):
            return drop(f"source {key.src} is not on an internal network")
        protocol = self.policy.primary_protocol(key.protocol, key.dport)
        if protocol is None:
            name = PROTOCOL_NAMES.get(key.protocol, str(key.protocol))
            return drop(f"no permission admits it and {name}/{key.dport} "
                        "is no protocol's primary port")
        rule = self.policy.protocol_rule(protocol.name, key.src, None)
        if rule is None:
            return drop(f"no protocol rule lets {key.src} use {protocol.name}")
        if not rule.allow:
            return drop(f"protocol rule '{rule.name}' denies {protocol.name} to {key.src}")
        site = self.policy.site_rule(key.dst)
        if site is None or not site.allow:
            why = f"site rule '{site.name}'" if site else "no site rule allows it"
            return drop(f"destination {key.dst} denied: {why}")

        session = self.sessions.securenat(key.src, now)
        session.primaries += 1
        session.last_activity = now
        self.flows.add(FlowRecord(key, session.id, protocol.name, Mode.KERNEL, now))
        return Decision(Verdict.ADMIT_KERNEL, key,
                        f"primary {protocol.name} connection allowed by rule '{rule.name}'",
                        now, session.id, protocol.name)

    def _is_internal(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n
                   for n in self.internal_networks)
