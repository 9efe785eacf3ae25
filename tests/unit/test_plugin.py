"""The pytest plugin's contract: a skipped end-to-end test fails under PINHOLE_REQUIRE_E2E=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = '''
import pytest

@pytest.mark.e2e
def test_needs_the_lab():
    pytest.skip("no namespaces here")

def test_plain():
    pytest.skip("not an end-to-end test")

@pytest.mark.clause("GEN-01")
def test_clause_marked():
    pass
'''


def run_suite(tmp_path: Path, require: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k != "PINHOLE_REQUIRE_E2E"}
    if require is not None:
        env["PINHOLE_REQUIRE_E2E"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          check=False, timeout=120)


def test_e2e_skip_is_a_skip_by_default(tmp_path: Path) -> None:
    result = run_suite(tmp_path, None)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 2 skipped" in result.stdout


def test_e2e_skip_is_a_failure_when_required(tmp_path: Path) -> None:
    result = run_suite(tmp_path, "1")
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 passed, 1 skipped" in result.stdout
    assert "skipped under PINHOLE_REQUIRE_E2E=1" in result.stdout and "no namespaces here" in result.stdout


def test_unknown_clause_id_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "test_bad.py").write_text(
        'import pytest\n\n@pytest.mark.clause("GEN-99")\ndef test_x():\n    pass\n')
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, check=False, timeout=120)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "names no clause of SPEC.md's catalog" in result.stderr + result.stdout
