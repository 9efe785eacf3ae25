"""The flow table: flows the core has admitted, and how."""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

from enforcer.core.packet import FlowKey


class Mode(enum.Enum):
    """Kernel mode: offloaded after admission. User mode: every packet seen by the enforcer."""

    KERNEL = "kernel"
    USER = "user"


@dataclass(frozen=True, slots=True)
class FlowRecord:
    key: FlowKey
    session_id: int
    protocol: str
    mode: Mode
    admitted_at: float
    action_id: int | None = None  # the permission that admitted a secondary flow

    def to_dict(self) -> dict[str, object]:
        return {"flow": str(self.key), "session": self.session_id, "protocol": self.protocol,
                "mode": self.mode.value, "admitted_at": self.admitted_at, "action": self.action_id}


class FlowTable:
    """Admitted flows, newest last; bounded so that a long run cannot grow it without end.

    Kernel-mode flows are forgotten by the kernel on their own schedule; the table
    is a record of admissions, and the oldest records make room for new ones.
    """

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._flows: OrderedDict[FlowKey, FlowRecord] = OrderedDict()

    def add(self, record: FlowRecord) -> None:
        self._flows[record.key] = record
        self._flows.move_to_end(record.key)
        while len(self._flows) > self.capacity:
            self._flows.popitem(last=False)

    def get(self, key: FlowKey) -> FlowRecord | None:
        return self._flows.get(key)

    def newest(self, limit: int) -> list[FlowRecord]:
        out: list[FlowRecord] = []
        for record in reversed(self._flows.values()):
            if len(out) >= limit:
                break
            out.append(record)
        return out

    def __len__(self) -> int:
        return len(self._flows)
