"""Kernel state: the netfilter rules that send new flows to the queue, the lockdown
base under them, the per-grant NAT maps, and their removal.

The rules are said once, in neutral terms (``rules_of``, in the words of
``enforcer.netfilter``), and a backend renders, installs and removes them
(``choose_backend``): native nft (``NftBackend``, one ``inet pinhole`` table) where
the kernel has nft's ``queue`` statement; where it lacks it (CONFIG_NFT_QUEUE off,
as on the machines this was built on), iptables and ip6tables (``IptablesBackend``),
which carry the NFQUEUE target, in chains named ``PINHOLE-*``. Either way per-grant
NAT (kernel-mode redirects, SecureNAT binds) lives in the maps of a native nft
table, ``inet pinhole_maps``, written over netlink (``NatMaps``), and the only marks
used are the bits of ``MARK_MASK``, so removing stale state never touches anything
else.

Rule 15 (lockdown): the rules have a base that stays when the enforcer stops, for
any reason; a stop replaces the rules by the base alone, a start replaces them by
the base and the working rules, each in one transaction; only ``unload`` removes
everything.
"""

from __future__ import annotations

import contextlib
import ctypes
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
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, TypeVar

from enforcer.config import DataplaneSettings
from enforcer.core.limits import Limits

# MARK_KERNEL, MARK_MODE, MARK_ONE_WAY and MARK_USER also as the harness reads a flow's
# mark (conntrack -L): the mark layout is the rules' contract with whoever inspects them
from enforcer.core.marks import MARK_KERNEL as MARK_KERNEL
from enforcer.core.marks import (
    MARK_LIVE,
    MARK_LOCAL,
    MARK_LOCAL_KEPT,
    MARK_MASK,
    MARK_PORT,
    MARK_REWRITTEN,
    MARK_SNAT,
    MARK_SNAT_SHIFT,
    MARK_WORKER,
    MAX_EXTERNAL_ADDRESSES,
    local_mark,
    worker_mark,
)
from enforcer.core.marks import MARK_MODE as MARK_MODE
from enforcer.core.marks import MARK_ONE_WAY as MARK_ONE_WAY
from enforcer.core.marks import MARK_USER as MARK_USER
from enforcer.core.packet import TCP, UDP, IPAddress
from enforcer.core.policy import IPNetwork
from enforcer.core.redirects import IPInterface
from enforcer.netfilter import (
    ACCEPT,
    DROP,
    FAMILIES,
    Accept,
    Action,
    Chain,
    CountOver,
    CtState,
    Drop,
    Family,
    Hook,
    MarkIs,
    Match,
    PortRange,
    Protocol,
    Queue,
    RateOver,
    RestoreMark,
    Rule,
    SaveMark,
    SourceNat,
    Stage,
    family_of,
)

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
# Socket options past net.core.[rw]mem_max, as root (Linux; Python's socket module lacks them)
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
# NatMaps' send buffer (the kernel doubles it): netlink refuses a transaction longer than
# the buffer less 32 bytes (EMSGSIZE), and MESSAGES_PER_TRANSACTION full messages may be
# a few hundred KiB, more than net.core.wmem_default may hold
TRANSACTION_BUFFER = 1 << 20
NFPROTO_INET = 1
NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_NFTABLES = 1, 10
IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 1, 2
# linux/netfilter/nfnetlink_conntrack.h, nf_conntrack_common.h
CTA_TUPLE_ORIG, CTA_STATUS, CTA_MARK, CTA_MARK_MASK, CTA_FILTER, CTA_STATUS_MASK = 1, 3, 8, 21, 25, 26
IPS_DST_NAT = 1 << 5
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_DST_PORT = 1, 3
CTA_FILTER_ORIG_FLAGS, CTA_FILTER_REPLY_FLAGS = 1, 2
# The parts of CTA_TUPLE_ORIG a dump's CTA_FILTER compares (net/netfilter/nf_internals.h)
CTA_FILTER_F_CTA_IP_SRC, CTA_FILTER_F_CTA_IP_DST, CTA_FILTER_F_CTA_PROTO_NUM = 1 << 0, 1 << 1, 1 << 3
NLA_F_NESTED = 0x8000
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_DUMP = 0x300
NLA_TYPE_MASK = 0x3FFF  # an attribute's type, without the nested and byte-order flags
NFT_MSG_GETSETELEM = 13
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_TIMEOUT, NFTA_DATA_VALUE = 1, 2, 4, 1
NETLINK_TIMEOUT = 2.0  # the kernel answers a map update at once; this only guards a bug
# The kernel acknowledges each message of a transaction with a buffer of its own, all of
# them before the send returns: a few hundred fill a socket's default receive buffer
# (measured on Linux 6.18: 240 messages were confirmed; of 300 the acknowledgements were
# lost, ENOBUFS, though the kernel had made the change). And a message's elements are one
# attribute, at most 64 KiB. So NatMaps puts at most ELEMENTS_PER_MESSAGE elements in a
# message (about 100 bytes each with a mark and a timeout) and writes a call's in
# transactions of a few messages each.
ELEMENTS_PER_MESSAGE = 256
MESSAGES_PER_TRANSACTION = 8
NFT_MSG_DESTROYSETELEM = 30  # DELSETELEM that does not fail on a missing element (Linux 6.3)
# A grant's key lets one packet through, counted under the element's lock
ONE_PACKET = "limit rate 1/week burst 1 packets"
LIVE_TABLE = "pinhole_live"  # owned by the enforcer's process: gone with it (LiveTable)

def _hex(value: int) -> str:
    return f"0x{value:08x}"


TABLES = ("raw", "filter", "mangle", "nat")


class DataplaneError(Exception):
    pass


class GrantsNotHeld(DataplaneError):
    """``NatMaps.hold`` could not give the kernel the last ``count`` grants of its call."""

    def __init__(self, message: str, count: int) -> None:
        super().__init__(message)
        self.count = count


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

    def warnings(self, nat: bool) -> list[str]:
        """What in these interfaces keeps the enforcer from doing what its config seems to
        ask: an internal interface with no global address has no network behind it, so
        every packet from it is dropped (rule 17); in NAT, a family with internal
        addresses but no external one has its primaries leave untranslated, and its
        grants refused."""
        out = [f"internal interface {name} has no global address: every packet from it is "
               "dropped (no network is behind it)"
               for name, networks in self.networks_behind().items() if not networks]
        if nat:
            for version in (4, 6):
                if any(a.version == version for _, a in self.internal_addresses) and \
                        not any(a.version == version for a in self.external_addresses):
                    out.append(f"NAT, but no external interface has a global IPv{version} address: "
                               f"IPv{version} primaries leave untranslated, from their clients' "
                               "addresses, and grants for their secondaries are refused")
        return out

    def networks_behind(self) -> dict[str, tuple[IPNetwork, ...]]:
        """Each internal interface's networks: those of the fw's global addresses on it."""
        return {name: tuple(dict.fromkeys(a.network for n, a in self.internal_addresses
                                          if n == name))
                for name in self.internal}


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


# --- what the rules are: said once, in neutral terms ---------------------------------------

