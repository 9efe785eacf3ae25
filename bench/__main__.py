"""`make bench`: the four performance goals, each as a ratio measured in the same run.

Run from the repository root, as root::

    .venv/bin/python -m bench [--seconds 3] [--reps 5] [--skip p3 ...]

- P1 kernel-mode admitted TCP flow throughput / plain forwarding (goal >= 0.95), and
  beside it conntrack alone / plain forwarding: the share of the gap that any stateful
  ruleset pays
- P2 user-mode TCP flow throughput / a null accept-all NFQUEUE consumer (goal >= 1.0),
  also with 2 worker processes (stretch: >= 0.4x plain forwarding), and 4 flows at once
  with and without them
- P3 grant and match time and bytes per permission with 1M pending (<= 5 us, <= 400 B)
- P4 new secondary flows admitted per second, and first-SYN latency of a data
  connection / the Linux conntrack FTP helper doing the same job (goal <= 2)
- RDC (no goal): a redirected flow's throughput / the same mode's AllowFutureConnect flow

P3 runs first, in this process, on the decision core alone (``bench.permissions``).
Then one routed testbed carries P1, P2 and P4: each repetition measures every
configuration once, round-robin (plain forwarding, conntrack alone, the null consumer, the
conntrack FTP helper ruleset, then the enforcer for the kernel-mode, user-mode,
redirect and new-flow rows), and the table shows medians over the repetitions. Prints
one table and writes ``bench/results.json`` (every sample included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import bindings, permissions
from bench.common import (
    CLIENT,
    CLIENT_ADDR,
    FW,
    IPERF_PORT,
    READY_TIMEOUT,
    ROOT,
    SERVER,
    SERVER_ADDR,
    IperfServer,
    format_table,
    iperf_version,
    last_json,
    median,
    queue_stats,
    ratio,
    read_line,
    run_iperf,
    stop_proc,
)
from testbed.build import Testbed
from testbed.lab import GUIDS, EnforcerProcess
from testbed.session_api import Flags
from testbed.topology import standard

OUT = Path(__file__).resolve().parent / "results.json"
SINK_PORT = 6000
ENFORCER_QUEUE = 0  # the lab config's queue
WORKERS = 2  # the worker processes of the user-mode rows that have them (one per core here)
PARALLEL = 4  # the connections of the rows that run several at once
USER_ROWS = ("user-x4", "user-workers", "user-x4-workers")
PLAIN = next(c for c in bindings.CONFIGS if c.name == "plain")
CONNTRACK = next(c for c in bindings.CONFIGS if c.name == "conntrack")
NULL_CONSUMER = next(c for c in bindings.CONFIGS if c.name == "nfq-all")

# The Linux path the enforcer's secondary flows are compared with: the FTP helper
# makes a RELATED expectation out of each 227 reply; a stateful ruleset admits it.
HELPER_RULES: list[tuple[str, list[str]]] = [
    ("raw", ["-A", "PREROUTING", "-p", "tcp", "--dport", "21", "-j", "CT", "--helper", "ftp"]),
    ("filter", ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]),
    ("filter", ["-A", "FORWARD", "-p", "tcp", "--dport", "21", "-m", "conntrack", "--ctstate", "NEW",
                "-j", "ACCEPT"]),
    # for the admission-rate baseline: new flows to the sink port, accepted by a rule
    ("filter", ["-A", "FORWARD", "-p", "tcp", "--dport", str(SINK_PORT), "-m", "conntrack",
                "--ctstate", "NEW", "-j", "ACCEPT"]),
    ("filter", ["-A", "FORWARD", "-j", "DROP"]),
]


@dataclass
class Iperf:
    bps: float | None = None
    seconds: float | None = None
    packets: int | None = None
    retransmits: int | None = None
    error: str | None = None

    @property
    def pps(self) -> float | None:
        return self.packets / self.seconds if self.packets is not None and self.seconds else None


def _err(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- P3: the decision core ----------------------------------------------------------------

def run_p3(rounds: int, seed: int) -> dict[str, Any]:
    """bench.permissions at 1k (the baseline) and 1M pending permissions."""
    rng = random.Random(seed)
    out = {}
    for n in (1000, 1_000_000):
        t0 = time.perf_counter()
        out[n] = permissions.measure(n, rounds, rng, memory=True)
        print(f"P3 {n:>9,} pending: grant {out[n]['grant_engine_us']:.2f} µs, match "
              f"{out[n]['match_hit_us']:.2f} µs, {out[n]['bytes_per_perm']:.0f} B/permission "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"1k": out[1000], "1M": out[1_000_000]}


# -- the testbed side ---------------------------------------------------------------------

class FlowServer:
    """``bench.flows server`` on s1: port 21 (enough FTP for PASV) and the sink port."""

    def __init__(self, tb: Testbed) -> None:
        self.tb = tb
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = self.tb.popen(SERVER, [sys.executable, "-m", "bench.flows", "server", "--addr",
                                           SERVER_ADDR, "--sink-port", str(SINK_PORT)],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        if read_line(self.proc, READY_TIMEOUT) != "ready":
            _out, err = stop_proc(self.tb, self.proc)
            self.proc = None
            raise RuntimeError(f"bench.flows server did not start: {err.strip()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_proc(self.tb, self.proc)
            self.proc = None


def flows_client(tb: Testbed, *args: str, timeout: float = 60) -> dict[str, Any]:
    r = tb.run(CLIENT, [sys.executable, "-m", "bench.flows", *args], check=False, timeout=timeout)
    result = last_json(r.stdout)
    if result is None:
        tail = r.stderr.strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        raise RuntimeError(f"bench.flows {args[0]}: {tail[0]}")
    return result


def iperf(tb: Testbed, server: IperfServer, seconds: int,
          packets: Callable[[], int | None] | None = None,
          via: tuple[str, int] | None = None, streams: int = 1) -> Iperf:
    """One iperf3 run c1 -> s1; ``packets`` reads a packet counter (before and after);
    ``via``: the redirect port c1 connects to instead of s1; ``streams`` connections."""
    sample = Iperf()
    before = packets() if packets else None
    try:
        addr, port = via or (SERVER_ADDR, IPERF_PORT)
        sample.bps, sample.seconds, sample.retransmits = run_iperf(tb, seconds, port, addr, streams)
        after = packets() if packets else None
        if before is not None and after is not None:
            sample.packets = after - before
    except Exception as exc:
        sample.error = _err(exc)
        server.restart()  # a run that failed half-way can leave the server busy
    return sample


def from_bindings(s: bindings.Sample) -> Iperf:
    return Iperf(bps=s.bps, seconds=s.seconds, packets=s.packets, retransmits=s.retransmits,
                 error=s.error)


def connects_summary(r: dict[str, Any]) -> dict[str, Any]:
    ok = len(r["latencies_us"])
    return {"flows_per_s": ok / r["elapsed"] if r["elapsed"] else None,
            "median_connect_us": median(r["latencies_us"]), "ok": ok, "failed": r["failed"],
            "concurrency": r["concurrency"]}


def pasv_summary(r: dict[str, Any]) -> dict[str, Any]:
    return {"median_connect_us": median(r["connect_us"]), "median_grant_us": median(r["grant_us"]),
            "ok": len(r["connect_us"]), "failed": r["failed"]}


def helper_block(tb: Testbed, args: argparse.Namespace) -> dict[str, Any]:
    """No enforcer: the conntrack FTP helper ruleset in fw; PASV data connects, new-flow rate."""
    added: list[tuple[str, list[str]]] = []
    out: dict[str, Any] = {}
    try:
        for table, spec in HELPER_RULES:
            tb.run(FW, ["iptables", "-t", table, *spec])
            added.append((table, spec))
        out["pasv"] = pasv_summary(flows_client(tb, "pasv", "--addr", SERVER_ADDR,
                                                "--count", str(args.pasv)))
        out["rate"] = connects_summary(flows_client(
            tb, "connects", "--addr", SERVER_ADDR, "--port", str(SINK_PORT),
            "--count", str(args.flows), "--concurrency", str(args.concurrency)))
    except Exception as exc:
        out["error"] = _err(exc)
    finally:
        for table, spec in reversed(added):
            tb.run(FW, ["iptables", "-t", table, "-D", *spec[1:]], check=False)
        tb.run(FW, ["conntrack", "-F"], check=False)
    return out


def c1_session(tb: Testbed, enforcer: EnforcerProcess) -> int:
    """Make c1's SecureNAT session with a primary FTP connection; its id."""
    flows_client(tb, "connects", "--addr", SERVER_ADDR, "--port", "21", "--count", "1")
    for s in enforcer.call("sessions"):
        if s["client"] == CLIENT_ADDR:
            return int(s["id"])
    raise RuntimeError("no SecureNAT session for c1 after a primary FTP connection")


