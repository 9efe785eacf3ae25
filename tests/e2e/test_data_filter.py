"""A data filter on a user-mode flow changes the byte stream both ways; TCP keeps working."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from enforcer.client import Client, Flags
from enforcer.core.results import InvalidArgument
from testbed.build import Testbed
from testbed.clauses.helpers import assert_echoed
from testbed.lab import GUIDS, EnforcerProcess
from testbed.plugin import require_e2e
from testbed.topology import standard

DATA_FILTERS = {"shout": "tests.e2e.shout_filter:Shout", "brittle": "tests.e2e.shout_filter:Brittle"}


@pytest.fixture(scope="module", params=["routed", "nat"])
def filtering(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[Testbed, EnforcerProcess]]:
    require_e2e()
    with Testbed.up(standard(request.param), tag="test-data-filter") as tb:
        enforcer = EnforcerProcess(tb, tmp_path_factory.mktemp("filter"),
                                   data_filters=DATA_FILTERS)
        enforcer.start()
        try:
            yield tb, enforcer
        finally:
            enforcer.stop()


@pytest.mark.parametrize("how", ["allow-future-connect", "redirect"])
def test_filtered_flow_carries_changed_bytes_both_ways(filtering: tuple[Testbed, EnforcerProcess],
                                                       how: str) -> None:
    """Through a grant, or through a redirect (the data filter makes it a user-mode one:
    the enforcer both rewrites the addresses and edits the stream)."""
    tb, enforcer = filtering
    c1, s1 = tb.agent("c1"), tb.agent("s1")
    server = "198.51.100.21"
    with s1.tcp_server(server, 21):
        assert c1.tcp_connect(server, 21, send_bytes=10)["connected"]  # c1's session
    with Client(str(enforcer.socket)) as api, s1.tcp_server(server, 32001) as echo:
        session = api.call("sessions")[0]["id"]
        if how == "redirect":
            (address, port), (action,) = api.redirect_connections(
                session, [(server, 32001)], protocol_guid=GUIDS["FTP"], data_filter="shout")
            assert action.info()["redirect"]["mode"] == "user"
        else:
            address, port = server, 32001
            action = api.allow_future_connect(session, (server, 32001), protocol_guid=GUIDS["FTP"],
                                              data_filter="shout")
        with c1.tcp_open(address, port) as conn:
            assert conn.connected, conn.error
            # several rounds: every one shifts sequence numbers further, both ways
            for n in (10, 125, 60, 125):
                sent = b"ping----" * n
                back = conn.talk(sent, expect=len(b"PONG?----") * n)
                assert back == b"PONG?----" * n, back[:80]
            # the data after the filter's last change still flows in order
            assert_echoed(conn.exchange(100_000), 100_000, "the filtered flow")
        stats = echo.stats()
        assert stats["bytes_in"] == len(b"PONG!!----") * 320 + 100_000
    (flow,) = [f for f in enforcer.call("flows") if f["action"] == action.id]
    assert flow["mode"] == "user" and flow["data_filter"] == "shout"
    assert flow["redirect"] == (None if how != "redirect" else [address, port])


def test_a_flow_whose_data_filter_fails_ends_and_passes_nothing_more(
        filtering: tuple[Testbed, EnforcerProcess]) -> None:
    """Rule 18: the filter passes "hello", then raises on "secret". Neither "secret" nor
    anything after it reaches the server or comes back, either way (the enforcer drops
    every packet of the flow, and counts them), and the enforcer goes on."""
    tb, enforcer = filtering
    c1, s1 = tb.agent("c1"), tb.agent("s1")
    server = "198.51.100.21"
    with s1.tcp_server(server, 21):
        assert c1.tcp_connect(server, 21, send_bytes=10)["connected"]  # c1's session
    before = enforcer.call("status")["counters"]
    with Client(str(enforcer.socket)) as api, s1.tcp_server(server, 32003) as echo:
        session = next(s["id"] for s in api.call("sessions") if s["client"] == "192.0.2.11")
        api.allow_future_connect(session, (server, 32003), protocol_guid=GUIDS["FTP"],
                                 data_filter="brittle")
        with c1.tcp_open(server, 32003) as conn:
            assert conn.connected, conn.error
            assert conn.talk(b"hello", expect=5) == b"hello"
            assert conn.talk(b"secret", expect=6, timeout=2) == b""
            assert conn.talk(b"after", expect=11, timeout=2) == b""
        assert echo.stats()["bytes_in"] == 5
    (flow,) = [f for f in enforcer.call("flows") if f["flow"].endswith(":32003")]
    assert flow["filter_failed"] and flow["buffered"] == 0, flow
    after = enforcer.call("status")["counters"]
    grew = {k: after.get(k, 0) - before.get(k, 0)
            for k in ("filters failed: flows ended", "dropped: its flow's filter failed")}
    assert grew["filters failed: flows ended"] == 1, grew
    assert grew["dropped: its flow's filter failed"] >= 2, grew  # "secret", sent again, "after"
    assert "data filter 'brittle'" in enforcer.log_path.read_text()
    assert enforcer.running


def test_unknown_or_udp_data_filter_is_an_invalid_argument(filtering: tuple[Testbed, EnforcerProcess]
                                                           ) -> None:
    tb, enforcer = filtering
    with tb.agent("s1").tcp_server("198.51.100.21", 21):  # c1's session: a primary opens it
        assert tb.agent("c1").tcp_connect("198.51.100.21", 21, send_bytes=10)["connected"]
    with Client(str(enforcer.socket)) as api:
        session = next(s["id"] for s in api.call("sessions") if s["client"] == "192.0.2.11")
        with pytest.raises(InvalidArgument, match="no data filter 'nope'"):
            api.allow_future_connect(session, ("198.51.100.21", 32002), protocol_guid=GUIDS["FTP"],
                                     data_filter="nope")
        with pytest.raises(InvalidArgument, match="for TCP flows"):
            api.allow_future_connect(session, ("198.51.100.21", 32002), protocol_guid=GUIDS["FTP"],
                                     protocol="udp", data_filter="shout", flags=Flags(0))


def test_liberal_tcp_tracking_is_restored_on_exit(tmp_path: Path) -> None:
    require_e2e()
    with Testbed.up(standard("routed"), tag="test-data-filter") as tb:
        knob = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"
        enforcer = EnforcerProcess(tb, tmp_path, data_filters=DATA_FILTERS)
        enforcer.start()
        assert tb.run("fw", ["cat", knob]).stdout.strip() == "1"
        enforcer.stop()
        assert tb.run("fw", ["cat", knob]).stdout.strip() == "0"
