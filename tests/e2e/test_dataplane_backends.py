"""Both dataplane backends: nft where the kernel has its queue statement, iptables elsewhere."""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from enforcer import dataplane
from enforcer.config import DataplaneSettings
from enforcer.core import marks
from testbed.build import Testbed
from testbed.lab import EnforcerProcess
from testbed.plugin import require_e2e
from testbed.topology import standard


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    require_e2e()
    with Testbed.up(standard("nat"), tag="test-backends") as built:
        yield built


def queue_supported(tb: Testbed) -> bool:
    probe = ("import sys; from enforcer import dataplane; "
             "sys.exit(0 if dataplane.nft_queue_supported() else 1)")
    return tb.run("fw", [sys.executable, "-c", probe], check=False).returncode == 0


INTERFACES = dataplane.Interfaces(
    {"int0": 2}, {"ext0": 3},
    (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8:1::/64")),
    (ipaddress.ip_address("198.51.100.1"), ipaddress.ip_address("2001:db8:2::1")),
    (("int0", ipaddress.ip_interface("192.0.2.1/24")), ("int0", ipaddress.ip_interface("2001:db8:1::1/64"))))
# the maps table as the scripts make it (no rule of it depends on the interfaces)
MAPS_RULESET = "dataplane.Ruleset(dataplane.DataplaneSettings(), dataplane.Interfaces({}, {}, (), ()))"
NAT_RULES: list[dataplane.NatRule] = [
    dataplane.RedirectRule(6, ipaddress.ip_address("192.0.2.11"), ipaddress.ip_address("192.0.2.1"),
                           61000, ipaddress.ip_address("198.51.100.21"), 30001),
    dataplane.RedirectRule(17, ipaddress.ip_address("2001:db8:1::11"), ipaddress.ip_address("2001:db8:1::1"),
                           61001, ipaddress.ip_address("2001:db8:2::21"), 30001),
    dataplane.BindRule(6, ipaddress.ip_address("198.51.100.1"), 20001, ipaddress.ip_address("192.0.2.11"),
                       40001),
    dataplane.BindRule(6, ipaddress.ip_address("198.51.100.1"), 20002, ipaddress.ip_address("192.0.2.11"),
                       40002, ipaddress.ip_address("192.0.2.1")),  # reaching the client from the fw
]


@pytest.mark.parametrize("working", [True, False], ids=["running", "lockdown"])
@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_nft_ruleset_is_accepted_by_the_kernel(tb: Testbed, fail_open: bool, working: bool) -> None:
    """nft -c checks against the kernel; where it lacks queue, only that statement is swapped."""
    text = dataplane.NftBackend().render(dataplane.rules_of(dataplane.Ruleset(
        DataplaneSettings(0, fail_open), INTERFACES, True, (20000, 29999), working=working, socks_port=1080)))
    if not queue_supported(tb):
        text = text.replace("queue num 0 bypass", "accept").replace("queue num 0", "accept")
    result = tb.run("fw", ["nft", "-c", "-f", "-"], input=text, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_iptables_rules_are_accepted_by_the_kernel(tb: Testbed, fail_open: bool) -> None:
    """The iptables backend's rules with every option (NAT, binds and the SOCKS port, the
    caps, open ports), installed for real, running and then as the lockdown (iptables-restore
    --test does not ask the kernel), each family's every rule in place; then unloaded."""
    script = f"""
import subprocess
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from enforcer import dataplane
from enforcer.config import DataplaneSettings
from enforcer.dataplane import Interfaces
rs = dataplane.Ruleset(DataplaneSettings(0, {fail_open}, open_ports=((6, (22, 22)), (17, (67, 68)))),
                       {INTERFACES!r}, True, (20000, 29999), socks_port=1080)
backend = dataplane.IptablesBackend()
try:
    for ruleset in (rs, replace(rs, working=False)):
        backend.install(ruleset)
        for family, tool in backend.TOOLS.items():
            rendered = backend.render(dataplane.rules_of(ruleset), family).count("-A PINHOLE-")
            saved = subprocess.run([tool + "-save"], capture_output=True, text=True, check=True).stdout
            print(family, ruleset.working, rendered, saved.count("-A PINHOLE-"))
finally:
    dataplane.unload()
"""
    counts = [line.split() for line in tb.run("fw", [sys.executable, "-c", script]).stdout.splitlines()]
    assert len(counts) == 4 and all(int(rendered) == int(saved) > 0 for *_, rendered, saved in counts), counts
    assert "PINHOLE" not in tb.run("fw", ["iptables-save"]).stdout + tb.run("fw", ["ip6tables-save"]).stdout


def test_nat_map_elements_written_over_netlink_are_what_nft_reads(tb: Testbed) -> None:
    """NatMaps (raw netlink) writes elements that nft lists as the rules say, deletes them,
    and a delete of one already gone does not stop the others."""
    script = f"""
import subprocess
from ipaddress import IPv4Address, IPv6Address
from enforcer import dataplane
from enforcer.dataplane import BindRule, RedirectRule
subprocess.run(["nft", "-f", "-"], input=dataplane.render_nft_maps({MAPS_RULESET}), text=True, check=True)
rules = {NAT_RULES!r}
maps = dataplane.NatMaps()
maps.add(rules)
print(subprocess.run(["nft", "list", "table", "inet", "{dataplane.MAPS_TABLE}"], capture_output=True,
                     text=True, check=True).stdout)
print("---")
maps.delete(rules[:1])
maps.delete(rules)
print(subprocess.run(["nft", "list", "table", "inet", "{dataplane.MAPS_TABLE}"], capture_output=True,
                     text=True, check=True).stdout)
subprocess.run(["nft", "delete", "table", "inet", "{dataplane.MAPS_TABLE}"], check=True)
"""
    added, removed = tb.run("fw", [sys.executable, "-c", script]).stdout.split("---")
    assert "192.0.2.11 . 192.0.2.1 . tcp . 61000 : 198.51.100.21 . 30001" in added
    assert "192.0.2.11 . 192.0.2.1 . tcp . 61000 : 0x0000ee48" in added
    assert "2001:db8:1::11 . 2001:db8:1::1 . udp . 61001 : 2001:db8:2::21 . 30001" in added
    assert "198.51.100.1 . tcp . 20001 : 192.0.2.11 . 40001" in added
    assert "198.51.100.1 . tcp . 20002 : 192.0.2.11 . 40002" in added
    assert "198.51.100.1 . 192.0.2.11 . tcp . 40002 : 192.0.2.1" in added
    assert "elements" not in removed


def test_grants_written_over_netlink_are_what_nft_reads_and_what_a_dump_lists(tb: Testbed) -> None:
    """NatMaps gives the kernel grants (a key with its timeout, a mark), lists the keys the
    kernel holds (a dump), and takes them away again, a grant already gone too."""
    script = f"""
import subprocess
from ipaddress import IPv4Address, IPv6Address
from enforcer import dataplane
from enforcer.dataplane import GrantRule
subprocess.run(["nft", "-f", "-"], input=dataplane.render_nft_maps({MAPS_RULESET}), text=True, check=True)
grants = [GrantRule(6, IPv4Address("192.0.2.11"), IPv4Address("198.51.100.21"), 30001, 0x11000000, 30000),
          GrantRule(17, IPv6Address("2001:db8:1::11"), IPv6Address("2001:db8:2::21"), 69, 0x50000000, None)]
maps = dataplane.NatMaps()
maps.hold(grants)
print(sorted(maps.grant_keys()) == sorted(g.key for g in grants))
print(subprocess.run(["nft", "list", "table", "inet", "{dataplane.MAPS_TABLE}"], capture_output=True,
                     text=True, check=True).stdout)
print("---")
maps.release([grants[0].key])
print(maps.grant_keys() == {{grants[1].key}})
maps.release([g.key for g in grants])
print(maps.grant_keys() == set())
subprocess.run(["nft", "delete", "table", "inet", "{dataplane.MAPS_TABLE}"], check=True)
"""
    held, released = tb.run("fw", [sys.executable, "-c", script]).stdout.split("---")
    assert held.startswith("True"), held
    assert "192.0.2.11 . 198.51.100.21 . tcp . 30001 timeout 30s expires" in held
    assert "192.0.2.11 . 198.51.100.21 . tcp . 30001 timeout 30s expires" in held.split("grant_mark_ip {")[1]
    assert "2001:db8:1::11 . 2001:db8:2::21 . udp . 69 : 0x50000000" in held
    assert released.split() == ["True", "True"], released


def test_thousands_of_grants_and_nat_rules_at_once_are_all_written_and_all_removed(
        tb: Testbed) -> None:
    """What a session's end or a burst of grants asks at once: 3000 grants of both
    families (with and without a timeout) and 600 redirects' NAT elements, more than a
    netlink message holds and more acknowledgements than a socket's buffer, all made and
    then all gone, none left to admit a flow."""
    script = f"""
import subprocess
from ipaddress import IPv4Address, IPv6Address
from enforcer import dataplane
from enforcer.dataplane import GrantRule, RedirectRule
subprocess.run(["nft", "-f", "-"], input=dataplane.render_nft_maps({MAPS_RULESET}), text=True, check=True)
v4, v6 = int(IPv4Address("198.51.100.0")), int(IPv6Address("2001:db8:2::"))
grants = [GrantRule(6, IPv4Address("192.0.2.11"), IPv4Address(v4 + i % 250), 1024 + i, 0x11000000,
                    30000 if i % 2 else None) if i % 3 else
          GrantRule(17, IPv6Address("2001:db8:1::11"), IPv6Address(v6 + i), 1024 + i, 0x50000000, None)
          for i in range(3000)]
rules = [RedirectRule(6, IPv4Address("192.0.2.11"), IPv4Address("192.0.2.1"), 20000 + i,
                      IPv4Address("198.51.100.21"), 30000 + i) for i in range(600)]
maps = dataplane.NatMaps()
maps.hold(grants)
maps.add(rules)
print(maps.grant_keys() == {{g.key for g in grants}})
listed = subprocess.run(["nft", "-j", "list", "table", "inet", "{dataplane.MAPS_TABLE}"], capture_output=True,
                        text=True, check=True).stdout
import json
named = [o.get("set") or o.get("map") for o in json.loads(listed)["nftables"]]
print(json.dumps({{s["name"]: len(s["elem"]) for s in named if s and "elem" in s}}))
maps.release([g.key for g in grants])
maps.delete(rules)
print(maps.grant_keys() == set())
print(subprocess.run(["nft", "list", "table", "inet", "{dataplane.MAPS_TABLE}"], capture_output=True,
                     text=True, check=True).stdout.count("elements"))
subprocess.run(["nft", "delete", "table", "inet", "{dataplane.MAPS_TABLE}"], check=True)
import socket
print(maps.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
"""
    held, counts, released, left, sent = tb.run("fw", [sys.executable, "-c", script]).stdout.splitlines()
    # its transactions fit its send buffer whatever net.core.wmem_default is (EMSGSIZE)
    assert int(sent) == 2 * dataplane.TRANSACTION_BUFFER
    assert held == "True"
    assert json.loads(counts) == {"grant_ip": 2000, "grant_mark_ip": 2000, "grant_ip6": 1000,
                            "grant_mark_ip6": 1000, "redirect_mark_ip": 600, "redirect_to_ip": 600}
    assert released == "True" and left == "0"


def test_a_closed_bind_s_flows_are_forgotten_by_their_mark(tb: Testbed) -> None:
    """Conntrack (raw netlink) deletes the conntrack entries of one bind port's flows, of
    both families, and nothing else: not another bind's, not a forwarded flow's; a port
    with none is no error."""
    entries = [  # (source, destination, destination port, mark)
        ("198.51.100.21", "198.51.100.1", 20001, marks.local_mark(20001)),
        ("2001:db8:2::21", "2001:db8:2::1", 20001, marks.local_mark(20001)),
        ("198.51.100.22", "198.51.100.1", 20002, marks.local_mark(20002)),
        ("198.51.100.23", "192.0.2.11", 20001, marks.MARK_KERNEL | 20001),
    ]
    for src, dst, port, mark in entries:
        tb.run("fw", ["conntrack", "-I", "-p", "udp", "-s", src, "-d", dst, "--sport", "5555",
                      "--dport", str(port), "--timeout", "100", "--mark", str(mark)])
    try:
        script = ("from enforcer import dataplane\nflows = dataplane.Conntrack()\n"
                  "flows.forget(20001)\nflows.forget(20003)\nflows.close()\n")
        tb.run("fw", [sys.executable, "-c", script])
        left = tb.run("fw", ["conntrack", "-L", "-f", "ipv4", "-p", "udp"]).stdout + \
            tb.run("fw", ["conntrack", "-L", "-f", "ipv6", "-p", "udp"]).stdout
        assert "src=198.51.100.21 " not in left and "src=2001:db8:2::21 " not in left, left
        assert "src=198.51.100.22 " in left and "src=198.51.100.23 " in left, left
    finally:
        for family in ("ipv4", "ipv6"):
            tb.run("fw", ["conntrack", "-D", "-f", family, "-p", "udp"], check=False)


def test_a_client_s_redirected_udp_flows_to_an_address_are_listed_by_port(tb: Testbed) -> None:
    """Conntrack.redirected_udp_ports lists the original destination ports of one client's
    UDP flows to one address whose destination conntrack translated (as a kernel-mode
    redirect's is), of either family: not its TCP flows, not an untranslated flow, not its
    flows to another address, not another client's (IPv6 too, which the kernel's filter
    compares the wrong way round), over a dump of several netlink datagrams."""
    entries = [  # (protocol, source, destination, destination port, translated)
        ("udp", "192.0.2.21", "192.0.2.1", 61001, True), ("udp", "192.0.2.21", "192.0.2.1", 61002, True),
        ("tcp", "192.0.2.21", "192.0.2.1", 61003, True), ("udp", "192.0.2.21", "192.0.2.2", 61004, True),
        ("udp", "192.0.2.22", "192.0.2.1", 61005, True), ("udp", "192.0.2.21", "192.0.2.1", 61009, False),
        ("udp", "2001:db8:1::21", "2001:db8:1::1", 61006, True),
        ("udp", "2001:db8:1::22", "2001:db8:1::1", 61007, True),
        ("udp", "2001:db8:1::21", "2001:db8:1::2", 61008, True),
        ("udp", "2001:db8:1::21", "2001:db8:1::1", 61010, False),
        # more than one datagram of the dump's answer holds (about 250 entries)
        *(("udp", "2001:db8:1::23", "2001:db8:1::1", port, True) for port in range(62000, 62600)),
    ]
    script = "\n".join(
        f"conntrack -I -p {proto} -s {src} -d {dst} --sport 5555 --dport {port} --timeout 100"
        + (" --state ESTABLISHED" if proto == "tcp" else "")
        + ((" --dst-nat 198.51.100.21" if "." in src else " --dst-nat 2001:db8:2::21") if nat else "")
        + " 2>/dev/null"
        for proto, src, dst, port, nat in entries)
    tb.run("fw", ["sh", "-c", script])
    try:
        script = ("import json\nfrom enforcer import dataplane\nfrom enforcer.core.packet import "
                  "address\nc = dataplane.Conntrack()\nprint(json.dumps([sorted(c.redirected_udp_ports("
                  "address(a), address(b))) for a, b in json.loads(input())]))\nc.close()\n")
        asked = [("192.0.2.21", "192.0.2.1"), ("192.0.2.22", "192.0.2.1"),
                 ("192.0.2.23", "192.0.2.1"), ("2001:db8:1::21", "2001:db8:1::1"),
                 ("2001:db8:1::22", "2001:db8:1::1"), ("2001:db8:1::23", "2001:db8:1::1"),
                 ("2001:db8:1::24", "2001:db8:1::1")]
        out = tb.run("fw", [sys.executable, "-c", script], input=json.dumps(asked)).stdout
        assert json.loads(out) == [[61001, 61002], [61005], [], [61006], [61007],
                                   list(range(62000, 62600)), []]
    finally:
        for family in ("ipv4", "ipv6"):
            tb.run("fw", ["conntrack", "-D", "-f", family], check=False)


def test_the_nft_backend_runs_where_the_kernel_allows_and_refuses_clearly_elsewhere(
        tb: Testbed, tmp_path: Path) -> None:
    enforcer = EnforcerProcess(tb, tmp_path)
    if queue_supported(tb):
        enforcer.start(backend="nft")
        try:
            assert enforcer.call("status")["backend"] == "nft"
            assert "table inet pinhole" in tb.run("fw", ["nft", "list", "ruleset"]).stdout
            with tb.agent("s1").tcp_server("198.51.100.21", 21):
                assert tb.agent("c1").tcp_connect("198.51.100.21", 21, send_bytes=1000)["connected"]
        finally:
            assert enforcer.stop() == 0
            enforcer.unload()
    else:
        with pytest.raises(RuntimeError, match="lacks nft's queue statement"):
            enforcer.start(backend="nft")
    assert "pinhole" not in tb.run("fw", ["nft", "list", "ruleset"]).stdout


def test_auto_picks_the_backend_the_kernel_supports(tb: Testbed, tmp_path: Path) -> None:
    enforcer = EnforcerProcess(tb, tmp_path)
    enforcer.start()
    try:
        expected = "nft" if queue_supported(tb) else "iptables"
        assert enforcer.call("status")["backend"] == expected
    finally:
        assert enforcer.stop() == 0
