"""A hostile client's soak: spoofed sources, PORT floods, TFTP and SYN floods, grant floods
and random packets at once, against an enforcer with modest caps. The daemon must be
alive at the end, still deciding, every cap held, and its resident memory below the
figure the caps imply (both printed; run with -s to see them)."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from testbed.flood import TFTP_REQUEST, Flood
from testbed.fuzz import Allowed, Fuzz
from testbed.lab import GUIDS
from testbed.plugin import APP_FILTERS, Lab, Net
from testbed.session_api import Flags, SessionApiError

SECONDS = 20
CAPS = {"sessions_total": 300, "sessions_per_client": 4, "pending_total": 4000,
        "pending_per_client": 1000, "binds_total": 200, "binds_per_client": 32,
        "user_flows_total": 600, "user_flows_per_client": 200, "flows_per_client": 2000,
        "buffered_bytes_total": 8 << 20, "buffered_bytes_per_client": 1 << 20}
SPOOFED = 240  # source addresses c2 makes up on its own network


def spoof_primaries(net: Net, until: float) -> int:
    """c2 opens FTP primaries in the names of SPOOFED made-up neighbours (each a session
    for the enforcer to hold), round after round; how many SYNs it sent."""
    c2, server = net.agent("c2"), net.addr("s1")
    sent, round_ = 0, 0
    while time.monotonic() < until:
        c2.send([IP(src=f"192.0.2.{10 + i}", dst=server) / TCP(sport=30000 + round_ % 1000, dport=21,
                                                               flags="S")
                 for i in range(SPOOFED) if 10 + i not in (11, 12)])
        sent += SPOOFED - 2
        round_ += 1
        time.sleep(0.5)
    return sent


def random_packets(net: Net, until: float) -> int:
    """Random and malformed packets at both of the fw's sides, as frames to its MACs;
    how many."""
    fuzz = Fuzz(net, random.Random(20261206), Allowed(net), [])
    senders = {"internal": ("c1", net.topology.fw_internal_iface),
               "external": ("s1", net.topology.fw_external_iface)}
    sent = 0
    while time.monotonic() < until:
        for side, (node, fw_iface) in senders.items():
            frame = Ether(src=net.mac(node), dst=net.mac("fw", fw_iface), type=0x0800)
            net.agent(node).send([frame / Raw(fuzz.packet(side)) for _ in range(100)],
                                 iface=net.iface(node))
            sent += 100
    return sent


def grant_flood(net: Net, until: float, session: int) -> int:
    """Grant calls for c1's session until the caps refuse them, and on; how many."""
    calls = 0
    with net.client() as api:
        while time.monotonic() < until:
            with contextlib.suppress(SessionApiError):  # refused at a cap: that is the point
                api.allow_future_connect(session, (net.addr("s1"), 10000 + calls % 50000),
                                         protocol_guid=GUIDS["FTP"], flags=Flags.TIMEOUT)
            calls += 1
    return calls


@pytest.mark.alone  # its floods would slow the checks beside it
@pytest.mark.topologies("nat")
@pytest.mark.parametrize("family", ["ipv4"])
def test_a_hostile_client_soak_ends_alive_within_the_memory_the_caps_imply(lab: Lab, family: str) -> None:
    lab.use("enforcer", APP_FILTERS, limits=CAPS)
    net = Net(lab, family)
    session = net.session("c1")
    until = time.monotonic() + SECONDS
    counts: dict[str, Any] = {}

    def run(name: str, work: Any, *args: Any) -> None:
        counts[name] = work(net, until, *args)

    threads = [threading.Thread(target=run, args=args, daemon=True) for args in
               (("spoofed SYNs", spoof_primaries), ("random packets", random_packets),
                ("grant calls", grant_flood, session))]
    # ROB-01's flood (its PORT lines need an FTP control connection, which the caps refuse
    # once the spoofed sessions hold them: it opens first), then new flows and TFTP
    # requests until the end
    with Flood(net, "c2", "s1") as flood:
        for thread in threads:
            thread.start()
    assert not flood.counts.errors, flood.counts.errors
    counts["flood"] = flood.counts.summary()
    c2, more = net.agent("c2"), 0
    while time.monotonic() < until:
        more += int(c2.connect_flood(net.addr("s1"), 21, 2_000)["sent"])
        more += int(c2.datagram_flood(net.addr("s1"), 69, 500, TFTP_REQUEST)["sent"])
    for thread in threads:
        thread.join(60)
    counts["new flows and TFTP requests after it"] = more

    status = net.call("status")
    memory = status["memory"]
    print(f"\nsoak for {SECONDS} s: {counts}")
    print(f"enforcer RSS {memory['rss'] / 2**20:.1f} MiB; the caps imply at most "
          f"{memory['bound']['total'] / 2**20:.1f} MiB")
    print("caps and use:", {k: v for k, v in status["limits"].items()})
    assert net.call("ping") == {"pong": True}
    assert memory["rss"] < memory["bound"]["total"], memory
    for name, cap in status["limits"].items():
        if isinstance(cap, dict) and "cap" in cap and "use" in cap:
            assert cap["use"] <= cap["cap"], (name, cap)
    # still deciding: c1's DNS primary (kernel mode: the spoofed sessions' held FTP flows
    # fill the user-mode caps, as they should) is admitted and answered
    with net.agent("s1").udp_server(net.addr("s1"), 53):
        answer = net.agent("c1").udp_send(net.addr("s1"), 53, b"still deciding", expect_reply=True)
    assert answer["reply"] == b"still deciding", answer
