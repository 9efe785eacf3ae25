"""Measure NFQUEUE Python bindings: TCP throughput through a firewall namespace.

Run from the repository root, as root::

    .venv/bin/python -m bench.bindings [--seconds 4] [--reps 3] [--only NAME ...]

One routed testbed is built; c1 runs an iperf3 client against an iperf3 server
on s1, so all traffic is forwarded by fw. Each configuration below is measured
``--reps`` times, round-robin (so slow drift of the machine spreads over all
of them), and the median is reported with its ratio to plain forwarding
measured in the same run. Results go to stdout and ``bench/bindings.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    FW,
    READY_TIMEOUT,
    ROOT,
    IperfServer,
    format_table,
    iperf_version,
    last_json,
    median,
    queue_stats,
    read_line,
    run_iperf,
    stop_proc,
)
from testbed.build import Testbed
from testbed.topology import standard

OUT = Path(__file__).resolve().parent / "bindings.json"
QUEUE = 5


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    binding: str | None = None  # None: no queue at all
    new_flows_only: bool = False  # the flows' later packets accepted by conntrack's state
    gso: bool = False

    def rules(self) -> list[list[str]]:
        """iptables rule specs for FORWARD, first-to-last in the chain."""
        rules = []
        if self.new_flows_only:
            rules.append(["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"])
        if self.binding is not None:
            rules.append(["-j", "NFQUEUE", "--queue-num", str(QUEUE)])
        return rules


CONFIGS = [
    Config("plain", "plain forwarding (no rules)"),
    # what any stateful ruleset costs: every packet tracked (a new flow's accepted by the policy)
    Config("conntrack", "conntrack alone (ESTABLISHED,RELATED accept)", new_flows_only=True),
    Config("nfq-all", "NFQUEUE all packets, NetfilterQueue 1.1.0", "netfilterqueue"),
    Config("fnfq-all", "NFQUEUE all packets, fnfqueue 1.1.2", "fnfqueue"),
    Config("nfq-new", "NFQUEUE new flows only, NetfilterQueue 1.1.0", "netfilterqueue",
           new_flows_only=True),
    Config("fnfq-gso", "NFQUEUE all packets, fnfqueue 1.1.2 + GSO (extra)", "fnfqueue", gso=True),
    Config("pinhole-all", "NFQUEUE all packets, pinhole (enforcer.nfqueue)", "pinhole"),
    Config("pinhole-gso", "NFQUEUE all packets, pinhole (enforcer.nfqueue) + GSO", "pinhole", gso=True),
]
# the module each binding imports (a binding's row is skipped where it is missing)
MODULES = {"netfilterqueue": "netfilterqueue", "fnfqueue": "fnfqueue", "pinhole": "enforcer.nfqueue"}


@dataclass
class Sample:
    bps: float | None = None
    packets: int | None = None
    seconds: float | None = None
    overflows: int | None = None
    cpu_seconds: float | None = None  # the consumer's CPU time once it was ready
    queue_dropped: int | None = None
    user_dropped: int | None = None
    retransmits: int | None = None
    error: str | None = None

    @property
    def pps(self) -> float | None:
        if self.packets is None or not self.seconds:
            return None
        return self.packets / self.seconds

    @property
    def cpu_per_packet(self) -> float | None:
        """The consumer's CPU microseconds per packet it decided."""
        if self.cpu_seconds is None or not self.packets:
            return None
        return self.cpu_seconds / self.packets * 1e6


@dataclass
class Row:
    config: Config
    samples: list[Sample] = field(default_factory=list)
    skipped: str | None = None


# -- helpers ---------------------------------------------------------------------------

def binding_missing(binding: str | None) -> str | None:
    if binding is None:
        return None
    if importlib.util.find_spec(MODULES[binding]) is None:
        return f"{binding} not installed (pip install -e '.[bench]')"
    return None


# -- one measurement -------------------------------------------------------------------