NEW: tuple[CtState, ...] = ("new",)
TRANSPORT: tuple[Protocol, ...] = ("tcp", "udp")
_TRANSPORT_NAMES: dict[int, Protocol] = {TCP: "tcp", UDP: "udp"}  # open_ports' protocols


def rules_of(rs: Ruleset) -> tuple[Chain, ...]:
    """The enforcer's netfilter rules in neutral terms (pure): the one place that says what
    they are; each backend renders them. The base comes with every ruleset; the working
    rules sit between its first and last rules (see ``Ruleset``)."""
    settings, interfaces, working = rs.settings, rs.interfaces, rs.working
    queue = Queue(settings.queue, settings.fail_open)
    user = MarkIs(MARK_USER, MARK_MODE)
    admitted = MarkIs(0, MARK_MODE, negate=True)
    internal = [(name, a.ip) for family in FAMILIES for name, a in interfaces.internal_of(family)]
    # rule 17: a source that is not routed back through the interface it came in on
    raw = [Rule(Match(iif=interfaces.names, reverse_path_fails=True), DROP)]
    forward = [
        # A connection a conntrack helper expected (another tool's: the enforcer attaches
        # none) is no flow the enforcer admitted, whatever connmark it inherited from the
        # connection it is related to.
        Rule(Match(ct_status="expected"), DROP),
        Rule(Match(ct_mark=MarkIs(MARK_ONE_WAY, MARK_ONE_WAY), ct_reply=True), DROP),
        Rule(Match(ct_mark=MarkIs(MARK_KERNEL, MARK_MODE)), ACCEPT),
    ]
    inbound: list[Rule] = []
    output: list[Rule] = []
    restore: list[Rule] = []
    save: list[Rule] = []
    local: list[Rule] = []
    snat: list[Rule] = []
    if working:
        # A user-mode redirect port's packets reach the enforcer before connection
        # tracking, which then tracks them as the enforcer rewrote them.
        raw += [Rule(Match(iif=(name,), daddr=address, protocols=TRANSPORT,
                           dports=(settings.user_redirect_ports,)), queue)
                for name, address in internal]
        forward += [
            Rule(Match(mark=MarkIs(MARK_REWRITTEN, MARK_REWRITTEN)), ACCEPT),
            # a user-mode flow a worker process holds: to that worker's queue
            *(Rule(Match(ct_mark=MarkIs(MARK_USER | worker_mark(k), MARK_MODE | MARK_WORKER)),
                   Queue(settings.queue + k, settings.fail_open))
              for k in range(1, settings.workers + 1)),
            Rule(Match(ct_mark=user), queue),
            # (rule 16's caps on clients' new flows come first, in the grants chain)
            Rule(Match(ct_state=NEW), queue),
        ]
        # When failing open, unmarked packets of flows that are not new go to the queue
        # too, so that a live enforcer still judges them and a dead one lets them pass.
        if settings.fail_open:
            forward.append(Rule(Match(), queue))
        inbound += [
            # A redirect port that leads nowhere (yet, or any more) drops silently: the
            # fw's own stack would answer with a reset or a port unreachable.
            *(Rule(Match(daddr=address, protocols=TRANSPORT, dports=(ports,)), DROP)
              for _, address in internal
              for ports in (settings.kernel_redirect_ports, settings.user_redirect_ports)),
            *_socks_rules(rs),
            *_bind_rules(rs, queue),
        ]
        # ICMP errors the fw itself sends about a flow (fragmentation needed, say): the
        # enforcer translates those about user-mode redirects, as kernel NAT would. Only
        # about confirmed flows: the kernel will not queue a packet that shares the
        # unconfirmed conntrack entry of a flow's first packet (it drops it).
        output = [Rule(Match(protocols=("icmp",), ct_mark=user, ct_state=("related",), ct_status="confirmed"),
                       queue)]
        # The verdict sets the packet mark; copying it to the connmark after the filter
        # hook (once: a flow's mark does not change) is what offloads the rest of the flow
        # to the kernel. Restoring it on the way in tells the enforcer a queued packet's
        # mode: a user-mode flow's (a kernel-mode flow's later packets are never queued,
        # and no rule reads their packet mark: they cost neither step); a packet the
        # enforcer rewrote carries its flow's whole mark already.
        restore = [Rule(Match(mark=MarkIs(0, MARK_REWRITTEN), ct_mark=user), RestoreMark(MARK_MASK))]
        save = [Rule(Match(mark=admitted, ct_mark=MarkIs(0, MARK_MODE)), SaveMark(MARK_MASK))]
        if rs.bind_ports is not None:
            # A flow to a Firewall client's UDP bind keeps its verdict's mark, the bind's
            # port included, once the verdict has admitted it.
            local = [Rule(Match(mark=MarkIs(MARK_LOCAL, MARK_LOCAL)), SaveMark(MARK_LOCAL_KEPT))]
        snat = _snat_rules(rs)
    if rs.lockdown:
        forward.append(Rule(Match(), DROP))
        inbound += _input_base(rs)
    return (Chain(Hook.PREROUTING, Stage.RAW, tuple(raw)),
            Chain(Hook.FORWARD, Stage.FILTER, tuple(forward)),
            Chain(Hook.INPUT, Stage.FILTER, tuple(inbound)),
            Chain(Hook.OUTPUT, Stage.FILTER, tuple(output)),
            Chain(Hook.PREROUTING, Stage.MANGLE, tuple(restore)),
            Chain(Hook.POSTROUTING, Stage.MANGLE, tuple(save)),
            Chain(Hook.INPUT, Stage.AFTER_FILTER, tuple(local)),
            Chain(Hook.POSTROUTING, Stage.SOURCE_NAT, tuple(snat)))


def forward_caps(limits: Limits) -> list[Rule]:
    """Rule 16 for forwarded flows, in the grants chain of the maps table (``render_nft_maps``),
    which comes before the forward chain: before the kernel admits a flow by a grant it
    holds, and before the queue. They count what is new and not yet admitted (a UDP
    flow's later datagrams stay new until an answer; a user-mode redirect's packets were
    admitted before routing)."""
    fresh = Match(mark=MarkIs(0, MARK_REWRITTEN), ct_mark=MarkIs(0, MARK_MODE))
    return [cap for family in FAMILIES for cap in _new_flow_caps(limits, replace(fresh, family=family))]


def _new_flow_caps(limits: Limits, where: Match) -> list[Rule]:
    """Rule 16 in the kernel, before the queue: a client address's new flows (of those
    ``where`` matches, of one family) beyond a rate, or beyond a number the kernel tracks
    at once, are dropped."""
    rate = limits.new_flows_per_second
    caps: list[RateOver | CountOver] = [RateOver(rate, _burst(rate))] if rate else []
    caps.append(CountOver(limits.flows_per_client))
    return [Rule(replace(where, ct_state=NEW, over=cap), DROP) for cap in caps]


