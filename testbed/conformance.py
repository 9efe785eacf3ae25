"""`pinhole conformance`: build the testbed, run the clause suite against firewalls, print the matrix.

The clause suite is ordinary pytest tests (``testbed/clauses``) run in-process with
this module's collector attached, in two parts: the checks in parallel (pytest-xdist,
``--workers`` of them; a module's checks of one topology, family and firewall go to one
worker, which builds each topology's lab once), then the timing-sensitive ones (marked
``alone``) by themselves.

The run is strict for every firewall under test (``--firewall``, references aside: the
kernel helpers and the trivial routers are comparisons): it fails if a check failed, a
claimed clause has no check (``not-implemented``) or a skipped one, or a cell of a
clause's row has nothing run that the catalog does not mark n/a. ``--self-check`` runs
the trivial routers instead and fails if a clause passes with both (a vacuous clause).

``--shard I/N`` runs a stable part of the selection's checks (testbed.shards); the
shards' JSONs name the selection and all its checks, and ``pinhole report merge``
(testbed.report) makes the whole run's matrix, reports and verdict of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from testbed.catalog import CLAUSES, NO_FIREWALL_BEHAVIOUR, not_applicable
from testbed.drivers import TRIVIAL, DriverError, Firewall, load
from testbed.plugin import FIREWALLS, RESULTS, Result
from testbed.scheduling import worker_count
from testbed.shards import WHOLE, Shard
from testbed.topology import FAMILIES, TOPOLOGIES

CLAUSE_DIR = Path(__file__).parent / "clauses"
OUTCOMES = ("passed", "failed", "skipped", "n/a", "not-implemented")
# The checks mostly wait (for what must not arrive, for transfers and processes): six
# workers a core. Measured on 2 cores (1166 checks and the 12 alone, one run each): 8
# workers 3m19s, 12 workers 3m08s, 16 workers 3m19s (the CPU is then the limit).
WORKERS_PER_CORE, MOST_WORKERS = 6, 16


def default_workers() -> int:
    """What the machine can carry: WORKERS_PER_CORE a core, at most MOST_WORKERS."""
    return min(MOST_WORKERS, WORKERS_PER_CORE * (os.cpu_count() or 1))


DEFAULT_WORKERS = default_workers()
SYMBOLS = {"passed": "pass", "failed": "FAIL", "skipped": "skip", "n/a": "n/a",
           "not-implemented": "n/i", "gap": "-"}


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
    """The catalog clauses that ``-k EXPR`` selects, by clause ID. Each check carries its
    clause ID as a keyword (testbed.plugin), and a clause is matched as pytest matches the
    checks (its own KeywordMatcher: a substring, whatever the case), so that the clauses
    counted are those whose checks ran. A ValueError names what is wrong with ``expr``."""
    if not expr:
        return list(CLAUSES)
    from _pytest.mark import KeywordMatcher
    from _pytest.mark.expression import Expression

    try:
        compiled = Expression.compile(expr)
        return [c for c in CLAUSES if compiled.evaluate(KeywordMatcher({c}))]
    except SyntaxError as exc:
        raise ValueError(f"-k {expr!r}: at column {exc.offset}: {exc.msg}") from None
    except pytest.UsageError as exc:  # (what pytest refuses as it matches: call parameters)
        raise ValueError(f"-k {expr!r}: {exc}") from None


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
             groups: list[Group] | None = None, topologies: list[str] | None = None) -> list[Result]:
    """Add a row per family for every selected clause that a firewall under test claims and
    no test checked: n/a when the catalog marks every cell of the selected ``topologies``
    n/a for it (``--topology routed`` and a NAT clause, say), else not-implemented."""
    out = list(results)
    for group in groups or [ENFORCER]:
        if group.reference:
            continue
        seen = {r.clause for r in results if firewall_of(r) == group.name}
        for clause in clauses:
            if clause in seen or not group.claims(clause):
                continue
            why = [not_applicable(clause, t, f) for t in topologies or () for f in families]
            if why and all(why):
                out += [Result(clause, fam, None, None, "n/a", 0.0, None,
                               f"not in this selection: {why[0]}", firewall=group.name)
                        for fam in families]
            else:
                out += [Result(clause, fam, None, None, "not-implemented", 0.0, None,
                               "no test checks this clause yet", firewall=group.name)
                        for fam in families]
    order = {c: i for i, c in enumerate(CLAUSES)}
    return sorted(out, key=lambda r: (order[r.clause], r.topology or "", r.family or "",
                                      r.mode or ""))


def worst(outcomes: list[str]) -> str:
    """The outcome a cell or a clause shows for its checks' outcomes."""
    for o in ("failed", "skipped", "passed", "n/a"):
        if o in outcomes:
            return o
    return "not-implemented"


