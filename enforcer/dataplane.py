"""Kernel state: the netfilter rules that send new flows to the queue, the lockdown
base under them, the per-grant NAT maps, and their removal.

Two backends render the same rules. Native nft (one ``inet pinhole`` table) is
used where the kernel has nft's ``queue`` statement; where it lacks it
(CONFIG_NFT_QUEUE off, as on the machines this was built on), iptables and
ip6tables carry the NFQUEUE target, in chains named ``PINHOLE-*``. Either way
per-grant NAT (kernel-mode redirects, SecureNAT binds) lives in the maps of a
native nft table, ``inet pinhole_maps``, written over netlink (``NatMaps``), and
the only marks used are the bits of ``MARK_MASK``, so removing stale state never
touches anything else.

Rule 15 (lockdown): the rules have a base that stays when the enforcer stops, for
any reason; a stop replaces the rules by the base alone, a start replaces them by
the base and the working rules, each in one transaction; only ``unload`` removes
everything.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import itertools
import json
import os
import shlex
import socket
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from enforcer.config import DataplaneSettings
from enforcer.core.limits import Limits
from enforcer.core.packet import PROTOCOL_NAMES, IPAddress
from enforcer.core.policy import IPNetwork
from enforcer.core.redirects import IPInterface

CHAIN_PREFIX = "PINHOLE-"
NFT_TABLE = "pinhole"
MAPS_TABLE = "pinhole_maps"  # per-grant NAT, both backends (written over netlink)
NEW_FLOW_METER = "pinhole-new"  # hashlimit's table of clients' new-flow rates
# ICMPv6 the fw must answer from any side, lockdown included: neighbour discovery
# (router and neighbour solicitations and advertisements)
NEIGHBOUR_DISCOVERY = (133, 134, 135, 136)
CHILD_TIMEOUT = 30  # seconds an iptables/nft/conntrack child may take (start, stop, unload)
# netlink (linux/netlink.h, linux/netfilter/nfnetlink.h, nf_tables.h)
NETLINK_NETFILTER = 12
NFPROTO_INET = 1
NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_NFTABLES = 1, 10
IPCTNL_MSG_CT_DELETE = 2
CTA_MARK, CTA_MARK_MASK = 8, 21
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_TIMEOUT, NFTA_DATA_VALUE = 1, 2, 4, 1
NETLINK_TIMEOUT = 2.0  # the kernel answers a map update at once; this only guards a bug

# The mark bits this enforcer owns, on packets (verdict) and on conntrack entries:
MARK_MODE = 0x30000000     # how an admitted flow runs
MARK_KERNEL = 0x10000000   #   in kernel mode: the kernel forwards the rest of it
MARK_USER = 0x20000000     #   in user mode: every packet is queued to the enforcer
MARK_ONE_WAY = 0x40000000  # replies (target -> client) are not admitted
MARK_SNAT = 0x0F000000     # 1 + index of the external address a flow leaves from (0: none)
MARK_SNAT_SHIFT = 24
MARK_MASK = MARK_MODE | MARK_ONE_WAY | MARK_SNAT  # what the connmark keeps (forwarded flows)
# Packet-only bits:
MARK_REWRITTEN = 0x80000000  # the enforcer redirected this packet before routing: let it pass
MARK_PORT = 0x0000FFFF       # a kernel-mode redirect rule's port, on a flow's first packet
# A flow to a Firewall client's UDP bind (a socket of the fw): its connmark is
# MARK_KERNEL | MARK_LOCAL | the bind's port, so that the kernel hands its datagrams
# to the socket and a closed bind's flows can be forgotten by that mark alone.
MARK_LOCAL = 0x00800000
MARK_LOCAL_KEPT = MARK_MODE | MARK_LOCAL | MARK_PORT  # what the connmark keeps of such a flow
MARK_OWNED = MARK_MASK | MARK_REWRITTEN | MARK_PORT | MARK_LOCAL
MAX_EXTERNAL_ADDRESSES = MARK_SNAT >> MARK_SNAT_SHIFT


def mark_for(user_mode: bool, one_way: bool, snat: int | None) -> int:
    """The mark an admitting verdict sets (pure)."""
    return ((MARK_USER if user_mode else MARK_KERNEL) | (MARK_ONE_WAY if one_way else 0)
            | (0 if snat is None else ((snat + 1) << MARK_SNAT_SHIFT) & MARK_SNAT))


def local_mark(port: int) -> int:
    """The mark admitting a flow to a Firewall client's UDP bind on ``port`` (pure)."""
    return MARK_KERNEL | MARK_LOCAL | (port & MARK_PORT)


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

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.internal, *self.external)

    def networks_behind(self) -> dict[str, tuple[IPNetwork, ...]]:
        """Each internal interface's networks: those of the fw's global addresses on it."""
        return {name: tuple(dict.fromkeys(a.network for n, a in self.internal_addresses
                                          if n == name))
                for name in self.internal}


def _ports(ports: tuple[int, int]) -> str:
    return f"{ports[0]}:{ports[1]}"