def _burst(rate: int) -> int:
    """New flows let through at once above the rate: a tenth of a second's worth, so that
    no client's burst can keep the queue busy for long."""
    return max(10, rate // 10)


def _input_base(rs: Ruleset) -> list[Rule]:
    """The base of the fw's own input: what it began answers, its own loopback, neighbour
    discovery, and new connections from the internal side or to the configured open
    ports; nothing else from outside."""
    return [
        Rule(Match(ct_state=("established", "related")), ACCEPT),
        Rule(Match(iif=("lo",)), ACCEPT),
        Rule(Match(family="ipv6", protocols=("icmp",), icmp_types=NEIGHBOUR_DISCOVERY, hop_limit=255),
             ACCEPT),
        Rule(Match(iif=tuple(rs.interfaces.internal)), ACCEPT),
        *(Rule(Match(protocols=(_TRANSPORT_NAMES[proto],), dports=(ports,)), ACCEPT)
          for proto, ports in rs.settings.open_ports),
        Rule(Match(), DROP),
    ]


def _socks_rules(rs: Ruleset) -> list[Rule]:
    """FWC-01 without the base too (fail_open): from outside, the SOCKS port (TCP and UDP)
    drops what reaches any of the fw's addresses, and the UDP ASSOCIATE relay ports (the
    bind's ports, on the internal addresses) what reaches the internal addresses (the
    weak-host model would deliver it; the fw's stack would answer a closed port with a
    reset or a port unreachable). On the external addresses the bind ports are the
    approved peers' (``_bind_rules``)."""
    if rs.socks_port is None or rs.bind_ports is None:
        return []
    outside = tuple(rs.interfaces.external)
    return [Rule(Match(iif=outside, protocols=TRANSPORT, dports=((rs.socks_port, rs.socks_port),)),
                 DROP),
            *(Rule(Match(iif=outside, daddr=a.ip, protocols=TRANSPORT, dports=(rs.bind_ports,)), DROP)
              for family in FAMILIES for _, a in rs.interfaces.internal_of(family))]


def _bind_rules(rs: Ruleset, queue: Queue) -> list[Rule]:
    """A new flow to a bind port on an external address goes to the enforcer (a bind
    not approved, or a peer its IpFilter leaves out, is dropped before the bound socket
    sees anything); what belongs to no flow is dropped. The later datagrams of a UDP
    flow the enforcer admitted, which conntrack still calls new until the client
    answers, go to the bind's socket in the kernel while it is there (once it is gone,
    the enforcer drops them)."""
    if rs.bind_ports is None:
        return []
    out = []
    for family in FAMILIES:
        for address in rs.interfaces.external_of(family):
            where = Match(daddr=address, protocols=TRANSPORT, dports=(rs.bind_ports,))
            out += [Rule(replace(where, protocols=("udp",), ct_mark=MarkIs(MARK_LOCAL, MARK_LOCAL),
                                 local_socket=True), ACCEPT),
                    *_new_flow_caps(rs.limits, where),
                    Rule(replace(where, ct_state=NEW), queue),
                    Rule(replace(where, ct_state=("invalid", "untracked")), DROP)]
    return out


def _snat_rules(rs: Ruleset) -> list[Rule]:
    """Flows marked for an external address leave from it (redirected flows always are);
    in NAT, other flows from the internal networks leave from the first."""
    out = []
    for family in FAMILIES:
        ours = rs.interfaces.external_of(family)[:MAX_EXTERNAL_ADDRESSES]
        networks = [n for n in rs.interfaces.internal_networks if family_of(n) == family]
        for ext in rs.interfaces.external:
            out += [Rule(Match(family=family, mark=MarkIs((i + 1) << MARK_SNAT_SHIFT, MARK_SNAT), oif=(ext,)),
                         SourceNat(a)) for i, a in enumerate(ours)]
            if ours and rs.nat:
                out += [Rule(Match(saddr=n, oif=(ext,)), SourceNat(ours[0])) for n in networks]
    return out


# --- the backends: how the rules are said and put in place ---------------------------------

class Backend(ABC):
    """Puts the neutral rules (``rules_of``) in the kernel in place of ours, and takes them
    away again."""

    name: ClassVar[str]

    def install(self, rs: Ruleset) -> list[str]:
        """Put ``rs`` in place of whatever of ours is installed, with no moment without
        rules: in one transaction a family (iptables), or one for both families and the
        maps table (nft). The maps table (per-grant NAT) is made anew with the working
        rules and goes without them; the other backend's rules, left by a run that used
        it, go too. Returns what was replaced of an earlier run's (a run that did not stop
        cleanly)."""
        replaced = [f"nft table inet {MAPS_TABLE}"] if MAPS_TABLE in _nft_tables() else []
        self._replace(rules_of(rs), _nft_replacing(MAPS_TABLE, render_nft_maps(rs) if rs.working else ""))
        return replaced + [gone for other in BACKENDS if not isinstance(self, other)
                           for gone in other().remove()]

    @abstractmethod
    def _replace(self, chains: Sequence[Chain], maps: str) -> None:
        """Put ``chains`` in place of ours, and the maps table (``maps``, nft input) with them."""

    @abstractmethod
    def remove(self) -> list[str]:
        """Remove every chain and rule of ours this backend puts in place; what was removed.
        Safe when there is none."""


def _port_range(ports: PortRange, separator: str) -> str:
    return str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}{separator}{ports[1]}"


_T = TypeVar("_T")


def _each(items: tuple[_T, ...] | None) -> tuple[_T | None, ...]:
    """The alternatives of an "any of" condition; no condition is one alternative."""
    return (None,) if items is None else items


class IptablesBackend(Backend):
    """iptables and ip6tables (the NFQUEUE target works where nft's queue statement does
    not), in chains named ``PINHOLE-*``, each jumped to first from its built-in chain;
    each family's replaced in one iptables-restore transaction."""

    name = "iptables"
    # (hook, stage) -> (table, built-in chain, our chain)
    CHAINS: ClassVar[dict[tuple[Hook, Stage], tuple[str, str, str]]] = {
        (Hook.PREROUTING, Stage.RAW): ("raw", "PREROUTING", CHAIN_PREFIX + "PREROUTING"),
        (Hook.FORWARD, Stage.FILTER): ("filter", "FORWARD", CHAIN_PREFIX + "FORWARD"),
        (Hook.INPUT, Stage.FILTER): ("filter", "INPUT", CHAIN_PREFIX + "INPUT"),
        (Hook.OUTPUT, Stage.FILTER): ("filter", "OUTPUT", CHAIN_PREFIX + "OUTPUT"),
        (Hook.PREROUTING, Stage.MANGLE): ("mangle", "PREROUTING", CHAIN_PREFIX + "PREROUTING"),
        (Hook.POSTROUTING, Stage.MANGLE): ("mangle", "POSTROUTING", CHAIN_PREFIX + "POSTROUTING"),
        # The nat table's input hook comes after the filter table's (the verdict), and sees
        # the first packet of each connection only: the admitted one.
        (Hook.INPUT, Stage.AFTER_FILTER): ("nat", "INPUT", CHAIN_PREFIX + "LOCAL"),
        (Hook.POSTROUTING, Stage.SOURCE_NAT): ("nat", "POSTROUTING", CHAIN_PREFIX + "POSTROUTING"),
    }
    TOOLS: ClassVar[dict[Family, str]] = {"ipv4": "iptables", "ipv6": "ip6tables"}

    def render(self, chains: Iterable[Chain], family: Family) -> str:
        """iptables-restore input for one family (pure). Every table has its section, so
        that restoring it replaces our chains in each."""
        declared: dict[str, list[str]] = {table: [] for table in TABLES}
        appended: dict[str, list[str]] = {table: [] for table in TABLES}
        for chain in chains:
            lines = [line for rule in chain.rules for line in _iptables_rule(rule, family)]
            if lines:
                table, builtin, ours = self.CHAINS[chain.hook, chain.stage]
                declared[table].append(f":{ours} - [0:0]")  # declarations first
                appended[table] += [*(f"-A {ours} {line}" for line in lines), f"-I {builtin} 1 -j {ours}"]
        return "".join(f"*{table}\n" + "".join(f"{line}\n" for line in (*declared[table], *appended[table]))
                       + "COMMIT\n" for table in TABLES)

    def _replace(self, chains: Sequence[Chain], maps: str) -> None:
        for family, tool in self.TOOLS.items():
            _run([f"{tool}-restore", "--noflush"], input=_replacing(self.render(chains, family), _ours(tool)))
        _run(["nft", "-f", "-"], input=maps)

    def remove(self) -> list[str]:
        """Every chain of ours and every jump to one, one iptables-restore transaction per family."""
        removed = []
        for tool in self.TOOLS.values():
            stale = _ours(tool)
            if not any(jumps or chains for jumps, chains in stale.values()):
                continue
            _run([f"{tool}-restore", "--noflush"], input=unloading(stale))
            for table, (jumps, chains) in stale.items():
                removed += [f"{tool} -t {table} -A {' '.join(jump)}" for jump in jumps]
                removed += [f"{tool} -t {table} chain {chain}" for chain in sorted(chains)]
        return removed


