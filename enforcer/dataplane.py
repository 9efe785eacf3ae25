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
from enforcer.core.packet import IPAddress
from enforcer.core.policy import IPNetwork

CHAIN_PREFIX = "PINHOLE-"
NFT_TABLE = "pinhole"

# The mark bits this enforcer owns, on packets (verdict) and on conntrack entries:
MARK_MODE = 0x30000000     # how an admitted flow runs
MARK_KERNEL = 0x10000000   #   in kernel mode: the kernel forwards the rest of it
MARK_USER = 0x20000000     #   in user mode: every packet is queued to the enforcer
MARK_ONE_WAY = 0x40000000  # replies (target -> client) are not admitted
MARK_SNAT = 0x0F000000     # 1 + index of the external address a NATed flow leaves from
MARK_SNAT_SHIFT = 24
MARK_MASK = MARK_MODE | MARK_ONE_WAY | MARK_SNAT
MAX_EXTERNAL_ADDRESSES = MARK_SNAT >> MARK_SNAT_SHIFT


def mark_for(user_mode: bool, one_way: bool, external_index: int) -> int:
    """The mark an admitting verdict sets (pure)."""
    return ((MARK_USER if user_mode else MARK_KERNEL) | (MARK_ONE_WAY if one_way else 0)
            | ((external_index + 1) << MARK_SNAT_SHIFT) & MARK_SNAT)


def is_user_mode(mark: int) -> bool:
    """Whether a queued packet's mark (restored from its flow) says user mode."""
    return mark & MARK_MODE == MARK_USER


def _hex(value: int) -> str:
    return f"0x{value:08x}"


FAMILIES = {"ipv4": "iptables", "ipv6": "ip6tables"}
TABLES = ("filter", "mangle", "nat")


class DataplaneError(Exception):
    pass


@dataclass(frozen=True)
class Interfaces:
    """What the enforcer learned about the host's interfaces at start."""

    internal: dict[str, int]  # name -> ifindex
    external: dict[str, int]
    internal_networks: tuple[IPNetwork, ...]
    external_addresses: tuple[IPAddress, ...]

    def external_of(self, family: str) -> list[IPAddress]:
        version = 4 if family == "ipv4" else 6
        return [a for a in self.external_addresses if a.version == version]


def render_rules(family: str, settings: DataplaneSettings, interfaces: Interfaces,
                 nat: bool) -> str:
    """iptables-restore input for one family (pure: unit-tested without root)."""
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
    lines = [
        "*filter",
        ":PINHOLE-FORWARD - [0:0]",
        f"-A PINHOLE-FORWARD -m connmark --mark {_hex(MARK_ONE_WAY)}/{_hex(MARK_ONE_WAY)} "
        "-m conntrack --ctdir REPLY -j DROP",
        f"-A PINHOLE-FORWARD -m connmark --mark {kernel} -j ACCEPT",
        f"-A PINHOLE-FORWARD -m connmark --mark {user} {queue}",
        f"-A PINHOLE-FORWARD -m conntrack --ctstate NEW {queue}",
        not_new,
        "-I FORWARD 1 -j PINHOLE-FORWARD",
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
    ]
    if nat:
        lines += ["*nat", ":PINHOLE-POSTROUTING - [0:0]"]
        for ext, net, mark, address in _snat_rules(family, interfaces):
            match = f"-m mark --mark {_hex(mark)}/{_hex(MARK_SNAT)}" if mark else f"-s {net}"
            lines.append(f"-A PINHOLE-POSTROUTING {match} -o {ext} -j SNAT --to-source {address}")
        lines += ["-I POSTROUTING 1 -j PINHOLE-POSTROUTING", "COMMIT"]
    return "\n".join(lines) + "\n"


def _snat_rules(family: str, interfaces: Interfaces) -> list[tuple[str, IPNetwork | None, int, IPAddress]]:
    """(out interface, source network, mark, address): flows marked for an external
    address leave from it; other flows from the internal networks leave from the first."""
    version = 4 if family == "ipv4" else 6
    ours = interfaces.external_of(family)[:MAX_EXTERNAL_ADDRESSES]
    out: list[tuple[str, IPNetwork | None, int, IPAddress]] = []
    for ext in interfaces.external:
        out += [(ext, None, (i + 1) << MARK_SNAT_SHIFT, a) for i, a in enumerate(ours)]
        if ours:
            out += [(ext, net, 0, ours[0]) for net in interfaces.internal_networks
                    if net.version == version]
    return out