def kernel_grants_used(enforcer: EnforcerProcess) -> int:
    """The grants the kernel has used so far in this run of the enforcer (its notices are
    read at most 10 ms apart: waited for)."""
    time.sleep(0.1)
    return int(enforcer.call("status")["counters"].get("kernel grants: used", 0))


def enforcer_block(tb: Testbed, server: IperfServer, workdir: Path,
                   args: argparse.Namespace) -> dict[str, Any]:
    """The enforcer running: kernel-mode and user-mode iperf3, new-flow rate, PASV data connects."""
    out: dict[str, Any] = {}
    # At its default log level, as deployed (the lab's --verbose logs every packet it decides).
    enforcer = EnforcerProcess(tb, workdir, verbose=False)
    # The client's per-address caps would cap P4's admission rate: measured without them.
    limits: dict[str, object] = {"new_flows_per_second": 0, "flows_per_client": 1_000_000}
    enforcer.start(limits=limits)
    try:
        session = c1_session(tb, enforcer)
        target = (SERVER_ADDR, IPERF_PORT)
        with enforcer.client() as api:
            # P1: admitted in kernel mode (iperf3 opens a control and a data connection)
            action = api.allow_future_connect(session, target, protocol_guid=GUIDS["FTP"],
                                              flags=Flags.ALLOW_MULTIPLE)
            out["kernel"] = iperf(tb, server, args.seconds)
            action.cancel()

            # P2: user mode, every packet through the enforcer
            def queued() -> int | None:
                ks = queue_stats(tb, ENFORCER_QUEUE)
                return ks["id_sequence"] if ks else None

            action = api.allow_future_connect(session, target, protocol_guid=GUIDS["FTP"],
                                              flags=Flags.ALLOW_MULTIPLE | Flags.NO_KERNEL_MODE)
            out["user"] = iperf(tb, server, args.seconds, packets=queued)
            out["user-x4"] = iperf(tb, server, args.seconds, streams=PARALLEL)
            action.cancel()

            # the same through RedirectConnections: kernel NAT, then the enforcer's rewriting
            for key, flags in (("redirect-kernel", Flags.ALLOW_MULTIPLE),
                               ("redirect-user", Flags.ALLOW_MULTIPLE | Flags.NO_KERNEL_MODE)):
                via, (action,) = api.redirect_connections(session, [target], flags=flags,
                                                          protocol_guid=GUIDS["FTP"])
                out[key] = iperf(tb, server, args.seconds, via=via)
                action.cancel()

            # P4a: new flows admitted per second under one ALLOW_MULTIPLE grant
            action = api.allow_future_connect(session, (SERVER_ADDR, SINK_PORT),
                                              protocol_guid=GUIDS["FTP"], flags=Flags.ALLOW_MULTIPLE)
            try:
                out["rate"] = connects_summary(flows_client(
                    tb, "connects", "--addr", SERVER_ADDR, "--port", str(SINK_PORT),
                    "--count", str(args.flows), "--concurrency", str(args.concurrency)))
            except Exception as exc:
                out["rate"] = {"error": _err(exc)}
            action.cancel()
        # P4b as deployed: the enforcer's FTP filter grants as each 227 passes the fw
        try:
            enforcer.restart(app_filters=("ftp",), limits=limits)
            out["pasv"] = pasv_summary(flows_client(tb, "pasv", "--addr", SERVER_ADDR,
                                                    "--count", str(args.pasv)))
            out["pasv"]["kernel_grants_used"] = kernel_grants_used(enforcer)
        except Exception as exc:
            out["pasv"] = {"error": _err(exc)}
        # and with the client making each grant over the control socket, after the 227
        try:
            enforcer.restart(limits=limits)
            out["pasv-call"] = pasv_summary(flows_client(
                tb, "pasv", "--addr", SERVER_ADDR, "--count", str(args.pasv),
                "--grant", str(enforcer.socket), "--session", str(c1_session(tb, enforcer))))
        except Exception as exc:
            out["pasv-call"] = {"error": _err(exc)}
        # the user-mode rows again with worker processes reading the flows' packets
        enforcer.restart(dataplane={"workers": WORKERS}, limits=limits)
        with enforcer.client() as api:
            api.allow_future_connect(c1_session(tb, enforcer), target, protocol_guid=GUIDS["FTP"],
                                     flags=Flags.ALLOW_MULTIPLE | Flags.NO_KERNEL_MODE)
            out["user-workers"] = iperf(tb, server, args.seconds)
            out["user-x4-workers"] = iperf(tb, server, args.seconds, streams=PARALLEL)
    except Exception as exc:
        out["error"] = _err(exc)
    finally:
        enforcer.stop()
        enforcer.unload()  # the next measurements are of plain forwarding
        tb.run(FW, ["conntrack", "-F"], check=False)
    return out


