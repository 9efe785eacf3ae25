"""testbed.catalog.CLAUSES against SPEC.md's clause catalog, and the result codes against its table.

SPEC.md lives beside the checkout (``../shared/spec/SPEC.md``); without it these skip.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from enforcer.core.results import ERRORS
from testbed.catalog import CLAUSES, not_applicable
from testbed.conformance import gaps
from testbed.plugin import Result
from testbed.topology import FAMILIES, TOPOLOGIES

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO.parent / "shared" / "spec" / "SPEC.md"
CLAUSE_ID = re.compile(r"^[A-Z]+(?:-[A-Z]+)*-\d{2}$")


@pytest.fixture(scope="module")
def spec() -> str:
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} is absent (the spec is not beside this checkout)")
    return SPEC.read_text()


def section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(rf"^#+\s+{re.escape(title)}\s*$", line)),
                 None)
    assert start is not None, f"no '{title}' section in SPEC.md"
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    out = []
    for line in lines[start + 1:]:
        m = re.match(r"^(#+)\s", line)
        if m and len(m.group(1)) <= level:
            break
        out.append(line)
    return out


def spec_clauses(text: str) -> list[tuple[str, str]]:
    out = []
    for line in section(text, "Clause catalog"):
        m = re.match(r"^[-*]\s+(\S+)\s+(.*)$", line)
        if m:
            out.append((m.group(1), m.group(2).strip()))
    return out


def test_clause_ids_match_the_spec_in_order(spec: str) -> None:
    ids = [cid for cid, _ in spec_clauses(spec)]
    assert ids, "the Clause catalog section lists no clauses"
    assert ids == list(CLAUSES)


def test_clause_texts_match_the_spec(spec: str) -> None:
    assert dict(spec_clauses(spec)) == CLAUSES


def test_result_codes_match_the_spec_table(spec: str) -> None:
    rows = {}
    for line in spec.splitlines():
        m = re.match(r"^\|\s*([A-Z_]+)\b[^|]*\|\s*(0x[0-9A-Fa-f]{8})\s*\|", line)
        if m:
            rows[m.group(1)] = int(m.group(2), 16)
    assert len(rows) >= 6, rows
    for name, value in rows.items():
        if name in ("S_OK", "S_FALSE"):
            continue
        assert name in ERRORS, f"{name} is in SPEC.md but not in ERRORS"
        assert ERRORS[name].hresult == value, name


def test_clause_ids_are_well_formed_and_unique() -> None:
    assert CLAUSES
    for cid, text in CLAUSES.items():
        assert CLAUSE_ID.match(cid), cid
        assert text and text == text.strip(), cid
    assert len({cid.upper() for cid in CLAUSES}) == len(CLAUSES)


def test_the_suite_runs_every_cell_the_catalog_does_not_mark_n_a() -> None:
    """Collected (no root needed): for every firewall's claimed clauses, each clause row
    has checks in every topology/family but those the catalog marks n/a, and each n/a
    mark stands where no check runs."""
    script = (
        "import json, pytest\n"
        "rows = []\n"
        "class P:\n"
        "    def pytest_collection_finish(self, session):\n"
        "        for it in session.items:\n"
        "            p = it.callspec.params if hasattr(it, 'callspec') else {}\n"
        "            rows.extend([m.args[0], p.get('mode'), p.get('variant'), p.get('family'),\n"
        "                         p.get('firewall')] for m in it.iter_markers('clause'))\n"
        "code = pytest.main(['testbed/clauses', '--co', '-q', '-p', 'no:cacheprovider',\n"
        "                    '--pinhole-firewall', 'enforcer,kernel-helpers,open-router,closed-router'],\n"
        "                   plugins=[P()])\n"
        "print('ROWS' + json.dumps(rows))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                         timeout=300, check=False).stdout
    found = [line for line in out.splitlines() if line.startswith("ROWS")]
    assert found, out[-2000:]
    rows = [Result(c, f, t, m, "passed", 0.0, None, "", firewall=w)
            for c, m, t, f, w in json.loads(found[0][4:])]
    for firewall in ("enforcer", "kernel-helpers", "open-router", "closed-router"):
        mine = [r for r in rows if (r.firewall or "enforcer") == firewall]
        assert mine, f"no check collected for {firewall}"
        assert gaps(mine, list(FAMILIES), list(TOPOLOGIES), firewall) == [], firewall
    ran = {(r.clause, r.topology, r.family) for r in rows if r.topology is not None}
    for clause in CLAUSES:
        for topology in TOPOLOGIES:
            for family in FAMILIES:
                if (clause, topology, family) in ran:
                    assert not_applicable(clause, topology, family) is None, \
                        f"{clause} runs in {topology}/{family}, which the catalog marks n/a"
