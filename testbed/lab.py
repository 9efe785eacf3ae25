"""The enforcer as the harness runs it: the lab policy and a handle on the daemon process.

The lab policy is written for the standard topology: every clause's traffic is
chosen against it (FTP, TFTP and DNS for every client, on every internal network;
HTTP for c1 only; SSH defined but allowed to nobody; the topology's "denied"
network blocked by a site rule).

This is the one module of the harness that reads the enforcer's own (public, documented)
constants: what its config must name and what a few checks inspect of it in the fw.
Everything else reaches the firewall through its driver, its packets and its wire
protocols (testbed.session_api).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from enforcer.dataplane import MAPS_TABLE, MARK_KERNEL, MARK_MODE, MARK_ONE_WAY, MARK_USER
from enforcer.plugins.ftp import FTP_GUID
from enforcer.plugins.tftp import TFTP_GUID
from enforcer.protocol import MAX_REQUEST
from testbed.build import Testbed
from testbed.catalog import CLAUSES, NO_FIREWALL_BEHAVIOUR
from testbed.drivers import MODES, Firewall
from testbed.session_api import ControlClient, ControlError, SessionApiError
from testbed.topology import FAMILIES

# The protocols' GUIDs; FTP's and TFTP's are those the enforcer's bundled filters watch
GUIDS = {
    "FTP": FTP_GUID,
    "HTTP": "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2102",
    "SSH": "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2103",
    "DNS": "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2104",
    "TFTP": TFTP_GUID,
}
# Firewall clients' SOCKS5 users (user -> password)
SOCKS_USERS = {"alice": "alice-secret", "bob": "bob-secret"}
SOCKS_PORT = 1080
PORTS = {"FTP": ("tcp", 21), "HTTP": ("tcp", 80), "SSH": ("tcp", 22), "DNS": ("udp", 53),
         "TFTP": ("udp", 69)}
# What some checks inspect of the enforcer itself (README "Architecture" and "The
# enforcer"): the nft table of its kernel-mode redirects' and binds' NAT maps (and of the
# grants the kernel holds, after the caps on new flows, whose counters show refusals), the
# conntrack mark's bits by which its rules route an admitted flow (those of its mode,
# and a one-way flow's, whose replies are dropped before its queue), and the longest
# line its control socket reads.
ENFORCER_MAPS_TABLE = MAPS_TABLE
FLOW_MODE_MASK, FLOW_MODE_MARKS = MARK_MODE, {"kernel": MARK_KERNEL, "user": MARK_USER}
ONE_WAY_MARK = MARK_ONE_WAY
USER_MODE_MARK = f"0x{MARK_USER:08x}"  # (as conntrack's --mark takes it)
CONTROL_REQUEST_LIMIT = MAX_REQUEST
# The lab policy's [defaults] max_pending_per_session (ROB-02 checks it at its edge)
MAX_PENDING_PER_SESSION = 1024


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def _toml_scalar(value: object) -> str:
    """A number or a truth value as TOML writes it."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def lab_config(tb: Testbed, *, socket: Path, fail_open: bool = False, queue: int = 0,
               backend: str = "auto", data_filters: dict[str, str] | None = None,
               dataplane: dict[str, object] | None = None, app_filters: tuple[str, ...] = (),
               permission_timeout: int = 2, limits: dict[str, object] | None = None) -> str:
    """The enforcer config for a testbed: its interfaces, NAT per variant, the lab policy.

    ``dataplane``: further [dataplane] settings (receive_buffer, *_redirect_ports,
    kernel_grants);
    ``limits``: [limits] settings (caps, README "Bounded state");
    ``app_filters``: the application filters to enable; ``permission_timeout``: short
    by default, so that TIMEOUT (AFC-04) is checked in seconds."""
    topo = tb.topology
    internal = [net for f in FAMILIES for net in topo.internal_networks(f)]
    c1 = [f"{topo.address('c1', f)}/{32 if f == 'ipv4' else 128}" for f in FAMILIES]
    out = [
        "[network]",
        f"internal_interfaces = {_toml_list(list(topo.fw_internal_ifaces))}",
        f'external_interfaces = ["{topo.fw_external_iface}"]',
        f"nat = {'true' if topo.variant == 'nat' else 'false'}",
        "",
        "[dataplane]",
        f"queue = {queue}",
        f"fail_open = {'true' if fail_open else 'false'}",
        f'backend = "{backend}"',
        *(f"{key} = {_toml_scalar(value)}" for key, value in (dataplane or {}).items()),
        "",
        "[control]",
        f'socket = "{socket}"',
        "",
        "[defaults]",
        f"permission_timeout = {permission_timeout}",
        f"max_pending_per_session = {MAX_PENDING_PER_SESSION}",
    ]
    for name, (proto, port) in PORTS.items():
        out += ["", "[[protocol]]", f'name = "{name}"', f'guid = "{GUIDS[name]}"',
                f'ip_protocol = "{proto}"', f"ports = [{port}]"]
    out += ["", "[[protocol_rule]]", 'name = "clients may use FTP, TFTP and DNS"',
            'action = "allow"', 'protocols = ["FTP", "TFTP", "DNS"]',
            f"clients = {_toml_list(internal)}",
            "", "[[protocol_rule]]", 'name = "only c1 may use HTTP"', 'action = "allow"',
            'protocols = ["HTTP"]', f"clients = {_toml_list(c1)}",
            "", "[[site_rule]]", 'name = "the denied lab network"', 'action = "deny"',
            f"destinations = {_toml_list([topo.denied_network(f) for f in FAMILIES])}",
            "", "[[site_rule]]", 'name = "the external lab network"', 'action = "allow"',
            f"destinations = {_toml_list([topo.external_network(f) for f in FAMILIES])}"]
    out += ["", "[socks]", f"port = {SOCKS_PORT}", "require_auth = true", "", "[socks.users]",
            *(f'{user} = "{password}"' for user, password in SOCKS_USERS.items())]
    if limits:
        out += ["", "[limits]", *(f"{key} = {_toml_scalar(value)}" for key, value in limits.items())]
    if app_filters:
        out += ["", "[filters]", f"enable = {_toml_list(list(app_filters))}"]
    if data_filters:
        out += ["", "[data_filters]", *(f'{name} = "{target}"' for name, target in data_filters.items())]
    return "\n".join(out) + "\n"


