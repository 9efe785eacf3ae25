"""Application filter plugins: finding and loading them (enforcer.filters), matching them
to the config's protocols (enforcer.daemon.load_app_filters), and the session API they
call in the enforcer's process (InProcessCalls over a real SessionApi and Engine)."""

from __future__ import annotations

import ipaddress
from importlib.metadata import EntryPoint
from typing import Any

import pytest

from enforcer import filters
from enforcer.api import SessionApi
from enforcer.client import Action
from enforcer.config import Config, parse
from enforcer.core.binds import Bind, BindState
from enforcer.core.effects import MapBind
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.fwports import Listening
from enforcer.core.packet import TCP, FlowKey, Ingress, PacketMeta
from enforcer.core.results import (
    InvalidArgument,
    NetworkRulesDenied,
    SessionApiError,
    Terminating,
)
from enforcer.core.state import Verdict
from enforcer.daemon import StartupError, load_app_filters
from enforcer.filters import Direction, InProcessCalls, PluginError, Primary
from enforcer.plugins.ftp import FTP_GUID, FtpFilter
from enforcer.plugins.tftp import TFTP_GUID, TftpFilter

ip = ipaddress.ip_address

NETWORK = """\
[network]
internal_interfaces = ["int0"]
external_interfaces = ["ext0"]
nat = true
"""
FTP_PROTOCOL = f"""
[[protocol]]
name = "FTP"
guid = "{FTP_GUID}"
ip_protocol = "tcp"
ports = [21]
"""
TFTP_PROTOCOL = f"""
[[protocol]]
name = "TFTP"
guid = "{TFTP_GUID}"
ip_protocol = "udp"
ports = [69]
"""
RULES = """
[[protocol_rule]]
name = "clients"
action = "allow"
protocols = ["FTP"]
clients = ["192.0.2.0/24"]

[[site_rule]]
name = "denied"
action = "deny"
destinations = ["203.0.113.0/24"]

[[site_rule]]
name = "servers"
action = "allow"
destinations = ["198.51.100.0/24"]
"""


def config(enable: list[str], *, tftp: bool = True) -> Config:
    names = ", ".join(f'"{n}"' for n in enable)
    text = (NETWORK + FTP_PROTOCOL + (TFTP_PROTOCOL if tftp else "") + RULES
            + f"\n[filters]\nenable = [{names}]\n")
    return parse(text, "plugins.toml")


class FakePlugin:
    def __init__(self, name: str, guid: str) -> None:
        self.name = name
        self.protocol_guid = guid

    def attach(self, primary: filters.Primary, api: filters.SessionCalls) -> filters.StreamFilter:
        raise NotImplementedError


class NoAttach:
    protocol_guid = FTP_GUID


class Broken:
    protocol_guid = FTP_GUID

    def __init__(self) -> None:
        raise RuntimeError("boom")


INSTANCE = FakePlugin("inst", FTP_GUID)


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    """The installed plugins are these, name -> "module:attribute"."""
    found = [EntryPoint(name, value, filters.ENTRY_POINT_GROUP) for name, value in targets.items()]

    def entry_points(*, group: str) -> list[EntryPoint]:
        assert group == filters.ENTRY_POINT_GROUP
        return found

    monkeypatch.setattr(filters, "entry_points", entry_points)


# --- finding and loading ------------------------------------------------------------------------

def test_the_project_s_plugins_are_installed() -> None:
    installed = filters.installed()
    assert installed["ftp"] == "enforcer.plugins.ftp:FtpFilter"
    assert installed["tftp"] == "enforcer.plugins.tftp:TftpFilter"


def test_load_makes_the_named_plugins() -> None:
    plugins = filters.load(["tftp", "ftp"])
    assert list(plugins) == ["tftp", "ftp"]
    assert isinstance(plugins["ftp"], FtpFilter) and isinstance(plugins["tftp"], TftpFilter)
    assert plugins["ftp"].protocol_guid == FTP_GUID and plugins["tftp"].protocol_guid == TFTP_GUID
    assert filters.load([]) == {}


