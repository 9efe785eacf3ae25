"""The pytest plugin's topology selection: a check runs in the standard variants unless it
names its topologies, so the split topology runs only the checks written for it."""

from __future__ import annotations

import fnmatch

import pytest

pytest_plugins = ["pytester"]

CHECKS = """
import pytest

def test_everywhere(variant, family):
    pass

@pytest.mark.topologies("nat")
def test_nat_only(variant):
    pass

@pytest.mark.topologies("split")
def test_split_only(variant, family):
    pass
"""


def collected(pytester: pytest.Pytester, *args: str) -> list[str]:
    pytester.makepyfile(test_selected_checks=CHECKS)
    result = pytester.runpytest_inprocess("--collect-only", "-q", "-p", "no:cacheprovider", *args)
    return sorted(line.split("::", 1)[1] for line in result.outlines if "::" in line)


def test_an_unmarked_check_runs_in_the_standard_variants_and_a_marked_one_where_it_says(
        pytester: pytest.Pytester) -> None:
    assert collected(pytester) == sorted([
        "test_everywhere[routed-ipv4]", "test_everywhere[routed-ipv6]",
        "test_everywhere[nat-ipv4]", "test_everywhere[nat-ipv6]",
        "test_nat_only[nat]",
        "test_split_only[split-ipv4]", "test_split_only[split-ipv6]"])


def test_pinhole_topology_narrows_the_topologies(pytester: pytest.Pytester) -> None:
    assert collected(pytester, "--pinhole-topology", "split", "--pinhole-family", "ipv6") == \
        ["test_split_only[split-ipv6]"]
    assert collected(pytester, "--pinhole-topology", "routed") == \
        ["test_everywhere[routed-ipv4]", "test_everywhere[routed-ipv6]"]


@pytest.mark.parametrize(("checks", "args", "message"), [
    (CHECKS, ["--pinhole-topology", "bridged"], "*bridged is not one of routed, nat, split*"),
    ("import pytest\n@pytest.mark.topologies('lan')\ndef test_x(variant): pass\n", [],
     "*names no topology of routed, nat, split*"),
], ids=["option", "marker"])
def test_an_unknown_topology_stops_the_run(pytester: pytest.Pytester, checks: str, args: list[str],
                                           message: str) -> None:
    pytester.makepyfile(test_selected_checks=checks)
    result = pytester.runpytest_inprocess("--collect-only", "-p", "no:cacheprovider", *args)
    assert result.ret not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
    assert any(fnmatch.fnmatch(line, message)
               for line in [*result.outlines, *result.errlines]), result.outlines
