"""enforcer.control (handle_line, the socket's life), enforcer.client's connection and
enforcer.core.results (HRESULTs)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enforcer.client import EVENTS_KEPT, Client
from enforcer.control import MAX_UNSENT, REQUESTS_PER_TURN, Caller, ControlServer, SocketInUse
from enforcer.core import results
from enforcer.core.results import (
    ERRORS,
    InvalidArgument,
    IsBusy,
    NetworkRulesDenied,
    NotFound,
    PolicyRulesDenied,
    SessionApiError,
    Terminating,
)
from enforcer.loop import Loop
from enforcer.protocol import MAX_REQUEST, encode

SPEC_HRESULTS = {
    "E_INVALIDARG": 0x80070057,
    "NOT_FOUND": 0x80070490,
    "FWX_E_TERMINATING": 0xC0040001,
    "FWX_E_POLICY_RULES_DENIED": 0xC004000D,
    "FWX_E_NETWORK_RULES_DENIED": 0xC0040012,
    "FWX_E_IS_BUSY": 0xC0040011,
}


def _raise(exc: SessionApiError) -> Any:
    raise exc


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    calls: list[dict[str, Any]] = []
    handlers = {
        "ping": lambda p, c: {"pong": True},
        "echo": lambda p, c: (calls.append(p), p)[1],
        **{f"raise_{name}": (lambda p, c, cls=cls: _raise(cls(f"{cls.name} happened")))
           for name, cls in ERRORS.items()},
    }
    sel = Loop()
    srv = ControlServer(str(tmp_path / "c.sock"), handlers, sel)
    srv.calls = calls  # type: ignore[attr-defined]
    yield srv
    srv.close()
    sel.close()


def handle(server: ControlServer, line: bytes) -> dict[str, Any]:
    a, b = socket.socketpair()
    try:
        return server.handle_line(line, Caller(server, a))
    finally:
        a.close()
        b.close()


def call(server: ControlServer, line: bytes | str) -> dict[str, Any]:
    reply = handle(server, line.encode() if isinstance(line, str) else line)
    json.dumps(reply)  # every reply can be sent
    return reply


def assert_invalid(reply: dict[str, Any], rid: Any, *fragments: str) -> None:
    assert set(reply) == {"id", "error"}, reply
    assert reply["id"] == rid
    err = reply["error"]
    assert err["name"] == "E_INVALIDARG"
    assert err["hresult"] == "0x80070057"
    for f in fragments:
        assert f in err["message"], err["message"]


# --- handle_line ----------------------------------------------------------------------------

def test_ping(server: ControlServer) -> None:
    assert call(server, '{"id": 1, "method": "ping"}') == {"id": 1, "result": {"pong": True}}


def test_params_are_passed_and_default_to_empty(server: ControlServer) -> None:
    assert call(server, '{"id": "a", "method": "echo", "params": {"x": [1, 2]}}') == \
        {"id": "a", "result": {"x": [1, 2]}}
    assert call(server, '{"id": 2, "method": "echo"}') == {"id": 2, "result": {}}
    assert server.calls == [{"x": [1, 2]}, {}]  # type: ignore[attr-defined]


def test_missing_id_is_null(server: ControlServer) -> None:
    assert call(server, '{"method": "ping"}') == {"id": None, "result": {"pong": True}}


def test_unknown_method(server: ControlServer) -> None:
    reply = call(server, '{"id": 3, "method": "reboot"}')
    assert_invalid(reply, 3, "unknown method 'reboot'", "ping", "echo")


@pytest.mark.parametrize("line", [
    b"hello",
    b"",
    b"{",
    b'{"id": 1, "method": "pi',
    b'{"id": 1, "method": "ping"',
    b'{"id": 1 "method": "ping"}',
    b"{'id': 1, 'method': 'ping'}",
    b'{"id": 1, "method": "ping"} x',
], ids=repr)
def test_not_json(server: ControlServer, line: bytes) -> None:
    assert_invalid(call(server, line), None, "not valid JSON")


@pytest.mark.parametrize("line", [b"[1, 2]", b'"ping"', b"42", b"null", b"true",
                                  b'[{"method": "ping"}]'], ids=repr)
def test_json_that_is_not_an_object(server: ControlServer, line: bytes) -> None:
    assert_invalid(call(server, line), None, "must be a JSON object")


@pytest.mark.parametrize("method", ["5", "null", "true", '["ping"]', '{"m": "ping"}'])
def test_method_must_be_a_string(server: ControlServer, method: str) -> None:
    reply = call(server, f'{{"id": 9, "method": {method}}}')
    assert_invalid(reply, 9, "string 'method'")


def test_method_missing(server: ControlServer) -> None:
    assert_invalid(call(server, '{"id": 9, "params": {}}'), 9, "string 'method'")


@pytest.mark.parametrize("params", ["[1]", '"x"', "3", "null", "true"])
def test_params_must_be_an_object(server: ControlServer, params: str) -> None:
    reply = call(server, f'{{"id": 4, "method": "echo", "params": {params}}}')
    assert_invalid(reply, 4, "'params' must be a JSON object")
    assert server.calls == []  # type: ignore[attr-defined]


def _padded(size: int) -> bytes:
    head = b'{"id": 5, "method": "ping", "pad": "'
    tail = b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_oversized_line(server: ControlServer) -> None:
    line = _padded(MAX_REQUEST + 1)
    assert len(line) == MAX_REQUEST + 1
    assert_invalid(call(server, line), None, "request too large")


def test_line_at_the_limit_is_served(server: ControlServer) -> None:
    line = _padded(MAX_REQUEST)
    assert call(server, line) == {"id": 5, "result": {"pong": True}}


@pytest.mark.parametrize("line", [
    b'{"id": 1, "method": "\xff"}',
    b'{"id": 1, "method": "ping", "x": "\xc3\x28"}',
    b"\xff\xff\xff",
], ids=repr)
def test_invalid_utf8(server: ControlServer, line: bytes) -> None:
    reply = call(server, line)
    assert_invalid(reply, None, "not valid JSON")


@pytest.mark.parametrize("line", [
    '{"id": 1, "method": "ping"}'.encode("utf-16"),
    '{"id": 1, "method": "ping"}'.encode("utf-32-be"),
    b'{"id": 1, "method": "ping", "x": "\xed\xa0\x80"}',  # an encoded lone surrogate
], ids=["utf-16", "utf-32", "surrogate"])
def test_not_utf8_at_all(server: ControlServer, line: bytes) -> None:
    reply = call(server, line)
    assert "error" in reply


@pytest.mark.parametrize("line", [b"[" * 1000, b"[" * 50_000, b'{"a":' * 10_000],
                         ids=["1000-arrays", "arrays", "objects"])
def test_deeply_nested_json_is_an_error_reply(server: ControlServer, line: bytes) -> None:
    assert len(line) <= MAX_REQUEST
    reply = handle(server, line)
    assert_invalid(reply, None)


@pytest.mark.parametrize("line", [
    b'{"id": ' + b"1" * 5000 + b', "method": "ping"}',
    b'{"id": 1, "method": "echo", "params": {"x": -' + b"9" * 4301 + b"}}",
], ids=["id", "param"])
def test_a_number_too_long_to_convert_is_an_error_reply(server: ControlServer, line: bytes) -> None:
    # json.loads raises a plain ValueError (Python's limit on int digits), not a
    # JSONDecodeError: it escaped handle_line and stopped the daemon's event loop.
    assert_invalid(call(server, line), None, "not valid JSON", "digits")
    assert server.calls == []  # type: ignore[attr-defined]
    assert call(server, '{"id": 2, "method": "ping"}') == {"id": 2, "result": {"pong": True}}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_handler_error_is_reported(server: ControlServer, name: str) -> None:
    reply = call(server, f'{{"id": 11, "method": "raise_{name}", "params": {{}}}}')
    assert reply == {"id": 11, "error": {"name": name, "hresult": f"0x{ERRORS[name].hresult:08X}",
                                         "message": f"{name} happened"}}


@pytest.mark.parametrize(("cls", "hresult"), [
    (InvalidArgument, "0x80070057"),
    (NotFound, "0x80070490"),
    (Terminating, "0xC0040001"),
    (PolicyRulesDenied, "0xC004000D"),
    (NetworkRulesDenied, "0xC0040012"),
    (IsBusy, "0xC0040011"),
])
def test_documented_hresult_on_the_wire(tmp_path: Path, cls: type[SessionApiError], hresult: str) -> None:
    sel = Loop()
    srv = ControlServer(str(tmp_path / "h.sock"), {"m": lambda p, c: _raise(cls("why"))}, sel)
    try:
        reply = handle(srv, b'{"id": 0, "method": "m"}')
    finally:
        srv.close()
    assert reply == {"id": 0, "error": {"name": cls.name, "hresult": hresult, "message": "why"}}


# --- results ------------------------------------------------------------------------------

def test_errors_have_unique_names_and_spec_values() -> None:
    classes = list(ERRORS.values())
    assert len({c.name for c in classes}) == len(classes)
    assert len({c.hresult for c in classes}) == len(classes)
    for name, cls in ERRORS.items():
        assert cls.name == name
        assert issubclass(cls, SessionApiError)
    for name, value in SPEC_HRESULTS.items():
        assert ERRORS[name].hresult == value, name
    assert set(SPEC_HRESULTS) <= set(ERRORS)


def test_every_session_api_error_class_is_in_errors() -> None:
    defined = {obj for obj in vars(results).values()
               if isinstance(obj, type) and issubclass(obj, SessionApiError)}
    assert defined == set(ERRORS.values())


def test_error_to_dict() -> None:
    assert InvalidArgument("bad port").to_dict() == \
        {"name": "E_INVALIDARG", "hresult": "0x80070057", "message": "bad port"}
    assert Terminating("gone").to_dict()["hresult"] == "0xC0040001"
    assert str(IsBusy("full")) == "full"
    assert (results.S_OK, results.S_FALSE) == (0, 1)


# --- the socket ---------------------------------------------------------------------------

def test_socket_is_created_owner_only_and_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    sel = Loop()
    srv = ControlServer(str(path), {}, sel)
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) & 0o077 == 0
    srv.close()
    assert not path.exists()


def test_refuses_a_served_path_but_replaces_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    sel = Loop()
    first = ControlServer(str(path), {}, sel)
    try:
        with pytest.raises(SocketInUse):
            ControlServer(str(path), {}, Loop())
    finally:
        first.close()
    # A socket file nobody serves is a leftover: it is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert path.is_socket()
    again = ControlServer(str(path), {}, sel)
    again.close()


@pytest.mark.parametrize("what", ["file", "symlink", "directory"])
def test_refuses_a_path_that_holds_something_else(tmp_path: Path, what: str) -> None:
    """A socket path that names a file (a mistyped config) is never deleted in its place."""
    path = tmp_path / "enforcer.toml"
    if what == "directory":
        path.mkdir()
    elif what == "symlink":
        path.symlink_to(tmp_path / "nowhere")
    else:
        path.write_text("[network]\n")
    with pytest.raises(SocketInUse, match="exists and is not a socket: not replacing it"):
        ControlServer(str(path), {}, Loop())
    if what == "file":
        assert path.read_text() == "[network]\n"
    assert path.is_dir() if what == "directory" else path.is_symlink() or path.is_file()


def test_creates_the_socket_directory(tmp_path: Path) -> None:
    path = tmp_path / "d" / "c.sock"
    srv = ControlServer(str(path), {}, Loop())
    try:
        assert path.is_socket()
    finally:
        srv.close()


def _pump(server: ControlServer, client: socket.socket) -> None:
    """Run the server's callbacks until the client has something to read."""
    deadline = time.monotonic() + 5
    while not select.select([client], [], [], 0)[0] and time.monotonic() < deadline:
        server.loop.run_once(0.05)


