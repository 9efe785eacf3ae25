"""enforcer.config: a TOML file to a Config, and every error naming file:line: reason."""

from __future__ import annotations

import ipaddress
import uuid
from pathlib import Path

import pytest

from enforcer.config import (
    DEFAULT_SOCKET,
    MAX_SOCKET_PATH,
    Config,
    ConfigError,
    DataplaneSettings,
    NetworkSettings,
    load,
    locate,
    parse,
)
from enforcer.core.limits import Limits
from enforcer.core.packet import TCP, UDP
from enforcer.core.policy import PortRange
from testbed import topology
from testbed.lab import GUIDS, lab_config

FILE = "pinhole.toml"
PORT_RANGE = "must be [low, high], ports from 1024 to 65535 with low <= high"

FULL = """\
# The whole thing.
[network]
internal_interfaces = ["int0", "int1"]
external_interfaces = ["ext0"]
nat = true

[dataplane]
queue = 7
fail_open = true
backend = "iptables"

[control]
socket = "/run/pinhole/test.sock"

[defaults]
permission_timeout = 2.5
max_pending_per_session = 16

[[protocol]]
name = "FTP"
guid = "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101"
ip_protocol = "tcp"
ports = [21]

[[protocol]]
name = "RANGE"
guid = "5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2102"
ip_protocol = "udp"
ports = [53, "5000-5010"]

[[protocol_rule]]
name = "clients"
action = "allow"
protocols = ["FTP", "RANGE"]
clients = ["192.0.2.0/24", "2001:db8:1::/64"]

[[protocol_rule]]
name = "admins"
action = "deny"
protocols = ["FTP"]
clients = ["0.0.0.0/0"]
users = ["root"]

[[site_rule]]
name = "servers"
action = "allow"
destinations = ["198.51.100.0/24", "2001:db8:2::/64"]
"""

MINIMAL = """\
[network]
internal_interfaces = ["int0"]
external_interfaces = ["ext0"]
"""


def test_full_config() -> None:
    cfg = parse(FULL, FILE)
    assert cfg.network == NetworkSettings(("int0", "int1"), ("ext0",), nat=True)
    assert cfg.dataplane == DataplaneSettings(queue=7, fail_open=True, backend="iptables")
    assert cfg.control_socket == "/run/pinhole/test.sock"
    p = cfg.policy
    assert p.defaults.permission_timeout == 2.5
    assert p.defaults.max_pending_per_session == 16
    assert [(x.name, x.ip_protocol, x.ports) for x in p.protocols] == [
        ("FTP", TCP, (PortRange(21, 21),)),
        ("RANGE", UDP, (PortRange(53, 53), PortRange(5000, 5010))),
    ]
    assert p.protocols[1].guid == uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2102")
    assert [r.name for r in p.protocol_rules] == ["clients", "admins"]
    assert p.protocol_rules[0].clients.networks == (ipaddress.ip_network("192.0.2.0/24"),
                                           ipaddress.ip_network("2001:db8:1::/64"))
    assert p.protocol_rules[1].users == frozenset({"root"})
    assert p.protocol_rules[1].allow is False
    assert p.site_rules[0].destinations.networks[1] == ipaddress.ip_network("2001:db8:2::/64")


def test_minimal_config_defaults() -> None:
    cfg = parse(MINIMAL)
    assert cfg.network.nat is False
    assert cfg.dataplane == DataplaneSettings(0, False, "auto")
    assert cfg.control_socket == DEFAULT_SOCKET
    assert cfg.policy.protocols == ()
    assert cfg.policy.defaults.permission_timeout == 60.0


def test_redirect_and_buffer_defaults() -> None:
    dp = parse(MINIMAL).dataplane
    assert dp.kernel_redirect_ports == (61000, 62999)
    assert dp.user_redirect_ports == (63000, 64999)
    assert dp.receive_buffer is None
    assert dp.increased_receive_buffer == 1 << 20  # more than Linux's default, 208 KiB
    assert DataplaneSettings() == dp
    # the defaults stay clear of Linux's ephemeral ports (32768-60999) and of each other
    assert 60999 < dp.kernel_redirect_ports[0] <= dp.kernel_redirect_ports[1] < dp.user_redirect_ports[0]


def test_redirect_ports_and_receive_buffer() -> None:
    cfg = parse(MINIMAL + "\n[dataplane]\nkernel_redirect_ports = [40000, 40009]\n"
                "user_redirect_ports = [40010, 40019]\nreceive_buffer = 1048576\n", FILE)
    assert cfg.dataplane == DataplaneSettings(0, False, "auto", (40000, 40009), (40010, 40019), 1048576)
    assert isinstance(cfg.dataplane.kernel_redirect_ports, tuple)


