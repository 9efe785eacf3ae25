"""Worker processes, end to end: user-mode flows run in the worker their mark names (its
queue reads every later packet of theirs) and a filtered one stays in the main process,
which lists what the workers saw; a worker killed, or hung and so killed by the main
process, is replaced and its flows go on through its successor, nothing passing unread
meanwhile; a stop or a killed enforcer leaves no
worker behind, and a worker that cannot start stops the enforcer's start."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from enforcer import worker, workers
from enforcer.client import Client, Flags
from enforcer.nfqueue import MAX_PAYLOAD
from testbed.build import Testbed
from testbed.clauses.helpers import assert_echoed
from testbed.lab import GUIDS, EnforcerProcess
from testbed.plugin import require_e2e
from testbed.topology import standard

CLIENT, SERVER = "192.0.2.11", "198.51.100.21"
WORKERS = 2
REPORTED_WITHIN = 2.0  # seconds: workers report every 0.25 s; a busy VM is slower
BACK_WITHIN = 10.0  # seconds: a dead worker's successor starts 1 s later, then binds its queue


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    require_e2e()
    with Testbed.up(standard("routed"), tag="test-workers") as built:
        yield built


@pytest.fixture
def enforcer(tb: Testbed, tmp_path: Path) -> Iterator[EnforcerProcess]:
    proc = EnforcerProcess(tb, tmp_path, data_filters={"shout": "tests.e2e.shout_filter:Shout"})
    proc.start(dataplane={"workers": WORKERS})
    yield proc
    if proc.running:
        proc.stop()


def read_by_queue(tb: Testbed) -> dict[int, int]:
    """How many packets each of the fw's queues has been given so far (its id_sequence)."""
    lines = tb.run("fw", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.splitlines()
    return {int(line.split()[0]): int(line.split()[7]) for line in lines}


def settled_by_queue(tb: Testbed, within: float = 5.0) -> dict[int, int]:
    """``read_by_queue`` once it has stopped growing: a connection's last packets (the
    peer's FIN, the client's last ACK) may still be on their way as its call returns,
    and would count against what comes next."""
    counts, deadline = read_by_queue(tb), time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read_by_queue(tb)
        if now == counts:
            break
        counts = now
    return counts


def arrived(tb: Testbed) -> int:
    """Packets the fw has received on its interface to the clients so far."""
    link = json.loads(tb.run("fw", ["ip", "-j", "-s", "link", "show", "int0"]).stdout)
    return int(link[0]["stats64"]["rx"]["packets"])


def session_of(tb: Testbed, api: Client) -> int:
    with tb.agent("s1").tcp_server(SERVER, 21):
        assert tb.agent("c1").tcp_connect(SERVER, 21, send_bytes=10)["connected"]
    return int(next(s["id"] for s in api.call("sessions") if s["client"] == CLIENT))


def flow_of(enforcer: EnforcerProcess, action: int) -> dict[str, object]:
    (flow,) = [f for f in enforcer.call("flows") if f["action"] == action]
    return flow


def wait_for(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def test_user_mode_flows_run_in_the_workers(tb: Testbed, enforcer: EnforcerProcess) -> None:
    """Two unfiltered user-mode flows go to the workers in turn, whose queues read every
    packet of theirs after the first (the main queue only the SYN); a filtered one stays in
    the main queue, its stream edited both ways; the flows listing shows what the workers
    saw as soon as their queues run dry."""
    c1, s1 = tb.agent("c1"), tb.agent("s1")
    status = enforcer.call("status")["workers"]
    assert [(w["worker"], w["queue"], w["ready"]) for w in status] == [(1, 1, True), (2, 2, True)]
    # the workers' queues copy a packet's first bytes alone (the main queue's, whole packets)
    lines = tb.run("fw", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.splitlines()
    copy_range = {int(line.split()[0]): int(line.split()[4]) for line in lines}
    assert copy_range == {0: MAX_PAYLOAD, 1: worker.COPY_RANGE, 2: worker.COPY_RANGE}, copy_range
    with Client(str(enforcer.socket)) as api, s1.tcp_server(SERVER, 33001) as echo:
        session = session_of(tb, api)
        plain = [api.allow_future_connect(session, (SERVER, 33001), protocol_guid=GUIDS["FTP"],
                                          flags=Flags.NO_KERNEL_MODE) for _ in range(2)]
        shouted = api.allow_future_connect(session, (SERVER, 33001), protocol_guid=GUIDS["FTP"],
                                           data_filter="shout")
        counts = [settled_by_queue(tb)]
        for n in (300_000, 200_000):
            assert_echoed(c1.tcp_connect(SERVER, 33001, send_bytes=n), n, "an unfiltered flow")
            counts.append(settled_by_queue(tb))
        with c1.tcp_open(SERVER, 33001) as conn:
            assert conn.connected, conn.error
            for n in (10, 125, 60):
                back = conn.talk(b"ping----" * n, expect=len(b"PONG?----") * n)
                assert back == b"PONG?----" * n, back[:80]
        counts.append(settled_by_queue(tb))
        assert echo.stats()["bytes_in"] == 500_000 + len(b"PONG!!----") * 195

    assert [flow_of(enforcer, a.id)["worker"] for a in (*plain, shouted)] == [1, 2, 0]
    grew = [{q: after[q] - before[q] for q in after} for before, after in itertools.pairwise(counts)]
    # each unfiltered flow: its SYN in the main queue, the rest (tens of packets) its worker's
    assert grew[0][0] == 1 and grew[0][1] > 10 and grew[0][2] == 0, grew
    assert grew[1][0] == 1 and grew[1][2] > 10 and grew[1][1] == 0, grew
    # the filtered flow: every packet in the main queue
    assert grew[2][0] > 10 and grew[2][1] == grew[2][2] == 0, grew

    def reported() -> bool:
        flows = [flow_of(enforcer, a.id) for a in plain]
        return all(int(f["bytes_out"]) > n and int(f["bytes_back"]) > n  # type: ignore[call-overload]
                   for f, n in zip(flows, (300_000, 200_000), strict=True))
    wait_for("the workers' figures reach the flows listing", reported, REPORTED_WITHIN)
    assert all(flow_of(enforcer, a.id)["held"] == "tcp-closing" for a in plain)
    assert enforcer.call("status")["counters"]["user-mode packets"] > 40


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_or_hung_worker_is_replaced_and_its_flows_go_on(tb: Testbed, enforcer: EnforcerProcess,
                                                                how: str) -> None:
    """Worker 1 is killed (SIGKILL), or hangs (SIGSTOP: the main process hears nothing from
    it and kills it), while it holds a connection: until its successor is ready the
    connection's packets reach no one (nothing passes unread), then they go on through the
    successor; worker 2's connection, idle meanwhile, never notices."""
    c1, s1 = tb.agent("c1"), tb.agent("s1")
    with Client(str(enforcer.socket)) as api, s1.tcp_server(SERVER, 33002) as echo:
        session = session_of(tb, api)
        kept, other = [api.allow_future_connect(session, (SERVER, 33002), protocol_guid=GUIDS["FTP"],
                                                flags=Flags.NO_KERNEL_MODE) for _ in range(2)]
        with c1.tcp_open(SERVER, 33002) as first, c1.tcp_open(SERVER, 33002) as second:
            assert first.connected and second.connected
            assert [flow_of(enforcer, a.id)["worker"] for a in (kept, other)] == [1, 2]
            (dead,) = [w["pid"] for w in enforcer.call("status")["workers"] if w["worker"] == 1]
            os.kill(int(dead), signal.SIGKILL if how == "killed" else signal.SIGSTOP)
            # sent while worker 1 is dead or hung: it reaches the fw, whose kernel has no reader
            # for queue 1 (or one that reads nothing) and drops it; the client sends it again
            before = arrived(tb)
            assert first.talk(b"while dead", expect=10, timeout=0.3) == b""
            assert arrived(tb) > before, "the packet never reached the fw"
            assert echo.stats()["bytes_in"] == 0, "a packet passed while its worker was dead"

            def replaced() -> bool:
                (w,) = [w for w in enforcer.call("status")["workers"] if w["worker"] == 1]
                return bool(w["ready"] and w["pid"] != dead and w["starts"] == 2)
            wait_for("worker 1's successor is ready", replaced,
                     BACK_WITHIN + (workers.SILENCE_LIMIT if how == "hung" else 0))
            assert not os.path.exists(f"/proc/{dead}"), "the dead or hung worker is not reaped"
            # the retransmission reaches the successor, which holds the flow again
            assert first.talk(b"", expect=10, timeout=10.0) == b"while dead"
            assert first.talk(b"still here", expect=10) == b"still here"
            assert second.talk(b"unmoved", expect=7) == b"unmoved"
            assert echo.stats()["bytes_in"] == len(b"while deadstill hereunmoved")
    status = enforcer.call("status")
    assert status["counters"].get("user-mode flows lost with a worker", 0) == 0
    assert status["counters"].get("worker processes killed: silent", 0) == (how == "hung")
    assert [w["starts"] for w in status["workers"]] == [2, 1], "an idle worker was taken to hang"
    # each running worker was heard within its heartbeat (the idle one too)
    assert all(w["silent_s"] <= 2 * workers.HEARTBEAT for w in status["workers"]), status["workers"]


def test_a_stop_or_a_killed_enforcer_leaves_no_worker(tb: Testbed, enforcer: EnforcerProcess) -> None:
    pids = [int(w["pid"]) for w in enforcer.call("status")["workers"]]
    assert len(pids) == WORKERS and all(Path(f"/proc/{pid}").exists() for pid in pids)
    enforcer.stop()
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    assert read_by_queue(tb) == {}, "a queue is still bound"
    enforcer.start(dataplane={"workers": WORKERS})
    pids = [int(w["pid"]) for w in enforcer.call("status")["workers"]]
    enforcer.kill()  # its workers' sockets end: they exit
    wait_for("the killed enforcer's workers exit",
             lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 5.0)
    assert read_by_queue(tb) == {}, "a queue is still bound"


def test_a_worker_that_cannot_bind_its_queue_stops_the_start(tb: Testbed, tmp_path: Path) -> None:
    """Another program holds worker 1's queue: the enforcer does not start, says why, and
    leaves no worker behind."""
    holder = tb.popen("fw", [sys.executable, "-c", "from enforcer.nfqueue import Queue; q = Queue(1); "
                             "print('bound', flush=True); import time; time.sleep(60)"],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"bound"
        enforcer = EnforcerProcess(tb, tmp_path)
        with pytest.raises(RuntimeError, match="exited during start-up") as failed:
            enforcer.start(dataplane={"workers": 2})
        assert "worker 1: cannot bind NFQUEUE 1: it is already bound by another socket" in str(failed.value)
        assert "Traceback" not in str(failed.value)
        leftover = tb.run("fw", ["pgrep", "-f", "enforcer.worker"], check=False).stdout.split()
        assert leftover == [], "a worker outlived the start that failed"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.alone  # a conformance run of its own, with its own parallel checks
def test_the_clause_suite_passes_with_workers(tmp_path: Path) -> None:
    """The clause suite (routed, IPv4: the cells where user-mode flows are forwarded
    untranslated; `pinhole conformance --firewall enforcer-workers` runs them all) against
    the enforcer with two workers: every claimed clause passes, its user-mode rows showing
    the flows ran in user mode."""
    require_e2e()
    report = tmp_path / "workers.json"
    run = subprocess.run([sys.executable, "-m", "testbed", "conformance", "--firewall", "enforcer-workers",
                          "--topology", "routed", "--family", "ipv4", "--artifacts", str(tmp_path),
                          "--json", str(report)], capture_output=True, text=True, timeout=900,
                         check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    summary = json.loads(report.read_text())["summary"]["firewalls"]["enforcer-workers"]
    assert summary["ok"] and summary["clauses"]["failed"] == 0, summary
    assert summary["clauses"]["passed"] >= 45 and summary["checks"]["passed"] > 200, summary
