"""The enforcer daemon: one event loop owning the queue, the control socket and signals.

Start-up order matters for failing closed: host settings a run that died left
changed are put back, the queue is bound, then the rules that feed it are
installed in place of whatever was there (the lockdown base a stop leaves, or a
crashed run's rules) in the same transaction, so there is no moment without
rules; that run's user-mode flows are forgotten (their filters died with it); the
control socket appears last, so a client that can connect knows the enforcer is
enforcing. A stop, clean or not, leaves the lockdown base (SPEC rule 15); only
``unload`` (``pinhole enforcer --unload``) removes everything.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import ipaddress
import itertools
import logging
import os
import resource
import selectors
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from enforcer import dataplane, filters, nflog, workers
from enforcer.api import Params, SessionApi
from enforcer.config import Config, ConfigError, SocksSettings
from enforcer.config import load as load_config
from enforcer.control import Caller, ControlServer, SocketInUse, refuse_if_served
from enforcer.core.binds import Bind
from enforcer.core.datafilter import DataFilter, DataFilterFactory, Direction, FilterFailed
from enforcer.core.decisions import QueuedPacket
from enforcer.core.effects import (
    BEFORE_VERDICT,
    AddKernelGrant,
    AddRedirect,
    Effect,
    ForgetBindFlows,
    GrowReceiveBuffer,
    HandOver,
    KernelGrant,
    LetGo,
    MapBind,
    RemoveKernelGrant,
    RemoveRedirect,
    UnmapBind,
)
from enforcer.core.engine import Engine
from enforcer.core.flows import SYSCTL, ConntrackTimeouts, FlowRecord
from enforcer.core.memory import memory_bound
from enforcer.core.packet import TCP, Ingress, IPAddress
from enforcer.core.permissions import Permission
from enforcer.core.results import InvalidArgument, IsBusy
from enforcer.listening import ListeningSockets
from enforcer.loop import Loop
from enforcer.nfqueue import Packet, Queue, QueueError, keep_freed_memory
from enforcer.socks_service import SocksService

log = logging.getLogger("pinhole.enforcer")

QUEUE_LENGTH = 8192  # packets the kernel holds for the enforcer before it drops (fails closed)
PACKETS_PER_TURN = 64  # queued packets decided before the loop turns to other work
TURN_SECONDS = 0.005  # ... or packets decided for this long (s), whichever comes first
PRUNE_INTERVAL = 5.0  # seconds between sweeps of empty per-client byte budgets
MAX_CONFIG_BYTES = 1 << 20  # a configuration a restart reads (in the loop)
# While the kernel holds grants, the longest the enforcer takes to hear of a flow admitted
# by one (its events, its record) when nothing else wakes it
KERNEL_NOTICE_DELAY = 0.01
KERNEL_TIMER_MS = 5  # the granularity of an nft element's timeout (a jiffy: 4 ms at HZ=250)


class StartupError(Exception):
    """The enforcer cannot start; the message says why and what to do."""


def discover(config: Config) -> dataplane.Interfaces:
    """Read the configured interfaces and their addresses from the kernel."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        def index(name: str, key: str) -> int:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise StartupError(f"interface '{name}' (network.{key}) does not exist "
                                   "in this network namespace")
            return int(found[0])

        def addresses(idx: int) -> list[tuple[str, int]]:
            return [(a.get("IFA_ADDRESS"), int(a["prefixlen"])) for a in ipr.get_addr(index=idx)]

        internal = {n: index(n, "internal_interfaces") for n in config.network.internal_interfaces}
        external = {n: index(n, "external_interfaces") for n in config.network.external_interfaces}
        internal_nets = dataplane.networks_of(a for i in internal.values() for a in addresses(i))
        internal_addrs = tuple(
            (name, ipaddress.ip_interface(f"{addr}/{plen}")) for name, i in internal.items()
            for addr, plen in addresses(i) if not ipaddress.ip_address(addr).is_link_local)
        # Sorted, so that "the first external address of a family" (the NAT
        # address) does not depend on the order the kernel lists them in.
        found = [ipaddress.ip_address(addr) for i in external.values() for addr, _ in addresses(i)]
        external_addrs = tuple(sorted((a for a in found if not a.is_link_local),
                                      key=lambda a: (a.version, int(a))))
    return dataplane.Interfaces(internal, external, internal_nets, external_addrs, internal_addrs)


def conntrack_timeouts(directory: Path = Path("/proc/sys/net/netfilter")) -> ConntrackTimeouts:
    """This network namespace's conntrack timeouts (a file that cannot be read keeps the
    kernel's default)."""
    values = {}
    for name in SYSCTL.values():
        try:
            values[name] = float((directory / name).read_text())
        except (OSError, ValueError):
            continue
    return ConntrackTimeouts.from_sysctl(values)


def resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_data_filters(targets: dict[str, str]) -> dict[str, DataFilterFactory]:
    """Import each configured "module:attribute" data filter factory."""
    factories: dict[str, DataFilterFactory] = {}
    for name, target in targets.items():
        module_name, _, attribute = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise StartupError(f"data filter '{name}': cannot load {target}: {exc}") from None
        if not callable(factory):  # it is called with each flow's key
            raise StartupError(f"data filter '{name}': {target} is not a factory (it cannot be "
                               "called)")
        factories[name] = factory
    return factories