def test_over_the_socket(server: ControlServer) -> None:
    """Root is served line by line; anyone else gets one refusal and is disconnected."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    try:
        client.connect(str(server.path))
        reader = client.makefile("rb")
        if os.geteuid() == 0:
            client.sendall(b'{"id": 1, "method": "ping"}\n{"id": 2, "meth')
            _pump(server, client)
            assert json.loads(reader.readline()) == {"id": 1, "result": {"pong": True}}
            client.sendall(b'od": "nope"}\nnot json\n')
            _pump(server, client)
            assert_invalid(json.loads(reader.readline()), 2, "unknown method 'nope'")
            assert_invalid(json.loads(reader.readline()), None, "not valid JSON")
        else:
            client.sendall(b'{"id": 1, "method": "ping"}\n')
            _pump(server, client)
            assert_invalid(json.loads(reader.readline()), None, "root only")
            assert reader.readline() == b""
    finally:
        client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a non-root peer is refused before it can send")
def test_over_the_socket_no_newline_within_the_limit(server: ControlServer) -> None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    try:
        client.connect(str(server.path))
        reader = client.makefile("rb")
        client.sendall(b"x" * (MAX_REQUEST + 10))
        _pump(server, client)
        assert_invalid(json.loads(reader.readline()), None, "request too large")
        assert reader.readline() == b""  # and the connection is closed
    finally:
        client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a non-root peer is refused before it can send")
def test_a_peer_that_hangs_up_before_its_replies_is_dropped(server: ControlServer) -> None:
    # The first reply fails to send (the peer is gone) and drops the connection; the
    # next buffered request then looked up its caller, raised KeyError out of the event
    # loop, and the daemon stopped.
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(server.path))
    client.sendall(b'{"id": 1, "method": "ping"}\n' * 3)
    client.close()
    for _ in range(10):
        server.loop.run_once(0.05)
    failed = {k: n for k, n in server.loop.counters.items() if k.startswith("errors")}
    assert not failed, server.loop.counters  # (a slow one, on a busy machine, is no failure)
    assert server._buffers == {} and server._callers == {}
    assert call(server, '{"id": 2, "method": "ping"}') == {"id": 2, "result": {"pong": True}}


def test_encode_is_one_line() -> None:
    out = encode({"id": 1, "result": {"text": "a\nb"}})
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    assert json.loads(out) == {"id": 1, "result": {"text": "a\nb"}}


@pytest.mark.skipif(os.geteuid() != 0, reason="a non-root peer is refused before it can send")
def test_many_requests_are_answered_a_turn_at_a_time(server: ControlServer) -> None:
    """A burst of requests does not hold the loop: at most REQUESTS_PER_TURN per turn, the
    rest on later turns, all answered in order."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    try:
        client.connect(str(server.path))
        server.loop.run_once(0.5)  # accept
        burst = REQUESTS_PER_TURN * 3 + 5
        client.sendall(b"".join(b'{"id": %d, "method": "echo"}\n' % i for i in range(burst)))
        server.loop.run_once(0.5)  # reads them all, answers the first turn's
        assert len(server.calls) == REQUESTS_PER_TURN  # type: ignore[attr-defined]
        for _ in range(4):
            server.loop.run_once(0.5)
        assert len(server.calls) == burst  # type: ignore[attr-defined]
        reader = client.makefile("rb")
        assert [json.loads(reader.readline())["id"] for _ in range(burst)] == list(range(burst))
    finally:
        client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a non-root peer is refused before it can send")
