"""Kernel state: the netfilter rules that send new flows to the queue, and their removal.

Two backends render the same rules. Native nft (one ``inet pinhole`` table) is
used where the kernel has nft's ``queue`` statement; where it lacks it
(CONFIG_NFT_QUEUE off, as on the machines this was built on), iptables and
ip6tables carry the NFQUEUE target, in chains named ``PINHOLE-*``. Either way
the only marks used are the bits of ``MARK_MASK``, so removing stale state on
start or exit never touches anything else.
"""

from __future__ import annotations

import ipaddress
import itertools
import shlex
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from enforcer.config import DataplaneSettings
from enforcer.core.packet import PROTOCOL_NAMES, IPAddress
from enforcer.core.policy import IPNetwork
from enforcer.core.redirects import IPInterface

CHAIN_PREFIX = "PINHOLE-"
NFT_TABLE = "pinhole"

# The mark bits this enforcer owns, on packets (verdict) and on conntrack entries:
MARK_MODE = 0x30000000     # how an admitted flow runs
MARK_KERNEL = 0x10000000   #   in kernel mode: the kernel forwards the rest of it
MARK_USER = 0x20000000     #   in user mode: every packet is queued to the enforcer
MARK_ONE_WAY = 0x40000000  # replies (target -> client) are not admitted
MARK_SNAT = 0x0F000000     # 1 + index of the external address a flow leaves from (0: none)
MARK_SNAT_SHIFT = 24
MARK_MASK = MARK_MODE | MARK_ONE_WAY | MARK_SNAT  # what the connmark keeps
# Packet-only bits:
MARK_REWRITTEN = 0x80000000  # the enforcer redirected this packet before routing: let it pass
MARK_PORT = 0x0000FFFF       # a kernel-mode redirect rule's port, on a flow's first packet
MARK_OWNED = MARK_MASK | MARK_REWRITTEN | MARK_PORT
MAX_EXTERNAL_ADDRESSES = MARK_SNAT >> MARK_SNAT_SHIFT


def mark_for(user_mode: bool, one_way: bool, snat: int | None) -> int:
    """The mark an admitting verdict sets (pure)."""
    return ((MARK_USER if user_mode else MARK_KERNEL) | (MARK_ONE_WAY if one_way else 0)
            | (0 if snat is None else ((snat + 1) << MARK_SNAT_SHIFT) & MARK_SNAT))


def redirect_port(mark: int) -> int | None:
    """The redirect port a kernel-mode redirect rule marked a flow's first packet with."""
    return (mark & MARK_PORT) or None


def is_user_mode(mark: int) -> bool:
    """Whether a queued packet's mark (restored from its flow) says user mode."""
    return mark & MARK_MODE == MARK_USER


def _hex(value: int) -> str:
    return f"0x{value:08x}"


FAMILIES = {"ipv4": "iptables", "ipv6": "ip6tables"}
TABLES = ("raw", "filter", "mangle", "nat")


class DataplaneError(Exception):
    pass


@dataclass(frozen=True)
class Interfaces:
    """What the enforcer learned about the host's interfaces at start."""

    internal: dict[str, int]  # name -> ifindex
    external: dict[str, int]
    internal_networks: tuple[IPNetwork, ...]
    external_addresses: tuple[IPAddress, ...]
    # (interface name, address with prefix) of the fw's own global internal addresses
    internal_addresses: tuple[tuple[str, IPInterface], ...] = ()

    def external_of(self, family: str) -> list[IPAddress]:
        version = 4 if family == "ipv4" else 6
        return [a for a in self.external_addresses if a.version == version]

    def internal_of(self, family: str) -> list[tuple[str, IPInterface]]:
        version = 4 if family == "ipv4" else 6
        return [(n, a) for n, a in self.internal_addresses if a.version == version]

    def internal_interface_of(self, address: IPAddress) -> str:
        """The internal interface that carries one of the fw's internal addresses."""
        return next(n for n, a in self.internal_addresses if a.ip == address)


def _ports(ports: tuple[int, int]) -> str:
    return f"{ports[0]}:{ports[1]}"