def run_flood(reps: int, artifacts: Path) -> dict[str, Any]:
    """ROB-01: c1's first-SYN delays through the fw (default enforcer, FTP and TFTP filters
    on) without, then under, c2's flood; per repetition, p99 of each."""
    from testbed.flood import VICTIM_PORT, Flood, first_syn_delays
    from testbed.lab import EnforcerProcess
    from testbed.plugin import APP_FILTERS, Lab, Net

    out: dict[str, Any] = {"quiet_p99_ms": [], "flood_p99_ms": [], "opened": [], "flood": []}
    lab = Lab("routed", artifacts, {"enforcer": EnforcerProcess})
    try:
        lab.use("enforcer", APP_FILTERS)
        net = Net(lab, "ipv4")
        with net.client() as api:
            grant = api.allow_future_connect(net.session("c1"), (net.addr("s1"), VICTIM_PORT),
                                             protocol_guid=GUIDS["FTP"], flags=Flags.ALLOW_MULTIPLE)
            for _ in range(reps):
                quiet = first_syn_delays(net, "c1", "s1", 100)
                with Flood(net, "c2", "s1") as flood:
                    loud = first_syn_delays(net, "c1", "s1", 100)
                out["quiet_p99_ms"].append(quiet.p99 * 1e3)
                out["flood_p99_ms"].append(loud.p99 * 1e3)
                out["opened"].append(loud.opened)
                out["flood"].append(flood.counts.summary())
            grant.cancel()
    except Exception as exc:
        out["error"] = _err(exc)
    finally:
        lab.close()
    return out


