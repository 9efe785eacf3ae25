"""The FTP and TFTP application filters against a recording fake of the session API: what
each line opens, how it is rewritten, and that split, malformed or hostile input opens
nothing wrong and raises nothing."""

from __future__ import annotations

import ipaddress
import itertools
import logging
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.client import Action, Flags, SessionCalls
from enforcer.core.results import PolicyRulesDenied
from enforcer.filters import Direction, Primary
from enforcer.plugins.ftp import (
    DATA_CONNECTIONS_PER_SEGMENT,
    FTP_GUID,
    MAX_LINE,
    FtpControl,
    FtpFilter,
    parse_eprt,
    parse_epsv_reply,
    parse_host_port,
)
from enforcer.plugins.refusals import LOGGED_REFUSALS
from enforcer.plugins.tftp import TFTP_GUID, TftpFilter, parse_request

ip = ipaddress.ip_address
C1, S1, S2 = ip("192.0.2.11"), ip("198.51.100.21"), ip("198.51.100.22")
C1_6, S1_6 = ip("2001:db8:1::11"), ip("2001:db8:2::21")
FW_INT, FW_EXT = "192.0.2.1", "198.51.100.1"
OUT, BACK = Direction.OUT, Direction.BACK


class FakeApi(SessionCalls):
    """Records the calls; answers as a NAT or routed fw would."""

    def __init__(self, nat: bool = False, binds: list[dict[str, Any]] | None = None,
                 fail: Exception | None = None) -> None:
        self.nat = nat
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.existing = binds or []
        self.fail = fail

    def call(self, method: str, **params: Any) -> Any:
        self.calls.append((method, params))
        if self.fail is not None and method != "binds":
            raise self.fail
        if method == "allow_future_connect":
            return {"action": len(self.calls)}
        if method == "redirect_connections":
            return {"internal_address": [FW_INT, 63000], "actions": [{"action": len(self.calls)}]}
        if method == "bind_for_client":
            return {"address": [FW_EXT if self.nat else str(C1), 40000 if self.nat else
                                params["client_port"]]}
        if method == "retroactive_allow_bind":
            return {"result": "S_OK"}
        if method == "binds":
            return self.existing
        raise AssertionError(f"unexpected call {method}")

    def opened(self) -> list[tuple[str, dict[str, Any]]]:
        return [(m, p) for m, p in self.calls if m != "binds"]


def control(*, nat: bool = False, via: bool = False, firewall_client: bool = False, v6: bool = False,
            api: FakeApi | None = None) -> tuple[FtpControl, FakeApi]:
    api = api or FakeApi(nat=nat)
    client, server = (C1_6, S1_6) if v6 else (C1, S1)
    primary = Primary(7, "tcp", (client, 40100), (server, 21), translated=nat or via,
                      firewall_client=firewall_client,
                      via=(ip(FW_INT), 63100) if via else None)
    made = FtpFilter().attach(primary, api)
    assert isinstance(made, FtpControl)
    return made, api


# --- parsing ---------------------------------------------------------------------------------

def test_parsers() -> None:
    assert parse_host_port(b"198,51,100,21,78,52") == (S1, 78 * 256 + 52)
    assert parse_host_port(b"Entering Passive Mode (198,51,100,21,0,21).") == (S1, 21)
    for bad in (b"198,51,100,21,0,0", b"256,1,1,1,1,1", b"1,2,3,4,5", b"", b"a,b,c,d,e,f"):
        assert parse_host_port(bad) is None, bad
    assert parse_eprt(b"|1|192.0.2.11|40000|") == (C1, 40000)
    assert parse_eprt(b"!2!2001:db8:1::11!40000!") == (C1_6, 40000)
    for bad in (b"|1|2001:db8:1::11|40000|", b"|2|192.0.2.11|1|", b"|1|192.0.2.11|0|",
                b"|1|192.0.2.11|70000|", b"|3|192.0.2.11|1|", b"|1|192.0.2.11|1", b"|1|x|1|",
                b" 1 192.0.2.11 1 ", b"|1|192.0.2.11|1|x", b"", b"|1|192.0.2.11|000040000|",
                b"|1|192.0.2.11|" + b"9" * 4400 + b"|"):  # (int() refuses over 4300 digits)
        assert parse_eprt(bad) is None, bad
    assert parse_epsv_reply(b"229 Entering Extended Passive Mode (|||6446|)\r\n") == 6446
    for bad in (b"229 (|||0|)", b"229 (||6446|)", b"229 (|||99999|)", b"229 nothing"):
        assert parse_epsv_reply(bad) is None, bad


