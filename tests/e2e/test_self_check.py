"""The self-check in ``make test``: ``pinhole conformance --self-check`` (IPv4), run beside
the other tests with workers and labs of its own, finds that every clause fails against
a trivial firewall (the open router or the closed one). Its report and captures go to
the run's artifacts (``self-check/``, ``self-check.json``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed.plugin import require_e2e

VERDICT = "self-check: every clause catches a trivial firewall"


def test_every_clause_catches_a_trivial_firewall(pytestconfig: pytest.Config) -> None:
    require_e2e()
    out = Path(pytestconfig.getoption("pinhole_artifacts")).resolve() / "self-check"
    run = subprocess.run([sys.executable, "-m", "testbed", "conformance", "--self-check",
                          "--family", "ipv4", "--workers", "4", "--artifacts", str(out),
                          "--json", f"{out}.json"],
                         capture_output=True, text=True, timeout=1200, check=False)
    assert run.returncode == 0 and VERDICT in run.stdout, run.stdout[-6000:] + run.stderr[-2000:]
