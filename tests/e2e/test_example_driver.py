"""The third-party driver example (examples/nft_stateful.py) under `pinhole conformance`:
its column group passes the clauses it claims, beside the enforcer's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from testbed.drivers import load
from testbed.plugin import require_e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nft_stateful.py"


def test_the_example_driver_loads_and_claims_gen_01_and_02() -> None:
    driver = load(f"{EXAMPLE}:NftStateful")
    assert driver.name == "nft-stateful" and driver.claims == ("GEN-01", "GEN-02")
    assert not driver.reference


def test_the_example_firewall_passes_what_it_claims(tmp_path: Path) -> None:
    require_e2e()
    report = tmp_path / "example.json"
    run = subprocess.run([sys.executable, "-m", "testbed", "conformance", "--firewall",
                          f"{EXAMPLE}:NftStateful", "-k", "GEN-01 or GEN-02", "--topology",
                          "routed,nat", "--workers", "2", "--artifacts", str(tmp_path / "artifacts"),
                          "--json", str(report)], capture_output=True, text=True, timeout=900,
                         check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "nftables, stateful (example)" not in run.stdout.splitlines()[0]
    found = json.loads(report.read_text())
    mine = [r for r in found["results"] if r["firewall"] == "nft-stateful"]
    assert {r["clause"] for r in mine} == {"GEN-01", "GEN-02"}
    assert {r["topology"] for r in mine} == {"routed", "nat"}
    assert found["summary"]["under_test"] == ["nft-stateful"]
    counts = found["summary"]["firewalls"]["nft-stateful"]["checks"]
    assert counts["passed"] > 0 and counts["failed"] == 0, counts
