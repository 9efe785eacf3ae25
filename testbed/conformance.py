"""`pinhole conformance`: build the testbed, start the enforcer, run the clause suite, print the matrix.

The clause suite is ordinary pytest tests (``testbed/clauses``) run in-process with
this module's collector attached, in two parts: the checks in parallel (pytest-xdist,
``--workers`` of them, each topology and family's checks in one worker with its own
lab), then the timing-sensitive ones (marked ``alone``) by themselves. Every clause
of the catalog appears in the results: clauses with no test yet as
``not-implemented``, never as passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from testbed.catalog import CLAUSES
from testbed.plugin import FIREWALLS, RESULTS, Result
from testbed.topology import FAMILIES, TOPOLOGIES

CLAUSE_DIR = Path(__file__).parent / "clauses"
OUTCOMES = ("passed", "failed", "skipped", "not-implemented")
DEFAULT_WORKERS = 4  # the checks mostly wait (for what must not arrive): more than the cores
SYMBOLS = {"passed": "pass", "failed": "FAIL", "skipped": "skip", "not-implemented": "n/i"}


class Collector:
    """A pytest plugin object: shows progress and keeps the results when the run ends."""

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.announced = False
        self.total = 0
        self.done = 0
        self.started = time.monotonic()

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if session.items:  # (a parallel run's controller collects nothing itself)
            self._collected(len(session.items))

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        if not self.announced:  # every worker collects the same checks
            self._collected(len(ids))

    def _collected(self, count: int) -> None:
        self.total += count
        self.announced = True
        print(f"pinhole conformance: {count} checks", flush=True)

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.announced = False

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        self.done += 1

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        name = report.nodeid.split("::", 1)[-1]
        elapsed = time.monotonic() - self.started
        outcome = ("failed" if report.failed else "deviates" if hasattr(report, "wasxfail")
                   else "skipped" if report.skipped else "passed")
        print(f"[{self.done + 1:3d}/{self.total}] {elapsed:6.1f}s {outcome:<7} {name}", flush=True)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        found: list[Result] = session.config.stash[RESULTS]
        self.results += found


def selected_clauses(expr: str | None) -> list[str]:
    """The catalog clauses that ``-k EXPR`` selects, by clause ID."""
    if not expr:
        return list(CLAUSES)
    from _pytest.mark.expression import Expression

    compiled = Expression.compile(expr)
    return [c for c in CLAUSES if compiled.evaluate(_Substring(c))]


class _Substring:
    """Matches an identifier of ``-k`` against a clause ID as pytest does against test names."""

    def __init__(self, clause: str) -> None:
        self.clause = clause

    def __call__(self, name: str, /, **kwargs: object) -> bool:
        return name in self.clause


def complete(results: list[Result], clauses: list[str], families: list[str]) -> list[Result]:
    """Add a not-implemented row per family for every selected clause that no test checked."""
    seen = {r.clause for r in results}
    out = list(results)
    for clause in clauses:
        if clause not in seen:
            out += [Result(clause, fam, None, None, "not-implemented", 0.0, None,
                           "no test checks this clause yet") for fam in families]
    order = {c: i for i, c in enumerate(CLAUSES)}
    return sorted(out, key=lambda r: (order[r.clause], r.topology or "", r.family or "",
                                      r.mode or ""))


def _merge(outcomes: list[str]) -> str:
    for o in ("failed", "skipped", "passed"):
        if o in outcomes:
            return o
    return "not-implemented"


HELPERS = "kernel-helpers"


def matrix(results: list[Result], families: list[str], topologies: list[str]) -> str:
    """Rows: clause and mode; columns: topology/family. A cell shows the worst outcome in it.

    Checks run with Linux's conntrack helpers in the enforcer's place (the APP
    clauses) fill a second group of columns, after ``|``.
    """
    columns = [(t, f) for t in topologies for f in families]
    helpers = any(r.firewall == HELPERS for r in results)
    cells: dict[tuple[str, str], dict[tuple[str, str, bool], list[str]]] = {}
    for r in results:
        row = cells.setdefault((r.clause, r.mode or "-"), {})
        for t, f in columns:
            if (t, f) == (r.topology, r.family) or (r.topology is None and f == r.family):
                row.setdefault((t, f, r.firewall == HELPERS), []).append(r.outcome)
    heads = [f"{t}/{f}" for t, f in columns]
    width = max(len(h) for h in heads)
    head = f"{'clause':<12}{'mode':<8}" + " ".join(h.ljust(width) for h in heads)
    if helpers:
        head += " | " + " ".join(h.ljust(width) for h in heads)
        head = " " * (head.index("|") + 2) + "Linux conntrack helpers\n" + head
    lines = [head]
    order = list(CLAUSES)
    missing = False
    for (clause, mode), row in sorted(cells.items(), key=lambda kv: (order.index(kv[0][0]),
                                                                   kv[0][1] != "-", kv[0][1])):
        groups = [False, True] if helpers else [False]
        texts = []
        for group in groups:
            compared = any(key[2] for key in row) or not group
            marks = []
            for t, f in columns:
                outcomes = row.get((t, f, group))
                missing |= outcomes is None and compared
                marks.append(SYMBOLS[_merge(outcomes)] if outcomes else "-" if compared else "")
            texts.append(" ".join(m.ljust(width) for m in marks))
        lines.append((f"{clause:<12}{mode:<8}" + " | ".join(texts)).rstrip(" |"))
    if missing:
        lines.append("(-: the clause's checks do not run in that topology/family)")
    return "\n".join(lines)


def summary(results: list[Result]) -> dict[str, Any]:
    """Counts of the firewall under test (the enforcer); the kernel helpers' results,
    a comparison, are counted apart and do not make the run fail."""
    helpers = Counter(r.outcome for r in results if r.firewall == HELPERS)
    results = [r for r in results if r.firewall != HELPERS]
    counts = Counter(r.outcome for r in results)
    by_clause: dict[str, list[str]] = {}
    for r in results:
        by_clause.setdefault(r.clause, []).append(r.outcome)
    clause_counts = Counter(_merge(v) if "not-implemented" not in v else "not-implemented"
                            for v in by_clause.values())
    return {"checks": {o: counts.get(o, 0) for o in OUTCOMES},
            "clauses": {o: clause_counts.get(o, 0) for o in OUTCOMES},
            "kernel_helpers": {o: helpers.get(o, 0) for o in OUTCOMES[:3]},
            "ok": counts.get("failed", 0) == 0}


def _junit_part(path: str, part: str) -> Path:
    return Path(path).with_suffix(f".{part}.xml")


def merge_junit(parts: list[Path], out: Path) -> None:
    """One JUnit file of the parts' test suites (the parts are removed)."""
    merged = ElementTree.Element("testsuites")
    for part in parts:
        if part.exists():
            root = ElementTree.parse(part).getroot()
            merged.extend(root.iter("testsuite"))
            part.unlink()
    ElementTree.ElementTree(merged).write(out, encoding="utf-8", xml_declaration=True)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("conformance", help="run the clause suite and print the result matrix",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="write results and summary as JSON")
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML report")
    p.add_argument("-k", metavar="EXPR", dest="expr", help="select clauses, e.g. 'GEN-01 or GEN-02'")
    p.add_argument("--topology", default=",".join(TOPOLOGIES),
                   help="routed,nat,split (default all; split runs only the checks of "
                        "ingress per interface, ROB-05)")
    p.add_argument("--family", default=",".join(FAMILIES), help="ipv4,ipv6 (default both)")
    p.add_argument("--firewall", default=",".join(FIREWALLS),
                   help="what runs the APP clauses: enforcer,kernel-helpers (default both; "
                        "kernel-helpers fills the matrix's second group of columns)")
    p.add_argument("--artifacts", default="artifacts", help="pcaps and logs (default ./artifacts)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"checks run in parallel, each worker with labs of its own (default "
                        f"{DEFAULT_WORKERS}; 1: one after another); the timing-sensitive ones run "
                        "alone afterwards")
    p.add_argument("-v", "--verbose", action="store_true", help="pytest's own output too")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from testbed.cli import UsageError, require_root, require_tools
    from testbed.plugin import E2E_TOOLS

    require_root("pinhole conformance")
    require_tools(E2E_TOOLS)
    families = [f for f in args.family.split(",") if f]
    topologies = [t for t in args.topology.split(",") if t]
    firewalls = [w for w in args.firewall.split(",") if w]
    for value, allowed, what in ((families, FAMILIES, "--family"), (topologies, TOPOLOGIES, "--topology"),
                                 (firewalls, FIREWALLS, "--firewall")):
        bad = [v for v in value if v not in allowed]
        if bad or not value:
            raise UsageError(f"{what}: {', '.join(bad) or 'nothing'} is not one of {', '.join(allowed)}")
    try:
        clauses = selected_clauses(args.expr)
    except Exception as exc:  # pytest's expression parser raises its own error types
        raise UsageError(f"-k {args.expr!r}: {exc}") from None

    pytest_args = [str(CLAUSE_DIR), "-p", "no:cacheprovider", "-c", os.devnull,
                   "--rootdir", str(CLAUSE_DIR),
                   "--pinhole-topology", ",".join(topologies), "--pinhole-family", ",".join(families),
                   "--pinhole-firewall", ",".join(firewalls),
                   "--pinhole-artifacts", args.artifacts]
    pytest_args += ["-v", "-rfE"] if args.verbose else ["-p", "no:terminal"]
    if args.expr:
        pytest_args += ["-k", args.expr]
    if args.workers < 1:
        raise UsageError("--workers: give at least 1")
    collector = Collector()
    codes = []
    for part, extra in (("parallel", ["-m", "not alone", "-n", str(args.workers), "--dist", "loadgroup"]
                         if args.workers > 1 else ["-m", "not alone"]),
                        ("alone", ["-m", "alone"])):
        junit = [f"--junitxml={_junit_part(args.junit, part)}"] if args.junit else []
        code = pytest.main([*pytest_args, *extra, *junit], plugins=[collector])
        if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED,
                        pytest.ExitCode.NO_TESTS_COLLECTED):
            print(f"pinhole: the clause suite could not run (pytest exit code {int(code)})",
                  file=sys.stderr)
            return 2
        codes.append(code)

    if args.junit:
        merge_junit([_junit_part(args.junit, part) for part in ("parallel", "alone")], Path(args.junit))
    results = complete(collector.results, clauses, families)
    print()
    print(matrix(results, families, topologies))
    for r in results:
        if r.outcome == "failed" and r.firewall != HELPERS:
            print(f"\nFAILED {r.clause} {r.topology}/{r.family}" + (f"/{r.mode}" if r.mode else "")
                  + f" ({r.nodeid})\n  {r.detail.strip()}" + (f"\n  pcap: {r.pcap}" if r.pcap else ""))
    deviations = sorted({(r.clause, r.detail.strip().splitlines()[0]) for r in results
                         if r.outcome == "failed" and r.firewall == HELPERS and r.detail.strip()})
    if deviations:
        print("\nWhere Linux's conntrack helpers fail (a comparison; not counted below):")
        for clause, why in deviations:
            print(f"  {clause}: {why}")
    totals = summary(results)
    c = totals["clauses"]
    print(f"\nclauses: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped, "
          f"{c['not-implemented']} not implemented (of {len(clauses)} selected)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"results": [r.to_dict() for r in results], "summary": totals}, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0 if totals["ok"] and pytest.ExitCode.TESTS_FAILED not in codes else 1