def run_network(args: argparse.Namespace) -> dict[str, list[Any]]:
    samples: dict[str, list[Any]] = {k: [] for k in (
        "plain", "conntrack", "null", "kernel", "user", "redirect-kernel", "redirect-user", "helper",
        "enforcer", *USER_ROWS)}
    tb = Testbed.up(standard("routed"), tag="bench")
    server = IperfServer(tb)
    flow_server = FlowServer(tb)
    try:
        server.start()
        flow_server.start()
        with tempfile.TemporaryDirectory(prefix="pinhole-bench-") as tmp:
            for rep in range(args.reps):
                samples["plain"].append(from_bindings(bindings.measure(tb, server, PLAIN, args.seconds)))
                samples["conntrack"].append(from_bindings(
                    bindings.measure(tb, server, CONNTRACK, args.seconds)))
                samples["null"].append(from_bindings(
                    bindings.measure(tb, server, NULL_CONSUMER, args.seconds)))
                samples["helper"].append(helper_block(tb, args))
                e = enforcer_block(tb, server, Path(tmp) / f"enforcer-{rep}", args)
                samples["kernel"].append(e.pop("kernel", Iperf(error=e.get("error"))))
                for key in ("user", "redirect-kernel", "redirect-user", *USER_ROWS):
                    samples[key].append(e.pop(key, Iperf(error=e.get("error"))))
                samples["enforcer"].append(e)
                _progress(rep, args.reps, samples)
    finally:
        with contextlib.suppress(Exception):
            flow_server.stop()
        with contextlib.suppress(Exception):
            server.stop()
        tb.down()
    return samples


