"""``pinhole testbed`` with ledgers that are not what it wrote (no root needed: the state
directory is a temporary one, and no namespace is made or removed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from enforcer import cli as enforcer_cli
from testbed import cli, ledger
from testbed.ledger import Ledger

CORRUPT = {
    "aaa": ("[]", "the file is an array, not an object"),
    "bbb": ("{not json", "not JSON: Expecting property name enclosed in double quotes"),
    "badid": ('{"id": 5}', "id is a number, not a string"),
    "ccc": ('{"id": "ccc", "pids": [{"pid": "abc"}]}', "pids[0].pid is a string, not a number"),
    "ddd": ('{"id": "other"}', "it records the id 'other'"),
}


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A state directory of its own, a good detached testbed in it; namespaces that are
    names only (none is deleted); root, as the commands but list need."""
    monkeypatch.setenv("PINHOLE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(enforcer_cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(ledger, "list_namespaces",
                        lambda: ["ph-bbb-c1", "ph-bbb-fw", "ph-bbbb-c1", "ph-good-c1"])
    monkeypatch.setattr(ledger, "delete_namespace", lambda ns: True)
    Ledger(id="good", variant="routed", detached=True, namespaces={"c1": "ph-good-c1"}).save()
    return tmp_path / "state"


def corrupt(state: Path, *ids: str) -> None:
    for tb_id in ids:
        (state / f"{tb_id}.json").write_text(CORRUPT[tb_id][0])


def test_list_marks_a_corrupt_ledger_and_lists_the_others(state: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    corrupt(state, *CORRUPT)
    assert cli.main(["testbed", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["aaa", "badid", "bbb", "ccc", "ddd", "good"]
    for line in lines[:-1]:
        tb_id = line.split()[0]
        assert f"the ledger {state / tb_id}.json is corrupt ({CORRUPT[tb_id][1]}" in line
        assert line.endswith(f"'pinhole testbed down {tb_id}' removes it")
    assert lines[-1].split()[1:] == ["routed", "detached"]


@pytest.mark.parametrize("tb_id", list(CORRUPT))
def test_down_removes_a_corrupt_ledger(tb_id: str, state: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    corrupt(state, tb_id)
    assert cli.main(["testbed", "down", tb_id]) == 0
    assert not (state / f"{tb_id}.json").exists()
    assert f"removed corrupt ledger {state / tb_id}.json" in capsys.readouterr().out
    assert (state / "good.json").exists()


def test_down_of_a_corrupt_ledger_removes_the_namespaces_named_for_it_alone(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt(state, "bbb")
    assert cli.main(["testbed", "down", "bbb"]) == 0
    out = capsys.readouterr().out
    assert "removed namespace ph-bbb-c1\nremoved namespace ph-bbb-fw\n" in out
    assert "ph-bbbb" not in out and "ph-good" not in out


def test_exec_in_a_testbed_whose_ledger_is_corrupt_says_to_take_it_down(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt(state, "bbb")
    assert cli.main(["testbed", "exec", "--id", "bbb", "c1", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pinhole: the ledger {state / 'bbb.json'} is corrupt (not JSON: ")
    assert err.endswith(": 'pinhole testbed down bbb' removes it\n") and err.count("\n") == 1


def test_exec_without_an_id_names_a_corrupt_ledger_when_no_testbed_is_up(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (state / "good.json").unlink()
    corrupt(state, "aaa")
    assert cli.main(["testbed", "exec", "c1", "--", "true"]) == 2
    assert capsys.readouterr().err == (
        "pinhole: no testbed is up: start one with 'pinhole testbed up'; the ledger "
        f"{state / 'aaa.json'} is corrupt (the file is an array, not an object): "
        "'pinhole testbed down aaa' removes it\n")


def test_only_a_sweep_of_everyone_s_testbeds_removes_a_corrupt_ledger(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Whose testbed it was cannot be told: a sweep of the dead owners' leaves it, saying so."""
    corrupt(state, "aaa")
    assert cli.main(["testbed", "sweep"]) == 0
    captured = capsys.readouterr()
    assert (state / "aaa.json").exists() and (state / "good.json").exists()
    assert "'pinhole testbed down aaa' removes it" in captured.err
    assert cli.main(["testbed", "sweep", "--all"]) == 0
    assert f"removed corrupt ledger {state / 'aaa.json'}" in capsys.readouterr().out
    assert list(state.glob("*.json")) == []


@pytest.mark.parametrize("command", [["list"], ["down", "x"]])
def test_a_state_directory_that_is_a_file_is_one_line(command: list[str], state: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PINHOLE_STATE_DIR", str(state / "good.json"))
    assert cli.main(["testbed", *command]) == 2
    assert capsys.readouterr().err == (
        f"pinhole: the testbeds' state directory {state / 'good.json'} (PINHOLE_STATE_DIR, else "
        "/run/pinhole/testbeds) cannot be one: a file is in its place or on its path\n")
