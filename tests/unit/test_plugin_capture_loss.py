"""The pytest plugin and a fw capture that lost packets (tcpdump's "dropped by kernel"): a
check that passed on what the capture did not show fails; one that passed on packets it
found stands; one that failed says the loss beside why. The capture is a stand-in (no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.plugin import capture_loss

pytest_plugins = ["pytester"]

CONFTEST = """
import types

import pytest

import testbed.capture


class LossyCapture:
    '''tcpdump as it stops, having lost 7 packets.'''

    dropped = 7

    def __init__(self, netns, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


testbed.capture.FwCapture = LossyCapture


@pytest.fixture
def lab():
    return types.SimpleNamespace(tb=types.SimpleNamespace(netns=lambda node: "fw"),
                                 firewall=None)
"""

CHECKS = """
from scapy.layers.inet import UDP

from testbed.capture import FwPackets
from testbed.checks import current_pcap, expect_no_packet


def test_nothing_came(lab):
    expect_no_packet(FwPackets(current_pcap(), "the fw, sent", lambda p: True), UDP, timeout=0)


def test_something_came(lab):
    pass


def test_it_failed(lab):
    raise AssertionError("the probe never reached the fw")
"""


def test_a_lost_packet_fails_a_check_that_concluded_from_an_absence(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    import testbed.capture
    monkeypatch.setattr(testbed.capture, "FwCapture", testbed.capture.FwCapture)  # restored after
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_lossy_capture_checks=CHECKS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--junitxml=junit.xml")
    result.assert_outcomes(passed=2, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_nothing_came*",
                                 "*lost 7 packets*concluded from what it did not show*"])
    junit = (pytester.path / "junit.xml").read_text()
    assert junit.count('name="pcap dropped" value="7"') == 3


def test_what_a_check_is_told_of_its_captures_losses() -> None:
    pcap = Path("fw.pcap")
    for failed in (False, True):
        for relied_on in (False, True):
            assert capture_loss(0, pcap, failed=failed, relied_on=relied_on) is None
    assert capture_loss(3, pcap, failed=False, relied_on=False) is None  # it found its packets
    assert "may be one of them" in str(capture_loss(3, pcap, failed=True, relied_on=False))
    assert "never came may be" in str(capture_loss(3, pcap, failed=False, relied_on=True))
    # tcpdump said nothing (killed): an absence cannot stand on it; a failure stays as it is
    assert "did not say" in str(capture_loss(None, pcap, failed=False, relied_on=True))
    assert capture_loss(None, pcap, failed=True, relied_on=True) is None
    assert capture_loss(None, pcap, failed=False, relied_on=False) is None
