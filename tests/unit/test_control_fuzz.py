"""ROB-04 at the control socket: malformed and random requests, seeded.

``ControlServer.handle_line`` with the session API's real handlers gets random
bytes, broken JSON (every valid request cut short and with bytes changed),
random JSON (as a request, its parameters and its id), and, for every parameter
of every method, values of every wrong type and range. Every line gets a reply
that can be sent, with the request's id where it is an integer or a string: a
result, or an error with one of the documented names, never an internal error
(E_FAIL, a handler that raised) and never an exception out of ``handle_line``. A
request that fails changes nothing, and afterwards the API still grants and the
engine still admits what the grant allows.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from core_policy import INTERNAL, POLICY, POLICY_DATA, pkt

from enforcer.api import SessionApi
from enforcer.control import Caller, ControlServer
from enforcer.core.engine import Engine
from enforcer.core.results import ERRORS, SessionApiError
from enforcer.core.state import Verdict
from enforcer.loop import Loop
from enforcer.protocol import MAX_REQUEST, encode

SEED = int(os.environ.get("PINHOLE_FUZZ_SEED", "20261204"))
FTP = POLICY_DATA["protocol"][0]["guid"]
C1, S1, EXT = "192.0.2.11", "198.51.100.21", "198.51.100.1"
ip = ipaddress.ip_address
# What handle_line may answer with: the documented errors, not E_FAIL (a handler's bug)
DOCUMENTED = set(ERRORS) - {SessionApiError.name}

# Values of every JSON type, and of the ranges and forms the parameters check. Strings
# starting with "raw:" go into the line as they are (JSON that json.dumps does not write).
WRONG: list[Any] = [
    None, True, False, 0, -1, 1, 6, 17, 65535, 65536, 2**31, 2**63, 2**64, -(2**63) - 1, 1.5, -0.0, 1e308,
    "", "x", "tcp", "udp", "TIMEOUT", "0.0.0.0", "::", "198.51.100.21", "2001:db8:2::21",
    "fe80::1%eth0", "999.1.1.1", "198.51.100.0/24", "\u0000", "é" * 300, "\ud800",
    "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101", "{5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101}",
    [], [1], [None], [[]], ["TIMEOUT", "TIMEOUT"], ["NOPE"], [1, 2], [2, 1], [0, 65535], [[S1, 1]],
    [[S1, 1, 2]], [[1, S1]], [[S1, "1"]], [[S1, 1]] * 65, [0] * 5000,
    {}, {"ranges": []}, {"ranges": None}, {"ranges": [[S1]]}, {"ranges": [[S1, "2001:db8::1"]]},
    {"ranges": [["a", "b"]]}, {"ranges": [[1, 2]]}, {"a": 1},
    "raw:NaN", "raw:Infinity", "raw:-Infinity", "raw:1e999", "raw:" + "9" * 5000, "raw:-" + "1" * 4301,
    "raw:" + "[" * 200 + "]" * 200, "raw:" + '{"a":' * 100 + "1" + "}" * 100, "raw:" + "[" * 900 + "]" * 900,
]


class World:
    """The session API over an engine with a SecureNAT session (c1's), a Firewall
    client's session with a bind, a filter registered on the caller's connection
    and a pending action: what a valid request of every method refers to."""

    def __init__(self, server: ControlServer, caller: Caller) -> None:
        self.engine = Engine(POLICY, INTERNAL, [ip(EXT), ip("2001:db8:2::1")], nat=True,
                             data_filters=["edit"],
                             internal_addresses=[ipaddress.ip_interface("192.0.2.1/24"),
                                                 ipaddress.ip_interface("2001:db8:1::1/64")])
        self.api = SessionApi(self.engine, lambda: 5.0)
        server.handlers = self.api.handlers()
        self.server, self.caller = server, caller
        self.session = self.engine.decide(pkt(C1, S1, 21), 1.0).session_id
        self.firewall = self.engine.open_firewall_session(ip(C1), "alice", 1.0).id
        self.bind = self.engine.bind_for_client(self.firewall, 6, ip(EXT), 1.0)
        self.filter = self.call("register_filter", {"name": "fuzz"})["result"]["filter"]
        self.action = self.call("allow_future_connect", {
            "session": self.session, "address": S1, "port": 20021, "protocol_guid": FTP})["result"]["action"]

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        return self.server.handle_line(json.dumps({"id": 1, "method": method, "params": params}).encode(),
                                       self.caller)

    def valid(self) -> dict[str, dict[str, Any]]:
        """A valid request of every method, every parameter it takes given."""
        grant = {"session": self.session, "protocol": "tcp", "flags": ["TIMEOUT"], "protocol_guid": FTP,
                 "proxy_external_address": EXT, "filter": self.filter, "context": {"n": [1]},
                 "data_filter": "edit"}
        return {
            "ping": {}, "sessions": {}, "flows": {"limit": 5}, "decisions": {"limit": 5},
            "allow_future_connect": {**grant, "address": S1, "port": 20021},
            "redirect_connections": {**grant, "addresses": [[S1, 20021], [S1, 20022]]},
            "register_connect_events": {"filter": self.filter, "protocol": "tcp", "ports": [20000, 20099]},
            "bind_for_client": {"session": self.session, "protocol": "udp", "client_port": 5000},
            "retroactive_allow_bind": {"session": self.firewall, "protocol": "tcp", "address": EXT,
                                       "port": self.bind.port, "protocol_guid": FTP, "flags": [],
                                       "ipfilter": {"ranges": [[S1, S1]]}},
            "binds": {"session": self.firewall}, "cancel": {"action": self.action},
            "action": {"action": self.action}, "actions": {"session": self.session},
            "end_session": {"session": self.firewall}, "register_filter": {"name": "another"},
        }

    def state(self) -> tuple[Any, ...]:
        """Everything a request could create or change."""
        e = self.engine
        return (sorted((p.id, p.state) for p in e.permissions.pending()),
                sorted((b.id, b.state, b.ipfilter) for b in e.binds.of(None)),
                sorted((s.id, s.connections) for s in e.sessions),
                sorted(self.api._filters), sorted(e.connect_registrations.items()),
                [p.in_use for p in e.pools.values()], e.bind_ports.in_use)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ControlServer, Caller]]:
    loop = Loop()
    srv = ControlServer(str(tmp_path / "c.sock"), {}, loop)
    a, b = socket.socketpair()
    try:
        yield srv, Caller(srv, a)
    finally:
        a.close()
        b.close()
        srv.close()
        loop.close()


def line_of(method: str, params: dict[str, Any], rid: Any = 7) -> bytes:
    """The request as one line; a "raw:" value goes in as it is."""
    raws: dict[str, str] = {}
    for name, value in params.items():
        if isinstance(value, str) and value.startswith("raw:"):
            raws[f'"@{name}@"'] = value[4:]
            params = {**params, name: f"@{name}@"}
    text = json.dumps({"id": rid, "method": method, "params": params})
    for placeholder, raw in raws.items():
        text = text.replace(placeholder, raw)
    return text.encode()


def expected_id(line: bytes) -> Any:
    """The id a reply must carry: the request's, where the line is a JSON object in
    UTF-8 that Python reads (a number of more than 4300 digits it does not) and the id
    an integer or a string."""
    try:
        request = json.loads(line.decode())
    except ValueError:
        return None
    rid = request.get("id") if isinstance(request, dict) else None
    return rid if type(rid) in (int, str) else None


def assert_answered(reply: Any, rid: Any, what: str) -> str:
    """A reply that can be sent, to the request's id: a result, or a documented error.
    Returns "result" or the error's name."""
    assert isinstance(reply, dict), what
    sent = encode(reply)
    assert sent.endswith(b"\n") and sent.count(b"\n") == 1, what
    assert reply["id"] == rid, f"{what}: id {reply['id']!r}"
    if "result" in reply:
        assert set(reply) == {"id", "result"}, what
        return "result"
    assert set(reply) == {"id", "error"}, f"{what}: {reply}"
    error = reply["error"]
    assert error["name"] in DOCUMENTED, f"{what}: {error}"
    assert error["hresult"] == f"0x{ERRORS[error['name']].hresult:08X}" and error["message"], what
    return str(error["name"])


def test_every_wrong_value_of_every_parameter_is_an_error_reply_and_changes_nothing(
        server: tuple[ControlServer, Caller]) -> None:
    srv, caller = server
    world = World(srv, caller)
    methods = world.valid()
    assert set(methods) == set(world.api.handlers()), "a method of the API is missing here"
    outcomes: dict[str, set[str]] = {}
    cases = 0
    for method, valid in methods.items():
        # the valid request itself succeeds, so that each wrong value is what fails
        assert assert_answered(World(srv, caller).call(method, valid), 1, method) == "result", method
        for name in [*valid, "unknown"]:
            for value in WRONG:
                world = World(srv, caller)
                before = world.state()
                line = line_of(method, {**world.valid()[method], name: value})
                what = f"{method} with {name}={str(value)[:60]!r}"
                outcome = assert_answered(srv.handle_line(line, caller), expected_id(line), what)
                outcomes.setdefault(method, set()).add(outcome)
                if outcome != "result":
                    assert world.state() == before, f"{what} failed and changed something"
                cases += 1
    print(f"{cases} requests with a wrong value; outcomes: {outcomes}")
    assert all("E_INVALIDARG" in outcomes[m] for m in methods), outcomes


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice((0, 1, -1, 2**31, 2**64, rng.getrandbits(20)))
    if kind == 3:
        return rng.choice((0.5, -1e300, 1e-300))
    if kind in (4, 5):
        return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0x10FFFF))))
                       for _ in range(rng.randrange(12)))
    if kind in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(("session", "port", "address", "protocol", "flags", "ranges", "x")):
            random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_random_bytes_broken_json_and_random_requests(server: tuple[ControlServer, Caller]) -> None:
    srv, caller = server
    rng = random.Random(SEED)
    world = World(srv, caller)
    valid = [line_of(m, p, rid=i) for i, (m, p) in enumerate(world.valid().items())]
    lines: list[bytes] = []
    for _ in range(5000):  # random bytes
        lines.append(rng.randbytes(rng.randrange(200)).replace(b"\n", b" "))
    for line in valid:  # every valid request cut short, and with bytes changed
        lines += [line[:cut] for cut in range(len(line))]
        for _ in range(200):
            broken = bytearray(line)
            for _ in range(rng.randrange(1, 4)):
                broken[rng.randrange(len(broken))] = rng.getrandbits(8)
            lines.append(bytes(broken))
    for _ in range(5000):  # random JSON, as a whole request, as a method's parameters and as an id
        method = rng.choice(sorted(world.valid()))
        request = rng.choice((random_json(rng), {"id": 3, "method": method, "params": random_json(rng)},
                              {"id": random_json(rng), "method": "ping"}))
        lines.append(json.dumps(request).encode())
    lines.append(b"x" * (MAX_REQUEST + 1))
    outcomes: dict[str, int] = {}
    for line in lines:
        outcome = assert_answered(srv.handle_line(line, caller), expected_id(line), repr(line[:120]))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"{len(lines)} lines; outcomes: {outcomes}")
    assert outcomes.get("result", 0) > 50 and outcomes["E_INVALIDARG"] > len(lines) // 2, outcomes

    # and the API still works: a grant, and the engine admits the flow it allows
    reply = world.call("allow_future_connect", {"session": world.session, "address": S1, "port": 30001,
                                                "protocol_guid": FTP})
    assert reply["result"]["state"] == "pending", reply
    decision = world.engine.decide(pkt(C1, S1, 30001, sport=41000), 6.0)
    assert decision.verdict is Verdict.ADMIT_KERNEL and decision.action_id == reply["result"]["action"]