def load_app_filters(config: Config) -> tuple[dict[str, filters.AppFilter], dict[str, str]]:
    """The enabled application filters, and which protocol (by name) each watches."""
    try:
        plugins = filters.load(list(config.app_filters))
    except filters.PluginError as exc:
        raise StartupError(str(exc)) from None
    watching: dict[str, str] = {}
    for name, plugin in plugins.items():
        protocol = next((p for p in config.policy.protocols
                         if str(p.guid) == str(plugin.protocol_guid).lower()), None)
        if protocol is None:
            raise StartupError(f"application filter '{name}' watches protocol GUID "
                               f"{plugin.protocol_guid}, and no [[protocol]] has it")
        if protocol.name in watching:
            raise StartupError(f"application filters '{watching[protocol.name]}' and '{name}' "
                               f"both watch {protocol.name}")
        watching[protocol.name] = name
    return plugins, watching


def build_engine(config: Config, interfaces: dataplane.Interfaces, conntrack: ConntrackTimeouts,
                 filter_names: Sequence[str], watching: dict[str, str]) -> Engine:
    """The decision core for a config and the interfaces it names (``filter_names``: the
    data and application filters a grant may name; ``watching``: protocol -> the
    application filter on its primaries)."""
    return Engine(config.policy, interfaces.networks_behind(), interfaces.external_addresses,
                  nat=config.network.nat, data_filters=filter_names,
                  internal_addresses=[a for _, a in interfaces.internal_addresses],
                  kernel_redirect_ports=config.dataplane.kernel_redirect_ports,
                  user_redirect_ports=config.dataplane.user_redirect_ports,
                  bind_ports=(config.socks or SocksSettings()).bind_ports,
                  app_filters=watching, limits=config.limits, conntrack=conntrack)


def settle_heap() -> None:
    """Before the loop: what the start made (modules, the setup's objects) is collected once
    and then left out of the cyclic GC's passes (``gc.freeze``), which otherwise walk it at
    every full collection and hold the loop for tens of ms (a queued packet waiting)."""
    gc.collect()
    gc.freeze()


def queued_packet(packet: Packet, arrived_on: Arrivals) -> QueuedPacket:
    """A packet read off a queue, as the core takes it."""
    return QueuedPacket(packet.payload, packet.hook, packet.mark, *arrived_on(packet.indev),
                        length=packet.length, checksum_ready=packet.checksum_ready, gso=packet.gso)


class _Guarded:
    """A flow's filter, whose failure ends the flow: its exception is logged once, and
    that call and every later one raise FilterFailed (the engine drops the flow's
    packets; the SOCKS service closes the relay). None: it could not be made."""

    def __init__(self, inner: DataFilter | None, what: str) -> None:
        self.inner = inner
        self.what = what

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        if self.inner is None:
            raise FilterFailed(self.what)
        try:
            return self.inner.on_data(direction, data)
        except Exception:
            log.exception("%s failed; its connection ends", self.what)
            self.inner = None
            raise FilterFailed(self.what) from None


def ensure_receive_buffer(sock: socket.socket, size: int) -> int:
    """Make a socket's receive buffer at least ``size`` (as root, past rmem_max); return it."""
    current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if current < size:
        sock.setsockopt(socket.SOL_SOCKET, dataplane.SO_RCVBUFFORCE, size)
        current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return int(current)


class Arrivals:
    """The side and the name of the interface a queued packet came in on, by its index
    (NFQUEUE's indev). An interface the config names on neither side (lo, say) counts as
    outside; index 0 is none: the fw's own packet."""

    def __init__(self, interfaces: dataplane.Interfaces) -> None:
        self.known = {**{i: (Ingress.EXTERNAL, n) for n, i in interfaces.external.items()},
                      **{i: (Ingress.INTERNAL, n) for n, i in interfaces.internal.items()}}

    def __call__(self, indev: int) -> tuple[Ingress, str]:
        known = self.known.get(indev)
        if known is not None:
            return known
        if not indev:
            return Ingress.EXTERNAL, ""
        try:
            return Ingress.EXTERNAL, socket.if_indextoname(indev)
        except OSError:
            return Ingress.EXTERNAL, f"interface #{indev}"


