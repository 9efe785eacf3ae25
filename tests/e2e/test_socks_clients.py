"""The SOCKS5 service with clients it did not write: curl, and broken or refused requests."""

from __future__ import annotations

import subprocess
import time
from typing import Any

from testbed import socks5, timeouts
from testbed.clauses.helpers import assert_echoed, socks_open
from testbed.lab import SOCKS_PORT, SOCKS_USERS
from testbed.plugin import Net


def test_malformed_socks_requests_get_their_reply_and_the_service_goes_on(net: Net) -> None:
    """Each broken or refused request gets the SOCKS answer RFC 1928/1929 has for it (or,
    where it has none, the connection is closed); then a good request still works."""
    c1, s1 = net.agent("c1"), net.agent("s1")
    proxy = net.topology.fw_internal_address(net.family)  # type: ignore[arg-type]
    dst = net.addr("s1")
    login = socks5.greeting("alice") + socks5.login("alice", SOCKS_USERS["alice"])
    accepted = b"\x05\x02\x01\x00"  # method user/password, then login accepted

    def failure(code: int) -> bytes:  # RFC 1928 section 6, with BND 0.0.0.0:0
        return bytes([5, code, 0, 1]) + bytes(6)

    cases = [
        (b"GET / HTTP/1.0\r\n\r\n", b""),
        (socks5.greeting(None), b"\x05\xff"),  # this service wants a login
        (socks5.greeting("alice") + socks5.login("alice", "wrong"), b"\x05\x02\x01\x01"),
        (login + b"\x05\x09\x00\x01" + bytes(6), accepted + failure(7)),  # command not supported
        (login + b"\x05\x01\x00\x09" + bytes(6), accepted + failure(8)),  # address type not supported
        (login + socks5.request("connect", "server.example", 21), accepted + failure(8)),
        (login + socks5.request("connect", dst, 22), accepted + failure(2)),  # SSH: allowed to no one
    ]
    for sent, expected in cases:
        with c1.tcp_open(proxy, SOCKS_PORT) as conn:
            assert conn.connected, conn.error
            got = conn.talk(sent, expect=len(expected) + 1)  # one more: the connection must end
            assert got == expected, f"sent {sent!r}: got {got!r}, expected {expected!r}"
    with s1.tcp_server(dst, 21), socks_open(net, "c1", "alice", "connect", dst, 21) as good:
        assert good.reply is not None and good.reply["code"] == 0, good.reply
        assert_echoed(good.exchange(5000), 5000, "the relay of the good login")


def test_curl_connects_through_the_socks_service(net: Net, tmp_path: Any) -> None:
    """A real third-party SOCKS client: curl, logged in as alice, fetches a file from s1
    over CONNECT; the session is alice's on c1, and HTTP (which only c1 may use) is judged
    by the client's address."""
    page = tmp_path / "index.html"
    page.write_text("through the fw\n")
    server = net.lab.tb.popen("s1", ["python3", "-m", "http.server", "80", "--bind", net.addr("s1"),
                                     "--directory", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(net, "s1", 80)
        proxy = net.topology.fw_internal_address(net.family)  # type: ignore[arg-type]
        host = net.addr("s1") if net.family == "ipv4" else f"[{net.addr('s1')}]"
        phost = proxy if net.family == "ipv4" else f"[{proxy}]"
        result = net.lab.tb.run("c1", ["curl", "-sS", "--max-time", "10", "--proxy",
                                       f"socks5://alice:{SOCKS_USERS['alice']}@{phost}:{SOCKS_PORT}",
                                       f"http://{host}/index.html"], check=False)
        assert result.returncode == 0 and result.stdout == "through the fw\n", (result.stdout, result.stderr)
        decisions = [d for d in net.call("decisions", limit=10000) if d["flow"].endswith(":80")
                     and d["verdict"] != "drop"]
        assert decisions and "HTTP" in decisions[-1]["reason"], decisions[-3:]
    finally:
        server.kill()
        server.wait()
        net.lab.tb.forget(server.pid)


def wait_listening(net: Net, node: str, port: int) -> None:
    deadline = time.monotonic() + timeouts.POSITIVE
    while f":{port} " not in net.lab.tb.run(node, ["ss", "-Hltn"]).stdout:
        assert time.monotonic() < deadline, f"nothing listens on {node} port {port}"
        time.sleep(0.05)