def render_rules(family: str, settings: DataplaneSettings, interfaces: Interfaces,
                 nat: bool, bind_ports: tuple[int, int] | None = None) -> str:
    """iptables-restore input for one family (pure: unit-tested without root).

    ``bind_ports``: the external ports Firewall clients' binds get (None: no SOCKS
    service); a new flow to one of them is the enforcer's to judge.
    """
    kernel = f"{_hex(MARK_KERNEL)}/{_hex(MARK_MODE)}"
    user = f"{_hex(MARK_USER)}/{_hex(MARK_MODE)}"
    admitted = f"! --mark 0x0/{_hex(MARK_MODE)}"
    ours = f"--nfmask {_hex(MARK_MASK)} --ctmask {_hex(MARK_MASK)}"
    bypass = " --queue-bypass" if settings.fail_open else ""
    queue = f"-j NFQUEUE --queue-num {settings.queue}{bypass}"
    # Unmarked packets of flows that are not new: dropped when failing closed; when
    # failing open they go to the queue too, so that a live enforcer still judges
    # them and a dead one lets them pass.
    not_new = f"-A PINHOLE-FORWARD {queue}" if settings.fail_open else "-A PINHOLE-FORWARD -j DROP"
    internal = interfaces.internal_of(family)
    lines = [
        # A user-mode redirect port's packets reach the enforcer before connection
        # tracking, which then tracks them as the enforcer rewrote them.
        "*raw",
        ":PINHOLE-PREROUTING - [0:0]",
        *(f"-A PINHOLE-PREROUTING -i {name} -d {a.ip} -p {proto} --dport "
          f"{_ports(settings.user_redirect_ports)} {queue}"
          for name, a in internal for proto in ("tcp", "udp")),
        "-I PREROUTING 1 -j PINHOLE-PREROUTING",
        "COMMIT",
        "*filter",
        ":PINHOLE-FORWARD - [0:0]",
        ":PINHOLE-INPUT - [0:0]",
        ":PINHOLE-OUTPUT - [0:0]",
        f"-A PINHOLE-FORWARD -m connmark --mark {_hex(MARK_ONE_WAY)}/{_hex(MARK_ONE_WAY)} "
        "-m conntrack --ctdir REPLY -j DROP",
        f"-A PINHOLE-FORWARD -m mark --mark {_hex(MARK_REWRITTEN)}/{_hex(MARK_REWRITTEN)} -j ACCEPT",
        f"-A PINHOLE-FORWARD -m connmark --mark {kernel} -j ACCEPT",
        f"-A PINHOLE-FORWARD -m connmark --mark {user} {queue}",
        f"-A PINHOLE-FORWARD -m conntrack --ctstate NEW {queue}",
        not_new,
        "-I FORWARD 1 -j PINHOLE-FORWARD",
        # A redirect port that leads nowhere (yet, or any more) drops silently: the
        # fw's own stack would answer with a reset or a port unreachable.
        *(f"-A PINHOLE-INPUT -d {a.ip} -p {proto} --dport {_ports(ports)} -j DROP"
          for _, a in internal for proto in ("tcp", "udp")
          for ports in (settings.kernel_redirect_ports, settings.user_redirect_ports)),
        *_bind_rules(family, interfaces, bind_ports, queue),
        "-I INPUT 1 -j PINHOLE-INPUT",
        # ICMP errors the fw itself sends about a flow (fragmentation needed, say): the
        # enforcer translates those about user-mode redirects, as kernel NAT would. Only
        # about confirmed flows: the kernel will not queue a packet that shares the
        # unconfirmed conntrack entry of a flow's first packet (it drops it).
        f"-A PINHOLE-OUTPUT -p {'icmp' if family == 'ipv4' else 'ipv6-icmp'} -m conntrack "
        f"--ctstate RELATED --ctstatus CONFIRMED -m connmark --mark {user} {queue}",
        "-I OUTPUT 1 -j PINHOLE-OUTPUT",
        "COMMIT",
        # The verdict sets the packet mark; copying it to the connmark after the
        # filter hook is what offloads the rest of the flow to the kernel.
        # Restoring it on the way in tells the enforcer a queued packet's mode.
        "*mangle",
        ":PINHOLE-PREROUTING - [0:0]",
        ":PINHOLE-POSTROUTING - [0:0]",
        f"-A PINHOLE-PREROUTING -m connmark {admitted} -j CONNMARK --restore-mark {ours}",
        f"-A PINHOLE-POSTROUTING -m mark {admitted} -j CONNMARK --save-mark {ours}",
        "-I PREROUTING 1 -j PINHOLE-PREROUTING",
        "-I POSTROUTING 1 -j PINHOLE-POSTROUTING",
        "COMMIT",
        # Kernel-mode redirects add their rules to PINHOLE-PREROUTING while they last.
        "*nat",
        ":PINHOLE-PREROUTING - [0:0]",
        ":PINHOLE-POSTROUTING - [0:0]",
    ]
    for ext, net, mark, address in _snat_rules(family, interfaces, nat):
        match = f"-m mark --mark {_hex(mark)}/{_hex(MARK_SNAT)}" if mark else f"-s {net}"
        lines.append(f"-A PINHOLE-POSTROUTING {match} -o {ext} -j SNAT --to-source {address}")
    lines += ["-I PREROUTING 1 -j PINHOLE-PREROUTING", "-I POSTROUTING 1 -j PINHOLE-POSTROUTING",
              "COMMIT"]
    return "\n".join(lines) + "\n"


