"""The enforcer daemon end to end: kernel state on exit and restart, the control socket, start-up errors."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from enforcer.client import Client, ControlError, Flags
from enforcer.dataplane import MARK_KERNEL, MARK_MODE, MARK_USER, local_mark
from enforcer.protocol import MAX_REQUEST
from testbed.build import Testbed
from testbed.clauses.helpers import assert_echoed
from testbed.lab import GUIDS, EnforcerProcess
from testbed.plugin import require_e2e

SHOUT = "tests.e2e.shout_filter:Shout"  # a data filter: the enforcer turns liberal tracking on


TESTBED_TAG = "test-enforcer"  # (tests/e2e/conftest.py: tb, enforcer)


def rules(tb: Testbed) -> str:
    """Our rules in the fw's netfilter tables, both families, and our nft tables."""
    out = ""
    for tool in ("iptables-save", "ip6tables-save"):
        out += "".join(line + "\n" for line in tb.run("fw", [tool]).stdout.splitlines()
                       if "PINHOLE" in line)
    return out + "".join(line + "\n" for line in nft_tables(tb).splitlines() if "pinhole" in line)


def kernel_state(tb: Testbed) -> str:
    """Everything of ours in the fw's netfilter tables and conntrack."""
    out = rules(tb)
    for family in ("ipv4", "ipv6"):
        marked = tb.run("fw", ["conntrack", "-L", "-f", family, "--mark", "0x10000000/0x30000000"],
                        check=False).stdout
        out += marked
    return out


def admit_a_primary(tb: Testbed) -> None:
    s1 = tb.agent("s1")
    with s1.tcp_server("198.51.100.21", 21):
        result = tb.agent("c1").tcp_connect("198.51.100.21", 21, send_bytes=1000)
    assert result["connected"], result


def nft_tables(tb: Testbed) -> str:
    return str(tb.run("fw", ["nft", "list", "tables"]).stdout)


def test_clean_exit_leaves_the_lockdown_and_unload_removes_it(tb: Testbed,
                                                               enforcer: EnforcerProcess) -> None:
    admit_a_primary(tb)
    running = kernel_state(tb)
    assert "NFQUEUE" in running and "PINHOLE-OUTPUT" in running and "SNAT" in running
    assert "198.51.100.21" in running, "the admitted flow should carry our connmark"
    assert enforcer.stop() == 0, enforcer.log_tail()
    assert not enforcer.socket.exists()
    stopped = kernel_state(tb)
    # the base alone: nothing queued, nothing translated, the admitted flow still known
    assert "NFQUEUE" not in stopped and "SNAT" not in stopped and "PINHOLE-OUTPUT" not in stopped
    assert "-A PINHOLE-FORWARD -j DROP" in stopped and "-A PINHOLE-INPUT -j DROP" in stopped
    assert "198.51.100.21" in stopped
    assert "pinhole_maps" not in nft_tables(tb)
    assert "removed" in enforcer.unload()
    assert kernel_state(tb) == ""
    assert "pinhole" not in nft_tables(tb)


def test_a_clean_stop_forgets_the_flows_whose_state_went_with_the_run(
        tb: Testbed, enforcer: EnforcerProcess) -> None:
    """A stop forgets user-mode flows (their filters are gone) and flows to Firewall
    clients' UDP binds (their sockets are), of both families; kernel-mode flows go on."""
    entries = [  # (source, destination, destination port, mark): one of each
        ("198.51.100.21", "198.51.100.1", 20001, local_mark(20001)),
        ("2001:db8:2::21", "2001:db8:2::1", 20001, local_mark(20001)),
        ("192.0.2.11", "198.51.100.21", 5001, MARK_USER),
        ("192.0.2.11", "198.51.100.21", 5002, MARK_KERNEL),
    ]
    for src, dst, port, mark in entries:
        tb.run("fw", ["conntrack", "-I", "-p", "udp", "-s", src, "-d", dst, "--sport", "5555",
                      "--dport", str(port), "--timeout", "100", "--mark", str(mark)])
    try:
        assert enforcer.stop() == 0, enforcer.log_tail()
        left = "".join(tb.run("fw", ["conntrack", "-L", "-f", family, "-p", "udp"]).stdout
                       for family in ("ipv4", "ipv6"))
        assert "dport=20001 " not in left and "dport=5001 " not in left, left
        assert "dport=5002 " in left, left
    finally:
        for family in ("ipv4", "ipv6"):
            tb.run("fw", ["conntrack", "-D", "-f", family, "-p", "udp"], check=False)


