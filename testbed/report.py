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
from collections.abc import Collection
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from testbed.catalog import CLAUSES
from testbed.cli import UsageError
from testbed.conformance import (
    GAP,
    OUTCOMES,
    SYMBOLS,
    Cell,
    Group,
    Report,
    Selection,
    combine_junit,
    conclude,
    grid,
    selected_clauses,
)
from testbed.drivers import MODES
from testbed.jsontypes import NAME_OR_NULL, typed
from testbed.plugin import Result
from testbed.shards import WHOLE, Shard
from testbed.topology import FAMILIES, TOPOLOGIES

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
    except RecursionError:
        raise UsageError(f"{path}: not a JSON report of 'pinhole conformance' (nested too deeply "
                         "to read)") from None
    try:
        _check(data)
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


# the fields of a result row (plugin.Result.to_dict), and of a column group
ROW: dict[str, type | tuple[type, ...]] = {
    "clause": str, "family": NAME_OR_NULL, "topology": NAME_OR_NULL, "mode": NAME_OR_NULL,
    "firewall": NAME_OR_NULL, "outcome": str, "duration_s": (int, float), "pcap": NAME_OR_NULL,
    "log": NAME_OR_NULL, "detail": str, "nodeid": str}
GROUP: dict[str, type] = {"name": str, "title": str, "reference": bool}


def _check(data: Any) -> None:
    """What a JSON must hold to be read as a report, beyond its keys: the types of its
    fields, and the values the matrix and the verdict are made of (the selection's
    topologies, families and -k expression; the groups' claims; each row's clause,
    outcome, firewall, family, topology and mode), so that a damaged file or another
    program's JSON is refused rather than half read. A ValueError says where the first
    problem is (``results[0].clause 'XXX-99' is not a clause``)."""
    typed("the file", data, dict)
    selection = typed("selection", data["selection"], dict)
    _names("selection.topologies", selection["topologies"], TOPOLOGIES)
    _names("selection.families", selection["families"], FAMILIES)
    _names("selection.firewalls", selection["firewalls"])
    typed("selection.self_check", selection["self_check"], bool)
    try:
        selected_clauses(typed("selection.expr", selection["expr"], NAME_OR_NULL))
    except ValueError as exc:
        raise ValueError(f"selection.expr: {exc}") from None
    for i, g in enumerate(typed("groups", data["groups"], list)):
        typed(f"groups[{i}]", g, dict)
        for key, kind in GROUP.items():
            typed(f"groups[{i}].{key}", g[key], kind)
        _names(f"groups[{i}].claims", g["claims"], CLAUSES, empty=True)
    firewalls = _names("groups' names", [g["name"] for g in data["groups"]])
    _names("checks", data["checks"], empty=True)
    for key in ("shard", "directory", "junit"):
        typed(key, data[key], str)
    known: dict[str, Collection[str]] = {
        "clause": CLAUSES, "outcome": OUTCOMES, "firewall": firewalls, "mode": MODES,
        "family": selection["families"], "topology": selection["topologies"]}
    for i, row in enumerate(typed("results", data["results"], list)):
        typed(f"results[{i}]", row, dict)
        for key, types in ROW.items():
            value = typed(f"results[{i}].{key}", row[key], types)
            if key in known and value is not None:
                _one_of(f"results[{i}].{key}", value, known[key])


def _names(where: str, value: Any, allowed: Collection[str] | None = None, *,
           empty: bool = False) -> list[str]:
    """``value``, if it is a list of names (of ``allowed``, when given), none twice and (unless
    ``empty``) at least one; else a ValueError naming the problem."""
    for i, name in enumerate(typed(where, value, list)):
        typed(f"{where}[{i}]", name, str)
        if allowed is not None:
            _one_of(f"{where}[{i}]", name, allowed)
    if not value and not empty:
        raise ValueError(f"{where} is empty")
    twice = [name for name in dict.fromkeys(value) if value.count(name) > 1]
    if twice:
        raise ValueError(f"{where}: {twice[0]!r} is there twice")
    return list(value)


def _one_of(where: str, value: str, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{where} {value!r} is not " + (
            "a clause" if allowed is CLAUSES else f"one of {', '.join(allowed)}"))


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


def check_writable(option: str, path: str | None, *, directory: bool = False) -> None:
    """A UsageError naming the problem unless the file (a directory, with ``directory``)
    ``path`` of ``option`` can be written where it is when the time comes, the
    directories missing on the way made then: checked before a run, whose results would
    otherwise be lost at its end. Nothing is made or written here."""
    if not path:
        return
    given = Path(path)
    if given.exists():
        if given.is_dir() != directory:
            raise UsageError(f"{option} {path}: " + ("exists and is not a directory" if directory
                                                     else "is a directory (name a file in it)"))
        if not os.access(given, os.W_OK | (os.X_OK if directory else 0)):
            raise UsageError(f"{option} {path}: cannot write it (permission denied or read-only)")
        return
    # the nearest of its directories that exists (a dangling link counts: it is in the way)
    where = next((d for d in given.parents if d.exists() or d.is_symlink()), None)
    if where is None:
        raise UsageError(f"{option} {path}: none of its directories exists")
    if not where.is_dir():
        raise UsageError(f"{option} {path}: {where} is not a directory")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: cannot write in {where} (permission denied or read-only)")


def check_report_paths(args: argparse.Namespace) -> None:
    """``--json``, ``--junit`` and ``--html`` as check_writable sees them."""
    for option in ("json", "junit", "html"):
        check_writable(f"--{option}", getattr(args, option))


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
    check_report_paths(args)
    merged = merge([(name, load(Path(name))) for name in args.shards])
    status, totals = conclude(merged)
    write_reports(merged, totals, json_path=args.json, junit_path=args.junit, html_path=args.html)
    return status