# --- passive ---------------------------------------------------------------------------------

def test_pasv_routed_allows_the_server_address_and_passes_the_reply() -> None:
    ftp, api = control()
    reply = b"227 Entering Passive Mode (198,51,100,21,78,52).\r\n"
    assert ftp.on_data(BACK, reply) == reply
    assert api.opened() == [("allow_future_connect", {
        "session": 7, "address": str(S1), "port": 78 * 256 + 52, "protocol": "tcp",
        "flags": ["TIMEOUT"], "protocol_guid": FTP_GUID, "proxy_external_address": None,
        "filter": None, "context": None, "data_filter": None})]


def test_epsv_allows_the_control_peer() -> None:
    ftp, api = control(v6=True)
    reply = b"229 Entering Extended Passive Mode (|||6446|)\r\n"
    assert ftp.on_data(BACK, reply) == reply
    assert [(m, p["address"], p["port"]) for m, p in api.opened()] == \
        [("allow_future_connect", str(S1_6), 6446)]


def test_nat_without_redirected_control_connection_uses_allow_future_connect() -> None:
    """The client reached the server itself (SNAT): PASV's address is the server's and stays."""
    ftp, api = control(nat=True)
    reply = b"227 Entering Passive Mode (198,51,100,21,78,52).\r\n"
    assert ftp.on_data(BACK, reply) == reply
    assert [m for m, _ in api.opened()] == ["allow_future_connect"]


def test_via_the_fw_pasv_and_epsv_are_redirected_and_rewritten() -> None:
    ftp, api = control(via=True)
    assert ftp.on_data(BACK, b"227 Entering Passive Mode (198,51,100,21,78,52).\r\n") == \
        b"227 Entering Passive Mode (192,0,2,1,246,24).\r\n"  # 63000 = 246 * 256 + 24
    assert ftp.on_data(BACK, b"229 Entering Extended Passive Mode (|||6446|)\r\n") == \
        b"229 Entering Extended Passive Mode (|||63000|)\r\n"
    assert [(m, p["addresses"]) for m, p in api.opened()] == [
        ("redirect_connections", [[str(S1), 78 * 256 + 52]]),
        ("redirect_connections", [[str(S1), 6446]])]
    assert all(p["flags"] == ["TIMEOUT"] and p["protocol_guid"] == FTP_GUID for _, p in api.opened())


# --- active ----------------------------------------------------------------------------------

def test_port_routed_binds_the_clients_port_for_the_server_alone() -> None:
    ftp, api = control()
    command = b"PORT 192,0,2,11,156,64\r\n"  # 40000
    assert ftp.on_data(OUT, command) == command
    assert api.opened() == [
        ("bind_for_client", {"session": 7, "protocol": "tcp", "client_port": 40000,
                             "from_fw": False}),
        ("retroactive_allow_bind", {"session": 7, "protocol": "tcp", "address": str(C1),
                                    "port": 40000, "protocol_guid": FTP_GUID, "flags": [],
                                    "ipfilter": {"ranges": [[str(S1), str(S1)]]}})]


def test_port_and_eprt_in_nat_name_the_fws_bind() -> None:
    ftp, api = control(nat=True)
    assert ftp.on_data(OUT, b"PORT 192,0,2,11,156,64\r\n") == b"PORT 198,51,100,1,156,64\r\n"
    assert ftp.on_data(OUT, b"EPRT |1|192.0.2.11|40000|\r\n") == b"EPRT |1|198.51.100.1|40000|\r\n"
    approvals = [p for m, p in api.opened() if m == "retroactive_allow_bind"]
    assert [(p["address"], p["port"]) for p in approvals] == [(FW_EXT, 40000)] * 2
    assert [p["from_fw"] for m, p in api.opened() if m == "bind_for_client"] == [False] * 2


