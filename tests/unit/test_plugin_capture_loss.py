"""The pytest plugin and a fw capture that lost packets (tcpdump's "dropped by kernel"): a
check that passed on what the capture did not show fails; one that passed on packets it
found stands; one that failed says the loss beside why. The capture is a stand-in (no root)."""

from __future__ import annotations

import pytest

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
