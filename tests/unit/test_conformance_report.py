"""The conformance report: every catalog clause appears, never passed unless a check passed."""

from __future__ import annotations

import re
from xml.etree import ElementTree

import pytest

from testbed.catalog import CLAUSES
from testbed.conformance import (
    ENFORCER,
    Group,
    combine_junit,
    complete,
    gaps,
    matrix,
    selected_clauses,
    self_check,
    summary,
)
from testbed.plugin import Result


def result(clause: str, outcome: str, family: str = "ipv4", topology: str = "routed",
           mode: str | None = None, firewall: str | None = None) -> Result:
    return Result(clause, family, topology, mode, outcome, 0.5, None, "", firewall=firewall)


def test_unchecked_clauses_are_not_implemented_per_family() -> None:
    rows = complete([result("GEN-01", "passed")], list(CLAUSES), ["ipv4", "ipv6"])
    assert {r.clause for r in rows} == set(CLAUSES)
    afc = [r for r in rows if r.clause == "AFC-01"]
    assert [(r.family, r.outcome) for r in afc] == [("ipv4", "not-implemented"),
                                                     ("ipv6", "not-implemented")]
    assert [r.clause for r in rows][:1] == ["GEN-01"]  # catalog order


def test_summary_counts_clauses_by_their_worst_outcome() -> None:
    rows = complete([result("GEN-01", "passed"), result("GEN-01", "failed", family="ipv6"),
                     result("GEN-02", "passed"), result("GEN-03", "skipped")],
                    ["GEN-01", "GEN-02", "GEN-03", "AFC-01"], ["ipv4"])
    s = summary(rows)
    mine = s["firewalls"]["enforcer"]
    assert mine["clauses"] == {"passed": 1, "failed": 1, "skipped": 1, "n/a": 0, "not-implemented": 1}
    assert mine["checks"]["failed"] == 1 and s["ok"] is False
    assert summary(complete([result("GEN-01", "passed")], ["GEN-01"], ["ipv4"]))["ok"] is True


@pytest.mark.parametrize(("rows", "why"), [
    ([result("GEN-01", "passed"), result("GEN-01", "skipped", topology="nat")], "a skipped check"),
    ([result("GEN-01", "passed")], "a clause with no check"),
    ([result("GEN-01", "passed"), result("GEN-02", "passed")], "a cell with nothing run (GEN-02 nat)"),
])
def test_a_strict_run_fails_on_skips_missing_clauses_and_gaps(rows: list[Result], why: str) -> None:
    clauses = ["GEN-01"] if why != "a clause with no check" else ["GEN-01", "GEN-02"]
    full = [*rows, result("GEN-01", "passed", topology="nat")] if "skipped" not in why else rows
    s = summary(complete(full, clauses, ["ipv4"]), ["ipv4"], ["routed", "nat"])
    assert s["ok"] is False, why


def test_gaps_the_catalog_marks_n_a_pass_and_show_as_n_a() -> None:
    rows = [result("APP-FTP-03", "passed", topology="nat"), result("GEN-01", "passed"),
            result("GEN-01", "passed", topology="nat")]
    s = summary(complete(rows, ["APP-FTP-03", "GEN-01"], ["ipv4"]), ["ipv4"], ["routed", "nat"])
    assert s["ok"] is True and s["firewalls"]["enforcer"]["gaps"] == []
    assert gaps(rows, ["ipv4"], ["routed", "nat"]) == []
    assert gaps([result("GEN-01", "passed")], ["ipv4"], ["routed", "nat"]) == ["GEN-01 - nat/ipv4"]
    text = matrix(rows, ["ipv4"], ["routed", "nat"]).splitlines()
    assert text[2].split() == ["APP-FTP-03", "-", "n/a", "pass"]  # (catalog order: GEN first)
    assert text[-1].startswith("(n/a: ") and "NAT clause" in text[-1]


