"""Shards of a conformance run, their merge, and the run's HTML page (no root needed)."""

from __future__ import annotations

import json
import random
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from testbed import cli
from testbed.conformance import ENFORCER, Group, Report, Selection, conclude, matrix, summary
from testbed.plugin import Result
from testbed.report import load, merge, write_reports
from testbed.shards import WHOLE, Shard, shard_of

IDS = [f"test_gen.py::test_{i}[{t}-ipv4-enforcer]" for i in range(60) for t in ("routed", "nat")]
HELPERS = Group("kernel-helpers", "Linux conntrack helpers", True, lambda c: c.startswith("APP"))
SELECTION = Selection("GEN-01 or GEN-02 or APP-TFTP-01", ("routed", "nat"), ("ipv4",),
                      ("enforcer", "kernel-helpers"), False)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_the_checks_the_same_way_whatever_the_order(count: int) -> None:
    shards = [Shard(i, count) for i in range(1, count + 1)]
    split = [[c for c in IDS if s.has(c)] for s in shards]
    assert sorted(c for part in split for c in part) == sorted(IDS)  # each in exactly one
    assert all(sum(s.has(c) for s in shards) == 1 for c in IDS)
    shuffled = random.Random(4).sample(IDS, len(IDS))
    assert [sorted(c for c in shuffled if s.has(c)) for s in shards] == [sorted(p) for p in split]
    assert [shard_of(c, count) for c in IDS] == [shard_of(c, count) for c in IDS]
    if count > 1:
        assert all(split), "a shard of 120 checks is empty: the hash does not spread"
    # the digest, not Python's per-process hash: the same on every machine and run
    assert shard_of("test_gen.py::test_x[routed-ipv4-enforcer]", 1000) == 886


@pytest.mark.parametrize(("text", "problem"), [("3/2", "I is from 1 to N"), ("0/2", "I is from 1 to N"),
                                               ("x", "is not I/N"), ("1/0", "N is at least 1"),
                                               ("-1/2", "is not I/N"), ("1/2/3", "is not I/N")])
def test_a_bad_shard_is_one_line_naming_the_problem(text: str, problem: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=problem):
        Shard.parse(text)
    assert cli.main(["conformance", f"--shard={text}"]) == 2  # before it asks for root
    err = capsys.readouterr().err
    assert err.startswith(f"pinhole: --shard: '{text}'") and err.count("\n") == 1 and problem in err


def result(nodeid: str, clause: str, outcome: str = "passed", topology: str = "routed",
           firewall: str = "enforcer", detail: str = "") -> Result:
    return Result(clause, "ipv4", topology, None, outcome, 0.25, None, detail, nodeid, firewall)


def full_results() -> list[Result]:
    out = []
    for t in ("routed", "nat"):
        out += [result(f"test_gen.py::test_one[{t}-ipv4-enforcer]", "GEN-01", topology=t),
                result(f"test_gen.py::test_two[{t}-ipv4-enforcer]", "GEN-02", topology=t),
                result(f"test_gen.py::test_both[{t}-ipv4-enforcer]", "GEN-01", topology=t),
                result(f"test_gen.py::test_both[{t}-ipv4-enforcer]", "GEN-02", topology=t)]
        for fw in ("enforcer", "kernel-helpers"):
            out.append(result(f"test_app.py::test_tftp[{t}-ipv4-{fw}]", "APP-TFTP-01", topology=t,
                              firewall=fw, outcome="failed" if fw != "enforcer" else "passed",
                              detail="known deviation"))
    return out


def sharded(results: list[Result], count: int, tmp_path: Path) -> list[Path]:
    """The JSONs the shards of a run with these results would write."""
    checks = sorted({r.nodeid for r in results})
    paths = []
    for i in range(1, count + 1):
        shard = Shard(i, count)
        report = Report(SELECTION, [ENFORCER, HELPERS], shard, checks,
                        [r for r in results if shard.has(r.nodeid)])
        path = tmp_path / f"shard-{i}.json"
        write_reports(report, conclude(report)[1], json_path=str(path), junit_path=None, html_path=None)
        paths.append(path)
    return paths


def merged(paths: list[Path]) -> Report:
    return merge([(str(p), load(p)) for p in paths])


def test_the_merge_of_shards_is_the_whole_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = full_results()
    whole = Report(SELECTION, [ENFORCER, HELPERS], WHOLE, sorted({r.nodeid for r in results}), results)
    paths = sharded(results, 3, tmp_path)
    assert {len(load(p).results) for p in paths} != {0}
    joined = merged(paths)
    families, topologies, groups = ["ipv4"], ["routed", "nat"], [ENFORCER, HELPERS]
    assert matrix(joined.rows(), families, topologies, groups) == \
        matrix(whole.rows(), families, topologies, groups)
    assert summary(joined.rows(), families, topologies, groups) == \
        summary(whole.rows(), families, topologies, groups)
    capsys.readouterr()
    assert conclude(joined)[0] == 0
    merge_out = capsys.readouterr().out
    assert conclude(whole)[0] == 0
    assert merge_out == capsys.readouterr().out  # the same matrix and summary lines
    assert "pass" in merge_out and "FAIL" in merge_out and "clauses: 3 passed" in merge_out