@dataclass(frozen=True)
class Ruleset:
    """What the rules are made of.

    The rules have two layers. The *base* (SPEC rule 15) is the same whether or not the
    enforcer runs: reverse-path filtering, admitted kernel-mode flows go on, one-way
    flows' replies are dropped, and, failing closed, everything else forwarded is
    dropped and the fw's own services answer only the internal side. The *working*
    rules sit between the base's first and last rules: they send new flows and
    user-mode packets to the queue. ``working=False`` renders the base alone: the
    lockdown a stop leaves (with ``fail_open`` there is no lockdown: a stop removes
    everything).
    """

    settings: DataplaneSettings
    interfaces: Interfaces
    nat: bool = False
    bind_ports: tuple[int, int] | None = None  # Firewall clients' binds (None: no SOCKS service)
    limits: Limits = field(default_factory=Limits)
    working: bool = True
    socks_port: int | None = None  # the SOCKS service's port on the internal addresses

    @property
    def lockdown(self) -> bool:
        return not self.settings.fail_open


def render_rules(family: str, rs: Ruleset) -> str:
    """iptables-restore input for one family (pure: unit-tested without root)."""
    settings, interfaces = rs.settings, rs.interfaces
    kernel = f"{_hex(MARK_KERNEL)}/{_hex(MARK_MODE)}"
    user = f"{_hex(MARK_USER)}/{_hex(MARK_MODE)}"
    admitted = f"! --mark 0x0/{_hex(MARK_MODE)}"
    ours = f"--nfmask {_hex(MARK_MASK)} --ctmask {_hex(MARK_MASK)}"
    bypass = " --queue-bypass" if settings.fail_open else ""
    queue = f"-j NFQUEUE --queue-num {settings.queue}{bypass}"
    icmp = "icmp" if family == "ipv4" else "ipv6-icmp"
    internal = interfaces.internal_of(family)
    working = rs.working
    raw = [
        # rule 17: a source that is not routed back through the interface it came in on
        *(f"-A PINHOLE-PREROUTING -i {name} -m rpfilter --invert -j DROP"
          for name in interfaces.names),
        # A user-mode redirect port's packets reach the enforcer before connection
        # tracking, which then tracks them as the enforcer rewrote them.
        *(f"-A PINHOLE-PREROUTING -i {name} -d {a.ip} -p {proto} --dport "
          f"{_ports(settings.user_redirect_ports)} {queue}"
          for name, a in internal for proto in ("tcp", "udp") if working),
    ]
    forward = [
        f"-A PINHOLE-FORWARD -m connmark --mark {_hex(MARK_ONE_WAY)}/{_hex(MARK_ONE_WAY)} "
        "-m conntrack --ctdir REPLY -j DROP",
        f"-A PINHOLE-FORWARD -m connmark --mark {kernel} -j ACCEPT",
    ]
    if working:
        forward += [
            f"-A PINHOLE-FORWARD -m mark --mark {_hex(MARK_REWRITTEN)}/{_hex(MARK_REWRITTEN)} -j ACCEPT",
            f"-A PINHOLE-FORWARD -m connmark --mark {user} {queue}",
            *(f"-A PINHOLE-FORWARD {cap}" for cap in _new_flow_caps(family, rs.limits)),
            f"-A PINHOLE-FORWARD -m conntrack --ctstate NEW {queue}",
        ]
        # When failing open, unmarked packets of flows that are not new go to the queue
        # too, so that a live enforcer still judges them and a dead one lets them pass.
        if settings.fail_open:
            forward.append(f"-A PINHOLE-FORWARD {queue}")
    if rs.lockdown:
        forward.append("-A PINHOLE-FORWARD -j DROP")
    inbound: list[str] = []
    if working:
        inbound += [
            # A redirect port that leads nowhere (yet, or any more) drops silently: the
            # fw's own stack would answer with a reset or a port unreachable.
            *(f"-A PINHOLE-INPUT -d {a.ip} -p {proto} --dport {_ports(ports)} -j DROP"
              for _, a in internal for proto in ("tcp", "udp")
              for ports in (settings.kernel_redirect_ports, settings.user_redirect_ports)),
            *_socks_rules(family, rs),
            *_bind_rules(family, rs, queue),
        ]
    if rs.lockdown:
        inbound += _input_base(family, rs)
    output = [
        # ICMP errors the fw itself sends about a flow (fragmentation needed, say): the
        # enforcer translates those about user-mode redirects, as kernel NAT would. Only
        # about confirmed flows: the kernel will not queue a packet that shares the
        # unconfirmed conntrack entry of a flow's first packet (it drops it).
        f"-A PINHOLE-OUTPUT -p {icmp} -m conntrack "
        f"--ctstate RELATED --ctstatus CONFIRMED -m connmark --mark {user} {queue}",
    ] if working else []
    lines = ["*raw", ":PINHOLE-PREROUTING - [0:0]", *raw, "-I PREROUTING 1 -j PINHOLE-PREROUTING",
             "COMMIT", "*filter"]
    chains = [(chain, rules) for chain, rules in
              (("FORWARD", forward), ("INPUT", inbound), ("OUTPUT", output)) if rules]
    lines += [f":PINHOLE-{chain} - [0:0]" for chain, _ in chains]  # declarations first
    for chain, rules in chains:
        lines += [*rules, f"-I {chain} 1 -j PINHOLE-{chain}"]
    lines.append("COMMIT")
    lines.append("*mangle")
    if working:
        # The verdict sets the packet mark; copying it to the connmark after the
        # filter hook is what offloads the rest of the flow to the kernel.
        # Restoring it on the way in tells the enforcer a queued packet's mode.
        lines += [
            ":PINHOLE-PREROUTING - [0:0]",
            ":PINHOLE-POSTROUTING - [0:0]",
            f"-A PINHOLE-PREROUTING -m connmark {admitted} -j CONNMARK --restore-mark {ours}",
            f"-A PINHOLE-POSTROUTING -m mark {admitted} -j CONNMARK --save-mark {ours}",
            "-I PREROUTING 1 -j PINHOLE-PREROUTING",
            "-I POSTROUTING 1 -j PINHOLE-POSTROUTING",
        ]
    lines += ["COMMIT", "*nat"]
    if working:
        lines.append(":PINHOLE-POSTROUTING - [0:0]")
        local = rs.bind_ports is not None
        if local:
            # A flow to a Firewall client's UDP bind keeps its verdict's mark. The nat
            # table's input hook comes after the filter table's (where the verdict is),
            # and sees the first packet of each connection only: the admitted one.
            lines += [":PINHOLE-LOCAL - [0:0]",
                      f"-A PINHOLE-LOCAL -m mark --mark {_hex(MARK_LOCAL)}/{_hex(MARK_LOCAL)} "
                      f"-j CONNMARK --save-mark --nfmask {_hex(MARK_LOCAL_KEPT)} "
                      f"--ctmask {_hex(MARK_LOCAL_KEPT)}"]
        for ext, net, mark, address in _snat_rules(family, interfaces, rs.nat):
            match = f"-m mark --mark {_hex(mark)}/{_hex(MARK_SNAT)}" if mark else f"-s {net}"
            lines.append(f"-A PINHOLE-POSTROUTING {match} -o {ext} -j SNAT --to-source {address}")
        lines.append("-I POSTROUTING 1 -j PINHOLE-POSTROUTING")
        if local:
            lines.append("-I INPUT 1 -j PINHOLE-LOCAL")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _new_flow_caps(family: str, limits: Limits) -> list[str]:
    """Rule 16 in the kernel, before the queue: a client address's new flows beyond a rate,
    or beyond a number the kernel tracks at once, are dropped (iptables match options)."""
    prefix = 32 if family == "ipv4" else 128
    new = "-m conntrack --ctstate NEW"
    out = []
    if limits.new_flows_per_second:
        rate = limits.new_flows_per_second
        out.append(f"{new} -m hashlimit --hashlimit-above {rate}/sec --hashlimit-burst {_burst(rate)} "
                   f"--hashlimit-mode srcip --hashlimit-srcmask {prefix} "
                   f"--hashlimit-name {NEW_FLOW_METER} -j DROP")
    out.append(f"{new} -m connlimit --connlimit-above {limits.flows_per_client} "
               f"--connlimit-mask {prefix} --connlimit-saddr -j DROP")
    return out


