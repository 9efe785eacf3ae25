"""enforcer.dataplane.render_rules / render_nft: the rules are pure text, checked without root."""

from __future__ import annotations

import ipaddress
import re

import pytest

from enforcer import dataplane
from enforcer.config import DataplaneSettings
from enforcer.dataplane import (
    CHAIN_PREFIX,
    MARK_KERNEL,
    MARK_MASK,
    MARK_MODE,
    MARK_USER,
    Interfaces,
    render_nft,
    render_rules,
)

IFACES = Interfaces(
    internal={"int0": 2, "int1": 3},
    external={"ext0": 4},
    internal_networks=(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8:1::/64"),
                       ipaddress.ip_network("203.0.113.0/24")),
    external_addresses=(ipaddress.ip_address("198.51.100.1"), ipaddress.ip_address("2001:db8:2::1"),
                        ipaddress.ip_address("198.51.100.2"), ipaddress.ip_address("2001:db8:2::2")),
)
FIRST_EXTERNAL = {"ipv4": "198.51.100.1", "ipv6": "2001:db8:2::1"}
OTHER_EXTERNAL = {"ipv4": "198.51.100.2", "ipv6": "2001:db8:2::2"}
NETWORKS = {"ipv4": ["192.0.2.0/24", "203.0.113.0/24"], "ipv6": ["2001:db8:1::/64"]}

CLOSED = DataplaneSettings(queue=3, fail_open=False)
OPEN = DataplaneSettings(queue=3, fail_open=True)
FAMS = ["ipv4", "ipv6"]


def tables(text: str) -> dict[str, list[str]]:
    """iptables-restore input as {table: lines between *table and COMMIT}."""
    out: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("*"):
            assert current is None, f"table {line} opened inside {current}"
            current = line[1:]
            assert current not in out, f"table {current} twice"
            out[current] = []
        elif line == "COMMIT":
            assert current is not None
            current = None
        else:
            assert current is not None, f"rule outside a table: {line}"
            out[current].append(line)
    assert current is None, "last table not committed"
    return out


def appended(lines: list[str], chain: str) -> list[str]:
    return [line for line in lines if line.startswith(f"-A {chain} ")]


# --- fail-closed and fail-open --------------------------------------------------------------

@pytest.mark.parametrize("fam", FAMS)
def test_fail_closed(fam: str) -> None:
    f = tables(render_rules(fam, CLOSED, IFACES, nat=False))["filter"]
    rules = appended(f, "PINHOLE-FORWARD")
    queue = [r for r in rules if "NFQUEUE" in r]
    assert queue, rules
    assert all("--queue-num 3" in r for r in queue)
    assert not any("--queue-bypass" in r for r in queue)
    # Only new flows and user-mode flows go to the queue; everything else that is not
    # admitted ends in DROP.
    assert [("--ctstate NEW" in r, f"{MARK_USER:#010x}/{MARK_MODE:#010x}" in r) for r in queue] \
        == [(False, True), (True, False)]
    assert rules[-1] == "-A PINHOLE-FORWARD -j DROP"
    assert "-I FORWARD 1 -j PINHOLE-FORWARD" in f


@pytest.mark.parametrize("fam", FAMS)
def test_fail_open(fam: str) -> None:
    f = tables(render_rules(fam, OPEN, IFACES, nat=False))["filter"]
    rules = appended(f, "PINHOLE-FORWARD")
    queue = [r for r in rules if "NFQUEUE" in r]
    assert len(queue) == 3, rules  # user-mode flows, new flows, and what is left
    assert all(r.endswith("-j NFQUEUE --queue-num 3 --queue-bypass") for r in queue)
    assert any("--ctstate NEW" in r for r in queue)
    assert rules[-1] == "-A PINHOLE-FORWARD -j NFQUEUE --queue-num 3 --queue-bypass"
    # No unconditional DROP: a dead enforcer must let traffic pass. (Replies of
    # admitted one-way flows may still be dropped: that is not the enforcer's absence.)
    drops = [r for r in rules if r.endswith("-j DROP")]
    assert all("--ctdir REPLY" in r and "--mark" in r for r in drops), drops
    assert "-A PINHOLE-FORWARD -j DROP" not in rules


