"""`pinhole conformance`: build the testbed, run the clause suite against firewalls, print the matrix.

The clause suite is ordinary pytest tests (``testbed/clauses``) run in-process with
this module's collector attached, in two parts: the checks in parallel (pytest-xdist,
``--workers`` of them, each topology, family and firewall's checks in one worker with
its own lab), then the timing-sensitive ones (marked ``alone``) by themselves.

The run is strict for every firewall under test (``--firewall``, references aside: the
kernel helpers and the trivial routers are comparisons): it fails if a check failed, a
claimed clause has no check (``not-implemented``) or a skipped one, or a cell of a
clause's row has nothing run that the catalog does not mark n/a. ``--self-check`` runs
the trivial routers instead and fails if a clause passes with both (a vacuous clause).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from testbed.catalog import CLAUSES, NO_FIREWALL_BEHAVIOUR, not_applicable
from testbed.drivers import TRIVIAL, DriverError, Firewall, load
from testbed.plugin import FIREWALLS, RESULTS, Result
from testbed.topology import FAMILIES, TOPOLOGIES

CLAUSE_DIR = Path(__file__).parent / "clauses"
OUTCOMES = ("passed", "failed", "skipped", "n/a", "not-implemented")
DEFAULT_WORKERS = 4  # the checks mostly wait (for what must not arrive): more than the cores
SYMBOLS = {"passed": "pass", "failed": "FAIL", "skipped": "skip", "n/a": "n/a",
           "not-implemented": "n/i"}


class Collector:
    """A pytest plugin object: shows progress and keeps the results when the run ends."""

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.announced = False
        self.total = 0
        self.done = 0
        self.started = time.monotonic()
        self.outcomes: dict[str, str] = {}  # nodeid -> the check's outcome, until its teardown

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
        """One line per check when it is over: the outcome of the check itself (a failed
        set-up or call, else what the call came to), a failed teardown as an error."""
        outcome = ("deviates" if hasattr(report, "wasxfail") else
                   getattr(report, "pinhole_outcome", report.outcome))
        if report.when != "teardown":
            if report.when == "call" or report.outcome != "passed":
                self.outcomes[report.nodeid] = outcome
            return
        shown = self.outcomes.pop(report.nodeid, "passed")
        if report.failed:
            shown = "error" if shown == "passed" else shown
        name = report.nodeid.split("::", 1)[-1]
        elapsed = time.monotonic() - self.started
        print(f"[{self.done + 1:3d}/{self.total}] {elapsed:6.1f}s {shown:<8} {name}", flush=True)

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


@dataclass(frozen=True)
class Group:
    """A firewall's group of columns in the matrix."""

    name: str
    title: str
    reference: bool  # a comparison: its failures do not fail the run
    claims: Callable[[str], bool] = lambda clause: True

    @classmethod
    def of(cls, driver: type[Firewall]) -> Group:
        return cls(driver.name, driver.title, driver.reference, driver.claims_clause)


ENFORCER = Group("enforcer", "pinhole enforcer", False)


def firewall_of(r: Result) -> str:
    return r.firewall or "enforcer"


def complete(results: list[Result], clauses: list[str], families: list[str],
             groups: list[Group] | None = None) -> list[Result]:
    """Add a not-implemented row per family for every selected clause that a firewall under
    test claims and no test checked."""
    out = list(results)
    for group in groups or [ENFORCER]:
        if group.reference:
            continue
        seen = {r.clause for r in results if firewall_of(r) == group.name}
        out += [Result(clause, fam, None, None, "not-implemented", 0.0, None,
                       "no test checks this clause yet", firewall=group.name)
                for clause in clauses if clause not in seen and group.claims(clause)
                for fam in families]
    order = {c: i for i, c in enumerate(CLAUSES)}
    return sorted(out, key=lambda r: (order[r.clause], r.topology or "", r.family or "",
                                      r.mode or ""))


def _merge(outcomes: list[str]) -> str:
    for o in ("failed", "skipped", "passed", "n/a"):
        if o in outcomes:
            return o
    return "not-implemented"