def _bind_rules(family: str, interfaces: Interfaces, bind_ports: tuple[int, int] | None,
                queue: str) -> list[str]:
    """A new flow to a bind port on an external address goes to the enforcer (a bind
    not approved, or a peer its IpFilter leaves out, is dropped before the bound socket
    sees anything); what belongs to no flow is dropped."""
    if bind_ports is None:
        return []
    return [line for a in interfaces.external_of(family) for proto in ("tcp", "udp")
            for line in (f"-A PINHOLE-INPUT -d {a} -p {proto} --dport {_ports(bind_ports)} "
                         f"-m conntrack --ctstate NEW {queue}",
                         f"-A PINHOLE-INPUT -d {a} -p {proto} --dport {_ports(bind_ports)} "
                         "-m conntrack --ctstate INVALID,UNTRACKED -j DROP")]


def _snat_rules(family: str, interfaces: Interfaces,
                nat: bool) -> list[tuple[str, IPNetwork | None, int, IPAddress]]:
    """(out interface, source network, mark, address): flows marked for an external
    address leave from it (redirected flows always are); in NAT, other flows from the
    internal networks leave from the first."""
    version = 4 if family == "ipv4" else 6
    ours = interfaces.external_of(family)[:MAX_EXTERNAL_ADDRESSES]
    out: list[tuple[str, IPNetwork | None, int, IPAddress]] = []
    for ext in interfaces.external:
        out += [(ext, None, (i + 1) << MARK_SNAT_SHIFT, a) for i, a in enumerate(ours)]
        if ours and nat:
            out += [(ext, net, 0, ours[0]) for net in interfaces.internal_networks
                    if net.version == version]
    return out


_NFT_FAMILY = {"ipv4": "ip", "ipv6": "ip6"}
_NFT_ADDR = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}


def _nft_ports(ports: tuple[int, int]) -> str:
    return f"{ports[0]}-{ports[1]}"


