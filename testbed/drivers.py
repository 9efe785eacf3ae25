"""Firewall drivers: the one interface through which the harness reaches a firewall under test.

A driver (a subclass of :class:`Firewall`) does four things for the clause suite:

- it puts its firewall in the testbed's ``fw`` namespace (:meth:`Firewall.start`, with
  the lab's configuration: the lab policy, application filters, caps) and takes it out
  again (:meth:`Firewall.remove`), leaving nothing behind;
- it stops, kills and crashes it when a check asks (what a firewall with no process
  of its own does then is up to it: the fail-closed checks judge the traffic);
- it carries the session API calls (:meth:`Firewall.client`, whose ``call(method,
  **params)`` takes the enforcer's control-protocol methods and parameters, README
  "Session API"), or raises :class:`Unsupported`, which makes the check n/a for that
  firewall instead of failed;
- it says which clauses it claims (:attr:`Firewall.claims`: clause IDs or families such
  as ``"AFC"``) and in which modes (``kernel``, ``user``) its flows can run; the suite
  runs only those checks against it.

The drivers here: the enforcer (``enforcer``, :class:`testbed.lab.EnforcerProcess`),
Linux's conntrack helpers (``kernel-helpers``: the APP comparison), and the two
trivial firewalls every clause must tell apart from a real one (``open-router``:
forwards and translates everything and accepts every session call doing nothing;
``closed-router``: forwards nothing new). Another firewall is one small module:
``--firewall path/to/driver.py:ClassName`` or ``package.module:ClassName`` (see
``examples/`` in the source tree).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from testbed.catalog import CLAUSES
from testbed.session_api import SessionCalls
from testbed.topology import FAMILIES, Family

if TYPE_CHECKING:
    from testbed.build import Testbed
    from testbed.kernel_helpers import Forward, KernelHelperFirewall

MODES = ("kernel", "user")
# The kernel helpers' fw publishes s1's FTP server on its internal address, this port
PUBLISHED_FTP_PORT = 2121


class Unsupported(Exception):
    """The firewall under test does not offer what a check asked of it: the check is n/a
    for that firewall (never passed, never failed)."""


class DriverError(Exception):
    """A driver could not be found or loaded (the message says why)."""


class SessionApi(SessionCalls):
    """The session API of a firewall under test: ``call(method, **params)`` as the
    enforcer's control protocol names them (the methods of ``SessionCalls`` build those
    calls), returning its results or raising the errors of ``testbed.session_api``. Use
    it as a context manager; ``next_event`` returns a pushed event or None. What a
    firewall does not offer raises Unsupported."""

    def call(self, method: str, **params: Any) -> Any:
        raise Unsupported(f"the session API call {method!r}")

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        raise Unsupported("session events")

    def raw(self, data: bytes) -> dict[str, Any]:
        raise Unsupported("raw control-protocol requests")


class Firewall:
    """A firewall the harness can put in the testbed's fw namespace (a driver).

    Subclasses set the class attributes and override what their firewall does. The
    lifecycle methods take the enforcer's configuration keywords (``fail_open``,
    ``backend``, ``dataplane``, ``app_filters``, ``limits``); a firewall that has no
    such settings ignores them.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # the heading of its column group in the matrix
    claims: ClassVar[tuple[str, ...]] = ()  # clause IDs, or families such as "AFC"
    modes: ClassVar[tuple[str, ...]] = ("kernel",)
    # a comparison (the kernel helpers, the trivial routers), not a firewall under test:
    # its failures do not fail a run
    reference: ClassVar[bool] = False
    # How long after a packet reaches it the firewall may still be deciding it, in seconds
    # (0: as it arrives, as kernel rules do); None: not known. A silent drop's check
    # watches for an answer to its probe until then (or until ``decided`` says so), and
    # for timeouts.NEGATIVE after sending while neither can tell.
    holds_packets: ClassVar[float | None] = None

    def __init__(self, tb: Testbed, workdir: Path) -> None:
        self.tb = tb
        self.workdir = workdir
        self.app_filters: tuple[str, ...] = ()
        self.limits: dict[str, object] | None = None
        self.customised = False

    @classmethod
    def claims_clause(cls, clause: str) -> bool:
        return any(clause == c or clause.startswith(c + "-") for c in cls.claims)

    # -- lifecycle (override) -------------------------------------------------------
    @property
    def running(self) -> bool:
        raise NotImplementedError

    def start(self, *, fail_open: bool = False, backend: str = "auto",
              dataplane: dict[str, object] | None = None, app_filters: tuple[str, ...] = (),
              limits: dict[str, object] | None = None) -> None:
        raise NotImplementedError

    def stop(self) -> int:
        """Stop it as an operator would; 0 for a clean stop."""
        raise NotImplementedError

    def restart(self, *, fail_open: bool = False, backend: str = "auto",
                dataplane: dict[str, object] | None = None, app_filters: tuple[str, ...] = (),
                limits: dict[str, object] | None = None) -> None:
        """Running again in this configuration, as after a stop and a start (a firewall
        that can restart in place does so)."""
        if self.running:
            self.stop()
        self.start(fail_open=fail_open, backend=backend, dataplane=dataplane,
                   app_filters=app_filters, limits=limits)

    def kill(self) -> int:
        """Kill it with no chance to clean up (SIGKILL, or what stands for it)."""
        return self.stop()

    def crash(self) -> int:
        """Make it crash (SIGABRT, or what stands for it); non-zero as a crash is."""
        return self.stop()

    def remove(self) -> None:
        """Take it out of the fw namespace entirely (before another firewall comes in)."""
        raise NotImplementedError

    def paused(self) -> AbstractContextManager[None]:
        """A context in which it reads nothing (its queues and sockets fill); it goes on
        after."""
        raise Unsupported("pausing the firewall")

    def client(self) -> SessionCalls:
        """Its session API, a SessionApi or another SessionCalls (a new connection: close
        it, or use it in a with block)."""
        return SessionApi()

    def call(self, method: str, **params: Any) -> Any:
        with self.client() as api:
            return api.call(method, **params)

    def control_socket(self) -> Path:
        """The UNIX socket its session API listens on (the enforcer's control socket)."""
        raise Unsupported("a control socket")

    def log_tail(self, lines: int = 30) -> str:
        """The end of its log, for failure messages ("" if it keeps none)."""
        return ""

    def decided(self, flows: Sequence[str], since: float) -> bool:
        """Whether it has made its verdict on the first packet of each flow (``"tcp
        192.0.2.11:31000 -> 198.51.100.21:30011"``, ``[address]:port`` for IPv6, as the
        packet reached it) at or after ``since`` (time.monotonic()): a firewall that logs
        its verdicts can end a silent drop's watch sooner than ``holds_packets``. False
        when it cannot tell."""
        return False


