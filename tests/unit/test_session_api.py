"""The session API's request handling, without a socket: parameters, filters and events."""

from __future__ import annotations

import ipaddress
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from enforcer.api import LISTED, MAX_FILTERS_PER_CONNECTION, SessionApi
from enforcer.control import MAX_UNSENT, Caller, ControlServer
from enforcer.core.effects import AddRedirect, Effect, GrowReceiveBuffer
from enforcer.core.engine import Engine
from enforcer.core.events import MAX_CONNECT_REGISTRATIONS
from enforcer.core.flags import Flags, flag_names, parse_flags
from enforcer.core.packet import FlowKey, Ingress, PacketMeta
from enforcer.core.policy import (
    Defaults,
    NetworkSet,
    Policy,
    PortRange,
    ProtocolDef,
    ProtocolRule,
    SiteRule,
)
from enforcer.core.results import InvalidArgument, IsBusy, NotFound, Terminating
from enforcer.filters import InProcessCalls
from enforcer.loop import Loop
from enforcer.protocol import MAX_LISTED, encode

FTP = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101")
CLIENT = ipaddress.ip_address("192.0.2.11")
SERVER = ipaddress.ip_address("198.51.100.21")


class FakeCaller(Caller):
    """A control connection without a socket: what is pushed to it is kept."""

    def __init__(self) -> None:  # no server, no socket
        self.pushed: list[dict[str, Any]] = []

    def push(self, message: dict[str, Any]) -> None:
        self.pushed.append(message)


def build_api(apply: Callable[[list[Effect]], None] | None = None,
              clock: Callable[[], float] | None = None) -> SessionApi:
    policy = Policy(
        protocols=(ProtocolDef("FTP", FTP, 6, (PortRange(21, 21),)),),
        protocol_rules=(ProtocolRule("ftp", True, frozenset({"FTP"}),
                                     NetworkSet((ipaddress.ip_network("192.0.2.0/24"),)), None),),
        site_rules=(SiteRule("out", True, NetworkSet((ipaddress.ip_network("198.51.100.0/24"),))),),
        defaults=Defaults(permission_timeout=5, max_pending_per_session=4))
    engine = Engine(policy, {"int0": [ipaddress.ip_network("192.0.2.0/24")]},
                    [ipaddress.ip_address("198.51.100.1"), ipaddress.ip_address("198.51.100.2")],
                    nat=True, internal_addresses=[ipaddress.ip_interface("192.0.2.1/24")])
    if clock is None:
        ticks = iter(float(t) for t in range(10**6))
        clock = lambda: next(ticks)  # noqa: E731
    the_api = SessionApi(engine, clock, apply)
    engine.decide(PacketMeta(FlowKey(6, CLIENT, 40000, SERVER, 21), Ingress.INTERNAL, 0x02), 0.0)
    return the_api


@pytest.fixture
def api() -> SessionApi:
    return build_api()


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
            parse_flags(bad)


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_a_grant_returns_the_action(api: SessionApi, protocol: str) -> None:
    """The action says what it admits: the IP protocol and the target, and on whose behalf."""
    result = afc(api, flags=["TIMEOUT"], protocol=protocol)
    assert result["state"] == "pending" and result["flags"] == ["TIMEOUT"]
    assert result["expires"] is not None and result["protocol_name"] == "FTP"
    assert result["protocol"] == protocol and result["target"] == [str(SERVER), 20021]
    assert api.actions({"session": 1}, FakeCaller()) == [result]