@pytest.mark.parametrize("fam", FAMS)
def test_admitted_flows_accepted_before_the_queue(fam: str) -> None:
    for settings in (CLOSED, OPEN):
        rules = appended(tables(render_rules(fam, settings, IFACES, nat=False))["filter"], "PINHOLE-FORWARD")
        accept = next(i for i, r in enumerate(rules) if r.endswith("-j ACCEPT"))
        first_queue = next(i for i, r in enumerate(rules) if "NFQUEUE" in r)
        assert accept < first_queue
        value, mask = _mark(rules[accept], "-m connmark --mark")
        assert value & mask == MARK_KERNEL and mask & MARK_KERNEL


def test_queue_number_is_the_configured_one() -> None:
    text = render_rules("ipv4", DataplaneSettings(queue=65535), IFACES, nat=False)
    assert set(re.findall(r"--queue-num (\d+)", text)) == {"65535"}


# --- connmark save -------------------------------------------------------------------------

def _mark(rule: str, option: str) -> tuple[int, int]:
    m = re.search(re.escape(option) + r" (0x[0-9a-f]+)/(0x[0-9a-f]+)", rule)
    assert m, rule
    return int(m.group(1), 16), int(m.group(2), 16)


@pytest.mark.parametrize("fam", FAMS)
def test_connmark_save_rule(fam: str) -> None:
    mangle = tables(render_rules(fam, CLOSED, IFACES, nat=False))["mangle"]
    saves = [r for r in appended(mangle, "PINHOLE-POSTROUTING") if "-j CONNMARK --save-mark" in r]
    assert len(saves) == 1
    save = saves[0]
    # every admitted flow, kernel or user mode: any mode bit set
    assert f"-m mark ! --mark 0x0/{MARK_MODE:#010x}" in save
    nfmask = int(re.search(r"--nfmask (0x[0-9a-f]+)", save).group(1), 16)  # type: ignore[union-attr]
    ctmask = int(re.search(r"--ctmask (0x[0-9a-f]+)", save).group(1), 16)  # type: ignore[union-attr]
    # Our bits are copied, and only ours: other users of the connmark keep theirs.
    assert nfmask == ctmask == MARK_MASK
    assert MARK_KERNEL & MARK_MASK == MARK_KERNEL
    assert "-I POSTROUTING 1 -j PINHOLE-POSTROUTING" in mangle
    (restore,) = appended(mangle, "PINHOLE-PREROUTING")
    assert f"--restore-mark --nfmask {MARK_MASK:#010x} --ctmask {MARK_MASK:#010x}" in restore


# --- NAT -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fam", FAMS)
def test_no_nat_without_nat(fam: str) -> None:
    text = render_rules(fam, CLOSED, IFACES, nat=False)
    assert "nat" not in tables(text)
    assert "SNAT" not in text


@pytest.mark.parametrize("fam", FAMS)
def test_snat_per_internal_network_to_the_first_external_address(fam: str) -> None:
    nat = tables(render_rules(fam, CLOSED, IFACES, nat=True))["nat"]
    rules = appended(nat, "PINHOLE-POSTROUTING")
    by_source = [r for r in rules if " -s " in r]
    expected = [f"-A PINHOLE-POSTROUTING -s {n} -o ext0 -j SNAT --to-source {FIRST_EXTERNAL[fam]}"
                for n in NETWORKS[fam]]
    assert by_source == expected
    assert all("SNAT" in r for r in rules)
    other = "ipv6" if fam == "ipv4" else "ipv4"
    for n in NETWORKS[other]:
        assert n not in "\n".join(nat)
    assert not any(f"--to-source {a}" in r for r in rules for a in FIRST_EXTERNAL.values()
                   if a != FIRST_EXTERNAL[fam])
    assert "-I POSTROUTING 1 -j PINHOLE-POSTROUTING" in nat