def _gbps(s: Iperf) -> str:
    return f"{s.bps / 1e9:.2f}" if s.bps else f"error ({s.error})"


def _progress(rep: int, reps: int, samples: dict[str, list[Any]]) -> None:
    h, e = samples["helper"][-1], samples["enforcer"][-1]
    print(f"[{rep + 1}/{reps}] Gbit/s plain {_gbps(samples['plain'][-1])}, conntrack alone "
          f"{_gbps(samples['conntrack'][-1])}, kernel "
          f"{_gbps(samples['kernel'][-1])}, null consumer {_gbps(samples['null'][-1])}, user "
          f"{_gbps(samples['user'][-1])}, user with {WORKERS} workers "
          f"{_gbps(samples['user-workers'][-1])}; connect µs helper "
          f"{_fmt(h.get('pasv', {}).get('median_connect_us'), '.0f')}, enforcer "
          f"{_fmt(e.get('pasv', {}).get('median_connect_us'), '.0f')} (by a grant call "
          f"{_fmt(e.get('pasv-call', {}).get('median_connect_us'), '.0f')}); flows/s kernel rule "
          f"{_fmt(h.get('rate', {}).get('flows_per_s'), '.0f')}, enforcer "
          f"{_fmt(e.get('rate', {}).get('flows_per_s'), '.0f')}"
          + "".join(f"; {k} error: {v['error'] if isinstance(v, dict) else v}"
                    for blk in (h, e) for k, v in blk.items()
                    if k == "error" or (isinstance(v, dict) and "error" in v)),
          flush=True)


# -- the table ------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    unit: str
    measured: float | None
    baseline: float | None
    baseline_label: str
    ratio: float | None
    goal: str  # e.g. "ratio >= 0.95"; "" for a figure without a goal
    met: bool | None
    note: str = ""


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _met(v: float | None, op: str, goal: float) -> bool | None:
    if v is None:
        return None
    return v >= goal if op == ">=" else v <= goal


def _errors(samples: list[Any]) -> str:
    errs = sorted({s.error for s in samples if isinstance(s, Iperf) and s.error})
    return "; ".join(errs)