class Daemon:
    """One run of the enforcer: ``run`` enforces until a signal, or until a control
    client asks for a ``restart``; then ``successor`` is the next run (a new configuration
    in the same process, as a stop and a start would leave it)."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic,
                 source: Path | None = None, run: int = 1) -> None:
        self.config = config
        self.clock = clock
        self.source = source  # the file the configuration came from, re-read by a restart
        self.run_number = run
        self.successor: Daemon | None = None
        self.started = clock()
        self.interfaces = discover(config)
        self.filter_factories = load_data_filters(config.data_filters)
        self.app_filters, watching = load_app_filters(config)
        both = sorted(set(self.filter_factories) & set(self.app_filters))
        if both:
            raise StartupError(f"{', '.join(both)}: both a data filter and an application "
                               "filter; a grant's data_filter would not know which")
        self.engine = build_engine(config, self.interfaces, conntrack_timeouts(),
                                   [*self.filter_factories, *self.app_filters], watching)
        self.listening = ListeningSockets(clock)  # the fw's own sockets (rule 14)
        self.api = SessionApi(self.engine, clock, self.apply, listening=self.listening.current,
                              kernel_udp_flows=self.kernel_udp_flows)
        self.engine.stream_filter = self.stream_filter
        # the session API as application filters call it, in this process
        self.calls = filters.InProcessCalls({**self.api.handlers()})
        self.socks: SocksService | None = None
        self._arrived_on = Arrivals(self.interfaces)
        self.loop = Loop(self.engine.counters, clock)
        self._next_prune = clock()
        self.host = dataplane.HostSettings(state_file(config))
        self.maps: dataplane.NatMaps | None = None  # per-grant kernel NAT, once running
        self.conntrack: dataplane.Conntrack | None = None  # asked of conntrack, once running
        # grants the kernel holds (while running, where it can): the table that says the
        # enforcer lives, and the log of what the kernel admitted by them
        self.live: dataplane.LiveTable | None = None
        self.notices: nflog.Notices | None = None
        # a change of the kernel's grants failed: it may hold one the enforcer does not
        self.stray_grants = False
        self._stop = False
        self.backend: dataplane.Backend | None = None  # chosen at start
        self.queue: Queue | None = None  # bound while running
        self._queue_next = False  # a turn of the queue is due without waiting for its socket
        self.pool: workers.WorkerPool | None = None  # worker processes (dataplane.workers)

    # --- the packet path ------------------------------------------------------------
    def on_queue(self) -> None:
        """One turn of the queue (``Queue.turn``): packets taken in turn by source (one
        client's flood does not hold another's packets back), at most PACKETS_PER_TURN,
        and none after TURN_SECONDS (a flood keeps neither the control socket nor the timers
        waiting); each decided and its verdict buffered, with what a later packet depends
        on applied first; then the turn's verdicts sent in one go, then the rest of their
        effects (removals, events). Packets left held take the next turn of the loop."""
        assert self.queue is not None
        later: list[Effect] = []
        for packet in self.queue.turn(PACKETS_PER_TURN, self.clock() + TURN_SECONDS, self.clock):
            later += self.on_packet(packet)
        self.queue.flush()
        if later:
            with contextlib.suppress(dataplane.DataplaneError):  # logged
                self.apply(later)
        if self.queue.waiting and not self._queue_next:
            self._queue_next = True
            self.loop.call_later(0, self._next_queue_turn)

    def _next_queue_turn(self) -> None:
        self._queue_next = False
        self.on_queue()

    def on_packet(self, packet: Packet) -> list[Effect]:
        """One queued packet: the engine's answer, what must precede its verdict applied,
        the verdict buffered; the effects that are to follow it are returned."""
        assert self.queue is not None
        answer = None
        try:
            queued = queued_packet(packet, self._arrived_on)
            self.api.hold = True  # an application filter's calls: their effects come with the answer
            try:
                answer = self.engine.handle(queued, self.clock())
            finally:
                self.api.hold = False
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s", "accept" if answer.accept else "drop", answer.reason)
            first = [e for e in answer.effects if isinstance(e, BEFORE_VERDICT)]
            if first:
                with contextlib.suppress(dataplane.DataplaneError):  # logged, undone
                    self.apply(first)
            # (a payload the queue cannot carry, a filter's past 64 KiB, raises: dropped)
            self.queue.verdict(packet.packet_id, answer.accept, mark=answer.mark,
                               payload=answer.packet)
        except Exception:  # a bug in the shell: drop the packet, and keep enforcing
            log.exception("dropping a packet the enforcer failed to pass on")
            self.queue.verdict(packet.packet_id, False)
            if answer is None:
                return []
        # what the engine decided stands (a permission used, a flow recorded), the packet
        # passed or not: the kernel state it ended goes, its events are sent
        return [e for e in answer.effects if not isinstance(e, BEFORE_VERDICT)]

    def hear_kernel(self) -> None:
        """The flows the kernel admitted by grants it held, so far: the engine does for each
        what it does for a flow it admits (events, the flow's record), and the kernel's
        grants go. The kernel sends each notice as it admits the flow, before the packet
        leaves the fw; the enforcer reads them without being woken (a wake-up during every
        handshake would cost it what the grant saves): before each control request, so
        that an answer is never behind the traffic that came before it, after every turn of
        the loop, and at most ``KERNEL_NOTICE_DELAY`` apart while the kernel holds grants."""
        if self.notices is None:
            return
        lost = self.notices.lost
        self._heard()
        if self.notices.lost != lost and self.engine.kernel_grants:
            self._reconcile_grants()
        self.settle()

    def _heard(self) -> None:
        assert self.notices is not None
        now = self.clock()
        for data in self.notices.read():
            self.engine.kernel_admitted(data, now)

    def _reconcile_grants(self) -> None:
        """Some of the kernel's notices were lost (its socket's buffer was full): the grants
        the kernel no longer holds, of those the enforcer has heard nothing of since, were
        used (those about to expire apart: the kernel expires them a moment early)."""
        try:
            present = self._nat_maps().grant_keys()
        except dataplane.DataplaneError as exc:
            log.error("cannot compare the grants the kernel holds with the enforcer's: %s", exc)
            return
        self._heard()  # the notices that came before the listing
        soon = self.clock() + KERNEL_NOTICE_DELAY
        gone = [grant for grant in self.engine.kernel_grants.values()
                if (grant.permission.expires is None or grant.permission.expires > soon)
                and _grant_key(grant) not in present]
        if gone:
            log.warning("the kernel's notices of %d flow(s) were lost; their grants are used",
                        len(gone))
            self.engine.kernel_used_unheard(gone)

    def _take_stray_grants(self) -> None:
        """After a change of the kernel's grants failed: every grant the kernel holds that
        the enforcer does not (one it could not remove, one whose giving was not confirmed)
        is taken from it; tried again at each housekeeping until it is done: a grant the
        enforcer has ended must not go on admitting flows."""
        try:
            maps = self._nat_maps()
            stray = maps.grant_keys() - {_grant_key(g) for g in self.engine.kernel_grants.values()}
            if stray:
                maps.release(sorted(stray))
        except dataplane.DataplaneError as exc:
            log.error("cannot take stray grants from the kernel (tried again shortly): %s", exc)
            return
        if stray:
            log.warning("took %d grant(s) the enforcer no longer holds from the kernel", len(stray))
            self.engine.counters["kernel grants: strays taken"] += len(stray)
        self.stray_grants = False

    def _hearing_first(self, handler: Callable[[dict[str, Any], Caller], Any]
                       ) -> Callable[[dict[str, Any], Caller], Any]:
        def handle(params: dict[str, Any], caller: Caller) -> Any:
            self.hear_kernel()
            return handler(params, caller)
        return handle

    def stream_filter(self, record: FlowRecord) -> DataFilter:
        """The data filter, or the application filter's stream filter, of a flow: one that
        could not be made (its factory or ``attach`` raised) fails at its first use."""
        name = record.app_filter or record.data_filter
        key = record.key
        made: DataFilter | None = None
        if name in self.app_filters:
            session = self.engine.sessions.get(record.session_id)
            primary = filters.Primary(
                record.session_id, "tcp" if key.protocol == TCP else "udp", (key.src, key.sport),
                (key.dst, key.dport), translated=record.snat is not None,
                firewall_client=session is not None and session.kind != "securenat",
                via=record.redirect)
            what = f"application filter '{name}' on {key}"
            try:
                made = self.app_filters[name].attach(primary, self.calls)
            except Exception:
                log.exception("%s could not attach; its connection ends", what)
        else:
            what = f"data filter '{record.data_filter}' on {key}"
            try:
                made = self.filter_factories[str(record.data_filter)](key)
            except Exception:
                log.exception("%s could not be made; its connection ends", what)
        return _Guarded(made, what)

    # --- effects: what the engine asks of the kernel and of filters -----------------
    def _nat_maps(self) -> dataplane.NatMaps:
        if self.maps is None:
            raise dataplane.DataplaneError("the enforcer is not running: no NAT maps to write")
        return self.maps

    def _pool(self) -> workers.WorkerPool:
        if self.pool is None:
            raise workers.WorkerError("the enforcer runs no worker processes")
        return self.pool

    def _conntrack(self) -> dataplane.Conntrack:
        if self.conntrack is None:
            raise dataplane.DataplaneError("the enforcer is not running: no flows to forget")
        return self.conntrack

    def kernel_udp_flows(self, client: IPAddress, internal: IPAddress) -> set[int]:
        """The ports of ``internal`` by which ``client``'s UDP flows were redirected in the
        kernel, as conntrack holds them (none before the enforcer runs: nothing passes
        then). IsBusy if conntrack does not answer: a UDP redirect is then refused, never
        given a port that may lead down a live flow elsewhere."""
        if self.conntrack is None:
            return set()
        try:
            return self.conntrack.redirected_udp_ports(client, internal)
        except dataplane.DataplaneError as exc:
            log.error("%s", exc)
            raise IsBusy(f"cannot tell which redirect ports {client}'s UDP flows hold: "
                         f"{exc}") from None

    def settle(self) -> None:
        """Apply what the engine has asked for since (SOCKS relays, the timer)."""
        with contextlib.suppress(dataplane.DataplaneError):  # logged, undone
            self.api.settle()

    def apply(self, effects: Sequence[Effect]) -> None:
        """Do what the engine asked, in order, consecutive NAT changes in one netlink
        request. A grant or a bind whose kernel state cannot be made is withdrawn and the
        error raised once all is done (the call that made it fails); a removal that fails
        is logged (the engine refuses what it would admit: its action is done)."""
        failure: dataplane.DataplaneError | None = None
        for kind, grouped in itertools.groupby(effects, type):
            group = list(grouped)
            try:
                self._apply(kind, group)
            except dataplane.DataplaneError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _apply(self, kind: type, group: list[Any]) -> None:
        if kind is AddRedirect:
            try:
                self._nat_maps().add([_redirect_rule(e.permission) for e in group])
            except dataplane.DataplaneError as exc:
                log.error("cannot install a redirect: %s; the grant is withdrawn", exc)
                for effect in group:
                    self._withdraw(effect.permission)
                raise
        elif kind is AddKernelGrant:
            try:
                self._nat_maps().hold([self._grant_rule(e.grant) for e in group])
            except dataplane.DataplaneError as exc:
                # the user-space path is the fallback: the grant stands, the enforcer matches it
                unheld = group[-exc.count:] if isinstance(exc, dataplane.GrantsNotHeld) else group
                log.warning("the kernel cannot hold %d grant(s), the enforcer matches them: %s",
                            len(unheld), exc)
                for effect in unheld:
                    self.engine.keep_grant(effect.grant)
                self.stray_grants = True  # in case a grant it did not confirm is the kernel's
        elif kind is RemoveKernelGrant:
            try:
                self._nat_maps().release([_grant_key(e.grant) for e in group])
            except dataplane.DataplaneError as exc:
                log.error("cannot remove ended grants from the kernel (tried again shortly): %s",
                          exc)
                self.stray_grants = True
        elif kind is MapBind:
            for effect in group:
                try:
                    self._nat_maps().add([_bind_rule(effect.bind)])
                except dataplane.DataplaneError as exc:
                    log.error("cannot map bind %d to its client: %s; it is withdrawn",
                              effect.bind.id, exc)
                    self._withdraw(effect.bind)
                    raise
        elif kind in (RemoveRedirect, UnmapBind):
            rules = [_redirect_rule(e.permission) if kind is RemoveRedirect else _bind_rule(e.bind)
                     for e in group]
            try:
                self._nat_maps().delete(rules)
            except dataplane.DataplaneError as exc:
                log.error("cannot remove finished redirects or binds: %s", exc)
        elif kind is ForgetBindFlows:
            for effect in group:
                try:
                    self._conntrack().forget(effect.bind.port)
                except dataplane.DataplaneError as exc:
                    # its socket is gone: the kernel hands the datagrams to the enforcer,
                    # which drops them, until the port is bound again
                    log.error("cannot forget the flows of closed bind %d: %s", effect.bind.id, exc)
        elif kind is HandOver:
            for effect in group:
                try:
                    self._pool().hand_over(effect.record, effect.worker)
                except workers.WorkerError as exc:
                    # its mark sends its packets to that worker, which drops them: fail closed
                    log.error("cannot hand flow %s to its worker: %s", effect.record.key, exc)
                    self.engine.counters["user-mode flows lost with a worker"] += 1
        elif kind is LetGo:
            for effect in group:
                with contextlib.suppress(workers.WorkerError):  # gone: it forgot them all
                    self._pool().let_go(effect.key, effect.admitted_at, effect.worker)
        elif kind is GrowReceiveBuffer:
            for effect in group:
                try:
                    self._grow_receive_buffer(effect.holder)
                except OSError as exc:
                    log.error("cannot grow a receive buffer: %s; the grant or bind is withdrawn",
                              exc)
                    self._withdraw(effect.holder)
                    raise dataplane.DataplaneError(f"cannot grow a receive buffer: {exc}") from None
        else:  # an event for a session filter
            for event in group:
                self.api.deliver(event)

    def _grant_rule(self, grant: KernelGrant) -> dataplane.GrantRule:
        """A grant as the kernel holds it, its timeout what is left of the permission's, less
        the kernel timer's granularity: the kernel never admits by a grant the enforcer has
        expired (a SYN in the last moment is the enforcer's to drop)."""
        perm = grant.permission
        timeout = (None if perm.expires is None
                   else max(1, int((perm.expires - self.clock()) * 1000) - KERNEL_TIMER_MS))
        return dataplane.GrantRule(grant.protocol, perm.client, grant.target, grant.port,
                                   grant.mark, timeout)

    def _withdraw(self, holder: Permission | Bind) -> None:
        """A grant or a bind whose part in the kernel failed."""
        if isinstance(holder, Bind):
            self.engine.withdraw_bind(holder)
        else:
            self.engine.withdraw_grant(holder, self.clock())

    def _increase_queue_buffer(self) -> int:
        """INCREASE_RECEIVE_BUFFER for the queue, where a flow's datagrams wait for the
        enforcer (all of a user-mode flow's; a kernel-mode flow's until the kernel knows
        its verdict): its buffer grows, for every flow (there is one main queue; a worker's
        has that size from its start)."""
        assert self.queue is not None
        return ensure_receive_buffer(self.queue.socket, self.config.dataplane.increased_receive_buffer)

    def _grow_receive_buffer(self, holder: Permission | Bind) -> None:
        """A grant's flows' datagrams wait in the queue. An approved UDP bind's: a
        SecureNAT bind's flow runs in kernel mode, only the queue holds its datagrams, and
        ``receive_buffer`` is the queue's; a Firewall client's bind is a socket of the fw,
        whose buffer ``receive_buffer`` then is (each new flow's first datagrams wait in
        the queue too)."""
        size = self._increase_queue_buffer()
        if isinstance(holder, Bind):
            held = None if self.socks is None or holder.for_securenat else self.socks.socket_of(holder)
            if held is not None:
                size = ensure_receive_buffer(held, self.config.dataplane.increased_receive_buffer)
        holder.receive_buffer = size

    # --- control API ----------------------------------------------------------------
    def _status(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        Params(params, set())
        return {
            "pid": os.getpid(),
            "run": self.run_number,
            "uptime_s": round(self.clock() - self.started, 3),
            "backend": "none" if self.backend is None else self.backend.name,
            "queue": self.config.dataplane.queue,
            "fail_open": self.config.dataplane.fail_open,
            "nat": self.config.network.nat,
            "internal_networks": [str(n) for n in self.interfaces.internal_networks],
            "networks_behind": {name: [str(n) for n in networks.networks]
                                for name, networks in self.engine.ingress.behind.items()},
            "external_addresses": [str(a) for a in self.interfaces.external_addresses],
            "counters": dict(self.engine.counters),
            "sessions": len(self.engine.sessions),
            "flows": len(self.engine.flows),
            "pending_actions": len(self.engine.permissions),
            "redirect_ports": {("user" if user else "kernel"): pool.to_dict()
                               for user, pool in self.engine.pools.items()},
            "receive_buffer": None if self.queue is None else
            self.queue.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            # the queue's own troubles: the kernel could not deliver packets (fail-closed:
            # dropped), refused verdicts, messages that did not parse
            "queue_errors": None if self.queue is None else {
                "overflows": self.queue.overflows, "verdict_errors": self.queue.verdict_errors,
                "verdicts_retried": self.queue.verdicts_retried, "malformed": self.queue.malformed},
            # the worker processes that read user-mode flows' packets (None: none run)
            "workers": None if self.pool is None else self.pool.status(),
            # single-use kernel-mode grants the kernel holds (None: the enforcer matches all);
            # what the kernel admitted by them is counted as "kernel grants: used"
            "kernel_grants": None if self.notices is None else {
                "held": len(self.engine.kernel_grants), "notices_lost": self.notices.lost},
            "limits": {**self.engine.limits_status(), **self.engine.buffered.status(),
                       **(self.socks.limits_status() if self.socks is not None else {})},
            "memory": {"rss": resident_bytes(), "bound": memory_bound(self.config.limits)},
            "listening": self.listening.current().to_list(),
        }

    def _restart(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """Stop and start again in this process, with the configuration in ``config`` (a
        file; by default the one this run came from, read again): what a stop leaves, then
        what a start makes, without a new process. A configuration that cannot start is
        refused, and this run goes on."""
        given = Params(params, {"config"}).string("config", required=False, max_len=4096)
        path = Path(given) if given else self.source
        if path is None:
            raise InvalidArgument("'config' is required: this run did not start from a file")
        if given and not path.is_absolute():  # the enforcer's directory is not the caller's
            raise InvalidArgument(f"'config' must be an absolute path, not '{given}'")
        # read in the loop: nothing that could block it (a FIFO) or fill its memory
        if path.exists() and (not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES):
            raise InvalidArgument(f"not restarting: {path} is not a regular file of at most "
                                  f"{MAX_CONFIG_BYTES} bytes")
        try:
            loaded = load_config(path)
            if loaded.control_socket != self.config.control_socket:
                log.warning("restart keeps the control socket %s (the new file's %s takes a "
                            "new process)", self.config.control_socket, loaded.control_socket)
            config = replace(loaded, control_socket=self.config.control_socket)
            self.successor = Daemon(config, clock=self.clock, source=path, run=self.run_number + 1)
        except (ConfigError, StartupError, dataplane.DataplaneError) as exc:
            raise InvalidArgument(f"not restarting: {exc}") from None
        log.info("restarting with %s as run %d", path, self.run_number + 1)
        self._stop = True
        return {"restarting": True, "run": self.run_number + 1}

    # --- lifecycle ------------------------------------------------------------------
    def _ruleset(self, working: bool) -> dataplane.Ruleset:
        return ruleset(self.config, self.interfaces, working)

    def run(self) -> None:
        # Refuse to start beside a live enforcer before touching anything of its.
        try:
            refuse_if_served(Path(self.config.control_socket))
        except SocketInUse as exc:
            raise StartupError(str(exc)) from None
        restored = self.host.restore()
        if restored:
            log.warning("put back host settings a run that did not stop cleanly had changed: %s",
                        "; ".join(restored))
        _raise_file_limit()
        keep_freed_memory()  # a turn's GSO payloads reused, not given back and faulted in again
        try:
            # GSO: a flow's packets come whole, up to 64 KiB, one verdict for all their
            # segments; fail_open: what the queue cannot hold passes (only if configured)
            queue = Queue(self.config.dataplane.queue, max_len=QUEUE_LENGTH, gso=True,
                          fail_open=self.config.dataplane.fail_open,
                          receive_buffer=self.config.dataplane.receive_buffer)
        except QueueError as exc:
            raise StartupError(f"cannot bind NFQUEUE {self.config.dataplane.queue}: {exc}") from None
        self.queue = queue
        wake_r, wake_w = socket.socketpair()
        control: ControlServer | None = None
        installed = False
        try:
            self.backend = backend = dataplane.choose_backend(self.config.dataplane)
            replaced = backend.install(self._ruleset(working=True))
            installed = True
            if replaced:
                log.warning("took over from a run that did not stop cleanly; replaced its %s",
                            "; ".join(replaced))
            forgotten = dataplane.forget_flows(("user", "local"))
            if forgotten:
                log.warning("forgot the user-mode flows and the flows to Firewall clients' binds "
                            "of an earlier run (their filters and sockets went with it): %s",
                            "; ".join(forgotten))
            self.maps = dataplane.NatMaps()
            self.conntrack = dataplane.Conntrack()
            if self.config.dataplane.kernel_grants:
                self._hold_grants_in_kernel()
            if self.filter_factories or self.app_filters:
                self.host.liberal_tcp_tracking()
            if self.config.dataplane.workers:
                self._start_workers()
            wake_w.setblocking(False)
            signal.set_wakeup_fd(wake_w.fileno())
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            self.loop.watch(queue.socket, selectors.EVENT_READ, self.on_queue)
            self.loop.watch(wake_r, selectors.EVENT_READ, functools.partial(_drain, wake_r))
            try:
                handlers = {**self.api.handlers(), "status": self._status, "restart": self._restart}
                control = ControlServer(self.config.control_socket,
                                        {name: self._hearing_first(handler)
                                         for name, handler in handlers.items()},
                                        self.loop, self.api.disconnected)
            except OSError as exc:
                raise StartupError(f"cannot serve the control socket {self.config.control_socket}: "
                                   f"{exc.strerror or exc}") from None
            if self.config.socks is not None:
                try:
                    self.socks = SocksService(
                        self.engine, self.loop, self.clock, self.config.socks,
                        [a.ip for _, a in self.interfaces.internal_addresses], self.settle,
                        self.stream_filter)
                except OSError as exc:
                    raise StartupError(f"cannot serve SOCKS on port {self.config.socks.port}: "
                                       f"{exc.strerror or exc}") from None
            log.info("enforcing with %s: queue %d, %s, control socket %s", backend.name,
                     self.config.dataplane.queue,
                     "fail-open" if self.config.dataplane.fail_open else "fail-closed",
                     self.config.control_socket)
            for warning in self.interfaces.warnings(self.config.network.nat):
                log.warning("%s", warning)
            settle_heap()
            while not self._stop:
                self.loop.run_once(self._until_next_expiry())
                self.loop.guard(self._housekeeping, None, "housekeeping")
        finally:
            signal.set_wakeup_fd(-1)
            if self.socks is not None:
                self.socks.close()
            if control is not None:
                control.close()
            if self.live is not None:  # first: the kernel's grants admit nothing more
                self.live.close()
                self.live = None
            if self.notices is not None:
                self.notices.close()
                self.notices = None
            if self.pool is not None:  # their queues' packets are dropped from now on
                self.pool.close()
                self.pool = None
            if self.maps is not None:
                self.maps.close()
                self.maps = None
            if self.conntrack is not None:
                self.conntrack.close()
                self.conntrack = None
            try:
                if installed:
                    self._leave()
                self.host.restore()
            finally:
                queue.close()
                self.queue = None
                wake_r.close()
                wake_w.close()
                self.loop.close()

    def _hold_grants_in_kernel(self) -> None:
        """Let the kernel hold single-use kernel-mode grants, where it can: the table that
        says this process lives, the log of what the kernel admits, and a removal the
        kernel must take (Linux 6.3's NFT_MSG_DESTROYSETELEM). Where it cannot, the
        enforcer matches every grant itself (logged)."""
        assert self.maps is not None
        try:
            probe = dataplane.GrantRule(TCP, ipaddress.ip_address("192.0.2.1"),
                                        ipaddress.ip_address("192.0.2.2"), 1, 0, None)
            self.maps.release([probe.key])
            self.notices = nflog.Notices(self.config.dataplane.queue)
            self.live = dataplane.LiveTable()
        except (dataplane.DataplaneError, OSError) as exc:
            log.warning("the kernel cannot hold grants (%s); the enforcer matches every grant", exc)
            if self.notices is not None:
                self.notices.close()
                self.notices = None
            return
        self.engine.grants_in_kernel = True

    def _start_workers(self) -> None:
        """Start the worker processes and wait until each has bound its queue (README
        "Worker processes")."""
        setup = workers.Setup(0, self.config, self.interfaces, self.engine.flows.timeouts,
                              logging.getLogger("pinhole").getEffectiveLevel())
        self.pool = pool = workers.WorkerPool(setup, self.clock)
        try:
            pool.start()
        except workers.WorkerError as exc:
            raise StartupError(str(exc)) from None
        for worker in pool.workers.values():
            self._watch_worker(worker)
        self.engine.workers = pool.ready

    def _watch_worker(self, worker: workers.Worker) -> None:
        assert worker.socket is not None
        self.loop.watch(worker.socket, selectors.EVENT_READ,
                        functools.partial(self._from_worker, worker.index))

    def _from_worker(self, index: int) -> None:
        """What a worker sent: that it is ready (a successor: it takes its predecessor's flows),
        what it saw of its flows and its counters; or that it is gone (no flow goes to it
        until its successor is ready)."""
        pool = self._pool()
        messages, gone = pool.read(index)
        for message in messages:
            if message[0] == "seen":
                self.engine.worker_saw(message[1])
                self.engine.counters.update(message[2])
            elif message[0] == "ready":  # a successor: its predecessor's flows are its
                pool.workers[index].backlog = self.engine.flows.held_by(index)
                self._hand_back(index)
                self.engine.workers = pool.ready
        if gone:
            self._lose_worker(index)

    def _lose_worker(self, index: int) -> None:
        """A worker gone (or killed): watched no more, and no new flow goes to it; its
        flows wait for its successor."""
        pool = self._pool()
        self.loop.unwatch(pool.workers[index].socket)
        pool.lost(index)
        self.engine.workers = pool.ready

    def _watch_dog(self, now: float) -> None:
        """Kill the workers that have said nothing for too long (``enforcer.workers``), once
        what they sent that the loop has not read yet is read."""
        pool = self._pool()
        for index in pool.silent(now):
            self._from_worker(index)
            if pool.workers[index].silent(self.clock()):
                pool.kill(index)
                self._lose_worker(index)
                self.engine.counters["worker processes killed: silent"] += 1

    def _hand_back(self, index: int) -> None:
        """A successor's predecessor's flows go to it as its socket has room (the rest at
        the next turns of the loop)."""
        try:
            self._pool().flush(index)
        except workers.WorkerError as exc:  # it went again: its successor takes them
            log.error("cannot hand worker %d its flows again: %s", index, exc)

    def _housekeeping(self) -> None:
        self.hear_kernel()
        if self.queue is not None and self.queue.unsent:  # (no packet may come to flush them)
            self.queue.flush()
        if self.stray_grants:
            self._take_stray_grants()
        now = self.clock()
        if self.pool is not None:
            self._watch_dog(now)
            for worker in self.pool.due(now):
                if self.pool.restart(worker):
                    self._watch_worker(worker)
            for index in self.pool.backlogged:
                self._hand_back(index)
        self.engine.expire(now)
        if now >= self._next_prune:  # clients' byte budgets that hold nothing any more
            self.engine.buffered.prune()
            self._next_prune = now + PRUNE_INTERVAL
        if self.socks is not None:
            self.socks.tick(now)
        self.settle()

    def _leave(self) -> None:
        """What a stop leaves: the lockdown base, the working rules gone in the same
        transaction (failing open: nothing at all)."""
        if self.config.dataplane.fail_open:
            dataplane.unload()
            log.info("stopped; fail_open: every rule removed, traffic passes")
            return
        assert self.backend is not None  # installed at start
        self.backend.install(self._ruleset(working=False))
        # as a start forgets a dead run's: user-mode flows (their filters are gone) and
        # flows to Firewall clients' UDP binds (their sockets are: the fw's input base
        # would hand the peers' datagrams to whatever binds the port next)
        dataplane.forget_flows(("user", "local"))
        log.info("stopped; lockdown: admitted kernel-mode flows go on, nothing new passes "
                 "('pinhole enforcer --unload' removes the rules)")

    def _until_next_expiry(self) -> float:
        """How long the loop may wait: until the next permission expires or the SOCKS
        service's next timeout, at most a second (while the kernel holds grants, at most
        ``KERNEL_NOTICE_DELAY``: what it admitted by them is heard that soon)."""
        due = [d for d in (self.engine.permissions.next_expiry(),
                           None if self.socks is None else self.socks.next_deadline())
               if d is not None]
        longest = KERNEL_NOTICE_DELAY if self.engine.kernel_grants else 1.0
        return min(longest, max(0.0, min(due) - self.clock())) if due else longest

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop = True
        if self.successor is not None:  # a restart is under way: the stop is the next run's
            self.successor._on_signal(signum, frame)  # (its handler is not in place yet)


def _redirect_rule(perm: Permission) -> dataplane.RedirectRule:
    r = perm.redirect
    assert r is not None
    return dataplane.RedirectRule(r.protocol, r.client, r.internal, r.internal_port, r.target,
                                  r.target_port)


def _grant_key(grant: KernelGrant) -> bytes:
    """The key the kernel holds a grant under."""
    return dataplane.flow_key(grant.permission.client, grant.target, grant.protocol, grant.port)


def _bind_rule(bind: Bind) -> dataplane.BindRule:
    """A translated SecureNAT bind's kernel NAT: to its client, from the fw when it has a
    ``source``."""
    assert bind.client is not None and bind.client_port is not None
    return dataplane.BindRule(bind.protocol, bind.address, bind.port, bind.client,
                              bind.client_port, bind.source)


def state_file(config: Config) -> Path:
    """Where the daemon keeps what it must put back (beside its control socket)."""
    return Path(config.control_socket).with_suffix(".state")


def ruleset(config: Config, interfaces: dataplane.Interfaces, working: bool) -> dataplane.Ruleset:
    return dataplane.Ruleset(config.dataplane, interfaces, config.network.nat,
                             config.socks.bind_ports if config.socks else None, config.limits,
                             working, config.socks.port if config.socks else None)


def _not_running(config: Config, what: str) -> None:
    try:
        refuse_if_served(Path(config.control_socket))
    except SocketInUse as exc:
        raise StartupError(f"{exc}: stop it first ({what} would take its rules away)") from None


def lockdown(config: Config) -> list[str]:
    """Put the lockdown base alone in place, before any enforcer has run (at boot, say):
    nothing new is forwarded and nothing from outside reaches the fw until an enforcer
    starts. What it replaced of ours is returned."""
    _not_running(config, "a lockdown")
    if config.dataplane.fail_open:
        raise StartupError("the config says fail_open = true: with it there is no lockdown")
    interfaces = dataplane.Interfaces(
        {name: 0 for name in config.network.internal_interfaces},
        {name: 0 for name in config.network.external_interfaces}, (), ())
    return dataplane.choose_backend(config.dataplane).install(ruleset(config, interfaces, working=False))


def unload(config: Config) -> list[str]:
    """Remove every rule of ours, the lockdown base included, forget our flows, and put
    back the host settings a run changed: the operator's explicit command."""
    _not_running(config, "an unload")
    return dataplane.unload() + dataplane.HostSettings(state_file(config)).restore()


def _drain(sock: socket.socket) -> None:
    """Read what the signal handler's wake-up wrote (the loop then sees the stop flag)."""
    sock.recv(512)


def _raise_file_limit() -> None:
    """As many file descriptors as the hard limit allows (clients' connections use them);
    running out is handled (listeners pause), but should be rare."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
