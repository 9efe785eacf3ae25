"""The testbed topology as a declarative, frozen value.

A topology says *what* exists (nodes, their interfaces, addresses and routes,
and which L2 segment each interface is plugged into); ``testbed.build`` turns it
into live network namespaces. Nothing here touches the system, so the whole
module is testable without root.

Three topologies exist, by name (see :func:`named`):

- ``routed`` and ``nat``, the two variants of the standard topology
  (:func:`standard`): one internal network; in ``routed`` the servers route the
  client networks back via the firewall, in ``nat`` they have no route to them,
  so the firewall must translate the clients' source addresses;
- ``split`` (:func:`split`): two internal networks on two firewall interfaces,
  routed, for the checks of ingress per interface (SPEC rule 17).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["ipv4", "ipv6"]
Role = Literal["client", "server", "firewall", "switch"]
Variant = Literal["routed", "nat"]

FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")
# The standard topology's variants: where a check runs unless it names its topologies
VARIANTS: tuple[Variant, ...] = ("routed", "nat")
TOPOLOGIES: tuple[str, ...] = (*VARIANTS, "split")

# Only documentation ranges may appear in a topology (RFC 5737, RFC 3849), so a
# misrouted packet can never reach a real network.
DOCUMENTATION_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("192.0.2.0/24"),
    ipaddress.ip_network("198.51.100.0/24"),
    ipaddress.ip_network("203.0.113.0/24"),
    ipaddress.ip_network("2001:db8::/32"),
)

# Linux limits interface names to 15 bytes.
IFNAMSIZ = 15
# Node names end up in namespace names "ph-<6 hex>-<node>" and in switch port
# names "<node>-<iface>"; keep them short.
MAX_NODE_NAME = 6


def _family_of(addr: str) -> Family:
    return "ipv4" if ipaddress.ip_interface(addr).version == 4 else "ipv6"


def _in_documentation_range(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return any(
        net.version == doc.version and net.subnet_of(doc)  # type: ignore[arg-type]
        for doc in DOCUMENTATION_NETWORKS
    )


@dataclass(frozen=True)
class Interface:
    """A data interface of a host node, plugged into an L2 segment.

    ``addresses`` are interface addresses with their prefix length
    ("192.0.2.11/24"), in order: the first of a family is the primary one.
    """

    name: str
    segment: str
    addresses: tuple[str, ...] = ()

    def addresses_of(self, family: Family) -> tuple[str, ...]:
        """Addresses of one family, with prefix length."""
        return tuple(a for a in self.addresses if _family_of(a) == family)


@dataclass(frozen=True)
class Route:
    """A static route: ``dst`` is a CIDR or "default"; ``via`` a gateway,
    ``dev`` an interface (on-link route when ``via`` is None)."""

    family: Family
    dst: str
    via: str | None = None
    dev: str | None = None

    @property
    def dst_cidr(self) -> str:
        """The destination as a CIDR ("default" becomes 0.0.0.0/0 or ::/0)."""
        if self.dst == "default":
            return "0.0.0.0/0" if self.family == "ipv4" else "::/0"
        return self.dst


@dataclass(frozen=True)
class Node:
    """A network namespace: a host (client, server, firewall) or a switch."""

    name: str
    role: Role
    interfaces: tuple[Interface, ...] = ()
    routes: tuple[Route, ...] = ()
    forwarding: bool = False

    def interface(self, name: str) -> Interface:
        for iface in self.interfaces:
            if iface.name == name:
                return iface
        raise KeyError(f"node {self.name!r} has no interface {name!r}")

    def addresses(self, family: Family) -> tuple[str, ...]:
        """All addresses of a family over all interfaces, without prefix length."""
        return tuple(
            str(ipaddress.ip_interface(a).ip)
            for iface in self.interfaces
            for a in iface.addresses_of(family)
        )


@dataclass(frozen=True)
class Segment:
    """An L2 segment: a Linux bridge ``bridge`` inside switch node ``switch``."""

    name: str
    switch: str
    bridge: str = "br0"
    networks: tuple[str, ...] = ()

    def network(self, family: Family) -> str:
        for net in self.networks:
            if _family_of(net) == family:
                return net
        raise KeyError(f"segment {self.name!r} has no {family} network")


@dataclass(frozen=True)
class Topology:
    """Nodes and segments. Validated on construction (ValueError).

    ``variant`` is the topology's name (one of TOPOLOGIES for those built here); the
    firewall has one interface on each of the ``internal_segments`` and one on the
    ``external_segment``."""

    variant: str
    nodes: tuple[Node, ...]
    segments: tuple[Segment, ...]
    internal_segments: tuple[str, ...] = ("int",)
    external_segment: str = "ext"
    _by_name: dict[str, Node] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {n.name: n for n in self.nodes})
        validate(self)

    # -- queries ---------------------------------------------------------
    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(
                f"no node {name!r} in topology (nodes: {', '.join(self.node_names)})"
            ) from None

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def _role(self, role: Role) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.role == role)

    @property
    def clients(self) -> tuple[Node, ...]:
        return self._role("client")

    @property
    def servers(self) -> tuple[Node, ...]:
        return self._role("server")

    @property
    def switches(self) -> tuple[Node, ...]:
        return self._role("switch")

    @property
    def hosts(self) -> tuple[Node, ...]:
        """Every node that is not a switch."""
        return tuple(n for n in self.nodes if n.role != "switch")

    @property
    def firewall(self) -> Node:
        (fw,) = self._role("firewall")
        return fw

    def segment(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(f"no segment {name!r} in topology")

    def iface_of(self, node: str) -> str:
        """The one data interface of a client or server ("eth0")."""
        n = self.node(node)
        if len(n.interfaces) != 1:
            raise ValueError(
                f"node {node!r} has {len(n.interfaces)} interfaces; name the one you mean"
            )
        return n.interfaces[0].name

    def address(self, node: str, family: Family, index: int = 0) -> str:
        """The ``index``-th address of ``family`` on ``node``, without prefix."""
        addrs = self.node(node).addresses(family)
        try:
            return addrs[index]
        except IndexError:
            raise IndexError(
                f"node {node!r} has {len(addrs)} {family} address(es), no index {index}"
            ) from None

    def _fw_iface(self, segment: str) -> Interface:
        for iface in self.firewall.interfaces:
            if iface.segment == segment:
                return iface
        raise KeyError(f"firewall has no interface on segment {segment!r}")

    def _internal_segment(self, facing: str | None) -> str:
        """The internal segment ``facing`` (a client) is on; without it, the only one."""
        if facing is not None:
            segment = self.node(facing).interface(self.iface_of(facing)).segment
            if segment not in self.internal_segments:
                raise ValueError(f"node {facing!r} is not on an internal segment")
            return segment
        if len(self.internal_segments) != 1:
            raise ValueError(f"the topology has {len(self.internal_segments)} internal segments; "
                             "name the node the firewall faces")
        return self.internal_segments[0]

    @property
    def fw_internal_ifaces(self) -> tuple[str, ...]:
        """The firewall's internal interfaces, one per internal segment."""
        return tuple(self._fw_iface(s).name for s in self.internal_segments)

    @property
    def fw_internal_iface(self) -> str:
        """The firewall's one internal interface (ValueError if it has several)."""
        return self._fw_iface(self._internal_segment(None)).name

    def fw_iface_facing(self, node: str) -> str:
        """The firewall's interface on the segment ``node`` is on."""
        return self._fw_iface(self.node(node).interface(self.iface_of(node)).segment).name

    @property
    def fw_external_iface(self) -> str:
        return self._fw_iface(self.external_segment).name

    def fw_internal_address(self, family: Family, facing: str | None = None) -> str:
        """The firewall's first ``family`` address on the internal segment of ``facing``
        (a client), or on the only internal segment."""
        iface = self._fw_iface(self._internal_segment(facing))
        return str(ipaddress.ip_interface(iface.addresses_of(family)[0]).ip)

    def fw_external_addresses(self, family: Family) -> tuple[str, ...]:
        iface = self._fw_iface(self.external_segment)
        return tuple(str(ipaddress.ip_interface(a).ip) for a in iface.addresses_of(family))

    def internal_network(self, family: Family) -> str:
        """The ``family`` network of the only internal segment (ValueError if several)."""
        return self.segment(self._internal_segment(None)).network(family)

    def internal_networks(self, family: Family) -> tuple[str, ...]:
        """The ``family`` networks of every internal segment."""
        return tuple(self.segment(s).network(family) for s in self.internal_segments)

    def external_network(self, family: Family) -> str:
        return self.segment(self.external_segment).network(family)

    def denied_network(self, family: Family) -> str:
        """The network reachable on-link behind the fw's external side that is
        not the external network itself (203.0.113.0/24, 2001:db8:3::/64)."""
        ext = ipaddress.ip_network(self.external_network(family))
        for route in self.firewall.routes:
            if (route.family == family and route.via is None and route.dst != "default"
                    and ipaddress.ip_network(route.dst) != ext):
                return route.dst
        raise KeyError(f"no {family} denied network in topology")

    def links(self) -> tuple[tuple[str, str, str], ...]:
        """(host node, host interface, switch node) for every veth pair."""
        out = []
        for n in self.hosts:
            for iface in n.interfaces:
                out.append((n.name, iface.name, self.segment(iface.segment).switch))
        return tuple(out)

    # -- serialisation (for the ledger) ------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "internal_segments": list(self.internal_segments),
            "external_segment": self.external_segment,
            "segments": [
                {"name": s.name, "switch": s.switch, "bridge": s.bridge,
                 "networks": list(s.networks)}
                for s in self.segments
            ],
            "nodes": [
                {
                    "name": n.name,
                    "role": n.role,
                    "forwarding": n.forwarding,
                    "interfaces": [
                        {"name": i.name, "segment": i.segment, "addresses": list(i.addresses)}
                        for i in n.interfaces
                    ],
                    "routes": [
                        {"family": r.family, "dst": r.dst, "via": r.via, "dev": r.dev}
                        for r in n.routes
                    ],
                }
                for n in self.nodes
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Topology:
        return cls(
            variant=d["variant"],
            internal_segments=tuple(d.get("internal_segments", ("int",))),
            external_segment=d.get("external_segment", "ext"),
            segments=tuple(
                Segment(s["name"], s["switch"], s.get("bridge", "br0"), tuple(s["networks"]))
                for s in d["segments"]
            ),
            nodes=tuple(
                Node(
                    name=n["name"],
                    role=n["role"],
                    forwarding=n.get("forwarding", False),
                    interfaces=tuple(
                        Interface(i["name"], i["segment"], tuple(i["addresses"]))
                        for i in n["interfaces"]
                    ),
                    routes=tuple(
                        Route(r["family"], r["dst"], r.get("via"), r.get("dev"))
                        for r in n["routes"]
                    ),
                )
                for n in d["nodes"]
            ),
        )


def validate(topo: Topology) -> None:
    """Raise ValueError naming the first thing wrong with ``topo``."""
    names = [n.name for n in topo.nodes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate node name(s): {', '.join(dupes)}")
    seg_names = [s.name for s in topo.segments]
    if len(set(seg_names)) != len(seg_names):
        raise ValueError(f"duplicate segment names: {seg_names}")
    by_name = {n.name: n for n in topo.nodes}

    for n in topo.nodes:
        if not n.name or len(n.name) > MAX_NODE_NAME or not n.name.isalnum():
            raise ValueError(
                f"node name {n.name!r} must be 1-{MAX_NODE_NAME} alphanumeric characters"
            )
        if n.role not in ("client", "server", "firewall", "switch"):
            raise ValueError(f"node {n.name!r}: unknown role {n.role!r}")
    if sum(1 for n in topo.nodes if n.role == "firewall") != 1:
        raise ValueError("a topology needs exactly one firewall node")

    for s in topo.segments:
        sw = by_name.get(s.switch)
        if sw is None:
            raise ValueError(f"segment {s.name!r}: switch node {s.switch!r} does not exist")
        if sw.role != "switch":
            raise ValueError(f"segment {s.name!r}: node {s.switch!r} is not a switch")
        for net in s.networks:
            try:
                parsed = ipaddress.ip_network(net)
            except ValueError as e:
                raise ValueError(f"segment {s.name!r}: bad network {net!r}: {e}") from None
            if not _in_documentation_range(parsed):
                raise ValueError(
                    f"segment {s.name!r}: network {net} is outside the documentation ranges"
                )
    sides = (*topo.internal_segments, topo.external_segment)
    if not topo.internal_segments or len(set(sides)) != len(sides):
        raise ValueError(f"internal segments {list(topo.internal_segments)} and external segment "
                         f"{topo.external_segment!r} must be distinct, with one internal at least")
    fw_segments = [i.segment for n in topo.nodes if n.role == "firewall" for i in n.interfaces]
    for seg in sides:
        if seg not in seg_names:
            raise ValueError(f"segment {seg!r} (internal or external) does not exist")
        if fw_segments.count(seg) != 1:
            raise ValueError(f"the firewall needs one interface on segment {seg!r}, "
                             f"not {fw_segments.count(seg)}")

    seen_addrs: dict[str, str] = {}
    for n in topo.nodes:
        if n.role == "switch" and n.interfaces:
            raise ValueError(f"switch {n.name!r} must not have data interfaces")
        if n.role != "switch" and not n.interfaces:
            raise ValueError(f"node {n.name!r} has no interface")
        if_names = [i.name for i in n.interfaces]
        if len(set(if_names)) != len(if_names):
            raise ValueError(f"node {n.name!r}: duplicate interface names {if_names}")
        for iface in n.interfaces:
            port = f"{n.name}-{iface.name}"
            if len(port) > IFNAMSIZ or not iface.name:
                raise ValueError(
                    f"node {n.name!r}: interface name {iface.name!r} too long "
                    f"(switch port {port!r} exceeds {IFNAMSIZ} characters)"
                )
            if iface.segment not in seg_names:
                raise ValueError(
                    f"node {n.name!r} interface {iface.name!r}: segment "
                    f"{iface.segment!r} does not exist"
                )
            for a in iface.addresses:
                try:
                    ifa = ipaddress.ip_interface(a)
                except ValueError as e:
                    raise ValueError(f"node {n.name!r}: bad address {a!r}: {e}") from None
                if "/" not in a:
                    raise ValueError(f"node {n.name!r}: address {a!r} needs a prefix length")
                if not _in_documentation_range(ipaddress.ip_network(ifa.network)):
                    raise ValueError(
                        f"node {n.name!r}: address {a} is outside the documentation ranges "
                        "(192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32)"
                    )
                ip = str(ifa.ip)
                if ip in seen_addrs:
                    raise ValueError(
                        f"address {ip} is on both {seen_addrs[ip]!r} and {n.name!r}"
                    )
                seen_addrs[ip] = n.name
        for r in n.routes:
            if r.family not in FAMILIES:
                raise ValueError(f"node {n.name!r}: route family {r.family!r}")
            if r.dev is not None and r.dev not in if_names:
                raise ValueError(
                    f"node {n.name!r}: route to {r.dst} uses unknown interface {r.dev!r}"
                )
            if r.via is None and r.dev is None:
                raise ValueError(f"node {n.name!r}: route to {r.dst} needs via or dev")
            try:
                dst = ipaddress.ip_network(r.dst_cidr)
            except ValueError as e:
                raise ValueError(f"node {n.name!r}: bad route destination: {e}") from None
            if ("ipv4" if dst.version == 4 else "ipv6") != r.family:
                raise ValueError(f"node {n.name!r}: route {r.dst} is not {r.family}")
            if r.dst != "default" and not _in_documentation_range(dst):
                raise ValueError(
                    f"node {n.name!r}: route destination {r.dst} is outside the "
                    "documentation ranges"
                )
            if r.via is not None:
                try:
                    via = ipaddress.ip_address(r.via)
                except ValueError as e:
                    raise ValueError(f"node {n.name!r}: bad gateway: {e}") from None
                if ("ipv4" if via.version == 4 else "ipv6") != r.family:
                    raise ValueError(f"node {n.name!r}: gateway {r.via} is not {r.family}")
                if not _in_documentation_range(ipaddress.ip_network(via)):
                    raise ValueError(
                        f"node {n.name!r}: gateway {r.via} is outside the documentation ranges"
                    )


# -- the topologies -----------------------------------------------------------

def _host(name: str, role: Role, segment: str, addrs: tuple[str, ...],
          routes: tuple[Route, ...] = ()) -> Node:
    return Node(name, role, (Interface("eth0", segment, addrs),), routes)


@dataclass(frozen=True)
class _Lan:
    """An internal network: its segment, the fw's interface and addresses on it (IPv4,
    IPv6; their networks are the segment's), and its clients with their addresses."""

    segment: str
    fw_iface: str
    fw_addresses: tuple[str, str]
    clients: tuple[tuple[str, tuple[str, str]], ...]

    @property
    def networks(self) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_interface(a).network) for a in self.fw_addresses)

    def client_nodes(self) -> tuple[Node, ...]:
        gateways = [str(ipaddress.ip_interface(a).ip) for a in self.fw_addresses]
        routes = tuple(Route(_family_of(gw), "default", via=gw) for gw in gateways)
        return tuple(_host(name, "client", self.segment, addrs, routes)
                     for name, addrs in self.clients)