@pytest.mark.parametrize(("kernel", "user", "buffer"), [
    ((1024, 1024), (65535, 65535), 4096),          # the bounds, one port each
    ((50010, 50019), (50000, 50009), 2**30),       # user below kernel, adjacent
    ((50000, 50000), (50001, 50001), 1 << 20),
])
def test_redirect_ports_at_the_bounds(kernel: tuple[int, int], user: tuple[int, int], buffer: int) -> None:
    text = (MINIMAL + f"\n[dataplane]\nkernel_redirect_ports = [{kernel[0]}, {kernel[1]}]\n"
            f"user_redirect_ports = [{user[0]}, {user[1]}]\nreceive_buffer = {buffer}\n")
    dp = parse(text, FILE).dataplane
    assert (dp.kernel_redirect_ports, dp.user_redirect_ports, dp.receive_buffer) == (kernel, user, buffer)


def test_kernel_grants_are_on_unless_turned_off() -> None:
    assert parse(MINIMAL).dataplane.kernel_grants is True
    assert parse(MINIMAL + "\n[dataplane]\nkernel_grants = false\n", FILE).dataplane.kernel_grants is False
    assert "dataplane.kernel_grants" in config_error(MINIMAL + '\n[dataplane]\nkernel_grants = "no"\n')


@pytest.mark.parametrize("size", [65536, 2**30])
def test_increased_receive_buffer(size: int) -> None:
    dp = parse(MINIMAL + f"\n[dataplane]\nincreased_receive_buffer = {size}\n", FILE).dataplane
    assert dp.increased_receive_buffer == size


@pytest.mark.parametrize("size", [65535, 2**30 + 1])
def test_increased_receive_buffer_is_at_least_64_kib(size: int) -> None:
    message = config_error(MINIMAL + f"\n[dataplane]\nincreased_receive_buffer = {size}\n")
    assert "dataplane.increased_receive_buffer: must be from 65536 to 1073741824 bytes" in message


def test_one_redirect_range_given_keeps_the_other_default() -> None:
    dp = parse(MINIMAL + "\n[dataplane]\nuser_redirect_ports = [40000, 40099]\n", FILE).dataplane
    assert dp.user_redirect_ports == (40000, 40099)
    assert dp.kernel_redirect_ports == (61000, 62999)


def test_redirect_range_error_names_the_key() -> None:
    message = config_error(MINIMAL + "\n[dataplane]\nuser_redirect_ports = [2000, 1500]\n")
    assert f"dataplane.user_redirect_ports: {PORT_RANGE}" in message
    message = config_error(MINIMAL + "\n[dataplane]\nkernel_redirect_ports = [50000, 50100]\n"
                           "user_redirect_ports = [50050, 50200]\n")
    assert "dataplane.user_redirect_ports: must not overlap kernel_redirect_ports" in message
    message = config_error(MINIMAL + "\n[dataplane]\nreceive_buffer = 1\n")
    assert "dataplane.receive_buffer: must be from 4096" in message


def test_overlap_with_a_default_range_points_at_the_key_written() -> None:
    text = MINIMAL + "\n[dataplane]\nqueue = 1\nkernel_redirect_ports = [63500, 63600]  # <-\n"
    message = config_error(text)
    assert "overlap" in message
    assert message.startswith(f"{FILE}:{marked_line(text)}: "), message


def test_open_ports() -> None:
    """The fw's own services reachable from outside, lockdown included (rule 15)."""
    cfg = parse(MINIMAL + '\n[dataplane]\nopen_ports = ["tcp/22", "udp/67-68"]\n', FILE)
    assert cfg.dataplane.open_ports == ((6, (22, 22)), (17, (67, 68)))
    assert parse(MINIMAL).dataplane.open_ports == ()


@pytest.mark.parametrize("bad", ["22", "sctp/22", "tcp/0", "tcp/70000", "tcp/30-20", "tcp/22-", "tcp/ 22"])
def test_open_ports_errors_name_the_entry(bad: str) -> None:
    text = MINIMAL + f'\n[dataplane]\nopen_ports = ["tcp/80", "{bad}"]  # <-\n'
    message = config_error(text)
    where = f"{FILE}:{marked_line(text)}: dataplane.open_ports[1]"
    assert message.startswith(f"{where}: '{bad}' is not "), message


