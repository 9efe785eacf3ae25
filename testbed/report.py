"""A run's reports (JSON, JUnit, HTML), and ``pinhole report merge`` of shards' JSONs.

The JSON of ``pinhole conformance --json`` holds what a merge needs: the selection,
the firewalls' column groups, the shard (``1/1`` for a whole run), every check of the
selection before sharding, the results, and the run's JUnit. A merge checks that the
shards are of one selection, cover 1..N once each and hold every check exactly once,
then concludes as a whole run does (testbed.conformance.conclude): the same matrix,
summary and exit status.
"""

from __future__ import annotations

import argparse
import html
import json
import os
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from testbed.cli import UsageError
from testbed.conformance import (
    GAP,
    SYMBOLS,
    Cell,
    Group,
    Report,
    Selection,
    combine_junit,
    conclude,
    grid,
)
from testbed.plugin import Result
from testbed.shards import WHOLE, Shard

# --- JSON ---------------------------------------------------------------------------------


def to_json(report: Report, totals: dict[str, Any], directory: Path) -> dict[str, Any]:
    clauses = report.clauses
    return {
        "selection": report.selection.to_dict(),
        "groups": [{"name": g.name, "title": g.title, "reference": g.reference,
                    "claims": [c for c in clauses if g.claims(c)]} for g in report.groups],
        "shard": str(report.shard),
        "checks": report.checks,
        "results": [r.to_dict() for r in report.rows()],
        "summary": totals,
        # where the file was written: its artifacts' paths are found again relative to it
        "directory": str(directory.resolve()),
        "junit": ElementTree.tostring(report.junit, encoding="unicode"),
    }


