"""Build a :class:`~testbed.topology.Topology` into live network namespaces.

``Testbed.up(topology)`` creates one namespace per node (``ph-<6 hex>-<node>``),
a Linux bridge in each switch node, one veth pair per host interface (the
switch end ``<node>-<iface>`` on the bridge, the host end in the host), the
addresses and routes, and then polls until the network is usable. Every
namespace is written to the ledger before it is created and every process
started through the handle right after, so :func:`testbed.ledger.sweep` can
remove what a crashed run left.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import secrets
import select
import shlex
import socket
import struct
import subprocess
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from testbed import ledger as ledger_mod
from testbed.ledger import Ledger
from testbed.topology import FAMILIES, Topology, named

if TYPE_CHECKING:
    from testbed.agent import Agent

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
AF_INET6 = 10

READY_TIMEOUT = 5.0
KILL_GRACE = 1.0


class TestbedError(RuntimeError):
    """Building or using a testbed failed."""

    __test__ = False  # not a pytest test class


class UnknownTestbed(LookupError):
    """No ledger exists for the requested testbed id."""


class CommandFailed(subprocess.CalledProcessError):
    """A command run in a namespace exited non-zero; the message carries the
    command line and its stderr."""

    def __init__(self, node: str, netns: str, returncode: int, cmd: list[str],
                 output: str | None, stderr: str | None) -> None:
        super().__init__(returncode, cmd, output, stderr)
        self.node = node
        self.netns = netns

    def __str__(self) -> str:
        err = (self.stderr or "").strip() or "(no stderr)"
        return (
            f"command failed on {self.node} ({self.netns}) with exit code "
            f"{self.returncode}: {shlex.join(self.cmd)}\nstderr: {err}"
        )


def _ns_name(tb_id: str, node: str) -> str:
    return f"{ledger_mod.NS_PREFIX}{tb_id}-{node}"


def _new_id() -> str:
    existing = set(ledger_mod.list_namespaces())
    for _ in range(100):
        tb_id = secrets.token_hex(3)
        if not (ledger_mod.state_dir() / f"{tb_id}.json").exists() and not any(
            n.startswith(f"{ledger_mod.NS_PREFIX}{tb_id}-") for n in existing
        ):
            return tb_id
    raise TestbedError("could not pick an unused testbed id")


def _sysctls(topology: Topology, node: str) -> list[str]:
    n = topology.node(node)
    # DAD off before any interface exists: new interfaces copy "default", so
    # link-local addresses are never tentative either.
    out = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
    if n.role == "switch":
        # A switch is pure L2; no IPv6 on its ports keeps captures quiet.
        out += ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
    else:
        # No router advertisements are expected; ignore any stray ones.
        out += ["net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0"]
    if n.forwarding:
        out += ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
    return out


_live: set[Testbed] = set()


@atexit.register
def _down_at_exit() -> None:
    # A test run that forgets down() should not leave namespaces behind.
    for tb in list(_live):
        if tb._owner_pid == os.getpid():
            with contextlib.suppress(Exception):
                tb.down()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping_many(probes: list[tuple[str, str]], timeout: float = 1.0) -> list[bool]:
    """Send one ICMP/ICMPv6 echo request per (namespace, destination) and
    wait up to ``timeout`` s for the replies; True where one arrived.

    Raw sockets are opened inside the namespaces from this process (pyroute2
    passes the descriptor back from a short-lived child), so no ``ping``
    binary is needed and all probes run concurrently."""
    from pyroute2 import netns as pr_netns

    socks: list[socket.socket] = []
    # fd -> (probe index, echo identifier, expected source, socket)
    expect: dict[int, tuple[int, int, bytes, socket.socket]] = {}
    result = [False] * len(probes)
    try:
        for i, (ns, dst) in enumerate(probes):
            ip = ipaddress.ip_address(dst)
            v6 = ip.version == 6
            fam = socket.AF_INET6 if v6 else socket.AF_INET
            proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
            s = pr_netns.create_socket(ns, fam, socket.SOCK_RAW, proto, flags=0)
            socks.append(s)
            s.setblocking(False)
            ident = secrets.randbits(16)
            payload = b"pinhole-ready"
            head = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1)
            if not v6:  # the kernel fills in the ICMPv6 checksum, not ICMP's
                head = struct.pack("!BBHHH", 8, 0, _checksum(head + payload), ident, 1)
            try:
                s.sendto(head + payload, (dst, 0))
            except OSError:
                continue  # e.g. no route yet: counts as no reply
            expect[s.fileno()] = (i, ident, ip.packed, s)
        deadline = time.monotonic() + timeout
        while expect:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(expect), [], [], left)
            for fd in ready:
                i, ident, src, s = expect[fd]
                while True:
                    try:
                        data, addr = s.recvfrom(2048)
                    except BlockingIOError:
                        break
                    v6 = len(src) == 16
                    # Raw IPv4 sockets deliver the IP header, IPv6 ones do not.
                    icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
                    if len(icmp) < 8:
                        continue
                    typ, _code, _ck, rid, _seq = struct.unpack("!BBHHH", icmp[:8])
                    from_ = ipaddress.ip_address(addr[0].split("%")[0]).packed
                    if typ == (129 if v6 else 0) and rid == ident and from_ == src:
                        result[i] = True
                        del expect[fd]
                        break
    finally:
        for s in socks:
            s.close()
    return result


class Testbed:
    """A live testbed: namespaces built from a topology, plus the handles
    (processes, agents) started in them."""

    __test__ = False  # not a pytest test class

    def __init__(self, topology: Topology, tb_id: str, ledger: Ledger) -> None:
        self.topology = topology
        self.id = tb_id
        self._ledger = ledger
        self._procs: dict[int, subprocess.Popen[Any]] = {}
        self._agents: dict[str, Agent] = {}
        self._down = False
        self._owner_pid = os.getpid()
        self.build_seconds: float | None = None

    # -- lifecycle -----------------------------------------------------------
    @classmethod
    def up(cls, topology: Topology, *, tag: str | None = None,
           detached: bool = False, timeout: float = READY_TIMEOUT) -> Testbed:
        """Build ``topology`` and return once it is usable (links up with
        carrier, no tentative IPv6 address, every host reaches the firewall
        in both families). ``detached`` testbeds outlive this process (the
        CLI uses it); others are swept once this process is gone."""
        t0 = time.monotonic()
        ledger_mod.sweep()
        tb_id = _new_id()
        namespaces = {n.name: _ns_name(tb_id, n.name) for n in topology.nodes}
        led = Ledger.create(
            tb_id,
            variant=topology.variant,
            detached=detached,
            tag=tag,
            namespaces=namespaces,
            topology=topology.to_dict(),
        )
        tb = cls(topology, tb_id, led)
        if not detached:
            _live.add(tb)
        try:
            tb._build()
            tb._wait_ready(deadline=time.monotonic() + timeout)
        except BaseException:
            tb.down()
            raise
        tb.build_seconds = time.monotonic() - t0
        return tb

    @classmethod
    def attach(cls, tb_id: str) -> Testbed:
        """A handle on an existing testbed, from its ledger (another process
        may own it). Raises :class:`UnknownTestbed`."""
        try:
            led = Ledger.load(tb_id)
        except FileNotFoundError:
            raise UnknownTestbed(f"no testbed with id {tb_id!r}") from None
        try:
            topo = (
                Topology.from_dict(led.topology) if led.topology else named(led.variant)
            )
        except (ValueError, KeyError, TypeError) as e:
            raise TestbedError(
                f"the ledger of testbed {tb_id!r} records no usable topology ({e})"
            ) from None
        return cls(topo, tb_id, led)

    def down(self) -> None:
        """Close agents, stop recorded processes (SIGTERM, then SIGKILL),
        delete the namespaces and the ledger. Idempotent."""
        if self._down:
            return
        self._down = True
        _live.discard(self)
        for agent in list(self._agents.values()):
            with contextlib.suppress(Exception):
                agent.close()
        self._agents.clear()
        with contextlib.suppress(FileNotFoundError, ValueError):
            self._ledger = Ledger.load(self.id)
        pids = [(int(p["pid"]), p.get("start")) for p in self._ledger.pids]
        ledger_mod.kill_pids(pids, grace=KILL_GRACE)
        for proc in self._procs.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=KILL_GRACE)
        self._procs.clear()
        for ns in self._ledger.namespaces.values():
            ledger_mod.delete_namespace(ns)
        self._ledger.remove()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.down()

    # -- building ------------------------------------------------------------
    def _build(self) -> None:
        from pyroute2 import IPRoute, netns

        topo = self.topology
        for node in topo.nodes:
            netns.create(self.netns(node.name))
        # sysctls are per namespace: set them from a process inside each one.
        procs = [
            (node.name, subprocess.Popen(
                ["ip", "netns", "exec", self.netns(node.name), "sysctl", "-qw",
                 *_sysctls(topo, node.name)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for node in topo.nodes
        ]
        for name, p in procs:
            _, err = p.communicate(timeout=10)
            if p.returncode != 0:
                raise TestbedError(f"setting sysctls in {name} failed: {err.strip()}")

        iprs: dict[str, Any] = {}
        try:
            for node in topo.nodes:
                iprs[node.name] = IPRoute(netns=self.netns(node.name), flags=0)
                ipr = iprs[node.name]
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            for seg in topo.segments:
                ipr = iprs[seg.switch]
                ipr.link("add", ifname=seg.bridge, kind="bridge",
                         br_stp_state=0, br_mcast_snooping=0, br_forward_delay=0)
                ipr.link("set", index=ipr.link_lookup(ifname=seg.bridge)[0], state="up")
            for host, ifname, switch in topo.links():
                seg = topo.segment(topo.node(host).interface(ifname).segment)
                sw = iprs[switch]
                port = f"{host}-{ifname}"
                # The peer is created directly inside the host namespace: no
                # name ever exists in the root namespace, so testbeds built
                # concurrently cannot collide.
                sw.link("add", ifname=port, kind="veth",
                        peer={"ifname": ifname, "net_ns_fd": self.netns(host)})
                sw.link("set", index=sw.link_lookup(ifname=port)[0],
                        master=sw.link_lookup(ifname=seg.bridge)[0], state="up")
            for node in topo.hosts:
                ipr = iprs[node.name]
                for iface in node.interfaces:
                    idx = ipr.link_lookup(ifname=iface.name)[0]
                    v4 = [a for a in iface.addresses if ipaddress.ip_interface(a).version == 4]
                    v6 = [a for a in iface.addresses if ipaddress.ip_interface(a).version == 6]
                    # IPv4: the first address added is the primary one. IPv6:
                    # on a tie the kernel prefers the newest source address, so
                    # add them in reverse to make the first one preferred.
                    for addr in [*v4, *reversed(v6)]:
                        ifa = ipaddress.ip_interface(addr)
                        kw: dict[str, Any] = {}
                        if ifa.version == 6:
                            kw["flags"] = IFA_F_NODAD
                        ipr.addr("add", index=idx, address=str(ifa.ip),
                                 prefixlen=ifa.network.prefixlen, **kw)
                    ipr.link("set", index=idx, state="up")
                for route in node.routes:
                    rkw: dict[str, Any] = {"dst": route.dst_cidr}
                    if route.family == "ipv6":
                        rkw["family"] = AF_INET6
                    if route.via is not None:
                        rkw["gateway"] = route.via
                    if route.dev is not None:
                        rkw["oif"] = ipr.link_lookup(ifname=route.dev)[0]
                    try:
                        ipr.route("add", **rkw)
                    except Exception as e:
                        raise TestbedError(
                            f"adding route {route} on {node.name} failed: {e}"
                        ) from e
        finally:
            for ipr in iprs.values():
                with contextlib.suppress(Exception):
                    ipr.close()

    def _link_problems(self) -> list[str]:
        from pyroute2 import IPRoute

        problems = []
        for node in self.topology.nodes:
            with IPRoute(netns=self.netns(node.name), flags=0) as ipr:
                names = {}
                for link in ipr.get_links():
                    name = link.get("ifname") or link.get_attr("IFLA_IFNAME")
                    names[link["index"]] = name
                    flags = link["flags"]
                    if not flags & IFF_UP:
                        problems.append(f"{node.name}:{name} is down")
                    elif name != "lo" and not flags & IFF_LOWER_UP:
                        problems.append(f"{node.name}:{name} has no carrier")
                for addr in ipr.get_addr(family=AF_INET6):
                    flags = addr.get_attr("IFA_FLAGS") or addr["flags"]
                    if flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                        problems.append(
                            f"{node.name}:{names.get(addr['index'])} address "
                            f"{addr.get_attr('IFA_ADDRESS')} is tentative"
                        )
        return problems

    def _wait_ready(self, deadline: float) -> None:
        problems = self._link_problems()
        while problems:
            if time.monotonic() >= deadline:
                raise TestbedError("testbed not ready: " + "; ".join(problems))
            time.sleep(0.02)
            problems = self._link_problems()

        topo = self.topology
        probes: list[tuple[str, str]] = []
        for family in FAMILIES:
            for c in topo.clients:
                probes.append((c.name, topo.fw_internal_address(family, facing=c.name)))
            for s in topo.servers:
                probes.append((s.name, topo.fw_external_addresses(family)[0]))
        pending = probes
        while pending:
            replies = ping_many(
                [(self.netns(node), dst) for node, dst in pending],
                timeout=max(0.05, min(1.0, deadline - time.monotonic())),
            )
            pending = [probe for probe, ok in zip(pending, replies, strict=True) if not ok]
            if pending and time.monotonic() >= deadline:
                raise TestbedError(
                    "testbed not ready: no ping reply for "
                    + ", ".join(f"{n} -> {d}" for n, d in pending)
                )

    # -- using -----------------------------------------------------------------
    def netns(self, node: str) -> str:
        """The real namespace name of ``node``."""
        try:
            return self._ledger.namespaces[node]
        except KeyError:
            raise KeyError(
                f"no node {node!r} in testbed {self.id} "
                f"(nodes: {', '.join(self.topology.node_names)})"
            ) from None

    def ping(self, node: str, dst: str, timeout: float = 1.0) -> bool:
        """One ICMP(v6) echo from ``node`` to ``dst``: True if answered
        within ``timeout`` s. Needs no ``ping`` binary."""
        return ping_many([(self.netns(node), dst)], timeout=timeout)[0]

    def _argv(self, node: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns(node), *argv]

    def run(self, node: str, argv: list[str], *, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``node`` and wait; text mode, output captured.
        Raises :class:`CommandFailed` (a CalledProcessError) when ``check``
        and the exit code is not 0."""
        full = self._argv(node, list(argv))
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                           input=input, check=False)
        if check and r.returncode != 0:
            raise CommandFailed(node, self.netns(node), r.returncode, list(argv),
                                r.stdout, r.stderr)
        return r

    def popen(self, node: str, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``node``; its pid is recorded in the ledger
        (``down()`` or a sweep will stop it). Call :meth:`forget` once you
        have reaped it yourself."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            self._argv(node, list(argv)), **popen_kwargs
        )
        self._procs[proc.pid] = proc
        self._ledger.add_pid(proc.pid, node=node, what=shlex.join(argv))
        return proc

    def forget(self, pid: int) -> None:
        """Drop ``pid`` from the ledger (the caller reaped it). After ``down()``, there
        is no ledger to drop it from (writing one would bring it back)."""
        self._procs.pop(pid, None)
        if not self._down:
            self._ledger.forget_pid(pid)

    def agent(self, node: str) -> Agent:
        """The traffic agent of ``node``, started on first use."""
        if node not in self._agents:
            from testbed.agent import Agent

            a = Agent.start(netns=self.netns(node), name=node)
            self._agents[node] = a
            self._ledger.add_pid(a.pid, node=node, what="agent")
        return self._agents[node]

    @property
    def namespaces(self) -> dict[str, str]:
        """node -> namespace name."""
        return dict(self._ledger.namespaces)

    def describe(self) -> str:
        """A human-readable table of nodes, namespaces, interfaces, addresses."""
        topo = self.topology
        rows = [("node", "role", "netns", "iface", "addresses")]
        for n in topo.nodes:
            if n.role == "switch":
                ports = [f"{h}-{i}" for h, i, sw in topo.links() if sw == n.name]
                bridges = [s.bridge for s in topo.segments if s.switch == n.name]
                rows.append((n.name, n.role, self.netns(n.name), ",".join(bridges),
                             "ports: " + " ".join(ports)))
                continue
            for k, iface in enumerate(n.interfaces):
                rows.append((
                    n.name if k == 0 else "",
                    n.role if k == 0 else "",
                    self.netns(n.name) if k == 0 else "",
                    iface.name,
                    " ".join(iface.addresses),
                ))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
            for r in rows
        ]
        extra = f", tag {self._ledger.tag}" if self._ledger.tag else ""
        header = f"testbed {self.id} (variant {topo.variant}{extra})"
        routes = []
        for n in topo.hosts:
            for r in n.routes:
                how = f"via {r.via}" if r.via else f"dev {r.dev}"
                routes.append(f"  {n.name}: {r.dst} {how}")
        return "\n".join([header, *lines, "routes:", *routes]) + "\n"

    def __repr__(self) -> str:
        return f"<Testbed {self.id} {self.topology.variant}{' down' if self._down else ''}>"