# c1 and c2, on the fw's int0; the standard topology's one internal network
_INT0 = _Lan("int", "int0", ("192.0.2.1/24", "2001:db8:1::1/64"),
             (("c1", ("192.0.2.11/24", "2001:db8:1::11/64")),
              ("c2", ("192.0.2.12/24", "2001:db8:1::12/64"))))


def _topology(name: str, lans: tuple[_Lan, ...], *, servers_route_back: bool) -> Topology:
    """The clients of ``lans`` on the fw's internal interfaces, s1 and s2 behind ext0.

    With ``servers_route_back`` the servers route every internal network via the fw's
    first external address; else they have no route to them.
    """
    server_routes: tuple[Route, ...] = ()
    if servers_route_back:
        server_routes = tuple(
            Route(_family_of(net), net, via="198.51.100.1" if _family_of(net) == "ipv4"
                  else "2001:db8:2::1")
            for lan in lans for net in lan.networks)
    fw = Node(
        "fw",
        "firewall",
        interfaces=(
            *(Interface(lan.fw_iface, lan.segment, lan.fw_addresses) for lan in lans),
            Interface(
                "ext0",
                "ext",
                ("198.51.100.1/24", "198.51.100.2/24", "2001:db8:2::1/64", "2001:db8:2::2/64"),
            ),
        ),
        # The "denied" destination net lives on-link behind ext0.
        routes=(
            Route("ipv4", "203.0.113.0/24", dev="ext0"),
            Route("ipv6", "2001:db8:3::/64", dev="ext0"),
        ),
        forwarding=True,
    )
    nodes = (
        *(client for lan in lans for client in lan.client_nodes()),
        fw,
        _host("s1", "server", "ext", ("198.51.100.21/24", "2001:db8:2::21/64"), server_routes),
        # s2's second addresses carry their prefix, which gives it the on-link
        # routes to answer 203.0.113.0/24 and 2001:db8:3::/64 peers.
        _host(
            "s2",
            "server",
            "ext",
            ("198.51.100.22/24", "203.0.113.22/24", "2001:db8:2::22/64", "2001:db8:3::22/64"),
            server_routes,
        ),
        *(Node(f"sw{lan.segment}", "switch") for lan in lans),
        Node("swext", "switch"),
    )
    segments = (
        *(Segment(lan.segment, f"sw{lan.segment}", networks=lan.networks) for lan in lans),
        Segment("ext", "swext", networks=("198.51.100.0/24", "2001:db8:2::/64")),
    )
    return Topology(variant=name, nodes=nodes, segments=segments,
                    internal_segments=tuple(lan.segment for lan in lans))