def measure(tb: Testbed, server: IperfServer, cfg: Config, seconds: int) -> Sample:
    sample = Sample()
    consumer: subprocess.Popen[bytes] | None = None
    inserted: list[list[str]] = []
    iperf_started = False
    try:
        if cfg.binding is not None:
            argv = [sys.executable, "-m", "bench.consumers", "--binding", cfg.binding,
                    "--queue", str(QUEUE)]
            if cfg.gso:
                argv.append("--gso")
            consumer = tb.popen(FW, argv, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0)
            line = read_line(consumer, READY_TIMEOUT)
            if line != "ready":
                info = last_json(line or "") or {}
                _out, err = stop_proc(tb, consumer)
                consumer = None
                raise RuntimeError(info.get("error") or f"consumer not ready: {line!r} {err.strip()}")
        # Insert in reverse so the chain reads in the order of cfg.rules().
        for spec in reversed(cfg.rules()):
            tb.run(FW, ["iptables", "-I", "FORWARD", *spec])
            inserted.append(spec)
        iperf_started = True
        bps, secs, retr = run_iperf(tb, seconds)
        sample.bps, sample.seconds, sample.retransmits = bps, secs, retr
        if consumer is not None:
            ks = queue_stats(tb, QUEUE)
            if ks:
                sample.queue_dropped, sample.user_dropped = ks["queue_dropped"], ks["user_dropped"]
    except Exception as exc:
        sample.error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if iperf_started:
            server.restart()  # a test that failed half-way can leave the server busy
    finally:
        for spec in inserted:
            tb.run(FW, ["iptables", "-D", "FORWARD", *spec], check=False)
        if consumer is not None:
            out, _err = stop_proc(tb, consumer)
            stats = last_json(out)
            if stats:
                sample.packets = stats.get("packets")
                sample.overflows = stats.get("overflows")
                sample.cpu_seconds = stats.get("cpu_seconds")
    return sample


# -- reporting -------------------------------------------------------------------------

def summarize(rows: list[Row]) -> list[dict[str, Any]]:
    base = next((r for r in rows if r.config.binding is None), None)
    base_bps = median([s.bps for s in base.samples if s.bps]) if base else None
    out = []
    for row in rows:
        ok = [s for s in row.samples if s.error is None and s.bps]
        bps = median([s.bps for s in ok if s.bps])
        pps = median([p for s in ok if (p := s.pps) is not None])
        pkts = median([float(s.packets) for s in ok if s.packets is not None])
        cpu = median([c for s in ok if (c := s.cpu_per_packet) is not None])
        entry: dict[str, Any] = {
            "name": row.config.name,
            "label": row.config.label,
            "binding": row.config.binding,
            "new_flows_only": row.config.new_flows_only,
            "gso": row.config.gso,
            "rules": [" ".join(r) for r in row.config.rules()],
            "skipped": row.skipped,
            "runs_ok": len(ok),
            "median_gbps": round(bps / 1e9, 3) if bps else None,
            "median_pps": round(pps, 1) if pps is not None else None,
            "median_packets_queued": round(pkts) if pkts is not None else None,
            "median_cpu_us_per_packet": round(cpu, 2) if cpu is not None else None,
            "ratio_to_plain": round(bps / base_bps, 4) if bps and base_bps else None,
            "samples": [
                {
                    "gbps": round(s.bps / 1e9, 3) if s.bps else None,
                    "packets": s.packets,
                    "pps": round(s.pps) if s.pps is not None else None,
                    "seconds": s.seconds,
                    "retransmits": s.retransmits,
                    "consumer_overflows": s.overflows,
                    "consumer_cpu_seconds": s.cpu_seconds,
                    "kernel_queue_dropped": s.queue_dropped,
                    "kernel_user_dropped": s.user_dropped,
                    "error": s.error,
                }
                for s in row.samples
            ],
        }
        out.append(entry)
    return out