class _RuleFirewall(Firewall):
    """A firewall that is iptables rules only (testbed.kernel_helpers): no process, so a
    stop, a kill or a crash leaves it as it was."""

    forward: ClassVar[Forward] = "policy"  # (testbed.kernel_helpers.Forward)
    publish: ClassVar[int | None] = None
    reference = True
    holds_packets = 0.0

    def __init__(self, tb: Testbed, workdir: Path) -> None:
        super().__init__(tb, workdir)
        self._rules: KernelHelperFirewall | None = None

    @property
    def running(self) -> bool:
        return self._rules is not None

    def start(self, *, fail_open: bool = False, backend: str = "auto",
              dataplane: dict[str, object] | None = None, app_filters: tuple[str, ...] = (),
              limits: dict[str, object] | None = None) -> None:
        from testbed.kernel_helpers import KernelHelperFirewall

        if self._rules is None:
            rules = KernelHelperFirewall(self.tb, publish=self.publish, forward=self.forward)
            rules.install()
            self._rules = rules

    def stop(self) -> int:
        return 0

    def remove(self) -> None:
        if self._rules is not None:
            rules, self._rules = self._rules, None
            rules.remove()

    def describe(self) -> str:
        return self._rules.describe() if self._rules is not None else self.title


class KernelHelpers(_RuleFirewall):
    """Linux's FTP and TFTP conntrack helpers with the lab's FTP/TFTP policy: what the APP
    clauses compare the enforcer with. No session API and no SOCKS service."""

    name = "kernel-helpers"
    title = "Linux conntrack helpers"
    # APP-FTP-04 needs a SOCKS service (Firewall clients), which the kernel has not
    claims = ("APP-FTP-01", "APP-FTP-02", "APP-FTP-03", "APP-FTP-05", "APP-FTP-06",
              "APP-FTP-07", "APP-TFTP-01")
    publish = PUBLISHED_FTP_PORT  # for APP-FTP-03