def render_nft(settings: DataplaneSettings, interfaces: Interfaces, nat: bool,
               bind_ports: tuple[int, int] | None = None) -> str:
    """The same rules as render_rules, as one nft table for both families (pure).

    Kernel-mode redirects are elements of two maps per family (the port mark and the
    DNAT target, keyed by client, internal address, protocol and port) rather than rules.
    """
    kernel = f"{_hex(MARK_MODE)} == {_hex(MARK_KERNEL)}"
    user = f"{_hex(MARK_MODE)} == {_hex(MARK_USER)}"
    admitted = f"{_hex(MARK_MODE)} != 0x00000000"
    queue = f"queue num {settings.queue}" + (" bypass" if settings.fail_open else "")
    user_ports = _nft_ports(settings.user_redirect_ports)
    lines = [f"table inet {NFT_TABLE} {{"]
    for family, proto in _NFT_FAMILY.items():
        addr = _NFT_ADDR[family]
        key = f"{addr} . {addr} . inet_proto . inet_service"
        lines += [f"  map redirect_mark_{proto} {{ type {key} : mark; }}",
                  f"  map redirect_to_{proto} {{ type {key} : {addr} . inet_service; }}",
                  f"  map bind_to_{proto} {{ type {addr} . inet_proto . inet_service : "
                  f"{addr} . inet_service; }}"]
    lines += ["  chain raw_prerouting {", "    type filter hook prerouting priority raw; policy accept;"]
    for family, proto in _NFT_FAMILY.items():
        for name, a in interfaces.internal_of(family):
            lines.append(f'    iifname "{name}" {proto} daddr {a.ip} meta l4proto {{ tcp, udp }} '
                         f"th dport {user_ports} {queue}")
    lines += [
        "  }",
        "  chain filter_forward {",
        "    type filter hook forward priority filter; policy accept;",
        f"    ct mark and {_hex(MARK_ONE_WAY)} == {_hex(MARK_ONE_WAY)} ct direction reply drop",
        f"    meta mark and {_hex(MARK_REWRITTEN)} == {_hex(MARK_REWRITTEN)} accept",
        f"    ct mark and {kernel} accept",
        f"    ct mark and {user} {queue}",
        f"    ct state new {queue}",
        f"    {queue}" if settings.fail_open else "    drop",
        "  }",
        "  chain filter_input {",
        "    type filter hook input priority filter; policy accept;",
    ]
    for family, proto in _NFT_FAMILY.items():
        for _, a in interfaces.internal_of(family):
            for ports in (settings.kernel_redirect_ports, settings.user_redirect_ports):
                lines.append(f"    {proto} daddr {a.ip} meta l4proto {{ tcp, udp }} "
                             f"th dport {_nft_ports(ports)} drop")
        for address in interfaces.external_of(family) if bind_ports is not None else ():
            match = (f"{proto} daddr {address} meta l4proto {{ tcp, udp }} "
                     f"th dport {_nft_ports(bind_ports or (0, 0))}")
            lines += [f"    {match} ct state new {queue}", f"    {match} ct state invalid,untracked drop"]
    lines += [
        "  }",
        "  chain filter_output {",
        "    type filter hook output priority filter; policy accept;",
        f"    meta l4proto {{ icmp, ipv6-icmp }} ct state related ct status confirmed "
        f"ct mark and {user} {queue}",
        "  }",
        "  chain restore_mark {",
        "    type filter hook prerouting priority mangle; policy accept;",
        # A packet the enforcer rewrote carries its flow's whole mark already.
        f"    meta mark and {_hex(MARK_REWRITTEN)} == 0 ct mark and {admitted} "
        f"meta mark set ct mark and {_hex(MARK_MASK)}",
        "  }",
        "  chain save_mark {",
        "    type filter hook postrouting priority mangle; policy accept;",
        # nft cannot merge two registers here: the ct mark is set whole, our bits only.
        f"    meta mark and {admitted} ct mark set meta mark and {_hex(MARK_MASK)}",
        "  }",
        "  chain redirect_dnat {",
        "    type nat hook prerouting priority dstnat; policy accept;",
    ]
    # Unlike iptables' --set-xmark, this sets the first packet's whole mark (nft cannot
    # merge the map's value into the mark it had); the packet is addressed to us.
    for proto in _NFT_FAMILY.values():
        key = f"{proto} saddr . {proto} daddr . meta l4proto . th dport"
        lines += [f"    ct state new meta mark set {key} map @redirect_mark_{proto} "
                  f"dnat {proto} to {key} map @redirect_to_{proto}",
                  f"    ct state new dnat {proto} to {proto} daddr . meta l4proto . th dport "
                  f"map @bind_to_{proto}"]
    lines += ["  }", "  chain source_nat {", "    type nat hook postrouting priority srcnat; policy accept;"]
    for family, proto in _NFT_FAMILY.items():
        for ext, net, mark, address in _snat_rules(family, interfaces, nat):
            match = (f"meta mark and {_hex(MARK_SNAT)} == {_hex(mark)} meta nfproto {family}"
                     if mark else f"{proto} saddr {net}")
            lines.append(f'    {match} oifname "{ext}" snat {proto} to {address}')
    lines.append("  }")
    return "\n".join([*lines, "}"]) + "\n"


