"""The topology value: queries, both variants, validation. No root needed."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from testbed.topology import (
    TOPOLOGIES,
    Interface,
    Node,
    Route,
    Segment,
    Topology,
    named,
    nat,
    routed,
    split,
    standard,
)

DOC = [ipaddress.ip_network(n) for n in
       ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]


@pytest.fixture(params=["routed", "nat"])
def topo(request: pytest.FixtureRequest) -> Topology:
    return standard(request.param)


def test_nodes_and_roles(topo: Topology) -> None:
    assert [n.name for n in topo.clients] == ["c1", "c2"]
    assert [n.name for n in topo.servers] == ["s1", "s2"]
    assert topo.firewall.name == "fw"
    assert [n.name for n in topo.switches] == ["swint", "swext"]
    assert topo.node("c1").role == "client"
    assert topo.firewall.forwarding
    assert not topo.node("c1").forwarding


def test_addresses(topo: Topology) -> None:
    assert topo.address("c1", "ipv4") == "192.0.2.11"
    assert topo.address("c1", "ipv6") == "2001:db8:1::11"
    assert topo.address("c2", "ipv4") == "192.0.2.12"
    assert topo.address("c2", "ipv6") == "2001:db8:1::12"
    assert topo.address("s1", "ipv4") == "198.51.100.21"
    assert topo.address("s1", "ipv6") == "2001:db8:2::21"
    assert topo.address("s2", "ipv4") == "198.51.100.22"
    assert topo.address("s2", "ipv4", 1) == "203.0.113.22"
    assert topo.address("s2", "ipv6", 1) == "2001:db8:3::22"
    with pytest.raises(IndexError, match="no index 1"):
        topo.address("s1", "ipv4", 1)


def test_firewall(topo: Topology) -> None:
    assert topo.fw_internal_address("ipv4") == "192.0.2.1"
    assert topo.fw_internal_address("ipv6") == "2001:db8:1::1"
    assert topo.fw_external_addresses("ipv4") == ("198.51.100.1", "198.51.100.2")
    assert topo.fw_external_addresses("ipv6") == ("2001:db8:2::1", "2001:db8:2::2")
    assert topo.fw_internal_iface == "int0"
    assert topo.fw_external_iface == "ext0"
    # Exactly one internal and one external interface: multihomed on ext0.
    assert [i.name for i in topo.firewall.interfaces] == ["int0", "ext0"]
    onlink = {(r.family, r.dst) for r in topo.firewall.routes if r.via is None}
    assert onlink == {("ipv4", "203.0.113.0/24"), ("ipv6", "2001:db8:3::/64")}
    assert all(r.dev == "ext0" for r in topo.firewall.routes)
    assert topo.denied_network("ipv4") == "203.0.113.0/24"
    assert topo.denied_network("ipv6") == "2001:db8:3::/64"


def test_networks_and_ifaces(topo: Topology) -> None:
    assert topo.internal_network("ipv4") == "192.0.2.0/24"
    assert topo.internal_network("ipv6") == "2001:db8:1::/64"
    assert topo.external_network("ipv4") == "198.51.100.0/24"
    assert topo.external_network("ipv6") == "2001:db8:2::/64"
    for name in ("c1", "c2", "s1", "s2"):
        assert topo.iface_of(name) == "eth0"
    with pytest.raises(ValueError, match="2 interfaces"):
        topo.iface_of("fw")


def test_every_address_in_documentation_ranges(topo: Topology) -> None:
    for n in topo.nodes:
        for iface in n.interfaces:
            for a in iface.addresses:
                net = ipaddress.ip_interface(a).network
                assert any(net.version == d.version and net.subnet_of(d)  # type: ignore[arg-type]
                           for d in DOC), a


def test_links(topo: Topology) -> None:
    assert set(topo.links()) == {
        ("c1", "eth0", "swint"), ("c2", "eth0", "swint"), ("fw", "int0", "swint"),
        ("fw", "ext0", "swext"), ("s1", "eth0", "swext"), ("s2", "eth0", "swext"),
    }


def test_client_default_routes(topo: Topology) -> None:
    for c in topo.clients:
        assert {(r.family, r.dst, r.via) for r in c.routes} == {
            ("ipv4", "default", "192.0.2.1"), ("ipv6", "default", "2001:db8:1::1")}


def test_routed_servers_route_back_via_fw() -> None:
    t = routed()
    assert t.variant == "routed"
    for s in t.servers:
        assert {(r.family, r.dst, r.via) for r in s.routes} == {
            ("ipv4", "192.0.2.0/24", "198.51.100.1"),
            ("ipv6", "2001:db8:1::/64", "2001:db8:2::1")}


def test_nat_servers_have_no_route_to_clients() -> None:
    t = nat()
    assert t.variant == "nat"
    for s in t.servers:
        assert s.routes == ()


def test_value_is_frozen_and_equal() -> None:
    assert routed() == standard("routed")
    assert routed() != nat()
    with pytest.raises(dataclasses.FrozenInstanceError):
        routed().variant = "nat"  # type: ignore[misc]
    hash(routed())


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_round_trip_through_dict(name: str) -> None:
    topo = named(name)
    assert topo.variant == name
    assert Topology.from_dict(topo.to_dict()) == topo


def test_unknown_variant() -> None:
    with pytest.raises(ValueError, match="unknown variant 'bridged'"):
        standard("bridged")
    with pytest.raises(ValueError, match="unknown variant 'split'"):
        standard("split")
    with pytest.raises(ValueError, match=r"unknown topology 'bridged' \(choose from routed, nat, split\)"):
        named("bridged")


# -- split: two internal networks on two fw interfaces (SPEC rule 17) ------------

def test_split_has_two_internal_networks_on_two_fw_interfaces() -> None:
    t = split()
    assert [n.name for n in t.clients] == ["c1", "c2", "c3"]
    assert [n.name for n in t.switches] == ["swint", "swint1", "swext"]
    assert t.internal_segments == ("int", "int1")
    assert t.fw_internal_ifaces == ("int0", "int1")
    assert [i.name for i in t.firewall.interfaces] == ["int0", "int1", "ext0"]
    assert t.internal_networks("ipv4") == ("192.0.2.0/25", "192.0.2.128/25")
    assert t.internal_networks("ipv6") == ("2001:db8:1::/64", "2001:db8:4::/64")
    assert set(t.links()) == {
        ("c1", "eth0", "swint"), ("c2", "eth0", "swint"), ("fw", "int0", "swint"),
        ("c3", "eth0", "swint1"), ("fw", "int1", "swint1"),
        ("fw", "ext0", "swext"), ("s1", "eth0", "swext"), ("s2", "eth0", "swext")}


def test_split_clients_keep_their_addresses_and_face_their_own_interface() -> None:
    t, std = split(), routed()
    for fam in ("ipv4", "ipv6"):
        for c in ("c1", "c2"):
            assert t.address(c, fam) == std.address(c, fam)
            assert t.fw_internal_address(fam, facing=c) == std.fw_internal_address(fam)
    assert (t.address("c3", "ipv4"), t.address("c3", "ipv6")) == ("192.0.2.131", "2001:db8:4::31")
    assert t.fw_internal_address("ipv4", facing="c3") == "192.0.2.129"
    assert t.fw_internal_address("ipv6", facing="c3") == "2001:db8:4::1"
    assert [t.fw_iface_facing(n) for n in ("c1", "c2", "c3", "s1")] == ["int0", "int0", "int1", "ext0"]
    assert {(r.family, r.dst, r.via) for r in t.node("c3").routes} == {
        ("ipv4", "default", "192.0.2.129"), ("ipv6", "default", "2001:db8:4::1")}
    for c in ("c1", "c2", "c3"):  # each client is on-link with its own gateway only
        for fam in ("ipv4", "ipv6"):
            gw = ipaddress.ip_address(t.fw_internal_address(fam, facing=c))
            (mine,) = t.node(c).interfaces[0].addresses_of(fam)
            assert gw in ipaddress.ip_interface(mine).network
    # the external side is the standard one
    assert t.fw_external_addresses("ipv4") == std.fw_external_addresses("ipv4")
    assert t.denied_network("ipv6") == std.denied_network("ipv6")


def test_split_servers_route_both_internal_networks_back_via_fw() -> None:
    for s in split().servers:
        assert {(r.family, r.dst, r.via) for r in s.routes} == {
            ("ipv4", "192.0.2.0/25", "198.51.100.1"), ("ipv4", "192.0.2.128/25", "198.51.100.1"),
            ("ipv6", "2001:db8:1::/64", "2001:db8:2::1"), ("ipv6", "2001:db8:4::/64", "2001:db8:2::1")}


def test_one_internal_interface_queries_ask_which_with_two() -> None:
    t = split()
    with pytest.raises(ValueError, match="2 internal segments; name the node"):
        t.fw_internal_address("ipv4")
    with pytest.raises(ValueError, match="2 internal segments"):
        _ = t.fw_internal_iface
    with pytest.raises(ValueError, match="2 internal segments"):
        t.internal_network("ipv4")
    with pytest.raises(ValueError, match="'s1' is not on an internal segment"):
        t.fw_internal_address("ipv4", facing="s1")


def test_unknown_node_query() -> None:
    with pytest.raises(KeyError, match="no node 'c9'"):
        routed().node("c9")


# -- validation ---------------------------------------------------------------

def _replace_node(t: Topology, name: str, **changes: object) -> Topology:
    nodes = tuple(dataclasses.replace(n, **changes) if n.name == name else n  # type: ignore[arg-type]
                  for n in t.nodes)
    return Topology(variant=t.variant, nodes=nodes, segments=t.segments,
                    internal_segments=t.internal_segments)


def test_rejects_address_outside_documentation_ranges() -> None:
    with pytest.raises(ValueError, match=r"10\.0\.0\.5/24 is outside the documentation ranges"):
        _replace_node(routed(), "c1",
                      interfaces=(Interface("eth0", "int", ("10.0.0.5/24",)),))


def test_rejects_ipv6_outside_documentation_range() -> None:
    with pytest.raises(ValueError, match="outside the documentation ranges"):
        _replace_node(routed(), "c1",
                      interfaces=(Interface("eth0", "int", ("fd00::5/64",)),))


def test_rejects_unknown_segment() -> None:
    with pytest.raises(ValueError, match="segment 'dmz' does not exist"):
        _replace_node(routed(), "c1",
                      interfaces=(Interface("eth0", "dmz", ("192.0.2.11/24",)),))


def test_rejects_missing_switch_node() -> None:
    t = routed()
    with pytest.raises(ValueError, match="switch node 'swdmz' does not exist"):
        Topology(variant="routed", nodes=t.nodes,
                 segments=(*t.segments, Segment("dmz", "swdmz")))


def test_rejects_duplicate_address() -> None:
    with pytest.raises(ValueError, match=r"address 192\.0\.2\.11 is on both"):
        _replace_node(routed(), "c2",
                      interfaces=(Interface("eth0", "int", ("192.0.2.11/24",)),))


def test_rejects_duplicate_node() -> None:
    t = routed()
    with pytest.raises(ValueError, match="duplicate node name"):
        Topology(variant="routed", nodes=(*t.nodes, t.node("c1")), segments=t.segments)


def test_rejects_route_via_unknown_device() -> None:
    with pytest.raises(ValueError, match="unknown interface 'eth9'"):
        _replace_node(routed(), "fw", routes=(Route("ipv4", "203.0.113.0/24", dev="eth9"),))


def test_rejects_gateway_outside_documentation_range() -> None:
    with pytest.raises(ValueError, match=r"gateway 10\.0\.0\.1"):
        _replace_node(routed(), "c1", routes=(Route("ipv4", "default", via="10.0.0.1"),))


def test_rejects_mixed_family_route() -> None:
    with pytest.raises(ValueError, match="is not ipv4"):
        _replace_node(routed(), "c1", routes=(Route("ipv4", "default", via="2001:db8:1::1"),))


def test_rejects_long_node_name() -> None:
    t = routed()
    with pytest.raises(ValueError, match="alphanumeric"):
        Topology(variant="x", nodes=(*t.nodes, Node("client77", "client",
                 (Interface("eth0", "int", ("192.0.2.77/24",)),))), segments=t.segments)


def test_rejects_address_without_prefix() -> None:
    with pytest.raises(ValueError, match="needs a prefix length"):
        _replace_node(routed(), "c1", interfaces=(Interface("eth0", "int", ("192.0.2.11",)),))


def test_rejects_an_internal_segment_without_a_fw_interface() -> None:
    t = split()
    fw = dataclasses.replace(t.firewall, interfaces=tuple(
        i for i in t.firewall.interfaces if i.name != "int1"))
    with pytest.raises(ValueError, match="firewall needs one interface on segment 'int1', not 0"):
        _replace_node(t, "fw", interfaces=fw.interfaces)


def test_rejects_internal_segments_that_are_not_distinct_from_the_external_one() -> None:
    t = routed()
    with pytest.raises(ValueError, match="must be distinct"):
        Topology(variant="x", nodes=t.nodes, segments=t.segments, internal_segments=("int", "ext"))
    with pytest.raises(ValueError, match="one internal at least"):
        Topology(variant="x", nodes=t.nodes, segments=t.segments, internal_segments=())
    with pytest.raises(ValueError, match=r"segment 'dmz' .* does not exist"):
        Topology(variant="x", nodes=t.nodes, segments=t.segments, internal_segments=("dmz",))


def test_rejects_two_firewalls() -> None:
    t = routed()
    fw2 = dataclasses.replace(t.firewall, name="fw2", interfaces=(
        Interface("int0", "int", ("192.0.2.2/24",)),))
    with pytest.raises(ValueError, match="exactly one firewall"):
        Topology(variant="x", nodes=(*t.nodes, fw2), segments=t.segments)
