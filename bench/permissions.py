"""Measure the permission table: time per grant and per new-flow match, bytes per permission.

Run from the repository root (no root, no testbed; pure Python, about 90 s and
1.5 GB)::

    .venv/bin/python -m bench.permissions [--sizes 1000 100000 1000000] [--rounds 15]

For each size N the decision core is filled with N pending permissions with
distinct keys (IPv4, single use, no flags): N/4000 SecureNAT clients in
192.0.2.0/24, each with 4000 grants to random targets in 198.51.100.0/24 on
random ports 1024-65535, 80 % TCP and 20 % UDP. Then it measures

- **grant**: ``Engine.allow_future_connect`` (the whole API call: checks, policy
  lookups, the table insert), averaged over filling the table from empty, and
  ``PermissionTable.add`` alone (precomputed keys), also averaged over a fill,
  with the cyclic GC on (as in the daemon) and off;
- **match**: ``Engine.decide`` of a TCP SYN / UDP datagram that a permission
  admits (it is consumed), of one that matches nothing (then dropped as no
  protocol's primary port), and ``PermissionTable.match`` alone on a hit;
  medians over ``--rounds`` rounds of 250 flows (each round's figure is kept too, in
  ``*_rounds``, and each fill's grant figure in ``grant_engine_us_fills``: the spread);
- **memory**: the bytes that filling the engine allocates (tracemalloc), per
  permission, with the arguments made fresh per call as a parsed request would
  make them; the RSS growth of the first timed fill as a cross-check (100k and
  up); and, for the largest size, the bytes per permission by part
  (``sys.getsizeof`` of the Permission, its key, the dicts and the sessions' id lists).

The smallest size is the baseline: a ratio near 1 for the largest size means
the operation is O(1) in the table's size. A 1k table fits in the CPU caches and a
100k one does not, so the 1M/100k ratio shows the growth with size better than
the 1M/1k one, which includes that step. The goals are the project's: at most
5 µs per grant and per match, and at most 400 B per permission at 1M.
Results go to stdout and ``bench/permissions.json``.
"""

from __future__ import annotations

import argparse
import array
import gc
import ipaddress
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.limits import Limits
from enforcer.core.packet import TCP, TCP_SYN, UDP, FlowKey, Ingress, IPAddress, PacketMeta, address
from enforcer.core.permissions import PermissionKey, PermissionTable
from enforcer.core.policy import (
    Defaults,
    NetworkSet,
    Policy,
    PortRange,
    ProtocolDef,
    ProtocolRule,
    SiteRule,
)
from enforcer.core.state import Verdict, permission_key

OUT = Path(__file__).resolve().parent / "permissions.json"
GOAL_US = 5.0
GOAL_BYTES = 400
PER_CLIENT = 4000  # 1M grants from 250 clients: they fit a /24
ROUND = 250
FTP_GUID = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101")
# Documentation ranges, as everywhere in the project: 250 clients, 256 targets, any port.
INTERNAL = ipaddress.ip_network("192.0.2.0/24")
TARGETS = ipaddress.ip_network("198.51.100.0/24")
MISS_PORT = 1000  # never granted (grants use 1024-65535) and no protocol's primary port
POLICY = Policy(
    protocols=(ProtocolDef("FTP", FTP_GUID, TCP, (PortRange(21, 21),)),),
    protocol_rules=(ProtocolRule("clients", True, frozenset({"FTP"}), NetworkSet((INTERNAL,)), None),),
    site_rules=(SiteRule("targets", True, NetworkSet((TARGETS,))),),
    defaults=Defaults(permission_timeout=60.0, max_pending_per_session=PER_CLIENT),
)
PAGE = os.sysconf("SC_PAGE_SIZE")



def parsed(value: int) -> IPAddress:
    """An IPv4 address as the enforcer holds one, parsed from a packet or a request."""
    return address(str(ipaddress.IPv4Address(value)))