def test_limits_defaults_and_values() -> None:
    assert parse(MINIMAL).limits == Limits()
    cfg = parse(MINIMAL + "\n[limits]\nsessions_total = 10\nsession_idle_timeout = 2.5\n"
                "new_flows_per_second = 0\n", FILE)
    assert (cfg.limits.sessions_total, cfg.limits.session_idle_timeout) == (10, 2.5)
    assert cfg.limits.new_flows_per_second == 0 and cfg.limits.binds_total == Limits().binds_total


LIMITS_ERRORS = [
    ("sessions_total = 0", "limits.sessions_total: must be at least 1"),
    ("new_flows_per_second = -1", "limits.new_flows_per_second: must be at least 0"),
    ("binds_total = 1.5", "limits.binds_total: expected an integer, got float"),
    ("bogus = 1", "limits.bogus: unknown key"),
    ("flows_per_client = 4294967296", "limits.flows_per_client: must be at most 4294967295"),
    ("new_flows_per_second = 9223372036854775807",
     "limits.new_flows_per_second: must be at most 4294967295"),
    ("session_idle_timeout = nan", "limits.session_idle_timeout: must be a finite number, not nan"),
    ("socks_bind_timeout = inf", "limits.socks_bind_timeout: must be a finite number, not inf"),
    ("socks_handshake_timeout = 1e300",
     "limits.socks_handshake_timeout: must be at most 31536000 seconds (a year)"),
]


def test_unknown_dataplane_key_lists_the_new_ones() -> None:
    message = config_error(MINIMAL + "\n[dataplane]\nredirect_ports = [50000, 50010]\n")
    for key in ("kernel_redirect_ports", "user_redirect_ports", "receive_buffer"):
        assert key in message


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "enforcer.toml"
    path.write_text(FULL)
    assert load(path) == parse(FULL, path)
    assert isinstance(load(str(path)), Config)


@pytest.mark.parametrize(("section", "line", "reason"), [
    *(("limits", line, reason) for line, reason in LIMITS_ERRORS),
    ("defaults", "permission_timeout = nan",
     "defaults.permission_timeout: must be a finite number, not nan"),
    ("defaults", "permission_timeout = inf",
     "defaults.permission_timeout: must be a finite number, not inf"),
    ("defaults", "permission_timeout = 1e300", "defaults.permission_timeout: must be a positive "
     "number of seconds, at most 31536000 (a year)"),
    ("defaults", "max_pending_per_session = 4294967296",
     "defaults.max_pending_per_session: must be from 1 to 4294967295"),
    ("control", 'socket = ""', "control.socket: must not be empty"),
    ("data_filters", 'x = ":"', "data_filters.x: ':' is not 'module:attribute'"),
    ("data_filters", 'x = "json:"', "data_filters.x: 'json:' is not 'module:attribute'"),
])
def test_out_of_range_unknown_and_empty_values_are_refused(section: str, line: str, reason: str) -> None:
    text = MINIMAL + f"\n[{section}]\n{line}  # <-\n"
    message = config_error(text)
    assert message.startswith(f"{FILE}:{marked_line(text)}: {reason}"), message


def test_a_file_that_is_not_utf8_or_nests_too_deeply_is_one_line(tmp_path: Path) -> None:
    latin = tmp_path / "latin.toml"
    latin.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load(latin)
    assert str(info.value) == f"{latin}:4: not UTF-8 text (byte 0xe9)"
    deep = tmp_path / "deep.toml"
    deep.write_text(MINIMAL + "a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load(deep)
    assert str(info.value) == f"{deep}: not valid TOML: nested too deeply"


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml: cannot read"):
        load(path)


def test_load_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL + "[dataplane]\nbackend = \"ebpf\"\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}:")


# --- errors: file:LINE: reason ------------------------------------------------------------
# Each case marks the line the error must point at with "# <-".