# the family's ICMP protocol, ICMP type option, and hop limit (TTL) match
_IPTABLES_WORDS: dict[Family, tuple[str, str, str]] = {
    "ipv4": ("icmp", "--icmp-type", "-m ttl --ttl-eq"),
    "ipv6": ("ipv6-icmp", "--icmpv6-type", "-m hl --hl-eq"),
}


def _iptables_rule(rule: Rule, family: Family) -> list[str]:
    """A rule as iptables options for one family: a line for each combination of its
    interfaces, protocols and ICMP types (none for a rule of the other family, or one that
    matches nothing)."""
    m = rule.match
    if m.of_family not in (None, family) or m.matches_nothing:
        return []
    icmp, icmp_type_option, hop_limit = _IPTABLES_WORDS[family]
    prefix = 32 if family == "ipv4" else 128
    out = []
    for iif, protocol, icmp_type, oif in itertools.product(_each(m.iif), _each(m.protocols),
                                                           _each(m.icmp_types), _each(m.oif)):
        words: list[str] = []
        if iif is not None:
            words.append(f"-i {iif}")
        if m.saddr is not None:
            words.append(f"-s {m.saddr}")
        if m.daddr is not None:
            words.append(f"-d {m.daddr}")
        if protocol is not None:
            words.append(f"-p {icmp if protocol == 'icmp' else protocol}")
        if m.dports is not None:
            words.append(f"--dport {_port_range(m.dports[0], ':')}" if len(m.dports) == 1 else
                         "-m multiport --dports " + ",".join(_port_range(p, ":") for p in m.dports))
        if icmp_type is not None:
            words.append(f"{icmp_type_option} {icmp_type}")
        if m.hop_limit is not None:
            words.append(f"{hop_limit} {m.hop_limit}")
        if m.reverse_path_fails:
            words.append("-m rpfilter --invert")
        if m.mark is not None:
            words.append(f"-m mark {_iptables_mark(m.mark)}")
        if oif is not None:
            words.append(f"-o {oif}")
        if m.ct_mark is not None:
            words.append(f"-m connmark {_iptables_mark(m.ct_mark)}")
        conntrack = [*([f"--ctstate {','.join(m.ct_state).upper()}"] if m.ct_state is not None else []),
                     *([f"--ctstatus {m.ct_status.upper()}"] if m.ct_status is not None else []),
                     *(["--ctdir REPLY"] if m.ct_reply else [])]
        if conntrack:
            words.append(f"-m conntrack {' '.join(conntrack)}")
        if m.local_socket:
            words.append("-m socket")
        if isinstance(m.over, RateOver):
            words.append(f"-m hashlimit --hashlimit-above {m.over.per_second}/sec --hashlimit-burst "
                         f"{m.over.burst} --hashlimit-mode srcip --hashlimit-srcmask {prefix} "
                         f"--hashlimit-name {NEW_FLOW_METER}")
        elif isinstance(m.over, CountOver):
            words.append(f"-m connlimit --connlimit-above {m.over.count} --connlimit-mask {prefix} "
                         "--connlimit-saddr")
        out.append(" ".join([*words, _iptables_action(rule.action)]))
    return out


def _iptables_mark(mark: MarkIs) -> str:
    return f"{'! ' if mark.negate else ''}--mark {_hex(mark.value)}/{_hex(mark.mask)}"


def _iptables_action(action: Action) -> str:
    match action:
        case Accept():
            return "-j ACCEPT"
        case Drop():
            return "-j DROP"
        case Queue(num, bypass):
            return f"-j NFQUEUE --queue-num {num}" + (" --queue-bypass" if bypass else "")
        case RestoreMark(mask):
            return f"-j CONNMARK --restore-mark --nfmask {_hex(mask)} --ctmask {_hex(mask)}"
        case SaveMark(mask):
            return f"-j CONNMARK --save-mark --nfmask {_hex(mask)} --ctmask {_hex(mask)}"
        case SourceNat(address):
            return f"-j SNAT --to-source {address}"


_NFT_FAMILY: dict[Family, str] = {"ipv4": "ip", "ipv6": "ip6"}
_NFT_ADDR: dict[Family, str] = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}
_NFT_ICMP: dict[Family | None, tuple[str, ...]] = {"ipv4": ("icmp",), "ipv6": ("ipv6-icmp",),
                                                   None: ("icmp", "ipv6-icmp")}


class NftBackend(Backend):
    """Native nft, where the kernel has nft's queue statement: one ``inet pinhole`` table
    for both families, replaced in one nft transaction with the maps table."""

    name = "nft"
    # (hook, stage) -> (chain, type, priority)
    CHAINS: ClassVar[dict[tuple[Hook, Stage], tuple[str, str, str]]] = {
        (Hook.PREROUTING, Stage.RAW): ("raw_prerouting", "filter", "raw"),
        (Hook.FORWARD, Stage.FILTER): ("filter_forward", "filter", "filter"),
        (Hook.INPUT, Stage.FILTER): ("filter_input", "filter", "filter"),
        (Hook.OUTPUT, Stage.FILTER): ("filter_output", "filter", "filter"),
        (Hook.PREROUTING, Stage.MANGLE): ("restore_mark", "filter", "mangle"),
        (Hook.POSTROUTING, Stage.MANGLE): ("save_mark", "filter", "mangle"),
        (Hook.INPUT, Stage.AFTER_FILTER): ("save_local_mark", "filter", "filter + 10"),
        (Hook.POSTROUTING, Stage.SOURCE_NAT): ("source_nat", "nat", "srcnat"),
    }

    def render(self, chains: Iterable[Chain]) -> str:
        """The table, both families (pure): the sets its meters keep, then its chains."""
        meters: dict[str, str] = {}  # name -> declaration, in the order the rules use them
        body: list[str] = []
        for chain in chains:
            rules = [rule for rule in chain.rules if not rule.match.matches_nothing]
            if not rules:
                continue
            name, kind, priority = self.CHAINS[chain.hook, chain.stage]
            body += [f"  chain {name} {{",
                     f"    type {kind} hook {chain.hook.value} priority {priority}; policy accept;"]
            for rule in rules:
                if rule.match.over is not None:
                    meter, declaration, _ = _nft_meter(rule.match)
                    meters[meter] = declaration
                body.append(f"    {_nft_rule(rule)}")
            body.append("  }")
        return "\n".join([f"table inet {NFT_TABLE} {{", *meters.values(), *body, "}"]) + "\n"

    def _replace(self, chains: Sequence[Chain], maps: str) -> None:
        _run(["nft", "-f", "-"], input=_nft_replacing(NFT_TABLE, self.render(chains)) + maps)

    def remove(self) -> list[str]:
        return _remove_nft_table(NFT_TABLE)