@dataclass(frozen=True)
class RedirectRule:
    """A kernel-mode redirect port's kernel state: the client's connections to it are
    marked with the port (so the enforcer knows which redirect they came by) and
    sent on to the target by kernel NAT."""

    iface: str  # the internal interface the client is on
    protocol: int
    client: IPAddress
    internal: IPAddress
    port: int
    target: IPAddress
    target_port: int

    @property
    def family(self) -> str:
        return "ipv4" if self.client.version == 4 else "ipv6"

    def _target(self) -> str:
        return f"{self.target}:{self.target_port}" if self.target.version == 4 \
            else f"[{self.target}]:{self.target_port}"

    def iptables(self, op: str) -> list[str]:
        match = (f"{op} PINHOLE-PREROUTING -i {self.iface} -s {self.client} -d {self.internal} "
                 f"-p {PROTOCOL_NAMES[self.protocol]} --dport {self.port}")
        return [f"{match} -j MARK --set-xmark {_hex(self.port)}/{_hex(MARK_PORT)}",
                f"{match} -j DNAT --to-destination {self._target()}"]

    def nft(self, op: str) -> list[str]:
        proto = _NFT_FAMILY[self.family]
        key = f"{self.client} . {self.internal} . {PROTOCOL_NAMES[self.protocol]} . {self.port}"
        mark, to = (f" : {_hex(self.port)}", f" : {self.target} . {self.target_port}") \
            if op == "add" else ("", "")
        return [f"{op} element inet {NFT_TABLE} redirect_mark_{proto} {{ {key}{mark} }}",
                f"{op} element inet {NFT_TABLE} redirect_to_{proto} {{ {key}{to} }}"]


@dataclass(frozen=True)
class BindRule:
    """A SecureNAT client's bind in NAT: new flows to the fw's external address and
    port are sent on to the client's port by kernel NAT (the enforcer then judges
    them in the forward hook, by the bind)."""

    protocol: int
    external: IPAddress
    port: int
    client: IPAddress
    client_port: int

    @property
    def family(self) -> str:
        return "ipv4" if self.client.version == 4 else "ipv6"

    def iptables(self, op: str) -> list[str]:
        to = f"{self.client}:{self.client_port}" if self.client.version == 4 \
            else f"[{self.client}]:{self.client_port}"
        return [f"{op} PINHOLE-PREROUTING -d {self.external} -p {PROTOCOL_NAMES[self.protocol]} "
                f"--dport {self.port} -m conntrack --ctstate NEW -j DNAT --to-destination {to}"]

    def nft(self, op: str) -> list[str]:
        proto = _NFT_FAMILY[self.family]
        key = f"{self.external} . {PROTOCOL_NAMES[self.protocol]} . {self.port}"
        to = f" : {self.client} . {self.client_port}" if op == "add" else ""
        return [f"{op} element inet {NFT_TABLE} bind_to_{proto} {{ {key}{to} }}"]


NatRule = RedirectRule | BindRule


def render_redirects(rules: Iterable[NatRule], add: bool) -> dict[str, str]:
    """iptables-restore input per family that adds or deletes these redirects or
    binds (pure)."""
    out: dict[str, list[str]] = {}
    for rule in rules:
        out.setdefault(rule.family, []).extend(rule.iptables("-A" if add else "-D"))
    return {family: "\n".join(["*nat", *lines, "COMMIT"]) + "\n" for family, lines in out.items()}


