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


class _Sessions:
    """A lab stand-in: the standard topology and an enforcer that lists these sessions."""

    def __init__(self, sessions: list[dict[str, object]]) -> None:
        from testbed.topology import standard

        self.variant = "routed"
        self.topology = standard("routed")
        self.firewall = self
        self.sessions = sessions

    def call(self, method: str, **params: object) -> object:
        assert method == "sessions"
        return self.sessions


def test_net_session_is_the_securenat_one_not_a_firewall_client_s() -> None:
    # A SOCKS connection of c1's made a Firewall-client session first; a grant for
    # Net.session("c1") went to it, and c1's own packets could never use it.
    from testbed.plugin import Net

    lab = _Sessions([{"id": 1, "kind": "firewall-client", "client": "192.0.2.11", "user": "alice"},
                     {"id": 2, "kind": "securenat", "client": "192.0.2.11", "user": None}])
    assert Net(lab, "ipv4").session("c1") == 2  # type: ignore[arg-type]
