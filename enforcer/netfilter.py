"""Netfilter rules in neutral terms: chains of rules, each rule a match and an action,
saying what netfilter is to do and not how iptables or nft spell it.

``dataplane.rules_of`` says the enforcer's rules in these terms, once; each backend
(``dataplane.IptablesBackend``, ``dataplane.NftBackend``) renders them in its own
language and installs them. A condition a backend does not render is a rule that
matches more than it should, so every field here is rendered by both (unit-tested).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Literal

from enforcer.core.packet import IPAddress
from enforcer.core.policy import IPNetwork

Family = Literal["ipv4", "ipv6"]
FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")
# "icmp" is the family's own: ICMPv6 in IPv6
Protocol = Literal["tcp", "udp", "icmp"]
CtState = Literal["new", "established", "related", "invalid", "untracked"]
CtStatus = Literal["confirmed", "expected"]
PortRange = tuple[int, int]  # low, high (inclusive)


class Hook(Enum):
    PREROUTING = "prerouting"
    INPUT = "input"
    FORWARD = "forward"
    OUTPUT = "output"
    POSTROUTING = "postrouting"


class Stage(Enum):
    """Where in its hook a chain runs, relative to connection tracking and the verdict."""

    RAW = "raw"                    # before connection tracking
    MANGLE = "mangle"              # after connection tracking, before the filter's verdict
    FILTER = "filter"              # the verdict
    AFTER_FILTER = "after filter"  # after the filter's verdict: what it admitted
    SOURCE_NAT = "source nat"      # a connection's source translation


def family_of(address: IPAddress | IPNetwork) -> Family:
    return "ipv4" if address.version == 4 else "ipv6"


@dataclass(frozen=True)
class MarkIs:
    """A mark (the packet's or its connection's) whose ``mask`` bits are ``value``, or,
    ``negate``, are not."""

    value: int
    mask: int
    negate: bool = False


@dataclass(frozen=True)
class RateOver:
    """The packet's source address has started more than ``per_second`` of what the rule
    matches per second, past a burst of ``burst``: one meter per family, which every rule
    with a RateOver shares."""

    per_second: int
    burst: int


@dataclass(frozen=True)
class CountOver:
    """The kernel tracks more than ``count`` connections from the packet's source address."""

    count: int


@dataclass(frozen=True)
class Match:
    """What a packet must be for a rule to apply: every condition given (None or False:
    no condition). A tuple is any one of its items; an empty one matches no packet."""

    family: Family | None = None  # a rule of one family (an address condition says it already)
    iif: tuple[str, ...] | None = None  # the interface it came in on, by name
    saddr: IPNetwork | None = None
    daddr: IPAddress | None = None
    protocols: tuple[Protocol, ...] | None = None
    dports: tuple[PortRange, ...] | None = None  # TCP or UDP
    icmp_types: tuple[int, ...] | None = None  # of the rule's family's ICMP
    hop_limit: int | None = None  # the IPv6 hop limit (IPv4 TTL) is this
    reverse_path_fails: bool = False  # the source is not routed back out of ``iif`` (rule 17)
    mark: MarkIs | None = None  # the packet's mark
    oif: tuple[str, ...] | None = None  # the interface it goes out of, by name
    ct_mark: MarkIs | None = None  # its connection's mark
    ct_state: tuple[CtState, ...] | None = None
    # its connection's status has this bit: confirmed (not a first packet in flight), or
    # expected (made from a conntrack helper's expectation)
    ct_status: CtStatus | None = None
    ct_reply: bool = False  # it goes in its connection's reply direction
    local_socket: bool = False  # a socket of the host's, not bound to a wildcard address, takes it
    over: RateOver | CountOver | None = None

    @property
    def of_family(self) -> Family | None:
        """The one family the rule is for (None: both)."""
        address = self.saddr if self.saddr is not None else self.daddr
        return self.family if address is None else family_of(address)

    @property
    def matches_nothing(self) -> bool:
        """Whether an empty "any of" rules every packet out."""
        return any(getattr(self, f.name) == () for f in fields(self))


@dataclass(frozen=True)
class Accept:
    pass


@dataclass(frozen=True)
class Drop:
    pass


@dataclass(frozen=True)
class Queue:
    """To a user-space listener on queue ``num``; with no listener, ``bypass`` lets the
    packet go on (past the rest of the chain too) where it would otherwise be dropped."""

    num: int
    bypass: bool


@dataclass(frozen=True)
class RestoreMark:
    """The packet mark's ``mask`` bits become its connection mark's; the packet goes on."""

    mask: int


@dataclass(frozen=True)
class SaveMark:
    """The connection mark's ``mask`` bits become the packet mark's; the packet goes on."""

    mask: int


@dataclass(frozen=True)
class SourceNat:
    """The connection leaves from ``address``."""

    address: IPAddress


Action = Accept | Drop | Queue | RestoreMark | SaveMark | SourceNat
ACCEPT, DROP = Accept(), Drop()


@dataclass(frozen=True)
class Rule:
    match: Match
    action: Action


@dataclass(frozen=True)
class Chain:
    """Rules in order, run in ``hook`` at ``stage``; an empty chain is not installed."""

    hook: Hook
    stage: Stage
    rules: tuple[Rule, ...]
