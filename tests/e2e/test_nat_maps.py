"""The kernel's translations end as the enforcer's redirects and binds end: after a seeded
mix of kernel-mode and user-mode redirects, SecureNAT binds (to the client, and from the
fw), their use, cancels, expiry and sessions' ends, TCP and UDP, both families, the NAT
maps hold the elements of exactly the kernel-mode redirects the enforcer has pending and
the translated binds it has open, and a connection (an exchange, for UDP) gets through
exactly where one is, to the server it is meant for."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import time
from collections import Counter
from typing import Any

import pytest

from enforcer.dataplane import MAPS_TABLE
from testbed.clauses.helpers import assert_echoed, wait_until
from testbed.lab import GUIDS
from testbed.plugin import Lab, Net
from testbed.session_api import Flags, IsBusy
from testbed.topology import FAMILIES

SEED = 20261202
STEPS = 80
TARGETS = (5101, 5102, 5103)  # s1's echo servers a redirect leads to
CLIENT_PORTS = (7101, 7102)  # c1's echo servers a bind leads to
PROTOCOLS = ("tcp", "tcp", "tcp", "udp")  # drawn from: a TCP step, three times in four
REFUSED_AT_MOST = 12  # a refused connection waits out its timeout: that many are enough
REFUSED_WAIT = 1.0
# The lab's permission timeout is 2 s: a TIMEOUT redirect and an unused bind expire then.
# Nothing older than this is connected to (it might expire on the way).
FRESH = 1.0
AGREE_WITHIN = 3.0  # seconds the kernel may take to agree (the enforcer's timer turns)
Element = tuple[str, ...]


def _text(value: Any) -> str:
    """A component of an element as nft's JSON gives it, or as the enforcer lists it: an
    address in its one form, a protocol by name, a port or mark as digits."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(value))
    return str(value)


def _flat(value: Any) -> Element:
    """A key or value of nft's JSON: its components."""
    return _element(*(value["concat"] if isinstance(value, dict) else [value]))


def kernel_maps(net: Net) -> set[Element]:
    """Every element of the fw's redirect and bind maps, as (map, key..., value...)."""
    out: set[Element] = set()
    for kind in ("redirect_mark", "redirect_to", "bind_to", "bind_from"):
        for proto in ("ip", "ip6"):
            name = f"{kind}_{proto}"
            listed = json.loads(net.lab.tb.run("fw", ["nft", "-j", "list", "map", "inet",
                                                      MAPS_TABLE, name]).stdout)
            (body,) = [entry["map"] for entry in listed["nftables"] if "map" in entry]
            out |= {(name, *_flat(key), *_flat(value)) for key, value in body.get("elem", [])}
    return out


def expected_maps(net: Net) -> set[Element]:
    """The elements the kernel should hold, from what the enforcer lists: each pending
    kernel-mode redirect's (its client's connections to the fw's port marked with the
    port and sent on to the target), each open translated bind's (the fw's address and
    port sent on to the client's port; from the fw, the flow's source made the fw's)."""
    out: set[Element] = set()
    clients = {s["id"]: s["client"] for s in net.call("sessions")}
    for action in net.call("actions"):
        redirect = action["redirect"]
        if redirect is None or redirect["mode"] != "kernel":
            continue
        client = clients[action["session"]]
        proto = _proto(client)
        (internal, port), (target, target_port) = redirect["internal"], redirect["target"]
        key = (client, internal, action["protocol"], port)
        out.add(_element(f"redirect_mark_{proto}", *key, port))
        out.add(_element(f"redirect_to_{proto}", *key, target, target_port))
    for bind in net.call("binds"):
        if bind["state"] == "closed" or bind["leads_to"] is None:
            continue
        (address, port), (client, client_port) = bind["address"], bind["leads_to"]
        proto = _proto(client)
        if _text(address) != _text(client):
            out.add(_element(f"bind_to_{proto}", address, bind["protocol"], port, client,
                             client_port))
        if bind["source"] is not None:
            out.add(_element(f"bind_from_{proto}", address, client, bind["protocol"], client_port,
                             bind["source"]))
    return out


def _element(*parts: Any) -> Element:
    return tuple(map(_text, parts))


def _proto(address: str) -> str:
    return "ip" if ipaddress.ip_address(address).version == 4 else "ip6"