def build_rows(net: dict[str, list[Any]] | None, p3: dict[str, Any] | None,
               flood: dict[str, Any] | None = None) -> list[Row]:
    rows: list[Row] = []
    if net is not None:
        def bps(key: str) -> float | None:
            return median(s.bps for s in net[key])

        def paired(key: str, base: str) -> str:
            return _spread([ratio(a.bps, b.bps) for a, b in zip(net[key], net[base], strict=True)])

        plain, kernel, null, user = bps("plain"), bps("kernel"), bps("null"), bps("user")
        r1 = ratio(kernel, plain)
        rows.append(Row("P1 kernel-mode flow throughput", "Gbit/s", _g(kernel), _g(plain),
                        "plain forwarding", r1, "ratio >= 0.95", _met(r1, ">=", 0.95),
                        "; ".join(x for x in (paired("kernel", "plain"),
                                              _errors(net["kernel"] + net["plain"])) if x)))
        # what P1's flow cannot do without: conntrack, whose marks keep the flow in the kernel
        tracked = bps("conntrack")
        rows.append(Row("P1's floor: conntrack alone", "Gbit/s", _g(tracked), _g(plain),
                        "plain forwarding", ratio(tracked, plain), "", None,
                        "; ".join(x for x in (paired("conntrack", "plain"),
                                              _errors(net["conntrack"])) if x)))
        r2 = ratio(user, null)
        rows.append(Row("P2 user-mode flow throughput", "Gbit/s", _g(user), _g(null),
                        "null NFQUEUE consumer", r2, "ratio >= 1.0", _met(r2, ">=", 1.0),
                        "; ".join(x for x in (paired("user", "null"),
                                              _errors(net["user"] + net["null"])) if x)))
        upps = median(s.pps for s in net["user"])
        npps = median(s.pps for s in net["null"])
        rows.append(Row("P2 user-mode packets through the queue", "pkt/s", upps, npps,
                        "null NFQUEUE consumer", ratio(upps, npps), "", None))
        # with worker processes: one flow, its packets read by a worker; then several flows
        user_w = bps("user-workers")
        r2w = ratio(user_w, null)
        rows.append(Row(f"P2 user-mode flow throughput, {WORKERS} workers", "Gbit/s", _g(user_w),
                        _g(null), "null NFQUEUE consumer", r2w, "ratio >= 1.0", _met(r2w, ">=", 1.0),
                        "; ".join(x for x in (paired("user-workers", "null"),
                                              _errors(net["user-workers"])) if x)))
        stretch = ratio(user_w, plain)
        rows.append(Row(f"P2 stretch: user-mode flow, {WORKERS} workers", "Gbit/s", _g(user_w),
                        _g(plain), "plain forwarding", stretch, "ratio >= 0.4", _met(stretch, ">=", 0.4),
                        paired("user-workers", "plain")))
        x4, x4w = bps("user-x4"), bps("user-x4-workers")
        rows.append(Row(f"user-mode flows x{PARALLEL}, {WORKERS} workers", "Gbit/s", _g(x4w), _g(x4),
                        "the same without workers", ratio(x4w, x4), "", None,
                        "; ".join(x for x in (paired("user-x4-workers", "user-x4"),
                                              _errors(net["user-x4"] + net["user-x4-workers"])) if x)))
        for key, base, label in (("redirect-kernel", "kernel", "kernel-mode AllowFutureConnect flow"),
                                 ("redirect-user", "user", "user-mode AllowFutureConnect flow")):
            rows.append(Row(f"RDC {key.split('-')[1]}-mode redirect throughput", "Gbit/s",
                            _g(bps(key)), _g(bps(base)), label, ratio(bps(key), bps(base)), "", None,
                            "; ".join(x for x in (paired(key, base), _errors(net[key])) if x)))

        def blk(key: str, part: str, field: str) -> float | None:
            return median(b.get(part, {}).get(field) for b in net[key])

        e_rate, h_rate = blk("enforcer", "rate", "flows_per_s"), blk("helper", "rate", "flows_per_s")
        rows.append(Row("P4 new secondary flows admitted", "flows/s", e_rate, h_rate,
                        "kernel rule, NEW accept", ratio(e_rate, h_rate), "", None,
                        f"{_conc(net)} connects in flight, ALLOW_MULTIPLE grant, kernel mode"))
        h_lat = blk("helper", "pasv", "median_connect_us")
        for part, title, with_goal, how in (
                ("pasv", "P4 first-SYN latency of a data connection", True,
                 "the enforcer's FTP filter grants as the 227 passes"),
                ("pasv-call", "P4 first-SYN latency, the client's grant call", False,
                 "the client grants over the control socket after the 227, then connects")):
            e_lat = blk("enforcer", part, "median_connect_us")
            r4 = ratio(e_lat, h_lat)
            per_rep = _spread([ratio(e.get(part, {}).get("median_connect_us"),
                                     h.get("pasv", {}).get("median_connect_us"))
                               for e, h in zip(net["enforcer"], net["helper"], strict=True)])
            if part == "pasv":  # the data connections the kernel's grants admitted
                used = sum(e.get("pasv", {}).get("kernel_grants_used", 0) for e in net["enforcer"])
                done = sum(e.get("pasv", {}).get("ok", 0) for e in net["enforcer"])
                how += f"; {used} of its {done} data connections admitted by a grant the kernel held"
            rows.append(Row(title, "µs", e_lat, h_lat, "conntrack FTP helper", r4,
                            "ratio <= 2" if with_goal else "", _met(r4, "<=", 2.0) if with_goal else None,
                            f"{per_rep}; connect() after PASV/227: {how}"))
        g = blk("enforcer", "pasv-call", "median_grant_us")
        rows.append(Row("P4 grant call (control socket round trip)", "µs", g, None, "", None, "", None,
                        "before each connect() of the row above; the helper's expectation is made "
                        "in-kernel"))
        failed = sum(b.get(p, {}).get("failed", 0) for k in ("enforcer", "helper") for b in net[k]
                     for p in ("rate", "pasv", "pasv-call"))
        errs = sorted({f"{k}: {v['error'] if isinstance(v, dict) else v}" for k2 in ("enforcer", "helper")
                       for b in net[k2] for k, v in b.items()
                       if k == "error" or (isinstance(v, dict) and "error" in v)})
        if failed or errs:
            rows[-1].note += f"; P4 failed connects: {failed}" + (f"; {'; '.join(errs)}" if errs else "")
    if flood is not None:
        loud, quiet = median(flood["flood_p99_ms"]), median(flood["quiet_p99_ms"])
        extra = None if loud is None or quiet is None else loud - quiet
        rows.append(Row("ROB-01 first-SYN delay p99 under a flood", "ms", loud, quiet,
                        "the same run without the flood", ratio(loud, quiet), "<= baseline + 50 ms",
                        None if extra is None else extra <= 50.0,
                        f"c1's 100 connections ({min(flood['opened'], default=0)} opened at least) "
                        "while c2 sends 20,000 SYNs, 2,000 TFTP requests, 2,000 PORT lines and "
                        "10,000 grant calls" + (f"; {flood['error']}" if "error" in flood else "")))
    if p3 is not None:
        big, small = p3["1M"], p3["1k"]
        for key, label, unit, goal, parts in (
                ("grant_engine_us", "P3 grant (Engine.allow_future_connect), 1M pending", "µs", 5.0,
                 "fills"),
                ("match_hit_us", "P3 match (Engine.decide, admitted SYN), 1M pending", "µs", 5.0,
                 "rounds"),
                ("match_miss_us", "P3 no match (Engine.decide, dropped), 1M pending", "µs", 5.0,
                 "rounds"),
                ("bytes_per_perm", "P3 memory per pending permission, 1M", "B", 400.0, None)):
            m, b = big.get(key), small.get(key)
            rows.append(Row(label, unit, m, b, "same at 1k pending", ratio(m, b),
                            f"<= {goal:g} {unit}", _met(m, "<=", goal),
                            "" if parts is None else _p3_spread(
                                big.get(f"{key}_{parts}"), small.get(f"{key}_{parts}"), parts)))
    return rows