CASES = [
    pytest.param(MINIMAL + "nat = tru  # <-\n", "not valid TOML", id="bad-toml"),
    pytest.param("[network]\ninternal_interfaces = [\"int0\"\n[dataplane]  # <-\n", "not valid TOML",
                 id="bad-toml-unclosed-array"),
    pytest.param("colour = \"red\"  # <-\n" + MINIMAL, "unknown key", id="unknown-root-key"),
    pytest.param(MINIMAL + "\n[[protocol]]\nname = \"A\"\nguid = \"5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101\"\n"
                 "ip_protocol = \"tcp\"\nports = [21]\n\n[[protocol]]\nname = \"B\"\n"
                 "colour = \"red\"  # <-\n", "unknown key", id="unknown-key-second-protocol"),
    pytest.param(MINIMAL + "\n[[protocol]]\nname = \"A\"\nguid = \"5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101\"\n"
                 "ip_protocol = \"tcp\"\nports = [21]\n\n"
                 "[[protocol_rule]]\nname = \"r0\"\naction = \"allow\"\n"
                 "protocols = [\"A\"]\nclients = []\n\n[[protocol_rule]]\nname = \"r1\"\naction = \"allow\"\n"
                 "protocols = [\"A\", \"SSH\"]  # <-\nclients = []\n",
                 "no protocol named 'SSH'", id="unknown-protocol-in-rule"),
    pytest.param(MINIMAL + "\n[[protocol]]\nname = \"A\"\nguid = \"5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101\"\n"
                 "ip_protocol = \"icmp\"  # <-\nports = [21]\n", "'tcp' or 'udp'", id="ip-protocol"),
    pytest.param(MINIMAL + "\n[[site_rule]]\nname = \"s\"\naction = \"allow\"\n"
                 "destinations = [\"198.51.100.0/24\", \"198.51.100.0/33\"]  # <-\n",
                 "'198.51.100.0/33' is not an IP address or network", id="bad-cidr"),
    pytest.param(MINIMAL + "\n[[protocol_rule]]\nname = \"r\"\naction = \"allow\"\nprotocols = []\n"
                 "clients = [\"192.0.2.300\"]  # <-\n", "not an IP address", id="bad-client-address"),
    pytest.param(MINIMAL + "\n[[protocol]]\nname = \"A\"\nguid = \"{not-a-guid}\"  # <-\n"
                 "ip_protocol = \"tcp\"\nports = [21]\n", "not a GUID", id="bad-guid"),
    pytest.param(MINIMAL + "\n[[protocol]]\nname = \"A\"\nguid = \"5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101\"\n"
                 "ip_protocol = \"tcp\"\nports = [21, \"2000-1000\"]  # <-\n", "outside 1-65535",
                 id="bad-port-range"),
    pytest.param(MINIMAL + "\n[[protocol]]\nname = \"A\"\nguid = \"5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101\"\n"
                 "ip_protocol = \"tcp\"\nports = [\"x-y\"]  # <-\n", "not a port range",
                 id="bad-port-range-text"),
    pytest.param(MINIMAL + "\n[[protocol]]\nname = \"A\"\nguid = \"5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101\"\n"
                 "ip_protocol = \"tcp\"\nports = [0]  # <-\n", "outside 1-65535", id="port-0"),
    pytest.param(MINIMAL + "\n[[protocol]]\nname = \"A\"\nguid = \"5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101\"\n"
                 "ip_protocol = \"tcp\"\nports = true  # <-\n", "expected an array, got bool",
                 id="ports-true"),
    pytest.param(MINIMAL + "\n[[protocol]]\nname = \"A\"\nguid = \"5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101\"\n"
                 "ip_protocol = \"tcp\"\nports = [true]  # <-\n", "expected a port or a range",
                 id="port-true"),
    pytest.param(MINIMAL + "\n[[site_rule]]\nname = \"s\"\naction = \"permit\"  # <-\ndestinations = []\n",
                 "must be 'allow' or 'deny'", id="bad-action"),
    pytest.param("[network]  # <-\ninternal_interfaces = [\"int0\"]\n",
                 "missing required key 'external_interfaces'", id="missing-external-interfaces"),
    pytest.param("[network]  # <-\ninternal_interfaces = [\"int0\"]\nexternal_interfaces = []\n",
                 "needs internal_interfaces and external_interfaces", id="empty-external-interfaces"),
    pytest.param(MINIMAL + "\n[defaults]\nmax_pending_per_session = 1\npermission_timeout = -5  # <-\n",
                 "must be a positive number", id="negative-permission-timeout"),
    pytest.param("[network]\ninternal_interfaces = [\"int0\", \"eth1\"]\n"
                 "external_interfaces = [\"eth1\"]  # <-\n", "cannot be both internal and external",
                 id="same-interface-internal-and-external"),
    pytest.param(MINIMAL + "nat = 1  # <-\n", "expected true or false, got int", id="nat-not-bool"),
    pytest.param(MINIMAL + "\n[dataplane]\nqueue = true  # <-\n", "expected an integer, got bool",
                 id="queue-true"),
    pytest.param(MINIMAL + "\n[dataplane]\nqueue = 70000  # <-\n", "queue number 0-65535",
                 id="queue-out-of-range"),
    pytest.param(MINIMAL + "\n[dataplane]\nbackend = \"ebpf\"  # <-\n", "must be one of auto, iptables, nft",
                 id="bad-backend"),
    pytest.param(MINIMAL + f"\n[control]\nsocket = \"/{'s' * MAX_SOCKET_PATH}\"  # <-\n",
                 f"at most {MAX_SOCKET_PATH} bytes", id="socket-path-too-long"),
    pytest.param(MINIMAL + "\n[control]\npath = \"/x\"  # <-\n", "unknown key", id="unknown-control-key"),
    *[pytest.param(MINIMAL + f"\n[dataplane]\nqueue = 1\n{key} = {value}  # <-\n", reason,
                   id=f"{key}={value}")
      for key in ("kernel_redirect_ports", "user_redirect_ports")
      for value, reason in (
          ("50000", "expected an array, got int"),
          ('"50000-50010"', "expected an array, got str"),
          ("[]", PORT_RANGE),
          ("[50000]", PORT_RANGE),
          ("[50000, 50010, 50020]", PORT_RANGE),
          ('[50000, "50010"]', PORT_RANGE),
          ("[true, 50010]", PORT_RANGE),
          ("[50000, false]", PORT_RANGE),
          ("[50000.0, 50010]", PORT_RANGE),
          ("[50010, 50000]", PORT_RANGE),
          ("[1023, 2000]", PORT_RANGE),
          ("[80, 90]", PORT_RANGE),
          ("[65000, 65536]", PORT_RANGE),
          ("[-1, 2000]", PORT_RANGE),
      )],
    pytest.param(MINIMAL + "\n[dataplane]\nkernel_redirect_ports = [50000, 50100]\n"
                 "user_redirect_ports = [50100, 50200]  # <-\n", "must not overlap kernel_redirect_ports",
                 id="redirect-ranges-share-a-port"),
    pytest.param(MINIMAL + "\n[dataplane]\nkernel_redirect_ports = [50000, 50100]\n"
                 "user_redirect_ports = [49000, 60000]  # <-\n", "must not overlap kernel_redirect_ports",
                 id="user-range-contains-kernel-range"),
    pytest.param(MINIMAL + "\n[dataplane]\nkernel_redirect_ports = [50000, 50100]\n"
                 "user_redirect_ports = [50000, 50100]  # <-\n", "must not overlap kernel_redirect_ports",
                 id="redirect-ranges-equal"),
    pytest.param(MINIMAL + "\n[dataplane]\nuser_redirect_ports = [61500, 61600]  # <-\n",
                 "must not overlap kernel_redirect_ports", id="user-range-inside-default-kernel-range"),
    *[pytest.param(MINIMAL + f"\n[dataplane]\nreceive_buffer = {value}  # <-\n", reason,
                   id=f"receive_buffer={value}")
      for value, reason in (
          ("4095", "must be from 4096 to 1073741824 bytes"),
          ("0", "must be from 4096 to 1073741824 bytes"),
          ("-4096", "must be from 4096 to 1073741824 bytes"),
          ("1073741825", "must be from 4096 to 1073741824 bytes"),
          ("true", "expected an integer, got bool"),
          ("65536.0", "expected an integer, got float"),
          ('"64k"', "expected an integer, got str"),
      )],
]


