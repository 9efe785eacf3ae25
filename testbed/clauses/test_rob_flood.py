"""ROB-01: hostile volume. While one client floods the fw (new-flow SYNs, TFTP requests, PORT
lines, grant calls, all at once), another client's admitted connections all open, and
their first SYNs are not delayed more than 50 ms beyond the same run without the flood."""

from __future__ import annotations

import pytest

from enforcer.client import Flags
from testbed.clauses.helpers import FTP_GUID
from testbed.flood import VICTIM_PORT, Flood, first_syn_delays, kernel_refusals
from testbed.plugin import Net

CONNECTIONS = 100
ALLOWED_EXTRA_DELAY = 0.050  # seconds, at the 99th percentile


@pytest.mark.clause("ROB-01")
def test_another_clients_connections_open_promptly_under_a_flood(filtering: Net) -> None:
    """c2 floods: 20,000 new-flow SYNs, 2,000 TFTP requests, 5,000 PORT lines and 10,000
    grant calls. c1's 100 connections under an ALLOW_MULTIPLE grant all open, and their
    first SYNs' p99 delay through the fw stays within 50 ms of a run without the flood."""
    net = filtering
    with net.client() as api:
        grant = api.allow_future_connect(net.session("c1"), (net.addr("s1"), VICTIM_PORT),
                                         protocol_guid=FTP_GUID, flags=Flags.ALLOW_MULTIPLE)
        quiet = first_syn_delays(net, "c1", "s1", CONNECTIONS)
        before, refused_before = net.call("status")["counters"], kernel_refusals(net)
        with Flood(net, "c2", "s1") as flood:
            loud = first_syn_delays(net, "c1", "s1", CONNECTIONS)
            overlapped = flood.running
        after, refused = net.call("status")["counters"], kernel_refusals(net) - refused_before
        grant.cancel()
    print(f"\nROB-01 {net.lab.variant}/{net.family}: without the flood {quiet.summary()}; "
          f"under it {loud.summary()}; flood: {flood.counts.summary()}")
    assert not flood.counts.errors, flood.counts.errors
    assert overlapped, "the flood was over before the measured connections were"
    assert quiet.opened == loud.opened == CONNECTIONS, (quiet.summary(), loud.summary())
    assert len(quiet.seconds) == len(loud.seconds) == CONNECTIONS, "not every first SYN was timed"
    assert loud.p99 <= quiet.p99 + ALLOWED_EXTRA_DELAY, \
        f"under the flood, p99 {loud.p99 * 1e3:.1f} ms vs {quiet.p99 * 1e3:.1f} ms without"
    # the flood was real: every kind was sent in full and the enforcer saw it
    assert (flood.counts.syns, flood.counts.tftp_requests, flood.counts.port_lines,
            flood.counts.grant_calls) == (20_000, 2_000, 5_000, 10_000), flood.counts.summary()
    # every new flow of the flood was either decided by the enforcer or refused by the
    # kernel for being beyond c2's caps (a few of c2's SYNs may be lost in the kernel, so
    # most, not all, are counted)
    decided = sum(after.get(k, 0) - before.get(k, 0) for k in ("drop", "admit-kernel", "admit-user"))
    print(f"the enforcer decided {decided} new flows; the kernel refused {refused} beyond c2's caps")
    assert decided > 100 and decided + refused >= 0.9 * (20_000 + 2_000), (decided, refused)
    assert flood.counts.grants_refused > 0, "no grant call reached a cap"
