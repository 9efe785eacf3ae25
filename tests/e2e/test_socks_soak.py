"""A SOCKS soak (issue 13): one client opens 2,000 connections to the SOCKS service, half
of them idle before authentication (nothing sent, or half a greeting), the other half
reset at every step of every SOCKS path in turn, with a first burst of idle ones past
its cap; meanwhile another client relays through the service. At the end the daemon is
alive, no error was counted, the caps held and were let go, the other client's bytes
all came back unchanged, the first client is served again, and the daemon's resident
memory is below what the caps imply. The figures are printed (run with -s).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from testbed.clauses.helpers import assert_echoed, socks_open
from testbed.lab import SOCKS_PORT, SOCKS_USERS
from testbed.plugin import Lab, Net, cancel_pending

CAPS = {"socks_handshake_timeout": 1, "socks_bind_timeout": 2, "socks_buffer_bytes": 4096,
        "socks_connections_per_client": 48, "socks_connections_total": 96}
BURST = 200  # idle connections at once, first: past the per-client cap
IDLE, STEPS = 800, 1000  # then idle ones (40 at a time) beside the resets at every step
ECHO_PORT, DNS_PORT = 21, 53


def other_client(net: Net, stop: threading.Event, counts: dict[str, Any]) -> None:
    """c2 relays 20 kB through a CONNECT, and a datagram through a UDP ASSOCIATE, round
    after round, each compared with what it sent."""
    server = net.addr("s1")
    while not stop.wait(0.05):
        try:
            with socks_open(net, "c2", "bob", "connect", server, ECHO_PORT) as conn:
                ok = conn.reply is not None and conn.reply["code"] == 0 and \
                    conn.exchange(20_000)["received"] == 20_000
            with socks_open(net, "c2", "bob", "udp", "0.0.0.0", 0) as assoc:
                ok = ok and assoc.udp(server, DNS_PORT, b"c2's datagram", expect_reply=True)["reply"] \
                    == b"c2's datagram"
        except Exception as exc:  # counted and shown: the check fails on it
            ok = False
            counts.setdefault("errors", []).append(repr(exc))
        counts["ok" if ok else "failed"] += 1


def monitor(net: Net, stop: threading.Event, peak: dict[str, int]) -> None:
    """The most SOCKS connections the status showed held, by one client and in all."""
    while not stop.wait(0.2):
        limits = net.call("status")["limits"]
        peak["per_client"] = max(peak["per_client"], limits["socks_connections_per_client"]["highest"])
        peak["total"] = max(peak["total"], limits["socks_connections_total"]["used"])


@pytest.mark.alone  # how long an idle connection lasts is checked to a second: nothing beside it
@pytest.mark.topologies("routed")
@pytest.mark.parametrize("family", ["ipv4"])
def test_a_socks_soak_ends_alive_within_its_caps(lab: Lab, family: str) -> None:
    lab.use("enforcer", limits=CAPS)
    net = Net(lab, family)
    c1, s1, server = net.agent("c1"), net.agent("s1"), net.addr("s1")
    proxy = (net.fw_internal("c1"), SOCKS_PORT)
    before = net.call("status")
    errors_before = {k: v for k, v in before["counters"].items() if k.startswith("errors")}
    other: dict[str, Any] = {"ok": 0, "failed": 0}
    stop = threading.Event()
    started = time.monotonic()
    with s1.tcp_server(server, ECHO_PORT), s1.udp_server(server, DNS_PORT):
        peak = {"per_client": 0, "total": 0}
        threads = [threading.Thread(target=other_client, args=(net, stop, other), daemon=True),
                   threading.Thread(target=monitor, args=(net, stop, peak), daemon=True)]
        for thread in threads:
            thread.start()
        try:
            storm = {"target": (server, ECHO_PORT), "udp_target": (server, DNS_PORT),
                     "handshake_timeout": CAPS["socks_handshake_timeout"]}
            burst = c1.socks_storm(proxy, "alice", SOCKS_USERS["alice"], idle=BURST, steps=0,
                                   idle_at_once=BURST, seconds=30, **storm)
            # the steps spread over the time the idle ones take (40 at once, each held 1 s)
            mixed = c1.socks_storm(proxy, "alice", SOCKS_USERS["alice"], idle=IDLE, steps=STEPS,
                                   idle_at_once=40, seconds=120, step_gap=IDLE / 40 / STEPS, **storm)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        took = time.monotonic() - started
        # what c1 held is let go (a held BIND's wait at the latest)
        deadline = time.monotonic() + 5
        while (status := net.call("status"))["limits"]["socks_connections_total"]["used"]:
            assert time.monotonic() < deadline, status["limits"]["socks_connections_total"]
            time.sleep(0.1)
        with socks_open(net, "c1", "alice", "connect", server, ECHO_PORT) as again:
            assert again.reply is not None and again.reply["code"] == 0, (again.error, again.reply)
            assert_echoed(again.exchange(20_000), 20_000, "a relay after the storm")
    cancel_pending(lab)

    limits, counters, memory = status["limits"], status["counters"], status["memory"]
    socks_caps = {k: v for k, v in limits.items() if k.startswith("socks_")}
    socks_counters = {k: v for k, v in counters.items() if k.startswith(("socks", "refused: socks"))}
    print(f"\nSOCKS soak: {BURST + IDLE + STEPS} connections from c1 in {took:.1f} s")
    print(f"  burst of idle ones: {burst['idle']}")
    print(f"  idle ones beside the steps: {mixed['idle']}")
    print(f"  resets, step: [reached, refused]: {mixed['steps']}; relayed and compared: {mixed['compared']}")
    print(f"  seconds the steps took: {mixed['step_seconds']}")
    print(f"  c2 meanwhile: {other['ok']} rounds relayed and compared, {other['failed']} failed")
    print(f"  the most held, by c1 and in all (status, every 0.2 s): {peak}")
    print(f"  caps and use: {socks_caps}")
    print(f"  counters: {socks_counters}")
    print(f"  enforcer RSS {memory['rss'] / 2**20:.1f} MiB; the caps imply at most "
          f"{memory['bound']['total'] / 2**20:.1f} MiB")

    assert net.call("ping") == {"pong": True}
    assert {k: v for k, v in counters.items() if k.startswith("errors")} == errors_before, \
        "an exception left the event loop"
    for storm_result in (burst, mixed):
        assert storm_result["idle"]["left_open"] == 0, storm_result["idle"]
        # an idle connection lasts no longer than the handshake's timeout (and a turn or two)
        assert storm_result["idle"]["longest"] < CAPS["socks_handshake_timeout"] + 1.0, storm_result["idle"]
    assert burst["idle"]["refused"] >= BURST - CAPS["socks_connections_per_client"], burst["idle"]
    assert mixed["idle"]["timed_out"] + burst["idle"]["timed_out"] >= IDLE // 2
    assert all(reached for reached, _ in mixed["steps"].values()), f"a step never reached: {mixed['steps']}"
    assert mixed["compared"][1] == 0, f"relayed bytes came back changed: {mixed}"
    assert other["failed"] == 0 and other["ok"] > 0, other
    assert 0 < peak["per_client"] <= CAPS["socks_connections_per_client"], peak
    assert peak["total"] <= CAPS["socks_connections_total"], peak
    assert limits["socks_connections_per_client"]["refused"] > 0
    assert counters.get("socks: handshake timed out", 0) >= IDLE // 2
    assert memory["rss"] < memory["bound"]["total"], memory
