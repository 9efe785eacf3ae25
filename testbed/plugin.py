"""The pytest plugin (entry point ``pytest11``): fixtures for the lab, clause markers, results.

- ``variant`` (the topology: routed, nat, split) and ``family`` (ipv4, ipv6)
  parametrise every test that asks for them; ``--pinhole-topology`` and
  ``--pinhole-family`` narrow them.
- ``lab``: a built testbed of that topology with the enforcer in its firewall
  namespace, shared by the session; ``net``: the lab seen in one address family,
  with the enforcer running in its default (fail-closed) configuration.
- Every test that uses the lab gets a pcap of the firewall's interfaces, named in
  failure messages and in the results.
- ``@pytest.mark.clause("GEN-01")`` keys a test's result for the conformance matrix;
  ``@pytest.mark.topologies("nat")`` runs a test in those topologies only; a test
  without it runs in the standard topology's variants (routed, nat), never in split.
- ``firewall`` parametrises every test of the lab (through ``net``, ``app`` and the
  other lab fixtures): the firewall in the fw namespace, by its driver
  (testbed.drivers: enforcer, kernel-helpers, open-router, closed-router, or
  ``module:Class`` / ``path.py:Class``); ``--pinhole-firewall`` chooses them (default:
  enforcer and kernel-helpers). A check runs against a firewall only if the driver
  claims its clause and, for a ``mode``, that mode; a test with no clause marker runs
  against the enforcer alone. A check that asks a firewall for something its driver
  does not support (testbed.drivers.Unsupported) is n/a for it.
- A test that needs root, namespaces or tools skips with the reason; with
  ``PINHOLE_REQUIRE_E2E=1`` such a skip is a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from testbed.capture import SLL2_OUTGOING, FwPackets
from testbed.catalog import CLAUSES
from testbed.drivers import MODES, DriverError, Firewall, Unsupported, load
from testbed.session_api import SessionCalls, Terminating
from testbed.shards import WHOLE, Shard
from testbed.topology import FAMILIES, TOPOLOGIES, VARIANTS, Family

REQUIRE_E2E = "PINHOLE_REQUIRE_E2E"
# The firewalls the suite runs against by default (the APP clauses compare the two)
FIREWALLS = ("enforcer", "kernel-helpers")
APP_FILTERS = ("ftp", "tftp")
E2E_TOOLS = ("ip", "iptables-restore", "ip6tables-restore", "conntrack", "tcpdump")

@dataclass
class Result:
    """One row of the conformance results (the JSON report's ``results``)."""

    clause: str
    family: str | None
    topology: str | None
    mode: str | None
    outcome: str  # passed, failed, skipped, n/a (the firewall lacks a call), not-implemented
    duration_s: float
    pcap: str | None
    detail: str
    nodeid: str = ""  # the check's ("": a not-implemented row, no check)
    firewall: str | None = None  # None: the enforcer (tests that do not compare firewalls)
    log: str | None = None  # the firewall's log, where it keeps one (the enforcer's)

    def to_dict(self) -> dict[str, Any]:
        return {"clause": self.clause, "family": self.family, "topology": self.topology,
                "mode": self.mode, "firewall": self.firewall or "enforcer",
                "outcome": self.outcome, "duration_s": round(self.duration_s, 3),
                "pcap": self.pcap, "log": self.log, "detail": self.detail, "nodeid": self.nodeid}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Result:
        """A row of to_dict's (a JSON report's), back."""
        return cls(row["clause"], row["family"], row["topology"], row["mode"], row["outcome"],
                   float(row["duration_s"]), row["pcap"], row["detail"], row["nodeid"],
                   row["firewall"], row["log"])


RESULTS = pytest.StashKey[list[Result]]()
DRIVERS = pytest.StashKey[dict[str, type[Firewall]]]()  # by name: the run's firewalls
_CONFIG: list[pytest.Config] = []  # the running session's config, for the report hook
_ARTIFACTS = pytest.StashKey[Path]()


def e2e_unavailable() -> str | None:
    """Why end-to-end tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "end-to-end tests need root (network namespaces, netfilter)"
    missing = [t for t in E2E_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (run 'make setup')"
    return None


def require_e2e() -> None:
    """Skip (or, under PINHOLE_REQUIRE_E2E=1, fail) when end-to-end tests cannot run."""
    reason = e2e_unavailable()
    if reason is not None:
        pytest.skip(reason)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pinhole")
    group.addoption("--pinhole-topology", default=",".join(TOPOLOGIES),
                    help="comma-separated topologies to run (routed,nat,split)")
    group.addoption("--pinhole-family", default=",".join(FAMILIES),
                    help="comma-separated address families to run (ipv4,ipv6)")
    group.addoption("--pinhole-firewall", default=",".join(FIREWALLS),
                    help="comma-separated firewalls to run the checks against: enforcer, "
                         "kernel-helpers, open-router, closed-router, or a driver as module:Class "
                         "or path/to/driver.py:Class (default: enforcer,kernel-helpers)")
    group.addoption("--pinhole-self-check", action="store_true",
                    help="stop checking a clause against a firewall once one of its checks has "
                         "failed there (pinhole conformance --self-check)")
    group.addoption("--pinhole-artifacts", default="artifacts",
                    help="where pcaps and enforcer logs go (default: ./artifacts)")
    group.addoption("--pinhole-shard", metavar="I/N", type=_shard, default=WHOLE,
                    help="run only shard I of N: the checks whose node id hashes to I "
                         "(pinhole conformance --shard)")


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _choices(config: pytest.Config, option: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in str(config.getoption(option)).split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise pytest.UsageError(f"--{option.replace('_', '-')}: {', '.join(bad) or 'nothing'} "
                                f"is not one of {', '.join(allowed)}")
    return values


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "clause(id): the SPEC.md clause this test checks")
    config.addinivalue_line("markers", "e2e: needs root and network namespaces")
    config.addinivalue_line("markers", "topologies(*names): run only in these topologies "
                                       "(default: the standard ones, routed and nat)")
    config.addinivalue_line("markers", "reconfigures: the check starts the firewall in a configuration "
                            "of its own first (the fixture does not restart it in the default one before)")
    config.addinivalue_line("markers", "alone: timing-sensitive; `make test` and `pinhole conformance` "
                                       "run these after the parallel part, on an otherwise idle machine")
    config.stash[RESULTS] = []
    config.stash[_ARTIFACTS] = Path(config.getoption("pinhole_artifacts")).resolve()
    drivers: dict[str, type[Firewall]] = {}
    for spec in [v.strip() for v in str(config.getoption("pinhole_firewall")).split(",") if v.strip()]:
        try:
            driver = load(spec)
        except DriverError as exc:
            raise pytest.UsageError(f"--pinhole-firewall: {exc}") from None
        drivers[driver.name] = driver
    if not drivers:
        raise pytest.UsageError("--pinhole-firewall: name at least one firewall")
    config.stash[DRIVERS] = drivers
    _CONFIG[:] = [config]


def _config() -> pytest.Config:
    return _CONFIG[0]


def _wants(metafunc: pytest.Metafunc, name: str) -> bool:
    """The test takes ``name`` and does not parametrize it itself."""
    own = {n.strip() for m in metafunc.definition.iter_markers("parametrize")
           for n in (m.args[0].split(",") if isinstance(m.args[0], str) else m.args[0])}
    return name in metafunc.fixturenames and name not in own


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if _wants(metafunc, "variant"):
        metafunc.parametrize("variant", _choices(metafunc.config, "pinhole_topology", TOPOLOGIES),
                             scope="session")
    if _wants(metafunc, "family"):
        metafunc.parametrize("family", _choices(metafunc.config, "pinhole_family", FAMILIES))
    if _wants(metafunc, "mode"):
        metafunc.parametrize("mode", MODES)
    if _wants(metafunc, "firewall"):
        drivers = metafunc.config.stash[DRIVERS]
        metafunc.parametrize("firewall", list(drivers), scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _deselect_other_topologies(config, items)
    _deselect_unclaimed(config, items)
    _deselect_other_shards(config, items)
    for item in items:
        for mark in item.iter_markers("clause"):
            if not mark.args or mark.args[0] not in CLAUSES:
                raise pytest.UsageError(f"{item.nodeid}: clause marker {mark.args!r} "
                                        "names no clause of SPEC.md's catalog")
            # so that `-k GEN-01` selects the clause
            item.extra_keyword_matches.add(mark.args[0])
        if "lab" in getattr(item, "fixturenames", ()) or "e2e" in Path(str(item.path)).parts:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: the suite's groups, each worker kept to its labs (testbed.scheduling)."""
    if config.getoption("dist", None) != "loadgroup":
        return None
    from testbed.scheduling import LabAffinityScheduling

    drivers = config.stash[DRIVERS]
    return LabAffinityScheduling(config, list(drivers), log)


def _deselect_other_topologies(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the topologies a test does not run in (those its ``topologies`` marker
    leaves out; without one, all but the standard variants), and the families a test
    parametrizes itself (one a client cannot do) that ``--pinhole-family`` leaves out."""
    families = _choices(config, "pinhole_family", FAMILIES)
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        mark = item.get_closest_marker("topologies")
        params = getattr(item, "callspec", None)
        variant = params.params.get("variant") if params is not None else None
        family = params.params.get("family") if params is not None else None
        runs_in: tuple[str, ...] = VARIANTS
        if mark is not None:
            unknown = set(mark.args) - set(TOPOLOGIES)
            if unknown or not mark.args:
                raise pytest.UsageError(f"{item.nodeid}: topologies marker {mark.args!r} names "
                                        f"no topology of {', '.join(TOPOLOGIES)}")
            runs_in = mark.args
        (drop if (variant is not None and variant not in runs_in)
         or (family in FAMILIES and family not in families) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _deselect_unclaimed(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect a check for a firewall whose driver does not claim its clause or its mode;
    a test with no clause marker runs against the enforcer alone."""
    drivers = config.stash[DRIVERS]
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        params = getattr(item, "callspec", None)
        name = params.params.get("firewall") if params is not None else None
        if name is None:
            keep.append(item)
            continue
        driver = drivers.get(name)
        if driver is None:  # (a test that names its firewalls itself, none of them in this run)
            drop.append(item)
            continue
        clauses = [m.args[0] for m in item.iter_markers("clause")]
        mode = params.params.get("mode") if params is not None else None
        claimed = (all(driver.claims_clause(c) for c in clauses) if clauses
                   else name == "enforcer")
        (keep if claimed and (mode is None or mode in driver.modes) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _deselect_other_shards(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the checks of the other shards (``--pinhole-shard``). A check's shard is
    its node id's alone, so this may come before or after other deselections."""
    shard: Shard = config.getoption("pinhole_shard")
    if shard == WHOLE:
        return
    drop = [item for item in items if not shard.has(item.nodeid)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if shard.has(item.nodeid)]


# --- the lab ------------------------------------------------------------------------------

class Lab:
    """A testbed of one topology (``variant``) and the firewalls that take turns in its
    firewall namespace (one at a time: the enforcer at first, locked down as at boot)."""

    def __init__(self, variant: str, artifacts: Path,
                 drivers: dict[str, type[Firewall]] | None = None) -> None:
        from testbed.build import Testbed
        from testbed.lab import EnforcerProcess
        from testbed.topology import named

        self.variant = variant
        self.artifacts = artifacts
        self.drivers = drivers or {}
        self.tb = Testbed.up(named(variant), tag="pytest")
        self.topology = self.tb.topology
        self.enforcer = EnforcerProcess(self.tb, artifacts / f"enforcer-{variant}-{self.tb.id}")
        # as a fw boots: locked down before its enforcer first starts (SPEC rule 15)
        self.enforcer.lockdown()
        self.firewall: Firewall = self.enforcer  # the one in the fw namespace
        self._firewalls: dict[str, Firewall] = {self.enforcer.name: self.enforcer}
        self._peers: Any = None  # the real FTP/TFTP servers (testbed.peers.PeerSet), once used
        self._fw_ifindex: dict[str, int] = {}

    def fw_ifindex(self, iface: str) -> int:
        """The index of one of the firewall's interfaces (what its pcap records)."""
        if not self._fw_ifindex:
            links = json.loads(self.tb.run("fw", ["ip", "-j", "link", "show"]).stdout)
            self._fw_ifindex = {link["ifname"]: int(link["ifindex"]) for link in links}
        return self._fw_ifindex[iface]

    @property
    def peers(self) -> Any:
        """The lab's real FTP and TFTP servers (a testbed.peers.PeerSet): they live as long
        as the lab, and go before it does."""
        if self._peers is None:
            from testbed.peers import PeerSet

            self._peers = PeerSet(self.tb)
        return self._peers

    def use(self, name: str = "enforcer", app_filters: tuple[str, ...] = (), *,
            keep_peers: bool = False, limits: dict[str, object] | None = None,
            reconfigure: bool = True) -> Firewall:
        """The firewall ``name`` in the fw namespace, running in its default configuration
        with these application filters and caps (the one there before taken out);
        restarted only if it runs with others, and not then unless ``reconfigure`` (a
        check that restarts it in a configuration of its own at once). The real servers
        go too unless ``keep_peers`` (the APP checks use them; other checks use the
        servers' ports for agents of their own)."""
        if not keep_peers and self._peers is not None:
            self._peers.close()
        firewall = self._firewalls.get(name)
        if firewall is None:
            driver = self.drivers.get(name)
            if driver is None:
                raise RuntimeError(f"no driver for the firewall {name!r} in this run")
            firewall = self._firewalls[name] = driver(self.tb, self.artifacts / f"{name}-{self.variant}-"
                                                                              f"{self.tb.id}")
        if firewall is not self.firewall:
            self.firewall.remove()
            self.firewall = firewall
            self._end_orphans()
        limits = limits or None
        if not firewall.running:
            firewall.start(app_filters=app_filters, limits=limits)
        elif reconfigure and (firewall.customised or firewall.limits != limits or
                              firewall.app_filters != app_filters):
            firewall.restart(app_filters=app_filters, limits=limits)
        return firewall

    def _end_orphans(self) -> None:
        """End the TCP connections that the hosts' closed sockets still try to finish (a
        firewall that stalled one, as the conntrack helpers do on a split FTP command,
        leaves its data retransmitted for minutes), so that none reaches the captures of
        the next firewall's checks."""
        for host in self.topology.hosts:
            self.tb.run(host.name, ["ss", "-K", "-t", "state", "fin-wait-1", "state", "closing",
                                    "state", "last-ack"], check=False)

    def close(self) -> None:
        try:
            if self._peers is not None:
                self._peers.close()
            if self.firewall is not self.enforcer:
                self.firewall.remove()
            elif self.enforcer.running:
                self.enforcer.stop()
        finally:
            self.tb.down()


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest, variant: str) -> Iterator[Lab]:
    require_e2e()
    built = Lab(variant, request.config.stash[_ARTIFACTS], request.config.stash[DRIVERS])
    try:
        yield built
    finally:
        built.close()


class Net:
    """The lab in one address family: addresses, agents and the enforcer's API."""

    def __init__(self, lab: Lab, family: str, mode: str | None = None) -> None:
        self.lab = lab
        self.family = cast(Family, family)  # one of FAMILIES: the parametrization's
        self.mode = mode  # for tests that admit flows: "kernel" or "user"
        self.topology = lab.topology
        # the firewall under test, by its driver (the enforcer's EnforcerProcess, or another
        # with the same methods: testbed.drivers.Firewall)
        self.enforcer: Any = lab.firewall

    @property
    def nat(self) -> bool:
        return self.lab.variant == "nat"

    @property
    def own_enforcer(self) -> bool:
        """The firewall under test is pinhole's enforcer: a check may then also look at its
        internals (status, decisions, flows, its log), evidence beyond the packets that no
        other firewall offers. What a clause asks of any firewall, a check shows by packets."""
        from testbed.lab import EnforcerProcess

        return isinstance(self.enforcer, EnforcerProcess)

    def addr(self, node: str, index: int = 0) -> str:
        return self.topology.address(node, self.family, index)

    def fw_internal(self, facing: str | None = None) -> str:
        """The fw's internal address on the network of ``facing`` (a client); without it,
        on the topology's only internal network."""
        return self.topology.fw_internal_address(self.family, facing)

    def fw_external(self, index: int = 0) -> str:
        return self.topology.fw_external_addresses(self.family)[index]

    def iface(self, node: str) -> str:
        return self.topology.iface_of(node)

    def mac(self, node: str, iface: str | None = None) -> str:
        path = f"/sys/class/net/{iface or self.iface(node)}/address"
        return str(self.lab.tb.run(node, ["cat", path]).stdout.strip())

    def agent(self, node: str) -> Any:
        return self.lab.tb.agent(node)

    def call(self, method: str, **params: Any) -> Any:
        return self.enforcer.call(method, **params)

    def client(self) -> SessionCalls:
        """The firewall's session API, a new connection (close it, or use it in a with
        block): the enforcer's control-socket client, or another with its methods."""
        client: SessionCalls = self.enforcer.client()
        return client

    def session(self, client: str) -> int:
        """The client's SecureNAT session, made by a primary (FTP) connection if needed."""
        def find() -> int | None:
            return next((s["id"] for s in self.call("sessions") if s["client"] == self.addr(client)
                         and s["kind"] == "securenat"), None)

        found = find()
        if found is None:
            server = self.addr("s1")
            # the connection alone makes it (no bytes: with the FTP filter on, a partial
            # command line would be held until the echo's wait ran out)
            with self.agent("s1").tcp_server(server, 21):
                result = self.agent(client).tcp_connect(server, 21)
            assert result["connected"], f"{client}'s primary FTP connection failed: {result['error']}"
            found = find()
            assert found is not None, f"no session for {client} after its primary connection"
        return found

    def fw_received(self, iface: str, since: float = 0.0) -> FwPackets:
        """What the fw received on ``iface`` during this test (from ``since``, a time.time()),
        from its pcap, as a sniffer for testbed.checks: to show that a probe reached the fw."""
        index = self.lab.fw_ifindex(iface)
        return FwPackets(_test_pcap(), f"the fw, received on {iface}",
                         lambda p: p.time >= since and p.ifindex == index
                         and p.pkttype != SLL2_OUTGOING)

    def fw_sent(self, since: float = 0.0) -> FwPackets:
        """What the fw sent, on any interface, during this test (from ``since``), from its
        pcap: to show that a probe went no further and that nothing answered it."""
        return FwPackets(_test_pcap(), "the fw, sent on any interface",
                         lambda p: p.time >= since and p.pkttype == SLL2_OUTGOING)

    def source_seen_by_server(self, client: str) -> str:
        """The address a server sees for a client's primary connection."""
        return self.fw_external(0) if self.nat else self.addr(client)


def _test_pcap() -> str:
    from testbed.checks import current_pcap

    path = current_pcap()
    if path is None:
        raise RuntimeError("no fw capture runs for this test (it does not use the lab)")
    return path


@pytest.fixture
def net(request: pytest.FixtureRequest, lab: Lab, family: str, firewall: str) -> Iterator[Net]:
    """The lab in one family, with the firewall under test (the enforcer, unless another
    is chosen) running in its default configuration.

    Permissions a test leaves pending are cancelled afterwards, so that none admits
    a later test's traffic.
    """
    lab.use(firewall, reconfigure=request.node.get_closest_marker("reconfigures") is None)
    mode = request.getfixturevalue("mode") if "mode" in request.fixturenames else None
    yield Net(lab, family, mode)
    cancel_pending(lab)


# The SOCKS caps the Firewall-client checks run with (FWC, the resets): timeouts short
# enough to be waited out, a buffer small enough to fill
SOCKS_HANDSHAKE_TIMEOUT, SOCKS_BIND_TIMEOUT, SOCKS_BUFFER = 1.0, 3.0, 4096
SOCKS_LIMITS: dict[str, object] = {"socks_handshake_timeout": SOCKS_HANDSHAKE_TIMEOUT,
                                   "socks_bind_timeout": SOCKS_BIND_TIMEOUT,
                                   "socks_buffer_bytes": SOCKS_BUFFER, "socks_connections_per_client": 6,
                                   "socks_connections_total": 8}


@pytest.fixture
def socks_net(lab: Lab, family: str, firewall: str) -> Iterator[Net]:
    """As ``net``, with the SOCKS service's caps small (SOCKS_LIMITS); the checks that use
    it one after another share one run of the enforcer."""
    lab.use(firewall, limits=SOCKS_LIMITS)
    yield Net(lab, family)
    cancel_pending(lab)


@pytest.fixture
def filtering(lab: Lab, family: str, firewall: str) -> Iterator[Net]:
    """As ``net``, with the firewall's FTP and TFTP filters on: for checks that need
    application filters at work."""
    lab.use(firewall, APP_FILTERS)
    yield Net(lab, family)
    cancel_pending(lab)


def cancel_pending(lab: Lab) -> None:
    """Cancel what the enforcer (in any of its configurations) was left pending by a check
    (one that expires meanwhile is as good)."""
    from testbed.lab import EnforcerProcess

    if isinstance(lab.firewall, EnforcerProcess) and lab.firewall.running:
        with lab.firewall.client() as client:
            # (a listing holds at most its limit: again until none is left)
            while actions := [a["action"] for a in client.call("actions")]:
                for action in actions:
                    with contextlib.suppress(Terminating):
                        client.call("cancel", action=action)


class App(Net):
    """The lab in one family for an APP clause, with ``firewall`` in the fw namespace
    (the enforcer with its application filters, Linux's conntrack helpers, ...)."""

    def __init__(self, lab: Lab, family: str, firewall: str, node: pytest.Item) -> None:
        super().__init__(lab, family)
        self.firewall = firewall
        self.node = node

    @property
    def kernel_helpers(self) -> bool:
        return self.firewall == "kernel-helpers"

    def helpers_deviate(self, why: str) -> None:
        """The kernel helpers are known to fail this check (a strict xfail for them): the
        matrix shows their FAIL, and the run does not fail for it, unless they pass."""
        if self.kernel_helpers:
            self.node.add_marker(pytest.mark.xfail(reason=why, strict=True))


@pytest.fixture
def app(request: pytest.FixtureRequest, lab: Lab, family: str, firewall: str) -> Iterator[App]:
    """The lab for an APP clause, once per ``firewall``."""
    lab.use(firewall, APP_FILTERS, keep_peers=True)
    yield App(lab, family, firewall, request.node)
    cancel_pending(lab)


@pytest.fixture(autouse=True)
def _pinhole_fw_pcap(request: pytest.FixtureRequest) -> Iterator[None]:
    if "lab" not in request.fixturenames:
        yield
        return
    from testbed.capture import FwCapture, relied_on_for_absence
    from testbed.checks import set_current_pcap

    the_lab: Lab = request.getfixturevalue("lab")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid.split("::", 1)[-1])
    path = request.config.stash[_ARTIFACTS] / "pcap" / f"{name}.pcap"
    path.parent.mkdir(parents=True, exist_ok=True)
    request.node.user_properties.append(("pcap", str(path)))
    with FwCapture(the_lab.tb.netns("fw"), path) as capture:
        set_current_pcap(str(path))
        try:
            yield
        finally:
            set_current_pcap(None)
            log = getattr(the_lab.firewall, "log_path", None)  # the firewall the check used
            if log is not None:
                request.node.user_properties.append(("log", str(log)))
    relied_on, dropped = relied_on_for_absence(path), capture.dropped
    if dropped:
        request.node.user_properties.append(("pcap dropped", dropped))
    outcome = request.node.stash.get(_OUTCOME, "passed")
    if outcome not in ("passed", "failed"):  # skipped: it concluded nothing
        return
    loss = capture_loss(dropped, path, failed=outcome == "failed", relied_on=relied_on)
    if loss is None:
        return
    if outcome == "passed":
        pytest.fail(loss, pytrace=False)
    request.node.stash[_DETAIL] = f"{request.node.stash.get(_DETAIL, '')}\n{loss}"  # beside why


def capture_loss(dropped: int | None, path: Path, *, failed: bool, relied_on: bool) -> str | None:
    """What a check is to be told of its fw capture's losses (``dropped``: tcpdump's
    count, None if it said none), if anything: one that failed, that it may have looked
    for a lost packet; one that passed on what the capture did not show (``relied_on``),
    that it cannot stand, as when tcpdump did not say (killed, or ended early). To one
    that passed on packets it found there, nothing."""
    if dropped == 0 or not (failed or relied_on):
        return None
    if dropped is None:
        return None if failed else (
            f"tcpdump did not say whether the fw's capture ({path}) lost packets (it was "
            "killed, or ended early), and the check concluded from what it did not show")
    lost = f"the fw's capture ({path}) lost {dropped} packets (tcpdump: dropped)"
    if failed:
        return f"{lost}: a packet the check looked for in it may be one of them"
    return (f"{lost}, and the check concluded from what it did not show: the packet it says "
            "never came may be one of them")


# --- results ------------------------------------------------------------------------------

@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if call.excinfo is not None and call.excinfo.errisinstance(Unsupported) and report.failed:
        # the firewall lacks what the check needs: n/a for it, neither passed nor failed
        name = _firewall_of(item) or "the firewall"
        report.outcome = "skipped"
        report.longrepr = (str(item.path), 0, f"n/a: {name} does not support {call.excinfo.value}")
        item.stash[_NA] = True
    if report.skipped and not hasattr(report, "wasxfail") and not item.stash.get(_NA, False) and \
            os.environ.get(REQUIRE_E2E) == "1" and item.get_closest_marker("e2e") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"end-to-end test skipped under {REQUIRE_E2E}=1, "
                           f"which makes skips failures: {reason}")
    _record(item, report)
    return report


def _firewall_of(item: pytest.Item) -> str | None:
    params = getattr(item, "callspec", None)
    return params.params.get("firewall") if params is not None else None


# --- self-check: a clause caught for a firewall needs no more of its checks there ----------

def _caught_file(config: pytest.Config) -> Path:
    return config.stash[_ARTIFACTS] / "self-check-caught.txt"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not item.config.getoption("pinhole_self_check"):
        return
    firewall = _firewall_of(item)
    clauses = [m.args[0] for m in item.iter_markers("clause")]
    path = _caught_file(item.config)
    if firewall is None or not clauses or not path.exists():
        return
    caught = set(path.read_text().split())
    if all(f"{firewall}/{c}" in caught for c in clauses):
        item.stash[_NA] = True
        pytest.skip(f"self-check: {firewall} already fails {', '.join(clauses)}")


def _note_caught(item: pytest.Item, clauses: list[str]) -> None:
    firewall = _firewall_of(item)
    if item.config.getoption("pinhole_self_check") and firewall is not None:
        path = _caught_file(item.config)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:  # (workers append whole lines)
            out.write("".join(f"{firewall}/{c}\n" for c in clauses))


def _record(item: pytest.Item, report: pytest.TestReport) -> None:
    clauses = [m.args[0] for m in item.iter_markers("clause")]
    if not clauses:
        return
    durations: dict[str, float] = item.stash.setdefault(_DURATIONS, {})
    durations[report.when] = report.duration
    outcome = item.stash.get(_OUTCOME, "passed")
    if hasattr(report, "wasxfail") and report.skipped:
        # a known deviation of the firewall compared (kernel helpers): it fails the clause
        item.stash[_OUTCOME] = outcome = "failed"
        item.stash[_DETAIL] = f"known deviation: {report.wasxfail}\n{_detail(report)}"
    elif report.outcome == "failed" or (report.outcome == "skipped" and outcome == "passed"):
        item.stash[_OUTCOME] = outcome = report.outcome
        item.stash[_DETAIL] = _detail(report)
        if report.outcome == "failed":
            _note_caught(item, clauses)
    if outcome == "skipped" and item.stash.get(_NA, False):
        outcome = "n/a"
    if report.when == "call":
        # what the check itself came to (progress lines show it, not the teardown's)
        report.pinhole_outcome = outcome  # type: ignore[attr-defined]
    if report.when != "teardown":
        return
    params = getattr(item, "callspec", None)
    p = params.params if params is not None else {}
    pcap = dict(item.user_properties).get("pcap")
    log = dict(item.user_properties).get("log")
    detail = item.stash.get(_DETAIL, "") if outcome != "passed" else \
        (item.obj.__doc__ or "").strip().split("\n")[0] if hasattr(item, "obj") else ""
    # with the report (an attribute pytest-xdist carries from a worker), so that the
    # process that collects gets it: pytest_runtest_logreport runs there (and here, when
    # nothing runs in parallel)
    report.pinhole_results = [dataclasses.asdict(Result(  # type: ignore[attr-defined]
        clause=clause, family=p.get("family"), topology=p.get("variant"), mode=p.get("mode"),
        outcome=outcome, duration_s=sum(durations.values()), pcap=str(pcap) if pcap else None,
        detail=detail, nodeid=item.nodeid, firewall=p.get("firewall"),
        log=str(log) if log else None)) for clause in clauses]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for found in getattr(report, "pinhole_results", ()):
        _config().stash[RESULTS].append(Result(**found))


_NA = pytest.StashKey[bool]()
_DURATIONS = pytest.StashKey[dict[str, float]]()
_OUTCOME = pytest.StashKey[str]()
_DETAIL = pytest.StashKey[str]()


def _detail(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):
        return str(longrepr[2])
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(longrepr)
    return text[:4000]