def load(path: Path) -> Report:
    """A report from its JSON; a UsageError that names the file and the problem otherwise."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not JSON ({exc})") from None
    try:
        directory = data["directory"]
        results = []
        for row in data["results"]:
            r = Result.from_dict(row)
            if r.nodeid:  # (the rows of clauses no check checks are the conclusion's own)
                r.pcap = _relocate(r.pcap, directory, path.parent)
                r.log = _relocate(r.log, directory, path.parent)
                results.append(r)
        groups = [Group(g["name"], g["title"], bool(g["reference"]), frozenset(g["claims"]).__contains__)
                  for g in data["groups"]]
        junit = ElementTree.fromstring(data["junit"])
        return Report(Selection.from_dict(data["selection"]), groups, Shard.parse(data["shard"]),
                      [str(c) for c in data["checks"]], results, junit)
    except KeyError as exc:
        raise UsageError(f"{path}: not a JSON report of 'pinhole conformance' (no {exc})") from None
    except (TypeError, ValueError, AttributeError, ElementTree.ParseError) as exc:
        raise UsageError(f"{path}: not a JSON report of 'pinhole conformance' ({exc})") from None


def _relocate(path: str | None, written_in: str, now_in: Path) -> str | None:
    """An artifact's path, found relative to its JSON's directory when the artifacts moved
    along with it (downloaded from another machine)."""
    if path is None or Path(path).exists():
        return path
    moved = Path(os.path.normpath(now_in.resolve() / os.path.relpath(path, written_in)))
    return str(moved) if moved.exists() else path


# --- merge --------------------------------------------------------------------------------


def merge(shards: list[tuple[str, Report]]) -> Report:
    """The whole run of which these are the shards; a UsageError naming what is wrong:
    selections that differ, a shard missing or given twice, a check missing or doubled."""
    if not shards:
        raise UsageError("report merge: name the shards' JSON files")
    first_name, first = shards[0]
    for name, r in shards[1:]:
        if r.selection != first.selection:
            mine, theirs = r.selection.to_dict(), first.selection.to_dict()
            what = ", ".join(f"{k} {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k])
            raise UsageError(f"{name}: its selection differs from {first_name}'s ({what})")
    counts = {r.shard.count for _, r in shards}
    if len(counts) > 1:
        raise UsageError("the shards split in different numbers: "
                         + ", ".join(f"{r.shard} ({name})" for name, r in shards))
    (count,) = counts
    given: dict[int, str] = {}
    for name, r in shards:
        if r.shard.index in given:
            raise UsageError(f"shard {r.shard} is given twice: {given[r.shard.index]} and {name}")
        given[r.shard.index] = name
    missing_shards = [str(Shard(i, count)) for i in range(1, count + 1) if i not in given]
    if missing_shards:
        raise UsageError(f"shard {', '.join(missing_shards)} missing (given: "
                         + ", ".join(str(r.shard) for _, r in shards) + ")")
    for name, r in shards[1:]:
        if sorted(r.checks) != sorted(first.checks):
            raise UsageError(f"{name} and {first_name} list different checks for their selection "
                             "(runs of different versions of the suite?)")
    owner: dict[str, str] = {}
    for name, r in shards:
        for nodeid in sorted({x.nodeid for x in r.results}):
            if nodeid in owner:
                raise UsageError(f"check {nodeid} is doubled: in {owner[nodeid]} and in {name}")
            owner[nodeid] = name
    unknown = sorted(set(owner) - set(first.checks))
    if unknown:
        raise UsageError(f"check {unknown[0]} of {owner[unknown[0]]} is not one of the selection's")
    missing = [c for c in first.checks if c not in owner]
    if missing:
        shard = Shard(next(i for i in range(1, count + 1) if Shard(i, count).has(missing[0])), count)
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UsageError(f"check {missing[0]}{more} has no result (shard {shard}: {given[shard.index]})")
    in_order = [r for _, r in sorted(shards, key=lambda s: s[1].shard.index)]
    return Report(first.selection, first.groups, WHOLE, first.checks,
                  [x for r in in_order for x in r.results], combine_junit([r.junit for r in in_order]))


# --- the files ----------------------------------------------------------------------------


def write_reports(report: Report, totals: dict[str, Any], *, json_path: str | None,
                  junit_path: str | None, html_path: str | None) -> None:
    for path in (json_path, junit_path, html_path):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if json_path:
        data = to_json(report, totals, Path(json_path).parent)
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n")
        print(f"results: {json_path}")
    if junit_path:
        ElementTree.ElementTree(report.junit).write(junit_path, encoding="utf-8", xml_declaration=True)
    if html_path:
        Path(html_path).write_text(html_page(report, totals, Path(html_path).parent))
        print(f"matrix as a page: {html_path}")


CLASSES = {"passed": "passed", "failed": "failed", "skipped": "skipped", "n/a": "na",
           "not-implemented": "ni", GAP: "gap", "": "none"}
STYLE = """
body { font: 14px sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #bbb; padding: 2px 6px; text-align: left; vertical-align: top; }
th.group { text-align: center; background: #eee; }
td.passed { background: #c6efc6; } td.failed { background: #f5b5b5; }
td.skipped { background: #f7e38f; } td.na { background: #e3e3e3; color: #555; }
td.ni { background: #d9cdf2; } td.gap { background: #fff; color: #b00; font-weight: bold; }
details ul { margin: 4px 0; padding-left: 1.2em; min-width: 30em; }
pre { white-space: pre-wrap; margin: 2px 0; font-size: 12px; background: rgba(255,255,255,.6); }
.ok { color: #070; } .bad { color: #b00; }
"""


def html_page(report: Report, totals: dict[str, Any], directory: Path) -> str:
    """The matrix as one page with no outside reference: a cell per firewall, topology and
    family in its outcome's colour, opening to its checks (id, outcome, time, failure,
    links to the pcap and the firewall's log relative to ``directory``)."""
    sel = report.selection
    columns = [f"{t}/{f}" for t in sel.topologies for f in sel.families]
    e = html.escape
    verdict = (totals.get("self_check_ok") if sel.self_check and not report.partial
               else totals.get("ok"))
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>pinhole conformance</title>", f"<style>{STYLE}</style></head><body>",
           "<h1>pinhole conformance</h1>", "<p>",
           f"selection: -k {e(sel.expr or '(all clauses)')}; topologies {e(', '.join(sel.topologies))}; "
           f"families {e(', '.join(sel.families))}; firewalls {e(', '.join(sel.firewalls))}"
           + ("; self-check" if sel.self_check else "")
           + (f"; shard {e(str(report.shard))} (partial)" if report.partial else "") + "<br>",
           f"{len({r.nodeid for r in report.results})} of {len(report.checks)} checks; verdict: "
           + ('<b class="ok">ok</b>' if verdict else '<b class="bad">FAILED</b>') + "</p>",
           "<table>", '<tr><th rowspan="2">clause</th><th rowspan="2">mode</th>'
           + "".join(f'<th class="group" colspan="{len(columns)}">{e(g.title)}'
                     + (" (reference)" if g.reference else "") + "</th>" for g in report.groups)
           + "</tr>",
           "<tr>" + "".join(f"<th>{e(c)}</th>" for _ in report.groups for c in columns) + "</tr>"]
    rows = grid(report.rows(), list(sel.families), list(sel.topologies), report.groups)
    for (clause, mode), per_group in rows:
        out.append(f"<tr><th>{e(clause)}</th><td>{e(mode)}</td>"
                   + "".join(_cell(cell, directory) for cells in per_group for cell in cells) + "</tr>")
    out.append("</table>")
    out.append("<p>pass: every check passed; FAIL: one failed; skip: one was skipped; "
               "n/a: not applicable there (hover for the catalog's reason); n/i: no check "
               "implements the clause; -: nothing ran there and the catalog does not say why</p>")
    firewalls = totals.get("firewalls", {})
    if firewalls:
        out.append("<h2>Summary</h2><table><tr><th>firewall</th><th>checks</th><th>clauses</th>"
                   "<th>gaps</th></tr>")
        for mine in firewalls.values():
            counts = ", ".join(f"{n} {o}" for o, n in mine["clauses"].items())
            checks = ", ".join(f"{n} {o}" for o, n in mine["checks"].items())
            out.append(f"<tr><td>{e(mine['title'])}" + (" (reference)" if mine["reference"] else "")
                       + f"</td><td>{e(checks)}</td><td>{e(counts)}</td>"
                       f"<td>{e('; '.join(mine['gaps']) or 'none')}</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _cell(cell: Cell, directory: Path) -> str:
    e = html.escape
    symbol = SYMBOLS.get(cell.outcome, "")
    title = f' title="{e(cell.why)}"' if cell.why else ""
    klass = f' class="{CLASSES[cell.outcome]}"'
    if not cell.results:
        return f"<td{klass}{title}>{e(symbol)}</td>"
    items = []
    for r in cell.results:
        links = " ".join(f'<a href="{e(_link(path, directory))}">{what}</a>'
                         for what, path in (("pcap", r.pcap), ("log", r.log))
                         if path and Path(path).exists())
        items.append(f"<li><code>{e(r.nodeid or r.clause)}</code> {e(r.outcome)} "
                     f"{r.duration_s:.2f} s {links}"
                     + (f"<pre>{e(r.detail.strip())}</pre>" if r.outcome != "passed" and r.detail else "")
                     + "</li>")
    return (f"<td{klass}{title}><details><summary>{e(symbol)}</summary><ul>"
            + "".join(items) + "</ul></details></td>")


def _link(path: str, directory: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), directory.resolve())).as_posix()


# --- pinhole report -----------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="reports of conformance runs: merge shards' JSONs")
    commands = p.add_subparsers(dest="report_command", required=True)
    m = commands.add_parser(
        "merge", help="one matrix, JSON, JUnit and HTML of the JSONs of a run's shards",
        description="Merge the JSON reports of 'pinhole conformance --shard I/N --json FILE' "
                    "(every shard 1..N of one selection) into the whole run's matrix and reports; "
                    "the exit status is the whole run's (strict). Fails, naming what, if a shard or "
                    "a check is missing or doubled or the selections differ.")
    m.add_argument("shards", nargs="+", metavar="SHARD.json")
    m.add_argument("--json", metavar="FILE", help="write the merged results and summary as JSON")
    m.add_argument("--junit", metavar="FILE", help="write the shards' JUnit reports as one")
    m.add_argument("--html", metavar="FILE", help="write the matrix as one self-contained HTML page")
    m.set_defaults(func=merge_command)


def merge_command(args: argparse.Namespace) -> int:
    merged = merge([(name, load(Path(name))) for name in args.shards])
    status, totals = conclude(merged)
    write_reports(merged, totals, json_path=args.json, junit_path=args.junit, html_path=args.html)
    return status