Row = tuple[str, str]  # (clause, mode or "-")
Column = tuple[str, str]  # (topology, family)
GAP = "gap"  # a cell in which nothing ran and that the catalog does not mark n/a


@dataclass(frozen=True)
class Cell:
    """One firewall's cell of a row: its outcome (worst of its checks'; ``n/a`` with the
    catalog's reason ``why``; GAP; or "" where the firewall ran none of the row's
    checks) and the results in it."""

    outcome: str
    results: tuple[Result, ...] = ()
    why: str | None = None


def grid(results: list[Result], families: list[str], topologies: list[str],
         groups: list[Group]) -> list[tuple[Row, list[list[Cell]]]]:
    """The matrix's rows in catalog order (mode "-" first): per group, a cell per column."""
    columns = [(t, f) for t in topologies for f in families]
    rows: dict[Row, dict[str, dict[Column, list[Result]]]] = {}  # row -> firewall -> column
    for r in results:
        mine = rows.setdefault((r.clause, r.mode or "-"), {}).setdefault(firewall_of(r), {})
        for t, f in columns:
            if (t, f) == (r.topology, r.family) or (r.topology is None and f == r.family):
                mine.setdefault((t, f), []).append(r)
    order = list(CLAUSES)
    out = []
    for (clause, mode), by_firewall in sorted(rows.items(), key=lambda kv: (
            order.index(kv[0][0]), kv[0][1] != "-", kv[0][1])):
        per_group = []
        for group in groups:
            ran = by_firewall.get(group.name)
            cells = []
            for t, f in columns:
                found = ran.get((t, f)) if ran is not None else None
                why = not_applicable(clause, t, f)
                if found:
                    cells.append(Cell(worst([r.outcome for r in found]), tuple(found)))
                elif ran is None:
                    cells.append(Cell(""))
                elif why is not None:
                    cells.append(Cell("n/a", why=why))
                else:
                    cells.append(Cell(GAP))
            per_group.append(cells)
        out.append(((clause, mode), per_group))
    return out


def gaps(results: list[Result], families: list[str], topologies: list[str],
         firewall: str = "enforcer") -> list[str]:
    """The cells of a firewall's rows in which nothing ran and that the catalog does not
    mark n/a: each fails a strict run."""
    columns = [(t, f) for t in topologies for f in families]
    return [f"{clause} {mode} {t}/{f}"
            for (clause, mode), (cells,) in grid(results, families, topologies,
                                                 [Group(firewall, firewall, False)])
            for (t, f), cell in zip(columns, cells, strict=True) if cell.outcome == GAP]


