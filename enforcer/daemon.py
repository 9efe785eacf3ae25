"""The enforcer daemon: one event loop owning the queue, the control socket and signals.

Start-up order matters for failing closed: stale state from a crashed run is
removed, the queue is bound, then the rules that feed it are installed; the
control socket appears last, so a client that can connect knows the enforcer
is enforcing. A clean exit removes all of it.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from enforcer import dataplane, rewrite
from enforcer.api import Params, SessionApi
from enforcer.config import Config
from enforcer.control import AlreadyRunning, Caller, ControlServer, refuse_if_served
from enforcer.core.datafilter import DataFilterFactory, Direction, TcpStreamEditor
from enforcer.core.engine import Engine, Verdict
from enforcer.core.flows import FlowRecord
from enforcer.core.packet import TCP, Ingress, Malformed, parse

log = logging.getLogger("pinhole.enforcer")


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
        # Sorted, so that "the first external address of a family" (the NAT
        # address) does not depend on the order the kernel lists them in.
        found = [ipaddress.ip_address(addr) for i in external.values() for addr, _ in addresses(i)]
        external_addrs = tuple(sorted((a for a in found if not a.is_link_local),
                                      key=lambda a: (a.version, int(a))))
    return dataplane.Interfaces(internal, external, internal_nets, external_addrs)


def load_data_filters(targets: dict[str, str]) -> dict[str, DataFilterFactory]:
    """Import each configured "module:attribute" data filter factory."""
    factories: dict[str, DataFilterFactory] = {}
    for name, target in targets.items():
        module_name, _, attribute = target.partition(":")
        try:
            factories[name] = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise StartupError(f"data filter '{name}': cannot load {target}: {exc}") from None
    return factories


class Daemon:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.started = clock()
        self.selector = selectors.DefaultSelector()
        self.interfaces = discover(config)
        self.filter_factories = load_data_filters(config.data_filters)
        self.engine = Engine(config.policy, self.interfaces.internal_networks,
                             self.interfaces.external_addresses, nat=config.network.nat,
                             data_filters=self.filter_factories)
        self.api = SessionApi(self.engine, clock)
        self._ingress = {i: Ingress.INTERNAL for i in self.interfaces.internal.values()}
        self._stop = False
        self.backend = "none"

    # --- the packet path ------------------------------------------------------------
    def on_packet(self, pkt: Any) -> None:
        try:
            self._on_packet(pkt)
        except Exception:  # fail closed on a bug, and keep enforcing
            log.exception("dropping a packet the enforcer failed to decide")
            self.engine.counters["errors"] += 1
            pkt.drop()

    def _on_packet(self, pkt: Any) -> None:
        ingress = self._ingress.get(pkt.indev, Ingress.EXTERNAL)
        try:
            meta = parse(pkt.get_payload(), ingress)
        except Malformed as exc:
            self.engine.counters["malformed"] += 1
            log.debug("drop malformed packet: %s", exc)
            pkt.drop()
            return
        length = pkt.get_payload_len()
        if dataplane.is_user_mode(pkt.get_mark()):
            found = self.engine.user_packet(meta, length, self.clock())
            if found is not None and found[0].data_filter is not None and meta.key.protocol == TCP:
                self._run_data_filter(pkt, *found)
            pkt.accept()
            return
        decision = self.engine.decide(meta, self.clock(), length)
        log.debug("%s %s: %s", decision.verdict.value, meta.key, decision.reason)
        if decision.verdict is not Verdict.DROP:
            mark = dataplane.mark_for(decision.verdict is Verdict.ADMIT_USER, decision.one_way,
                                      decision.external_index)
            pkt.set_mark((pkt.get_mark() & ~dataplane.MARK_MASK) | mark)
            pkt.accept()
            self.api.dispatch_events()
        else:
            pkt.drop()

    def _run_data_filter(self, pkt: Any, record: FlowRecord, forward: bool) -> None:
        if record.editor is None:
            factory = self.filter_factories[str(record.data_filter)]
            record.editor = TcpStreamEditor(factory(record.key))
        packet, segment = rewrite.parse_segment(pkt.get_payload())
        edited = record.editor.edit(Direction.OUT if forward else Direction.BACK,
                                    segment.seq, segment.ack, segment.payload)
        if edited != (segment.seq, segment.ack, segment.payload):
            pkt.set_payload(rewrite.rebuild(packet, *edited))

    # --- control API ----------------------------------------------------------------
    def _status(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        Params(params, set())
        return {
            "pid": os.getpid(),
            "uptime_s": round(self.clock() - self.started, 3),
            "backend": self.backend,
            "queue": self.config.dataplane.queue,
            "fail_open": self.config.dataplane.fail_open,
            "nat": self.config.network.nat,
            "internal_networks": [str(n) for n in self.interfaces.internal_networks],
            "external_addresses": [str(a) for a in self.interfaces.external_addresses],
            "counters": dict(self.engine.counters),
            "sessions": len(self.engine.sessions),
            "flows": len(self.engine.flows),
            "pending_actions": len(self.engine.permissions),
        }

    # --- lifecycle ------------------------------------------------------------------
    def run(self) -> None:
        from netfilterqueue import NetfilterQueue

        # Refuse to start beside a live enforcer before touching anything of its.
        try:
            refuse_if_served(Path(self.config.control_socket))
        except AlreadyRunning as exc:
            raise StartupError(str(exc)) from None
        nfq = NetfilterQueue()
        try:
            nfq.bind(self.config.dataplane.queue, self.on_packet, max_len=8192)
        except OSError as exc:
            raise StartupError(f"cannot bind NFQUEUE {self.config.dataplane.queue}: {exc} "
                               "(is another enforcer running in this namespace?)") from None
        wake_r, wake_w = socket.socketpair()
        control: ControlServer | None = None
        liberal_before: bool | None = None
        try:
            stale = dataplane.remove()
            if stale:
                log.warning("removed stale state of an earlier run: %s", "; ".join(stale))
            self.backend = dataplane.choose_backend(self.config.dataplane)
            dataplane.install(self.backend, self.config.dataplane, self.interfaces,
                              self.config.network.nat)
            if self.filter_factories:
                liberal_before = dataplane.liberal_tcp_tracking(True)
            wake_w.setblocking(False)
            signal.set_wakeup_fd(wake_w.fileno())
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            queue_fd = socket.socket(fileno=os.dup(nfq.get_fd()))
            self.selector.register(queue_fd, selectors.EVENT_READ, lambda: nfq.run(block=False))
            self.selector.register(wake_r, selectors.EVENT_READ, lambda: wake_r.recv(512))
            try:
                control = ControlServer(self.config.control_socket,
                                        {**self.api.handlers(), "status": self._status},
                                        self.selector, self.api.disconnected)
            except OSError as exc:
                raise StartupError(f"cannot serve the control socket {self.config.control_socket}: "
                                   f"{exc.strerror or exc}") from None
            log.info("enforcing with %s: queue %d, %s, control socket %s", self.backend,
                     self.config.dataplane.queue,
                     "fail-open" if self.config.dataplane.fail_open else "fail-closed",
                     self.config.control_socket)
            while not self._stop:
                for key, _ in self.selector.select(timeout=self._until_next_expiry()):
                    key.data()
                self.engine.expire(self.clock())
        finally:
            if liberal_before is not None:
                dataplane.liberal_tcp_tracking(liberal_before)
            signal.set_wakeup_fd(-1)
            if control is not None:
                control.close()
            dataplane.remove()
            nfq.unbind()
            wake_r.close()
            wake_w.close()
            log.info("stopped; kernel state removed")

    def _until_next_expiry(self) -> float:
        due = self.engine.permissions.next_expiry()
        return 1.0 if due is None else min(1.0, max(0.0, due - self.clock()))

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop = True