def render_nft_redirects(rules: Iterable[NatRule], add: bool) -> str:
    """nft input that adds or deletes these redirects' or binds' map elements (pure)."""
    return "".join(f"{line}\n" for rule in rules for line in rule.nft("add" if add else "delete"))


def program_redirects(backend: str, rules: Sequence[NatRule], add: bool) -> None:
    """Install (add) or remove kernel-mode redirects and SecureNAT binds' NAT, all in one
    transaction per family."""
    if not rules:
        return
    if backend == "nft":
        _run(["nft", "-f", "-"], input=render_nft_redirects(rules, add))
        return
    for family, text in render_redirects(rules, add).items():
        _run([f"{FAMILIES[family]}-restore", "--noflush"], input=text)


def nft_queue_supported() -> bool:
    """Whether this kernel has nft's queue statement (checked, not applied, with nft -c)."""
    probe = (f"table inet {NFT_TABLE}_probe {{\n chain c {{\n"
             "  type filter hook forward priority filter;\n  queue num 0\n }\n}\n")
    try:
        return subprocess.run(["nft", "-c", "-f", "-"], input=probe, capture_output=True,
                              text=True, timeout=30, check=False).returncode == 0
    except FileNotFoundError:
        return False


def choose_backend(settings: DataplaneSettings) -> str:
    if settings.backend == "iptables":
        return "iptables"
    supported = nft_queue_supported()
    if settings.backend == "nft" and not supported:
        raise DataplaneError("this kernel lacks nft's queue statement (CONFIG_NFT_QUEUE); "
                             'set dataplane.backend = "iptables" or "auto"')
    return "nft" if supported else "iptables"


LIBERAL_TCP = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")


def liberal_tcp_tracking(on: bool) -> bool:
    """Set conntrack's liberal TCP window tracking; return the previous setting.

    Needed while data filters change segment lengths: conntrack sees a filtered
    flow's sequence numbers before the enforcer shifts them, and would otherwise
    call the peer's acknowledgements out of window.
    """
    previous = LIBERAL_TCP.read_text().strip() == "1"
    LIBERAL_TCP.write_text("1\n" if on else "0\n")
    return previous


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise DataplaneError(f"{argv[0]} is not installed (apt-get install iptables conntrack)") from None
    if check and proc.returncode != 0:
        raise DataplaneError(f"{shlex.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def install(backend: str, settings: DataplaneSettings, interfaces: Interfaces, nat: bool,
            bind_ports: tuple[int, int] | None = None) -> list[str]:
    """Install the rules, replacing whatever an earlier run left in the same transaction,
    so that there is no moment without rules (a crashed run's rules stay in force until
    the new ones are in); then forget the flows that run offloaded. Returns what was
    replaced or removed."""
    replaced: list[str] = []
    if backend == "nft":
        if _nft_table_exists():
            replaced.append(f"nft table inet {NFT_TABLE}")
        _run(["nft", "-f", "-"], input=f"table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n"
             + render_nft(settings, interfaces, nat, bind_ports))
        replaced += _remove_iptables()  # the other backend's, if a run used it
    else:
        for family, tool in FAMILIES.items():
            text = render_rules(family, settings, interfaces, nat, bind_ports)
            stale = {table: _ours(tool, table) for table in TABLES}
            _run([f"{tool}-restore", "--noflush"], input=_replacing(text, stale))
            for table, (jumps, chains) in stale.items():
                replaced += [f"{tool} -t {table} {' '.join(j)}" for j in jumps]
                for chain in chains - _declared(text, table):  # unreferenced now
                    _run([tool, "-w", "-t", table, "-F", chain])
                    _run([tool, "-w", "-t", table, "-X", chain])
                    replaced.append(f"{tool} -t {table} chain {chain}")
        replaced += _remove_nft_table()  # the other backend's, if a run used it
    return replaced + _forget_offloaded_flows()


