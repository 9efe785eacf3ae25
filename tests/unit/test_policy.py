"""enforcer.core.policy: building a Policy from parsed TOML, and first-match rule lookups."""

from __future__ import annotations

import copy
import ipaddress
import uuid
from typing import Any

import pytest

from enforcer.core.packet import TCP, UDP
from enforcer.core.policy import (
    Defaults,
    Policy,
    PolicyInvalid,
    PortRange,
    ProtocolRule,
    Reader,
    SiteRule,
    format_path,
    policy_from_dict,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network

GUID_FTP = "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101"
GUID_WEB = "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2102"
GUID_DNS = "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2104"

DATA: dict[str, Any] = {
    "protocol": [
        {"name": "FTP", "guid": GUID_FTP, "ip_protocol": "tcp", "ports": [21]},
        {"name": "WEB", "guid": GUID_WEB, "ip_protocol": "tcp", "ports": [80, "8000-8080", 443]},
        {"name": "DNS", "guid": GUID_DNS, "ip_protocol": "udp", "ports": [53]},
    ],
    "protocol_rule": [
        {"name": "alice may use WEB", "action": "allow", "protocols": ["WEB"],
         "clients": ["192.0.2.0/24"], "users": ["alice"]},
        {"name": "no WEB for .66", "action": "deny", "protocols": ["WEB"],
         "clients": ["192.0.2.66/32"]},
        {"name": "clients may use everything", "action": "allow",
         "protocols": ["FTP", "WEB", "DNS"], "clients": ["192.0.2.0/24", "2001:db8:1::/64"]},
    ],
    "site_rule": [
        {"name": "one denied host", "action": "deny", "destinations": ["198.51.100.66"]},
        {"name": "the server network", "action": "allow",
         "destinations": ["198.51.100.0/24", "2001:db8:2::/64"]},
        {"name": "too late", "action": "deny", "destinations": ["198.51.100.0/25"]},
    ],
    "defaults": {"permission_timeout": 30, "max_pending_per_session": 8},
}


def data(**changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(DATA)
    out.update(changes)
    return out


@pytest.fixture
def policy() -> Policy:
    return policy_from_dict(DATA)


# --- a valid policy ----------------------------------------------------------------------

def test_protocols(policy: Policy) -> None:
    assert [p.name for p in policy.protocols] == ["FTP", "WEB", "DNS"]
    web = policy.protocols[1]
    assert web.guid == uuid.UUID(GUID_WEB)
    assert web.ip_protocol == TCP
    assert web.ports == (PortRange(80, 80), PortRange(8000, 8080), PortRange(443, 443))
    assert policy.protocols[2].ip_protocol == UDP


def test_rules_and_defaults(policy: Policy) -> None:
    first = policy.protocol_rules[0]
    assert first == ProtocolRule("alice may use WEB", True, frozenset({"WEB"}),
                                 (net("192.0.2.0/24"),), frozenset({"alice"}))
    assert policy.protocol_rules[1].allow is False
    assert policy.protocol_rules[2].users is None
    assert policy.site_rules[0] == SiteRule("one denied host", False, (net("198.51.100.66/32"),))
    assert policy.defaults == Defaults(30.0, 8)
    assert isinstance(policy.defaults.permission_timeout, float)


def test_empty_policy_uses_defaults() -> None:
    p = policy_from_dict({})
    assert p == Policy()
    assert p.defaults == Defaults(60.0, 1024)
    assert p.primary_protocol(TCP, 80) is None
    assert p.protocol_rule("X", ip("192.0.2.1"), None) is None
    assert p.site_rule(ip("198.51.100.1")) is None


def test_host_bits_in_a_network_are_accepted() -> None:
    p = policy_from_dict(data(site_rule=[{"name": "s", "action": "allow",
                                          "destinations": ["198.51.100.7/24"]}]))
    assert p.site_rules[0].destinations.networks == (net("198.51.100.0/24"),)


def test_users_empty_list_admits_no_user() -> None:
    rule = {"name": "r", "action": "allow", "protocols": ["FTP"], "clients": ["0.0.0.0/0"],
            "users": []}
    p = policy_from_dict(data(protocol_rule=[rule]))
    assert p.protocol_rules[0].users == frozenset()
    assert p.protocol_rule("FTP", ip("192.0.2.1"), None) is None
    assert p.protocol_rule("FTP", ip("192.0.2.1"), "alice") is None


# --- lookups --------------------------------------------------------------------------------

def test_primary_protocol(policy: Policy) -> None:
    def name(proto: int, port: int) -> str | None:
        p = policy.primary_protocol(proto, port)
        return None if p is None else p.name

    assert name(TCP, 21) == "FTP"
    assert name(UDP, 21) is None          # the IP protocol matters
    assert name(UDP, 53) == "DNS"
    assert name(TCP, 53) is None
    assert [name(TCP, p) for p in (7999, 8000, 8040, 8080, 8081)] == [None, "WEB", "WEB", "WEB", None]
    assert name(TCP, 443) == "WEB"
    assert name(TCP, 22) is None


def test_protocol_rule_first_match(policy: Policy) -> None:
    c = ip("192.0.2.66")
    # Unauthenticated: the users-only rule does not apply, the deny rule for .66 does.
    rule = policy.protocol_rule("WEB", c, None)
    assert rule is not None and rule.name == "no WEB for .66" and not rule.allow
    # Authenticated as alice: the earlier allow rule wins over the later deny.
    rule = policy.protocol_rule("WEB", c, "alice")
    assert rule is not None and rule.name == "alice may use WEB"
    # Another user is like no user for a users rule.
    rule = policy.protocol_rule("WEB", c, "bob")
    assert rule is not None and rule.name == "no WEB for .66"
    # A client the deny rule does not cover falls through to the broad allow.
    rule = policy.protocol_rule("WEB", ip("192.0.2.65"), None)
    assert rule is not None and rule.name == "clients may use everything"


def test_protocol_rule_users_restriction_not_for_anonymous() -> None:
    rule = ProtocolRule("r", True, frozenset({"FTP"}), (net("0.0.0.0/0"),), frozenset({"alice"}))
    assert rule.applies("FTP", ip("192.0.2.1"), "alice")
    assert not rule.applies("FTP", ip("192.0.2.1"), None)
    assert not rule.applies("FTP", ip("192.0.2.1"), "bob")
    assert not rule.applies("SSH", ip("192.0.2.1"), "alice")


def test_protocol_rule_families_do_not_mix(policy: Policy) -> None:
    rule = policy.protocol_rule("FTP", ip("2001:db8:1::5"), None)
    assert rule is not None and rule.name == "clients may use everything"
    assert policy.protocol_rule("FTP", ip("2001:db8:9::5"), None) is None
    assert policy.protocol_rule("FTP", ip("203.0.113.1"), None) is None
    # ::ffff:192.0.2.1 is an IPv6 address, not a member of 192.0.2.0/24.
    assert policy.protocol_rule("FTP", ip("::ffff:192.0.2.1"), None) is None


def test_protocol_rule_unknown_protocol_name(policy: Policy) -> None:
    assert policy.protocol_rule("SSH", ip("192.0.2.1"), None) is None


def test_site_rule_first_match(policy: Policy) -> None:
    def name(addr: str) -> str | None:
        r = policy.site_rule(ip(addr))
        return None if r is None else r.name

    assert name("198.51.100.66") == "one denied host"
    assert name("198.51.100.1") == "the server network"   # not "too late", which comes after
    assert name("2001:db8:2::9") == "the server network"
    assert name("203.0.113.1") is None


# --- PortRange ------------------------------------------------------------------------------

def test_port_range_containment() -> None:
    r = PortRange(1024, 2047)
    assert 1024 in r and 2047 in r and 1500 in r
    assert 1023 not in r and 2048 not in r
    assert "1500" not in r
    assert 1500.0 not in r
    assert None not in r
    one = PortRange(80, 80)
    assert 80 in one and 81 not in one and 79 not in one


def test_port_range_str() -> None:
    assert str(PortRange(80, 80)) == "80"
    assert str(PortRange(1024, 2047)) == "1024-2047"


# --- validation ---------------------------------------------------------------------------

def proto(**changes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": "X", "guid": GUID_FTP, "ip_protocol": "tcp", "ports": [21]}
    out.update(changes)
    return out



def invalid(d: dict[str, Any]) -> PolicyInvalid:
    with pytest.raises(PolicyInvalid) as info:
        policy_from_dict(d)
    return info.value


@pytest.mark.parametrize(("ports", "index", "reason"), [
    ([0], 0, "outside 1-65535"),
    ([65536], 0, "outside 1-65535"),
    ([-1], 0, "outside 1-65535"),
    ([21, "0-10"], 1, "outside 1-65535"),
    (["100-10"], 0, "outside 1-65535"),
    (["1-65536"], 0, "outside 1-65535"),
    (["a-b"], 0, "not a port range"),
    (["10-"], 0, "not a port range"),
    (["80"], 0, "expected a port or a range"),
    ([True], 0, "expected a port or a range"),
    ([21.0], 0, "expected a port or a range"),
])
def test_bad_ports(ports: list[Any], index: int, reason: str) -> None:
    exc = invalid({"protocol": [proto(ports=ports)]})
    assert exc.path == ("protocol", 0, "ports", index)
    assert reason in exc.reason


def test_ports_must_be_a_non_empty_array() -> None:
    assert invalid({"protocol": [proto(ports=[])]}).path == ("protocol", 0, "ports")
    exc = invalid({"protocol": [proto(ports=True)]})
    assert exc.path == ("protocol", 0, "ports")
    assert "expected an array, got bool" in exc.reason
    exc = invalid({"protocol": [proto(ports=21)]})
    assert "expected an array, got int" in exc.reason


def test_port_range_edges_accepted() -> None:
    p = policy_from_dict({"protocol": [proto(ports=[1, 65535, "1-65535"])]})
    assert p.protocols[0].ports == (PortRange(1, 1), PortRange(65535, 65535), PortRange(1, 65535))


@pytest.mark.parametrize(("d", "path", "reason"), [
    ({"colour": 1}, ("colour",), "unknown key"),
    ({"protocol": [proto(), proto(name="Y", extra=1)]}, ("protocol", 1, "extra"), "unknown key"),
    ({"protocol": [proto(guid="not-a-guid")]}, ("protocol", 0, "guid"), "not a GUID"),
    pytest.param({"protocol": [proto(guid=5)]}, ("protocol", 0, "guid"), "expected a string"),
    pytest.param({"protocol": [{"name": "X", "ip_protocol": "tcp", "ports": [1]}]}, ("protocol", 0),
                 "missing required key 'guid'"),
    ({"protocol": [proto(guid="5c3c2a3e-8f1b-4c1e-9a57")]}, ("protocol", 0, "guid"), "not a GUID"),
    ({"protocol": [proto(ip_protocol="icmp")]}, ("protocol", 0, "ip_protocol"), "'tcp' or 'udp'"),
    ({"protocol": [proto(), proto()]}, ("protocol", 1, "name"), "defined twice"),
    ({"protocol": [proto(name=" ")]}, ("protocol", 0, "name"), "a protocol needs a name"),
    ({"protocol": [proto(), proto(name="Y", ports=[80])]}, ("protocol", 1, "guid"),
     "is protocol 'X''s GUID too"),
    ({"protocol": [proto(ports=["20-21"]), proto(name="Y", guid=GUID_WEB, ports=[80, "21-25"])]},
     ("protocol", 1, "ports"), "21-25 overlaps protocol 'X''s primary ports"),
    ({"protocol": [proto(name=None)]}, ("protocol", 0, "name"), "expected a string"),
    ({"protocol": [{"guid": GUID_FTP, "ip_protocol": "tcp", "ports": [1]}]}, ("protocol", 0),
     "missing required key 'name'"),
    ({"protocol": [1]}, ("protocol", 0), "expected a table"),
    ({"protocol": {"name": "X"}}, ("protocol",), "expected an array"),
    ({"protocol": [proto()], "protocol_rule": [
        {"name": "r", "action": "allow", "protocols": ["X", "NOPE"], "clients": []}]},
     ("protocol_rule", 0, "protocols", 1), "no protocol named 'NOPE'"),
    ({"protocol_rule": [{"name": "r", "action": "maybe", "protocols": [], "clients": []}]},
     ("protocol_rule", 0, "action"), "'allow' or 'deny'"),
    ({"protocol_rule": [{"name": "r", "action": "allow", "protocols": [],
                         "clients": ["192.0.2.0/33"]}]},
     ("protocol_rule", 0, "clients", 0), "not an IP address or network"),
    ({"protocol_rule": [{"name": "r", "action": "allow", "protocols": [], "clients": [],
                         "users": ["a", 1]}]},
     ("protocol_rule", 0, "users", 1), "expected a string, got int"),
    ({"site_rule": [{"name": "s", "action": "allow", "destinations": ["example.com"]}]},
     ("site_rule", 0, "destinations", 0), "not an IP address or network"),
    ({"site_rule": [{"name": "s", "action": "allow", "destinations": "198.51.100.0/24"}]},
     ("site_rule", 0, "destinations"), "expected an array"),
    ({"defaults": {"permission_timeout": -1}}, ("defaults", "permission_timeout"), "positive"),
    ({"defaults": {"permission_timeout": 0}}, ("defaults", "permission_timeout"), "positive"),
    ({"defaults": {"permission_timeout": True}}, ("defaults", "permission_timeout"),
     "got bool"),
    ({"defaults": {"max_pending_per_session": 0}}, ("defaults", "max_pending_per_session"),
     "from 1 to"),
    ({"defaults": {"max_pending_per_session": 1.5}}, ("defaults", "max_pending_per_session"),
     "expected an integer"),
    ({"defaults": {"max_pending_per_session": True}}, ("defaults", "max_pending_per_session"),
     "expected an integer, got bool"),
    ({"defaults": {"nope": 1}}, ("defaults", "nope"), "unknown key"),
])
def test_invalid(d: dict[str, Any], path: tuple[str | int, ...], reason: str) -> None:
    exc = invalid(d)
    assert exc.path == path
    assert reason in exc.reason
    assert str(exc) == f"{format_path(path)}: {exc.reason}"


def test_extra_sections_are_allowed_only_when_named() -> None:
    invalid({"network": {}})
    policy_from_dict({"network": {}}, extra_sections=("network",))


def test_format_path() -> None:
    assert format_path(("protocol", 2, "ports", 0)) == "protocol[2].ports[0]"
    assert format_path(("defaults", "permission_timeout")) == "defaults.permission_timeout"
    assert format_path(()) == ""
    assert str(PolicyInvalid((), "whole file")) == "whole file"


def test_reader_get_refuses_bool_for_int_but_not_for_bool() -> None:
    r = Reader({"port": True, "flag": False, "n": 3}, ("t",))
    with pytest.raises(PolicyInvalid, match=r"t\.port: expected an integer, got bool"):
        r.get("port", int)
    assert r.get("flag", bool) is False
    assert r.get("n", int) == 3
    assert r.get("absent", int, 7) == 7
    with pytest.raises(PolicyInvalid, match="missing required key 'absent'"):
        r.get("absent", int)


def test_a_port_may_be_one_protocol_s_over_tcp_and_another_s_over_udp() -> None:
    policy = policy_from_dict({"protocol": [proto(name="A", ports=[53]),
                                            proto(name="B", guid=GUID_WEB, ip_protocol="udp",
                                                  ports=[53])]})
    assert [p.name for p in policy.protocols] == ["A", "B"]