def test_matrix_has_a_row_per_clause_and_mode_and_a_column_per_topology_and_family() -> None:
    rows = complete([result("GEN-02", "passed"), result("GEN-02", "passed", mode="kernel"),
                     result("GEN-02", "failed", topology="nat", mode="kernel")],
                    ["GEN-02", "AFC-01"], ["ipv4"])
    text = matrix(rows, ["ipv4"], ["routed", "nat"]).splitlines()
    assert text[0].split() == ["clause", "mode", "routed/ipv4", "nat/ipv4"]
    assert text[1].split() == ["GEN-02", "-", "pass", "-"]
    assert text[2].split() == ["GEN-02", "kernel", "pass", "FAIL"]
    assert text[3].split() == ["AFC-01", "-", "n/i", "n/i"]
    assert text[4].startswith("(-: none of the clause's checks ran there")
    full = complete([result("GEN-02", "passed"), result("GEN-02", "passed", topology="nat")],
                    ["GEN-02"], ["ipv4"])
    assert "(-:" not in matrix(full, ["ipv4"], ["routed", "nat"]), "a legend for no '-' cell"


def test_split_is_a_column_of_its_own_that_only_its_checks_fill() -> None:
    rows = complete([result("GEN-02", "passed"), result("GEN-02", "passed", topology="nat"),
                     result("ROB-05", "passed", topology="split", mode="kernel"),
                     result("ROB-05", "failed", topology="split", family="ipv6", mode="kernel")],
                    ["GEN-02", "ROB-05", "ROB-06"], ["ipv4", "ipv6"])
    text = matrix(rows, ["ipv4", "ipv6"], ["routed", "nat", "split"]).splitlines()
    assert text[0].split() == ["clause", "mode", "routed/ipv4", "routed/ipv6", "nat/ipv4",
                               "nat/ipv6", "split/ipv4", "split/ipv6"]
    assert text[1].split() == ["GEN-02", "-", "pass", "-", "pass", "-", "n/a", "n/a"]
    assert text[2].split() == ["ROB-05", "kernel", "n/a", "n/a", "n/a", "n/a", "pass", "FAIL"]
    assert text[3].split() == ["ROB-06", "-", *["n/i"] * 6]


HELPERS = Group("kernel-helpers", "Linux conntrack helpers", True)


def test_a_reference_firewall_s_failures_are_counted_apart_and_do_not_fail_the_run() -> None:
    groups = [ENFORCER, HELPERS]
    rows = complete([result("APP-FTP-06", "passed", firewall="enforcer"),
                     result("APP-FTP-06", "failed", firewall="kernel-helpers"),
                     result("APP-FTP-01", "passed", firewall="kernel-helpers")],
                    ["APP-FTP-06"], ["ipv4"], groups)
    s = summary(rows, groups=groups)
    assert s["ok"] is True and s["under_test"] == ["enforcer"]
    assert s["firewalls"]["enforcer"]["checks"]["failed"] == 0
    assert s["firewalls"]["kernel-helpers"]["checks"]["failed"] == 1
    assert summary([*rows, result("APP-FTP-06", "failed", firewall="enforcer")], groups=groups)["ok"] is False
    only = summary([r for r in rows if r.firewall == "kernel-helpers"], groups=[HELPERS])
    assert only["under_test"] == [] and "enforcer" not in only["firewalls"]


def test_each_firewall_fills_a_group_of_columns_for_the_clauses_it_ran() -> None:
    groups = [ENFORCER, HELPERS, Group("open-router", "open router (trivial)", True)]
    rows = complete([result("GEN-02", "passed"), result("GEN-02", "failed", firewall="open-router"),
                     result("APP-FTP-01", "passed", firewall="enforcer"),
                     result("APP-FTP-01", "failed", firewall="kernel-helpers"),
                     result("APP-FTP-03", "passed", topology="nat", firewall="enforcer"),
                     result("APP-FTP-03", "passed", topology="nat", firewall="kernel-helpers")],
                    ["GEN-02", "APP-FTP-01", "APP-FTP-03"], ["ipv4"], groups)
    text = matrix(rows, ["ipv4"], ["routed", "nat"], groups).splitlines()
    assert text[0].split("|")[1].strip() == "Linux conntrack helpers"
    assert text[0].index("Linux") == text[1].index("|") + 2
    assert text[1].split() == ["clause", "mode", "routed/ipv4", "nat/ipv4", "|", "routed/ipv4",
                               "nat/ipv4", "|", "routed/ipv4", "nat/ipv4"]
    assert text[2].split("|")[0].split() == ["GEN-02", "-", "pass", "-"]
    assert text[2].split("|")[1].split() == []  # the helpers ran no GEN check
    assert text[2].split("|")[2].split() == ["FAIL", "-"]
    assert text[3].split() == ["APP-FTP-01", "-", "pass", "-", "|", "FAIL", "-"]
    assert text[4].split() == ["APP-FTP-03", "-", "n/a", "pass", "|", "n/a", "pass"]
    plain = matrix(complete([result("APP-FTP-01", "passed", firewall="enforcer")], ["APP-FTP-01"],
                            ["ipv4"]), ["ipv4"], ["routed"])
    assert "|" not in plain and "helpers" not in plain