@pytest.mark.parametrize("names", [["nope"], ["ftp", "nope"]])
def test_load_of_a_plugin_not_installed_names_the_installed_ones(names: list[str]) -> None:
    with pytest.raises(PluginError, match=r"no application filter 'nope' is installed \(") as info:
        filters.load(names)
    listed = str(info.value).split("(", 1)[1]
    assert "ftp" in listed and "tftp" in listed


def test_load_with_nothing_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(monkeypatch)
    with pytest.raises(PluginError, match=r"'ftp' is installed \(none is installed\)"):
        filters.load(["ftp"])


def test_a_plugin_object_is_used_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(monkeypatch, inst=f"{__name__}:INSTANCE")
    assert filters.load(["inst"])["inst"] is INSTANCE


@pytest.mark.parametrize(("target", "message"), [
    pytest.param("no_such_module_for_pinhole:Thing", "cannot be loaded", id="no-module"),
    pytest.param(f"{__name__}:Missing", "cannot be loaded", id="no-attribute"),
    pytest.param(f"{__name__}:Broken", "cannot be loaded: boom", id="constructor-raises"),
    pytest.param("collections:OrderedDict", "has no 'protocol_guid'", id="no-guid"),
    pytest.param(f"{__name__}:NoAttach", "has no 'attach'", id="no-attach"),
])
def test_a_plugin_that_cannot_be_used(monkeypatch: pytest.MonkeyPatch, target: str, message: str) -> None:
    fake_entry_points(monkeypatch, bad=target)
    with pytest.raises(PluginError, match=message) as info:
        filters.load(["bad"])
    assert f"application filter 'bad' ({target})" in str(info.value)


# --- the config's protocols -----------------------------------------------------------------------

def test_load_app_filters_maps_protocols_to_plugins() -> None:
    plugins, watching = load_app_filters(config(["ftp", "tftp"]))
    assert set(plugins) == {"ftp", "tftp"}
    assert watching == {"FTP": "ftp", "TFTP": "tftp"}
    assert load_app_filters(config([])) == ({}, {})


def test_a_plugin_whose_protocol_is_not_configured() -> None:
    with pytest.raises(StartupError) as info:
        load_app_filters(config(["ftp", "tftp"], tftp=False))
    message = str(info.value)
    assert "'tftp'" in message and TFTP_GUID in message and "no [[protocol]] has it" in message


def test_a_plugin_not_installed_stops_the_start() -> None:
    with pytest.raises(StartupError, match="no application filter 'nope' is installed"):
        load_app_filters(config(["ftp", "nope"]))


def test_two_plugins_on_one_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[list[str]] = []

    def load(names: list[str]) -> dict[str, Any]:
        loaded.append(names)
        return {"first": FakePlugin("first", FTP_GUID), "second": FakePlugin("second", FTP_GUID)}

    monkeypatch.setattr(filters, "load", load)
    with pytest.raises(StartupError, match="application filters 'first' and 'second' both watch FTP"):
        load_app_filters(config(["ftp", "tftp"]))
    assert loaded == [["ftp", "tftp"]]


def test_a_plugin_s_guid_matches_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filters, "load", lambda names: {"upper": FakePlugin("upper", FTP_GUID.upper())})
    assert load_app_filters(config(["upper"]))[1] == {"FTP": "upper"}


# --- the session API in the enforcer's process ------------------------------------------------------

CLIENT, SERVER = ip("192.0.2.11"), ip("198.51.100.21")


