"""The flow table: flows the core has admitted, how, and what the enforcer saw of them."""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

from enforcer.core.datafilter import DataFilter, TcpStreamEditor
from enforcer.core.packet import FlowKey, IPAddress

Endpoint = tuple[IPAddress, int]


class Mode(enum.Enum):
    """Kernel mode: offloaded after admission. User mode: every packet seen by the enforcer."""

    KERNEL = "kernel"
    USER = "user"


@dataclass(slots=True, eq=False)
class FlowRecord:
    key: FlowKey
    session_id: int
    protocol: str
    mode: Mode
    admitted_at: float
    action_id: int | None = None  # the permission that admitted a secondary flow
    # What the enforcer saw, per direction: the admitting packet, then in user
    # mode every packet of the flow.
    packets_out: int = 0
    bytes_out: int = 0
    packets_back: int = 0
    bytes_back: int = 0
    last_seen: float = 0.0
    data_filter: str | None = None  # the name of the filter on a user-mode flow
    app_filter: str | None = None  # the application filter watching a primary connection
    editor: TcpStreamEditor | None = None  # made by the shell on the flow's first packet
    stream: DataFilter | None = None  # a UDP flow's filter, made by the shell
    # A redirected flow: the fw's internal address and port the client connected to.
    # ``key`` is then the flow as it leaves the fw (client -> ConnectAddress).
    redirect: Endpoint | None = None
    snat: int | None = None  # the external address it leaves from, if translated
    one_way: bool = False  # replies are not admitted
    inbound: bool = False  # opened from the external side (to a bind)

    @property
    def client_side_key(self) -> FlowKey:
        """The flow as the client sees it: to the redirect port, for a redirected flow."""
        if self.redirect is None:
            return self.key
        return FlowKey(self.key.protocol, self.key.src, self.key.sport, *self.redirect)

    def saw(self, forward: bool, length: int, now: float) -> None:
        if forward:
            self.packets_out += 1
            self.bytes_out += length
        else:
            self.packets_back += 1
            self.bytes_back += length
        self.last_seen = now

    def to_dict(self) -> dict[str, object]:
        return {"flow": str(self.key), "session": self.session_id, "protocol": self.protocol,
                "mode": self.mode.value, "admitted_at": self.admitted_at, "action": self.action_id,
                "packets_out": self.packets_out, "bytes_out": self.bytes_out,
                "packets_back": self.packets_back, "bytes_back": self.bytes_back,
                "last_seen": self.last_seen, "data_filter": self.data_filter,
                "app_filter": self.app_filter,
                "buffered": 0 if self.editor is None else self.editor.held,
                "redirect": None if self.redirect is None else [str(self.redirect[0]), self.redirect[1]]}


def reverse(key: FlowKey) -> FlowKey:
    return FlowKey(key.protocol, key.dst, key.dport, key.src, key.sport)


class FlowTable:
    """Admitted flows, least recently seen first; bounded so that a long run cannot grow
    it without end (the kernel keeps the authoritative state: a flow's conntrack mark).

    Each flow is indexed under its key and its reverse, so that a packet of either
    direction finds it with one lookup; a redirected flow also under the key its
    client's packets carry before the enforcer redirects them.
    """

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._flows: OrderedDict[FlowKey, FlowRecord] = OrderedDict()
        self._index: dict[FlowKey, tuple[FlowRecord, bool]] = {}

    def add(self, record: FlowRecord) -> None:
        replaced = self._flows.get(record.key)
        if replaced is not None:
            self._drop(replaced)
        self._flows[record.key] = record
        self._index[record.key] = (record, True)
        self._index[reverse(record.key)] = (record, False)
        if record.redirect is not None:
            self._index[record.client_side_key] = (record, True)
        self._touch(record.key)

    def find(self, key: FlowKey) -> tuple[FlowRecord, bool] | None:
        """The record of a packet's flow and whether the packet goes the flow's way."""
        found = self._index.get(key)
        if found is not None:
            self._flows.move_to_end(found[0].key)
        return found

    def get(self, key: FlowKey) -> FlowRecord | None:
        return self._flows.get(key)

    def _touch(self, key: FlowKey) -> None:
        self._flows.move_to_end(key)
        while len(self._flows) > self.capacity:
            _, old = self._flows.popitem(last=False)
            self._drop(old)

    def _drop(self, record: FlowRecord) -> None:
        """A record leaves the table: its index entries go, and its editor gives back the
        bytes it holds to their budget."""
        self._unindex(record)
        if record.editor is not None:
            record.editor.release()

    def _unindex(self, record: FlowRecord) -> None:
        for k in (record.key, reverse(record.key), record.client_side_key):
            if self._index.get(k, (None,))[0] is record:
                del self._index[k]

    def newest(self, limit: int) -> list[FlowRecord]:
        out: list[FlowRecord] = []
        for record in reversed(self._flows.values()):
            if len(out) >= limit:
                break
            out.append(record)
        return out

    def __len__(self) -> int:
        return len(self._flows)