def remove() -> list[str]:
    """Remove every PINHOLE rule and chain, and forget every flow offloaded with our mark.

    Returns what was removed. Safe to call when nothing is installed.
    """
    return _remove_iptables() + _remove_nft_table() + _forget_offloaded_flows()


def _remove_iptables() -> list[str]:
    return [item for tool in FAMILIES.values() for table in TABLES for item in _remove_table(tool, table)]


def _remove_nft_table() -> list[str]:
    if not _nft_table_exists():
        return []
    _run(["nft", "delete", "table", "inet", NFT_TABLE])
    return [f"nft table inet {NFT_TABLE}"]


def _nft_table_exists() -> bool:
    try:
        return subprocess.run(["nft", "list", "table", "inet", NFT_TABLE], capture_output=True,
                              text=True, timeout=30, check=False).returncode == 0
    except FileNotFoundError:
        return False


def _forget_offloaded_flows() -> list[str]:
    forgotten = []
    for family, (mode, mark) in itertools.product(("ipv4", "ipv6"),
                                                  (("kernel", MARK_KERNEL), ("user", MARK_USER))):
        out = subprocess.run(
            ["conntrack", "-D", "-f", family, "--mark", f"0x{mark:x}/0x{MARK_MODE:x}"],
            capture_output=True, text=True, timeout=30, check=False)
        count = next((w for w in out.stderr.split() if w.isdigit()), "0")
        if count != "0":
            forgotten.append(f"{count} {family} conntrack entries of {mode}-mode flows")
    return forgotten


def _ours(tool: str, table: str) -> tuple[list[list[str]], set[str]]:
    """(jumps from built-in chains to PINHOLE chains, the PINHOLE chains) in a table."""
    jumps, chains = [], set()
    for rule in _run([tool, "-w", "-t", table, "-S"]).splitlines():
        words = shlex.split(rule)
        if words[:1] == ["-A"] and not words[1].startswith(CHAIN_PREFIX) and _jumps_to_ours(words):
            jumps.append(words[1:])
        elif words[:1] == ["-N"] and words[1].startswith(CHAIN_PREFIX):
            chains.add(words[1])
    return jumps, chains


def _declared(text: str, table: str) -> set[str]:
    """The chains an iptables-restore input declares in a table."""
    out, current = set(), None
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif line.startswith(":") and current == table:
            out.add(line[1:].split()[0])
    return out


def _replacing(text: str, stale: dict[str, tuple[list[list[str]], set[str]]]) -> str:
    """iptables-restore input that also deletes stale jumps to our chains, and declares
    (which flushes) every stale chain, in the same transaction as the new rules."""
    out, table = [], None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            out.append(line)
            out += [f":{chain} - [0:0]" for chain in sorted(stale.get(table, ([], set()))[1])
                    if chain not in _declared(text, table)]
            continue
        if table is not None and not line.startswith(":") and \
                (not out or out[-1].startswith((":", "*"))):
            out += [f"-D {shlex.join(j)}" for j in stale.get(table, ([], set()))[0]]
        out.append(line)
    return "\n".join(out) + "\n"


def _remove_table(tool: str, table: str) -> list[str]:
    jumps, chains = _ours(tool, table)
    removed = []
    for jump in jumps:
        _run([tool, "-w", "-t", table, "-D", *jump])
        removed.append(f"{tool} -t {table} -A {' '.join(jump)}")
    for chain in sorted(chains):
        _run([tool, "-w", "-t", table, "-F", chain])
        _run([tool, "-w", "-t", table, "-X", chain])
        removed.append(f"{tool} -t {table} chain {chain}")
    return removed


def _jumps_to_ours(words: list[str]) -> bool:
    return any(a in ("-j", "-g") and b.startswith(CHAIN_PREFIX) for a, b in itertools.pairwise(words))


def networks_of(addresses: Iterable[tuple[str, int]]) -> tuple[IPNetwork, ...]:
    """The global networks of (address, prefix length) pairs; link-local ones are skipped."""
    out = []
    for addr, plen in addresses:
        net = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
        if not net.is_link_local:
            out.append(net)
    return tuple(dict.fromkeys(out))