class Setup:
    def __init__(self, apply: Any = None, listening: Listening | None = None) -> None:
        cfg = config([])
        self.now = 10.0
        self.engine = Engine(cfg.policy, {"int0": [ipaddress.ip_network("192.0.2.0/24")]},
                             [ip("198.51.100.1")], nat=True)
        hooks: dict[str, Any] = {} if listening is None else {"listening": lambda: listening}
        self.api = SessionApi(self.engine, lambda: self.now, apply, **hooks)
        self.calls = InProcessCalls(self.api.handlers())
        primary = self.engine.decide(PacketMeta(FlowKey(TCP, CLIENT, 40000, SERVER, 21), Ingress.INTERNAL,
                                                0x02), 1.0)
        assert primary.session_id is not None
        self.session = primary.session_id


def test_allow_future_connect_returns_an_action() -> None:
    s = Setup()
    action = s.calls.allow_future_connect(s.session, (str(SERVER), 20021), protocol_guid=FTP_GUID,
                                          flags=Flags.TIMEOUT)
    assert isinstance(action, Action)
    perm = s.engine.action(action.id, s.now)
    assert perm.session_id == s.session and perm.protocol_name == "FTP" and Flags.TIMEOUT in perm.flags
    assert action.state == "pending"
    d = s.engine.decide(PacketMeta(FlowKey(TCP, CLIENT, 40001, SERVER, 20021), Ingress.INTERNAL, 0x02), 11.0)
    assert d.verdict is Verdict.ADMIT_KERNEL and d.action_id == action.id
    assert action.state == "consumed"
    with pytest.raises(Terminating):
        action.cancel()


def test_errors_raise_the_session_api_s_exceptions() -> None:
    s = Setup()
    with pytest.raises(InvalidArgument, match="no session 99"):
        s.calls.allow_future_connect(99, (str(SERVER), 20021), protocol_guid=FTP_GUID)
    with pytest.raises(NetworkRulesDenied) as denied:
        s.calls.allow_future_connect(s.session, ("203.0.113.5", 20021), protocol_guid=FTP_GUID)
    assert isinstance(denied.value, SessionApiError)
    with pytest.raises(InvalidArgument, match="not a GUID"):
        s.calls.allow_future_connect(s.session, (str(SERVER), 20021), protocol_guid="nope")
    with pytest.raises(InvalidArgument):
        s.calls.bind_for_client(s.session, 0)
    assert s.engine.pending(None, s.now) == []


def test_an_unknown_method_is_invalid_argument() -> None:
    s = Setup()
    with pytest.raises(InvalidArgument, match="no method 'no_such_method'"):
        s.calls.call("no_such_method", session=s.session)


def test_none_valued_params_are_dropped() -> None:
    s = Setup()
    assert s.calls.call("ping", extra=None) == {"pong": True}
    with pytest.raises(InvalidArgument, match="unexpected parameters: extra"):
        s.calls.call("ping", extra=0)
    seen: list[tuple[dict[str, Any], Any]] = []
    calls = InProcessCalls({"echo": lambda params, caller: seen.append((params, caller))})
    calls.call("echo", a=1, b=None, c=0, d=False, e="")
    assert seen == [({"a": 1, "c": 0, "d": False, "e": ""}, calls.caller)]


def test_bind_for_client_and_its_approval() -> None:
    made: list[Bind] = []
    s = Setup(lambda effects: made.extend(e.bind for e in effects if isinstance(e, MapBind)))
    where = s.calls.bind_for_client(s.session, 50000)
    assert where == ("198.51.100.1", 50000)
    assert s.calls.bind_for_client(s.session, 50000) == where  # the same bind
    assert len(made) == 1 and made[0].client_port == 50000
    assert s.calls.retroactive_allow_bind(s.session, where, protocol_guid=FTP_GUID,
                                          ipfilter=[(str(SERVER), str(SERVER))]) is True
    assert s.calls.retroactive_allow_bind(s.session, where, protocol_guid=FTP_GUID) is False
    (listed,) = s.calls.binds(s.session)
    assert listed["leads_to"] == [str(CLIENT), 50000] and listed["state"] == "allowed"
    assert listed["ipfilter"] == {"ranges": [[str(SERVER), str(SERVER)]]}