def render_nft(settings: DataplaneSettings, interfaces: Interfaces, nat: bool) -> str:
    """The same rules as render_rules, as one nft table for both families (pure)."""
    kernel = f"{_hex(MARK_MODE)} == {_hex(MARK_KERNEL)}"
    user = f"{_hex(MARK_MODE)} == {_hex(MARK_USER)}"
    admitted = f"{_hex(MARK_MODE)} != 0x00000000"
    queue = f"queue num {settings.queue}" + (" bypass" if settings.fail_open else "")
    lines = [
        f"table inet {NFT_TABLE} {{",
        "  chain filter_forward {",
        "    type filter hook forward priority filter; policy accept;",
        f"    ct mark and {_hex(MARK_ONE_WAY)} == {_hex(MARK_ONE_WAY)} ct direction reply drop",
        f"    ct mark and {kernel} accept",
        f"    ct mark and {user} {queue}",
        f"    ct state new {queue}",
        f"    {queue}" if settings.fail_open else "    drop",
        "  }",
        "  chain restore_mark {",
        "    type filter hook prerouting priority mangle; policy accept;",
        f"    ct mark and {admitted} meta mark set ct mark and {_hex(MARK_MASK)}",
        "  }",
        "  chain save_mark {",
        "    type filter hook postrouting priority mangle; policy accept;",
        # nft cannot merge two registers here: the ct mark is set whole, our bits only.
        f"    meta mark and {admitted} ct mark set meta mark and {_hex(MARK_MASK)}",
        "  }",
    ]
    if nat:
        lines += ["  chain source_nat {", "    type nat hook postrouting priority srcnat; policy accept;"]
        for family in ("ipv4", "ipv6"):
            proto = "ip" if family == "ipv4" else "ip6"
            for ext, net, mark, address in _snat_rules(family, interfaces):
                match = (f"meta mark and {_hex(MARK_SNAT)} == {_hex(mark)}" if mark
                         else f"{proto} saddr {net}")
                lines.append(f'    {match} oifname "{ext}" snat {proto} to {address}')
        lines.append("  }")
    return "\n".join([*lines, "}"]) + "\n"


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


def install(backend: str, settings: DataplaneSettings, interfaces: Interfaces, nat: bool) -> None:
    if backend == "nft":
        _run(["nft", "-f", "-"], input=render_nft(settings, interfaces, nat))
        return
    for family, tool in FAMILIES.items():
        _run([f"{tool}-restore", "--noflush"],
             input=render_rules(family, settings, interfaces, nat))


def remove() -> list[str]:
    """Remove every PINHOLE rule and chain, and forget every flow offloaded with our mark.

    Returns what was removed. Safe to call when nothing is installed.
    """
    removed: list[str] = []
    for tool in FAMILIES.values():
        for table in TABLES:
            removed += _remove_table(tool, table)
    nft = subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True,
                         text=True, timeout=30, check=False)
    if nft.returncode == 0:
        removed.append(f"nft table inet {NFT_TABLE}")
    for family, (mode, mark) in itertools.product(("ipv4", "ipv6"),
                                                  (("kernel", MARK_KERNEL), ("user", MARK_USER))):
        out = subprocess.run(
            ["conntrack", "-D", "-f", family, "--mark", f"0x{mark:x}/0x{MARK_MODE:x}"],
            capture_output=True, text=True, timeout=30, check=False)
        count = next((w for w in out.stderr.split() if w.isdigit()), "0")
        if count != "0":
            removed.append(f"{count} {family} conntrack entries of {mode}-mode flows")
    return removed


def _remove_table(tool: str, table: str) -> list[str]:
    rules = _run([tool, "-w", "-t", table, "-S"]).splitlines()
    removed = []
    for rule in rules:
        words = shlex.split(rule)
        if words[:1] == ["-A"] and not words[1].startswith(CHAIN_PREFIX) and \
                _jumps_to_ours(words):
            _run([tool, "-w", "-t", table, "-D", *words[1:]])
            removed.append(f"{tool} -t {table} {rule}")
    for rule in rules:
        words = shlex.split(rule)
        if words[:1] == ["-N"] and words[1].startswith(CHAIN_PREFIX):
            _run([tool, "-w", "-t", table, "-F", words[1]])
            _run([tool, "-w", "-t", table, "-X", words[1]])
            removed.append(f"{tool} -t {table} chain {words[1]}")
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
