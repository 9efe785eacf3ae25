"""The pinhole command's handling of users' mistakes: one line, exit 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from enforcer import cli as enforcer_cli
from testbed import cli


def test_enforcer_without_root_says_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(enforcer_cli.os, "geteuid", lambda: 1000)
    assert cli.main(["enforcer", "--config", "/nonexistent.toml"]) == 2
    err = capsys.readouterr().err
    assert err == ("pinhole: pinhole enforcer needs root (network namespaces and netfilter): "
                   "run it with sudo\n")


def test_conformance_without_root_says_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(enforcer_cli.os, "geteuid", lambda: 1000)
    assert cli.main(["conformance"]) == 2
    assert "needs root" in capsys.readouterr().err


def test_missing_tools_are_named(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(enforcer_cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(enforcer_cli.shutil, "which", lambda tool: None if tool == "conntrack" else "/bin/x")
    assert cli.main(["enforcer", "--config", "/nonexistent.toml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pinhole: missing tools: conntrack (run 'make setup'")


def test_unreadable_config_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(enforcer_cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(enforcer_cli.shutil, "which", lambda tool: "/bin/x")
    missing = tmp_path / "nope.toml"
    assert cli.main(["enforcer", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == f"pinhole: {missing}: cannot read: No such file or directory\n"


def test_ctl_rejects_a_parameter_that_is_not_key_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ctl", "flows", "limit"]) == 2
    assert capsys.readouterr().err == "pinhole: parameter 'limit' is not KEY=VALUE\n"


def test_ctl_without_an_enforcer_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ctl", "status", "--socket", str(tmp_path / "none.sock")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pinhole: cannot reach the enforcer at") and err.count("\n") == 1


def test_the_enforcer_s_commands_run_without_the_harness(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m enforcer``: the daemon and its control client, and nothing of testbed/."""
    import subprocess
    import sys

    probe = ("import sys, runpy; sys.argv = ['enforcer', 'ctl', 'status', '--socket', '/nonexistent.sock'];"
             "\ntry: runpy.run_module('enforcer', run_name='__main__')\nexcept SystemExit as e: code = e.code"
             "\nharness = sorted(m for m in sys.modules"
             " if m == 'testbed' or m.startswith(('testbed.', 'scapy', 'pytest')))"
             "\nprint(code, harness)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    assert done.stderr.startswith("pinhole: cannot reach the enforcer at"), done.stderr


def test_the_enforcer_has_a_command_of_its_own() -> None:
    """``pinhole-enforcer``: installed with the distribution, it lives in enforcer/ and
    runs without the harness."""
    import subprocess
    import sys
    from importlib.metadata import entry_points
    from pathlib import Path

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "pinhole-enforcer"]
    assert script.value == "enforcer.cli:main"
    done = subprocess.run([str(Path(sys.executable).parent / "pinhole-enforcer"), "--help"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith("usage: pinhole-enforcer"), done.stderr