def _p3_spread(big: list[float] | None, small: list[float] | None, what: str) -> str:
    """The range of a P3 figure over its rounds (or fills of the table), at 1M and 1k pending."""
    parts = [f"{name}: {min(values):.2f}-{max(values):.2f} µs over {len(values)} {what}"
             if len(values) > 1 else f"{name}: one {what.rstrip('s')}"
             for name, values in (("1M", big), ("1k", small)) if values]
    return "; ".join(parts)


def _spread(ratios: list[float | None]) -> str:
    """The per-repetition (paired) ratios: range and median."""
    vals = [r for r in ratios if r is not None]
    if not vals:
        return ""
    return f"per-rep ratios {min(vals):.2f}-{max(vals):.2f} (median {median(vals):.2f})"


def _g(bps: float | None) -> float | None:
    return bps / 1e9 if bps is not None else None


def _conc(net: dict[str, list[Any]]) -> int:
    for b in net["enforcer"]:
        c = b.get("rate", {}).get("concurrency")
        if c:
            return int(c)
    return 0


def render(rows: list[Row]) -> str:
    def num(v: float | None, unit: str) -> str:
        if v is None:
            return "-"
        spec = ".2f" if unit == "Gbit/s" else ".1f" if unit in ("µs", "ms") and v < 1000 else ",.0f"
        return f"{format(v, spec)} {unit}"

    head = ("name", "measured", "baseline", "ratio", "goal", "met?", "baseline is / note")
    body = []
    for r in rows:
        note = "; ".join(x for x in (r.baseline_label, r.note) if x)
        body.append((r.name, num(r.measured, r.unit), num(r.baseline, r.unit), _fmt(r.ratio, ".3f"),
                     r.goal or "-", {True: "yes", False: "NO", None: "-"}[r.met], note))
    return format_table(head, body)


# -- main ----------------------------------------------------------------------------------

def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    v: dict[str, str | None] = {"python": platform.python_version(), "iperf3": iperf_version()}
    for dist in ("NetfilterQueue",):
        try:
            v[dist] = version(dist)
        except PackageNotFoundError:
            v[dist] = None
    return v