def test_via_the_fw_the_servers_data_connection_reaches_the_client_from_the_fw() -> None:
    """A client that sees only the fw (its control connection came by a redirect): the bind
    for PORT/EPRT asks that the server's connection reach it from the fw too (APP-FTP-03)."""
    ftp, api = control(nat=True, via=True)
    assert ftp.on_data(OUT, b"PORT 192,0,2,11,156,64\r\n") == b"PORT 198,51,100,1,156,64\r\n"
    assert ftp.on_data(OUT, b"EPRT |1|192.0.2.11|40000|\r\n") == b"EPRT |1|198.51.100.1|40000|\r\n"
    assert [p for m, p in api.opened() if m == "bind_for_client"] == [
        {"session": 7, "protocol": "tcp", "client_port": 40000, "from_fw": True}] * 2


def test_eprt_ipv6_routed() -> None:
    ftp, api = control(v6=True)
    command = b"EPRT |2|2001:db8:1::11|40001|\r\n"
    assert ftp.on_data(OUT, command) == command
    assert api.opened()[0] == ("bind_for_client", {"session": 7, "protocol": "tcp",
                                                   "client_port": 40001, "from_fw": False})


def test_firewall_client_port_names_its_socks_bind() -> None:
    bind = {"protocol": "tcp", "state": "pending", "address": [FW_EXT, 20001]}
    ftp, api = control(firewall_client=True, nat=True,
                       api=FakeApi(nat=True, binds=[bind]))
    command = b"PORT 198,51,100,1,78,33\r\n"  # 20001
    assert ftp.on_data(OUT, command) == command
    assert api.opened() == [("retroactive_allow_bind", {
        "session": 7, "protocol": "tcp", "address": FW_EXT, "port": 20001,
        "protocol_guid": FTP_GUID, "flags": [], "ipfilter": {"ranges": [[str(S1), str(S1)]]}})]
    # an address that is no bind of its: nothing
    ftp2, api2 = control(firewall_client=True, nat=True, api=FakeApi(nat=True, binds=[bind]))
    ftp2.on_data(OUT, b"PORT 198,51,100,1,78,34\r\n")
    assert api2.opened() == []


# --- anti-bounce -----------------------------------------------------------------------------

@pytest.mark.parametrize("direction,line", [
    (OUT, b"PORT 192,0,2,12,156,64\r\n"),                # another client
    (OUT, b"PORT 198,51,100,22,0,25\r\n"),               # a third-party server
    (OUT, b"EPRT |1|198.51.100.22|25|\r\n"),
    (BACK, b"227 Entering Passive Mode (198,51,100,22,0,25).\r\n"),
    (BACK, b"227 Entering Passive Mode (192,0,2,12,0,22).\r\n"),
])
@pytest.mark.parametrize("nat", [False, True])
def test_third_party_addresses_open_nothing(direction: Direction, line: bytes, nat: bool) -> None:
    ftp, api = control(nat=nat, via=nat)
    assert ftp.on_data(direction, line) == line
    assert api.opened() == []


# --- rule 14: data ports ---------------------------------------------------------------------

def _port_line(port: int) -> bytes:
    return b"PORT 192,0,2,11,%d,%d\r\n" % (port >> 8, port & 255)


def _pasv_reply(port: int) -> bytes:
    return b"227 Entering Passive Mode (198,51,100,21,%d,%d).\r\n" % (port >> 8, port & 255)