@dataclass
class Workload:
    """N distinct grants, as the arguments a caller would pass."""

    n: int
    clients: list[IPAddress]
    sessions: array.array[int]  # index into clients, per grant
    targets: array.array[int]
    ports: array.array[int]
    protocols: array.array[int]

    @classmethod
    def make(cls, n: int, rng: random.Random) -> Workload:
        n_clients = max(1, -(-n // PER_CLIENT))
        base = int(INTERNAL.network_address)
        clients = [parsed(base + 1 + i) for i in range(n_clients)]
        t_base, t_size = int(TARGETS.network_address), TARGETS.num_addresses
        seen: set[tuple[int, int, int, int]] = set()
        sessions, targets, ports, protocols = (array.array("I") for _ in range(4))
        for i in range(n):
            c = i // PER_CLIENT
            while True:
                t = t_base + rng.randrange(t_size)
                p = rng.randrange(1024, 65536)
                proto = TCP if rng.random() < 0.8 else UDP
                if (c, t, p, proto) not in seen:
                    seen.add((c, t, p, proto))
                    break
            sessions.append(c)
            targets.append(t)
            ports.append(p)
            protocols.append(proto)
        return cls(n, clients, sessions, targets, ports, protocols)


def new_engine(w: Workload) -> tuple[Engine, list[int]]:
    """An engine with one SecureNAT session per client (made by a primary FTP SYN), its
    pending-permission caps raised to hold the workload."""
    limits = Limits(pending_total=max(w.n, Limits.pending_total))
    engine = Engine(POLICY, {"int0": (INTERNAL,)}, (ipaddress.IPv4Address("203.0.113.1"),),
                    limits=limits)
    server = TARGETS.network_address + 1
    ids = []
    for client in w.clients:
        d = engine.decide(PacketMeta(FlowKey(TCP, client, 1, server, 21), Ingress.INTERNAL, TCP_SYN),
                          0.0)
        assert d.verdict is Verdict.ADMIT_KERNEL and d.session_id is not None
        ids.append(d.session_id)
    return engine, ids


def grant_args(w: Workload, session_ids: list[int]) -> list[tuple[int, Any, int, int]]:
    """Per grant (session, target address, port, protocol), built outside any timing."""
    addr: dict[int, IPAddress] = {}
    return [(session_ids[w.sessions[i]],
             addr.setdefault(w.targets[i], parsed(w.targets[i])),
             w.ports[i], w.protocols[i]) for i in range(w.n)]


def fill_engine(engine: Engine, args: list[tuple[int, Any, int, int]]) -> float:
    """Grant every permission; return seconds."""
    afc = engine.allow_future_connect
    flags = Flags(0)
    now = 1.0
    t0 = time.perf_counter()
    for session, target, port, protocol in args:
        afc(session, target, port, protocol, flags, FTP_GUID, now)
        now += 1e-6
    return time.perf_counter() - t0


def flow(w: Workload, i: int, sport: int, *, miss: bool = False) -> PacketMeta:
    proto = w.protocols[i]
    key = FlowKey(proto, w.clients[w.sessions[i]], sport,
                  parsed(w.targets[i]), MISS_PORT if miss else w.ports[i])
    return PacketMeta(key, Ingress.INTERNAL, TCP_SYN if proto == TCP else 0)


def time_decides(engine: Engine, metas: list[PacketMeta], expect: Verdict) -> float:
    decide = engine.decide
    now = 2.0
    before = engine.counters[expect.value]
    t0 = time.perf_counter()
    for meta in metas:
        decide(meta, now)
    elapsed = time.perf_counter() - t0
    assert engine.counters[expect.value] - before == len(metas), engine.recent[-1]
    return elapsed


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


# --- one size -------------------------------------------------------------------------------------

def measure(n: int, rounds: int, rng: random.Random, memory: bool) -> dict[str, Any]:
    w = Workload.make(n, rng)
    out: dict[str, Any] = {"n": n, "clients": len(w.clients)}
    small = n * rounds <= 2_000_000  # refill for every round when that is cheap
    fills = max(1, min(100, 300_000 // n))  # about 0.5 s of grants for small tables

    # grant: Engine.allow_future_connect, average over a fill from empty
    grant_us: list[float] = []
    fill_rss: int | None = None
    engine: Engine | None = None
    for _ in range(fills):
        engine = None
        gc.collect()
        engine, ids = new_engine(w)
        args = grant_args(w, ids)
        before = rss()
        grant_us.append(fill_engine(engine, args) / n * 1e6)
        if fill_rss is None:  # later fills reuse memory the earlier ones freed
            fill_rss = rss() - before
        assert len(engine.permissions) == n
    assert engine is not None
    out["grant_engine_us"] = statistics.median(grant_us)
    out["grant_engine_us_fills"] = grant_us  # each fill's average: the spread
    # Page-granular and noisy for small tables.
    out["rss_bytes_per_perm"] = fill_rss / n if fill_rss is not None and n >= 100_000 else None

    # match, through Engine.decide: a hit consumes one permission, a miss changes nothing
    hits, misses = [], []
    order = rng.sample(range(n), min(n, ROUND * rounds)) if not small else list(range(n))
    sport = 10000
    for r in range(rounds):
        if small and r:
            engine = None
            gc.collect()
            engine, ids = new_engine(w)
            fill_engine(engine, grant_args(w, ids))
        chosen = (rng.sample(order, ROUND) if small else order[r * ROUND:(r + 1) * ROUND])
        metas = [flow(w, i, sport + k) for k, i in enumerate(chosen)]
        miss_metas = [flow(w, i, sport + k, miss=True) for k, i in enumerate(chosen)]
        sport += ROUND
        size = len(engine.permissions)
        misses.append(time_decides(engine, miss_metas, Verdict.DROP) / ROUND * 1e6)
        hits.append(time_decides(engine, metas, Verdict.ADMIT_KERNEL) / ROUND * 1e6)
        assert len(engine.permissions) == size - ROUND
    out["match_hit_us"] = statistics.median(hits)
    out["match_miss_us"] = statistics.median(misses)
    out["match_hit_us_rounds"], out["match_miss_us_rounds"] = hits, misses  # the spread
    engine = None
    gc.collect()

    # the table alone: PermissionTable.add and .match on precomputed keys
    keys: list[PermissionKey] = [
        permission_key(w.protocols[i], w.clients[w.sessions[i]],
                       parsed(w.targets[i]), w.ports[i]) for i in range(n)]
    clients = [w.clients[w.sessions[i]] for i in range(n)]
    add_us, match_us = [], []
    for _ in range(fills):
        table = PermissionTable()
        add = table.add
        flags = Flags(0)
        t0 = time.perf_counter()
        for i, key in enumerate(keys):
            add(w.sessions[i], clients[i], key, flags, "FTP", 1.0, None, 0)
        add_us.append((time.perf_counter() - t0) / n * 1e6)
        chosen = rng.sample(range(n), min(n, ROUND * 4))
        match = table.match
        t0 = time.perf_counter()
        for i in chosen:
            match(keys[i], w.sessions[i], 2.0)
        match_us.append((time.perf_counter() - t0) / len(chosen) * 1e6)
        assert len(table) == n - len(chosen)
        del table, add, match
    out["grant_table_us"] = statistics.median(add_us)
    # The same fill with the cyclic GC off: how much of the add is GC passes over the table.
    table = PermissionTable()
    add, flags = table.add, Flags(0)
    gc.disable()
    try:
        t0 = time.perf_counter()
        for i, key in enumerate(keys):
            add(w.sessions[i], clients[i], key, flags, "FTP", 1.0, None, 0)
        out["grant_table_nogc_us"] = (time.perf_counter() - t0) / n * 1e6
    finally:
        gc.enable()
    del table, add
    out["match_table_us"] = statistics.median(match_us)
    del keys, clients
    gc.collect()

    if memory:
        out.update(measure_memory(w))
    return out


def measure_memory(w: Workload) -> dict[str, Any]:
    """Bytes that filling an engine with w.n permissions allocates (tracemalloc)."""
    engine, ids = new_engine(w)
    IPv4Address = ipaddress.IPv4Address
    afc = engine.allow_future_connect
    flags = Flags(0)
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.get_traced_memory()[0]
    # As from a parsed request: fresh session id, target address and port objects (array
    # items are new ints), and a fresh float now. The key's client int is the session's own
    # (int(IPv4Address) returns the int the address holds), so it costs nothing per grant.
    for i in range(w.n):
        afc(_fresh(ids[w.sessions[i]]), IPv4Address(w.targets[i]), w.ports[i], w.protocols[i],
            flags, FTP_GUID, 1.0 + i * 1e-6)
    total = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {"bytes_per_perm": total / w.n, "breakdown": breakdown(engine.permissions)}


def _fresh(value: int) -> int:
    """A new int object equal to value (as json.loads would make), not a shared one."""
    return int(str(value))


def breakdown(table: PermissionTable) -> dict[str, float]:
    """Bytes per permission by part (sys.getsizeof, which counts GC headers; dicts are
    their whole table divided by the number of permissions)."""
    size = sys.getsizeof
    n = len(table)
    perm = next(iter(table.pending()))
    assert not any(isinstance(v, list) for v in table._by_key.values())  # distinct keys
    return {
        "Permission object (slots dataclass, 12 fields)": size(perm),
        "Permission.id and .session_id ints": size(perm.id) + size(perm.session_id),
        "Permission.created float": size(perm.created),
        "key (one packed int)": size(perm.key),
        "_by_key dict slots": size(table._by_key) / n,
        "_actions dict slots": size(table._actions) / n,
        "_by_session id lists (one per session)":
            (size(table._by_session) + sum(size(s) + size(s.ids)
                                          for s in table._by_session.values())) / n,
    }


# --- report -------------------------------------------------------------------------------------

ROWS = [
    ("grant_engine_us", "grant: Engine.allow_future_connect", "µs", GOAL_US),
    ("grant_table_us", "grant: PermissionTable.add", "µs", GOAL_US),
    ("grant_table_nogc_us", "grant: PermissionTable.add, gc disabled", "µs", None),
    ("match_hit_us", "match: Engine.decide, SYN/datagram admitted", "µs", GOAL_US),
    ("match_miss_us", "match: Engine.decide, matches nothing", "µs", GOAL_US),
    ("match_table_us", "match: PermissionTable.match, hit", "µs", GOAL_US),
    ("bytes_per_perm", "memory: tracemalloc bytes / permission", "B", GOAL_BYTES),
    ("rss_bytes_per_perm", "memory: RSS growth of the fill / permission", "B", None),
]


def report(results: list[dict[str, Any]]) -> list[str]:
    """The table: one column per size, then largest/smallest (and largest/previous)."""
    base, top = results[0], results[-1]
    pairs = [(top, base)] + ([(top, results[-2])] if len(results) > 2 else [])
    head = f"{'':52}" + "".join(f"{_size(r['n']):>10}" for r in results)
    head += "".join(f"{_size(a['n']) + '/' + _size(b['n']):>10}" for a, b in pairs) + "  goal"
    lines = [head, "-" * (len(head) + 20)]
    for key, label, unit, goal in ROWS:
        if not any(r.get(key) is not None for r in results):
            continue
        cells = "".join(_cell(r.get(key), unit) for r in results)
        for a, b in pairs:
            cells += f"{a[key] / b[key]:>10.2f}" if a.get(key) and b.get(key) else f"{'-':>10}"
        check = ""
        if goal is not None:
            check = f"{'ok' if top[key] <= goal else 'OVER'} (<= {goal:g} {unit} at {_size(top['n'])})"
        lines.append(f"{label + ' (' + unit + ')':52}{cells}  {check}")
    return lines


def _cell(value: float | None, unit: str) -> str:
    if value is None:
        return f"{'-':>10}"
    return f"{value:>10.2f}" if unit == "µs" else f"{value:>10.0f}"


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    ap.add_argument("--rounds", type=int, default=15, help="match rounds of 250 flows")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    results = []
    for n in sorted(args.sizes):
        t0 = time.perf_counter()
        results.append(measure(n, args.rounds, rng, not args.no_memory))
        print(f"# {_size(n)}: measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    lines = report(results)
    print("\n".join(lines))
    top = results[-1]
    if "breakdown" in top:
        parts = top["breakdown"]
        print(f"\nBytes per permission at {_size(top['n'])} by part (sys.getsizeof; "
              f"sum {sum(parts.values()):.0f} B, tracemalloc {top['bytes_per_perm']:.0f} B):")
        for name, b in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {b:7.1f} B  {name}")
    OUT.write_text(json.dumps({
        "python": platform.python_version(), "machine": platform.machine(),
        "gc_enabled": gc.isenabled(), "seconds": round(time.perf_counter() - started, 1),
        "goals": {"us_per_grant_and_match": GOAL_US, "bytes_per_permission": GOAL_BYTES},
        "results": results, "table": lines}, indent=2) + "\n")
    print(f"\nwrote {OUT.relative_to(Path.cwd()) if OUT.is_relative_to(Path.cwd()) else OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