Row = tuple[str, str]  # (clause, mode or "-")
Cell = tuple[str, str]  # (topology, family)


def _cells(results: list[Result], columns: list[Cell]) -> dict[Row, dict[str, dict[Cell, list[str]]]]:
    """row -> firewall -> cell -> outcomes"""
    cells: dict[Row, dict[str, dict[Cell, list[str]]]] = {}
    for r in results:
        row = cells.setdefault((r.clause, r.mode or "-"), {}).setdefault(firewall_of(r), {})
        for t, f in columns:
            if (t, f) == (r.topology, r.family) or (r.topology is None and f == r.family):
                row.setdefault((t, f), []).append(r.outcome)
    return cells


def gaps(results: list[Result], families: list[str], topologies: list[str],
         firewall: str = "enforcer") -> list[str]:
    """The cells of a firewall's rows in which nothing ran and that the catalog does not
    mark n/a: each fails a strict run."""
    columns = [(t, f) for t in topologies for f in families]
    out = []
    for (clause, mode), row in _cells(results, columns).items():
        ran = row.get(firewall)
        if ran is None:
            continue
        out += [f"{clause} {mode} {t}/{f}" for t, f in columns
                if (t, f) not in ran and not_applicable(clause, t, f) is None]
    return out


def matrix(results: list[Result], families: list[str], topologies: list[str],
           groups: list[Group] | None = None) -> str:
    """Rows: clause and mode; columns: topology/family, a group of them per firewall (the
    first group's heading only when there are several). A cell shows the worst outcome
    in it; ``n/a`` where the catalog says the clause's checks do not run there (listed
    after the matrix), ``-`` where nothing ran otherwise (a gap: a strict run fails)."""
    groups = groups or [ENFORCER]
    columns = [(t, f) for t in topologies for f in families]
    cells = _cells(results, columns)
    heads = [f"{t}/{f}" for t, f in columns]
    width = max(len(h) for h in heads)
    block = " ".join(h.ljust(width) for h in heads)
    lead = f"{'clause':<12}{'mode':<8}"
    titles = lead.replace("clause", "      ").replace("mode", "    ") + " | ".join(
        g.title.ljust(len(block)) for g in groups)
    lines = [titles.rstrip()] if len(groups) > 1 else []
    lines.append(lead + " | ".join(block for _ in groups))
    order = list(CLAUSES)
    reasons: dict[str, str] = {}
    gap = False
    for (clause, mode), row in sorted(cells.items(), key=lambda kv: (order.index(kv[0][0]),
                                                                   kv[0][1] != "-", kv[0][1])):
        texts = []
        for group in groups:
            ran = row.get(group.name)
            marks = []
            for t, f in columns:
                outcomes = ran.get((t, f)) if ran is not None else None
                why = not_applicable(clause, t, f)
                if outcomes:
                    marks.append(SYMBOLS[_merge(outcomes)])
                elif ran is None:
                    marks.append("")
                elif why is not None:
                    marks.append("n/a")
                    reasons.setdefault(f"{clause} {t}/{f}", why)
                else:
                    marks.append("-")
                    gap = True
            texts.append(" ".join(m.ljust(width) for m in marks))
        lines.append((f"{clause:<12}{mode:<8}" + " | ".join(texts)).rstrip(" |"))
    if gap:
        lines.append("(-: none of the clause's checks ran there, and the catalog does not say why)")
    if reasons:
        lines.append("(n/a: the clause's checks do not run there: "
                     + "; ".join(sorted({why for why in reasons.values()})) + ")")
    return "\n".join(lines)


