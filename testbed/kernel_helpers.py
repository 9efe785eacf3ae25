"""A firewall made of the Linux kernel's own conntrack helpers, in the testbed's ``fw``.

:class:`KernelHelperFirewall` is the real peer the enforcer is compared with:
the same policy, enforced by netfilter's FTP and TFTP helpers instead of the
session API. It turns the ``fw`` namespace into a default-deny forwarding
firewall (both families, iptables and ip6tables):

- clients on the internal networks may open FTP (tcp/21) and TFTP (udp/69)
  connections through the fw (internal interface in, external out);
- packets of established flows pass both ways (replies);
- a new flow passes only if a helper expected it: conntrack state RELATED,
  status EXPECTED, and a master connection whose helper is ``ftp`` or
  ``tftp`` (``-m helper``); ICMP errors about tracked flows (RELATED) pass too;
- everything else forwarded is dropped (our chain ends in DROP; the built-in
  policies are left as they were);
- a new TCP connection or UDP flow from outside to the fw itself is dropped, as the
  enforcer's rules drop it (its own stack would answer with a reset or a port
  unreachable, where a data connection nobody expected must meet silence);
- in the NAT variant the client networks are source-translated to the fw's
  first external address, so ``nf_nat_ftp`` rewrites PORT/EPRT commands and
  PASV/EPSV replies and ``nf_nat_tftp`` translates the server's replies;
- with ``publish=PORT``, the fw's internal address port PORT leads to s1's FTP
  server (destination NAT, the helper attached): the client sees only the fw,
  and ``nf_nat_ftp`` rewrites the server's PASV replies to the fw's address.

The same rules stand in for the two trivial firewalls the suite must tell apart
from a real one (``forward=``): ``"everything"``, an *open router* that forwards
(and in NAT translates) every flow, and ``"nothing new"``, a *closed router*
that forwards only flows it already had. Neither attaches helpers.

The helpers are attached explicitly in the raw table
(``-j CT --helper ftp|tftp`` on new connections from the internal side to
port 21/69): current kernels attach none automatically. With
``helpers=False`` the same rules are installed without that attachment,
which leaves data channels and TFTP replies with nothing to match: a check
that the policy really is default-deny.

What the kernel's FTP helper does with a third-party address: when the
address in a PORT or EPRT command (or a PASV reply) differs from the address
of the control connection's end that sent it, ``nf_conntrack_ftp`` lets the
packet through but creates *no expectation*, unless the module parameter
``loose`` is 1 (default 0, read by :meth:`KernelHelperFirewall.describe`);
with ``loose=1`` it expects the connection to or from the named address. So a
client's ``PORT`` naming another host opens nothing here, and that data
connection is dropped. EPSV names no address; the helper expects the
connection to the control connection's server address.

All chains are named ``phk-*`` and hang off the built-in chains by one jump
each; :meth:`KernelHelperFirewall.remove` deletes exactly those jumps and
chains, then the connection-tracking state the helpers left (expectations,
and the entries with an ftp/tftp helper attached), so no hole outlives the
firewall. :meth:`install` refuses while the enforcer's rules (iptables chains
``PINHOLE-*`` or the nft table ``pinhole``) are present: stop the enforcer
first.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Literal

from testbed.build import Testbed
from testbed.topology import FAMILIES, Family

__all__ = ["CHAIN_PREFIX", "FORWARDS", "HELPERS", "Forward", "KernelHelperError", "KernelHelperFirewall"]

CHAIN_PREFIX = "phk-"
HELPERS = {"ftp": ("tcp", 21), "tftp": ("udp", 69)}
TOOLS: dict[Family, str] = {"ipv4": "iptables", "ipv6": "ip6tables"}
ICMP: dict[Family, str] = {"ipv4": "icmp", "ipv6": "ipv6-icmp"}
MODULES = ("nf_conntrack_ftp", "nf_conntrack_tftp", "nf_nat_ftp", "nf_nat_tftp")

# part -> (table, our chain, the built-in chain that jumps to it)
CHAINS = {
    "helpers": ("raw", f"{CHAIN_PREFIX}helpers", "PREROUTING"),
    "forward": ("filter", f"{CHAIN_PREFIX}forward", "FORWARD"),
    "input": ("filter", f"{CHAIN_PREFIX}input", "INPUT"),
    "snat": ("nat", f"{CHAIN_PREFIX}snat", "POSTROUTING"),
    "publish": ("nat", f"{CHAIN_PREFIX}publish", "PREROUTING"),
}
Forward = Literal["policy", "everything", "nothing new"]
FORWARDS: tuple[Forward, ...] = ("policy", "everything", "nothing new")
ENFORCER_CHAIN = re.compile(r"^[:\-].*\bPINHOLE-", re.MULTILINE)


class KernelHelperError(RuntimeError):
    """The helper firewall cannot be installed or removed (the message says why)."""


class KernelHelperFirewall:
    """The kernel-helper firewall in ``tb``'s firewall node; a context manager
    (``install()`` on enter, ``remove()`` on exit)."""

    def __init__(self, tb: Testbed, *, helpers: bool = True, publish: int | None = None,
                 forward: Forward = "policy") -> None:
        """``publish``: a port on the fw's internal address that leads to s1's FTP server
        (destination NAT), so that the client sees only the fw. ``forward``: the FTP/TFTP
        policy ("policy"), or a trivial router's "everything" or "nothing new" (no helpers)."""
        if forward not in FORWARDS:
            raise KernelHelperError(f"forward={forward!r} is not one of {', '.join(FORWARDS)}")
        self.tb = tb
        self.forward = forward
        self.helpers = helpers and forward == "policy"
        self.publish = publish
        self.node = tb.topology.firewall.name
        self.nat = tb.topology.variant == "nat"
        # (family, part) pairs whose chain and jump are in place
        self._installed: set[tuple[Family, str]] = set()

    # -- the rules -----------------------------------------------------------------
    def parts(self, family: Family) -> list[str]:
        """The parts (chains, see CHAINS) this firewall uses in ``family``."""
        return [p for p in CHAINS
                if (p != "helpers" or self.helpers) and (p != "snat" or self.nat)
                and (p != "publish" or self.publish is not None)
                and (p != "input" or self.forward == "policy")]

    def rules(self, family: Family) -> str:
        """The ``iptables-restore --noflush`` input for ``family``."""
        topo = self.tb.topology
        inside, outside = topo.fw_internal_iface, topo.fw_external_iface
        net = topo.internal_network(family)
        fw = topo.fw_internal_address(family)
        out: list[str] = []
        for part in self.parts(family):
            table, chain, hook = CHAINS[part]
            out += [f"*{table}", f":{chain} - [0:0]", f"-I {hook} 1 -j {chain}"]
            if part == "helpers":
                for helper, (proto, port) in HELPERS.items():
                    out.append(f"-A {chain} -i {inside} -s {net} -p {proto} --dport {port} "
                               f"-j CT --helper {helper}")
                if self.publish is not None:
                    out.append(f"-A {chain} -i {inside} -s {net} -d {fw} -p tcp "
                               f"--dport {self.publish} -j CT --helper ftp")
            elif part == "publish":
                server = topo.address("s1", family)
                to = server if family == "ipv4" else f"[{server}]"
                out.append(f"-A {chain} -i {inside} -d {fw} -p tcp --dport {self.publish} "
                           f"-j DNAT --to-destination {to}:21")
            elif part == "forward":
                out += [f"-A {chain} {rule}" for rule in self._forward(family)]
            elif part == "input":
                out += [f"-A {chain} -i {outside} -p {proto} -m conntrack --ctstate NEW -j DROP"
                        for proto in ("tcp", "udp")]
            else:  # nat
                external = topo.fw_external_addresses(family)[0]
                out += [f"-A {chain} -o {outside} -s {each} -j SNAT --to-source {external}"
                        for each in topo.internal_networks(family)]
            out.append("COMMIT")
        return "\n".join(out) + "\n"

    def _forward(self, family: Family) -> list[str]:
        """The forward chain's rules."""
        if self.forward == "everything":
            return ["-j ACCEPT"]
        rules = ["-m conntrack --ctstate ESTABLISHED -j ACCEPT"]
        if self.forward == "nothing new":
            return [*rules, "-j DROP"]
        topo = self.tb.topology
        inside, outside = topo.fw_internal_iface, topo.fw_external_iface
        net = topo.internal_network(family)
        rules += [f"-m conntrack --ctstate RELATED --ctstatus EXPECTED -m helper --helper {helper} "
                  "-j ACCEPT" for helper in HELPERS]
        rules.append(f"-p {ICMP[family]} -m conntrack --ctstate RELATED -j ACCEPT")
        rules += [f"-i {inside} -o {outside} -s {net} -p {proto} --dport {port} "
                  "-m conntrack --ctstate NEW -j ACCEPT" for proto, port in HELPERS.values()]
        return [*rules, "-j DROP"]

    def describe(self) -> str:
        """One line for reports: which helpers, how attached, NAT or not."""
        loose = _module_parameter("nf_conntrack_ftp", "loose")
        what = ("Linux conntrack helpers ftp, tftp (nf_conntrack_ftp"
                f"{f' loose={loose}' if loose is not None else ''}, nf_conntrack_tftp")
        if self.nat:
            ext = ", ".join(self.tb.topology.fw_external_addresses(f)[0] for f in FAMILIES)
            what += f"; nf_nat_ftp, nf_nat_tftp with SNAT to {ext}"
        what += ")"
        if self.forward == "everything":
            return "an open router: forwards every flow" + (", source NAT" if self.nat else "")
        if self.forward == "nothing new":
            return "a closed router: forwards only flows it already had"
        if not self.helpers:
            what = "default-deny FTP/TFTP policy WITHOUT conntrack helpers (" + what + " not attached)"
        else:
            what += ", attached by -j CT --helper in the raw table"
        version = _tool_version(self.tb, self.node)
        return what + (f"; {version}" if version else "") + f"; kernel {_kernel()}"

    # -- lifecycle ------------------------------------------------------------------
    def install(self) -> None:
        """Install the rules in both families; on any failure, remove what got in."""
        if self._installed:
            raise KernelHelperError("this KernelHelperFirewall is already installed")
        self._refuse_if_occupied()
        if self.helpers:
            for module in MODULES:  # built in on most kernels; a module elsewhere
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(["modprobe", "-q", module], capture_output=True, timeout=10,
                                   check=False)
        try:
            for family in FAMILIES:
                tool = TOOLS[family]
                r = self.tb.run(self.node, [f"{tool}-restore", "-w", "--noflush"],
                                input=self.rules(family), check=False)
                if r.returncode != 0:
                    raise KernelHelperError(
                        f"{tool}-restore in {self.tb.netns(self.node)} failed: "
                        f"{r.stderr.strip()}\nrules:\n{self.rules(family)}")
                self._installed.update((family, p) for p in self.parts(family))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Delete exactly the jumps and chains :meth:`install` added, then the
        helpers' conntrack state. Idempotent; raises if a deletion failed."""
        errors: list[str] = []
        for family, part in sorted(self._installed):
            tool = TOOLS[family]
            table, chain, hook = CHAINS[part]
            for argv in ([tool, "-w", "-t", table, "-D", hook, "-j", chain],
                         [tool, "-w", "-t", table, "-F", chain],
                         [tool, "-w", "-t", table, "-X", chain]):
                r = self.tb.run(self.node, argv, check=False)
                if r.returncode != 0:
                    errors.append(f"{' '.join(argv)}: {r.stderr.strip()}")
        installed_helpers = self.helpers and bool(self._installed)
        self._installed.clear()
        if installed_helpers:
            self._forget_helper_state(errors)
        if errors:
            raise KernelHelperError("removing the helper firewall: " + "; ".join(errors))

    def __enter__(self) -> KernelHelperFirewall:
        self.install()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()

    # -- checks and state -------------------------------------------------------------
    def ruleset(self) -> str:
        """iptables-save and ip6tables-save of the fw, and nft's tables."""
        out = []
        for family in FAMILIES:
            out.append(self.tb.run(self.node, [f"{TOOLS[family]}-save"], check=False).stdout)
        tables = self.tb.run(self.node, ["nft", "list", "tables"], check=False)
        return "".join(out) + (tables.stdout if tables.returncode == 0 else "")

    def leftovers(self) -> list[str]:
        """Our chains still present in the fw (after :meth:`remove`: none)."""
        return sorted({m.group(0) for m in re.finditer(rf"{re.escape(CHAIN_PREFIX)}[\w-]+",
                                                      self.ruleset())})

    def _refuse_if_occupied(self) -> None:
        text = self.ruleset()
        if ENFORCER_CHAIN.search(text) or re.search(r"^table \w+ pinhole$", text, re.MULTILINE):
            raise KernelHelperError(
                f"the enforcer's rules are present in {self.tb.netns(self.node)} (PINHOLE-* "
                "chains or the nft table pinhole): stop the enforcer before installing the "
                "kernel-helper firewall")
        if CHAIN_PREFIX in text:
            raise KernelHelperError(
                f"{self.tb.netns(self.node)} already has {CHAIN_PREFIX}* chains: another "
                "kernel-helper firewall is installed there")

    def _forget_helper_state(self, errors: list[str]) -> None:
        """Drop every expectation and every entry that has our helpers attached."""
        r = self.tb.run(self.node, ["conntrack", "-F", "expect"], check=False)
        if r.returncode != 0:
            errors.append(f"conntrack -F expect: {r.stderr.strip()}")
        for family in FAMILIES:
            for helper, (proto, port) in HELPERS.items():
                listing = self.tb.run(self.node, ["conntrack", "-L", "-f", family, "-p", proto,
                                                  "--dport", str(port)], check=False).stdout
                for line in listing.splitlines():
                    if f"helper={helper}" not in line:
                        continue
                    tup = _original_tuple(line)
                    if tup is None:
                        continue
                    src, dst, sport, dport = tup
                    self.tb.run(self.node, ["conntrack", "-D", "-f", family, "-p", proto,
                                            "-s", src, "-d", dst, "--sport", sport,
                                            "--dport", dport], check=False)


def _original_tuple(line: str) -> tuple[str, str, str, str] | None:
    """(src, dst, sport, dport) of the original direction of a ``conntrack -L`` line."""
    fields = dict(re.findall(r"\b(src|dst|sport|dport)=(\S+)", line)[:4])
    try:
        return fields["src"], fields["dst"], fields["sport"], fields["dport"]
    except KeyError:
        return None


def _module_parameter(module: str, name: str) -> str | None:
    try:
        return Path(f"/sys/module/{module}/parameters/{name}").read_text().strip()
    except OSError:
        return None


def _tool_version(tb: Testbed, node: str) -> str:
    r = tb.run(node, ["iptables", "-V"], check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def _kernel() -> str:
    try:
        return Path("/proc/sys/kernel/osrelease").read_text().strip()
    except OSError:
        return "unknown"
