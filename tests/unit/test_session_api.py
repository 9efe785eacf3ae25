"""The session API's request handling, without a socket: parameters, filters and events."""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

import pytest

from enforcer.api import SessionApi
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags, flag_names, parse_flags
from enforcer.core.packet import FlowKey, Ingress, PacketMeta
from enforcer.core.policy import Defaults, Policy, PortRange, ProtocolDef, ProtocolRule, SiteRule
from enforcer.core.results import InvalidArgument

FTP = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101")
CLIENT = ipaddress.ip_address("192.0.2.11")
SERVER = ipaddress.ip_address("198.51.100.21")


class FakeCaller:
    def __init__(self) -> None:
        self.pushed: list[dict[str, Any]] = []

    def push(self, message: dict[str, Any]) -> None:
        self.pushed.append(message)


@pytest.fixture
def api() -> SessionApi:
    policy = Policy(
        protocols=(ProtocolDef("FTP", FTP, 6, (PortRange(21, 21),)),),
        protocol_rules=(ProtocolRule("ftp", True, frozenset({"FTP"}),
                                     (ipaddress.ip_network("192.0.2.0/24"),), None),),
        site_rules=(SiteRule("out", True, (ipaddress.ip_network("198.51.100.0/24"),)),),
        defaults=Defaults(permission_timeout=5, max_pending_per_session=4))
    engine = Engine(policy, [ipaddress.ip_network("192.0.2.0/24")],
                    [ipaddress.ip_address("198.51.100.1"), ipaddress.ip_address("198.51.100.2")],
                    nat=True)
    clock = iter(float(t) for t in range(10**6))
    the_api = SessionApi(engine, lambda: next(clock))
    engine.decide(PacketMeta(FlowKey(6, CLIENT, 40000, SERVER, 21), Ingress.INTERNAL, 0x02), 0.0)
    return the_api


def afc(api: SessionApi, caller: Any = None, **params: Any) -> dict[str, Any]:
    request = {"session": 1, "address": str(SERVER), "port": 20021, "protocol_guid": str(FTP)}
    request.update(params)
    return api.allow_future_connect(request, caller or FakeCaller())


def test_flags_parse_from_names_or_bits_and_reject_the_unknown() -> None:
    assert parse_flags(["TIMEOUT", "BIDIRECTIONAL"]) == Flags.TIMEOUT | Flags.BIDIRECTIONAL
    assert parse_flags(0x06) == Flags.ALLOW_MULTIPLE | Flags.TIMEOUT
    assert flag_names(Flags.TIMEOUT | Flags.ADDRESS_BASED) == ["ADDRESS_BASED", "TIMEOUT"]
    for bad, message in ((0x40, "unknown flag bits 0x40"), (-1, "negative"), (True, "integer"),
                         (["timeout"], "unknown flag 'timeout'"), (["TIMEOUT"] * 7, "too many")):
        with pytest.raises(InvalidArgument, match=message):
            parse_flags(bad)  # type: ignore[arg-type]


def test_a_grant_returns_the_action(api: SessionApi) -> None:
    result = afc(api, flags=["TIMEOUT"], protocol="tcp")
    assert result["state"] == "pending" and result["flags"] == ["TIMEOUT"]
    assert result["expires"] is not None and result["protocol"] == "FTP"
    assert api.actions({"session": 1}, FakeCaller())[0]["action"] == result["action"]


@pytest.mark.parametrize(("params", "message"), [
    ({"session": "1"}, "'session' must be an integer"),
    ({"session": None}, "'session' is required"),
    ({"session": 77}, "no session 77"),
    ({"port": True}, "'port' must be an integer, not bool"),
    ({"protocol": True}, "'protocol' must be"),
    ({"protocol_guid": 5}, "'protocol_guid' must be a string"),
    ({"flags": {"TIMEOUT": 1}}, "'flags' must be an integer or a list"),
    ({"context": "x" * 5000}, "'context' is larger than"),
    ({"proxy_external_address": "198.51.100.9"}, "not one of the firewall's external addresses"),
    ({"address": "224.0.0.1"}, "not a unicast host address"),
])
def test_bad_parameters_are_invalid_arguments_that_name_the_problem(
        api: SessionApi, params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        afc(api, **params)
    assert api.actions({}, FakeCaller()) == []


def test_events_go_to_the_filter_named_in_the_grant_only(api: SessionApi) -> None:
    mine, other = FakeCaller(), FakeCaller()
    my_filter = api.register_filter({"name": "mine"}, mine)["filter"]  # type: ignore[arg-type]
    api.register_filter({"name": "other"}, other)  # type: ignore[arg-type]
    afc(api, filter=my_filter, context={"k": 1}, flags=["ALLOW_MULTIPLE"])
    for sport in (41000, 41001):
        api.engine.decide(PacketMeta(FlowKey(6, CLIENT, sport, SERVER, 20021), Ingress.INTERNAL, 0x02),
                          1.0)
        api.dispatch_events()
    assert [e["client"] for e in mine.pushed] == [[str(CLIENT), 41000], [str(CLIENT), 41001]]
    assert all(e["context"] == {"k": 1} and e["external"] == "198.51.100.1" for e in mine.pushed)
    assert other.pushed == []


def test_a_filter_goes_away_with_its_connection(api: SessionApi) -> None:
    caller = FakeCaller()
    fid = api.register_filter({"name": "brief"}, caller)["filter"]  # type: ignore[arg-type]
    api.disconnected(caller)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=f"no filter {fid}"):
        afc(api, filter=fid)