def test_restart_after_sigkill_takes_over_with_one_copy(tb: Testbed, enforcer: EnforcerProcess) -> None:
    admit_a_primary(tb)
    enforcer.kill()
    stale = kernel_state(tb)
    assert "NFQUEUE" in stale and "198.51.100.21" in stale
    enforcer.start()
    assert "took over from a run that did not stop cleanly" in enforcer.log_tail()
    # one set of rules; the kernel-mode flow the dead run admitted goes on
    state = kernel_state(tb)
    assert state.count("-A FORWARD -j PINHOLE-FORWARD") == 2, state  # one per family
    assert state.count("-A PINHOLE-FORWARD -m conntrack --ctstate NEW -j NFQUEUE") == 2, state
    assert "198.51.100.21" in state


def test_a_restart_by_the_control_socket_is_a_new_run_in_the_same_process(
        tb: Testbed, enforcer: EnforcerProcess, tmp_path: Path) -> None:
    """``restart`` ends the run as a stop does (its sessions go, the lockdown between) and
    starts the next from the file given, or the one the run came from, read again; a file
    that cannot start is refused and the run goes on unchanged."""
    assert enforcer.proc is not None
    pid = enforcer.proc.pid
    admit_a_primary(tb)
    assert enforcer.call("status")["sessions"] == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy\n")
    os.mkfifo(fifo := tmp_path / "fifo.toml")  # read in the loop, it would hold it for good
    for params, reason in (({"config": str(bad)}, "bad.toml:1"),
                           ({"config": str(tmp_path / "none.toml")}, "cannot read"),
                           ({"config": 7}, "'config' must be a string"),
                           ({"config": "bad.toml"}, "'config' must be an absolute path"),
                           ({"config": str(fifo)}, "fifo.toml is not a regular file")):
        with Client(str(enforcer.socket)) as c:
            reply = c.raw(json.dumps({"id": 1, "method": "restart", "params": params}).encode() + b"\n")
        assert reply["error"]["name"] == "E_INVALIDARG" and reason in reply["error"]["message"], reply
    status = enforcer.call("status")
    assert (status["run"], status["sessions"], status["pid"]) == (1, 1, pid)
    enforcer.restart(limits={"sessions_total": 7})  # a new file
    status = enforcer.call("status")
    assert (status["run"], status["sessions"], status["pid"]) == (2, 0, pid)
    assert status["limits"]["sessions_total"]["cap"] == 7, status["limits"]
    assert enforcer.call("restart") == {"restarting": True, "run": 3}  # the same file again
    enforcer._wait_for_run(3, 15.0)
    assert enforcer.call("status")["limits"]["sessions_total"]["cap"] == 7
    admit_a_primary(tb)
    state = kernel_state(tb)  # one copy of the rules
    assert state.count("-A PINHOLE-FORWARD -m conntrack --ctstate NEW -j NFQUEUE") == 2, state
    log = enforcer.log_tail(200)
    assert log.count("stopped; lockdown") == 2 and log.count("enforcing with") == 3, log


def test_control_socket_is_root_only(enforcer: EnforcerProcess) -> None:
    mode = enforcer.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    child = subprocess.run(
        [sys.executable, "-c",
         "import os, socket, sys\n"
         "os.setgid(65534); os.setuid(65534)\n"
         "s = socket.socket(socket.AF_UNIX)\n"
         "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n",
         str(enforcer.socket)], check=False)
    assert child.returncode == 13, "a non-root user could connect to the control socket"


