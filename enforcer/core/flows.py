"""The flow table: flows the core has admitted, how, and what the enforcer saw of them.

Two kinds of record, kept apart (SPEC rule 18):

- A *user-mode* flow's record is state the flow cannot do without: its data
  filter, its sequence adjustment, its address translation. It is *held* for as
  long as the kernel may still track the flow, and never evicted for anything:
  at the caps (``user_flows_total``, ``user_flows_per_client``) new user-mode
  flows are refused instead. The enforcer cannot ask conntrack when it forgets a
  flow, so it mirrors conntrack's timeouts: it sees every packet of a user-mode
  flow, knows which of conntrack's timeouts can apply (by the handshake, FINs
  and RSTs it saw), and lets the record go once the flow has been silent for
  the longest of them, plus a margin. (A flow handed to a worker process,
  ``enforcer.workers``, is seen there: the worker sends its figures back.)
- A *kernel-mode* flow's record (and a SOCKS relay's, whose state the relay
  itself holds) is history: the flows listing, events, a UDP flow's later
  datagrams. The newest ``flow_history`` are kept; the oldest is forgotten first.

Release is ordered: held records are queued by last packet within each timeout
class, so one expiry pass looks only at the records it releases.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import NamedTuple

from enforcer.core.datafilter import DataFilter, TcpStreamEditor
from enforcer.core.limits import Limits, Quota
from enforcer.core.packet import TCP, TCP_FIN, TCP_RST, TCP_SYN, UDP, Endpoint, FlowKey, IPAddress

# Added to a conntrack timeout before a held record goes: the kernel refreshes its
# timer as a packet enters, a little before the enforcer sees that packet.
RELEASE_MARGIN = 2.0
# How long a flow whose filter failed keeps its record once silent (Lifetime.FILTER_FAILED)
FAILED_KEPT = 10.0


class Mode(enum.Enum):
    """Kernel mode: offloaded after admission. User mode: every packet seen by the enforcer."""

    KERNEL = "kernel"
    USER = "user"


_USER = Mode.USER  # a module name: an enum member looked up on its class runs Python code


class Lifetime(enum.Enum):
    """Which of conntrack's timeouts can apply to a flow, by what the enforcer saw of it."""

    TCP_OPENING = "tcp-opening"          # no packet from the client since the first reply
    TCP_ESTABLISHED = "tcp-established"
    TCP_CLOSING = "tcp-closing"          # a FIN seen
    TCP_RESET = "tcp-reset"              # the last packet was a RST
    UDP_UNREPLIED = "udp-unreplied"
    UDP_STREAM = "udp-stream"            # replies seen (or replies the kernel drops: one-way)
    OTHER = "other"
    # Its filter failed: every later packet is dropped, whether the enforcer knows the flow
    # or not (rule 18), so it holds nothing; it keeps the record while the flow goes on
    # (its drops name why), and lets it go after FAILED_KEPT seconds of silence, not
    # conntrack's timeout: a client's failed flows do not hold its user_flows caps for days
    FILTER_FAILED = "filter-failed"


@dataclass(frozen=True)
class ConntrackTimeouts:
    """conntrack's timeouts (seconds); the defaults are the kernel's. The shell reads
    the host's from ``/proc/sys/net/netfilter`` at start (names: ``SYSCTL``)."""

    tcp_syn_sent: float = 120
    tcp_syn_recv: float = 60
    tcp_established: float = 432000
    tcp_fin_wait: float = 120
    tcp_close_wait: float = 60
    tcp_last_ack: float = 30
    tcp_time_wait: float = 120
    tcp_close: float = 10
    tcp_max_retrans: float = 300
    udp: float = 30
    udp_stream: float = 120
    generic: float = 600

    @classmethod
    def from_sysctl(cls, values: Mapping[str, float]) -> ConntrackTimeouts:
        """From sysctl file names to values; a name missing keeps the kernel's default."""
        return cls(**{name: values[SYSCTL[name]] for name in SYSCTL if SYSCTL[name] in values})

    def of(self, lifetime: Lifetime) -> float:
        """The longest timeout conntrack can be applying to a flow of this class. Its
        timeouts for retransmissions and unacknowledged data only shorten a state's,
        except after a RST: conntrack then takes CLOSE's, or the retransmission one
        when the flow has had retransmissions (measured: 300 s after a RST whose
        sequence number was off, the connection kept established)."""
        if lifetime is Lifetime.TCP_OPENING:
            return max(self.tcp_syn_sent, self.tcp_syn_recv)
        if lifetime is Lifetime.TCP_ESTABLISHED:
            return self.tcp_established
        if lifetime is Lifetime.TCP_CLOSING:
            return max(self.tcp_fin_wait, self.tcp_close_wait, self.tcp_last_ack, self.tcp_time_wait)
        if lifetime is Lifetime.TCP_RESET:
            return max(self.tcp_close, self.tcp_max_retrans)
        if lifetime is Lifetime.UDP_UNREPLIED:
            return self.udp
        if lifetime is Lifetime.UDP_STREAM:
            return max(self.udp, self.udp_stream)
        return self.generic