def matrix(results: list[Result], families: list[str], topologies: list[str],
           groups: list[Group] | None = None) -> str:
    """Rows: clause and mode; columns: topology/family, a group of them per firewall (the
    first group's heading only when there are several). A cell shows the worst outcome
    in it; ``n/a`` where the catalog says the clause's checks do not run there (listed
    after the matrix), ``-`` where nothing ran otherwise (a gap: a strict run fails)."""
    groups = groups or [ENFORCER]
    heads = [f"{t}/{f}" for t in topologies for f in families]
    width = max(len(h) for h in heads)
    block = " ".join(h.ljust(width) for h in heads)
    lead = f"{'clause':<12}{'mode':<8}"
    titles = lead.replace("clause", "      ").replace("mode", "    ") + " | ".join(
        g.title.ljust(len(block)) for g in groups)
    lines = [titles.rstrip()] if len(groups) > 1 else []
    lines.append(lead + " | ".join(block for _ in groups))
    reasons = set()
    gap = False
    for (clause, mode), per_group in grid(results, families, topologies, groups):
        texts = []
        for cells in per_group:
            reasons |= {cell.why for cell in cells if cell.why is not None}
            gap = gap or any(cell.outcome == GAP for cell in cells)
            texts.append(" ".join(SYMBOLS.get(cell.outcome, "").ljust(width)
                                  for cell in cells))
        lines.append((f"{clause:<12}{mode:<8}" + " | ".join(texts)).rstrip(" |"))
    if gap:
        lines.append("(-: none of the clause's checks ran there, and the catalog does not say why)")
    if reasons:
        lines.append("(n/a: the clause's checks do not run there: " + "; ".join(sorted(reasons)) + ")")
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
        clause_counts = Counter(worst(v) if "not-implemented" not in v else "not-implemented"
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


def combine_junit(roots: list[ElementTree.Element]) -> ElementTree.Element:
    """One JUnit document of the test suites of several (a run's parts, shards)."""
    merged = ElementTree.Element("testsuites")
    for root in roots:
        merged.extend(root.iter("testsuite"))
    return merged


@dataclass(frozen=True)
class Selection:
    """What a run selects: the checks (before any sharding) follow from it."""

    expr: str | None
    topologies: tuple[str, ...]
    families: tuple[str, ...]
    firewalls: tuple[str, ...]  # as given to --firewall (the trivial routers for a self-check)
    self_check: bool

    def to_dict(self) -> dict[str, Any]:
        return {"expr": self.expr, "topologies": list(self.topologies),
                "families": list(self.families), "firewalls": list(self.firewalls),
                "self_check": self.self_check}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Selection:
        return cls(d["expr"], tuple(d["topologies"]), tuple(d["families"]), tuple(d["firewalls"]),
                   bool(d["self_check"]))


@dataclass
class Report:
    """A run's results (or a shard's, or the merge of shards) and what they are of."""

    selection: Selection
    groups: list[Group]
    shard: Shard
    checks: list[str]  # the selection's checks (node ids), before sharding
    results: list[Result]  # the checks' results (not-implemented rows not included)
    junit: ElementTree.Element = field(default_factory=lambda: ElementTree.Element("testsuites"))

    @property
    def partial(self) -> bool:
        return self.shard.count > 1

    @property
    def clauses(self) -> list[str]:
        return selected_clauses(self.selection.expr)

    def rows(self) -> list[Result]:
        """The results as the matrix shows them: a whole run's with a not-implemented row
        for each clause no check checked (a shard's cannot tell: another may check it)."""
        if self.partial:
            return self.results
        return complete(self.results, self.clauses, list(self.selection.families), self.groups,
                        list(self.selection.topologies))


def conclude(report: Report) -> tuple[int, dict[str, Any]]:
    """Print the matrix and what follows it; return the exit status and the summary.

    A whole run is strict (see the module's doc); a shard fails only for a failed or
    skipped check of its own: the verdict on the whole is its merge's."""
    sel = report.selection
    families, topologies, groups = list(sel.families), list(sel.topologies), report.groups
    results = report.rows()
    print()
    print(matrix(results, families, topologies, groups))
    if report.partial:
        print(f"\nshard {report.shard}: {len({r.nodeid for r in results})} of the selection's "
              f"{len(report.checks)} checks; the matrix is partial: 'pinhole report merge' of "
              "every shard's JSON gives the whole one and the verdict")
    elif sel.self_check:
        table, ok = self_check(results, report.clauses, list(TRIVIAL))
        print("\nSelf-check: which trivial firewall each clause catches\n" + table)
        print("\nself-check: " + ("every clause catches a trivial firewall" if ok else
                                   "FAILED: a clause passes with both trivial firewalls"))
        return (0 if ok else 1), {"self_check_ok": ok}
    totals = (summary(results, groups=groups) if report.partial else
              summary(results, families, topologies, groups))
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
              f"(of {len(report.clauses)} selected)")
        for hole in mine["gaps"]:
            print(f"  nothing ran for {hole}, and the catalog does not mark it n/a")
    if not totals["under_test"]:
        print("\nno firewall under test in this run (only references: "
              + ", ".join(g.name for g in groups) + ")")
    return (0 if totals["ok"] else 1), totals