BAD_REQUESTS = [
    (b"this is not json\n", "not valid JSON"),
    (b'{"id": 1, "meth\n', "not valid JSON"),
    (b"\xff\xfe\n", "not valid JSON"),
    (b"[1, 2, 3]\n", "must be a JSON object"),
    (b'{"id": 2, "method": 5}\n', "string 'method'"),
    (b'{"id": 3, "method": "status", "params": [1]}\n', "'params' must be a JSON object"),
    (b'{"id": 4, "method": "no_such_method"}\n', "unknown method 'no_such_method'"),
    (b'{"id": 5, "method": "flows", "params": {"limit": "many"}}\n', "'limit' must be"),
    (b'{"id": 6, "method": "flows", "params": {"limit": 1e9}}\n', "'limit' must be"),
    (b'{"id": 7, "method": "ping", "params": {"x": 1}}\n', "unexpected parameters: x"),
]


@pytest.mark.parametrize(("request_bytes", "expected"), BAD_REQUESTS,
                         ids=[e for _, e in BAD_REQUESTS])
def test_bad_request_gets_an_error_reply_and_the_daemon_keeps_serving(
        enforcer: EnforcerProcess, request_bytes: bytes, expected: str) -> None:
    with Client(str(enforcer.socket)) as c:
        reply = c.raw(request_bytes)
        assert reply["error"]["name"] == "E_INVALIDARG"
        assert reply["error"]["hresult"] == "0x80070057"
        assert expected in reply["error"]["message"], reply
        # the same connection still answers
        assert c.call("ping") == {"pong": True}
    assert enforcer.running


def test_oversized_request_is_refused_and_the_daemon_keeps_serving(enforcer: EnforcerProcess) -> None:
    with Client(str(enforcer.socket)) as c:
        reply = c.raw(b'{"id": 1, "method": "ping", "pad": "' + b"x" * (MAX_REQUEST + 10))
        assert "request too large" in reply["error"]["message"]
        with pytest.raises(ControlError):
            c.call("ping")  # that connection was closed: the rest of the line is unreadable
    with Client(str(enforcer.socket)) as c:
        assert c.call("ping") == {"pong": True}
    # many connections that vanish mid-request do no harm either
    for _ in range(50):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(enforcer.socket))
        s.sendall(b'{"id": 1, "method": "st')
        s.close()
    assert enforcer.call("status")["pid"] > 0


def test_status_sessions_and_flows_report_admissions(tb: Testbed, enforcer: EnforcerProcess) -> None:
    admit_a_primary(tb)
    status = enforcer.call("status")
    assert status["counters"]["admit-kernel"] >= 1 and status["sessions"] == 1
    assert status["fail_open"] is False
    # the queue delivered what it was given, and took every verdict
    assert status["queue_errors"] == {"overflows": 0, "verdict_errors": 0, "verdicts_retried": 0,
                                      "malformed": 0}
    (session,) = enforcer.call("sessions")
    assert session["client"] == "192.0.2.11" and session["kind"] == "securenat"
    (flow,) = enforcer.call("flows")
    assert flow["protocol"] == "FTP" and flow["mode"] == "kernel" and flow["session"] == session["id"]


def run_enforcer_cli(tb: Testbed, config: Path) -> subprocess.CompletedProcess[str]:
    return tb.run("fw", [sys.executable, "-m", "testbed", "enforcer", "--config", str(config)],
                  check=False, timeout=30)


def test_bad_policy_file_fails_with_file_line_and_reason(tb: Testbed, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[network]\ninternal_interfaces = ["int0"]\nexternal_interfaces = ["ext0"]\n\n'
                      '[[protocol]]\nname = "FTP"\nguid = "not-a-guid"\nip_protocol = "tcp"\nports = [21]\n')
    result = run_enforcer_cli(tb, config)
    assert result.returncode == 2
    assert result.stderr.strip() == f"pinhole: {config}:7: protocol[0].guid: not a GUID like " \
        "'xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx'", result.stderr
    assert "Traceback" not in result.stderr