def standard(variant: str = "routed") -> Topology:
    """The standard dual-stack topology::

        c1, c2 --[swint]-- int0 fw ext0 --[swext]-- s1, s2

    ``variant`` is "routed" (servers route the client networks back via the
    fw's first external address) or "nat" (they have no such route).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    return _topology(variant, (_INT0,), servers_route_back=variant == "routed")


def split() -> Topology:
    """Two internal networks on two fw interfaces (SPEC rule 17), routed::

        c1, c2 --[swint]--  int0 fw ext0 --[swext]-- s1, s2
            c3 --[swint1]-- int1

    192.0.2.0/24 is split in two: c1 and c2 keep their addresses in 192.0.2.0/25
    (and 2001:db8:1::/64) behind int0; c3 is in 192.0.2.128/25 (and 2001:db8:4::/64)
    behind int1. The servers route both networks back via the fw.
    """
    int0 = _Lan("int", "int0", ("192.0.2.1/25", "2001:db8:1::1/64"),
                (("c1", ("192.0.2.11/25", "2001:db8:1::11/64")),
                 ("c2", ("192.0.2.12/25", "2001:db8:1::12/64"))))
    int1 = _Lan("int1", "int1", ("192.0.2.129/25", "2001:db8:4::1/64"),
                (("c3", ("192.0.2.131/25", "2001:db8:4::31/64")),))
    return _topology("split", (int0, int1), servers_route_back=True)


def named(name: str) -> Topology:
    """The topology called ``name``: one of TOPOLOGIES."""
    if name == "split":
        return split()
    if name not in VARIANTS:
        raise ValueError(f"unknown topology {name!r} (choose from {', '.join(TOPOLOGIES)})")
    return standard(name)


def routed() -> Topology:
    """The standard topology, servers routing client networks via the fw."""
    return standard("routed")


def nat() -> Topology:
    """The standard topology, servers without a route to the client networks."""
    return standard("nat")
