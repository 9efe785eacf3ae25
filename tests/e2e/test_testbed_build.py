"""Build the standard topology into namespaces, use it, tear it down, sweep it.

Needs root. Other testbeds (other people's runs) may exist at the same time,
so these tests only ever remove what they created or what a dead owner left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if os.geteuid() != 0:
    if os.environ.get("PINHOLE_REQUIRE_E2E") == "1":
        pytest.fail("e2e tests need root (PINHOLE_REQUIRE_E2E=1)", pytrace=False)
    pytest.skip("e2e testbed tests need root (network namespaces)", allow_module_level=True)

from testbed import ledger
from testbed.build import CommandFailed, Testbed, UnknownTestbed
from testbed.ledger import Ledger
from testbed.topology import Family, Topology, nat, routed, split

REPO = Path(__file__).resolve().parents[2]
CREATED: set[str] = set()  # testbed ids made by this module


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _ns_of(tb_id: str) -> list[str]:
    return [n for n in _netns_list() if n.startswith(f"ph-{tb_id}-")]


@pytest.fixture(scope="module", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    yield
    assert not [n for i in CREATED for n in _ns_of(i)], "namespaces left behind"
    # Whatever ph-* namespace remains must belong to someone else's live testbed
    # (listed before the ledgers are read: other runs build and tear down meanwhile).
    seen = [n for n in _netns_list() if n.startswith(ledger.NS_PREFIX)]
    stray = ledger.unclaimed(seen, [led for led in ledger.all_ledgers() if led.is_live()])
    assert not stray, f"unclaimed ph- namespaces: {stray}"


def _up(topo: Topology, **kw: object) -> Testbed:
    tb = Testbed.up(topo, tag="e2e", **kw)  # type: ignore[arg-type]
    CREATED.add(tb.id)
    return tb


@pytest.fixture(scope="module")
def routed_tb() -> Iterator[Testbed]:
    with _up(routed()) as tb:
        yield tb


@pytest.fixture(scope="module")
def nat_tb() -> Iterator[Testbed]:
    with _up(nat()) as tb:
        yield tb


@pytest.fixture(scope="module")
def split_tb() -> Iterator[Testbed]:
    with _up(split()) as tb:
        yield tb


def _addrs(tb: Testbed, node: str, ifname: str) -> set[str]:
    out = tb.run(node, ["ip", "-j", "addr", "show", "dev", ifname]).stdout
    return {f"{a['local']}/{a['prefixlen']}" for a in json.loads(out)[0]["addr_info"]
            if a.get("scope") == "global"}



def test_namespaces_are_named_and_recorded(routed_tb: Testbed) -> None:
    assert len(routed_tb.id) == 6
    names = set(_ns_of(routed_tb.id))
    assert names == {f"ph-{routed_tb.id}-{n}" for n in routed_tb.topology.node_names}
    assert routed_tb.netns("c1") == f"ph-{routed_tb.id}-c1"
    led = Ledger.load(routed_tb.id)
    assert set(led.namespaces.values()) == names
    assert led.owner_pid == os.getpid() and not led.detached
    assert led.variant == "routed"


def test_addresses_match_topology(routed_tb: Testbed) -> None:
    topo = routed_tb.topology
    for node in topo.hosts:
        for iface in node.interfaces:
            assert _addrs(routed_tb, node.name, iface.name) == set(iface.addresses)


def test_fw_multihomed_and_forwarding(routed_tb: Testbed) -> None:
    assert _addrs(routed_tb, "fw", "ext0") == {
        "198.51.100.1/24", "198.51.100.2/24", "2001:db8:2::1/64", "2001:db8:2::2/64"}
    r = routed_tb.run("fw", ["sysctl", "-n", "net.ipv4.ip_forward",
                             "net.ipv6.conf.all.forwarding"])
    assert r.stdout.split() == ["1", "1"]
    for dst in ("203.0.113.5", "2001:db8:3::5"):
        assert "dev ext0" in routed_tb.run("fw", ["ip", "route", "get", dst]).stdout


def test_no_tentative_addresses(routed_tb: Testbed) -> None:
    for node in routed_tb.topology.hosts:
        out = routed_tb.run(node.name, ["ip", "-6", "addr", "show", "tentative"]).stdout
        assert out.strip() == "", f"{node.name}: {out}"


def test_bridge_settings(routed_tb: Testbed) -> None:
    for sw in ("swint", "swext"):
        info = json.loads(routed_tb.run(sw, ["ip", "-d", "-j", "link", "show", "br0"]).stdout)
        data = info[0]["linkinfo"]["info_data"]
        assert data["stp_state"] == 0
        assert data["mcast_snooping"] == 0
    ports = routed_tb.run("swint", ["bridge", "link"]).stdout
    for port in ("c1-eth0", "c2-eth0", "fw-int0"):
        assert port in ports


def test_routes(routed_tb: Testbed) -> None:
    out = routed_tb.run("c1", ["ip", "route", "get", "198.51.100.21"]).stdout
    assert "via 192.0.2.1 dev eth0" in out
    out = routed_tb.run("c1", ["ip", "-6", "route", "get", "2001:db8:2::21"]).stdout
    assert "via 2001:db8:1::1 dev eth0" in out
    out = routed_tb.run("s1", ["ip", "route", "get", "192.0.2.11"]).stdout
    assert "via 198.51.100.1 dev eth0" in out
    out = routed_tb.run("s1", ["ip", "-6", "route", "get", "2001:db8:1::11"]).stdout
    assert "via 2001:db8:2::1 dev eth0" in out


@pytest.mark.parametrize("fam", ["ipv4", "ipv6"])
def test_routed_clients_reach_servers(routed_tb: Testbed, fam: str) -> None:
    # "fam", not "family": the pinhole plugin parametrises "family" itself.
    family = fam
    topo = routed_tb.topology
    for c in ("c1", "c2"):
        for s, idx in (("s1", 0), ("s2", 0), ("s2", 1)):
            dst = topo.address(s, family, idx)  # type: ignore[arg-type]
            assert routed_tb.ping(c, dst), f"{c} -> {s} {dst}"
    # The return path too: s1 reaches c1 via the fw.
    assert routed_tb.ping("s1", topo.address("c1", family))  # type: ignore[arg-type]


@pytest.mark.parametrize("fam", ["ipv4", "ipv6"])
def test_split_has_two_internal_networks_each_on_its_own_fw_interface(split_tb: Testbed,
                                                                      fam: Family) -> None:
    """c3 sits behind int1, c1 and c2 behind int0; each reaches the servers and the other
    network through the fw, by its own gateway, and the servers reach both."""
    topo = split_tb.topology
    for node in topo.hosts:
        for iface in node.interfaces:
            assert _addrs(split_tb, node.name, iface.name) == set(iface.addresses)
    v = "-6" if fam == "ipv6" else "-4"
    for client, other in (("c1", "c3"), ("c3", "c1")):
        route = split_tb.run(client, ["ip", v, "route", "get", topo.address(other, fam)]).stdout
        assert f"via {topo.fw_internal_address(fam, facing=client)} dev eth0" in route
        for dst in (topo.address("s1", fam), topo.address(other, fam)):
            assert split_tb.ping(client, dst), f"{client} -> {dst}"
        assert split_tb.ping("s1", topo.address(client, fam))
    assert "dev int1" in split_tb.run("fw", ["ip", v, "route", "get", topo.address("c3", fam)]).stdout


def test_s2_answers_on_denied_net(routed_tb: Testbed) -> None:
    assert routed_tb.ping("fw", "203.0.113.22")
    assert routed_tb.ping("fw", "2001:db8:3::22")


@pytest.mark.parametrize("fam,dst", [("ipv4", "192.0.2.11"), ("ipv6", "2001:db8:1::11")])
def test_nat_servers_have_no_route_back(nat_tb: Testbed, fam: str, dst: str) -> None:
    family = fam
    argv = ["ip", "-6" if family == "ipv6" else "-4", "route", "get", dst]
    r = nat_tb.run("s1", argv, check=False)
    assert r.returncode != 0 and "unreachable" in r.stderr
    # ...so a client's unrewritten packet gets no reply.
    server = nat_tb.topology.address("s1", family)  # type: ignore[arg-type]
    assert not nat_tb.ping("c1", server, timeout=0.3)
    # The fw itself (on the external net) still reaches the servers.
    assert nat_tb.ping("fw", server)


def test_run_failure_names_command_and_stderr(routed_tb: Testbed) -> None:
    with pytest.raises(CommandFailed) as ei:
        routed_tb.run("c1", ["ip", "link", "show", "nosuchdev"])
    msg = str(ei.value)
    assert "ip link show nosuchdev" in msg
    assert "does not exist" in msg
    assert isinstance(ei.value, subprocess.CalledProcessError)
    r = routed_tb.run("c1", ["cat"], input="hello")
    assert r.stdout == "hello"
    with pytest.raises(KeyError, match="no node 'c9'"):
        routed_tb.run("c9", ["true"])


def test_popen_is_recorded_and_forgotten(routed_tb: Testbed) -> None:
    p = routed_tb.popen("s1", ["sleep", "30"])
    assert any(e["pid"] == p.pid for e in Ledger.load(routed_tb.id).pids)
    p.terminate()
    p.wait(timeout=5)
    routed_tb.forget(p.pid)
    assert not any(e["pid"] == p.pid for e in Ledger.load(routed_tb.id).pids)


def test_attach_from_ledger(routed_tb: Testbed) -> None:
    other = Testbed.attach(routed_tb.id)
    assert other.topology == routed_tb.topology
    assert other.netns("fw") == routed_tb.netns("fw")
    assert "fw" in other.describe() and routed_tb.netns("s2") in other.describe()
    with pytest.raises(UnknownTestbed):
        Testbed.attach("000000")


def test_down_kills_processes_and_leaves_nothing() -> None:
    tb = _up(routed())
    p = tb.popen("c1", ["sleep", "60"])
    ledger_path = tb._ledger.path
    assert ledger_path.exists()
    tb.down()
    assert p.poll() is not None
    assert _ns_of(tb.id) == []
    assert not ledger_path.exists()
    tb.down()  # idempotent


def test_agent_is_recorded_and_closed() -> None:
    pytest.importorskip("testbed.agent")
    with _up(routed()) as tb:
        a = tb.agent("c1")
        assert tb.agent("c1") is a
        assert any(e["pid"] == a.pid for e in Ledger.load(tb.id).pids)
        pid = a.pid
    assert not ledger.pid_alive(pid, None)
    assert _ns_of(tb.id) == []


_CHILD = """
import sys, time
from testbed.build import Testbed
from testbed.topology import routed
tb = Testbed.up(routed(), tag="crash")
tb.popen("s1", ["sleep", "300"])
print(tb.id, flush=True)
time.sleep(300)
"""


def test_sweep_after_owner_killed() -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    assert child.stdout is not None
    tb_id = child.stdout.readline().strip()
    assert tb_id, "child did not build a testbed"
    CREATED.add(tb_id)
    led = Ledger.load(tb_id)
    (sleeper,) = [e for e in led.pids if e["node"] == "s1"]
    assert len(_ns_of(tb_id)) == 7
    # Owner alive: a sweep must not touch it.
    ledger.sweep()
    assert len(_ns_of(tb_id)) == 7
    child.send_signal(signal.SIGKILL)
    child.wait()
    removed = ledger.sweep()
    assert f"ledger {tb_id} (crash)" in removed
    assert _ns_of(tb_id) == []
    assert not ledger.pid_alive(sleeper["pid"], sleeper["start"])
    with pytest.raises(FileNotFoundError):
        Ledger.load(tb_id)


def test_sweep_ledger_with_recycled_owner_pid() -> None:
    # Our own pid with a wrong start time: the owner "died" and the pid was reused.
    tb_id = "dead01"
    ns = f"ph-{tb_id}-x"
    CREATED.add(tb_id)
    led = Ledger.create(tb_id, variant="routed", namespaces={"x": ns})
    led.update(lambda ld: setattr(ld, "owner_start", 1))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "60"])
    led.add_pid(sleeper.pid, node="x", what="sleep")
    assert not Ledger.load(tb_id).is_live()
    removed = ledger.sweep()
    assert f"namespace {ns}" in removed
    assert sleeper.wait(timeout=5) is not None
    assert ns not in _netns_list()


def test_sweep_removes_stray_namespace_without_ledger() -> None:
    tb_id = "dead02"
    ns = f"ph-{tb_id}-c1"
    CREATED.add(tb_id)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    assert f"stray namespace {ns}" in ledger.sweep()
    assert ns not in _netns_list()


def test_detached_testbed_survives_sweep() -> None:
    tb = _up(routed(), detached=True)
    try:
        led = Ledger.load(tb.id)
        assert led.detached and led.owner_pid is None
        ledger.sweep()
        assert len(_ns_of(tb.id)) == 7
    finally:
        tb.down()
    assert _ns_of(tb.id) == []


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.testbed_cmd", "testbed", *argv],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_cli_up_exec_down() -> None:
    r = _cli("up", "--variant", "nat", "--tag", "e2e-cli")
    assert r.returncode == 0, r.stderr
    tb_id = r.stdout.split()[0]
    CREATED.add(tb_id)
    try:
        # The CLI process has exited; the testbed stays.
        assert len(_ns_of(tb_id)) == 7
        assert "ph-" + tb_id + "-fw" in r.stdout
        r = _cli("exec", tb_id, "fw", "--", "ip", "-br", "addr", "show", "ext0")
        assert r.returncode == 0 and "198.51.100.2/24" in r.stdout
        r = _cli("exec", "--id", tb_id, "s1", "--", "ip", "route", "get", "192.0.2.11")
        assert r.returncode != 0
        r = _cli("exec", tb_id, "c9", "--", "true")
        assert r.returncode == 2
        assert r.stderr.startswith("pinhole: no node 'c9'") and "Traceback" not in r.stderr
        r = _cli("exec", "ffffff", "c1", "--", "true")
        assert r.returncode == 2 and r.stderr.startswith("pinhole: no testbed with id")
        r = _cli("down", "ffffff")
        assert r.returncode == 2 and "Traceback" not in r.stderr
    finally:
        r = _cli("down", tb_id)
    assert r.returncode == 0, r.stderr
    assert _ns_of(tb_id) == []


def test_cli_up_split() -> None:
    """``pinhole testbed up --variant split``: c3 behind the fw's int1; exec attaches to it
    by the topology its ledger records."""
    r = _cli("up", "--variant", "split", "--tag", "e2e-cli")
    assert r.returncode == 0, r.stderr
    tb_id = r.stdout.split()[0]
    CREATED.add(tb_id)
    try:
        assert len(_ns_of(tb_id)) == len(split().nodes) == 9
        assert "(variant split" in r.stdout
        r = _cli("exec", tb_id, "fw", "--", "ip", "-br", "addr", "show", "int1")
        assert r.returncode == 0 and "192.0.2.129/25" in r.stdout and "2001:db8:4::1/64" in r.stdout
        r = _cli("exec", tb_id, "c3", "--", "ip", "route", "get", "198.51.100.21")
        assert r.returncode == 0 and "via 192.0.2.129" in r.stdout
    finally:
        r = _cli("down", tb_id)
    assert r.returncode == 0, r.stderr
    assert _ns_of(tb_id) == []


def test_failed_build_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []

    def not_ready(self: Testbed, deadline: float) -> None:
        CREATED.add(self.id)
        made.append(self.id)
        raise RuntimeError("simulated readiness failure")

    monkeypatch.setattr(Testbed, "_wait_ready", not_ready)
    with pytest.raises(RuntimeError, match="simulated"):
        Testbed.up(routed(), tag="e2e-fail")
    (tb_id,) = made  # (other testbeds may come and go meanwhile: a parallel run's)
    assert _ns_of(tb_id) == []