# verb -> (direction, the line naming a port, IPv6)
DATA_PORT_LINES = {
    "PORT": (OUT, _port_line, False),
    "EPRT": (OUT, lambda port: b"EPRT |1|192.0.2.11|%d|\r\n" % port, False),
    "EPRT-ipv6": (OUT, lambda port: b"EPRT |2|2001:db8:1::11|%d|\r\n" % port, True),
    "PASV": (BACK, _pasv_reply, False),
    "EPSV": (BACK, lambda port: b"229 Entering Extended Passive Mode (|||%d|)\r\n" % port, False),
    "EPSV-ipv6": (BACK, lambda port: b"229 Entering Extended Passive Mode (|||%d|)\r\n" % port, True),
}
# routed; NAT (the client reached the server itself); NAT with the control connection
# redirected by the fw (the client sees only the fw)
TOPOLOGIES = {"routed": (False, False), "nat": (True, False), "nat-via-fw": (True, True)}


def _opened_port(method: str, params: dict[str, Any]) -> int:
    if method == "redirect_connections":
        return int(params["addresses"][0][1])
    return int(params.get("client_port", params.get("port")))


@pytest.mark.parametrize("port", [0, 1, 21, 22, 1023])
@pytest.mark.parametrize("verb", DATA_PORT_LINES)
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_a_privileged_data_port_opens_nothing(topology: str, verb: str, port: int) -> None:
    """PORT/EPRT/PASV/EPSV naming a port below 1024 open nothing and pass unchanged, as
    a third party's address does (port 0 is malformed and opens nothing either)."""
    direction, line_of, v6 = DATA_PORT_LINES[verb]
    nat, via = TOPOLOGIES[topology]
    ftp, api = control(nat=nat, via=via, v6=v6)
    line = line_of(port)
    assert ftp.on_data(direction, line) == line
    assert api.opened() == [] and ftp.opened == []


@pytest.mark.parametrize("verb", DATA_PORT_LINES)
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_the_first_unprivileged_data_port_opens(topology: str, verb: str) -> None:
    direction, line_of, v6 = DATA_PORT_LINES[verb]
    nat, via = TOPOLOGIES[topology]
    ftp, api = control(nat=nat, via=via, v6=v6)
    ftp.on_data(direction, line_of(1024))
    opened = api.opened()
    assert opened and _opened_port(*opened[0]) == 1024
    assert len(ftp.opened) == 1


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(DATA_PORT_LINES)), st.sampled_from(list(TOPOLOGIES)),
       st.integers(0, 65535))
def test_a_data_port_opens_if_and_only_if_it_is_unprivileged(verb: str, topology: str,
                                                             port: int) -> None:
    direction, line_of, v6 = DATA_PORT_LINES[verb]
    nat, via = TOPOLOGIES[topology]
    ftp, api = control(nat=nat, via=via, v6=v6)
    ftp.on_data(direction, line_of(port))
    assert bool(ftp.opened) == (port >= 1024)
    assert not api.opened() or _opened_port(*api.opened()[0]) == port


def test_a_firewall_client_s_bind_on_a_privileged_port_is_not_approved() -> None:
    """A Firewall client names its SOCKS bind: one on a privileged port (which the
    enforcer never hands out) is not approved either."""
    bind = {"protocol": "tcp", "state": "pending", "address": [FW_EXT, 1023]}
    ftp, api = control(firewall_client=True, nat=True, api=FakeApi(nat=True, binds=[bind]))
    command = b"PORT 198,51,100,1,3,255\r\n"
    assert ftp.on_data(OUT, command) == command
    assert api.opened() == []


def test_api_refusal_passes_the_line_unchanged() -> None:
    api = FakeApi(fail=PolicyRulesDenied("no"))
    ftp, _ = control(via=True, api=api)
    reply = b"227 Entering Passive Mode (198,51,100,21,78,52).\r\n"
    assert ftp.on_data(BACK, reply) == reply
    assert ftp.on_data(OUT, b"PORT 192,0,2,11,156,64\r\n") == b"PORT 192,0,2,11,156,64\r\n"
    assert ftp.opened == []
    assert [m for m, _ in api.calls if m != "binds"] == ["redirect_connections", "bind_for_client"]