def test_a_client_that_sends_without_end_gets_a_turn_s_answers_a_turn(server: ControlServer) -> None:
    """A client that goes on sending while its requests wait for a later turn is not read
    meanwhile: each turn answers at most REQUESTS_PER_TURN of its requests (not a turn's
    for every read since), and what the enforcer holds of its requests stays one read's."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    burst = b"".join(b'{"id": %d, "method": "echo"}\n' % i for i in range(REQUESTS_PER_TURN * 3))
    try:
        client.connect(str(server.path))
        server.loop.run_once(0.5)  # accept
        calls = server.calls  # type: ignore[attr-defined]
        seen = 0
        for _ in range(12):
            client.sendall(burst)
            server.loop.run_once(0.5)
            assert 0 < len(calls) - seen <= REQUESTS_PER_TURN
            seen = len(calls)
            while select.select([client], [], [], 0)[0]:  # it reads its answers
                client.recv(1 << 20)
        assert max(map(len, server._buffers.values())) <= 65536 + len(burst)
    finally:
        client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a non-root peer is refused before it can send")
def test_a_client_that_does_not_read_never_stalls_the_loop(server: ControlServer) -> None:
    """Replies are never written blocking. A client that sends without reading is not read
    again until it reads (what is held for it stays small), and one that is pushed more
    events than MAX_UNSENT without reading is dropped."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    request = b'{"id": 1, "method": "echo", "params": {"pad": "%s"}}\n' % (b"x" * 30000)
    try:
        client.connect(str(server.path))
        server.loop.run_once(0.5)
        (conn,) = server._callers
        for _ in range(200):
            with contextlib.suppress(BlockingIOError):
                client.send(request)
            turn = time.monotonic()
            server.loop.run_once(0.01)
            assert time.monotonic() - turn < 0.5, "a turn blocked on a client that does not read"
        held = len(server._unsent[conn]) + len(server._buffers[conn])
        assert 0 < held < MAX_UNSENT
        caller = server._callers[conn]
        event = {"event": "connect", "pad": "y" * 100_000}
        for _ in range(MAX_UNSENT // 100_000 + 2):
            caller.push(event)
        assert conn not in server._callers, "a client that never reads its events was kept"
    finally:
        client.close()


def test_accept_out_of_descriptors_pauses_the_listener(server: ControlServer) -> None:
    """EMFILE on accept: the listener rests instead of spinning (its socket stays readable)."""
    real = server.sock

    class Exhausted:
        def fileno(self) -> int:
            return real.fileno()

        def accept(self) -> tuple[socket.socket, object]:
            raise OSError(errno.EMFILE, "Too many open files")

    server.sock = Exhausted()  # type: ignore[assignment]
    try:
        server._accept()
        assert not server.loop.watched(real)
        assert server.loop.counters["accept paused: EMFILE"] == 1
    finally:
        server.sock = real
    due = server.loop.next_timer()
    assert due is not None
    time.sleep(max(0.0, due - time.monotonic()))
    server.loop.run_once(0)
    assert server.loop.watched(real)


def _connected(server: ControlServer) -> socket.socket:
    """A client connection to ``server``, accepted."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(server.path))
    server.loop.run_once(0.5)  # accept
    return client


def _ask(server: ControlServer, client: socket.socket, line: bytes) -> dict[str, Any]:
    """Send one request line and read its reply, running the server meanwhile (the
    connection must stay open)."""
    client.sendall(line + b"\n")
    got = b""
    deadline = time.monotonic() + 10
    while not got.endswith(b"\n"):
        assert time.monotonic() < deadline, f"no reply to {line[:60]!r}"
        server.loop.run_once(0.01)
        while select.select([client], [], [], 0)[0]:
            chunk = client.recv(1 << 20)
            assert chunk, f"the connection closed after {line[:60]!r}"
            got += chunk
    reply: dict[str, Any] = json.loads(got)
    return reply


@pytest.mark.skipif(os.geteuid() != 0, reason="a non-root peer is refused before it can send")
def test_a_reply_too_large_to_hold_is_an_error_and_the_connection_goes_on(
        server: ControlServer, caplog: pytest.LogCaptureFixture) -> None:
    """A reply larger than MAX_UNSENT on its own would drop a client however it reads
    (as one that does not read its replies): it gets an error reply instead."""
    server.handlers["big"] = lambda p, c: "x" * int(p["size"])
    framing = len(encode({"id": 1, "result": ""}))
    client = _connected(server)
    try:
        reply = _ask(server, client, b'{"id": 1, "method": "big", "params": {"size": %d}}'
                     % MAX_UNSENT)
        assert_invalid(reply, 1, f"reply too large: {MAX_UNSENT + framing} bytes",
                       "ask with a smaller 'limit'")
        assert _ask(server, client, b'{"id": 2, "method": "ping"}') == \
            {"id": 2, "result": {"pong": True}}
        # one at the cap is sent whole
        reply = _ask(server, client, b'{"id": 1, "method": "big", "params": {"size": %d}}'
                     % (MAX_UNSENT - framing))
        assert len(reply["result"]) == MAX_UNSENT - framing
    finally:
        client.close()
    assert not [r for r in caplog.records if "does not read" in r.getMessage()]


@pytest.mark.skipif(os.geteuid() != 0, reason="a non-root peer is refused before it can send")
def test_an_id_that_is_not_a_scalar_is_an_error_reply_and_the_connection_goes_on(
        server: ControlServer, caplog: pytest.LogCaptureFixture) -> None:
    """The reply echoes the id: one nested deeply enough to parse but not to encode a
    frame deeper raised out of the callback (a traceback, the connection closed, no
    reply). Only an integer, a string or null is taken."""
    lines = [b'{"id": %s, "method": "ping"}' % (b"[" * depth + b"]" * depth)
             for depth in range(950, 1001)]
    lines += [b'{"id": [1], "method": "ping"}', b'{"id": {"a": 1}, "method": "ping"}',
              b'{"id": true, "method": "ping"}', b'{"id": 1.5, "method": "ping"}']
    client = _connected(server)
    try:
        for i, line in enumerate(lines):
            reply = _ask(server, client, line)
            assert reply["id"] is None and reply["error"]["name"] == "E_INVALIDARG", line[-40:]
            assert _ask(server, client, b'{"id": %d, "method": "ping"}' % i) == \
                {"id": i, "result": {"pong": True}}
        named = [_ask(server, client, line)["error"]["message"] for line in lines[-4:]]
        assert named == [f"'id' must be an integer, a string or null, not {kind}"
                         for kind in ("list", "dict", "bool", "float")]
    finally:
        client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no callback failed


def test_the_client_keeps_the_last_events_it_is_sent_while_it_waits(tmp_path: Path) -> None:
    """A filter's process that registered for events but only makes calls: what it is
    sent while it waits for a reply is kept up to EVENTS_KEPT (the oldest let go,
    counted); the reply still comes."""
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.settimeout(30)
    listener.bind(str(path))
    listener.listen(1)
    flood = 200_000

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            request = json.loads(conn.makefile("rb").readline())
            conn.sendall(b"".join(b'{"event":"connect","n":%d}\n' % n for n in range(flood)))
            conn.sendall(encode({"id": request["id"], "result": {"pong": True}}))

    server_thread = threading.Thread(target=serve)
    server_thread.start()
    try:
        with Client(str(path), timeout=30) as client:
            assert client.call("ping") == {"pong": True}
            assert len(client.events) == EVENTS_KEPT
            assert client.events_dropped == flood - EVENTS_KEPT
            assert [e["n"] for e in client.events] == list(range(flood - EVENTS_KEPT, flood))
            assert client.next_event(0)["n"] == flood - EVENTS_KEPT  # type: ignore[index]
    finally:
        server_thread.join()
        listener.close()