class _TrivialApi(SessionApi):
    """Accepts every session call and does nothing: each grant returns a new action that
    stays pending, each client of the topology has a SecureNAT session."""

    _ids = itertools.count(1)

    def __init__(self, tb: Testbed) -> None:
        self.tb = tb

    def call(self, method: str, **params: Any) -> Any:
        topo = self.tb.topology
        if method == "sessions":
            clients = [node.name for node in topo.clients]
            return [{"id": 1 + i, "client": topo.address(name, family), "kind": "securenat",
                     "user": None} for i, (name, family) in
                    enumerate(itertools.product(clients, FAMILIES))]
        if method == "allow_future_connect":
            return {"action": next(self._ids)}
        if method == "register_filter":
            return {"filter": next(self._ids)}
        if method == "redirect_connections":
            family: Family = "ipv6" if ":" in str(params["addresses"][0][0]) else "ipv4"
            first = 40000 + next(self._ids) % 10000
            return {"internal_address": [topo.fw_internal_address(family), first],
                    "actions": [{"action": next(self._ids)} for _ in params["addresses"]]}
        if method == "bind_for_client":
            session = next(s for s in self.call("sessions") if s["id"] == params["session"])
            return {"address": [session["client"], params["client_port"]]}
        if method == "retroactive_allow_bind":
            return {"result": "S_OK"}
        if method == "action":
            return {"action": params["action"], "state": "pending", "admitted": 0,
                    "expires": None}
        if method in ("binds", "actions"):
            return []
        if method in ("cancel", "end_session", "register_connect_events", "ping"):
            return {}
        return super().call(method, **params)

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        return None


class OpenRouter(_RuleFirewall):
    """Forwards every flow both ways (in NAT, translating the clients' sources) and accepts
    every session call doing nothing: a firewall every negative check must catch."""

    name = "open-router"
    title = "open router (trivial)"
    claims = tuple(sorted({clause.rsplit("-", 1)[0] for clause in CLAUSES}))
    forward: ClassVar[Forward] = "everything"

    def client(self) -> SessionApi:
        return _TrivialApi(self.tb)


class ClosedRouter(OpenRouter):
    """Forwards nothing new (flows it already had go on); accepts every session call doing
    nothing: a firewall every positive check must catch."""

    name = "closed-router"
    title = "closed router (trivial)"
    forward: ClassVar[Forward] = "nothing new"


def _enforcer() -> type[Firewall]:
    from testbed.lab import EnforcerProcess

    return EnforcerProcess


def _enforcer_with_workers() -> type[Firewall]:
    from testbed.lab import EnforcerWithWorkers

    return EnforcerWithWorkers


BUILT_IN: dict[str, Callable[[], type[Firewall]]] = {
    "enforcer": _enforcer, "enforcer-workers": _enforcer_with_workers,
    "kernel-helpers": lambda: KernelHelpers,
    "open-router": lambda: OpenRouter, "closed-router": lambda: ClosedRouter}
TRIVIAL = ("open-router", "closed-router")


def load(spec: str) -> type[Firewall]:
    """The driver class a ``--firewall`` value names: a built-in name, ``module:Class`` or
    ``path/to/file.py:Class``."""
    if spec in BUILT_IN:
        found: type[Firewall] = BUILT_IN[spec]()
        return found
    if ":" not in spec or spec.endswith(":"):
        where = spec.rstrip(":")
        if where != spec or where.endswith(".py"):
            raise DriverError(f"{spec}: name the driver's class, as {where}:Class")
        raise DriverError(f"{spec!r} is neither a built-in firewall ({', '.join(BUILT_IN)}) nor "
                          "a driver as module:Class or path/to/driver.py:Class")
    where, attr = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise DriverError(f"{spec}: no file {path}")
            name = f"pinhole_driver_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise DriverError(f"{spec}: {path} cannot be imported")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except DriverError:
        raise
    except Exception as exc:  # the driver's own import error, whatever it is
        raise DriverError(f"{spec}: importing the driver failed: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        raise DriverError(f"{spec}: {where} has no {attr}")
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Firewall)):
        raise DriverError(f"{spec}: {attr} is not a subclass of testbed.drivers.Firewall")
    problems = [f"no {what}" for what, value in (("name", cls.name), ("claims", cls.claims))
                if not value]
    problems += [f"claims {c!r}, no clause or family of the catalog" for c in cls.claims
                 if not any(k == c or k.startswith(c + "-") for k in CLAUSES)]
    problems += [f"mode {m!r} is not one of {', '.join(MODES)}" for m in cls.modes if m not in MODES]
    if problems:
        raise DriverError(f"{spec}: {'; '.join(problems)}")
    return cls