def test_a_flood_of_refused_commands_is_logged_the_first_times_only(
        caplog: pytest.LogCaptureFixture) -> None:
    """A segment of hundreds of PORT lines at a cap: each is refused and passes as it came,
    and the enforcer writes LOGGED_REFUSALS lines for the connection, not one a command."""
    api = FakeApi(fail=PolicyRulesDenied("at the cap"))
    ftp, _ = control(api=api)
    lines = b"".join(b"PORT 192,0,2,11,%d,%d\r\n" % divmod(20000 + i, 256) for i in range(250))
    with caplog.at_level(logging.INFO, logger="pinhole"):
        assert ftp.on_data(OUT, lines) == lines
    assert ftp.refusals == 250  # the first DATA_CONNECTIONS_PER_SEGMENT by the API
    assert len(api.opened()) == DATA_CONNECTIONS_PER_SEGMENT
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == LOGGED_REFUSALS, logged
    assert all("cannot open the data connection to 192.0.2.11:" in m for m in logged)
    assert logged[-1].endswith("(this control connection's further refusals are not logged)")


@pytest.mark.parametrize("direction", ["commands", "replies"])
def test_a_segment_opens_a_bounded_number_of_data_connections(direction: str) -> None:
    """Hundreds of PORT commands (or 227 replies) in one segment: the first
    DATA_CONNECTIONS_PER_SEGMENT are acted on, the rest pass as they came and open nothing;
    the next segment may open as many again."""
    ftp, api = control()
    if direction == "commands":
        lines = [b"PORT 192,0,2,11,%d,%d\r\n" % divmod(20000 + i, 256) for i in range(100)]
        side, opening = OUT, "bind_for_client"
    else:
        lines = [b"227 Entering Passive Mode (198,51,100,21,%d,%d).\r\n" % divmod(20000 + i, 256)
                 for i in range(100)]
        side, opening = BACK, "allow_future_connect"

    def opened() -> int:
        return sum(method == opening for method, _ in api.opened())
    assert ftp.on_data(side, b"".join(lines)) == b"".join(lines)
    assert opened() == DATA_CONNECTIONS_PER_SEGMENT
    assert ftp.refusals == 100 - DATA_CONNECTIONS_PER_SEGMENT
    assert ftp.on_data(side, b"".join(lines[:3])) == b"".join(lines[:3])
    assert opened() == DATA_CONNECTIONS_PER_SEGMENT + 3


# --- split, long and malformed input ---------------------------------------------------------

SESSION = [
    (OUT, b"USER anonymous\r\n"), (BACK, b"331 Please specify the password.\r\n"),
    (OUT, b"PASV\r\n"), (BACK, b"227 Entering Passive Mode (198,51,100,21,78,52).\r\n"),
    (OUT, b"PORT 192,0,2,11,156,64\r\n"), (BACK, b"200 PORT command successful.\r\n"),
    (OUT, b"EPRT |1|192.0.2.11|40001|\r\n"), (BACK, b"229 Entering Extended Passive Mode (|||6446|)\r\n"),
]


def _run(ftp: FtpControl, pieces: list[tuple[Direction, bytes]]) -> dict[Direction, bytes]:
    out = {OUT: b"", BACK: b""}
    for direction, data in pieces:
        out[direction] += ftp.on_data(direction, data)
    return out


@settings(max_examples=150, deadline=None)
@given(st.data(), st.sampled_from([(False, False), (True, False), (True, True)]))
def test_lines_split_anywhere_open_and_rewrite_the_same(data: st.DataObject,
                                                        mode: tuple[bool, bool]) -> None:
    nat, via = mode
    whole, whole_api = control(nat=nat, via=via)
    expected = _run(whole, SESSION)
    split, split_api = control(nat=nat, via=via)
    pieces = []
    for direction, line in SESSION:
        cuts = sorted(data.draw(st.sets(st.integers(1, len(line) - 1), max_size=4)))
        bounds = [0, *cuts, len(line)]
        pieces += [(direction, line[a:b]) for a, b in itertools.pairwise(bounds)]
    assert _run(split, pieces) == expected
    assert split_api.opened() == whole_api.opened()
    assert len(whole_api.opened()) == 6  # AFC or RDC, bind + approval twice, AFC or RDC