def marked_line(text: str) -> int:
    (line,) = [n for n, t in enumerate(text.splitlines(), 1) if "# <-" in t]
    return line


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, FILE)
    return str(info.value)


@pytest.mark.parametrize(("text", "reason"), CASES)
def test_error_points_at_the_line(text: str, reason: str) -> None:
    message = config_error(text)
    prefix = f"{FILE}:{marked_line(text)}: "
    assert message.startswith(prefix), message
    assert reason in message


@pytest.mark.parametrize(("text", "reason"), [pytest.param(*c.values, id=c.id) for c in CASES])
def test_error_reason(text: str, reason: str) -> None:
    """Whatever the line, the reason is right (this part holds even where the line is missing)."""
    message = config_error(text)
    assert message.startswith(f"{FILE}:")
    assert reason in message


def test_error_names_the_key_path() -> None:
    text = MINIMAL + "\n[[protocol]]\nname = \"A\"\nguid = \"5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101\"\n" \
                     "ip_protocol = \"tcp\"\nports = [21, 0]\n"
    assert "protocol[0].ports[1]: port range 0-0 is outside 1-65535" in config_error(text)


def test_missing_network_section() -> None:
    message = config_error("[dataplane]\nqueue = 1\n")
    assert message.startswith(f"{FILE}:")
    assert "internal_interfaces" in message


def test_same_key_in_an_earlier_table_is_not_the_one_pointed_at() -> None:
    text = (MINIMAL
            + "\n[[site_rule]]\nname = \"a\"\naction = \"allow\"\ndestinations = [\"198.51.100.0/24\"]\n"
            + "\n[[site_rule]]\nname = \"b\"\naction = \"allow\"\ndestinations = [\"nope\"]  # <-\n")
    assert config_error(text).startswith(f"{FILE}:{marked_line(text)}: ")