def _jsonable(net: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {k: [asdict(s) | {"pps": s.pps} if isinstance(s, Iperf) else s for s in v]
            for k, v in net.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=int, default=3, help="iperf3 duration per run (default 3)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the network rows (default 5)")
    ap.add_argument("--flows", type=int, default=1000, help="connections per admission-rate run")
    ap.add_argument("--concurrency", type=int, default=16, help="connects in flight for the rate")
    ap.add_argument("--pasv", type=int, default=100, help="PASV + data connects per latency run")
    ap.add_argument("--rounds", type=int, default=15, help="P3 match rounds of 250 flows")
    ap.add_argument("--flood-reps", type=int, default=3, help="ROB-01 repetitions (default 3)")
    ap.add_argument("--skip", nargs="+", choices=["net", "p3", "flood"], default=[],
                    help="leave out the testbed rows (P1, P2, P4), P3 or ROB-01")
    ap.add_argument("--out", type=Path, default=OUT, help=f"JSON output (default {OUT})")
    args = ap.parse_args(argv)
    if not {"net", "flood"} <= set(args.skip) and os.geteuid() != 0:
        print("bench needs root for P1, P2, P4 and ROB-01 (network namespaces, iptables); "
              "--skip net flood runs P3 alone", file=sys.stderr)
        return 2

    t0 = time.monotonic()
    p3 = None if "p3" in args.skip else run_p3(args.rounds, seed=1)
    net = None if "net" in args.skip else run_network(args)
    flood = None
    if "flood" not in args.skip:
        with tempfile.TemporaryDirectory(prefix="pinhole-bench-") as tmp:
            flood = run_flood(args.flood_reps, Path(tmp))
    rows = build_rows(net, p3, flood)
    text = render(rows)
    wall = round(time.monotonic() - t0, 1)
    result = {
        "bench": "pinhole goals",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "versions": _versions(),
        "method": {
            "testbed": "standard('routed'); c1 (192.0.2.11) -> fw -> s1 (198.51.100.21)",
            "reps": args.reps, "iperf3_seconds": args.seconds, "order": "round-robin per repetition",
            "P1": "iperf3 TCP; enforcer with an ALLOW_MULTIPLE kernel-mode grant for s1:5201 vs no rules",
            "P2": "iperf3 TCP; ALLOW_MULTIPLE|NO_KERNEL_MODE grant vs bench.consumers netfilterqueue "
                  "on `iptables -I FORWARD -j NFQUEUE --queue-num 5`; pkt/s from the queue's "
                  "id_sequence (enforcer) or the consumer's count, over iperf3's receive seconds",
            "P3": "bench.permissions.measure at 1k and 1M pending (decision core, in process)",
            "P4 rate": f"{args.flows} TCP connects c1 -> s1:{SINK_PORT}, {args.concurrency} in flight; "
                       "enforcer: one ALLOW_MULTIPLE kernel-mode grant; baseline: the helper ruleset's "
                       "`--ctstate NEW --dport 6000 -j ACCEPT` rule, no enforcer",
            "P4 latency": f"{args.pasv} x (PASV on an FTP control connection to s1:21, 227 reply, timed "
                          "data connect()) per run; baseline: `-t raw ... -j CT --helper ftp` and "
                          "ESTABLISHED,RELATED accept / NEW tcp dport 21 accept / drop, no enforcer; "
                          "enforcer: its FTP filter makes a single-use AllowFutureConnect as each 227 "
                          "passes; and apart, the client makes it over the control socket after the "
                          "227, then connects",
            "ROB-01": "testbed.flood: c1's 100 sequential connects to s1 under an ALLOW_MULTIPLE grant, "
                      "first SYN timed from c1's interface to s1's (kernel capture times), without "
                      "and then under c2's flood; enforcer defaults, FTP and TFTP filters on",
            "medians": "per run the median over its connections; the table: median over runs",
        },
        "wall_seconds": wall,
        "rows": [asdict(r) for r in rows],
        "table": text.splitlines(),
        "p3": p3,
        "network": _jsonable(net) if net is not None else None,
        "flood": flood,
    }
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print()
    print(text)
    out = args.out.relative_to(Path.cwd()) if args.out.is_relative_to(Path.cwd()) else args.out
    print(f"\n{wall} s; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