def test_held_back_partial_line_is_released_with_its_end() -> None:
    ftp, _ = control(nat=True)
    assert ftp.on_data(OUT, b"PORT 192,0,2") == b""
    assert ftp.on_data(OUT, b",11,156,64\r\nNOOP") == b"PORT 198,51,100,1,156,64\r\n"
    assert ftp.on_data(OUT, b"\r\n") == b"NOOP\r\n"


def test_a_line_longer_than_max_line_passes_unparsed() -> None:
    ftp, api = control(nat=True)
    junk = b"X" * (MAX_LINE + 1)
    assert ftp.on_data(OUT, junk) == junk
    # the rest of that line passes too, even if it looks like a command
    assert ftp.on_data(OUT, b"PORT 192,0,2,11,156,64\r\n") == b"PORT 192,0,2,11,156,64\r\n"
    assert api.opened() == []
    assert ftp.on_data(OUT, b"PORT 192,0,2,11,156,64\r\n") == b"PORT 198,51,100,1,156,64\r\n"
    # the same whether the long line comes in pieces or whole: a command padded past
    # MAX_LINE passes unread, and opens nothing
    long = b"PORT " + b" " * MAX_LINE + b"192,0,2,11,156,64\r\n"
    for pieces in ([long], [long[:MAX_LINE // 2], long[MAX_LINE // 2:]]):
        ftp, api = control(nat=True)
        assert b"".join(ftp.on_data(OUT, piece) for piece in pieces) == long
        assert api.opened() == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([OUT, BACK]), st.binary(max_size=80)), max_size=12),
       st.sampled_from([(False, False), (True, False), (True, True)]))
def test_garbage_raises_nothing_and_opens_only_for_the_two_ends(
        pieces: list[tuple[Direction, bytes]], mode: tuple[bool, bool]) -> None:
    ftp, api = control(nat=mode[0], via=mode[1])
    _run(ftp, pieces)
    for method, params in api.opened():
        address = params.get("address") or params.get("addresses", [[None]])[0][0]
        if method == "bind_for_client":
            continue
        assert address in (str(S1), str(C1), FW_EXT), (method, params)


# --- cost: lines read one by one --------------------------------------------------------------

def _lines_read(ftp: FtpControl) -> list[bytes]:
    """The lines ftp reads one by one (in Python) from now on, as they are read."""
    read: list[bytes] = []
    for name in ("_command", "_reply"):
        handle = getattr(ftp, name)

        def spy(line: Any, handle: Any = handle) -> Any:
            read.append(line[0])
            return handle(line)
        setattr(ftp, name, spy)
    return read


SIXTY_FOUR_KIB = {
    "newlines": b"\n" * 65536,
    "commands": b"NOOP\r\n" * 10922 + b"NOP\n",
    "replies": b"200-FEAT\r\n" + b" 227 \r\n" * 9360 + b"200 x\n",
}


@pytest.mark.parametrize("data", SIXTY_FOUR_KIB.values(), ids=list(SIXTY_FOUR_KIB))
@pytest.mark.parametrize("direction", [OUT, BACK])
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_64_kib_of_short_lines_are_not_read_one_by_one(topology: str, direction: Direction,
                                                       data: bytes) -> None:
    """A segment (or a SOCKS read) of thousands of lines, none of them PORT, EPRT, 227 or
    229, is not cut into lines in Python: it passes as it came, and nothing is read alone."""
    assert len(data) == 65536
    nat, via = TOPOLOGIES[topology]
    ftp, api = control(nat=nat, via=via)
    handled = _lines_read(ftp)
    assert ftp.on_data(direction, data) == data
    assert ftp.on_data(direction, data) == data
    assert handled == [] and api.opened() == [] and ftp.refusals == 0