def test_header_with_comment_and_spaces_is_found() -> None:
    text = ("[network]\ninternal_interfaces = [\"int0\"]\nexternal_interfaces = [\"ext0\"]\n\n"
            "[[ protocol ]]  # first\nname = \"A\"\nguid = \"nope\"  # <-\nip_protocol = \"tcp\"\n"
            "ports = [1]\n")
    assert config_error(text).startswith(f"{FILE}:{marked_line(text)}: ")


def test_locate() -> None:
    text = "a = 1\n[[p]]\nx = 1\n[[p]]\ny = 2\nx = 3\n[t]\nk = 1\n"
    assert locate(text, ("a",)) == 1
    assert locate(text, ("p", 0)) == 2
    assert locate(text, ("p", 1)) == 4
    assert locate(text, ("p", 1, "x")) == 6
    assert locate(text, ("p", 0, "x")) == 3
    assert locate(text, ("p", 0, "y")) == 2  # not in that table: the table's header
    assert locate(text, ("t",)) == 7
    assert locate(text, ("nothing",)) is None


def test_locate_key_in_plain_table() -> None:
    text = "a = 1\n[[p]]\nx = 1\n[[p]]\ny = 2\nx = 3\n[t]\nk = 1\n"
    assert locate(text, ("t", "k")) == 8


# --- the lab's config --------------------------------------------------------------------

class FakeTestbed:
    def __init__(self, kind: str) -> None:
        self.topology = topology.standard(kind)


@pytest.mark.parametrize("kind", ["nat", "routed"])
@pytest.mark.parametrize("fail_open", [False, True])
def test_lab_config_parses(kind: str, fail_open: bool) -> None:
    text = lab_config(FakeTestbed(kind), socket=Path("/run/pinhole/enforcer-x.sock"),  # type: ignore[arg-type]
                      fail_open=fail_open, queue=3, backend="nft")
    cfg = parse(text, "lab.toml")
    topo = topology.standard(kind)
    assert cfg.network.nat is (kind == "nat")
    assert cfg.network.internal_interfaces == (topo.fw_internal_iface,)
    assert cfg.network.external_interfaces == (topo.fw_external_iface,)
    assert cfg.dataplane == DataplaneSettings(3, fail_open, "nft")
    assert cfg.control_socket == "/run/pinhole/enforcer-x.sock"
    assert {p.name: p.guid for p in cfg.policy.protocols} == {k: uuid.UUID(v) for k, v in GUIDS.items()}
    c1 = ipaddress.ip_address(topo.address("c1", "ipv4"))
    c2 = ipaddress.ip_address(topo.address("c2", "ipv6"))
    http_c1 = cfg.policy.protocol_rule("HTTP", c1, None)
    assert http_c1 is not None and http_c1.allow
    assert cfg.policy.protocol_rule("HTTP", c2, None) is None
    assert cfg.policy.protocol_rule("SSH", c1, None) is None
    for fam in ("ipv4", "ipv6"):
        denied = ipaddress.ip_network(topo.denied_network(fam))
        external = ipaddress.ip_network(topo.external_network(fam))
        site = cfg.policy.site_rule(denied.network_address + 1)
        assert site is not None and not site.allow
        site = cfg.policy.site_rule(external.network_address + 1)
        assert site is not None and site.allow


# --- [socks] ---------------------------------------------------------------------------------

SOCKS = MINIMAL + "\n[socks]\nusers = { alice = \"secret\" }\n"


def test_no_socks_section_means_no_socks_service() -> None:
    assert parse(MINIMAL, FILE).socks is None


def test_socks_defaults() -> None:
    from enforcer.config import SocksSettings
    from enforcer.core.binds import DEFAULT_BIND_PORTS

    socks = parse(SOCKS, FILE).socks
    assert socks == SocksSettings(1080, DEFAULT_BIND_PORTS, True, {"alice": "secret"})
    assert socks is not None and socks.bind_ports == (20000, 29999)


def test_socks_settings() -> None:
    text = (MINIMAL + "\n[socks]\nport = 65535\nbind_ports = [1024, 1024]\nrequire_auth = true\n"
            "\n[socks.users]\nalice = \"a\"\n\"bob smith\" = \"" + "p" * 255 + "\"\n"
            + "c" * 255 + " = \"x\"\n")
    socks = parse(text, FILE).socks
    assert socks is not None
    assert (socks.port, socks.bind_ports, socks.require_auth) == (65535, (1024, 1024), True)
    assert socks.users == {"alice": "a", "bob smith": "p" * 255, "c" * 255: "x"}
    low = parse(MINIMAL + "\n[socks]\nport = 1\nbind_ports = [65535, 65535]\nrequire_auth = false\n", FILE)
    assert low.socks is not None and (low.socks.port, low.socks.bind_ports) == (1, (65535, 65535))