def test_the_merge_command_fails_as_the_whole_run_would(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    results = full_results()
    results[0].outcome, results[0].detail = "failed", "no <answer>"
    paths = sharded(results, 2, tmp_path)
    out = tmp_path / "out"
    code = cli.main(["report", "merge", *map(str, paths), "--json", str(out / "m.json"),
                     "--junit", str(out / "m.xml"), "--html", str(out / "m.html")])
    assert code == 1, capsys.readouterr()
    data = json.loads((out / "m.json").read_text())
    assert data["shard"] == "1/1" and data["summary"]["ok"] is False
    assert data["summary"]["firewalls"]["enforcer"]["checks"]["failed"] == 1
    assert (out / "m.xml").read_text().startswith("<?xml")
    assert "FAILED enforcer GEN-01 routed/ipv4" in capsys.readouterr().out
    # a merged JSON merges again (a whole run's JSON is its own only shard)
    assert cli.main(["report", "merge", str(out / "m.json")]) == 1


def test_a_clause_with_no_check_fails_the_merge_as_it_fails_a_run(tmp_path: Path) -> None:
    results = [r for r in full_results() if r.clause != "GEN-02"]  # (test_both checks it too)
    results = [r for r in results if "test_both" not in r.nodeid]
    assert cli.main(["report", "merge", *map(str, sharded(results, 2, tmp_path))]) == 1


def fail_merge(paths: list[Path], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["report", "merge", *map(str, paths)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pinhole: ") and err.count("\n") == 1, err
    return err


def test_merge_names_a_missing_or_doubled_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = sharded(full_results(), 2, tmp_path)
    data = json.loads(paths[0].read_text())
    gone = data["results"].pop()["nodeid"]
    data["results"] = [r for r in data["results"] if r["nodeid"] != gone]
    paths[0].write_text(json.dumps(data))
    assert f"check {gone} has no result (shard 1/2: {paths[0]})" in fail_merge(paths, capsys)

    paths = sharded(full_results(), 2, tmp_path)
    data = json.loads(paths[0].read_text())
    extra = json.loads(paths[1].read_text())["results"][0]
    data["results"].append(extra)
    paths[0].write_text(json.dumps(data))
    assert f"check {extra['nodeid']} is doubled" in fail_merge(paths, capsys)


def test_merge_refuses_shards_of_different_selections(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    paths = sharded(full_results(), 2, tmp_path)
    data = json.loads(paths[1].read_text())
    data["selection"]["families"] = ["ipv4", "ipv6"]
    paths[1].write_text(json.dumps(data))
    err = fail_merge(paths, capsys)
    assert "its selection differs" in err and "families" in err


def test_merge_needs_every_shard_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = sharded(full_results(), 3, tmp_path)
    assert "shard 2/3 missing" in fail_merge([paths[0], paths[2]], capsys)
    assert "shard 1/3 is given twice" in fail_merge([paths[0], paths[0], paths[1], paths[2]], capsys)
    (tmp_path / "two").mkdir()
    other = sharded(full_results(), 2, tmp_path / "two")
    assert "different numbers" in fail_merge([*paths, other[0]], capsys)


def test_merge_names_a_file_that_is_not_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert "bad.json: not JSON" in fail_merge([bad], capsys)
    bad.write_text('{"results": []}')
    assert "not a JSON report of 'pinhole conformance'" in fail_merge([bad], capsys)


def damage(data: dict[str, Any], where: str, value: Any) -> None:
    """Set the field at ``where`` (``results.0.clause``) to ``value``."""
    *path, last = [int(k) if k.isdigit() else k for k in where.split(".")]
    for key in path:
        data = data[key]
    data[last] = value


@pytest.mark.parametrize(("where", "value", "problem"), [
    ("results.0.clause", "XXX-99", "results[0].clause 'XXX-99' is not a clause"),
    ("selection.families", [], "selection.families is empty"),
    ("selection.topologies", "routed", "selection.topologies is a string, not an array"),
    ("selection.families", ["ipv4", "ipv5"], "selection.families[1] 'ipv5' is not one of ipv4, ipv6"),
    ("selection.expr", "GEN-01 and", "selection.expr: -k 'GEN-01 and': at column 11: expected"),
    ("results.1.outcome", "meh", "results[1].outcome 'meh' is not one of passed, failed,"),
    ("results.2.firewall", "ghost", "results[2].firewall 'ghost' is not one of enforcer, kernel-helpers"),
    ("results.0.topology", "split", "results[0].topology 'split' is not one of routed, nat"),
    ("results.0.detail", 7, "results[0].detail is a number, not a string"),
    ("results.0.nodeid", None, "results[0].nodeid is null, not a string"),
    ("groups.0.claims", ["GEN-01", "NOPE"], "groups[0].claims[1] 'NOPE' is not a clause"),
    ("groups.1.name", "enforcer", "groups' names: 'enforcer' is there twice"),
    ("checks", [1], "checks[0] is a number, not a string"),
    ("selection", ["ipv4"], "selection is an array, not an object"),
])
def test_merge_names_what_is_damaged_in_a_report(where: str, value: Any, problem: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Valid JSON that is not what a run writes: refused as it is read, saying where."""
    (path,) = sharded(full_results(), 1, tmp_path)
    data = json.loads(path.read_text())
    damage(data, where, value)
    path.write_text(json.dumps(data))
    assert fail_merge([path], capsys).startswith(
        f"pinhole: {path}: not a JSON report of 'pinhole conformance' ({problem}")


def test_merge_refuses_json_nested_too_deeply_to_read(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert fail_merge([deep], capsys) == (f"pinhole: {deep}: not a JSON report of 'pinhole "
                                          "conformance' (nested too deeply to read)\n")


@pytest.mark.parametrize("option", ["--json", "--junit", "--html"])
def test_merge_refuses_a_path_it_could_not_write_before_it_reads_the_shards(
        option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = sharded(full_results(), 2, tmp_path)
    capsys.readouterr()
    assert cli.main(["report", "merge", *map(str, paths), option, str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"pinhole: {option} {tmp_path}: is a directory (name a file in it)\n"
    assert captured.out == ""  # (no matrix: nothing was merged)


class Page(HTMLParser):
    """Checks that tags nest, and keeps the cells' classes and texts and every reference."""

    VOID = frozenset({"meta", "br", "link", "img", "hr", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.cells: list[tuple[str, str]] = []  # (class, text of the cell's summary or itself)
        self.refs: list[str] = []
        self.scripts = 0
        self.text: list[str] = []
        self.in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.refs += [v for k, v in attrs if k in ("href", "src") and v]
        if tag == "script":
            self.scripts += 1
        if tag == "td" and a.get("class"):
            self.cells.append((str(a["class"]), ""))
            self.in_cell = True
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()
        self.in_cell = self.in_cell and tag != "td"

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.in_cell and self.stack[-1] in ("td", "summary"):
            klass, text = self.cells[-1]
            self.cells[-1] = (klass, text + data)


def test_the_page_shows_each_cell_s_outcome_escapes_and_links_locally(tmp_path: Path) -> None:
    (tmp_path / "artifacts" / "pcap").mkdir(parents=True)
    pcap = tmp_path / "artifacts" / "pcap" / "one.pcap"
    pcap.write_bytes(b"\xd4\xc3\xb2\xa1")
    log = tmp_path / "artifacts" / "enforcer.log"
    log.write_text("log")
    results = full_results()
    results[0].outcome, results[0].detail = "failed", "<script>alert('x')</script> & more"
    results[0].pcap, results[0].log = str(pcap), str(log)
    results[1].outcome = "skipped"
    report = Report(SELECTION, [ENFORCER, HELPERS], WHOLE, sorted({r.nodeid for r in results}), results)
    out = tmp_path / "html"
    write_reports(report, conclude(report)[1], json_path=None, junit_path=None,
                  html_path=str(out / "page.html"))
    text = (out / "page.html").read_text()
    page = Page()
    page.feed(text)
    page.close()
    assert page.stack == [], "unclosed tags"
    assert page.scripts == 0 and "<script>alert" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in text
    assert "http://" not in text and "https://" not in text
    assert sorted(page.refs) == ["../artifacts/enforcer.log", "../artifacts/pcap/one.pcap"]
    assert all((out / ref).exists() for ref in page.refs)
    cells = [(k, t.strip()) for k, t in page.cells]
    # rows GEN-01, GEN-02, APP-TFTP-01; columns routed/ipv4, nat/ipv4 per firewall group
    assert cells[:4] == [("failed", "FAIL"), ("passed", "pass"), ("none", ""), ("none", "")]
    assert cells[4:6] == [("skipped", "skip"), ("passed", "pass")]
    assert cells[8:12] == [("passed", "pass"), ("passed", "pass"), ("failed", "FAIL"), ("failed", "FAIL")]
    assert "FAILED" in "".join(page.text)  # the verdict