@pytest.mark.parametrize(("params", "message"), [
    ({"session": "1"}, "'session' must be an integer"),
    ({"session": None}, "'session' is required"),
    ({"session": 77}, "no session 77"),
    ({"port": True}, "'port' must be an integer, not bool"),
    ({"protocol": True}, "'protocol' must be"),
    # not hashable: a membership test in a dict raised TypeError, an internal error
    ({"protocol": ["tcp"]}, "'protocol' must be"),
    ({"protocol": {"tcp": 6}}, "'protocol' must be"),
    ({"protocol": 6.0}, "'protocol' must be"),  # equal to 6, and not an integer
    ({"protocol_guid": 5}, "'protocol_guid' must be a string"),
    ({"flags": {"TIMEOUT": 1}}, "'flags' must be an integer or a list"),
    ({"context": "x" * 5000}, "'context' is larger than"),
    ({"proxy_external_address": "198.51.100.9"}, "not one of the firewall's external addresses"),
    ({"address": "224.0.0.1"}, "not a unicast host address"),
    ({"address": "198.51.100.2"}, "target 198.51.100.2 is the firewall's own address"),
    ({"address": "192.0.2.1", "port": 22}, "target 192.0.2.1 is the firewall's own address"),
])
def test_bad_parameters_are_invalid_arguments_that_name_the_problem(
        api: SessionApi, params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        afc(api, **params)
    assert api.actions({}, FakeCaller()) == []


def test_events_go_to_the_filter_named_in_the_grant_only(api: SessionApi) -> None:
    mine, other = FakeCaller(), FakeCaller()
    my_filter = api.register_filter({"name": "mine"}, mine)["filter"]
    other_filter = api.register_filter({"name": "other"}, other)["filter"]
    # a grant names a filter of its caller's connection, never another's (rule 12)
    with pytest.raises(InvalidArgument, match=f"no filter {other_filter} is registered on this connection"):
        afc(api, mine, filter=other_filter, context={"k": 1})
    with pytest.raises(InvalidArgument, match=f"no filter {my_filter} is registered on this connection"):
        rdc(api, other, filter=my_filter)
    afc(api, mine, filter=my_filter, context={"k": 1}, flags=["ALLOW_MULTIPLE"])
    for sport in (41000, 41001):
        api.engine.decide(PacketMeta(FlowKey(6, CLIENT, sport, SERVER, 20021), Ingress.INTERNAL, 0x02),
                          1.0)
        api.settle()
    assert [e["client"] for e in mine.pushed] == [[str(CLIENT), 41000], [str(CLIENT), 41001]]
    assert all(e["context"] == {"k": 1} and e["external"] == "198.51.100.1" for e in mine.pushed)
    assert other.pushed == []


class EncodingCaller(FakeCaller):
    """A filter's connection that sends what it is pushed, as the control socket does."""

    def push(self, message: dict[str, Any]) -> None:
        self.pushed.append(json.loads(encode(message)))


def test_a_context_nested_too_deeply_to_send_is_refused(api: SessionApi) -> None:
    # JSON nested 980 deep reads and is small, and its event could not be encoded in the
    # deeper stack of the packet path: RecursionError there, after the packet's verdict.
    caller = EncodingCaller()
    fid = api.register_filter({"name": "deep"}, caller)["filter"]
    deep: list[Any] = []
    for _ in range(979):
        deep = [deep]
    with pytest.raises(InvalidArgument, match="'context' is nested more than 32 deep"):
        afc(api, caller, filter=fid, context=deep)
    assert api.actions({}, FakeCaller()) == []
    fine = json.loads("[" * 31 + '{"n": 1}' + "]" * 31)  # 32 levels
    afc(api, caller, filter=fid, context=fine)
    api.engine.decide(PacketMeta(FlowKey(6, CLIENT, 41000, SERVER, 20021), Ingress.INTERNAL, 0x02), 1.0)
    api.settle()
    assert [e["context"] for e in caller.pushed] == [fine]


def test_a_filter_goes_away_with_its_connection(api: SessionApi) -> None:
    caller = FakeCaller()
    fid = api.register_filter({"name": "brief"}, caller)["filter"]
    api.disconnected(caller)
    with pytest.raises(InvalidArgument, match=f"no filter {fid}"):
        afc(api, caller, filter=fid)


# --- RedirectConnections ------------------------------------------------------------------------

OTHER = "198.51.100.22"
TARGETS = [[str(SERVER), 2121], [OTHER, 2122]]


class ApplyHook:
    """The shell's ``apply``: records the effects of each call, and raises when told to."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[list[Effect]] = []
        self.error = error

    def __call__(self, effects: list[Effect]) -> None:
        self.calls.append(list(effects))
        if self.error is not None:
            raise self.error


def test_what_a_control_connection_registers_is_capped(api: SessionApi) -> None:
    """Filters a connection registers, and the port ranges a filter asks connect events
    for (each admitted flow looks at all of them), stop at their caps, refused as
    FWX_E_IS_BUSY; another connection has room of its own."""
    caller = FakeCaller()
    filters = [api.register_filter({"name": f"f{i}"}, caller)["filter"]
               for i in range(MAX_FILTERS_PER_CONNECTION)]
    with pytest.raises(IsBusy, match=f"at most {MAX_FILTERS_PER_CONNECTION} filters"):
        api.register_filter({"name": "one more"}, caller)
    api.register_filter({"name": "elsewhere"}, FakeCaller())
    for port in range(MAX_CONNECT_REGISTRATIONS):
        api.register_connect_events({"filter": filters[0], "protocol": "tcp",
                                     "ports": [20000 + port, 20000 + port]}, caller)
    with pytest.raises(IsBusy, match=f"{MAX_CONNECT_REGISTRATIONS} port ranges"):
        api.register_connect_events({"filter": filters[0], "protocol": "udp",
                                     "ports": [30000, 30000]}, caller)
    api.register_connect_events({"filter": filters[1], "protocol": "udp", "ports": [30000, 30000]},
                                caller)
    api.disconnected(caller)  # gone with their connection: room again
    api.register_filter({"name": "again"}, caller)


def rdc(api: SessionApi, caller: Any = None, **params: Any) -> dict[str, Any]:
    request = {"session": 1, "addresses": TARGETS, "protocol_guid": str(FTP)}
    request.update(params)
    return api.redirect_connections(request, caller or FakeCaller())


def test_redirect_connections_reply(api: SessionApi) -> None:
    result = rdc(api, context=[1, 2])
    assert set(result) == {"internal_address", "actions"}
    assert result["internal_address"] == ["192.0.2.1", 61000]
    actions = result["actions"]
    assert [a["redirect"] for a in actions] == [
        {"internal": ["192.0.2.1", 61000], "target": [str(SERVER), 2121], "mode": "kernel"},
        {"internal": ["192.0.2.1", 61001], "target": [OTHER, 2122], "mode": "kernel"},
    ]
    assert all(a["state"] == "pending" and a["protocol_name"] == "FTP" and a["session"] == 1
               and a["protocol"] == "tcp" and a["target"] == a["redirect"]["target"]
               and a["flags"] == [] and a["expires"] is None for a in actions)
    assert [a["action"] for a in api.actions({"session": 1}, FakeCaller())] == \
        [a["action"] for a in actions]
    # the next block follows; user mode has its own
    assert rdc(api, addresses=[[OTHER, 21]])["internal_address"] == ["192.0.2.1", 61002]
    user = rdc(api, addresses=[[OTHER, 21]], flags=["NO_KERNEL_MODE", "TIMEOUT"])
    assert user["internal_address"] == ["192.0.2.1", 63000]
    assert user["actions"][0]["redirect"]["mode"] == "user"
    assert user["actions"][0]["flags"] == ["TIMEOUT", "NO_KERNEL_MODE"]
    assert user["actions"][0]["expires"] is not None


def test_redirect_connections_takes_a_filter_and_a_protocol_by_number(api: SessionApi) -> None:
    caller = FakeCaller()
    fid = api.register_filter({"name": "f"}, caller)["filter"]
    result = rdc(api, caller, addresses=[[str(SERVER), 2121]], filter=fid, protocol=17)
    (perm,) = api.engine.pending(1, 0.0)
    assert perm.filter_id == fid and perm.redirect is not None and perm.redirect.protocol == 17
    assert result["actions"][0]["filter"] == fid


@pytest.mark.parametrize(("params", "message"), [
    ({"addresses": None}, "'addresses' must be a list of 1 to 64 [address, port] pairs"),
    ({"addresses": str(SERVER)}, "'addresses' must be a list of 1 to 64"),
    ({"addresses": {"a": 1}}, "'addresses' must be a list of 1 to 64"),
    ({"addresses": []}, "'addresses' must be a list of 1 to 64"),
    ({"addresses": [[str(SERVER), 2121]] * 65}, "'addresses' must be a list of 1 to 64"),
    ({"addresses": [[str(SERVER)]]}, "'addresses[0]' must be [address, port]"),
    ({"addresses": [[str(SERVER), 2121], [OTHER, 2122, 3]]}, "'addresses[1]' must be [address, port]"),
    ({"addresses": [{"address": OTHER, "port": 21}]}, "'addresses[0]' must be [address, port]"),
    ({"addresses": [str(SERVER)]}, "'addresses[0]' must be [address, port]"),
    ({"addresses": [[str(SERVER), "2121"]]}, "'addresses[0]': the port must be an integer"),
    ({"addresses": [[str(SERVER), True]]}, "'addresses[0]': the port must be an integer"),
    ({"addresses": [[str(SERVER), 21.0]]}, "'addresses[0]': the port must be an integer"),
    ({"addresses": [[str(SERVER), 21], ["nope", 21]]}, "'addresses[1]' 'nope' is not an IP address"),
    ({"addresses": [[21, 21]]}, "'addresses[0]' must be an IP address string"),
    ({"addresses": [[str(SERVER), 0]]}, "port 0 is outside 1-65535"),
    ({"addresses": [[str(SERVER), 70000]]}, "port 70000 is outside 1-65535"),
    ({"addresses": [["224.0.0.1", 21]]}, "not a unicast host address"),
    ({"addresses": [[str(SERVER), 21], ["198.51.100.1", 22]]},
     "target 198.51.100.1 is the firewall's own address"),
    ({"addresses": [["2001:db8:2::1", 21]]}, "not of the client's address family"),
    ({"address": str(SERVER)}, "unexpected parameters: address"),
    ({"port": 21, "colour": "red"}, "unexpected parameters: colour, port"),
    ({"session": "1"}, "'session' must be an integer"),
    ({"session": 9}, "no session 9"),
    ({"protocol": "icmp"}, "'protocol' must be"),
    ({"protocol_guid": "nope"}, "'protocol_guid' 'nope' is not a GUID"),
    ({"flags": ["BIDIRECTIONAL"]}, "RedirectConnections does not take BIDIRECTIONAL"),
    ({"flags": ["ADDRESS_BASED"]}, "RedirectConnections does not take ADDRESS_BASED"),
    ({"flags": ["TIMEOUT", "ALLOW_MULTIPLE"]}, "TIMEOUT and ALLOW_MULTIPLE cannot be combined"),
    ({"filter": 99}, "no filter 99 is registered"),
    ({"data_filter": "x" * 65}, "'data_filter' must be a string of at most 64 characters"),
    ({"data_filter": "upper"}, "no data filter 'upper'"),
    ({"proxy_external_address": "198.51.100.9"}, "not one of the firewall's external addresses"),
    ({"context": "x" * 5000}, "'context' is larger than"),
])
def test_redirect_connections_bad_parameters(params: dict[str, Any], message: str) -> None:
    hook = ApplyHook()
    api = build_api(hook)
    with pytest.raises(InvalidArgument) as info:
        rdc(api, **params)
    assert message in str(info.value)
    assert api.actions({}, FakeCaller()) == []
    assert hook.calls == []
    assert [pool.in_use for pool in api.engine.pools.values()] == [0, 0]


def test_redirect_connections_needs_addresses(api: SessionApi) -> None:
    with pytest.raises(InvalidArgument, match=r"'addresses' must be a list"):
        api.redirect_connections({"session": 1, "protocol_guid": str(FTP)}, FakeCaller())


def test_apply_gets_the_effects_of_each_grant() -> None:
    hook = ApplyHook()
    api = build_api(hook)
    result = rdc(api)
    (effects,) = hook.calls  # kernel-mode redirects: their NAT, before the call returns
    assert [type(e) for e in effects] == [AddRedirect, AddRedirect]
    assert [e.permission.id for e in effects if isinstance(e, AddRedirect)] == \
        [a["action"] for a in result["actions"]]
    afc(api)  # nothing for the kernel to do: apply is not called
    assert len(hook.calls) == 1
    grown = afc(api, port=2122, flags=["INCREASE_RECEIVE_BUFFER"])
    assert [(type(e), e.holder.id) for e in hook.calls[1]] == \
        [(GrowReceiveBuffer, grown["action"])]
    user_mode = ApplyHook()
    rdc(build_api(user_mode), flags=["NO_KERNEL_MODE"])  # the enforcer rewrites: no kernel NAT
    assert user_mode.calls == []


def test_a_failing_apply_fails_the_call_with_its_own_error() -> None:
    # (what the shell then withdraws is its own: tests/unit/test_daemon_packets.py)
    api = build_api(ApplyHook(RuntimeError("iptables-restore failed")))
    with pytest.raises(RuntimeError, match="iptables-restore failed"):
        rdc(api, flags=["TIMEOUT"])


def test_no_effect_is_applied_while_held() -> None:
    """While the engine decides a packet (``hold``), a filter's calls leave their effects
    to the packet's answer."""
    hook = ApplyHook()
    api = build_api(hook)
    api.hold = True
    rdc(api)
    assert hook.calls == [] and [type(e) for e in api.engine.effects] == [AddRedirect] * 2
    api.hold = False
    api.settle()
    assert len(hook.calls) == 1 and api.engine.effects == []


# --- connect events -----------------------------------------------------------------------------

def register(api: SessionApi, caller: Any, **params: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"protocol": "tcp", "ports": [21, 21]}
    request.update(params)
    return api.register_connect_events(request, caller)


def test_register_connect_events(api: SessionApi) -> None:
    caller = FakeCaller()
    fid = api.register_filter({"name": "watch"}, caller)["filter"]
    assert register(api, caller, filter=fid) == {"filter": fid, "protocol": 6, "ports": [21, 21]}
    assert register(api, caller, filter=fid, protocol="udp", ports=[5000, 5010]) == \
        {"filter": fid, "protocol": 17, "ports": [5000, 5010]}
    assert api.engine.connect_registrations == {fid: [(6, PortRange(21, 21)), (17, PortRange(5000, 5010))]}
    api.engine.decide(PacketMeta(FlowKey(6, CLIENT, 41000, SERVER, 21), Ingress.INTERNAL, 0x02), 1.0)
    api.settle()
    (event,) = caller.pushed
    assert (event["event"], event["filter"], event["secondary"], event["client"], event["target"]) == \
        ("connect", fid, False, [str(CLIENT), 41000], [str(SERVER), 21])
    assert event["external"] == "198.51.100.1"  # NAT


def test_register_connect_events_for_the_caller_s_own_filter_only(api: SessionApi) -> None:
    mine, other = FakeCaller(), FakeCaller()
    fid = api.register_filter({"name": "mine"}, mine)["filter"]
    for caller, filter_id in ((other, fid), (mine, fid + 1), (mine, 99)):
        with pytest.raises(InvalidArgument, match=f"no filter {filter_id} is registered on this connection"):
            register(api, caller, filter=filter_id)
    with pytest.raises(InvalidArgument, match="'filter' is required"):
        register(api, mine)
    assert api.engine.connect_registrations == {}


@pytest.mark.parametrize(("params", "message"), [
    ({"ports": None}, "'ports' must be [low, high] with 1 <= low <= high <= 65535"),
    ({"ports": "21"}, "'ports' must be [low, high]"),
    ({"ports": [21]}, "'ports' must be [low, high]"),
    ({"ports": [21, 22, 23]}, "'ports' must be [low, high]"),
    ({"ports": [21, "22"]}, "'ports' must be [low, high]"),
    ({"ports": [True, 22]}, "'ports' must be [low, high]"),
    ({"ports": [21.0, 22]}, "'ports' must be [low, high]"),
    ({"ports": [22, 21]}, "'ports' must be [low, high]"),
    ({"ports": [0, 21]}, "'ports' must be [low, high]"),
    ({"ports": [1, 65536]}, "'ports' must be [low, high]"),
    ({"protocol": "icmp"}, "'protocol' must be \"tcp\", \"udp\", 6 or 17"),
    ({"protocol": 1}, "'protocol' must be"),
    ({"protocol": True}, "'protocol' must be"),
    ({"port": 21}, "unexpected parameters: port"),
])
def test_register_connect_events_bad_parameters(api: SessionApi, params: dict[str, Any],
                                                message: str) -> None:
    caller = FakeCaller()
    fid = api.register_filter({"name": "watch"}, caller)["filter"]
    with pytest.raises(InvalidArgument) as info:
        register(api, caller, filter=fid, **params)
    assert message in str(info.value)
    assert api.engine.connect_registrations == {}


def test_register_connect_events_whole_port_range(api: SessionApi) -> None:
    caller = FakeCaller()
    fid = api.register_filter({"name": "all"}, caller)["filter"]
    assert register(api, caller, filter=fid, ports=[1, 65535])["ports"] == [1, 65535]
    assert api.engine.connect_registrations[fid] == [(6, PortRange(1, 65535))]


def test_disconnecting_forgets_connect_registrations(api: SessionApi) -> None:
    gone, stays = FakeCaller(), FakeCaller()
    gone_id = api.register_filter({"name": "gone"}, gone)["filter"]
    stays_id = api.register_filter({"name": "stays"}, stays)["filter"]
    register(api, gone, filter=gone_id)
    register(api, stays, filter=stays_id)
    api.disconnected(gone)
    assert set(api.engine.connect_registrations) == {stays_id}
    api.engine.decide(PacketMeta(FlowKey(6, CLIENT, 41000, SERVER, 21), Ingress.INTERNAL, 0x02), 1.0)
    api.settle()
    assert gone.pushed == []
    assert [e["filter"] for e in stays.pushed] == [stays_id]
    with pytest.raises(InvalidArgument, match=f"no filter {gone_id} is registered on this connection"):
        register(api, gone, filter=gone_id)


# --- RetroactiveAllowBind and the binds listing ------------------------------------------------

EXT = ipaddress.ip_address("198.51.100.1")


def bind_api() -> tuple[SessionApi, list[Any], int]:
    """An api whose shell records the binds whose receive buffers it is asked to grow, and
    a Firewall-client session of CLIENT."""
    bound: list[Any] = []
    api = build_api(lambda effects: bound.extend(e.holder for e in effects
                                                 if isinstance(e, GrowReceiveBuffer)))
    session = api.engine.open_firewall_session(CLIENT, "alice", 0.0).id
    return api, bound, session


def rab(api: SessionApi, **params: Any) -> dict[str, Any]:
    request = {"protocol_guid": str(FTP), "address": str(EXT)}
    request.update(params)
    return api.retroactive_allow_bind(request, FakeCaller())


@pytest.mark.parametrize("address", ["0.0.0.0", "::", str(EXT)])
def test_retroactive_allow_bind_s_ok_then_s_false(address: str) -> None:
    api, bound, session = bind_api()
    bind = api.engine.bind_for_client(session, 6, EXT, 0.0)
    first = rab(api, session=session, port=bind.port, address=address)
    assert first["result"] == "S_OK" and first["hresult"] == 0
    assert first["bind"] == bind.to_dict() and first["bind"]["state"] == "allowed"
    assert first["bind"]["bind"] == bind.id and first["bind"]["ipfilter"] is None
    assert bound == []  # TCP, no INCREASE_RECEIVE_BUFFER: nothing for the shell to do
    second = rab(api, session=session, port=bind.port, address=address, flags=["INCREASE_RECEIVE_BUFFER"])
    assert second["result"] == "S_FALSE" and second["hresult"] == 1
    assert second["bind"]["flags"] == []  # unchanged by the second call
    assert bound == []  # the buffer grows for an approval (S_OK) only


def test_retroactive_allow_bind_parses_the_ipfilter_and_the_udp_flags() -> None:
    api, bound, session = bind_api()
    bind = api.engine.bind_for_client(session, 17, EXT, 0.0)
    ranges = [["198.51.100.0", "198.51.100.255"], ["2001:db8:2::", "2001:db8:2::ffff"]]
    result = rab(api, session=session, port=bind.port, protocol="udp",
                 flags=["BIDIRECTIONAL", "INCREASE_RECEIVE_BUFFER"], ipfilter={"ranges": ranges})
    assert result["result"] == "S_OK" and bound == [bind]
    assert result["bind"]["ipfilter"] == {"ranges": ranges}
    assert result["bind"]["flags"] == ["BIDIRECTIONAL", "INCREASE_RECEIVE_BUFFER"]
    assert bind.ipfilter is not None and bind.ipfilter.is_included("198.51.100.77")
    assert not bind.ipfilter.is_included("192.0.2.11")


def test_retroactive_allow_bind_with_an_empty_or_a_null_ipfilter() -> None:
    api, _, session = bind_api()
    none = api.engine.bind_for_client(session, 6, EXT, 0.0)
    anyone = api.engine.bind_for_client(session, 6, EXT, 0.0)
    assert rab(api, session=session, port=none.port, ipfilter={"ranges": []})["bind"]["ipfilter"] == \
        {"ranges": []}
    assert none.ipfilter is not None and none.ipfilter.is_empty
    assert rab(api, session=session, port=anyone.port, ipfilter=None)["bind"]["ipfilter"] is None
    assert anyone.ipfilter is None


@pytest.mark.parametrize(("params", "message"), [
    ({"ipfilter": {"ranges": "all"}}, "'ranges' must be a list"),
    ({"ipfilter": {"ranges": [["198.51.100.9", "198.51.100.1"]]}}, "low is above high"),
    ({"ipfilter": {"ranges": [["198.51.100.1", "2001:db8::1"]]}}, "cannot span families"),
    ({"ipfilter": {"range": []}}, "unknown key"),
    ({"ipfilter": [["198.51.100.1", "198.51.100.2"]]}, "expected an object"),
    ({"ipfilter": "198.51.100.0/24"}, "expected an object"),
    ({"address": "fw"}, "'address' 'fw' is not an IP address"),
    ({"address": None}, "'address' must be an IP address string"),
    ({"port": 0}, "port must be nonzero"),
    ({"port": "1"}, "'port' must be an integer"),
    ({"protocol": "icmp"}, "'protocol' must be"),
    ({"protocol_guid": "nope"}, "is not a GUID"),
    ({"protocol_guid": "00000000-0000-0000-0000-000000000005"}, "no protocol is defined"),
    ({"flags": ["TIMEOUT"]}, "does not take TIMEOUT"),
    ({"flags": ["BIDIRECTIONAL"]}, "BIDIRECTIONAL is for UDP only"),
    ({"session": 99}, "no session 99"),
    ({"extra": 1}, "unexpected parameters: extra"),
])
def test_retroactive_allow_bind_bad_parameters(params: dict[str, Any], message: str) -> None:
    api, bound, session = bind_api()
    bind = api.engine.bind_for_client(session, 6, EXT, 0.0)
    request = {"session": session, "port": bind.port}
    request.update(params)
    with pytest.raises(InvalidArgument, match=message):
        rab(api, **request)
    assert bind.state.value == "pending" and bound == []


def test_retroactive_allow_bind_not_found_and_terminating() -> None:
    api, bound, session = bind_api()
    bind = api.engine.bind_for_client(session, 6, EXT, 0.0)
    with pytest.raises(NotFound):
        rab(api, session=session, port=bind.port + 1)
    with pytest.raises(NotFound):
        rab(api, session=session, port=bind.port, address="198.51.100.2")
    with pytest.raises(NotFound):
        rab(api, session=session, port=bind.port, protocol=17)
    api.engine.bind_done(bind)
    with pytest.raises(Terminating):
        rab(api, session=session, port=bind.port)
    assert bound == []


def test_binds_lists_by_session() -> None:
    api, _, session = bind_api()
    other = api.engine.open_firewall_session(CLIENT, "bob", 0.0).id
    mine = api.engine.bind_for_client(session, 6, EXT, 0.0)
    theirs = api.engine.bind_for_client(other, 17, EXT, 0.0)
    assert api.binds({}, FakeCaller()) == [mine.to_dict(), theirs.to_dict()]
    assert api.binds({"session": session}, FakeCaller()) == [mine.to_dict()]
    assert api.binds({"session": other}, FakeCaller()) == [theirs.to_dict()]
    assert api.binds({"session": 99}, FakeCaller()) == []
    assert api.binds({"session": None}, FakeCaller()) == [mine.to_dict(), theirs.to_dict()]
    with pytest.raises(InvalidArgument, match="'session' must be from 1"):
        api.binds({"session": 0}, FakeCaller())
    with pytest.raises(InvalidArgument, match="unexpected parameters"):
        api.binds({"bind": 1}, FakeCaller())
    api.engine.end_session(session, 1.0)
    assert api.binds({}, FakeCaller()) == [theirs.to_dict()]


def test_a_whole_table_is_listed_page_by_page_after_the_last_id(tmp_path: Path) -> None:
    """sessions, actions and binds take ``after``: each page takes up after the last id of
    the one before, in id order, and its ``more`` counts what is left; together the pages
    are the whole table, each item once, past the 10000 a call may list."""
    api = build_api()
    engine, caller = api.engine, FakeCaller()
    firewall = []
    for n in range(40):
        client = ipaddress.ip_address(f"192.0.2.{20 + n // 16}")
        firewall.append(engine.open_firewall_session(client, f"user{n}", 0.0).id)
        afc(api, session=firewall[-1], port=20000 + n)
        engine.bind_for_client(firewall[-1], 6, EXT, 0.0)
    engine.cancel(api.actions({"limit": 3}, caller)[2]["action"], 0.0)  # a gap in the ids
    for method, id_key, table in (("sessions", "id", [s.id for s in engine.sessions]),
                                  ("actions", "action", [a.id for a in engine.pending(None, 0.0)]),
                                  ("binds", "bind", sorted(b.id for b in engine.binds.of(None)))):
        pages, after = [], None
        for _ in range(len(table)):  # (a cursor that does not move would page for ever)
            page = getattr(api, method)({"limit": 7} | ({} if after is None else {"after": after}),
                                        caller)
            pages.append(page)
            if not page.more:
                break
            after = page[-1][id_key]
        assert [item[id_key] for page in pages for item in page] == table, method
        assert [page.more for page in pages] == [max(0, len(table) - 7 * (i + 1))
                                                 for i in range(len(pages))], method
        assert getattr(api, method)({"after": table[-1]}, caller) == []
    mine = api.actions({"session": firewall[5], "after": 0}, caller)
    assert [a["target"][1] for a in mine] == [20005]
    for bad in (-1, "3", 1.5, True):
        with pytest.raises(InvalidArgument, match="'after' must be"):
            api.sessions({"after": bad}, caller)
    last = InProcessCalls(api.handlers()).binds(limit=2, after=table[-2])  # the client's wrapper
    assert [b["bind"] for b in last] == table[-1:] and last.more == 0


def test_listings_return_at_most_their_limit_and_say_how_many_more(tmp_path: Path) -> None:
    """sessions, actions and binds listed whole tables (65536 sessions: a reply of 8.9 MB,
    built in the loop, and a client dropped as one that does not read). Each listing
    returns at most its limit, the oldest first, and its reply says how many it left
    out."""
    api = build_api()
    engine, caller = api.engine, FakeCaller()
    firewall = []
    while len(engine.sessions) < LISTED + 5:  # the primary's SecureNAT session, and these
        n = len(firewall)
        client = ipaddress.ip_address(f"192.0.2.{20 + n // 16}")  # sessions_per_client: 16
        firewall.append(engine.open_firewall_session(client, f"user{n}", 0.0).id)
        afc(api, session=firewall[-1], port=20000 + n)
    afc(api, session=firewall[0], port=30000)
    afc(api, session=firewall[0], port=30001)
    for session in firewall[:3]:
        engine.bind_for_client(session, 6, EXT, 0.0)
    engine.decide(PacketMeta(FlowKey(6, CLIENT, 40001, SERVER, 21), Ingress.INTERNAL, 0x02), 1.0)

    sessions = api.sessions({}, caller)
    assert len(sessions) == LISTED and sessions.more == 5
    assert [s["id"] for s in sessions] == [s.id for s in engine.sessions][:LISTED]
    assert (len(api.sessions({"limit": 10}, caller)), api.sessions({"limit": 10}, caller).more) == \
        (10, LISTED - 5)
    actions = api.actions({}, caller)
    assert len(actions) == LISTED and actions.more == len(firewall) + 2 - LISTED
    assert [a["action"] for a in actions] == sorted(a["action"] for a in actions)
    mine = api.actions({"session": firewall[0], "limit": 2}, caller)
    assert [a["target"][1] for a in mine] == [20000, 30000] and mine.more == 1
    binds = InProcessCalls(api.handlers()).binds(limit=2)  # the client's wrapper
    assert [b["session"] for b in binds] == firewall[:2] and binds.more == 1
    assert api.flows({"limit": 1}, caller).more == 1
    assert api.decisions({"limit": 1}, caller).more == len(engine.recent) - 1
    assert api.binds({"limit": None}, caller).more == 0  # null: the default

    srv = ControlServer(str(tmp_path / "c.sock"), api.handlers(), Loop())
    try:
        for method in ("sessions", "actions"):
            reply = srv.handle_line(b'{"id": 1, "method": "%s"}' % method.encode(), caller)
            assert set(reply) == {"id", "result", "more"} and len(reply["result"]) == LISTED
            assert len(encode(reply)) < MAX_UNSENT // 8, "the default is not well under the cap"
        reply = srv.handle_line(b'{"id": 2, "method": "sessions", "params": {"limit": %d}}'
                                % MAX_LISTED, caller)
        assert set(reply) == {"id", "result"} and len(reply["result"]) == LISTED + 5
        for bad in (0, MAX_LISTED + 1, "10", 1.5, True):
            for method in ("sessions", "actions", "binds", "flows", "decisions"):
                reply = srv.handle_line(json.dumps({"id": 3, "method": method,
                                                    "params": {"limit": bad}}).encode(), caller)
                assert reply["error"]["message"].startswith("'limit' must be"), (method, bad, reply)
    finally:
        srv.close()


def test_decisions_since_a_time_are_those_made_then_or_later(api: SessionApi) -> None:
    """``decisions since=T``: what the enforcer decided at T or after, on its clock (what a
    silent drop's check asks to end its watch); a bad ``since`` is named."""
    engine = api.engine
    for at, port in ((10.0, 40001), (20.0, 40002), (30.0, 40003)):
        engine.decide(PacketMeta(FlowKey(6, CLIENT, port, SERVER, 30000), Ingress.INTERNAL, 0x02), at)
    caller = FakeCaller()
    flows = [d["flow"] for d in api.decisions({"since": 20, "limit": 100}, caller)]
    assert flows == [f"tcp {CLIENT}:40002 -> {SERVER}:30000", f"tcp {CLIENT}:40003 -> {SERVER}:30000"]
    assert len(api.decisions({"limit": 100}, caller)) == 4  # the primary's too
    for bad in ("soon", float("nan"), True):
        with pytest.raises(InvalidArgument, match="'since' must be a number of seconds"):
            api.decisions({"since": bad}, caller)