@pytest.mark.parametrize("direction", [OUT, BACK])
def test_a_segment_of_thousands_of_data_connections_reads_a_bounded_number(
        direction: Direction, caplog: pytest.LogCaptureFixture) -> None:
    """64 KiB of the shortest PORT commands (227 replies): the first
    DATA_CONNECTIONS_PER_SEGMENT are read, the rest are counted, refused in one log line,
    and pass as they came."""
    line = b"PORT\n" if direction is OUT else b"227 \n"
    data = line * (65536 // len(line))
    ftp, _ = control(nat=True)
    handled = _lines_read(ftp)
    with caplog.at_level(logging.INFO, logger="pinhole"):
        assert ftp.on_data(direction, data) == data
    assert handled == [line] * DATA_CONNECTIONS_PER_SEGMENT
    unread = len(data) // len(line) - DATA_CONNECTIONS_PER_SEGMENT
    assert ftp.refusals == unread
    assert [r.getMessage() for r in caplog.records] == [
        f"session 7: {unread} more data connections asked for in one segment than "
        f"{DATA_CONNECTIONS_PER_SEGMENT}: nothing opened for them (this control connection's "
        "further refusals are not logged)"]


@pytest.mark.parametrize("cut", [None, 5, 17])
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_a_port_or_pasv_among_thousands_of_lines_is_acted_on_as_alone(topology: str,
                                                                      cut: int | None) -> None:
    """PORT and a 227 reply amid thousands of other lines (and the line cut across two
    segments at ``cut``) open and are rewritten as each would alone, in its place."""
    nat, via = TOPOLOGIES[topology]
    for direction, line, others in (
            (OUT, b"PORT 192,0,2,11,156,64\r\n", b"NOOP\r\n"),
            (BACK, b"227 Entering Passive Mode (198,51,100,21,78,52).\r\n", b"211-x\r\n 227 \r\n")):
        alone, alone_api = control(nat=nat, via=via)
        rewritten = alone.on_data(direction, line)
        ftp, api = control(nat=nat, via=via)
        handled = _lines_read(ftp)
        before, after = others * 3000, others * 3000
        if cut is None:
            made = ftp.on_data(direction, before + line + after)
        else:
            made = ftp.on_data(direction, before + line[:cut]) + \
                ftp.on_data(direction, line[cut:] + after)
        assert made == before + rewritten + after
        assert api.opened() == alone_api.opened() and ftp.opened == alone.opened
        assert handled == [line]


_WORDS = [b"PORT", b"port", b"EPRT", b"ePrT", b"PORTS", b"PASV", b"227", b"229", b"227-", b"228",
          b"1,2,3,4,5,6", b"|1|192.0.2.11|40000|", b" ", b"  ", b"\t", b"\r", b"\x0b", b"\x0c", b"x"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_WORDS), max_size=5), max_size=12),
       st.sampled_from([OUT, BACK]))
def test_the_lines_read_are_those_the_verb_or_reply_code_names(words: list[list[bytes]],
                                                                direction: Direction) -> None:
    """The lines read alone are exactly these: a command whose first word (after white
    space, in any case, up to a space) is PORT or EPRT; a reply that starts 227 or 229
    and a space."""
    lines = [b"".join(line) + b"\n" for line in words]
    ftp, _ = control(nat=True)
    handled = _lines_read(ftp)
    ftp.on_data(direction, b"".join(lines))
    if direction is OUT:
        wanted = [line for line in lines
                  if line.strip().partition(b" ")[0].upper() in (b"PORT", b"EPRT")]
    else:
        wanted = [line for line in lines if line.startswith((b"227 ", b"229 "))]
    assert handled == wanted


# --- TFTP ------------------------------------------------------------------------------------

def rrq(name: bytes = b"f.bin", mode: bytes = b"octet", opcode: int = 1, extra: bytes = b"") -> bytes:
    return struct.pack("!H", opcode) + name + b"\0" + mode + b"\0" + extra