def test_in_nat_the_fw_s_privileged_and_listened_ports_are_no_client_s_bind() -> None:
    """The session API refuses them whatever the filter checked; the FTP filter then
    opens nothing and passes the command unchanged."""
    fw = Listening(frozenset({(TCP, ip("198.51.100.1"), 50000), (TCP, ip("::"), 50001)}))
    s = Setup(listening=fw)
    for port in (22, 1023, 50000, 50001):
        with pytest.raises(InvalidArgument, match="no bind takes it"):
            s.calls.bind_for_client(s.session, port)
    assert s.engine.binds.of(s.session) == []
    ftp = FtpFilter().attach(Primary(s.session, "tcp", (CLIENT, 40000), (SERVER, 21),
                                     translated=True, firewall_client=False), s.calls)
    for port in (50000, 50001):
        command = b"PORT 192,0,2,11,%d,%d\r\n" % (port >> 8, port & 255)
        assert ftp.on_data(Direction.OUT, command) == command
    assert s.engine.binds.of(s.session) == []
    # a port the fw does not listen on is the client's bind, and the command names it
    assert ftp.on_data(Direction.OUT, b"PORT 192,0,2,11,195,82\r\n") == \
        b"PORT 198,51,100,1,195,82\r\n"  # 50002
    (bind,) = s.engine.binds.of(s.session)
    assert (bind.port, bind.client_port, bind.state) == (50002, 50002, BindState.ALLOWED)


def test_a_firewall_client_session_cannot_bind_for_client() -> None:
    s = Setup()
    session = s.engine.open_firewall_session(CLIENT, "alice", 1.0).id
    with pytest.raises(InvalidArgument, match="Firewall client"):
        s.calls.bind_for_client(session, 50000)


def test_events_of_a_filter_registered_in_process_are_kept() -> None:
    s = Setup()
    filter_id = s.calls.register_filter("ftp")
    s.calls.register_connect_events(filter_id, "tcp", (20000, 20100))
    action = s.calls.allow_future_connect(s.session, (str(SERVER), 20021), protocol_guid=FTP_GUID,
                                          session_filter=filter_id, context={"line": 3})
    s.engine.decide(PacketMeta(FlowKey(TCP, CLIENT, 40001, SERVER, 20021), Ingress.INTERNAL, 0x02), 11.0)
    s.api.settle()
    events = list(s.calls.caller.events)
    assert [e["event"] for e in events] == ["established_connection", "connect"]
    assert events[0]["action"] == action.id and events[0]["context"] == {"line": 3}
    assert events[1]["secondary"] is True and events[1]["target"] == [str(SERVER), 20021]


def test_the_bundled_plugins_use_the_public_interface_alone() -> None:
    """A plugin is written as a third party would: it imports enforcer.filters and
    enforcer.client, never the core or the daemon; and its sibling plugin modules (a
    relative import of one: helpers the bundled plugins share)."""
    import ast
    from pathlib import Path

    import enforcer.plugins

    allowed = {"enforcer.filters", "enforcer.client"}
    for path in Path(enforcer.plugins.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module is not None and \
                    (path.parent / f"{node.module}.py").is_file(), f"{path.name} imports .{node.module}"
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("enforcer"):
                assert node.module in allowed, f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("enforcer"), f"{path.name} imports {alias.name}"


def test_events_of_a_filter_registered_in_process_collect_in_api_events() -> None:
    s = Setup()
    me = s.calls.register_filter("in-process")
    action = s.calls.allow_future_connect(s.session, (str(SERVER), 20022), protocol_guid=FTP_GUID,
                                          session_filter=me, context={"data": 1})
    s.engine.decide(PacketMeta(FlowKey(TCP, CLIENT, 40002, SERVER, 20022), Ingress.INTERNAL, 0x02), 11.0)
    s.api.settle()
    assert [(e["event"], e["action"], e["context"]) for e in s.calls.events] == [
        ("established_connection", action.id, {"data": 1})]
