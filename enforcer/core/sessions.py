"""Sessions: who a flow belongs to.

A SecureNAT client has no agent; its session is keyed by its IP address and
exists from its first admitted primary connection.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from enforcer.core.packet import IPAddress


@dataclass
class Session:
    id: int
    client: IPAddress
    created: float
    user: str | None = None
    kind: str = "securenat"
    primaries: int = 0
    last_activity: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "kind": self.kind, "client": str(self.client), "user": self.user,
                "created": self.created, "primaries": self.primaries,
                "last_activity": self.last_activity}


@dataclass
class SessionTable:
    _by_client: dict[IPAddress, Session] = field(default_factory=dict)
    _by_id: dict[int, Session] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def securenat(self, client: IPAddress, now: float) -> Session:
        """The SecureNAT session of a client IP, created on first use."""
        session = self._by_client.get(client)
        if session is None:
            session = Session(next(self._ids), client, created=now, last_activity=now)
            self._by_client[client] = session
            self._by_id[session.id] = session
        return session

    def find(self, client: IPAddress) -> Session | None:
        return self._by_client.get(client)

    def get(self, session_id: int) -> Session | None:
        return self._by_id.get(session_id)

    def remove(self, session: Session) -> None:
        del self._by_client[session.client]
        del self._by_id[session.id]

    def __iter__(self) -> Iterator[Session]:
        return iter(self._by_client.values())

    def __len__(self) -> int:
        return len(self._by_client)
