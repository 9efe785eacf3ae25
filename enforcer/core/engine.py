"""The decision core: packets, session API calls and the time in; decisions, and what
the shell is to do about them (effects), out.

No sockets, clocks or threads: the shells pass ``now`` and act on what comes back.
Data flows one way: parsed packet -> permission or policy lookup -> decision ->
state change (a permission consumed, a flow recorded, an effect queued). The engine is
built in layers, one module per concern (enforcer.core.state says which); this one
adds what spans them: Firewall clients' control connections, the timer, a session's end.
"""

from __future__ import annotations

from collections.abc import Iterable

from enforcer.core.decisions import Decisions
from enforcer.core.flows import Figures, FlowRecord
from enforcer.core.packet import FlowKey, IPAddress
from enforcer.core.permissions import Permission
from enforcer.core.results import InvalidArgument
from enforcer.core.sessions import Session


class Engine(Decisions):
    """Decides every new flow: permissions first, then primaries by policy; drops the rest.

    Everything a client or a peer can make it hold is capped (``limits``, SPEC rule
    16): at a cap the new request is refused and counted (``refused: <cap>`` in
    ``counters``), never what is held evicted. A SecureNAT session is in use, and
    so not idle, while it has new flows, session API calls name it, or it holds a
    user-mode flow (whose filter may call the API at any time; its idle time starts
    when the last one is let go); pending permissions and open binds do not keep
    it: an idle session ends as ``end_session`` ends one.
    """

    def open_firewall_session(self, client: IPAddress, user: str | None, now: float) -> Session:
        """A Firewall client's control connection opened: the session of its IP and user."""
        if not self.is_internal(client):
            raise InvalidArgument(f"{client} is not on an internal network")
        session = self.sessions.firewall_client(client, user, now)
        session.connections += 1
        self.sessions.touch(session, now)
        return session

    def close_firewall_connection(self, session_id: int, now: float) -> None:
        """A control connection closed; with the session's last one, the session ends."""
        session = self.sessions.get(session_id)
        if session is None:
            return  # ended already (end_session)
        session.connections -= 1
        if session.connections <= 0:
            self.end_session(session_id, now)

    def expire(self, now: float) -> None:
        """Finish the permissions and SecureNAT binds whose time is up, let go of the
        user-mode flows conntrack has forgotten, and end idle SecureNAT sessions (the
        shell calls this on a timer). Each looks only at what it finishes."""
        self.permissions.expire(now)
        self.expire_binds(now)
        self.flows.expire(now)
        for session in self.sessions.idle(now, lambda s: self.flows.holds(s.id)):
            self._end(session)
            self.counters["sessions ended idle"] += 1

    def end_session(self, session_id: int, now: float) -> list[Permission]:
        """The session ends: its pending permissions are cancelled; admitted flows live on."""
        self.permissions.expire(now)  # what has already expired is expired, not cancelled
        return self._end(self.session(session_id))

    def _end(self, session: Session) -> list[Permission]:
        self.sessions.remove(session)
        for bind in self.binds.of(session.id):
            self.bind_done(bind)
        self.binds.end_session(session.id)
        cancelled = self.permissions.end_session(session.id)
        if self.on_session_end is not None:
            self.on_session_end(session)
        return cancelled

    # --- worker processes (enforcer.workers): a user-mode flow's packets read apart ---
    def take_over(self, record: FlowRecord, now: float) -> None:
        """In a worker: a flow the main process handed over (``HandOver``) is this one's:
        its later packets come here, and ``handle`` finds it."""
        record.worker = 0
        self.flows.add(record, now)

    def let_go(self, key: FlowKey, admitted_at: float, now: float) -> None:
        """In a worker: the main process let the flow go (``LetGo``)."""
        record = self.flows.get(key)
        if record is not None and record.admitted_at == admitted_at:
            self.flows.remove(record, now)

    def worker_saw(self, figures: Iterable[tuple[FlowKey, float, Figures]]) -> None:
        """In the main process: what a worker saw of the flows it holds, since it last
        said (each flow's key, admission time and figures). A flow let go since is not
        there any more; one admitted anew with its key is another."""
        for key, admitted_at, seen in figures:
            record = self.flows.get(key)
            if record is not None and record.admitted_at == admitted_at and \
                    record.held_as is not None:
                self.flows.update(record, seen)

    def limits_status(self) -> dict[str, dict[str, object]]:
        """Every cap (``status``), with its use and its refusals where the core enforces
        it (the kernel enforces flows_per_client and new_flows_per_second, the stream
        editors buffered_bytes_*)."""
        out: dict[str, dict[str, object]] = {name: {"cap": cap}
                                             for name, cap in self.limits.to_dict().items()}
        for quota in (self.sessions.quota, self.permissions.quota, self.binds.quota,
                      self.flows.quota):
            out.update(quota.status())
        out["session_idle_timeout"] = {"cap": self.limits.session_idle_timeout,
                                       "ended": self.counters["sessions ended idle"]}
        out["flow_history"] = {"cap": self.limits.flow_history, "used": self.flows.history_count}
        out["max_pending_per_session"] = {
            "cap": self.policy.defaults.max_pending_per_session,
            "refused": self.counters["refused: max_pending_per_session"]}
        return out