def test_tftp_requests_parse() -> None:
    assert parse_request(rrq()) == (1, b"f.bin", b"octet")
    assert parse_request(rrq(opcode=2, mode=b"NetASCII")) == (2, b"f.bin", b"netascii")
    assert parse_request(rrq(extra=b"blksize\x001428\x00")) == (1, b"f.bin", b"octet")
    for bad in (rrq(opcode=3), rrq(name=b""), rrq(mode=b"binary"), rrq()[:-1],
                rrq(extra=b"blksize\x00"), b"\x00\x01", b""):
        assert parse_request(bad) is None, bad


def test_tftp_request_binds_the_clients_port_for_the_server() -> None:
    """The bind is approved for the server alone, with BIDIRECTIONAL: the client answers
    the server's new port (ACKs for a read, DATA for a write), which a UDP bind without it
    would drop."""
    api = FakeApi(nat=True)
    flow = TftpFilter().attach(Primary(3, "udp", (C1, 40200), (S1, 69), translated=True,
                                       firewall_client=False), api)
    assert flow.on_data(OUT, rrq()) == rrq()
    assert api.opened() == [
        ("bind_for_client", {"session": 3, "protocol": "udp", "client_port": 40200,
                             "from_fw": False}),
        ("retroactive_allow_bind", {"session": 3, "protocol": "udp", "address": FW_EXT,
                                    "port": 40000, "protocol_guid": TFTP_GUID,
                                    "flags": ["BIDIRECTIONAL"],
                                    "ipfilter": {"ranges": [[str(S1), str(S1)]]}})]


@pytest.mark.parametrize("client_port", [1, 69, 1023])
def test_tftp_a_request_from_a_privileged_port_opens_nothing(client_port: int) -> None:
    api = FakeApi(nat=True)
    flow = TftpFilter().attach(Primary(3, "udp", (C1, client_port), (S1, 69), translated=True,
                                       firewall_client=False), api)
    assert flow.on_data(OUT, rrq()) == rrq()
    assert api.opened() == []
    from_1024 = TftpFilter().attach(Primary(3, "udp", (C1, 1024), (S1, 69), translated=True,
                                            firewall_client=False), api)
    from_1024.on_data(OUT, rrq())
    assert api.opened()[0] == ("bind_for_client", {"session": 3, "protocol": "udp",
                                                   "client_port": 1024, "from_fw": False})


@pytest.mark.parametrize("client_port,why", [
    (69, "session 3: a request from privileged port 69: its reply is not opened"),
    (40200, "session 3: cannot open the reply to 192.0.2.11:40200: at the cap")])
def test_tftp_a_flow_repeating_a_refused_request_is_logged_the_first_times_only(
        client_port: int, why: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every datagram of the flow reaches the filter, whatever the kernel's cap on new
    flows: 100 refused RRQs write LOGGED_REFUSALS lines, the first with its reason, and
    all are counted."""
    api = FakeApi(fail=PolicyRulesDenied("at the cap"))
    flow = TftpFilter().attach(Primary(3, "udp", (C1, client_port), (S1, 69), translated=False,
                                       firewall_client=False), api)
    with caplog.at_level(logging.INFO, logger="pinhole"):
        for _ in range(100):
            assert flow.on_data(OUT, rrq()) == rrq()
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == LOGGED_REFUSALS, logged
    assert logged[0] == why
    assert logged[-1] == why + " (this flow's further refusals are not logged)"
    assert flow.refusals == 100 and flow.opened == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_tftp_malformed_or_reply_data_opens_nothing(datagram: bytes) -> None:
    api = FakeApi()
    flow = TftpFilter().attach(Primary(3, "udp", (C1, 40200), (S1, 69), translated=False,
                                       firewall_client=False), api)
    assert flow.on_data(BACK, rrq()) == rrq()  # from the server: not a request
    flow.on_data(OUT, datagram)
    assert bool(api.opened()) == (parse_request(datagram) is not None)


def test_action_objects_come_back_from_the_api() -> None:
    api = FakeApi()
    action = api.allow_future_connect(1, ("198.51.100.21", 1), protocol_guid=FTP_GUID,
                                      flags=Flags.TIMEOUT)
    assert isinstance(action, Action) and action.client is api