def test_missing_interface_fails_clearly_and_changes_nothing(tb: Testbed, tmp_path: Path) -> None:
    config = tmp_path / "noiface.toml"
    config.write_text('[network]\ninternal_interfaces = ["nope0"]\nexternal_interfaces = ["ext0"]\n')
    before = rules(tb)
    result = run_enforcer_cli(tb, config)
    assert result.returncode == 2
    assert "interface 'nope0' (network.internal_interfaces) does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert rules(tb) == before


def test_second_enforcer_on_the_same_socket_is_refused(tb: Testbed, enforcer: EnforcerProcess,
                                                       tmp_path: Path) -> None:
    config = tmp_path / "second.toml"
    config.write_text(enforcer.config_path.read_text())
    result = run_enforcer_cli(tb, config)
    assert result.returncode == 2, result.stderr
    assert "NFQUEUE 0" in result.stderr or "another enforcer" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # and the first one is unharmed
    assert enforcer.call("ping") == {"pong": True}
    with Client(str(enforcer.socket)) as c:
        assert "PINHOLE-FORWARD" in kernel_state(tb) and c.call("status")["pid"] > 0


def test_enforcer_needs_a_namespace_that_exists(tmp_path: Path) -> None:
    require_e2e()
    config = tmp_path / "c.toml"
    config.write_text('[network]\ninternal_interfaces = ["int0"]\nexternal_interfaces = ["ext0"]\n')
    result = subprocess.run([sys.executable, "-m", "testbed", "enforcer", "--config", str(config),
                             "--netns", "ph-no-such-namespace"], capture_output=True, text=True,
                            check=False, timeout=30)
    assert result.returncode == 2
    assert "cannot enter network namespace 'ph-no-such-namespace'" in result.stderr
    # and it was not created on the way (pyroute2's setns would, by default)
    assert not os.path.exists("/run/netns/ph-no-such-namespace")


@pytest.mark.parametrize("mode", ["kernel", "user"])
def test_sigkill_during_a_transfer_fails_closed_and_restart_takes_over(
        tb: Testbed, enforcer: EnforcerProcess, mode: str) -> None:
    c1, s1 = tb.agent("c1"), tb.agent("s1")
    server = "198.51.100.21"
    admit_a_primary(tb)  # c1's SecureNAT session
    flags = Flags.ALLOW_MULTIPLE | (Flags.NO_KERNEL_MODE if mode == "user" else Flags(0))
    with s1.tcp_server(server, 31001), s1.tcp_server(server, 21), \
            Client(str(enforcer.socket)) as api:
        session = api.call("sessions")[0]["id"]
        api.allow_future_connect(session, (server, 31001), protocol_guid=GUIDS["FTP"], flags=flags)
        with c1.tcp_open(server, 31001) as transfer:
            assert transfer.connected, transfer.error
            assert_echoed(transfer.exchange(100_000), 100_000, "the transfer before the kill")
            enforcer.kill()
            # fail-closed: nothing new passes, not even what the grant or the policy allowed
            assert not c1.tcp_connect(server, 31001, timeout=1.0)["connected"]
            assert not c1.tcp_connect(server, 21, timeout=1.0)["connected"]
            during = transfer.exchange(100_000, timeout=2.0)
            if mode == "kernel":
                assert_echoed(during, 100_000, "an offloaded flow, carried by the kernel alone")
            else:
                assert during["received"] < 100_000, "a user-mode flow cannot pass without its enforcer"
            mark = MARK_USER if mode == "user" else MARK_KERNEL
            assert "dport=31001" in marked_entries(tb, (mark,)), f"no {mode}-mode conntrack entry"

            enforcer.start()
            assert "took over from a run that did not stop cleanly" in enforcer.log_tail()
            after = transfer.exchange(10_000, timeout=2.0)["received"]
            if mode == "kernel":
                # admitted flows go on (rule 15): the kernel carried it all along
                assert after == 10_000, "an admitted kernel-mode flow was cut by the restart"
                assert "dport=31001" in marked_entries(tb, (MARK_KERNEL,))
            else:
                # its filter and counters died with the run: the new one forgot it
                assert marked_entries(tb, (MARK_USER,)) == "", "a dead run's user-mode flow survived"
                assert not after, "a user-mode flow of the dead enforcer passed without its enforcer"
        assert c1.tcp_connect(server, 21, send_bytes=100)["connected"], "no primary after restart"