def add_parser(sub: Any) -> None:
    from testbed.cli import plain

    p = sub.add_parser("conformance", help="run the clause suite and print the result matrix",
                       description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="write results and summary as JSON")
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML report")
    p.add_argument("--html", metavar="FILE",
                   help="write the matrix as one self-contained HTML page (each cell's checks, "
                        "failures, links to pcaps and logs)")
    p.add_argument("--shard", metavar="I/N",
                   help="run shard I of N: the checks whose node id hashes to I (the same split "
                        "on every machine); 'pinhole report merge' joins the shards' JSONs")
    p.add_argument("-k", metavar="EXPR", dest="expr", help="select clauses, e.g. 'GEN-01 or GEN-02'")
    p.add_argument("--topology", default=",".join(TOPOLOGIES),
                   help="routed,nat,split (default all; split runs only the checks of "
                        "ingress per interface, ROB-05)")
    p.add_argument("--family", default=",".join(FAMILIES), help="ipv4,ipv6 (default both)")
    p.add_argument("--firewall",
                   help="the firewalls to run the checks against, a group of columns each: "
                        "enforcer, enforcer-workers, kernel-helpers, open-router, closed-router, or "
                        "a driver as module:Class or path/to/driver.py:Class (default: "
                        "enforcer,kernel-helpers)")
    p.add_argument("--self-check", action="store_true",
                   help="run the trivial firewalls (open-router, closed-router) and show, per "
                        "clause, which of them the suite catches; fails if a clause catches neither "
                        "(it takes no --firewall)")
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


def parse_shard(text: str | None) -> Shard:
    from testbed.cli import UsageError

    try:
        return WHOLE if text is None else Shard.parse(text)
    except ValueError as exc:
        raise UsageError(f"--shard: {exc}") from None