BACKENDS: tuple[type[Backend], ...] = (IptablesBackend, NftBackend)


def _nft_set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _nft_names(names: Sequence[str]) -> str:
    return _nft_set([f'"{name}"' for name in names])


def _nft_meter(match: Match) -> tuple[str, str, str]:
    """The dynamic set that keeps the source addresses of a rule's RateOver or CountOver
    (one a family): its name, its declaration and its key."""
    family = match.of_family
    if family is None:
        raise ValueError(f"a meter is kept per family: {match} is for both")
    rate = isinstance(match.over, RateOver)  # whose elements time out (CountOver's go with their flows)
    name = f"{'new_flow_rate' if rate else 'flows'}_{_NFT_FAMILY[family]}"
    declaration = f"  set {name} {{ type {_NFT_ADDR[family]}; flags dynamic{', timeout' if rate else ''}; }}"
    return name, declaration, f"{_NFT_FAMILY[family]} saddr"


def _nft_rule(rule: Rule, *, counted: bool = False) -> str:
    """A rule as one nft statement line (for both families unless it says one); ``counted``:
    with a counter of the packets it took."""
    m = rule.match
    family = m.of_family
    parts: list[str] = []
    if m.family is not None:
        parts.append(f"meta nfproto {m.family}")
    if m.iif is not None:
        parts.append(f"iifname {_nft_names(m.iif)}")
    for direction, address in (("saddr", m.saddr), ("daddr", m.daddr)):
        if address is not None:
            parts.append(f"{_NFT_FAMILY[family_of(address)]} {direction} {address}")
    ports = None if m.dports is None else _nft_set([_port_range(p, "-") for p in m.dports])
    if m.icmp_types is not None:  # says the protocol
        types = _nft_set([str(t) for t in m.icmp_types])
        parts.append(f"{'icmpv6' if family == 'ipv6' else 'icmp'} type {types}")
    elif m.protocols is not None:
        names = [n for p in m.protocols for n in (_NFT_ICMP[family] if p == "icmp" else (p,))]
        if ports is not None and len(names) == 1:
            parts.append(f"{names[0]} dport {ports}")
            ports = None
        else:
            parts.append(f"meta l4proto {_nft_set(names)}")
    if ports is not None:
        parts.append(f"th dport {ports}")
    if m.hop_limit is not None:
        parts.append(f"{'ip6 hoplimit' if family == 'ipv6' else 'ip ttl'} {m.hop_limit}")
    if m.reverse_path_fails:
        parts.append("fib saddr . iif oif missing")
    if m.mark is not None:
        parts.append(f"meta mark {_nft_mark(m.mark)}")
    if m.oif is not None:
        parts.append(f"oifname {_nft_names(m.oif)}")
    if m.ct_mark is not None:
        parts.append(f"ct mark {_nft_mark(m.ct_mark)}")
    if m.ct_state is not None:
        parts.append(f"ct state {','.join(m.ct_state)}")
    if m.ct_status is not None:
        parts.append(f"ct status {m.ct_status}")
    if m.ct_reply:
        parts.append("ct direction reply")
    if m.local_socket:
        parts.append("socket wildcard 0")
    if m.over is not None:
        meter, _, key = _nft_meter(m)
        over = (f"timeout 10s limit rate over {m.over.per_second}/second burst {m.over.burst} packets"
                if isinstance(m.over, RateOver) else f"ct count over {m.over.count}")
        parts.append(f"add @{meter} {{ {key} {over} }}")
    return " ".join([*parts, *(["counter"] if counted else []), _nft_action(rule.action)])


def _nft_mark(mark: MarkIs) -> str:
    return f"and {_hex(mark.mask)} {'!=' if mark.negate else '=='} {_hex(mark.value)}"


def _nft_action(action: Action) -> str:
    match action:
        case Accept():
            return "accept"
        case Drop():
            return "drop"
        case Queue(num, bypass):
            return f"queue num {num}" + (" bypass" if bypass else "")
        # nft cannot merge two registers here: the mark is set whole, its bits outside
        # the mask cleared.
        case RestoreMark(mask):
            return f"meta mark set ct mark and {_hex(mask)}"
        case SaveMark(mask):
            return f"ct mark set meta mark and {_hex(mask)}"
        case SourceNat(address):
            return f"snat {_NFT_FAMILY[family_of(address)]} to {address}"


