"""The runner end to end: its JSON report, and nothing left behind, even after a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.ledger import NS_PREFIX, all_ledgers, list_namespaces
from testbed.plugin import require_e2e

# what a run starts: agents, enforcers, captures, and the real FTP/TFTP servers
OURS = ("testbed.agent", "-m enforcer enforcer", "tcpdump", "vsftpd", "pyftpdlib", "in.tftpd")


def our_processes() -> set[tuple[int, str]]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(marker in cmdline for marker in OURS):
            found.add((int(entry.name), cmdline.strip()))
    return found


def snapshot() -> dict[str, set[object]]:
    return {
        "namespaces": {n for n in list_namespaces() if n.startswith(NS_PREFIX)},
        "ledgers": {led.id for led in all_ledgers()},
        "processes": set(our_processes()),
    }


def assert_nothing_new(before: dict[str, set[object]], wait: float = 10.0) -> None:
    """Nothing exists now that did not exist before (others' testbeds may come and go)."""
    deadline = time.monotonic() + wait
    while True:
        now = snapshot()
        new = {k: now[k] - before[k] for k in now if now[k] - before[k]}
        if not new:
            return
        # processes killed by a sweep are reaped by init a moment later
        assert time.monotonic() < deadline, f"left behind: {new}"
        time.sleep(0.1)


def root_rules() -> str:
    return "".join(subprocess.run([tool], capture_output=True, text=True, check=True).stdout
                   for tool in ("iptables-save", "ip6tables-save"))


def pinhole(*args: str) -> list[str]:
    return [sys.executable, "-m", "testbed", *args]


@pytest.mark.alone  # it looks for anything new on the machine: nothing else may run beside it
def test_conformance_json_covers_the_catalog_and_leaves_nothing_behind(tmp_path: Path) -> None:
    require_e2e()
    before = snapshot()
    report = tmp_path / "report.json"
    junit = tmp_path / "report.xml"
    run = subprocess.run(
        pinhole("conformance", "-k", "GEN-01 or APP-TFTP", "--family", "ipv4", "--workers", "2",
                "--json", str(report),
                "--junit", str(junit), "--artifacts", str(tmp_path / "artifacts")),
        capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "GEN-01" in run.stdout and "clauses: 2 passed" in run.stdout, run.stdout[-2000:]
    assert "Linux conntrack helpers" in run.stdout, run.stdout[-2000:]  # the second column group

    data = json.loads(report.read_text())
    rows = data["results"]
    for row in rows:
        assert set(row) >= {"clause", "family", "mode", "outcome", "duration_s", "pcap", "detail"}
        assert row["outcome"] in ("passed", "failed", "skipped", "n/a", "not-implemented")
    gen01 = [r for r in rows if r["clause"] == "GEN-01"]
    assert {(r["topology"], r["family"]) for r in gen01} == {("routed", "ipv4"), ("nat", "ipv4")}
    assert all(r["outcome"] == "passed" and Path(r["pcap"]).stat().st_size > 0 for r in gen01)
    # the APP clause ran against the enforcer and against the kernel's helpers
    tftp = [r for r in rows if r["clause"] == "APP-TFTP-01"]
    assert {(r["topology"], r["firewall"]) for r in tftp} == {
        (t, w) for t in ("routed", "nat") for w in ("enforcer", "kernel-helpers")}
    assert all(r["outcome"] == "passed" for r in tftp), tftp
    assert {r["clause"] for r in rows} == {"GEN-01", "APP-TFTP-01"}  # what -k selected
    assert data["summary"]["ok"] is True and data["summary"]["under_test"] == ["enforcer"]
    assert data["summary"]["firewalls"]["enforcer"]["checks"]["failed"] == 0
    assert data["summary"]["firewalls"]["kernel-helpers"]["reference"] is True
    assert "<testsuite" in junit.read_text()

    assert_nothing_new(before)
    assert "PINHOLE" not in root_rules() and "phk-" not in root_rules()


@pytest.mark.alone  # as above
def test_a_crashed_run_is_swept_away(tmp_path: Path) -> None:
    require_e2e()
    before = snapshot()
    # one process (no parallel workers, which would tidy up after a dead runner themselves)
    runner = subprocess.Popen(
        pinhole("conformance", "-k", "GEN-03", "--family", "ipv4", "--topology", "routed",
                "--workers", "1", "--artifacts", str(tmp_path)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any("-m enforcer enforcer" in cmd for _, cmd in our_processes() - before["processes"]):
            assert runner.poll() is None, "the runner ended before its enforcer started"
            assert time.monotonic() < deadline, "the runner's enforcer never started"
            time.sleep(0.1)
    finally:
        # only the runner dies: its enforcer, agents and namespaces are orphaned
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
    orphaned = snapshot()
    assert orphaned["namespaces"] - before["namespaces"], "the crash left nothing to sweep?"

    swept = subprocess.run(pinhole("testbed", "sweep"), capture_output=True, text=True, timeout=60,
                           check=False)
    assert swept.returncode == 0, swept.stderr
    assert_nothing_new(before)


@pytest.mark.parametrize("args", [["--family", "ipv5"], ["--topology", "mesh"], ["-k", "GEN-01 and ("]])
def test_conformance_rejects_bad_arguments_in_one_line(args: list[str]) -> None:
    require_e2e()
    result = subprocess.run(pinhole("conformance", *args), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("pinhole: ") and result.stderr.count("\n") == 1, result.stderr
