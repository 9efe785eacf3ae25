"""Sessions: who a flow belongs to.

A SecureNAT client has no agent; its session is keyed by its IP address and
exists from its first admitted primary connection. A Firewall client's session
is its client IP and user: two users on one client IP are two sessions. It lives
while the client has a control connection (a SOCKS connection) open.

Sessions are capped in total and per client address (``Limits``): at a cap a new
session is refused (IsBusy), never an existing one ended for it. A SecureNAT
session ends after ``session_idle_timeout`` without activity: a new flow of its,
or a session API call naming it (the engine says what counts, and that a session
holding a user-mode flow is never idle).
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from enforcer.core.limits import Limits, Quota
from enforcer.core.packet import IPAddress


@dataclass(slots=True)
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


class SessionTable:
    def __init__(self, limits: Limits | None = None, counters: Counter[str] | None = None) -> None:
        limits = limits or Limits()
        self.quota = Quota("sessions", limits, counters if counters is not None else Counter())
        self.idle_timeout = limits.session_idle_timeout
        self._by_client: dict[IPAddress, Session] = {}
        self._by_id: dict[int, Session] = {}
        self._firewall_clients: dict[tuple[IPAddress, str | None], Session] = {}
        self._ids = itertools.count(1)
        # SecureNAT sessions, least recently active first (the shells' clock is monotonic)
        self._idle: OrderedDict[int, Session] = OrderedDict()

    def firewall_client(self, client: IPAddress, user: str | None, now: float) -> Session:
        """The Firewall-client session of ``user`` on ``client``, created on first use
        (IsBusy at a cap)."""
        session = self._firewall_clients.get((client, user))
        if session is None:
            session = self._new(client, now, user, "firewall-client")
            self._firewall_clients[(client, user)] = session
        return session

    def securenat(self, client: IPAddress, now: float) -> Session:
        """The SecureNAT session of a client IP, created on first use (IsBusy at a cap)."""
        session = self._by_client.get(client)
        if session is None:
            session = self._new(client, now)
            self._by_client[client] = session
            self._idle[session.id] = session
        return session

    def _new(self, client: IPAddress, now: float, user: str | None = None,
             kind: str = "securenat") -> Session:
        self.quota.check(client)
        self.quota.take(client)
        session = Session(next(self._ids), client, now, user, kind, last_activity=now)
        self._by_id[session.id] = session
        return session

    def fits(self, client: IPAddress) -> bool:
        """Whether ``client`` may have one more session."""
        return self.quota.fits(client)

    def touch(self, session: Session, now: float) -> None:
        """The session is in use (its idle time starts again)."""
        session.last_activity = now
        if session.id in self._idle:
            self._idle.move_to_end(session.id)

    def idle(self, now: float, in_use: Callable[[Session], bool]) -> list[Session]:
        """The SecureNAT sessions idle for the timeout, for the caller to end; one that
        ``in_use`` says is still in use is touched instead. Looks only at those."""
        out = []
        while self._idle:
            session = next(iter(self._idle.values()))
            if session.last_activity + self.idle_timeout > now:
                break
            if in_use(session):
                self.touch(session, now)
            else:
                del self._idle[session.id]
                out.append(session)
        return out

    def find(self, client: IPAddress) -> Session | None:
        return self._by_client.get(client)

    def get(self, session_id: int) -> Session | None:
        return self._by_id.get(session_id)

    def remove(self, session: Session) -> None:
        if self._by_client.get(session.client) is session:
            del self._by_client[session.client]
        if self._firewall_clients.get((session.client, session.user)) is session:
            del self._firewall_clients[(session.client, session.user)]
        self._idle.pop(session.id, None)
        del self._by_id[session.id]
        self.quota.release(session.client)

    def __iter__(self) -> Iterator[Session]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)