def render_nft_maps(rs: Ruleset) -> str:
    """The table of per-grant kernel state (both backends), whose sets and maps the
    enforcer writes over netlink (``NatMaps``) as grants come and go.

    Kernel NAT: a kernel-mode redirect port's first packet gets the port as its mark (so
    the enforcer knows which redirect it came by) and goes on to the target; a new flow
    to a SecureNAT bind's external port goes on to the client's port. A bind whose flow
    is to reach the client from the fw has it leave from the fw's address, once the
    enforcer has admitted it (the source NAT is chosen after the forward hook), looked up
    by the bind's address (the flow's original destination) and the client's port it
    goes to: nft cannot concatenate the original destination port.

    Grants the kernel holds (single-use AllowFutureConnect grants of flows that run in
    kernel mode): a key in ``grant_<family>``, its flow's mark in ``grant_mark_<family>``,
    each with the grant's timeout. The grants chain, before the forward chain (whose
    first rules accept a flow by its kernel-mode connmark), admits a new flow whose key
    it finds, while the enforcer lives (``MARK_LIVE``) and as the enforcer would (a TCP
    flow by a bare SYN; no IPv6 routing header): it sets the flow's mark, deletes
    the key (single use; each key also lets one packet through, checked under the
    element's lock, so that two CPUs cannot both use it) and logs the packet to the
    enforcer (NFLOG group = the queue's number). Rule 16's caps come first
    (``forward_caps``)."""
    lines = [f"table inet {MAPS_TABLE} {{"]
    size = rs.limits.pending_total
    for family, proto in _NFT_FAMILY.items():
        addr = _NFT_ADDR[family]
        key = f"{addr} . {addr} . inet_proto . inet_service"
        lines += [f"  map redirect_mark_{proto} {{ type {key} : mark; }}",
                  f"  map redirect_to_{proto} {{ type {key} : {addr} . inet_service; }}",
                  f"  map bind_to_{proto} {{ type {addr} . inet_proto . inet_service : "
                  f"{addr} . inet_service; }}",
                  f"  map bind_from_{proto} {{ type {key} : {addr}; }}",
                  f"  set grant_{proto} {{ type {key}; flags timeout; size {size}; {ONE_PACKET}; }}",
                  f"  map grant_mark_{proto} {{ type {key} : mark; flags timeout; size {size}; }}"]
    caps = forward_caps(rs.limits)
    lines += [_nft_meter(cap.match)[1] for cap in caps]
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
    lines += ["  }", "  chain grants {", "    type filter hook forward priority filter - 1; policy accept;",
              "    ct state != new accept"]  # (the forward chain's to judge; one rule a packet)
    lines += [f"    {_nft_rule(cap, counted=True)}" for cap in caps]  # (what they refused)
    # What the enforcer would admit by the grant: a new flow's first packet (while the
    # enforcer lives), which for TCP is a bare SYN; not a redirect's (a kernel-mode redirect
    # rule marked it with its port, or the enforcer rewrote it), nor an IPv6 packet with a
    # routing header (its destination may be a waypoint); nor a later packet of a flow
    # admitted already, which conntrack calls new until its first reply (a SYN sent again,
    # an unanswered UDP flow's datagrams): its connmark says how it runs, and a user-mode
    # flow must not be switched to kernel mode (nor a second grant be spent on one).
    unmarked = f"meta mark and {_hex(MARK_LIVE | MARK_REWRITTEN | MARK_PORT)} == {_hex(MARK_LIVE)}"
    unadmitted = f"ct mark {_nft_mark(MarkIs(0, MARK_MODE))}"
    for proto in _NFT_FAMILY.values():
        key = f"{proto} saddr . {proto} daddr . meta l4proto . th dport"
        plain = " exthdr rt missing" if proto == "ip6" else ""
        lines += [f"    {unmarked} ct state new {unadmitted} {first}{plain} {key} @grant_{proto} "
                  f"ct mark set {key} map @grant_mark_{proto} meta mark set ct mark "
                  f"delete @grant_{proto} {{ {key} }} log group {rs.settings.queue}"
                  for first in ("tcp flags & (fin | syn | rst | ack) == syn", "meta l4proto udp")]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _register(value: bytes) -> bytes:
    """A component of a concatenated nft key or value: padded to a 4-byte register."""
    return value + b"\0" * (-len(value) % 4)


def _port(port: int) -> bytes:
    return _register(struct.pack("!H", port))


def flow_key(source: IPAddress, destination: IPAddress, protocol: int, port: int) -> bytes:
    """The key ``saddr . daddr . meta l4proto . th dport`` of the maps table's sets (a
    grant's: its client, target, protocol and port)."""
    return source.packed + destination.packed + _register(bytes([protocol])) + _port(port)


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
        key = flow_key(self.client, self.internal, self.protocol, self.port)
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


def _key_family(key: bytes) -> str:
    """The family of a grant's key (``flow_key``): an IPv4 one is 16 bytes, an IPv6 one 40."""
    return "ip" if len(key) == 16 else "ip6"