def _sysctl_name(field: str) -> str:
    proto, _, rest = field.partition("_")
    return f"nf_conntrack_{proto}_timeout" + (f"_{rest}" if rest else "")


SYSCTL = {f.name: _sysctl_name(f.name) for f in fields(ConntrackTimeouts)}

FIN_OUT, FIN_BACK = 1, 2


class Figures(NamedTuple):
    """What was seen of a flow (``FlowRecord``'s fields of the same names)."""

    packets_out: int
    bytes_out: int
    packets_back: int
    bytes_back: int
    last_seen: float
    fins: int
    reset: bool
    confirmed: bool


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
    filter_failed: bool = False  # its filter failed: every later packet is dropped
    # A redirected flow: the fw's internal address and port the client connected to.
    # ``key`` is then the flow as it leaves the fw (client -> ConnectAddress).
    redirect: Endpoint | None = None
    snat: int | None = None  # the external address it leaves from, if translated
    one_way: bool = False  # replies are not admitted
    inbound: bool = False  # opened from the external side (to a bind)
    relayed: bool = False  # a Firewall client's flow the SOCKS service relays (not forwarded)
    # TCP, as the enforcer saw it: FINs per direction (FIN_OUT, FIN_BACK), whether the
    # last packet was a RST, and whether the client sent after the first reply
    fins: int = 0
    reset: bool = False
    confirmed: bool = False
    held_as: Lifetime | None = None  # set while the table holds it (user mode)
    # The worker process its packets go to (``enforcer.workers``; 0: this one): a user-mode
    # flow's packets are then counted there, and its figures sent back
    worker: int = 0

    @property
    def client_side_key(self) -> FlowKey:
        """The flow as the client sees it: to the redirect port, for a redirected flow."""
        if self.redirect is None:
            return self.key
        return FlowKey(self.key.protocol, self.key.src, self.key.sport, *self.redirect)

    @property
    def opened(self) -> bool:
        """Past its TCP handshake: a reply came, and the client answered it or a FIN or RST
        came. A SYN from the client's port is then a new connection, not the first one
        sent again."""
        return self.packets_back > 0 and (self.confirmed or self.fins != 0 or self.reset)

    @property
    def closed(self) -> bool:
        """A TCP connection closed both ways (FINs seen each way) or reset: conntrack lets a
        SYN on its addresses and ports start a new connection (TIME_WAIT, CLOSE)."""
        return self.key.protocol == TCP and (self.reset or self.fins == FIN_OUT | FIN_BACK)

    @property
    def held(self) -> bool:
        """Whether the enforcer holds the flow's state until conntrack forgets it."""
        return self.mode is _USER and not self.relayed

    def saw(self, forward: bool, length: int, now: float, tcp_flags: int = 0) -> None:
        if forward:
            self.packets_out += 1
            self.bytes_out += length
            # (a SYN sent again, its SYN-ACK lost, answers nothing: conntrack stays in SYN_RECV)
            self.confirmed = self.confirmed or (self.packets_back > 0 and not tcp_flags & TCP_SYN)
        else:
            self.packets_back += 1
            self.bytes_back += length
        if tcp_flags & TCP_FIN:
            self.fins |= FIN_OUT if forward else FIN_BACK
        self.reset = bool(tcp_flags & TCP_RST)
        self.last_seen = now

    def figures(self) -> Figures:
        """What a worker saw of the flow, as it sends it back (``FlowTable.update``)."""
        return Figures(self.packets_out, self.bytes_out, self.packets_back, self.bytes_back,
                       self.last_seen, self.fins, self.reset, self.confirmed)

    @property
    def lifetime(self) -> Lifetime:
        if self.filter_failed:
            return Lifetime.FILTER_FAILED
        if self.key.protocol == TCP:
            if self.reset:
                return Lifetime.TCP_RESET
            if self.fins:
                return Lifetime.TCP_CLOSING
            return Lifetime.TCP_ESTABLISHED if self.confirmed else Lifetime.TCP_OPENING
        if self.key.protocol == UDP:
            return Lifetime.UDP_STREAM if self.packets_back or self.one_way else Lifetime.UDP_UNREPLIED
        return Lifetime.OTHER

    def to_dict(self) -> dict[str, object]:
        return {"flow": str(self.key), "session": self.session_id, "protocol": self.protocol,
                "mode": self.mode.value, "admitted_at": self.admitted_at, "action": self.action_id,
                "packets_out": self.packets_out, "bytes_out": self.bytes_out,
                "packets_back": self.packets_back, "bytes_back": self.bytes_back,
                "last_seen": self.last_seen, "data_filter": self.data_filter,
                "app_filter": self.app_filter, "filter_failed": self.filter_failed,
                "buffered": 0 if self.editor is None else self.editor.held,
                "redirect": None if self.redirect is None else [str(self.redirect[0]), self.redirect[1]],
                "held": None if self.held_as is None else self.held_as.value,
                "worker": self.worker}


