"""Grants the kernel holds, end to end: a single-use kernel-mode grant's first packet never
reaches the queue, the enforcer hears of the flow after, the grant is used once, and a
grant admits nothing once its enforcer is gone (rule 15), however it went."""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections import Counter

import pytest

from enforcer.client import Client
from testbed.build import Testbed
from testbed.clauses.helpers import assert_echoed, wait_until
from testbed.lab import GUIDS, MAX_PENDING_PER_SESSION, EnforcerProcess

HOSTS = {"ipv4": ("192.0.2.11", "198.51.100.21"), "ipv6": ("2001:db8:1::11", "2001:db8:2::21")}
HEARD_WITHIN = 2.0  # seconds: the enforcer reads the kernel's notices 10 ms apart; a busy VM is slower


TESTBED_TAG = "test-kgrants"  # (tests/e2e/conftest.py: tb, enforcer)


def queued(tb: Testbed) -> int:
    """How many packets the fw's queues have been given so far (each queue's id_sequence)."""
    lines = tb.run("fw", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.splitlines()
    return sum(int(line.split()[7]) for line in lines)


def arrived(tb: Testbed) -> int:
    """Packets the fw has received on its interface to the clients so far."""
    link = json.loads(tb.run("fw", ["ip", "-j", "-s", "link", "show", "int0"]).stdout)
    return int(link[0]["stats64"]["rx"]["packets"])


def held(tb: Testbed, family: str) -> str:
    """The keys of the grants the kernel holds for a family."""
    proto = "ip" if family == "ipv4" else "ip6"
    return str(tb.run("fw", ["nft", "list", "set", "inet", "pinhole_maps", f"grant_{proto}"]).stdout)


def session_of(tb: Testbed, api: Client, family: str) -> int:
    """c1's SecureNAT session, made by a primary FTP connection."""
    client, server = HOSTS[family]
    with tb.agent("s1").tcp_server(server, 21):
        assert tb.agent("c1").tcp_connect(server, 21, send_bytes=10)["connected"]
    (session,) = [s for s in api.call("sessions") if s["client"] == client]
    return int(session["id"])


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_the_kernel_admits_a_grants_first_packet_and_the_enforcer_hears_of_it(
        tb: Testbed, enforcer: EnforcerProcess, family: str) -> None:
    client, server = HOSTS[family]
    c1, s1 = tb.agent("c1"), tb.agent("s1")
    with Client(str(enforcer.socket)) as api, s1.tcp_server(server, 31002):
        session = session_of(tb, api, family)
        action = api.allow_future_connect(session, (server, 31002), protocol_guid=GUIDS["FTP"])
        assert enforcer.call("status")["kernel_grants"]["held"] == 1
        assert f"{client} . {server} . tcp . 31002" in held(tb, family)
        before = queued(tb)
        result = c1.tcp_connect(server, 31002, send_bytes=20_000)
        assert_echoed(result, 20_000, "the flow the kernel admitted")
        assert queued(tb) == before, "a packet of the flow the kernel admitted reached the queue"
        assert "31002" not in held(tb, family), "the kernel did not use the grant up"

        def heard() -> bool:
            return bool(enforcer.call("status")["counters"].get("kernel grants: used") == 1)
        wait_until(heard, "the enforcer hears of the flow", within=HEARD_WITHIN)
        used = api.call("action", action=action.id)
        assert used["state"] == "consumed" and used["admitted"] == 1, used
        flows = [f for f in enforcer.call("flows") if f["action"] == action.id]
        assert len(flows) == 1 and flows[0]["mode"] == "kernel" and "31002" in flows[0]["flow"], flows
        assert enforcer.call("status")["kernel_grants"]["held"] == 0

        # single use: the next flow reaches the enforcer, which has no grant for it
        second = c1.tcp_connect(server, 31002, timeout=1.0)
        assert not second["connected"] and "timed out" in second["error"], second
        assert queued(tb) > before, "the second SYN never reached the enforcer"


def test_grants_end_in_the_kernel_as_they_end_in_the_enforcer(tb: Testbed, enforcer: EnforcerProcess) -> None:
    """Cancel and a session's end take the grant from the kernel before the call returns;
    a grant of a key the kernel holds already stays the enforcer's, and is used once too."""
    client, server = HOSTS["ipv4"]
    c1, s1 = tb.agent("c1"), tb.agent("s1")
    with Client(str(enforcer.socket)) as api, s1.tcp_server(server, 31003):
        session = session_of(tb, api, "ipv4")
        first = api.allow_future_connect(session, (server, 31003), protocol_guid=GUIDS["FTP"])
        first.cancel()
        assert "31003" not in held(tb, "ipv4")
        assert not c1.tcp_connect(server, 31003, timeout=1.0)["connected"]

        kernel = api.allow_future_connect(session, (server, 31003), protocol_guid=GUIDS["FTP"])
        user = api.allow_future_connect(session, (server, 31003), protocol_guid=GUIDS["FTP"])
        assert enforcer.call("status")["kernel_grants"]["held"] == 1
        assert c1.tcp_connect(server, 31003, send_bytes=100)["connected"]
        assert c1.tcp_connect(server, 31003, send_bytes=100)["connected"]
        assert not c1.tcp_connect(server, 31003, timeout=1.0)["connected"], "three flows by two grants"
        wait_until(lambda: api.call("action", action=kernel.id)["state"] == "consumed",
                   "the enforcer hears of the kernel's flow", within=HEARD_WITHIN)
        assert api.call("action", action=user.id)["state"] == "consumed"

        api.allow_future_connect(session, (server, 31003), protocol_guid=GUIDS["FTP"])
        assert f"{client} . {server} . tcp . 31003" in held(tb, "ipv4")
        api.call("end_session", session=session)
        assert "31003" not in held(tb, "ipv4")


def test_a_killed_enforcers_grants_admit_nothing(tb: Testbed, enforcer: EnforcerProcess) -> None:
    """The kernel keeps a dead enforcer's grants until the next start replaces them, but they
    need the table only a live enforcer's process holds (SIGKILL takes it away)."""
    client, server = HOSTS["ipv4"]
    c1, s1 = tb.agent("c1"), tb.agent("s1")
    with Client(str(enforcer.socket)) as api:
        session = session_of(tb, api, "ipv4")
        api.allow_future_connect(session, (server, 31004), protocol_guid=GUIDS["FTP"])
    assert "pinhole_live" in str(tb.run("fw", ["nft", "list", "tables"]).stdout)
    enforcer.kill()
    assert "pinhole_live" not in str(tb.run("fw", ["nft", "list", "tables"]).stdout)
    assert f"{client} . {server} . tcp . 31004" in held(tb, "ipv4")
    with s1.tcp_server(server, 31004) as listener:
        before = arrived(tb)
        result = c1.tcp_connect(server, 31004, timeout=1.0)
        # the SYN reached the fw and went no further; nothing answered it (no reset)
        assert arrived(tb) > before, "the SYN never reached the fw"
        assert not result["connected"] and "timed out" in result["error"], result
        assert listener.stats()["accepted"] == 0
    assert f"{client} . {server} . tcp . 31004" in held(tb, "ipv4"), "the dead run's grant was used"
    enforcer.start()
    assert "31004" not in held(tb, "ipv4"), "a new run took over a dead run's grant"


def test_without_kernel_grants_the_enforcer_matches_them_and_a_restart_turns_them_on(
        tb: Testbed, enforcer: EnforcerProcess) -> None:
    """``kernel_grants = false``: no table of the enforcer's lives in the kernel and the
    grant's first packet reaches the queue; a restart by the control socket with them on
    holds the next grant in the kernel (the stopped run's table gone, the new one's there)."""
    client, server = HOSTS["ipv4"]
    c1, s1 = tb.agent("c1"), tb.agent("s1")
    enforcer.restart(dataplane={"kernel_grants": False})
    assert enforcer.call("status")["kernel_grants"] is None
    assert "pinhole_live" not in str(tb.run("fw", ["nft", "list", "tables"]).stdout)
    with Client(str(enforcer.socket)) as api, s1.tcp_server(server, 31005):
        action = api.allow_future_connect(session_of(tb, api, "ipv4"), (server, 31005),
                                          protocol_guid=GUIDS["FTP"])
        assert "31005" not in held(tb, "ipv4")
        before = queued(tb)
        assert c1.tcp_connect(server, 31005, send_bytes=100)["connected"]
        assert queued(tb) > before and action.state == "consumed"
    enforcer.restart()
    assert enforcer.call("status")["kernel_grants"] == {"held": 0, "notices_lost": 0}
    with Client(str(enforcer.socket)) as api:
        api.allow_future_connect(session_of(tb, api, "ipv4"), (server, 31006), protocol_guid=GUIDS["FTP"])
    assert f"{client} . {server} . tcp . 31006" in held(tb, "ipv4")
    assert str(tb.run("fw", ["nft", "list", "tables"]).stdout).count("pinhole_live") == 1


POOL = range(31100, 31106)  # the target ports of the mixed run below
SEED = 20261202


def held_ports(tb: Testbed, family: str) -> list[int]:
    """The target ports of the pool among the keys the kernel holds for a family, each as
    often as it is there."""
    keys = held(tb, family)
    return sorted(port for port in POOL for _ in range(keys.count(f". tcp . {port}")))


def test_the_kernel_holds_only_grants_the_enforcer_has_pending(
        tb: Testbed, enforcer: EnforcerProcess) -> None:
    """A seeded mix of grants of every kind (single use, ALLOW_MULTIPLE, NO_KERNEL_MODE,
    TIMEOUT; a key granted twice), cancels, connections that use them, expiry and a
    session's end, both families. After every step, no key the kernel holds lacks a pending
    single-use kernel-mode grant of the enforcer's (a key left behind would admit a flow
    nothing permits: the firewall open), the enforcer's count of them is the kernel's, and
    a connection opens exactly where a grant is pending."""
    rng = random.Random(SEED)
    c1, s1 = tb.agent("c1"), tb.agent("s1")
    kinds = {"single": [], "multiple": ["ALLOW_MULTIPLE"], "user": ["NO_KERNEL_MODE"],
             "timeout": ["TIMEOUT"]}
    with Client(str(enforcer.socket)) as api, contextlib.ExitStack() as stack:
        for family in HOSTS:
            for port in POOL:
                stack.enter_context(s1.tcp_server(HOSTS[family][1], port))
        sessions = {family: session_of(tb, api, family) for family in HOSTS}
        made: dict[int, tuple[str, int, str]] = {}  # action -> family, port, kind
        did: Counter[str] = Counter()

        def pending() -> dict[int, tuple[str, int, str]]:
            return {a["action"]: made[a["action"]] for a in api.call("actions")
                    if a["action"] in made}

        for step in range(70):
            family = rng.choice(list(HOSTS))
            roll = rng.random()
            if roll < 0.45:
                kind = rng.choice(list(kinds))
                port = rng.choice(POOL)
                action = api.call("allow_future_connect", session=sessions[family],
                                  address=HOSTS[family][1], port=port, protocol="tcp",
                                  flags=kinds[kind], protocol_guid=str(GUIDS["FTP"]))
                made[action["action"]] = (family, port, kind)
                did[f"grant {kind}"] += 1
            elif roll < 0.6 and pending():
                api.call("cancel", action=rng.choice(sorted(pending())))
                did["cancel"] += 1
            elif roll < 0.9:
                port = rng.choice(POOL)
                expect = any(f == family and p == port for f, p, _ in pending().values())
                if not expect and did["refused"] >= 8:
                    continue  # a refused connection waits out its timeout: a few are enough
                result = c1.tcp_connect(HOSTS[family][1], port, send_bytes=10, timeout=1.0)
                assert result["connected"] is expect, (step, family, port, result, pending())
                did["opened" if expect else "refused"] += 1
            elif roll < 0.95:
                time.sleep(2.1)  # the lab's permission_timeout is 2 s: TIMEOUT grants expire
                did["expiry"] += 1
            else:
                api.call("end_session", session=sessions[family])
                sessions[family] = session_of(tb, api, family)
                did["session end"] += 1
            # the kernel hears of a flow it admitted before the enforcer does: wait for that
            wait_until(lambda: _agree(tb, enforcer, pending()), "the enforcer and the kernel agree",
                       within=HEARD_WITHIN)
        # the mix had each thing in it (the seed fixes it: this guards a change of the mix)
        assert all(did[what] for what in ("cancel", "opened", "refused", "expiry", "session end",
                                          *(f"grant {kind}" for kind in kinds))), did


def _agree(tb: Testbed, enforcer: EnforcerProcess, pending: dict[int, tuple[str, int, str]]) -> bool:
    """Whether every key the kernel holds has a pending grant that the kernel may hold, and
    the enforcer counts what the kernel holds."""
    kernel = {family: held_ports(tb, family) for family in HOSTS}
    eligible = {(family, port) for family, port, kind in pending.values()
                if kind in ("single", "timeout")}
    leaked = [(family, port) for family in HOSTS for port in kernel[family]
              if (family, port) not in eligible]
    assert not leaked, f"the kernel holds grants the enforcer has not pending: {leaked}"
    return bool(enforcer.call("status")["kernel_grants"]["held"] == sum(map(len, kernel.values())))


def test_a_session_ending_with_thousands_of_grants_takes_them_all_from_the_kernel(
        tb: Testbed, enforcer: EnforcerProcess) -> None:
    """A session's end takes all its grants from the kernel at once: 3000 of them (the
    session's cap raised to hold them), more than one netlink send holds and far more
    acknowledgements than a socket's default buffer. None is left, at the first try: no
    stray is taken later, and nothing about grants is logged."""
    client, server = HOSTS["ipv4"]
    cap = f"max_pending_per_session = {MAX_PENDING_PER_SESSION}"
    config = enforcer.config_path.read_text()
    assert cap in config
    enforcer.config_path.write_text(config.replace(cap, "max_pending_per_session = 3000"))
    enforcer._wait_for_run(int(enforcer.call("restart", config=str(enforcer.config_path))["run"]), 15.0)
    with Client(str(enforcer.socket)) as api:
        session = session_of(tb, api, "ipv4")
        for port in range(32000, 35000):
            api.allow_future_connect(session, (server, port), protocol_guid=GUIDS["FTP"])
        assert enforcer.call("status")["kernel_grants"]["held"] == 3000
        assert held(tb, "ipv4").count(f"{client} . {server} . tcp . ") == 3000
        api.call("end_session", session=session)
    assert enforcer.call("status")["kernel_grants"]["held"] == 0
    assert f"{client} . {server} . tcp . 3" not in held(tb, "ipv4")
    counters = enforcer.call("status")["counters"]
    assert not {k: v for k, v in counters.items() if "stray" in k or k.startswith("errors")}, counters
    warned = [line for line in enforcer.log_path.read_text().splitlines()
              if (" WARNING " in line or " ERROR " in line) and "grant" in line]
    assert not warned, warned