def _burst(rate: int) -> int:
    """New flows let through at once above the rate: a tenth of a second's worth, so that
    no client's burst can keep the queue busy for long."""
    return max(10, rate // 10)


def _input_base(family: str, rs: Ruleset) -> list[str]:
    """The base of the fw's own input: what it began answers, its own loopback, neighbour
    discovery, and new connections from the internal side or to the configured open
    ports; nothing else from outside."""
    out = ["-A PINHOLE-INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
           "-A PINHOLE-INPUT -i lo -j ACCEPT"]
    if family == "ipv6":
        out += [f"-A PINHOLE-INPUT -p ipv6-icmp --icmpv6-type {kind} -m hl --hl-eq 255 -j ACCEPT"
                for kind in NEIGHBOUR_DISCOVERY]
    out += [f"-A PINHOLE-INPUT -i {name} -j ACCEPT" for name in rs.interfaces.internal]
    out += [f"-A PINHOLE-INPUT -p {PROTOCOL_NAMES[proto]} --dport {_ports(ports)} -j ACCEPT"
            for proto, ports in rs.settings.open_ports]
    return [*out, "-A PINHOLE-INPUT -j DROP"]


def _socks_rules(family: str, rs: Ruleset) -> list[str]:
    """FWC-01 without the base too (fail_open): the SOCKS port and the UDP ASSOCIATE relay
    ports (the bind's port, on the internal address), TCP and UDP, drop what reaches the
    internal addresses from outside (the weak-host model would deliver it; the fw's
    stack would answer a closed one with a reset or a port unreachable)."""
    if rs.socks_port is None or rs.bind_ports is None:
        return []
    ports = f"{rs.socks_port},{_ports(rs.bind_ports)}"
    return [f"-A PINHOLE-INPUT -i {ext} -d {a.ip} -p {proto} -m multiport --dports {ports} -j DROP"
            for ext in rs.interfaces.external for _, a in rs.interfaces.internal_of(family)
            for proto in ("tcp", "udp")]


def _bind_rules(family: str, rs: Ruleset, queue: str) -> list[str]:
    """A new flow to a bind port on an external address goes to the enforcer (a bind
    not approved, or a peer its IpFilter leaves out, is dropped before the bound socket
    sees anything); what belongs to no flow is dropped. The later datagrams of a UDP
    flow the enforcer admitted, which conntrack still calls new until the client
    answers, go to the bind's socket in the kernel while it is there (once it is gone,
    the enforcer drops them)."""
    if rs.bind_ports is None:
        return []
    out = []
    for a in rs.interfaces.external_of(family):
        for proto in ("tcp", "udp"):
            match = f"-A PINHOLE-INPUT -d {a} -p {proto} --dport {_ports(rs.bind_ports)}"
            if proto == "udp":
                out.append(f"{match} -m connmark --mark {_hex(MARK_LOCAL)}/{_hex(MARK_LOCAL)} "
                           "-m socket -j ACCEPT")
            out += [f"{match} {cap}" for cap in _new_flow_caps(family, rs.limits)]
            out += [f"{match} -m conntrack --ctstate NEW {queue}",
                    f"{match} -m conntrack --ctstate INVALID,UNTRACKED -j DROP"]
    return out


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


def _nft_names(names: Iterable[str]) -> str:
    return "{ " + ", ".join(f'"{n}"' for n in names) + " }"


def render_nft(rs: Ruleset) -> str:
    """The same rules as render_rules, as one nft table for both families (pure)."""
    settings, interfaces, working = rs.settings, rs.interfaces, rs.working
    kernel = f"{_hex(MARK_MODE)} == {_hex(MARK_KERNEL)}"
    user = f"{_hex(MARK_MODE)} == {_hex(MARK_USER)}"
    admitted = f"{_hex(MARK_MODE)} != 0x00000000"
    queue = f"queue num {settings.queue}" + (" bypass" if settings.fail_open else "")
    user_ports = _nft_ports(settings.user_redirect_ports)
    lines = [f"table inet {NFT_TABLE} {{"]
    caps = _nft_new_flow_caps(rs.limits)
    if working:
        lines += [f"  set {name} {{ type {_NFT_ADDR[family]}; flags dynamic{timeout}; }}"
                  for family in _NFT_FAMILY for name, timeout in
                  ((f"new_flow_rate_{_NFT_FAMILY[family]}", ", timeout"),
                   (f"flows_{_NFT_FAMILY[family]}", ""))]
    lines += ["  chain raw_prerouting {", "    type filter hook prerouting priority raw; policy accept;",
              f"    iifname {_nft_names(interfaces.names)} fib saddr . iif oif missing drop"]
    if working:
        for family, proto in _NFT_FAMILY.items():
            for name, a in interfaces.internal_of(family):
                lines.append(f'    iifname "{name}" {proto} daddr {a.ip} meta l4proto {{ tcp, udp }} '
                             f"th dport {user_ports} {queue}")
    lines += [
        "  }",
        "  chain filter_forward {",
        "    type filter hook forward priority filter; policy accept;",
        f"    ct mark and {_hex(MARK_ONE_WAY)} == {_hex(MARK_ONE_WAY)} ct direction reply drop",
        f"    ct mark and {kernel} accept",
    ]
    if working:
        lines += [f"    meta mark and {_hex(MARK_REWRITTEN)} == {_hex(MARK_REWRITTEN)} accept",
                  f"    ct mark and {user} {queue}",
                  *(f"    {cap}" for cap in caps),
                  f"    ct state new {queue}"]
        if settings.fail_open:
            lines.append(f"    {queue}")
    if rs.lockdown:
        lines.append("    drop")
    lines += ["  }", "  chain filter_input {", "    type filter hook input priority filter; policy accept;"]
    if working:
        for family, proto in _NFT_FAMILY.items():
            for _, a in interfaces.internal_of(family):
                for ports in (settings.kernel_redirect_ports, settings.user_redirect_ports):
                    lines.append(f"    {proto} daddr {a.ip} meta l4proto {{ tcp, udp }} "
                                 f"th dport {_nft_ports(ports)} drop")
                if rs.socks_port is not None and rs.bind_ports is not None and interfaces.external:
                    lines.append(f"    iifname {_nft_names(interfaces.external)} {proto} daddr {a.ip} "
                                 f"meta l4proto {{ tcp, udp }} th dport "
                                 f"{{ {rs.socks_port}, {_nft_ports(rs.bind_ports)} }} drop")
            for address in interfaces.external_of(family) if rs.bind_ports is not None else ():
                match = (f"{proto} daddr {address} meta l4proto {{ tcp, udp }} "
                         f"th dport {_nft_ports(rs.bind_ports or (0, 0))}")
                lines += [f"    {proto} daddr {address} udp dport {_nft_ports(rs.bind_ports or (0, 0))} "
                          f"ct mark and {_hex(MARK_LOCAL)} == {_hex(MARK_LOCAL)} socket wildcard 0 accept",
                          *(f"    {match} {cap}" for cap in caps),
                          f"    {match} ct state new {queue}",
                          f"    {match} ct state invalid,untracked drop"]
    if rs.lockdown:
        lines += ["    ct state established,related accept", '    iifname "lo" accept',
                  f"    icmpv6 type {{ {', '.join(map(str, NEIGHBOUR_DISCOVERY))} }} ip6 hoplimit 255 accept"]
        if interfaces.internal:
            lines.append(f"    iifname {_nft_names(interfaces.internal)} accept")
        lines += [f"    meta l4proto {PROTOCOL_NAMES[proto]} th dport {_nft_ports(ports)} accept"
                  for proto, ports in settings.open_ports]
        lines.append("    drop")
    lines.append("  }")
    if working:
        lines += [
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
            *([] if rs.bind_ports is None else [
                "  chain save_local_mark {",
                "    type filter hook input priority filter + 10; policy accept;",
                f"    meta mark and {_hex(MARK_LOCAL)} == {_hex(MARK_LOCAL)} "
                f"ct mark set meta mark and {_hex(MARK_LOCAL_KEPT)}",
                "  }"]),
            "  chain source_nat {",
            "    type nat hook postrouting priority srcnat; policy accept;",
        ]
        for family, proto in _NFT_FAMILY.items():
            for ext, net, mark, address in _snat_rules(family, interfaces, rs.nat):
                match = (f"meta mark and {_hex(MARK_SNAT)} == {_hex(mark)} meta nfproto {family}"
                         if mark else f"{proto} saddr {net}")
                lines.append(f'    {match} oifname "{ext}" snat {proto} to {address}')
        lines.append("  }")
    return "\n".join([*lines, "}"]) + "\n"


def _nft_new_flow_caps(limits: Limits) -> list[str]:
    """_new_flow_caps in nft: dynamic sets keyed by the client address."""
    out = []
    for proto in _NFT_FAMILY.values():
        if limits.new_flows_per_second:
            rate = limits.new_flows_per_second
            out.append(f"ct state new meta nfproto {'ipv4' if proto == 'ip' else 'ipv6'} "
                       f"add @new_flow_rate_{proto} {{ {proto} saddr timeout 10s limit rate over "
                       f"{rate}/second burst {_burst(rate)} packets }} drop")
        out.append(f"ct state new meta nfproto {'ipv4' if proto == 'ip' else 'ipv6'} "
                   f"add @flows_{proto} {{ {proto} saddr ct count over {limits.flows_per_client} }} drop")
    return out


def render_nft_maps() -> str:
    """The table of per-grant kernel NAT (both backends): kernel-mode redirects and
    SecureNAT binds are elements of its maps, which the enforcer writes over netlink
    (``NatMaps``) as grants come and go. A redirect port's first packet gets the port as
    its mark (so the enforcer knows which redirect it came by) and goes on to the target;
    a new flow to a SecureNAT bind's external port goes on to the client's port. A bind
    whose flow is to reach the client from the fw has it leave from the fw's address,
    once the enforcer has admitted it (the source NAT is chosen after the forward hook),
    looked up by the bind's address (the flow's original destination) and the client's
    port it goes to: nft cannot concatenate the original destination port."""
    lines = [f"table inet {MAPS_TABLE} {{"]
    for family, proto in _NFT_FAMILY.items():
        addr = _NFT_ADDR[family]
        key = f"{addr} . {addr} . inet_proto . inet_service"
        lines += [f"  map redirect_mark_{proto} {{ type {key} : mark; }}",
                  f"  map redirect_to_{proto} {{ type {key} : {addr} . inet_service; }}",
                  f"  map bind_to_{proto} {{ type {addr} . inet_proto . inet_service : "
                  f"{addr} . inet_service; }}",
                  f"  map bind_from_{proto} {{ type {key} : {addr}; }}"]
    lines += ["  chain redirect_dnat {", "    type nat hook prerouting priority dstnat; policy accept;"]
    for proto in _NFT_FAMILY.values():
        key = f"{proto} saddr . {proto} daddr . meta l4proto . th dport"
        lines += [f"    ct state new meta mark set {key} map @redirect_mark_{proto} "
                  f"dnat {proto} to {key} map @redirect_to_{proto}",
                  f"    ct state new dnat {proto} to {proto} daddr . meta l4proto . th dport "
                  f"map @bind_to_{proto}"]
    lines += ["  }", "  chain bind_snat {", "    type nat hook postrouting priority srcnat; policy accept;"]
    lines += [f"    ct state new snat {proto} to ct original {proto} daddr . {proto} daddr . "
              f"meta l4proto . th dport map @bind_from_{proto}" for proto in _NFT_FAMILY.values()]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _register(value: bytes) -> bytes:
    """A component of a concatenated nft key or value: padded to a 4-byte register."""
    return value + b"\0" * (-len(value) % 4)


def _port(port: int) -> bytes:
    return _register(struct.pack("!H", port))


@dataclass(frozen=True)
class RedirectRule:
    """A kernel-mode redirect port's kernel state: the client's connections to it are
    marked with the port and sent on to the target by kernel NAT."""

    protocol: int
    client: IPAddress
    internal: IPAddress
    port: int
    target: IPAddress
    target_port: int

    def elements(self) -> list[tuple[str, bytes, bytes]]:
        """(map, key, value) of each map element (pure)."""
        proto = "ip" if self.client.version == 4 else "ip6"
        key = (self.client.packed + self.internal.packed + _register(bytes([self.protocol]))
               + _port(self.port))
        return [(f"redirect_mark_{proto}", key, struct.pack("=I", self.port)),
                (f"redirect_to_{proto}", key, self.target.packed + _port(self.target_port))]


@dataclass(frozen=True)
class BindRule:
    """A SecureNAT client's bind that the kernel translates (the enforcer judges its flow
    in the forward hook, by the bind): in NAT, new flows to the fw's external ``address``
    and ``port`` are sent on to the client's port; with ``source``, the flow reaches the
    client from that address of the fw's (routed, ``address`` is the client's own)."""

    protocol: int
    address: IPAddress
    port: int
    client: IPAddress
    client_port: int
    source: IPAddress | None = None

    def elements(self) -> list[tuple[str, bytes, bytes]]:
        proto = "ip" if self.client.version == 4 else "ip6"
        protocol = _register(bytes([self.protocol]))
        out = []
        if self.address != self.client:
            out.append((f"bind_to_{proto}", self.address.packed + protocol + _port(self.port),
                        self.client.packed + _port(self.client_port)))
        if self.source is not None:
            out.append((f"bind_from_{proto}", self.address.packed + self.client.packed + protocol
                        + _port(self.client_port), self.source.packed))
        return out


NatRule = RedirectRule | BindRule


class NatMaps:
    """Writes per-grant kernel NAT (``NatRule``) as elements of the maps table, over
    netlink: one batch per call, applied by the kernel at once or not at all. Nothing
    waits for a child process: a grant's kernel state is in place in microseconds,
    before the call that made it returns (and so before the packet that announced the
    grant is released).

    The messages are encoded here (``set_elements_message``), not with pyroute2: its
    encoder took about half a millisecond per element, which a flood of PORT commands
    turns into a stalled queue; a unit test checks these bytes against pyroute2's.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(NETLINK_TIMEOUT)
        self._seq = itertools.count(1)

    def add(self, rules: Sequence[NatRule]) -> None:
        """Add these rules' elements in one transaction; DataplaneError if the kernel
        refuses (then nothing changed)."""
        by_map: dict[str, list[tuple[bytes, bytes]]] = {}
        for rule in rules:
            for name, key, value in rule.elements():
                by_map.setdefault(name, []).append((key, value))
        if by_map:
            errors = self._batch([(name, elements, True) for name, elements in by_map.items()])
            if errors:
                raise DataplaneError("the kernel refused a NAT map update: "
                                     + "; ".join(map(os.strerror, errors)))

    def delete(self, rules: Sequence[NatRule]) -> None:
        """Delete these rules' elements, one transaction each, so that one already gone
        does not keep the others (DataplaneError for any other refusal)."""
        for rule in rules:
            errors = self._batch([(name, [(key, value)], False) for name, key, value in rule.elements()])
            if any(code != errno.ENOENT for code in errors):
                raise DataplaneError(f"the kernel refused to remove {rule}: "
                                     + "; ".join(map(os.strerror, errors)))

    def _batch(self, messages: list[tuple[str, list[tuple[bytes, bytes]], bool]]) -> list[int]:
        """Send one transaction; the errno of each message the kernel refused (a refusal
        aborts the whole transaction)."""
        waiting = set()
        data = batch_marker(NFNL_MSG_BATCH_BEGIN, next(self._seq))
        for name, elements, add in messages:
            seq = next(self._seq)
            data += set_elements_message(name, elements, add, seq)
            waiting.add(seq)
        data += batch_marker(NFNL_MSG_BATCH_END, next(self._seq))
        return _request(self.sock, data, waiting, "writing the NAT maps")

    def close(self) -> None:
        self.sock.close()


def _request(sock: socket.socket, data: bytes, waiting: set[int], what: str) -> list[int]:
    """Send netlink messages and read the kernel's acknowledgements of the sequence numbers
    in ``waiting``: the errno of each one it refused."""
    errors: list[int] = []
    try:
        sock.send(data)
        while waiting:
            reply = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(reply):
                length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", reply, offset)
                if kind == NLMSG_ERROR and seq in waiting:
                    waiting.discard(seq)
                    code = -struct.unpack_from("=i", reply, offset + 16)[0]
                    if code:
                        errors.append(code)
                offset += max(16, (length + 3) & ~3)
    except OSError as exc:
        raise DataplaneError(f"{what} over netlink failed: {exc}") from None
    return errors


class LocalFlows:
    """Forgets the conntrack entries of a closed Firewall-client UDP bind's flows, by their
    mark (``local_mark``), in one netlink request the kernel answers at once: the kernel
    would otherwise go on handing their datagrams to whatever socket binds the port next."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(NETLINK_TIMEOUT)
        self._seq = itertools.count(1)

    def forget(self, port: int) -> None:
        """Delete every flow admitted to the bind on ``port`` (both families)."""
        seq = next(self._seq)
        errors = _request(self.sock, forget_by_mark_message(local_mark(port), MARK_LOCAL_KEPT, seq),
                          {seq}, "forgetting a closed bind's flows")
        if any(code != errno.ENOENT for code in errors):
            raise DataplaneError(f"the kernel refused to forget the flows of bind port {port}: "
                                 + "; ".join(map(os.strerror, errors)))

    def close(self) -> None:
        self.sock.close()


def forget_by_mark_message(mark: int, mask: int, seq: int) -> bytes:
    """IPCTNL_MSG_CT_DELETE without a tuple: every conntrack entry of either family whose
    mark, masked, is ``mark`` (ctnetlink's flush with a mark filter)."""
    body = _attribute(CTA_MARK, struct.pack("!I", mark)) + _attribute(CTA_MARK_MASK, struct.pack("!I", mask))
    return _netlink((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK,
                    seq, socket.AF_UNSPEC, 0, body)


def _attribute(kind: int, payload: bytes) -> bytes:
    """A netlink attribute: length, type, payload padded to 4 bytes."""
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _netlink(kind: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    """A netlink message with nfnetlink's header (version 0)."""
    payload = struct.pack("!BBH", family, 0, res_id) + body
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def batch_marker(kind: int, seq: int) -> bytes:
    """The message that begins or ends an nf_tables transaction."""
    return _netlink(kind, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, b"")


def set_elements_message(name: str, elements: list[tuple[bytes, bytes]], add: bool, seq: int,
                         timeout_ms: int | None = None) -> bytes:
    """NFT_MSG_NEWSETELEM (or DELSETELEM, keys alone) of the maps table's map ``name``.

    An empty value adds a set's element (a key alone). ``timeout_ms`` gives each added
    element its own timeout (the set must have the timeout flag); without it an element
    takes the set's default timeout, if any."""
    timeout = (_attribute(NFTA_SET_ELEM_TIMEOUT, struct.pack("!Q", timeout_ms))
               if add and timeout_ms is not None else b"")
    items = b"".join(
        _attribute(i + 1, _attribute(NFTA_SET_ELEM_KEY, _attribute(NFTA_DATA_VALUE, key))
                   + (_attribute(NFTA_SET_ELEM_DATA, _attribute(NFTA_DATA_VALUE, value))
                      if add and value else b"") + timeout)
        for i, (key, value) in enumerate(elements))
    body = (_attribute(NFTA_SET_ELEM_LIST_TABLE, MAPS_TABLE.encode() + b"\0")
            + _attribute(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
            + _attribute(NFTA_SET_ELEM_LIST_ELEMENTS, items))
    kind = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if add else NFT_MSG_DELSETELEM)
    return _netlink(kind, NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if add else 0), seq,
                    NFPROTO_INET, 0, body)


@functools.cache  # the kernel's features do not change under a running process
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


class HostSettings:
    """Host-wide settings the enforcer changes, put back as they were.

    Conntrack's liberal TCP window tracking is needed while data filters change
    segment lengths: conntrack sees a filtered flow's sequence numbers before the
    enforcer shifts them, and would otherwise call the peer's acknowledgements out of
    window. What a setting was before is written to a state file first, so that a run
    that dies without putting it back is followed by one that does (``restore`` at
    start, and at an unload).
    """

    def __init__(self, state_file: Path, liberal: Path = LIBERAL_TCP) -> None:
        self.state_file = state_file
        self.liberal = liberal

    def restore(self) -> list[str]:
        """Put back what the state file says an earlier run changed; what was restored."""
        try:
            saved = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise DataplaneError(f"cannot read {self.state_file}: {exc}") from None
        restored = []
        before = saved.get("nf_conntrack_tcp_be_liberal")
        if before in ("0", "1"):
            self.liberal.write_text(f"{before}\n")
            restored.append(f"nf_conntrack_tcp_be_liberal = {before}")
        self.state_file.unlink()
        return restored

    def liberal_tcp_tracking(self) -> None:
        """Turn liberal TCP tracking on, having saved what it was."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(
            {"nf_conntrack_tcp_be_liberal": self.liberal.read_text().strip()}) + "\n")
        self.liberal.write_text("1\n")


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT)
    except FileNotFoundError:
        raise DataplaneError(f"{argv[0]} is not installed (apt-get install iptables nftables "
                             "conntrack)") from None
    except subprocess.TimeoutExpired:
        raise DataplaneError(f"{shlex.join(argv)} did not finish within {CHILD_TIMEOUT} s") from None
    if check and proc.returncode != 0:
        raise DataplaneError(f"{shlex.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def install(backend: str, rs: Ruleset) -> list[str]:
    """Put ``rs`` in place of whatever of ours is installed, with no moment without
    rules: each iptables family's chains are replaced in one iptables-restore
    transaction, the nft tables in one nft transaction. The maps table (per-grant NAT)
    is made anew with the working rules and goes without them. Returns what was
    replaced of an earlier run's working rules (a run that did not stop cleanly)."""
    present = _nft_tables()
    replaced = [f"nft table inet {MAPS_TABLE}"] if MAPS_TABLE in present else []
    maps = _nft_replacing(MAPS_TABLE, render_nft_maps() if rs.working else "")
    if backend == "nft":
        _run(["nft", "-f", "-"], input=_nft_replacing(NFT_TABLE, render_nft(rs)) + maps)
        replaced += _remove_iptables()  # the other backend's, if a run used it
        return replaced
    for family, tool in FAMILIES.items():
        _run([f"{tool}-restore", "--noflush"], input=_replacing(render_rules(family, rs), _ours(tool)))
    _run(["nft", "-f", "-"], input=maps)
    return replaced + _remove_nft_table(NFT_TABLE, present)  # the other backend's, if a run used it


def _nft_replacing(table: str, text: str) -> str:
    """nft input that replaces a table of ours with ``text`` (nothing: removes it)."""
    return f"table inet {table} {{}}\ndelete table inet {table}\n{text}"


def unload() -> list[str]:
    """Remove every rule, chain and table of ours, both layers, and forget every flow
    offloaded with our mark: the operator's explicit command (``pinhole enforcer
    --unload``); no stop does this. Returns what was removed. Safe when nothing is
    installed."""
    present = _nft_tables()
    return (_remove_iptables() + _remove_nft_table(NFT_TABLE, present)
            + _remove_nft_table(MAPS_TABLE, present) + forget_flows(("kernel", "user")))


def _remove_iptables() -> list[str]:
    """Every chain of ours and every jump to one, one iptables-restore transaction per family."""
    removed = []
    for tool in FAMILIES.values():
        stale = _ours(tool)
        if not any(jumps or chains for jumps, chains in stale.values()):
            continue
        _run([f"{tool}-restore", "--noflush"], input=unloading(stale))
        for table, (jumps, chains) in stale.items():
            removed += [f"{tool} -t {table} -A {' '.join(jump)}" for jump in jumps]
            removed += [f"{tool} -t {table} chain {chain}" for chain in sorted(chains)]
    return removed


def _remove_nft_table(table: str, present: set[str]) -> list[str]:
    if table not in present:
        return []
    _run(["nft", "delete", "table", "inet", table])
    return [f"nft table inet {table}"]


def _nft_tables() -> set[str]:
    """The names of the inet tables in place (none where nft is missing)."""
    try:
        listing = subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True,
                                 timeout=CHILD_TIMEOUT, check=False).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return set()
    return {line.split()[2] for line in listing.splitlines() if line.startswith("table inet ")}


# (mark, mask) of the flows admitted in a mode; "local": to a Firewall client's UDP bind
MODE_MARKS = {"kernel": (MARK_KERNEL, MARK_MODE), "user": (MARK_USER, MARK_MODE),
              "local": (MARK_LOCAL, MARK_LOCAL)}


def forget_flows(modes: Iterable[str]) -> list[str]:
    """Delete the conntrack entries of flows admitted in these modes ("kernel", "user",
    "local"); what was forgotten."""
    forgotten = []
    for family, mode in itertools.product(("ipv4", "ipv6"), modes):
        mark, mask = MODE_MARKS[mode]
        try:
            out = subprocess.run(
                ["conntrack", "-D", "-f", family, "--mark", f"0x{mark:x}/0x{mask:x}"],
                capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise DataplaneError(f"conntrack -D did not finish within {CHILD_TIMEOUT} s") from None
        count = next((w for w in out.stderr.split() if w.isdigit()), "0")
        if count != "0":
            forgotten.append(f"{count} {family} conntrack entries of {mode}-mode flows")
    return forgotten


def _ours(tool: str) -> dict[str, tuple[list[list[str]], set[str]]]:
    """Per table: (jumps from built-in chains to PINHOLE chains, the PINHOLE chains), as
    one ``iptables-save`` lists them."""
    return parse_saved(_run([f"{tool}-save"]))


def parse_saved(text: str) -> dict[str, tuple[list[list[str]], set[str]]]:
    """``_ours`` of an iptables-save listing (pure: unit-tested)."""
    out: dict[str, tuple[list[list[str]], set[str]]] = {table: ([], set()) for table in TABLES}
    jumps: list[list[str]] = []
    chains: set[str] = set()
    for line in text.splitlines():
        if line.startswith("*"):
            jumps, chains = out.get(line[1:], ([], set()))  # (a table of no concern: dropped)
        elif line.startswith(":") and line[1:].startswith(CHAIN_PREFIX):
            chains.add(line[1:].split()[0])
        elif line.startswith("-A "):
            words = shlex.split(line)
            if not words[1].startswith(CHAIN_PREFIX) and _jumps_to_ours(words):
                jumps.append(words[1:])
    return out


def _declared(text: str, table: str) -> set[str]:
    """The chains an iptables-restore input declares in a table."""
    out, current = set(), None
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif line.startswith(":") and current == table:
            out.add(line[1:].split()[0])
    return out


def unloading(stale: dict[str, tuple[list[list[str]], set[str]]]) -> str:
    """iptables-restore input that removes these chains of ours and the jumps to them, in
    the tables that have any (a table is not made for nothing)."""
    return _replacing("".join(f"*{table}\nCOMMIT\n" for table, (jumps, chains) in stale.items()
                              if jumps or chains), stale)


def _replacing(text: str, stale: dict[str, tuple[list[list[str]], set[str]]]) -> str:
    """iptables-restore input that, in the same transaction as the new rules, deletes stale
    jumps to our chains, declares (which flushes) every stale chain, and deletes those the
    new rules do not declare again. ``text`` has a section for every table with any."""
    out: list[str] = []
    jumps: list[list[str]] = []
    gone: list[str] = []  # the table's stale chains the new rules do not declare again
    for line in text.splitlines():
        if line.startswith("*"):
            jumps, chains = stale.get(line[1:], ([], set()))
            gone = sorted(chains - _declared(text, line[1:]))
            out += [line, *(f":{chain} - [0:0]" for chain in gone)]
            continue
        if out and not line.startswith(":") and out[-1].startswith((":", "*")):
            out += [f"-D {shlex.join(j)}" for j in jumps]
        if line == "COMMIT":  # they are referred to by nothing any more
            out += [f"-X {chain}" for chain in gone]
        out.append(line)
    return "\n".join(out) + "\n"


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