@dataclass(frozen=True)
class GrantRule:
    """A grant the kernel holds (``render_nft_maps``): new flows from ``client`` to
    ``target``:``port`` by ``protocol``, the first of which it admits with ``mark``, for
    ``timeout_ms`` (None: until it is removed)."""

    protocol: int
    client: IPAddress
    target: IPAddress
    port: int
    mark: int
    timeout_ms: int | None

    @property
    def key(self) -> bytes:
        return flow_key(self.client, self.target, self.protocol, self.port)

    @property
    def family(self) -> str:
        return "ip" if self.client.version == 4 else "ip6"


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
        self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, TRANSACTION_BUFFER)
        self.sock.settimeout(NETLINK_TIMEOUT)
        self._seq = itertools.count(1)

    def add(self, rules: Sequence[NatRule]) -> None:
        """Add these rules' elements (``ELEMENTS_PER_MESSAGE`` to a message; in one
        transaction unless there are more messages than ``MESSAGES_PER_TRANSACTION``);
        DataplaneError if the kernel refuses, and then none of them is left in the maps."""
        by_map: dict[str, list[tuple[bytes, bytes]]] = {}
        for rule in rules:
            for name, key, value in rule.elements():
                by_map.setdefault(name, []).append((key, value))
        messages = [set_elements_message(name, part, True, next(self._seq))
                    for name, elements in by_map.items() for part in _chunks(elements)]
        try:
            self._transact(messages, "writing the NAT maps", "a NAT map update")
        except DataplaneError:
            self._undo(rules)
            raise

    def _undo(self, rules: Sequence[NatRule]) -> None:
        """What a failed ``add`` may have added (an earlier transaction, or one the kernel
        made but whose acknowledgements were lost) is taken away again, as far as it can be."""
        with contextlib.suppress(DataplaneError):
            self.delete(rules)

    def delete(self, rules: Sequence[NatRule]) -> None:
        """Delete these rules' elements, one transaction each, so that one already gone
        does not keep the others (DataplaneError for any other refusal)."""
        for rule in rules:
            errors = self._batch([(name, [(key, value)], False) for name, key, value in rule.elements()])
            if any(code != errno.ENOENT for code in errors):
                raise DataplaneError(f"the kernel refused to remove {rule}: "
                                     + "; ".join(map(os.strerror, errors)))

    def hold(self, grants: Sequence[GrantRule]) -> None:
        """Give the kernel these grants: each one's key, and its mark in place of any a
        used grant of the same key left; ``ELEMENTS_PER_MESSAGE`` grants a transaction (of
        at most six messages), each applied at once or not at all. GrantsNotHeld if the
        kernel refuses one (a set full, say): it holds none of that transaction's grants
        and those after it (what it may have made of them is taken away again), and holds
        those before it."""
        left = len(grants)
        for part in _chunks(grants):
            messages: list[bytes] = []
            for family in ("ip", "ip6"):
                chosen = [g for g in part if g.family == family]
                if not chosen:
                    continue
                keys = [g.key for g in chosen]
                timeouts = [g.timeout_ms for g in chosen]
                messages += [
                    destroy_message(f"grant_mark_{family}", keys, next(self._seq)),
                    set_elements_message(f"grant_{family}", [(k, b"") for k in keys], True,
                                         next(self._seq), timeouts),
                    set_elements_message(f"grant_mark_{family}",
                                         [(g.key, struct.pack("=I", g.mark)) for g in chosen],
                                         True, next(self._seq), timeouts)]
            try:
                self._transact(messages, "giving the kernel grants", "to hold a grant")
            except DataplaneError as exc:
                with contextlib.suppress(DataplaneError):
                    self.release([g.key for g in part])
                raise GrantsNotHeld(str(exc), left) from None
            left -= len(part)

    def release(self, keys: Sequence[bytes]) -> None:
        """Take the grants of these keys (``GrantRule.key``) from the kernel (what is left
        of each: a used one's mark), a grant already gone too; DataplaneError, after trying
        every one, if the kernel may still hold some (a transaction it refused, or did not
        confirm)."""
        failure = None
        for part in _chunks(keys):
            messages = [destroy_message(f"{name}_{family}", chosen, next(self._seq))
                        for family in ("ip", "ip6")
                        for chosen in ([k for k in part if _key_family(k) == family],) if chosen
                        for name in ("grant", "grant_mark")]
            try:
                self._transact(messages, "taking grants from the kernel", "to remove a grant")
            except DataplaneError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def grant_keys(self) -> set[bytes]:
        """The keys of the grants the kernel holds now, both families (a dump of the sets);
        DataplaneError if the kernel does not answer."""
        keys: set[bytes] = set()
        for family in ("ip", "ip6"):
            body = (_attribute(NFTA_SET_ELEM_LIST_TABLE, MAPS_TABLE.encode() + b"\0")
                    + _attribute(NFTA_SET_ELEM_LIST_SET, f"grant_{family}".encode() + b"\0"))
            seq = next(self._seq)
            request = _netlink((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
                               NLM_F_REQUEST | NLM_F_DUMP, seq, NFPROTO_INET, 0, body)
            try:
                for data, start, end in dumped(self.sock, request, seq):
                    keys.update(_set_keys(data, start, end))
            except OSError as exc:
                raise DataplaneError(f"listing the grants the kernel holds failed: {exc}") from None
        return keys

    def _batch(self, messages: list[tuple[str, list[tuple[bytes, bytes]], bool]]) -> list[int]:
        """Send one transaction; the errno of each message the kernel refused (a refusal
        aborts the whole transaction)."""
        return self._send([set_elements_message(name, elements, add, next(self._seq))
                           for name, elements, add in messages], "writing the NAT maps")

    def _transact(self, messages: list[bytes], what: str, refused: str) -> None:
        """Send messages in transactions of at most ``MESSAGES_PER_TRANSACTION``, up to the
        first the kernel refuses: then DataplaneError (``refused``: what it refused to do),
        as when it does not answer."""
        for run in _chunks(messages, MESSAGES_PER_TRANSACTION):
            errors = self._send(list(run), what)
            if errors:
                raise DataplaneError(f"the kernel refused {refused}: "
                                     + "; ".join(map(os.strerror, errors)))

    def _send(self, messages: list[bytes], what: str) -> list[int]:
        """Send encoded messages as one transaction; the errno of each one refused."""
        waiting = {struct.unpack_from("=I", msg, 8)[0] for msg in messages}
        data = (batch_marker(NFNL_MSG_BATCH_BEGIN, next(self._seq)) + b"".join(messages)
                + batch_marker(NFNL_MSG_BATCH_END, next(self._seq)))
        return _request(self.sock, data, waiting, what)

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


class Conntrack:
    """What the enforcer asks of connection tracking, over netlink (one request each, which
    the kernel answers at once):

    - ``forget``: delete the entries of a closed Firewall-client UDP bind's flows, by their
      mark (``local_mark``): the kernel would otherwise go on handing their datagrams to
      whatever socket binds the port next;
    - ``redirected_udp_ports``: the ports of one of the fw's addresses by which a client's
      UDP flows were redirected (a dump that the kernel filters: see
      ``redirected_udp_message``).
    """

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

    def redirected_udp_ports(self, client: IPAddress, address: IPAddress) -> set[int]:
        """The destination ports of the UDP flows conntrack holds from ``client`` to
        ``address`` (as first sent) whose destination it translated; DataplaneError if
        the kernel does not answer."""
        seq = next(self._seq)
        wanted = (client.packed, address.packed)
        try:
            entries = [_original_destination(data, start, end) for data, start, end
                       in dumped(self.sock, redirected_udp_message(client, address, seq), seq)]
        except OSError as exc:
            raise DataplaneError(f"asking conntrack for {client}'s UDP flows to {address} "
                                 f"failed: {exc}") from None
        return {port for addresses, port in entries if addresses == wanted and port is not None}

    def close(self) -> None:
        self.sock.close()


def redirected_udp_message(client: IPAddress, address: IPAddress, seq: int) -> bytes:
    """IPCTNL_MSG_CT_GET, a dump of the conntrack entries of ``client``'s family whose
    destination was translated (IPS_DST_NAT: every kernel-mode redirect's flow) and whose
    original direction is UDP, for IPv4 from ``client`` to ``address``. The kernel
    compares those (CTA_STATUS, Linux 5.15; CTA_FILTER on CTA_TUPLE_ORIG, Linux 5.9). It
    compares IPv6 addresses the wrong way round (``ctnetlink_filter_match_tuple`` rejects
    an equal one; Linux 6.18 still), so the reader compares the addresses itself (an
    older kernel that ignores the status filter costs only time)."""
    v4 = client.version == 4
    ip = (_attribute(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, client.packed)
          + _attribute(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, address.packed))
    tuple_ = (_attribute(CTA_TUPLE_IP | NLA_F_NESTED, ip)
              + _attribute(CTA_TUPLE_PROTO | NLA_F_NESTED, _attribute(CTA_PROTO_NUM, bytes([UDP]))))
    flags = CTA_FILTER_F_CTA_PROTO_NUM | (CTA_FILTER_F_CTA_IP_SRC | CTA_FILTER_F_CTA_IP_DST if v4 else 0)
    filter_ = (_attribute(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", flags))
               + _attribute(CTA_FILTER_REPLY_FLAGS, struct.pack("=I", 0)))
    body = (_attribute(CTA_TUPLE_ORIG | NLA_F_NESTED, tuple_)
            + _attribute(CTA_FILTER | NLA_F_NESTED, filter_)
            + _attribute(CTA_STATUS, struct.pack("!I", IPS_DST_NAT))
            + _attribute(CTA_STATUS_MASK, struct.pack("!I", IPS_DST_NAT)))
    return _netlink((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP,
                    seq, socket.AF_INET if v4 else socket.AF_INET6, 0, body)


def _original_destination(data: bytes, start: int, end: int) -> tuple[tuple[bytes | None, bytes | None],
                                                                     int | None]:
    """((source, destination) addresses, destination port) of a conntrack entry's original
    direction, from its message's payload (``start``, ``end``)."""
    addresses: dict[int, bytes] = {}
    port = None
    for attr, a, b in netlink_attributes(data, start + 4, end):  # after nfgenmsg
        if attr != CTA_TUPLE_ORIG:
            continue
        for part, c, d in netlink_attributes(data, a, b):
            for field_, e, f in netlink_attributes(data, c, d):
                if part == CTA_TUPLE_IP:
                    addresses[field_] = data[e:f]
                elif part == CTA_TUPLE_PROTO and field_ == CTA_PROTO_DST_PORT and f - e >= 2:
                    port = struct.unpack_from("!H", data, e)[0]
    return ((addresses.get(CTA_IP_V4_SRC, addresses.get(CTA_IP_V6_SRC)),
             addresses.get(CTA_IP_V4_DST, addresses.get(CTA_IP_V6_DST))), port)


def _set_keys(data: bytes, start: int, end: int) -> Iterator[bytes]:
    """The keys of the elements in a message of a set's dump (its payload: ``start``,
    ``end``)."""
    for attr, a, b in netlink_attributes(data, start + 4, end):  # after nfgenmsg
        if attr != NFTA_SET_ELEM_LIST_ELEMENTS:
            continue
        for _, c, d in netlink_attributes(data, a, b):  # each element
            for part, e, f in netlink_attributes(data, c, d):
                if part == NFTA_SET_ELEM_KEY:
                    yield from (data[g:h] for value, g, h in netlink_attributes(data, e, f)
                                if value == NFTA_DATA_VALUE)


def dumped(sock: socket.socket, request: bytes, seq: int) -> Iterator[tuple[bytes, int, int]]:
    """Send a dump request (its sequence number ``seq``) and yield each message of the
    answer, (datagram, payload start, end), until the kernel says it is done; answers to
    earlier requests (a transaction's that were not read) are passed over. OSError for a
    failing socket or an error the kernel answered."""
    sock.send(request)
    while True:
        data = sock.recv(1 << 20)
        messages, done = dump_messages(data, seq)
        for start, end in messages:
            yield data, start, end
        if done:
            return


def dump_messages(data: bytes, seq: int) -> tuple[list[tuple[int, int]], bool]:
    """The payload (start, end) of each message of the dump ``seq`` in one datagram (those
    of other requests are passed over), and whether the dump is done; OSError for an
    error the kernel answered."""
    messages: list[tuple[int, int]] = []
    for kind, start, end in netlink_messages(data):
        if struct.unpack_from("=I", data, start - 8)[0] != seq:
            continue
        if kind == NLMSG_DONE:
            return messages, True
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, start)[0]
            if code:
                raise OSError(code, os.strerror(code))
            continue
        messages.append((start, end))
    return messages, False


def forget_by_mark_message(mark: int, mask: int, seq: int) -> bytes:
    """IPCTNL_MSG_CT_DELETE without a tuple: every conntrack entry of either family whose
    mark, masked, is ``mark`` (ctnetlink's flush with a mark filter)."""
    body = _attribute(CTA_MARK, struct.pack("!I", mark)) + _attribute(CTA_MARK_MASK, struct.pack("!I", mask))
    return _netlink((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK,
                    seq, socket.AF_UNSPEC, 0, body)


def netlink_attributes(data: bytes, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, start, end) of each netlink attribute in data[offset:end]."""
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, offset + 4, min(offset + length, end)
        offset += (length + 3) & ~3


def netlink_messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, start of payload, end) of each netlink message in one datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            return
        yield kind, offset + 16, min(offset + length, len(data))
        offset += (length + 3) & ~3


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


def set_elements_message(name: str, elements: Sequence[tuple[bytes, bytes]], add: bool, seq: int,
                         timeouts_ms: Sequence[int | None] = ()) -> bytes:
    """NFT_MSG_NEWSETELEM (or DELSETELEM, keys alone) of the maps table's map ``name``.

    An empty value adds a set's element (a key alone). ``timeouts_ms``, one per element,
    gives each added element its own timeout (the set must have the timeout flag); an
    element without one takes the set's default timeout, if any."""
    items = b"".join(
        _attribute(i + 1, _attribute(NFTA_SET_ELEM_KEY, _attribute(NFTA_DATA_VALUE, key))
                   + (_attribute(NFTA_SET_ELEM_DATA, _attribute(NFTA_DATA_VALUE, value))
                      if add and value else b"")
                   + (_attribute(NFTA_SET_ELEM_TIMEOUT, struct.pack("!Q", timeout))
                      if add and timeout is not None else b""))
        for i, ((key, value), timeout) in enumerate(
            zip(elements, timeouts_ms or [None] * len(elements), strict=True)))
    body = (_attribute(NFTA_SET_ELEM_LIST_TABLE, MAPS_TABLE.encode() + b"\0")
            + _attribute(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
            + _attribute(NFTA_SET_ELEM_LIST_ELEMENTS, items))
    kind = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if add else NFT_MSG_DELSETELEM)
    return _netlink(kind, NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if add else 0), seq,
                    NFPROTO_INET, 0, body)


def _chunks(items: Sequence[_T], size: int = ELEMENTS_PER_MESSAGE) -> Iterator[Sequence[_T]]:
    """``items`` in runs of at most ``size`` (elements to a message, by default)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def destroy_message(name: str, keys: list[bytes], seq: int) -> bytes:
    """NFT_MSG_DESTROYSETELEM: ``set_elements_message``'s delete, which the kernel does not
    refuse when an element is missing."""
    msg = set_elements_message(name, [(k, b"") for k in keys], False, seq)
    return msg[:4] + struct.pack("=H", (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DESTROYSETELEM) + msg[6:]


class LiveTable:
    """The table that says this enforcer lives: its one chain marks every new forwarded
    packet with ``MARK_LIVE``, which the grants the kernel holds require. The table is
    owned by this process (nft's ``owner`` flag): the kernel deletes it when the netlink
    socket that made it closes, however the process ends (a stop, a crash, SIGKILL), so
    that no grant admits a flow while no enforcer runs (rule 15). It is made with
    libnftables, in this process, whose context keeps that socket open until ``close``."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libnftables.so.1")
        except OSError as exc:
            raise DataplaneError(f"libnftables is not installed: {exc}") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib, self._ctx = lib, lib.nft_ctx_new(0)
        if not self._ctx:
            raise DataplaneError("libnftables could not make a context")
        lib.nft_ctx_buffer_error(self._ctx)
        text = (f"table inet {LIVE_TABLE} {{\n  flags owner\n  chain live {{\n"
                "    type filter hook forward priority filter - 2; policy accept;\n"
                f"    ct state new meta mark set meta mark or {_hex(MARK_LIVE)}\n  }}\n}}\n")
        if lib.nft_run_cmd_from_buffer(self._ctx, text.encode()) != 0:
            error = (lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            self.close()
            raise DataplaneError(f"cannot make the table {LIVE_TABLE}: {error.strip()}")

    def close(self) -> None:
        """The table goes (with the context's socket)."""
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


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


def choose_backend(settings: DataplaneSettings) -> Backend:
    """The backend the settings name; "auto": nft where the kernel has its queue statement."""
    if settings.backend == "iptables":
        return IptablesBackend()
    supported = nft_queue_supported()
    if settings.backend == "nft" and not supported:
        raise DataplaneError("this kernel lacks nft's queue statement (CONFIG_NFT_QUEUE); "
                             'set dataplane.backend = "iptables" or "auto"')
    return NftBackend() if supported else IptablesBackend()


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


def _nft_replacing(table: str, text: str) -> str:
    """nft input that replaces a table of ours with ``text`` (nothing: removes it)."""
    return f"table inet {table} {{}}\ndelete table inet {table}\n{text}"


def unload() -> list[str]:
    """Remove every rule, chain and table of ours, both layers, of either backend, and
    forget every flow offloaded with our mark: the operator's explicit command (``pinhole
    enforcer --unload``); no stop does this. Returns what was removed. Safe when nothing
    is installed."""
    return ([gone for backend in BACKENDS for gone in backend().remove()]
            + _remove_nft_table(MAPS_TABLE) + forget_flows(("kernel", "user")))


def _remove_nft_table(table: str) -> list[str]:
    if table not in _nft_tables():
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
