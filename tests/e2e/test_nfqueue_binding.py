"""The enforcer's NFQUEUE binding (``enforcer.nfqueue``) against the kernel.

A throwaway network namespace (made here, always deleted) runs
``tests/e2e/nfqueue_probe.py``: UDP datagrams on lo, queued by iptables' NFQUEUE
target to queue 11. Each test reads its scenario's part of the probe's report.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from enforcer import nfqueue
from testbed.plugin import require_e2e

ROOT = Path(__file__).resolve().parents[2]
MARK_IN = 0x77  # the probe's mangle OUTPUT rule marks its datagrams so before the queue


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    require_e2e()
    namespace = f"pinhole-nfq-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        probe = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-m",
                                "tests.e2e.nfqueue_probe"], cwd=ROOT, capture_output=True, text=True,
                               timeout=60, check=False)
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=True)
    assert probe.returncode == 0, probe.stderr
    result: dict[str, Any] = json.loads(probe.stdout)
    return result


def scenario(report: dict[str, Any], name: str) -> dict[str, Any]:
    part: dict[str, Any] = report[name]
    assert "failed" not in part, part["failed"]
    return part


def test_accepted_packets_arrive_and_dropped_ones_do_not(report: dict[str, Any]) -> None:
    part = scenario(report, "accept_and_drop")
    assert [p["data"] for p in part["queued"]] == ["keep-1", "drop-1", "keep-2", "drop-2"]
    assert part["arrived"] == ["keep-1", "keep-2"]
    assert len(set(part["ids"])) == 4


def test_a_packet_reads_as_the_kernel_queued_it(report: dict[str, Any]) -> None:
    """Hook LOCAL_OUT, the mark set before the queue, no input device; a local UDP send
    on lo has a partial checksum, which the GSO flag leaves so."""
    first = scenario(report, "accept_and_drop")["queued"][0]
    assert first == {"hook": 3, "mark": MARK_IN, "indev": 0, "length": 34, "payload_length": 34,
                     "data": "keep-1", "checksum_ready": False, "gso": False}


def test_a_packet_queued_at_input_names_its_device(report: dict[str, Any]) -> None:
    part = scenario(report, "input_hook")
    [packet] = part["queued"]
    assert (packet["hook"], packet["indev"], packet["mark"]) == (1, part["lo"], 0)
    assert part["arrived"] == ["inbound"]


def test_a_verdicts_mark_is_set_on_the_packet(report: dict[str, Any]) -> None:
    """A later rule matching the verdict's mark counts the three so marked, not the others."""
    part = scenario(report, "marks")
    assert part == {"counted": 3, "arrived": 5}


def test_a_verdicts_payload_is_what_the_receiver_gets(report: dict[str, Any]) -> None:
    """New content of another length with complete checksums arrives; a payload whose UDP
    checksum is wrong is dropped by the receiving stack (the kernel takes a verdict's
    payload as it is: CHECKSUM_NONE)."""
    part = scenario(report, "payloads")
    assert part["queued"] == 2
    assert part["arrived"] == ["rewritten, longer than before"]
    assert part["checksum_errors"] == 1


def test_a_full_batch_of_verdicts_is_sent_whatever_the_default_send_buffer(
        report: dict[str, Any]) -> None:
    """The socket's send buffer is the one the queue forces (the kernel doubles it), not
    net.core.wmem_default's, which may be smaller than a batch (netlink would refuse it
    whole: EMSGSIZE); more verdicts than a batch all arrive."""
    part = scenario(report, "full_batches")
    assert part["send_buffer"] == 2 * nfqueue.SEND_BUFFER
    assert (part["queued"], part["arrived"], part["verdict_errors"]) == (120, 120, 0)


def test_with_gso_a_gso_send_is_one_packet_and_without_it_the_segments(report: dict[str, Any]) -> None:
    part = scenario(report, "gso")
    [whole] = part["on"]["queued"]
    assert (whole["gso"], whole["checksum_ready"], whole["length"], whole["payload_length"]) == \
        (True, False, 4028, 4028)
    assert part["on"]["arrived"] == [1000] * 4
    segments = part["off"]["queued"]
    assert [(s["gso"], s["checksum_ready"], s["length"]) for s in segments] == [(False, True, 1028)] * 4
    assert part["off"]["arrived"] == [1000] * 4


def test_a_udp_gso_packets_new_payload_keeps_a_partial_checksum(report: dict[str, Any]) -> None:
    """The kernel makes each segment's checksum from the super-packet's field: new
    content with the pseudo-header sum there arrives as four segments; with a complete
    checksum there, none does."""
    part = scenario(report, "gso_payload")
    assert part["partial"] == {"queued_gso": [True], "arrived": [[1000, "P"]] * 4}
    assert part["complete"] == {"queued_gso": [True], "arrived": []}


def test_a_packet_longer_than_the_copy_range_is_read_truncated_with_its_length(
        report: dict[str, Any]) -> None:
    part = scenario(report, "truncated")
    [packet] = part["queued"]
    assert (packet["payload_length"], packet["length"]) == (64, 528)
    assert part["arrived"] == [500]  # accepting it sends all of it


def test_binding_a_bound_queue_fails_with_a_clear_error(report: dict[str, Any]) -> None:
    error = scenario(report, "second_bind")["error"]
    assert error is not None and "NFQUEUE 11" in error and "already bound by another socket" in error


def test_an_overflow_is_counted_not_raised(report: dict[str, Any]) -> None:
    """200 datagrams into a receive buffer that holds a few: receive() counts the ENOBUFS
    and returns what was delivered. Fail-closed, the kernel dropped the rest; fail-open
    (NFQA_CFG_F_FAIL_OPEN), it accepted them unseen."""
    part = scenario(report, "overflow")
    closed, opened = part["fail_closed"], part["fail_open"]
    assert closed["overflows"] >= 1 and 0 < closed["read"] < 200
    assert closed["arrived"] == closed["read"] and closed["user_dropped"] == 200 - closed["read"]
    assert opened["overflows"] >= 1 and 0 < opened["read"] < 200
    assert opened["arrived"] == 200 and opened["user_dropped"] == 0


def test_a_refused_verdict_is_counted(report: dict[str, Any]) -> None:
    assert scenario(report, "refused_verdict") == {"verdict_errors": 1, "packets": 0}


def test_close_unbinds_and_is_idempotent(report: dict[str, Any]) -> None:
    assert scenario(report, "close_unbinds") == {"listed_while_bound": True, "listed_after_close": False,
                                                 "rebound": True}
