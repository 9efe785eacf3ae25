"""testbed.session_api: the harness's own client of the control protocol, against a scripted
control socket that answers as README "The enforcer" and "The session API" say (never
against the enforcer's code). Result codes and HRESULTs are written out from SPEC.md."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.session_api import (
    Action,
    ControlClient,
    ControlError,
    Flags,
    InvalidArgument,
    IsBusy,
    NetworkRulesDenied,
    NotFound,
    PolicyRulesDenied,
    SessionApiError,
    Terminating,
    flag_names,
)

GUID = "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101"
Answer = Callable[[dict[str, Any]], list[dict[str, Any]]]


class ScriptedSocket:
    """A control socket that answers each request line with the objects ``answer`` gives
    for it, and keeps the requests."""

    def __init__(self, answer: Answer) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ph-ctl-"))  # a UNIX socket path is short
        self.path = str(self.dir / "ctl.sock")
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen()
        self.listener.settimeout(5)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                request = json.loads(line)
                self.requests.append(request)
                conn.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in self.answer(request)))

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)
        shutil.rmtree(self.dir)


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], ScriptedSocket]]:
    made: list[ScriptedSocket] = []

    def start(answer: Answer) -> ScriptedSocket:
        made.append(ScriptedSocket(answer))
        return made[-1]

    yield start
    for scripted in made:
        scripted.close()


def result(value: Any) -> Answer:
    return lambda request: [{"id": request["id"], "result": value}]


def error(name: str, hresult: str, message: str = "refused") -> Answer:
    return lambda request: [{"id": request["id"],
                             "error": {"name": name, "hresult": hresult, "message": message}}]


def test_flags_go_by_name_and_unset_options_are_not_sent(serve: Callable[[Answer], ScriptedSocket]) -> None:
    fw = serve(result({"action": 7}))
    with ControlClient(fw.path) as api:
        action = api.allow_future_connect(3, ("198.51.100.21", 20021), protocol_guid=GUID,
                                          flags=Flags.NO_KERNEL_MODE | Flags.ALLOW_MULTIPLE)
    assert action.id == 7
    (request,) = fw.requests
    assert request["method"] == "allow_future_connect"
    assert request["params"] == {"session": 3, "address": "198.51.100.21", "port": 20021,
                                 "protocol": "tcp", "protocol_guid": GUID,
                                 "flags": ["ALLOW_MULTIPLE", "NO_KERNEL_MODE"]}


def test_every_flag_of_the_spec_has_its_name() -> None:
    every = Flags(0)
    for flag in Flags:
        every |= flag
    assert flag_names(every) == ["ADDRESS_BASED", "ALLOW_MULTIPLE", "TIMEOUT", "NO_KERNEL_MODE",
                                 "BIDIRECTIONAL", "INCREASE_RECEIVE_BUFFER"]
    assert flag_names(Flags(0)) == []


@pytest.mark.parametrize(("name", "hresult", "cls"), [
    ("E_INVALIDARG", "0x80070057", InvalidArgument),
    ("NOT_FOUND", "0x80070490", NotFound),
    ("FWX_E_TERMINATING", "0xC0040001", Terminating),
    ("FWX_E_POLICY_RULES_DENIED", "0xC004000D", PolicyRulesDenied),
    ("FWX_E_NETWORK_RULES_DENIED", "0xC0040012", NetworkRulesDenied),
    ("FWX_E_IS_BUSY", "0xC0040011", IsBusy),
])
def test_an_error_reply_raises_the_class_its_result_code_names(
        serve: Callable[[Answer], ScriptedSocket], name: str, hresult: str,
        cls: type[SessionApiError]) -> None:
    fw = serve(error(name, hresult, "no protocol rule lets it"))
    with ControlClient(fw.path) as api, pytest.raises(cls, match="no protocol rule lets it") as raised:
        api.call("cancel", action=1)
    assert raised.value.name == name


def test_a_code_the_spec_does_not_define_is_the_base_class_with_its_name(
        serve: Callable[[Answer], ScriptedSocket]) -> None:
    fw = serve(error("E_FAIL", "0x80004005", "internal error"))
    with ControlClient(fw.path) as api, pytest.raises(SessionApiError) as raised:
        api.call("status")
    assert type(raised.value) is SessionApiError and raised.value.name == "E_FAIL"


def test_a_result_code_with_another_hresult_breaks_the_protocol(
        serve: Callable[[Answer], ScriptedSocket]) -> None:
    fw = serve(error("FWX_E_IS_BUSY", "0x80070057"))
    with ControlClient(fw.path) as api, pytest.raises(ControlError, match="FWX_E_IS_BUSY came with HRESULT"):
        api.call("allow_future_connect")


def test_events_that_come_before_a_reply_wait_for_next_event(
        serve: Callable[[Answer], ScriptedSocket]) -> None:
    event = {"event": "established_connection", "action": 4, "context": None}
    fw = serve(lambda request: [event, {"id": request["id"], "result": {"filter": 2}}])
    with ControlClient(fw.path) as api:
        assert api.register_filter("mine") == 2
        assert api.next_event(1.0) == event
        assert api.next_event(0.05) is None


def test_a_reply_to_another_request_breaks_the_protocol(serve: Callable[[Answer], ScriptedSocket]) -> None:
    fw = serve(lambda request: [{"id": request["id"] + 1, "result": {}}])
    with ControlClient(fw.path) as api, pytest.raises(ControlError, match="the reply is to request 2, not 1"):
        api.call("ping")


def test_retroactive_allow_bind_sends_the_ipfilter_and_tells_s_ok_from_s_false(
        serve: Callable[[Answer], ScriptedSocket]) -> None:
    answers = iter(["S_FALSE", "S_OK", "E_FAIL"])
    fw = serve(lambda request: [{"id": request["id"], "result": {"result": next(answers)}}])
    with ControlClient(fw.path) as api:
        bind = ("198.51.100.1", 20001)
        assert api.retroactive_allow_bind(5, bind, protocol_guid=GUID,
                                          ipfilter=[("198.51.100.21", "198.51.100.21")]) is False
        assert api.retroactive_allow_bind(5, bind, protocol_guid=GUID, flags=Flags.BIDIRECTIONAL,
                                          protocol="udp") is True
        with pytest.raises(ControlError, match="neither S_OK nor S_FALSE"):
            api.retroactive_allow_bind(5, bind, protocol_guid=GUID)
    assert fw.requests[0]["params"]["ipfilter"] == {"ranges": [["198.51.100.21", "198.51.100.21"]]}
    assert "ipfilter" not in fw.requests[1]["params"], "None is any peer: no filter is sent"
    assert fw.requests[1]["params"]["flags"] == ["BIDIRECTIONAL"]


def test_a_redirect_gives_its_internal_address_and_an_action_per_target(
        serve: Callable[[Answer], ScriptedSocket]) -> None:
    fw = serve(result({"internal_address": ["192.0.2.1", 40000], "actions": [{"action": 8}, {"action": 9}]}))
    with ControlClient(fw.path) as api:
        internal, actions = api.redirect_connections(
            1, [("198.51.100.21", 21), ("198.51.100.22", 21)], protocol_guid=GUID)
    assert internal == ("192.0.2.1", 40000) and [a.id for a in actions] == [8, 9]
    assert fw.requests[0]["params"]["addresses"] == [["198.51.100.21", 21], ["198.51.100.22", 21]]


def test_an_action_asks_its_state_and_cancels(serve: Callable[[Answer], ScriptedSocket]) -> None:
    def answer(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["method"] == "action":
            return [{"id": request["id"], "result": {"action": 8, "state": "consumed"}}]
        return error("FWX_E_TERMINATING", "0xC0040001", "action 8 is consumed")(request)

    fw = serve(answer)
    with ControlClient(fw.path) as api:
        action = Action(api, 8)
        assert action.state == "consumed"
        with pytest.raises(Terminating, match="consumed"):
            action.cancel()
    assert [(r["method"], r["params"]) for r in fw.requests] == [("action", {"action": 8}),
                                                                 ("cancel", {"action": 8})]


def test_no_control_socket_is_a_control_error_naming_it(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    with ControlClient(path) as api, pytest.raises(ControlError, match=f"cannot connect .*{path}"):
        api.call("ping")