def test_socks_without_auth_needs_no_users() -> None:
    socks = parse(MINIMAL + "\n[socks]\nrequire_auth = false\n", FILE).socks
    assert socks is not None and socks.require_auth is False and socks.users == {}


SOCKS_CASES = [
    pytest.param(MINIMAL + "\n[socks]  # <-\nport = 1080\n",
                 "socks.users: require_auth needs at least one user", id="no-users"),
    pytest.param(MINIMAL + "\n[socks]\nrequire_auth = true\nusers = {}  # <-\n",
                 "socks.users: require_auth needs at least one user", id="empty-users"),
    pytest.param(SOCKS + "port = 0  # <-\n", "socks.port: must be a port 1-65535", id="port-0"),
    pytest.param(SOCKS + "port = 65536  # <-\n", "socks.port: must be a port 1-65535", id="port-65536"),
    pytest.param(SOCKS + "port = true  # <-\n", "socks.port: expected an integer, got bool", id="port-bool"),
    pytest.param(SOCKS + "port = \"1080\"  # <-\n", "expected an integer, got str", id="port-str"),
    pytest.param(SOCKS + "bind_ports = [30000]  # <-\n", f"socks.bind_ports: {PORT_RANGE}", id="bind-one"),
    pytest.param(SOCKS + "bind_ports = [30000, 29999]  # <-\n", PORT_RANGE, id="bind-reversed"),
    pytest.param(SOCKS + "bind_ports = [1023, 2000]  # <-\n", PORT_RANGE, id="bind-low"),
    pytest.param(SOCKS + "bind_ports = [30000, 65536]  # <-\n", PORT_RANGE, id="bind-high"),
    pytest.param(SOCKS + "bind_ports = [30000, true]  # <-\n", PORT_RANGE, id="bind-bool"),
    pytest.param(SOCKS + "bind_ports = \"30000-30010\"  # <-\n", "expected an array, got str",
                 id="bind-str"),
    pytest.param(SOCKS + "require_auth = 1  # <-\n", "socks.require_auth: expected true or false",
                 id="auth-int"),
    pytest.param(SOCKS + "bindports = [30000, 30010]  # <-\n", "socks.bindports: unknown key",
                 id="unknown-key"),
    pytest.param(MINIMAL + "\n[socks]\nusers = { " + "n" * 256 + " = \"pw\" }  # <-\n",
                 "user names and passwords are 1 to 255 bytes", id="name-256"),
    pytest.param(MINIMAL + "\n[socks]\nusers = { \"" + "é" * 128 + "\" = \"pw\" }  # <-\n",
                 "1 to 255 bytes", id="name-256-bytes-utf8"),
    pytest.param(MINIMAL + "\n[socks]\nusers = { a = \"" + "p" * 256 + "\" }  # <-\n",
                 "socks.users.a: user names and passwords are 1 to 255 bytes", id="password-256"),
    pytest.param(MINIMAL + "\n[socks]\nusers = { a = \"\" }  # <-\n", "socks.users.a: user names and",
                 id="password-empty"),
    pytest.param(MINIMAL + "\n[socks]\nusers = { \"\" = \"pw\" }  # <-\n", "user names and passwords",
                 id="name-empty"),
    pytest.param(MINIMAL + "\n[socks]\nusers = { a = 5 }  # <-\n",
                 "socks.users.a: expected a string, got int", id="password-int"),
    pytest.param(MINIMAL + "\n[socks]\nusers = [\"alice\"]  # <-\n", "socks.users: expected a table",
                 id="users-list"),
    pytest.param("socks = 1  # <-\n" + MINIMAL, "socks: expected a table", id="socks-not-a-table"),
]


@pytest.mark.parametrize(("text", "reason"), SOCKS_CASES)
def test_socks_errors(text: str, reason: str) -> None:
    message = config_error(text)
    assert message.startswith(f"{FILE}:{marked_line(text)}: "), message
    assert reason in message, message


# The [socks.users] header form: ConfigError's line comes from config.locate, which finds a
# key path's first part by its header and the rest as "key =" lines, so a dotted header is never found.
DOTTED_HEADER = ("locate() does not match dotted table headers such as [socks.users]: the error points "
                 "at [socks] (or has no line) instead of the offending line")