def summary(results: list[Result], families: list[str] | None = None,
            topologies: list[str] | None = None, groups: list[Group] | None = None) -> dict[str, Any]:
    """Counts per firewall. The run is ok when every firewall under test (not a reference)
    failed no check and has no clause skipped, not implemented or with a gap."""
    groups = groups or [ENFORCER]
    out: dict[str, Any] = {"firewalls": {}, "ok": True}
    for group in groups:
        mine = [r for r in results if firewall_of(r) == group.name]
        counts = Counter(r.outcome for r in mine)
        by_clause: dict[str, list[str]] = {}
        for r in mine:
            by_clause.setdefault(r.clause, []).append(r.outcome)
        clause_counts = Counter(_merge(v) if "not-implemented" not in v else "not-implemented"
                                for v in by_clause.values())
        holes = gaps(mine, families or [], topologies or [], group.name) if families and topologies else []
        ok = not (counts.get("failed") or counts.get("skipped") or counts.get("not-implemented")
                  or holes)
        out["firewalls"][group.name] = {
            "title": group.title, "reference": group.reference,
            "checks": {o: counts.get(o, 0) for o in OUTCOMES},
            "clauses": {o: clause_counts.get(o, 0) for o in OUTCOMES}, "gaps": holes, "ok": ok}
        if not group.reference:
            out["ok"] = out["ok"] and ok
    out["under_test"] = [g.name for g in groups if not g.reference]
    return out