def _redirect_of(record: FlowRecord) -> tuple[int, IPAddress, Endpoint]:
    assert record.redirect is not None
    return record.key.protocol, record.key.src, record.redirect


def reverse(key: FlowKey) -> FlowKey:
    # tuple.__new__ directly: FlowKey's own __new__ is Python code, and a new flow makes one
    return _new_key(FlowKey, (key[0], key[3], key[4], key[1], key[2]))


_new_key = tuple.__new__


class FlowTable:
    """Held user-mode flows and the kernel-mode history (see the module's docstring).

    Each flow is indexed under its key, a redirected flow also under the key its
    client's packets carry before the enforcer redirects them, and a held flow also
    under its reverse: every packet of a user-mode flow comes to the enforcer, and finds
    its flow with one lookup either way. A kernel-mode flow's replies never do.
    """

    def __init__(self, limits: Limits | None = None, counters: Counter[str] | None = None,
                 timeouts: ConntrackTimeouts | None = None,
                 on_release: Callable[[FlowRecord, float], None] | None = None) -> None:
        """``on_release`` is called for each held record the table lets go, however."""
        limits = limits or Limits()
        self.quota = Quota("user_flows", limits, counters if counters is not None else Counter())
        self.history_cap = limits.flow_history
        self.timeouts = timeouts or ConntrackTimeouts()
        self.on_release = on_release
        # Queues of records, least recent first, each keyed by the record itself: its hash
        # is its identity's (a FlowKey's runs its addresses' hash, Python code)
        self._history: OrderedDict[FlowRecord, FlowRecord] = OrderedDict()
        self._held: dict[Lifetime, OrderedDict[FlowRecord, FlowRecord]] = {
            lifetime: OrderedDict() for lifetime in Lifetime}
        self._index: dict[FlowKey, tuple[FlowRecord, bool]] = {}
        self._held_by_session: Counter[int] = Counter()
        # Held redirected flows by (IP protocol, client, the redirect port it sent to)
        self._held_by_redirect: Counter[tuple[int, IPAddress, Endpoint]] = Counter()

    def fits(self, client: IPAddress) -> bool:
        """Whether one more user-mode flow of ``client`` may be held."""
        return self.quota.fits(client)

    def add(self, record: FlowRecord, now: float) -> None:
        """Record a flow just admitted. What was known of the same flow (its key either
        way round) is replaced. A held one needs room (``fits``), checked first."""
        index = self._index
        key = record.key
        back = reverse(key)
        # Any record of the same flow is indexed under its own key, so these lookups find it.
        # The first also enters the new one (a lookup fewer when, as most often, there is
        # none); removing one found later leaves that entry (_forget puts back what is not its).
        entry = (record, True)
        found = index.setdefault(key, entry)
        if found is not entry:
            self.remove(found[0], now)
            index[key] = entry
        for k in (back,) if record.redirect is None else (back, record.client_side_key):
            other = index.get(k)
            if other is not None and other is not entry:  # entry: a key that is its own reverse
                self.remove(other[0], now)
        held = record.held
        if held:
            index[back] = (record, False)
        if record.redirect is not None:
            index[record.client_side_key] = (record, True)
        if held:
            self.quota.take(record.key.src)
            self._held_by_session[record.session_id] += 1
            if record.redirect is not None:
                self._held_by_redirect[_redirect_of(record)] += 1
            record.held_as = record.lifetime
            self._held[record.held_as][record] = record
            return
        self._history[record] = record
        while len(self._history) > self.history_cap:
            self._forget(self._history.popitem(last=False)[1])

    def saw(self, record: FlowRecord, forward: bool, length: int, now: float,
            tcp_flags: int = 0) -> None:
        """A packet of a recorded flow: counted, and the flow is the most recent of its
        queue (a held one moves queue when its timeout class changes)."""
        record.saw(forward, length, now, tcp_flags)
        self._requeue(record)

    def filter_failed(self, record: FlowRecord) -> None:
        """A held flow's filter failed: its record goes in the queue of failed flows."""
        record.filter_failed = True
        self._requeue(record)

    def update(self, record: FlowRecord, figures: Figures) -> None:
        """What a worker saw of a flow since its hand-over: its record says it, and the flow
        is where those figures put it in its queue (the least recent first, as ``saw``
        keeps them, is then only nearly so: ``expire`` stops at a flow seen lately, and
        takes the rest at a later turn)."""
        (record.packets_out, record.bytes_out, record.packets_back, record.bytes_back,
         record.last_seen, record.fins, record.reset, record.confirmed) = figures
        self._requeue(record)

    def _requeue(self, record: FlowRecord) -> None:
        """A flow just seen: the most recent of its queue (a held one moves queue when its
        timeout class changes)."""
        if record.held_as is None:
            if record in self._history:
                self._history.move_to_end(record)
            return
        lifetime = record.lifetime
        if lifetime is record.held_as:
            self._held[lifetime].move_to_end(record)
        else:
            del self._held[record.held_as][record]
            record.held_as = lifetime
            self._held[lifetime][record] = record

    def find(self, key: FlowKey) -> tuple[FlowRecord, bool] | None:
        """The record of a packet's flow and whether the packet goes the flow's way (a
        kernel-mode flow's is found by its own key only)."""
        return self._index.get(key)

    def find_held(self, key: FlowKey) -> tuple[FlowRecord, bool] | None:
        """As ``find``, for a flow whose state the table holds (a user-mode flow)."""
        found = self._index.get(key)
        return found if found is not None and found[0].held_as is not None else None

    def get(self, key: FlowKey) -> FlowRecord | None:
        """The record of the flow whose key (as admitted) is ``key``."""
        found = self._index.get(key)
        return found[0] if found is not None and found[0].key == key else None

    def holds(self, session_id: int) -> bool:
        """Whether a user-mode flow of the session is held."""
        return self._held_by_session[session_id] > 0

    def holds_redirected(self, protocol: int, client: IPAddress, port: Endpoint) -> bool:
        """Whether a user-mode flow that ``client`` sent to redirect port ``port`` (the fw's
        internal address and port) is held."""
        return (protocol, client, port) in self._held_by_redirect

    def expire(self, now: float) -> list[FlowRecord]:
        """Let go of every held flow conntrack has surely forgotten; return them."""
        out = []
        for lifetime, queue in self._held.items():
            timeout = RELEASE_MARGIN + (FAILED_KEPT if lifetime is Lifetime.FILTER_FAILED
                                        else self.timeouts.of(lifetime))
            while queue:
                record = next(iter(queue.values()))
                if record.last_seen + timeout > now:
                    break
                self.remove(record, now)
                out.append(record)
        return out

    def remove(self, record: FlowRecord, now: float) -> None:
        self._forget(record)
        if record.held_as is None:
            self._history.pop(record, None)
            return
        del self._held[record.held_as][record]
        record.held_as = None
        self.quota.release(record.key.src)
        self._held_by_session[record.session_id] -= 1
        if not self._held_by_session[record.session_id]:
            del self._held_by_session[record.session_id]
        if record.redirect is not None:
            redirect = _redirect_of(record)
            self._held_by_redirect[redirect] -= 1
            if not self._held_by_redirect[redirect]:
                del self._held_by_redirect[redirect]
        if self.on_release is not None:
            self.on_release(record, now)

    def _forget(self, record: FlowRecord) -> None:
        """A record leaves the table: its index entries go, and its editor gives back the
        bytes it holds to their budget."""
        index = self._index
        keys = [record.key]
        if record.redirect is not None:
            keys.append(record.client_side_key)
        if record.held:
            keys.append(reverse(record.key))
        for k in keys:
            found = index.pop(k, None)
            if found is not None and found[0] is not record:
                index[k] = found  # not its entry (its keys may coincide): put back
        if record.editor is not None:
            record.editor.release()

    def _records(self) -> Iterator[FlowRecord]:
        """Every record, each queue's most recent first."""
        return itertools.chain(reversed(self._history.values()),
                               *(reversed(queue.values()) for queue in self._held.values()))

    def seen_since(self, since: float) -> list[FlowRecord]:
        """The held flows seen at ``since`` or later (each queue read from its most recent
        until one seen before: it looks at no other)."""
        out = []
        for queue in self._held.values():
            for record in reversed(queue.values()):
                if record.last_seen < since:
                    break
                out.append(record)
        return out

    def held_by(self, worker: int) -> list[FlowRecord]:
        """The held flows a worker process holds (looks at every held record: for a
        worker's start, not for a packet)."""
        return [r for queue in self._held.values() for r in queue.values() if r.worker == worker]

    def newest(self, limit: int) -> list[FlowRecord]:
        """The ``limit`` flows seen last, newest first (looks at every record: for the
        flows listing, not for a packet)."""
        return heapq.nlargest(limit, self._records(), key=lambda r: r.last_seen)

    @property
    def held_count(self) -> int:
        return self.quota.used

    @property
    def history_count(self) -> int:
        return len(self._history)

    def __len__(self) -> int:
        return self.quota.used + len(self._history)