def test_long_user_name_under_a_users_header_points_at_its_line() -> None:
    text = (MINIMAL + "\n[socks]\nport = 1080\n\n[socks.users]\nalice = \"pw\"\n"
            + "n" * 256 + " = \"pw\"  # <-\n")
    message = config_error(text)
    assert "user names and passwords are 1 to 255 bytes" in message
    assert message.startswith(f"{FILE}:{marked_line(text)}: "), message


def test_empty_users_header_alone_has_a_line() -> None:
    text = MINIMAL + "\n[socks.users]  # <-\n"
    message = config_error(text)
    assert "socks.users: require_auth needs at least one user" in message
    assert message.startswith(f"{FILE}:{marked_line(text)}: "), message


# --- [filters]: application filters ------------------------------------------------------------

def test_app_filters_are_enabled_in_order() -> None:
    cfg = parse(MINIMAL + "\n[filters]\nenable = [\"ftp\", \"tftp\"]\n", FILE)
    assert cfg.app_filters == ("ftp", "tftp")
    assert parse(MINIMAL + "\n[filters]\nenable = [\"tftp\", \"ftp\"]\n", FILE).app_filters == ("tftp", "ftp")
    # beside data filters of the same name
    text = MINIMAL + "\n[data_filters]\nftp = \"m:f\"\n\n[filters]\nenable = [\"ftp\"]\n"
    cfg = parse(text, FILE)
    assert cfg.app_filters == ("ftp",) and cfg.data_filters == {"ftp": "m:f"}


@pytest.mark.parametrize("text", [
    pytest.param(MINIMAL, id="no-section"),
    pytest.param(MINIMAL + "\n[filters]\n", id="empty-section"),
    pytest.param(MINIMAL + "\n[filters]\nenable = []\n", id="empty-list"),
])
def test_no_app_filters(text: str) -> None:
    cfg = parse(text, FILE)
    assert cfg.app_filters == ()
    assert Config(cfg.policy, cfg.network, cfg.dataplane).app_filters == ()


FILTERS_CASES = [
    pytest.param(MINIMAL + "\n[filters]\nenable = [\"ftp\", \"tftp\", \"ftp\"]  # <-\n",
                 "filters.enable: names a filter twice", id="twice"),
    pytest.param(MINIMAL + "\n[dataplane]\nqueue = 1\n\n[filters]\n\nenable = [  # <-\n  \"tftp\",\n"
                 "  \"tftp\",\n]\n", "filters.enable: names a filter twice", id="twice-multiline"),
    pytest.param(MINIMAL + "\n[filters]\nenable = [\"ftp\", 1]  # <-\n",
                 "filters.enable[1]: expected a string, got int", id="not-a-string"),
    pytest.param(MINIMAL + "\n[filters]\nenable = [[\"ftp\"]]  # <-\n",
                 "filters.enable[0]: expected a string, got list", id="nested-list"),
    pytest.param(MINIMAL + "\n[filters]\nenable = \"ftp\"  # <-\n",
                 "filters.enable: expected an array, got str", id="not-an-array"),
    pytest.param(MINIMAL + "\n[filters]\nenable = [\"ftp\"]\nenabled = [\"tftp\"]  # <-\n",
                 "filters.enabled: unknown key", id="unknown-key"),
    pytest.param("filters = [\"ftp\"]  # <-\n" + MINIMAL, "filters: expected a table", id="not-a-table"),
]


@pytest.mark.parametrize(("text", "reason"), FILTERS_CASES)
def test_app_filter_errors_point_at_the_line(text: str, reason: str) -> None:
    message = config_error(text)
    assert message.startswith(f"{FILE}:{marked_line(text)}: "), message
    assert reason in message, message


@pytest.mark.parametrize("text", [
    pytest.param('network.internal_interfaces = ["int0"]\nnetwork.external_interfaces = ["ext0"]\n'
                 'network.nat = "yes"  # <-\n', id="dotted-key"),
    pytest.param(MINIMAL + "\n[limits]\nsocks . bad = 1  # <-\n", id="inside-a-dotted-key"),
    pytest.param(MINIMAL + '\n[socks]\nport = 1080\nusers.alice = 5  # <-\n', id="dotted-in-a-table"),
])
def test_an_error_in_a_dotted_key_points_at_its_line(text: str) -> None:
    message = config_error(text)
    assert message.startswith(f"{FILE}:{marked_line(text)}: "), message


def test_a_byte_order_mark_is_no_error(tmp_path: Path) -> None:
    """As some editors write one: the file reads as without it."""
    marked = tmp_path / "bom.toml"
    marked.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load(marked) == parse(MINIMAL)