def assert_kernel_agrees(net: Net, step: int) -> None:
    """Wait (the enforcer's timer, not a call, removes what expired) until the maps hold
    what the enforcer has pending and open; fail naming what differs."""
    deadline = time.monotonic() + AGREE_WITHIN
    while (kernel := kernel_maps(net)) != (expected := expected_maps(net)):
        assert time.monotonic() < deadline, (
            f"step {step}: the kernel translates what the enforcer does not hold: "
            f"{sorted(kernel - expected)}; and lacks what it does: {sorted(expected - kernel)}")
        time.sleep(0.05)


@pytest.mark.topologies("nat")
def test_the_kernel_translates_only_the_redirects_and_binds_the_enforcer_holds(lab: Lab) -> None:
    lab.use("enforcer")
    rng = random.Random(SEED)
    nets: dict[str, Net] = {name: Net(lab, name) for name in FAMILIES}
    sessions = {name: net.session("c1") for name, net in nets.items()}
    kinds = {"single": Flags(0), "multiple": Flags.ALLOW_MULTIPLE, "timeout": Flags.TIMEOUT,
             "user": Flags.NO_KERNEL_MODE}
    net0 = nets["ipv4"]
    did: Counter[str] = Counter()
    made_at: dict[int, float] = {}  # action id -> when granted (a TIMEOUT one expires)
    # per family, the (protocol, port) of every redirect port, and every bind, made
    ports: dict[str, set[tuple[str, int]]] = {family: set() for family in FAMILIES}
    binds: dict[str, list[tuple[str, tuple[str, int], int]]] = {family: [] for family in FAMILIES}
    with contextlib.ExitStack() as stack, net0.client() as api:
        servers = {}  # by (family, protocol, port): s1's (the targets), c1's (the binds')
        for name, net in nets.items():
            for node, node_ports in (("s1", TARGETS), ("c1", CLIENT_PORTS)):
                agent, at = net.agent(node), net.addr(node)
                for port in node_ports:
                    servers[name, "tcp", port] = stack.enter_context(agent.tcp_server(at, port))
                    servers[name, "udp", port] = stack.enter_context(agent.udp_server(at, port))

        def accepted(family: str, protocol: str) -> dict[int, int]:
            return {p: servers[family, protocol, p].stats()["accepted"] for p in TARGETS}

        def redirects_at(family: str, protocol: str, port: int) -> list[dict[str, Any]]:
            """The pending redirects of c1's (this family) on one fw port."""
            return [a for a in nets[family].call("actions", session=sessions[family])
                    if a["redirect"] is not None and a["protocol"] == protocol
                    and a["redirect"]["internal"][1] == port]

        def connect(family: str, protocol: str, where: tuple[str, int], expect: bool,
                    what: str, client_port: int = 0) -> None:
            """c1 to a redirect port: echoed by the target if ``expect``, else nothing comes
            back. s1 to a bind of c1's ``client_port``: echoed by c1 if ``expect`` (a UDP
            bind, without BIDIRECTIONAL, takes no answer: the datagram reaches c1), else
            nothing reaches c1 or comes back."""
            agent = nets[family].agent("s1" if what == "bind" else "c1")
            timeout = None if expect else REFUSED_WAIT
            name = f"step {step}: {family} {protocol} {what} {where}"
            if protocol == "tcp":
                result = agent.tcp_connect(*where, send_bytes=64, timeout=timeout)
                if expect:
                    assert_echoed(result, 64, name)
                else:
                    assert not result["connected"], f"{name} let through"
            elif what == "redirect":  # a UDP redirect always lets replies back
                data = rng.randbytes(64)
                result = agent.udp_send(*where, data, expect_reply=True, timeout=timeout)
                assert result["reply"] == (data if expect else None), f"{name}: {result}"
            else:
                server = servers[family, "udp", client_port]
                before = server.stats()["bytes_in"]
                agent.udp_send(*where, rng.randbytes(64), expect_reply=False)
                if expect:
                    wait_until(lambda: server.stats()["bytes_in"] == before + 64, f"{name}: not received")
                else:
                    time.sleep(REFUSED_WAIT)
                    assert server.stats()["bytes_in"] == before, f"{name} let through"
            outcome = "opened" if expect else "refused"
            did[f"{what} {outcome}"] += 1
            did[f"{what} {protocol} {outcome}"] += 1

        for step in range(STEPS):
            family = rng.choice(FAMILIES)
            net, session = nets[family], sessions[family]
            protocol = rng.choice(PROTOCOLS)
            roll = rng.random()
            if roll < 0.25:  # a redirect of one or two targets, of some kind
                kind = rng.choice(list(kinds))
                targets = rng.sample(TARGETS, rng.choice((1, 2)))
                (_, base), actions = api.redirect_connections(
                    session, [(net.addr("s1"), port) for port in targets], protocol=protocol,
                    protocol_guid=GUIDS["FTP"], flags=kinds[kind])
                for action in actions:
                    made_at[action.id] = time.monotonic()
                ports[family].update((protocol, port) for port in range(base, base + len(targets)))
                did[f"redirect {kind}"] += 1
                did[f"redirect {protocol}"] += 1
            elif roll < 0.35:  # a pending action cancelled
                pending = [a["action"] for a in net.call("actions", session=session)]
                if not pending:
                    continue
                net.call("cancel", action=rng.choice(pending))
                did["cancel"] += 1
            elif roll < 0.6:  # c1 to a redirect port (pending, or used before)
                if not ports[family]:
                    continue
                protocol, port = rng.choice(sorted(ports[family]))
                pending = redirects_at(family, protocol, port)
                if any(time.monotonic() - made_at[a["action"]] > FRESH
                       for a in pending if "TIMEOUT" in a["flags"]):
                    continue  # it might expire on the way
                if not pending and did["redirect refused"] >= REFUSED_AT_MOST:
                    continue
                before = accepted(family, protocol)
                connect(family, protocol, (net.fw_internal(), port), bool(pending), "redirect")
                after = accepted(family, protocol)
                # it reached the target the redirect leads to, and only it (or none)
                target = pending[0]["redirect"]["target"][1] if pending else None
                assert after == {p: n + (p == target) for p, n in before.items()}, (step, before, after)
            elif roll < 0.8:  # a bind of c1's port (to c1, or from the fw), approved or not
                client_port = rng.choice(CLIENT_PORTS)
                from_fw = rng.random() < 0.5
                try:
                    address = api.bind_for_client(session, client_port, protocol=protocol,
                                                  from_fw=from_fw)
                except IsBusy as exc:  # bound already the other way
                    assert "bound already" in str(exc), exc
                    did["bind busy"] += 1
                    continue
                binds[family].append((protocol, address, client_port))
                approved = rng.random() < 0.7
                if approved:
                    api.retroactive_allow_bind(session, address, protocol=protocol,
                                               protocol_guid=GUIDS["FTP"])
                did[f"bind {'approved' if approved else 'pending'}"] += 1
                did[f"bind {protocol}"] += 1
                # its peer comes now (else: it expires, or a later step tries it)
                if rng.random() < 0.6 and (approved or did["bind refused"] < REFUSED_AT_MOST):
                    connect(family, protocol, address, approved, "bind", client_port)
            elif roll < 0.88:  # s1 to a bind made before (closed by now, or still pending)
                if not binds[family] or did["bind refused"] >= REFUSED_AT_MOST:
                    continue
                protocol, address, client_port = rng.choice(binds[family])
                if any(b["state"] != "closed" and b["protocol"] == protocol
                       and tuple(b["address"]) == address for b in net.call("binds", session=session)):
                    continue  # open: it may expire on the way (an open one is tried as it is made)
                connect(family, protocol, address, False, "bind", client_port)
            elif roll < 0.95:
                time.sleep(2.1)  # TIMEOUT redirects and unused binds expire
                did["expiry"] += 1
            else:
                net.call("end_session", session=session)
                sessions[family] = net.session("c1")
                did["session end"] += 1
            assert_kernel_agrees(net0, step)
        for name, session in sessions.items():  # the end of every session leaves nothing
            nets[name].call("end_session", session=session)
        assert_kernel_agrees(net0, STEPS)
        assert not kernel_maps(net0)
    # the mix had each thing in it (the seed fixes it: this guards a change of the mix)
    wanted = ("cancel", "expiry", "session end", "bind approved", "bind pending",
              *(f"{what} {protocol} {outcome}" for what in ("redirect", "bind")
                for protocol in ("tcp", "udp") for outcome in ("opened", "refused")),
              *(f"redirect {k}" for k in kinds))
    assert all(did[what] for what in wanted), did