def table(summary: list[dict[str, Any]]) -> str:
    head = ("configuration", "Gbit/s", "queued pkt/s", "queued/run", "CPU us/pkt", "x plain", "runs", "note")
    lines = []
    for e in summary:
        errs = sorted({s["error"] for s in e["samples"] if s["error"]})
        drops = sum((s["kernel_user_dropped"] or 0) + (s["kernel_queue_dropped"] or 0)
                    for s in e["samples"])
        note = e["skipped"] or "; ".join(errs)
        if not note and drops:
            note = f"kernel queue drops: {drops}"
        lines.append((
            e["label"],
            f"{e['median_gbps']:.2f}" if e["median_gbps"] is not None else "-",
            f"{e['median_pps']:,.0f}" if e["median_pps"] is not None else "-",
            f"{e['median_packets_queued']:,}" if e["median_packets_queued"] is not None else "-",
            f"{e['median_cpu_us_per_packet']:.1f}" if e["median_cpu_us_per_packet"] is not None else "-",
            f"{e['ratio_to_plain']:.3f}" if e["ratio_to_plain"] is not None else "-",
            f"{e['runs_ok']}/{len(e['samples'])}" if not e["skipped"] else "0/0",
            note,
        ))
    return format_table(head, lines)


# -- main ------------------------------------------------------------------------------

def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    v: dict[str, str | None] = {}
    for dist in ("NetfilterQueue", "fnfqueue"):
        try:
            v[dist] = version(dist)
        except PackageNotFoundError:
            v[dist] = None
    v["iperf3"] = iperf_version()
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=4, help="iperf3 duration per run (default 4)")
    ap.add_argument("--reps", type=int, default=3, help="runs per configuration (default 3)")
    ap.add_argument("--only", nargs="+", choices=[c.name for c in CONFIGS],
                    help="measure only these configurations (plain is always included)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"JSON output (default {OUT})")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.bindings needs root (network namespaces, iptables)", file=sys.stderr)
        return 2

    configs = [c for c in CONFIGS if args.only is None or c.binding is None or c.name in args.only]
    rows = [Row(c, skipped=binding_missing(c.binding)) for c in configs]
    t0 = time.monotonic()
    tb = Testbed.up(standard("routed"), tag="bench")
    server = IperfServer(tb)
    try:
        server.start()
        for rep in range(args.reps):
            for row in rows:
                if row.skipped:
                    continue
                s = measure(tb, server, row.config, args.seconds)
                row.samples.append(s)
                shown = f"{s.bps / 1e9:6.2f} Gbit/s" if s.bps else f"error: {s.error}"
                pps = f", {s.pps:,.0f} pkt/s queued" if s.pps is not None else ""
                print(f"[{rep + 1}/{args.reps}] {row.config.name:9s} {shown}{pps}", flush=True)
            if rep == 0 and all(r.skipped or not any(s.bps for s in r.samples) for r in rows):
                break  # nothing works; don't repeat the failures
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        with contextlib.suppress(Exception):
            leftover = tb.run(FW, ["iptables", "-S", "FORWARD"], check=False).stdout
            if "NFQUEUE" in leftover:
                print("warning: NFQUEUE rule left in fw before teardown", file=sys.stderr)
        tb.down()

    summary = summarize(rows)
    result = {
        "bench": "bindings",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": _versions(),
        "method": {
            "testbed": "standard('routed'); iperf3 TCP c1 (192.0.2.11) -> s1 (198.51.100.21) through fw",
            "seconds_per_run": args.seconds,
            "reps": args.reps,
            "queue": QUEUE,
            "order": "round-robin over configurations, repeated reps times",
            "ratio": "median Gbit/s of the row / median Gbit/s of plain forwarding in this run",
            "pps": "packets the consumer accepted / iperf3 receive seconds (median over runs)",
            "cpu_us_per_packet": "the consumer's CPU time (user + system, the kernel's forwarding "
                                 "of the packets it accepts included) / packets it accepted",
        },
        "wall_seconds": round(time.monotonic() - t0, 1),
        "results": summary,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(summary))
    print(f"\n{result['wall_seconds']} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