def test_the_self_check_fails_a_clause_no_trivial_firewall_fails() -> None:
    rows = [result("GEN-01", "failed", firewall="open-router"),
            result("GEN-01", "passed", firewall="closed-router"),
            result("GEN-02", "passed", firewall="open-router"),
            result("GEN-02", "n/a", firewall="closed-router"),
            result("IPF-01", "passed")]
    table, ok = self_check(rows, ["GEN-01", "GEN-02", "IPF-01"], ["open-router", "closed-router"])
    lines = table.splitlines()
    assert lines[1].split()[:4] == ["GEN-01", "caught", "passes", "ok"]
    assert lines[2].split()[:4] == ["GEN-02", "passes", "n/a", "VACUOUS:"]
    assert lines[3].split()[:4] == ["IPF-01", "n/a", "n/a", "exempt:"]
    assert ok is False
    assert self_check(rows[:2] + rows[4:], ["GEN-01", "IPF-01"], ["open-router", "closed-router"])[1]


@pytest.mark.parametrize(("expr", "expected"), [
    (None, list(CLAUSES)),
    ("GEN-01", ["GEN-01"]),
    ("GEN-01 or RDC-10", ["GEN-01", "RDC-10"]),
    ("APP and not APP-FTP", ["APP-TFTP-01"]),
    # as pytest's -k selects the checks: whatever the case
    ("gen-01", ["GEN-01"]),
    ("Gen-01 or rdc-10", ["GEN-01", "RDC-10"]),
    ("app and not app-ftp", ["APP-TFTP-01"]),
])
def test_k_selects_clauses_by_id(expr: str | None, expected: list[str]) -> None:
    assert selected_clauses(expr) == expected


@pytest.mark.parametrize(("expr", "problem"), [
    ("GEN-01 and", "-k 'GEN-01 and': at column 11: expected not OR left parenthesis OR identifier"),
    ("GEN(x=1)", "-k 'GEN(x=1)': Keyword expressions do not support call parameters"),
])
def test_a_bad_k_says_what_is_wrong(expr: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        selected_clauses(expr)


def test_json_rows_have_the_documented_keys() -> None:
    row = result("GEN-01", "passed").to_dict()
    assert set(row) == {"clause", "family", "topology", "mode", "firewall", "outcome",
                        "duration_s", "pcap", "log", "detail", "nodeid"}
    assert row["firewall"] == "enforcer"
    again = Result.from_dict(row)
    assert again.to_dict() == row and again.firewall == "enforcer"


def test_junit_parts_combine_into_one_document() -> None:
    """The parallel part and the part run alone (or shards) each have JUnit; one holds all."""
    roots = [ElementTree.fromstring(f'<testsuites><testsuite name="{name}" tests="{cases}">'
                                    + "".join(f'<testcase name="t{i}"/>' for i in range(cases))
                                    + "</testsuite></testsuites>")
             for name, cases in (("parallel", 3), ("alone", 1))]
    text = ElementTree.tostring(combine_junit(roots), encoding="unicode")
    assert text.count("<testsuite ") == 2 and text.count("<testcase ") == 4


def test_a_clause_whose_topologies_are_not_selected_is_n_a_not_unimplemented() -> None:
    """``--topology routed``: APP-FTP-03 (NAT), ROB-05 (split) have nothing to run there;
    the catalog says so, and the run does not fail for it. A clause with cells there is
    still not-implemented when nothing checked it."""
    rows = complete([result("GEN-01", "passed")], ["GEN-01", "APP-FTP-03", "ROB-05", "AFC-01"],
                    ["ipv4"], topologies=["routed"])
    outcome = {r.clause: (r.outcome, r.detail) for r in rows}
    assert outcome["APP-FTP-03"][0] == outcome["ROB-05"][0] == "n/a"
    assert outcome["ROB-05"][1].startswith("not in this selection: ingress per interface")
    assert outcome["AFC-01"][0] == "not-implemented"
    assert summary(complete([result("GEN-01", "passed")], ["GEN-01", "ROB-05"], ["ipv4"],
                            topologies=["routed"]), ["ipv4"], ["routed"])["ok"] is True
