"""Sessions: who a flow belongs to.

A SecureNAT client has no agent; its session is keyed by its IP address and
exists from its first admitted primary connection. A Firewall client's session
is its client IP and user: two users on one client IP are two sessions. It lives
while the client has a control connection (a SOCKS connection) open.
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
    connections: int = 0  # a Firewall client's open control connections

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "kind": self.kind, "client": str(self.client), "user": self.user,
                "created": self.created, "primaries": self.primaries,
                "last_activity": self.last_activity, "connections": self.connections}


@dataclass
class SessionTable:
    _by_client: dict[IPAddress, Session] = field(default_factory=dict)
    _by_id: dict[int, Session] = field(default_factory=dict)
    _firewall_clients: dict[tuple[IPAddress, str | None], Session] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def firewall_client(self, client: IPAddress, user: str | None, now: float) -> Session:
        """The Firewall-client session of ``user`` on ``client``, created on first use."""
        session = self._firewall_clients.get((client, user))
        if session is None:
            session = Session(next(self._ids), client, created=now, user=user, kind="firewall-client",
                              last_activity=now)
            self._firewall_clients[(client, user)] = session
            self._by_id[session.id] = session
        return session

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
        if self._by_client.get(session.client) is session:
            del self._by_client[session.client]
        if self._firewall_clients.get((session.client, session.user)) is session:
            del self._firewall_clients[(session.client, session.user)]
        del self._by_id[session.id]

    def __iter__(self) -> Iterator[Session]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)