class _Ids:
    """A pytest plugin object: the node ids collected, and those of the checks that run
    in parallel (not marked ``alone``)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.parallel: list[str] = []

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.ids = [item.nodeid for item in session.items]
        self.parallel = [item.nodeid for item in session.items if item.get_closest_marker("alone") is None]


def run(args: argparse.Namespace) -> int:
    from testbed.cli import UsageError, require_root, require_tools
    from testbed.ledger import LedgerError, state_dir
    from testbed.plugin import E2E_TOOLS
    from testbed.report import check_report_paths, check_writable, write_reports

    shard = parse_shard(args.shard)
    require_root("pinhole conformance")
    require_tools(E2E_TOOLS)
    families = [f for f in args.family.split(",") if f]
    topologies = [t for t in args.topology.split(",") if t]
    for value, allowed, what in ((families, FAMILIES, "--family"), (topologies, TOPOLOGIES, "--topology")):
        bad = [v for v in value if v not in allowed]
        if bad or not value:
            raise UsageError(f"{what}: {', '.join(bad) or 'nothing'} is not one of {', '.join(allowed)}")
        twice = [v for v in allowed if value.count(v) > 1]
        if twice:  # (the run would have every check of it twice)
            raise UsageError(f"{what}: {', '.join(twice)} is named twice")
    if args.self_check and args.firewall is not None:
        raise UsageError("--self-check runs the trivial firewalls (open-router, closed-router): "
                         "it takes no --firewall")
    if args.self_check:
        specs = list(TRIVIAL)
    elif args.firewall is None:
        specs = list(FIREWALLS)
    else:
        specs = [w.strip() for w in args.firewall.split(",") if w.strip()]
    drivers = _drivers(specs)
    groups = [Group.of(d) for d in drivers]
    try:
        selected_clauses(args.expr)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.workers < 1:
        raise UsageError("--workers: give at least 1")
    # what the run writes, before it runs: not after the checks, their results lost
    check_report_paths(args)
    check_writable("--artifacts", args.artifacts, directory=True)
    try:
        state_dir()  # (where each lab's testbed keeps its ledger)
    except LedgerError as exc:
        raise UsageError(str(exc)) from None
    selection = Selection(args.expr, tuple(topologies), tuple(families), tuple(specs), args.self_check)

    pytest_args = ["-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", str(CLAUSE_DIR),
                   "--pinhole-topology", ",".join(topologies), "--pinhole-family", ",".join(families),
                   "--pinhole-firewall", ",".join(specs), "--pinhole-artifacts", args.artifacts]
    if args.expr:
        pytest_args += ["-k", args.expr]
    # the selection's checks, both parts, before sharding (what a merge of shards must cover)
    ids = _Ids()
    code = pytest.main([str(CLAUSE_DIR), *pytest_args, "--collect-only", "-p", "no:terminal"], plugins=[ids])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        print(f"pinhole: the clause suite could not be collected (pytest exit code {int(code)})",
              file=sys.stderr)
        return 2
    if not ids.ids:
        print("pinhole: no check was selected (see -k, --topology, --family)", file=sys.stderr)
        return 2
    mine = [i for i in ids.ids if shard.has(i)]
    if shard != WHOLE:
        print(f"pinhole conformance: shard {shard}: {len(mine)} of the selection's {len(ids.ids)} "
              "checks", flush=True)
        pytest_args += ["--pinhole-shard", str(shard)]
    pytest_args += ["-v", "-rfE"] if args.verbose else ["-p", "no:terminal"]
    if args.self_check:
        pytest_args.append("--pinhole-self-check")
        (Path(args.artifacts) / "self-check-caught.txt").unlink(missing_ok=True)
    collector = Collector()
    parts = []
    workers = worker_count(args.workers, [i for i in ids.parallel if shard.has(i)], [d.name for d in drivers])
    # the alone part collects only the modules its checks are in
    alone = sorted({str(CLAUSE_DIR / i.split("::")[0]) for i in set(mine) - set(ids.parallel)})
    with tempfile.TemporaryDirectory(prefix="pinhole-junit-") as tmp:
        for part, where, extra in (
                ("parallel", [str(CLAUSE_DIR)], ["-m", "not alone", "-n", str(workers), "--dist",
                                                 "loadgroup"] if workers > 1 else ["-m", "not alone"]),
                ("alone", alone, ["-m", "alone"])):
            if not mine or not where:
                break
            junit = Path(tmp) / f"{part}.xml"
            code = pytest.main([*where, *pytest_args, *extra, f"--junitxml={junit}"], plugins=[collector])
            if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED,
                            pytest.ExitCode.NO_TESTS_COLLECTED):
                print(f"pinhole: the clause suite could not run (pytest exit code {int(code)})",
                      file=sys.stderr)
                return 2
            if junit.exists():
                parts.append(ElementTree.parse(junit).getroot())

    report = Report(selection, groups, shard, ids.ids, collector.results, combine_junit(parts))
    status, totals = conclude(report)
    write_reports(report, totals, json_path=args.json, junit_path=args.junit, html_path=args.html)
    return status
