"""Real FTP and TFTP peers (testbed/peers.py) and the kernel-helper firewall
(testbed/kernel_helpers.py), in both topology variants.

What the APP clauses (testbed/clauses/test_app.py) do not show already: TFTP
replies really come from a new port; without the helpers attached, the same
default-deny policy lets the control connection through and blocks the data
channel; the helper firewall will not go in over the enforcer's rules; nothing
outlives the context managers: no server process, no temporary directory, no
phk-* chain. (Every client, mode and server through the helpers is in the APP
clauses' kernel-helpers column.)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

import pytest

from testbed.build import Testbed
from testbed.kernel_helpers import CHAIN_PREFIX, KernelHelperError, KernelHelperFirewall
from testbed.ledger import pids_in_namespace
from testbed.peers import (
    BIG_FILE,
    FTP_SERVERS,
    PEER_HOSTS,
    SMALL_FILE,
    FtpMode,
    FtpServer,
    FtpServerKind,
    PeerSet,
    TftpServer,
    TransferResult,
    ftp_transfer,
    tftp_transfer,
    tools_missing,
)
from testbed.plugin import require_e2e
from testbed.topology import FAMILIES, VARIANTS, Family, standard

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

S = TypeVar("S", FtpServer, TftpServer)
SERVER_PROGRAMS = re.compile(r"vsftpd|pyftpdlib|in\.tftpd")
NEGATIVE_TIMEOUT = 3.0  # seconds a blocked transfer gets before it must have failed


class PeerLab:
    """One testbed with the kernel-helper firewall in fw, and its servers (a PeerSet)."""

    def __init__(self, tb: Testbed) -> None:
        self.tb = tb
        self.fw: KernelHelperFirewall | None = None
        self.servers = PeerSet(tb)
        self.server_pids: set[int] = set()
        self.server_dirs: set[Path] = set()

    def firewall(self, helpers: bool = True) -> KernelHelperFirewall:
        """Make sure the firewall with (or without) helpers is the one installed."""
        if self.fw is not None and self.fw.helpers == helpers:
            return self.fw
        if self.fw is not None:
            self.fw.remove()
            self.fw = None
        fw = KernelHelperFirewall(self.tb, helpers=helpers)
        fw.install()
        self.fw = fw
        return fw

    def ftp_server(self, kind: FtpServerKind, family: Family) -> FtpServer:
        return self._seen(self.servers.ftp(family, kind))

    def tftp_server(self, family: Family) -> TftpServer:
        return self._seen(self.servers.tftp(family))

    def _seen(self, server: S) -> S:
        assert server.pid is not None and server.workdir is not None
        self.server_pids.add(server.pid)
        self.server_dirs.add(server.workdir)
        return server

    def close(self) -> None:
        """Stop every server, then remove the firewall."""
        try:
            self.servers.close()
        finally:
            if self.fw is not None:
                fw, self.fw = self.fw, None
                fw.remove()


@pytest.fixture(scope="module", params=VARIANTS)
def peers_lab(request: pytest.FixtureRequest) -> Iterator[PeerLab]:
    require_e2e()
    missing = tools_missing()
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (run 'make setup')")
    tb = Testbed.up(standard(request.param), tag="tests/e2e/test_peers.py")
    lab = PeerLab(tb)
    try:
        yield lab
    finally:
        try:
            lab.close()
        finally:
            tb.down()


def _udp_flows_from(tb: Testbed, address: str) -> set[tuple[str, str]]:
    """(source port, destination port) of the fw's UDP conntrack entries that ``address``
    opened (original direction)."""
    listing = tb.run("fw", ["conntrack", "-L", "-p", "udp", "--orig-src", address],
                     check=False).stdout
    found = (re.search(r"src=\S+ dst=\S+ sport=(\d+) dport=(\d+)", line)
             for line in listing.splitlines())
    return {(m.group(1), m.group(2)) for m in found if m is not None}


@pytest.mark.parametrize("af", FAMILIES)
def test_tftp_replies_come_from_a_new_port(peers_lab: PeerLab, af: Family) -> None:
    """The server answers from an ephemeral port, not 69: the fw saw (and let through,
    as an expected connection) a UDP flow the server started from another port."""
    peers_lab.firewall()
    server = peers_lab.tftp_server(af)
    before = _udp_flows_from(peers_lab.tb, server.address)
    r = tftp_transfer(peers_lab.tb, "c1", "atftp", server.address, "get", SMALL_FILE)
    assert r.ok, r.describe()
    new = _udp_flows_from(peers_lab.tb, server.address) - before
    assert new and all(sport != "69" for sport, _ in new), new


def test_without_helpers_data_channels_are_dropped(peers_lab: PeerLab) -> None:
    """The same policy without helper attachment: the control connection gets through
    (the server logs the PASV/EPSV), the data channel does not, and every client fails
    within its timeout; so does TFTP, whose replies come from a new port."""
    fw = peers_lab.firewall(helpers=False)
    assert "WITHOUT" in fw.describe()
    jobs: list[tuple[FtpServer | TftpServer, str, int]] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = []
        for af in FAMILIES:
            ftp = peers_lab.ftp_server("vsftpd", af)
            mode: FtpMode = "PASV" if af == "ipv4" else "EPSV"
            jobs.append((ftp, mode, ftp.log_mark()))
            futures.append(pool.submit(ftp_transfer, peers_lab.tb, "c1", "curl", ftp.address,
                                       mode, "get", BIG_FILE, NEGATIVE_TIMEOUT))
            tftp = peers_lab.tftp_server(af)
            jobs.append((tftp, "", 0))
            futures.append(pool.submit(tftp_transfer, peers_lab.tb, "c2", "tftp-hpa",
                                       tftp.address, "get", BIG_FILE, NEGATIVE_TIMEOUT))
        results: list[TransferResult] = [f.result() for f in futures]
    for (server, command, mark), r in zip(jobs, results, strict=True):
        assert not r.ok, "went through a default-deny fw without helpers:\n" + r.describe()
        assert r.elapsed < NEGATIVE_TIMEOUT + 3, r.describe()
        if isinstance(server, FtpServer):
            assert server.data_commands(since=mark) == [command], server.log_since(mark)
    # with the helpers attached again, the same download passes
    peers_lab.firewall(helpers=True)
    ftp = peers_lab.ftp_server("vsftpd", "ipv4")
    again = ftp_transfer(peers_lab.tb, "c1", "curl", ftp.address, "PASV", "get", SMALL_FILE)
    assert again.ok, again.describe()


def test_refuses_to_install_over_the_enforcer(peers_lab: PeerLab) -> None:
    peers_lab.close()
    tb = peers_lab.tb
    tb.run("fw", ["iptables", "-t", "raw", "-N", "PINHOLE-PREROUTING"])
    try:
        with pytest.raises(KernelHelperError, match="stop the enforcer"):
            KernelHelperFirewall(tb).install()
    finally:
        tb.run("fw", ["iptables", "-t", "raw", "-X", "PINHOLE-PREROUTING"])
    assert CHAIN_PREFIX not in tb.run("fw", ["iptables-save"]).stdout


def _server_processes(tb: Testbed, pgids: set[int]) -> list[str]:
    """Server programs running in the testbed's namespaces or in the given process groups
    (vsftpd's sessions run in network namespaces of their own)."""
    found = []
    pids = {pid for ns in tb.namespaces.values() for pid, _ in pids_in_namespace(ns)}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pgid = os.getpgid(int(entry.name))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
        if (int(entry.name) in pids or pgid in pgids) and SERVER_PROGRAMS.search(cmdline):
            found.append(f"{entry.name}: {cmdline.strip()[:120]}")
    return found


def test_nothing_is_left_behind(peers_lab: PeerLab) -> None:
    """Runs last in each variant: stopping the servers and removing the firewall leaves
    no server process, no server directory and no phk-* chain; an error inside a
    server's context cleans up just the same."""
    tb = peers_lab.tb
    for kind in FTP_SERVERS:  # every server kind has run at least once
        peers_lab.ftp_server(kind, "ipv4")
    peers_lab.tftp_server("ipv4")
    peers_lab.firewall()
    pgids, dirs = set(peers_lab.server_pids), set(peers_lab.server_dirs)
    peers_lab.close()
    with pytest.raises(RuntimeError, match="boom"), ExitStack() as stack:
        for kind in FTP_SERVERS:
            server = stack.enter_context(
                FtpServer(tb, PEER_HOSTS[kind], kind, tb.topology.address(PEER_HOSTS[kind], "ipv6")))
            assert server.pid is not None and server.workdir is not None
            pgids.add(server.pid)
            dirs.add(server.workdir)
        node = PEER_HOSTS["tftpd"]
        tftp = stack.enter_context(TftpServer(tb, node, tb.topology.address(node, "ipv6")))
        assert tftp.pid is not None and tftp.workdir is not None
        pgids.add(tftp.pid)
        dirs.add(tftp.workdir)
        stack.enter_context(KernelHelperFirewall(tb))
        raise RuntimeError("boom")
    assert _server_processes(tb, pgids) == []
    assert [d for d in dirs if d.exists()] == []
    rules = tb.run("fw", ["iptables-save"]).stdout + tb.run("fw", ["ip6tables-save"]).stdout
    assert CHAIN_PREFIX not in rules, rules
    assert tb.run("fw", ["conntrack", "-L", "expect"], check=False).stdout.strip() == ""