def marked_entries(tb: Testbed, marks: tuple[int, ...] = (MARK_KERNEL, MARK_USER)) -> str:
    """conntrack entries carrying one of these modes."""
    out = ""
    for family in ("ipv4", "ipv6"):
        for mark in marks:
            out += tb.run("fw", ["conntrack", "-L", "-f", family, "--mark", f"0x{mark:x}/0x{MARK_MODE:x}"],
                          check=False).stdout
    return out


def test_host_settings_a_crashed_run_changed_are_put_back_by_the_next_start(
        tb: Testbed, tmp_path: Path) -> None:
    """A run with a data filter turns conntrack's liberal TCP tracking on; killed, it cannot
    put it back. The next start (here one without filters) does, from the state file."""
    liberal = ["cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"]
    tb.run("fw", ["sh", "-c", "echo 0 > /proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"])
    filtered = EnforcerProcess(tb, tmp_path / "filtered", data_filters={"shout": SHOUT})
    filtered.start()
    state = filtered.socket.with_suffix(".state")
    assert tb.run("fw", liberal).stdout.strip() == "1" and state.exists()
    filtered.kill()
    assert tb.run("fw", liberal).stdout.strip() == "1", "nothing to put back after all?"
    plain = EnforcerProcess(tb, tmp_path / "plain")  # the same control socket: the same fw
    plain.start()
    try:
        assert tb.run("fw", liberal).stdout.strip() == "0"
        assert "put back host settings" in plain.log_tail() and not state.exists()
    finally:
        plain.stop()


@pytest.mark.parametrize("option", ["--lockdown", "--unload"])
def test_lockdown_and_unload_refuse_while_an_enforcer_serves(tb: Testbed, enforcer: EnforcerProcess,
                                                             option: str) -> None:
    """Either would take the running enforcer's rules away: a one-line refusal, nothing
    changed."""
    before = rules(tb)
    result = tb.run("fw", enforcer.command(option), check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("pinhole: another enforcer is serving") and \
        "stop it first" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert rules(tb) == before and enforcer.call("ping") == {"pong": True}


def test_a_connection_another_tool_s_conntrack_helper_expects_is_dropped(
        tb: Testbed, enforcer: EnforcerProcess) -> None:
    """Another tool attaches the kernel's FTP helper to a kernel-mode primary (raw table):
    the data connection the helper then expects would inherit the primary's connmark and
    pass as a kernel-mode flow the enforcer never admitted. The enforcer's base drops it
    silently; the primary itself goes on."""
    helper = ["PREROUTING", "-p", "tcp", "--dport", "21", "-j", "CT", "--helper", "ftp"]
    tb.run("fw", ["iptables", "-t", "raw", "-A", *helper])
    try:
        s1, c1 = tb.agent("s1"), tb.agent("c1")
        data_port = 40011  # 156 * 256 + 75
        reply = b"227 Entering Passive Mode (198,51,100,21,156,75)\r\n"
        with s1.tcp_server("198.51.100.21", 21), s1.tcp_server("198.51.100.21", data_port) as data, \
                c1.tcp_open("198.51.100.21", 21) as control:
            assert control.connected, control.error
            # the echo server sends the lines back: the helper reads them from the server's
            # side (a banner first: it reads a direction's lines from its first newline on)
            for line in (b"220 ready\r\n", reply):
                assert control.talk(line, expect=len(line)) == line
            expected = tb.run("fw", ["conntrack", "-L", "expect"], check=False).stdout
            assert f"dport={data_port}" in expected, f"the helper expected nothing: {expected!r}"
            attempt = c1.tcp_connect("198.51.100.21", data_port, timeout=2.0)
            assert not attempt["connected"] and "timed out" in str(attempt["error"]), attempt
            assert data.stats()["accepted"] == 0
            assert control.talk(b"still here", expect=10) == b"still here"
    finally:
        tb.run("fw", ["iptables", "-t", "raw", "-D", *helper], check=False)
        tb.run("fw", ["conntrack", "-F"], check=False)