@pytest.mark.parametrize("fam", FAMS)
def test_snat_addresses_are_of_the_family(fam: str) -> None:
    rules = appended(tables(render_rules(fam, CLOSED, IFACES, nat=True))["nat"], "PINHOLE-POSTROUTING")
    version = 4 if fam == "ipv4" else 6
    for r in rules:
        address = r.rsplit("--to-source ", 1)[1]
        assert ipaddress.ip_address(address).version == version
    assert not any(f"-s {n} " in r and OTHER_EXTERNAL[fam] in r for r in rules for n in NETWORKS[fam])


def test_snat_on_every_external_interface() -> None:
    two = Interfaces(IFACES.internal, {"ext0": 4, "ext1": 5}, IFACES.internal_networks,
                     IFACES.external_addresses)
    rules = [r for r in appended(tables(render_rules("ipv4", CLOSED, two, nat=True))["nat"],
                                 "PINHOLE-POSTROUTING") if " -s " in r]
    assert sorted(rules) == sorted(
        f"-A PINHOLE-POSTROUTING -s {n} -o {ext} -j SNAT --to-source 198.51.100.1"
        for n in NETWORKS["ipv4"] for ext in ("ext0", "ext1"))


def test_no_snat_without_an_external_address_of_the_family() -> None:
    v4only = Interfaces(IFACES.internal, IFACES.external, IFACES.internal_networks,
                        (ipaddress.ip_address("198.51.100.1"),))
    text = render_rules("ipv6", CLOSED, v4only, nat=True)
    assert "SNAT" not in text
    tables(text)  # still well-formed


# --- hygiene: only our chains ---------------------------------------------------------------

@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("nat", [False, True])
@pytest.mark.parametrize("settings", [CLOSED, OPEN], ids=["closed", "open"])
def test_every_chain_is_ours(fam: str, nat: bool, settings: DataplaneSettings) -> None:
    text = render_rules(fam, settings, IFACES, nat=nat)
    parsed = tables(text)
    assert set(parsed) == ({"filter", "mangle", "nat"} if nat else {"filter", "mangle"})
    for table, lines in parsed.items():
        for line in lines:
            words = line.split()
            if line.startswith(":"):
                assert words[0][1:].startswith(CHAIN_PREFIX), (table, line)
                assert words[1] == "-", (table, line)   # a user chain, no policy change
            elif words[0] == "-A":
                assert words[1].startswith(CHAIN_PREFIX), (table, line)
            elif words[0] == "-I":
                # Built-in chains only get a jump to ours.
                assert words[-2:] == ["-j", words[-1]] and words[-1].startswith(CHAIN_PREFIX), line
            else:
                pytest.fail(f"unexpected line in {table}: {line}")
    assert text.endswith("\n")


# --- nft -------------------------------------------------------------------------------------

def test_nft_fail_closed_and_open() -> None:
    closed = render_nft(CLOSED, IFACES, nat=False)
    opened = render_nft(OPEN, IFACES, nat=False)
    assert "queue num 3" in closed and "bypass" not in closed
    assert "\n    drop\n" in closed
    assert opened.count("queue num 3 bypass") == 3  # user-mode flows, new flows, the rest
    assert "\n    drop\n" not in opened
    assert closed.startswith(f"table inet {dataplane.NFT_TABLE} {{")
    assert closed.count("{") == closed.count("}")


def test_nft_nat() -> None:
    assert "snat" not in render_nft(CLOSED, IFACES, nat=False)
    text = render_nft(CLOSED, IFACES, nat=True)
    for n in NETWORKS["ipv4"]:
        assert f'ip saddr {n} oifname "ext0" snat ip to 198.51.100.1' in text
    assert 'ip6 saddr 2001:db8:1::/64 oifname "ext0" snat ip6 to 2001:db8:2::1' in text
    assert text.count("{") == text.count("}")
