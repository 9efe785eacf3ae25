"""enforcer.dataplane.HostSettings: what a run changes on the host is put back, by the next
start if the run died before it could."""

from __future__ import annotations

from pathlib import Path

import pytest

from enforcer import dataplane
from enforcer.dataplane import DataplaneError, HostSettings


@pytest.fixture
def liberal(tmp_path: Path) -> Path:
    path = tmp_path / "nf_conntrack_tcp_be_liberal"
    path.write_text("0\n")
    return path


def test_turned_on_and_put_back(tmp_path: Path, liberal: Path) -> None:
    host = HostSettings(tmp_path / "run" / "enforcer.state", liberal)
    host.liberal_tcp_tracking()
    assert liberal.read_text() == "1\n"
    assert host.restore() == ["nf_conntrack_tcp_be_liberal = 0"]
    assert liberal.read_text() == "0\n"
    assert not host.state_file.exists()
    assert host.restore() == []  # nothing left to put back


def test_a_run_that_died_is_put_right_by_the_next(tmp_path: Path, liberal: Path) -> None:
    state = tmp_path / "enforcer.state"
    HostSettings(state, liberal).liberal_tcp_tracking()  # ... and the process dies here
    assert liberal.read_text() == "1\n"
    # the next start restores first, so it does not take "1" for the host's own setting
    nxt = HostSettings(state, liberal)
    assert nxt.restore() == ["nf_conntrack_tcp_be_liberal = 0"]
    nxt.liberal_tcp_tracking()
    assert nxt.restore() == ["nf_conntrack_tcp_be_liberal = 0"] and liberal.read_text() == "0\n"


def test_a_host_that_was_liberal_stays_liberal(tmp_path: Path, liberal: Path) -> None:
    liberal.write_text("1\n")
    host = HostSettings(tmp_path / "enforcer.state", liberal)
    host.liberal_tcp_tracking()
    host.restore()
    assert liberal.read_text() == "1\n"


def test_an_unreadable_state_file_is_an_error_that_names_it(tmp_path: Path, liberal: Path) -> None:
    state = tmp_path / "enforcer.state"
    state.write_text("{not json")
    with pytest.raises(DataplaneError, match=r"enforcer\.state"):
        HostSettings(state, liberal).restore()
    assert liberal.read_text() == "0\n"


def test_a_child_that_takes_too_long_is_an_error_that_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """iptables, nft and conntrack run only at start, stop, lockdown and unload, each with a
    time limit: one that hangs becomes a DataplaneError naming it, never a hang."""
    monkeypatch.setattr(dataplane, "CHILD_TIMEOUT", 0.2)
    with pytest.raises(DataplaneError, match=r"sleep 5 did not finish within 0\.2 s"):
        dataplane._run(["sleep", "5"])
    with pytest.raises(DataplaneError, match="no-such-tool is not installed"):
        dataplane._run(["no-such-tool"])
    with pytest.raises(DataplaneError, match=r"false failed"):
        dataplane._run(["false"])