def self_check(results: list[Result], clauses: list[str], trivial: list[str]) -> tuple[str, bool]:
    """Which trivial firewalls each clause catches (fails); a clause none of them fails
    is vacuous, unless it checks no firewall behaviour. The table, and whether it passed."""
    failed = {(firewall_of(r), r.clause) for r in results if r.outcome == "failed"}
    ran = {(firewall_of(r), r.clause) for r in results if r.outcome not in ("n/a", "not-implemented")}
    width = max(len(t) for t in trivial) + 2
    lines = [f"{'clause':<12}" + "".join(t.ljust(width) for t in trivial) + "verdict"]
    ok = True
    for clause in clauses:
        marks = ["caught" if (t, clause) in failed else "passes" if (t, clause) in ran else "n/a"
                 for t in trivial]
        exempt = NO_FIREWALL_BEHAVIOUR.get(clause)
        if "caught" in marks:
            verdict = "ok"
        elif exempt is not None:
            verdict = f"exempt: {exempt}"
        else:
            verdict = "VACUOUS: no trivial firewall fails it"
            ok = False
        lines.append(f"{clause:<12}" + "".join(m.ljust(width) for m in marks) + verdict)
    return "\n".join(lines), ok


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
                   help="the firewalls to run the checks against, a group of columns each: "
                        "enforcer, kernel-helpers, open-router, closed-router, or a driver as "
                        "module:Class or path/to/driver.py:Class (default: enforcer,kernel-helpers)")
    p.add_argument("--self-check", action="store_true",
                   help="run the trivial firewalls (open-router, closed-router) and show, per "
                        "clause, which of them the suite catches; fails if a clause catches neither")
    p.add_argument("--artifacts", default="artifacts", help="pcaps and logs (default ./artifacts)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"checks run in parallel, each worker with labs of its own (default "
                        f"{DEFAULT_WORKERS}; 1: one after another); the timing-sensitive ones run "
                        "alone afterwards")
    p.add_argument("-v", "--verbose", action="store_true", help="pytest's own output too")
    p.set_defaults(func=run)


def _drivers(specs: list[str]) -> list[type[Firewall]]:
    from testbed.cli import UsageError

    out: list[type[Firewall]] = []
    for spec in specs:
        try:
            driver = load(spec)
        except DriverError as exc:
            raise UsageError(f"--firewall: {exc}") from None
        if any(d.name == driver.name for d in out):
            raise UsageError(f"--firewall: {driver.name} is named twice")
        out.append(driver)
    if not out:
        raise UsageError("--firewall: name at least one firewall")
    return out


def run(args: argparse.Namespace) -> int:
    from testbed.cli import UsageError, require_root, require_tools
    from testbed.plugin import E2E_TOOLS

    require_root("pinhole conformance")
    require_tools(E2E_TOOLS)
    families = [f for f in args.family.split(",") if f]
    topologies = [t for t in args.topology.split(",") if t]
    for value, allowed, what in ((families, FAMILIES, "--family"), (topologies, TOPOLOGIES, "--topology")):
        bad = [v for v in value if v not in allowed]
        if bad or not value:
            raise UsageError(f"{what}: {', '.join(bad) or 'nothing'} is not one of {', '.join(allowed)}")
    specs = list(TRIVIAL) if args.self_check else [w for w in args.firewall.split(",") if w.strip()]
    drivers = _drivers([w.strip() for w in specs])
    groups = [Group.of(d) for d in drivers]
    try:
        clauses = selected_clauses(args.expr)
    except Exception as exc:  # pytest's expression parser raises its own error types
        raise UsageError(f"-k {args.expr!r}: {exc}") from None
    if args.workers < 1:
        raise UsageError("--workers: give at least 1")

    pytest_args = [str(CLAUSE_DIR), "-p", "no:cacheprovider", "-c", os.devnull,
                   "--rootdir", str(CLAUSE_DIR),
                   "--pinhole-topology", ",".join(topologies), "--pinhole-family", ",".join(families),
                   "--pinhole-firewall", ",".join(specs), "--pinhole-artifacts", args.artifacts]
    pytest_args += ["-v", "-rfE"] if args.verbose else ["-p", "no:terminal"]
    if args.self_check:
        pytest_args.append("--pinhole-self-check")
        (Path(args.artifacts) / "self-check-caught.txt").unlink(missing_ok=True)
    if args.expr:
        pytest_args += ["-k", args.expr]
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
    if codes == [pytest.ExitCode.NO_TESTS_COLLECTED] * 2:
        print("pinhole: no check was selected (see -k, --topology, --family)", file=sys.stderr)
        return 2

    results = complete(collector.results, clauses, families, groups)
    print()
    print(matrix(results, families, topologies, groups))
    if args.self_check:
        table, ok = self_check(results, [c for c in clauses if c in CLAUSES], list(TRIVIAL))
        print("\nSelf-check: which trivial firewall each clause catches\n" + table)
        print("\nself-check: " + ("every clause catches a trivial firewall" if ok else
                                   "FAILED: a clause passes with both trivial firewalls"))
        _write_json(args.json, results, {"self_check_ok": ok})
        return 0 if ok else 1
    totals = summary(results, families, topologies, groups)
    for r in results:
        if r.outcome in ("failed", "skipped") and firewall_of(r) in totals["under_test"]:
            print(f"\n{r.outcome.upper()} {firewall_of(r)} {r.clause} {r.topology}/{r.family}"
                  + (f"/{r.mode}" if r.mode else "") + f" ({r.nodeid})\n  {r.detail.strip()}"
                  + (f"\n  pcap: {r.pcap}" if r.pcap else ""))
    for group in groups:
        mine = totals["firewalls"][group.name]
        if group.reference:
            failing = sorted({(r.clause, r.detail.strip().splitlines()[0]) for r in results
                              if r.outcome == "failed" and firewall_of(r) == group.name
                              and r.detail.strip()})
            if failing and group.name not in TRIVIAL:
                print(f"\n{group.title}: where it fails (a comparison; not counted):")
                for clause, why in failing:
                    print(f"  {clause}: {why}")
            continue
        c = mine["clauses"]
        print(f"\n{group.name}: clauses: {c['passed']} passed, {c['failed']} failed, "
              f"{c['skipped']} skipped, {c['n/a']} n/a, {c['not-implemented']} not implemented "
              f"(of {len(clauses)} selected)")
        for hole in mine["gaps"]:
            print(f"  nothing ran for {hole}, and the catalog does not mark it n/a")
    if not totals["under_test"]:
        print("\nno firewall under test in this run (only references: "
              + ", ".join(g.name for g in groups) + ")")
    _write_json(args.json, results, totals)
    return 0 if totals["ok"] else 1


def _write_json(path: str | None, results: list[Result], totals: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(
            {"results": [r.to_dict() for r in results], "summary": totals}, indent=2) + "\n")
        print(f"results: {path}")
