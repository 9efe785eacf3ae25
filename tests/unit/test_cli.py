"""The pinhole command's handling of users' mistakes: one line, exit 2, never a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
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


@pytest.mark.parametrize(("option", "message"), [
    ("--netns", "--netns: the namespace's name is empty"),
    ("--socket", "--socket: must not be empty"),
])
def test_an_empty_namespace_or_socket_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], option: str,
                                                  message: str) -> None:
    """``--netns "$NS"`` with NS unset must not enforce in the namespace the command runs in."""
    monkeypatch.setattr(enforcer_cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(enforcer_cli.shutil, "which", lambda tool: "/bin/x")
    config = tmp_path / "enforcer.toml"
    config.write_text('[network]\ninternal_interfaces = ["int0"]\nexternal_interfaces = ["ext0"]\n')
    assert cli.main(["enforcer", "--config", str(config), option, ""]) == 2
    assert capsys.readouterr().err == f"pinhole: {message}\n"


@pytest.mark.parametrize(("params", "message"), [
    (["limit"], "parameter 'limit' is not KEY=VALUE"),
    (["=1"], "parameter '=1' is not KEY=VALUE"),
    (["limit=1", "limit=2"], "parameter 'limit' is given twice"),
])
def test_ctl_rejects_a_parameter_that_is_not_key_value(capsys: pytest.CaptureFixture[str],
                                                       params: list[str], message: str) -> None:
    assert cli.main(["ctl", "flows", *params]) == 2
    assert capsys.readouterr().err == f"pinhole: {message}\n"


def ctl_answered(path: Path, answer: Callable[[bytes], bytes], *argv: str) -> int:
    """``pinhole ctl argv`` at a socket whose one connection gets ``answer(request)``."""
    import socket
    import threading

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer_once() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(answer(conn.recv(65536)))

    thread = threading.Thread(target=answer_once)
    thread.start()
    try:
        return cli.main(["ctl", *argv, "--socket", str(path)])
    finally:
        thread.join(5)
        server.close()


@pytest.mark.parametrize("answer", [b"HTTP/1.0 400 Bad Request\r\n", b"[1]\n", b"\xff\n"])
def test_ctl_at_a_socket_that_is_not_the_enforcer_s_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], answer: bytes) -> None:
    path = tmp_path / "other.sock"
    assert ctl_answered(path, lambda _request: answer, "status") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pinhole: {path} did not answer in the control protocol: ") and \
        err.count("\n") == 1, err


def test_ctl_says_when_a_listing_was_cut(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A listing cut to its limit is printed whole, and a line on stderr says how many
    more there are."""
    def cut(request: bytes) -> bytes:
        reply = {"id": json.loads(request)["id"], "result": [{"id": 1}], "more": 41}
        return json.dumps(reply).encode() + b"\n"

    assert ctl_answered(tmp_path / "enforcer.sock", cut, "sessions", "limit=1") == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == [{"id": 1}]
    assert err == ("(41 more not listed: ask with a larger limit=N, at most 10000, or, for "
                   "sessions, actions and binds, with after=ID, the last id listed)\n"), err


def test_ctl_at_a_path_too_long_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ctl", "status", "--socket", str(tmp_path / ("x" * 120))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pinhole: cannot reach the enforcer at") and "too long" in err, err


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


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pinhole conformance`` as root with every tool there, and no checks run: a mistake
    must be found before the clause suite is collected."""
    from testbed import conformance

    monkeypatch.setattr(enforcer_cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(enforcer_cli.shutil, "which", lambda tool: "/bin/x")

    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the clause suite ran")

    monkeypatch.setattr(conformance.pytest, "main", no_run)


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.err.startswith("pinhole: ") and captured.err.count("\n") == 1, captured
    return captured.err


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize(("option", "where", "problem"), [
    ("--json", ".", "is a directory (name a file in it)"),
    ("--junit", "file/run.xml", "{tmp}/file is not a directory"),
    ("--html", "file/deeper/run.html", "{tmp}/file is not a directory"),
    ("--json", "dangling/run.json", "{tmp}/dangling is not a directory"),
    ("--artifacts", "file", "exists and is not a directory"),
    ("--artifacts", "file/artifacts", "{tmp}/file is not a directory"),
])
def test_conformance_refuses_a_path_it_could_not_write_before_it_runs(
        option: str, where: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not after the checks have run, their results lost (nor every check failing for it)."""
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    path = tmp_path / where
    assert cli.main(["conformance", "-k", "GEN-01", option, str(path)]) == 2
    assert one_line(capsys) == f"pinhole: {option} {path}: {problem.format(tmp=tmp_path)}\n"


@pytest.mark.usefixtures("as_root")
def test_conformance_refuses_a_state_directory_that_is_a_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Where the labs' testbeds keep their ledgers: not every check failing for it."""
    monkeypatch.setenv("PINHOLE_STATE_DIR", str(tmp_path / "file"))
    (tmp_path / "file").write_text("")
    assert cli.main(["conformance", "-k", "GEN-01"]) == 2
    assert one_line(capsys).startswith(f"pinhole: the testbeds' state directory {tmp_path / 'file'} ")


@pytest.mark.usefixtures("as_root")
def test_report_paths_in_directories_yet_to_be_made_are_fine(tmp_path: Path) -> None:
    """The run makes them as it writes (and nothing is made before it runs)."""
    new = tmp_path / "new" / "deeper"
    with pytest.raises(AssertionError, match="the clause suite ran"):
        cli.main(["conformance", "-k", "GEN-01", "--json", str(new / "run.json"),
                  "--html", str(new / "run.html"), "--artifacts", str(new / "artifacts")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize(("spec", "problem"), [
    ("testbed.drivers:NoSuchDriver", "testbed.drivers:NoSuchDriver: testbed.drivers has no NoSuchDriver"),
    ("examples/nft_stateful.py", "examples/nft_stateful.py: name the driver's class, as "
                                 "examples/nft_stateful.py:Class"),
    ("testbed.drivers:", "testbed.drivers:: name the driver's class, as testbed.drivers:Class"),
])
def test_a_driver_that_cannot_be_found_is_named(spec: str, problem: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["conformance", "--firewall", spec]) == 2
    assert one_line(capsys) == f"pinhole: --firewall: {problem}\n"


@pytest.mark.usefixtures("as_root")
def test_a_self_check_takes_no_firewall(capsys: pytest.CaptureFixture[str]) -> None:
    """It runs the trivial firewalls: a --firewall beside it would be ignored."""
    assert cli.main(["conformance", "--self-check", "--firewall", "enforcer"]) == 2
    assert one_line(capsys) == ("pinhole: --self-check runs the trivial firewalls (open-router, "
                                "closed-router): it takes no --firewall\n")


@pytest.mark.usefixtures("as_root")
@pytest.mark.parametrize(("option", "value"), [("--topology", "routed,nat,routed"),
                                               ("--family", "ipv6,ipv6")])
def test_a_topology_or_family_named_twice_is_refused(option: str, value: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["conformance", option, value]) == 2
    assert one_line(capsys) == f"pinhole: {option}: {value.split(',')[-1]} is named twice\n"


@pytest.mark.parametrize("command", [[], ["conformance"], ["testbed"]])
def test_help_is_plain_text(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The descriptions are the modules' docstrings: their reST literals show as quotes."""
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    out = capsys.readouterr().out
    assert "`" not in out and "'pinhole" in out
