"""`pinhole conformance --shard` and `pinhole report merge` end to end: two shards of a
small selection, each run in parallel, merged, come to what one whole serial run of it
comes to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from testbed.plugin import require_e2e

SELECTION = ["-k", "AFC-01 or GEN-02", "--topology", "routed", "--family", "ipv4", "--workers", "2"]


def conformance(tmp_path: Path, name: str, *extra: str) -> dict[str, Any]:
    report = tmp_path / f"{name}.json"
    run = subprocess.run([sys.executable, "-m", "testbed", "conformance", *SELECTION, *extra,
                          "--artifacts", str(tmp_path / name), "--json", str(report)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    data: dict[str, Any] = json.loads(report.read_text())
    return data


def clause_results(data: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return sorted((r["nodeid"], r["clause"], r["firewall"], r["outcome"]) for r in data["results"])


def test_two_shards_merged_are_the_whole_run(tmp_path: Path) -> None:
    require_e2e()
    shards = [conformance(tmp_path, f"shard-{i}", "--shard", f"{i}/2") for i in (1, 2)]
    whole = conformance(tmp_path, "whole", "--workers", "1")  # serial
    assert shards[0]["checks"] == shards[1]["checks"] and sorted(shards[0]["checks"]) == \
        sorted(whole["checks"]) and len(whole["checks"]) > 2
    mine = [{r["nodeid"] for r in s["results"]} for s in shards]
    assert not mine[0] & mine[1] and mine[0] | mine[1] == set(whole["checks"])

    merged = tmp_path / "merged.json"
    page = tmp_path / "merged.html"
    run = subprocess.run([sys.executable, "-m", "testbed", "report", "merge",
                          str(tmp_path / "shard-1.json"), str(tmp_path / "shard-2.json"),
                          "--json", str(merged), "--html", str(page)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    data = json.loads(merged.read_text())
    assert clause_results(data) == clause_results(whole)
    assert sorted(data["checks"]) == sorted(whole["checks"])
    assert data["summary"] == whole["summary"] and data["summary"]["ok"] is True
    assert "AFC-01" in run.stdout and "clauses: 2 passed" in run.stdout
    assert 'href="shard-1/pcap/' in page.read_text()