SOCKET_DIR = Path("/run/pinhole")


class EnforcerProcess(Firewall):
    """``pinhole enforcer`` running in the testbed's firewall namespace (its driver)."""

    name = "enforcer"
    title = "pinhole enforcer"
    claims = tuple(sorted({clause.rsplit("-", 1)[0] for clause in CLAUSES}))
    modes = MODES
    workers = 0  # its worker processes (dataplane.workers), unless a start says otherwise

    def __init__(self, tb: Testbed, workdir: Path,
                 data_filters: dict[str, str] | None = None, *, verbose: bool = True) -> None:
        """``verbose``: its log at debug level (``--verbose``, a line for every packet it
        decides: what a check's artifacts show); off, at the default level, as deployed."""
        super().__init__(tb, workdir)
        self.data_filters = data_filters
        self.verbose = verbose
        workdir.mkdir(parents=True, exist_ok=True)
        SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        # Not under workdir: a UNIX socket path must stay within 107 bytes.
        self.socket = SOCKET_DIR / f"enforcer-{tb.id}.sock"
        self.config_path = workdir / "enforcer.toml"
        self.log_path = workdir / "enforcer.log"
        self.proc: subprocess.Popen[Any] | None = None
        self.fail_open = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, fail_open: bool = False, backend: str = "auto",
              dataplane: dict[str, object] | None = None, app_filters: tuple[str, ...] = (),
              limits: dict[str, object] | None = None, timeout: float = 15.0) -> None:
        """Start the daemon and return once it answers on its control socket."""
        if self.running:
            raise RuntimeError("the enforcer is already running")
        self._configure(fail_open, backend, dataplane, app_filters, limits)
        with self.log_path.open("a") as log:
            options = ("--verbose",) if self.verbose else ()
            self.proc = self.tb.popen("fw", self.command(*options), stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_for_run(1, timeout)

    def restart(self, *, fail_open: bool = False, backend: str = "auto",
                dataplane: dict[str, object] | None = None, app_filters: tuple[str, ...] = (),
                limits: dict[str, object] | None = None, timeout: float = 15.0) -> None:
        """In its own process: the control socket's ``restart`` with the new configuration
        (a stop's lockdown, then a start, without a new process); started if not running.
        Returns once the new run answers."""
        if not self.running:
            self.start(fail_open=fail_open, backend=backend, dataplane=dataplane,
                       app_filters=app_filters, limits=limits, timeout=timeout)
            return
        self._configure(fail_open, backend, dataplane, app_filters, limits)
        try:
            run = int(self.call("restart", config=str(self.config_path))["run"])
        except (ControlError, SessionApiError) as exc:
            raise RuntimeError(f"the enforcer refused to restart: {exc}\n{self.log_tail()}") from None
        self._wait_for_run(run, timeout)

    def _configure(self, fail_open: bool, backend: str, dataplane: dict[str, object] | None,
                   app_filters: tuple[str, ...], limits: dict[str, object] | None) -> None:
        """Write the configuration file of the next start."""
        self.fail_open = fail_open
        self.app_filters = app_filters
        self.limits = limits or None
        self.customised = fail_open or backend != "auto" or bool(dataplane)
        # The application filters' grants and binds wait for real clients and servers.
        self.config_path.write_text(lab_config(self.tb, socket=self.socket, fail_open=fail_open,
                                               backend=backend, data_filters=self.data_filters,
                                               dataplane={"workers": self.workers,
                                                          **(dataplane or {})},
                                               app_filters=app_filters,
                                               permission_timeout=10 if app_filters else 2,
                                               limits=limits))

    def _wait_for_run(self, run: int, timeout: float) -> None:
        """Until the enforcer's ``run``-th run in its process answers on the control socket."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                self._reap()
                raise RuntimeError(f"the enforcer exited during start-up:\n{self.log_tail()}")
            try:
                with ControlClient(str(self.socket), timeout=1.0) as c:
                    if c.call("status")["run"] == run:
                        return
            except ControlError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the enforcer did not answer within {timeout:.0f} s:\n"
                                   f"{self.log_tail()}") from None
            time.sleep(0.05)

    def command(self, *options: str) -> list[str]:
        """``pinhole enforcer`` with this config, run in the fw namespace (with ``options``)."""
        return [sys.executable, "-m", "enforcer", "enforcer", "--config", str(self.config_path),
                *options]

    def lockdown(self) -> str:
        """``pinhole enforcer --lockdown``: the lockdown base alone, as at boot before a
        first start (the default configuration's, unless a start wrote another)."""
        return self._once("--lockdown")

    def unload(self) -> str:
        """``pinhole enforcer --unload``: every rule of the enforcer gone, lockdown included
        (before another firewall takes the fw's place)."""
        return self._once("--unload")

    def _once(self, option: str) -> str:
        if self.running:
            raise RuntimeError(f"the enforcer is running: stop it before {option}")
        if not self.config_path.exists():
            self.config_path.write_text(lab_config(self.tb, socket=self.socket,
                                                   data_filters=self.data_filters))
        return str(self.tb.run("fw", self.command(option)).stdout)

    def client(self) -> ControlClient:
        return ControlClient(str(self.socket))

    def control_socket(self) -> Path:
        return self.socket

    def decided(self, flows: Sequence[str], since: float) -> bool:
        """Its decision log names each flow since then (the enforcer decides a queued
        packet as it reads it; its clock is CLOCK_MONOTONIC, as the harness's). While it
        is not running, its rules alone decide, as a packet arrives (the lockdown base
        queues nothing)."""
        if not self.running:
            return True
        try:
            made = {d["flow"] for d in self.call("decisions", since=since, limit=10000)}
        except (ControlError, SessionApiError):
            return False
        return all(flow in made for flow in flows)

    def remove(self) -> None:
        """Stopped, then unloaded: no rule of the enforcer stays (lockdown included)."""
        if self.running:
            self.stop()
        self.unload()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait: a clean exit, which leaves the lockdown base (failing open:
        nothing)."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL: the enforcer dies with its rules still installed (which fail closed)."""
        return self._signal(signal.SIGKILL, 10.0)

    def crash(self) -> int:
        """SIGABRT: the enforcer crashes (no clean-up of its own)."""
        return self._signal(signal.SIGABRT, 10.0)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The enforcer stopped (SIGSTOP), then let go on (SIGCONT): meanwhile it reads
        nothing, neither its queue nor its sockets, while the kernel goes on filling them
        (to show what the buffers it holds keep). Its control socket does not answer."""
        if self.proc is None or not self.running:
            raise RuntimeError("the enforcer is not running")
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals, timeout: float) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reap()
        return code

    def _reap(self) -> None:
        if self.proc is not None:
            self.tb.forget(self.proc.pid)
            self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


class EnforcerWithWorkers(EnforcerProcess):
    """The enforcer with two worker processes reading its user-mode flows' packets (README
    "Worker processes"): the same clauses, run where a flow's packets are split between
    processes."""

    name = "enforcer-workers"
    title = "pinhole enforcer, 2 worker processes"
    workers = 2

    @classmethod
    def claims_clause(cls, clause: str) -> bool:
        # what checks no firewall (IPF-01: the IpFilter object itself) runs once, for the enforcer
        return clause not in NO_FIREWALL_BEHAVIOUR and super().claims_clause(clause)
