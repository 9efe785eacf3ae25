"""enforcer.dataplane: the rules (rules_of, rendered by IptablesBackend and NftBackend;
render_nft_maps) are pure text and the NAT map elements pure bytes, checked without root."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import re
import struct
import sys

import pytest

from enforcer import dataplane
from enforcer.config import DataplaneSettings
from enforcer.core.limits import Limits
from enforcer.core.marks import (
    MARK_KERNEL,
    MARK_LIVE,
    MARK_LOCAL,
    MARK_LOCAL_KEPT,
    MARK_MASK,
    MARK_MODE,
    MARK_ONE_WAY,
    MARK_OWNED,
    MARK_PORT,
    MARK_REWRITTEN,
    MARK_SNAT,
    MARK_USER,
    MARK_WORKER,
    local_mark,
    mark_for,
    redirect_port,
    worker_mark,
)
from enforcer.dataplane import (
    CHAIN_PREFIX,
    BindRule,
    Interfaces,
    IptablesBackend,
    NftBackend,
    RedirectRule,
    Ruleset,
    render_nft_maps,
    rules_of,
)
from enforcer.netfilter import Family

IFACES = Interfaces(
    internal={"int0": 2, "int1": 3},
    external={"ext0": 4},
    internal_networks=(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8:1::/64"),
                       ipaddress.ip_network("203.0.113.0/24")),
    external_addresses=(ipaddress.ip_address("198.51.100.1"), ipaddress.ip_address("2001:db8:2::1"),
                        ipaddress.ip_address("198.51.100.2"), ipaddress.ip_address("2001:db8:2::2")),
    internal_addresses=(("int0", ipaddress.ip_interface("192.0.2.1/24")),
                        ("int0", ipaddress.ip_interface("2001:db8:1::1/64")),
                        ("int1", ipaddress.ip_interface("203.0.113.1/24"))),
)
# (interface, address) of the fw's internal addresses, per family
INTERNAL_ADDRESSES = {"ipv4": [("int0", "192.0.2.1"), ("int1", "203.0.113.1")],
                      "ipv6": [("int0", "2001:db8:1::1")]}
FIRST_EXTERNAL = {"ipv4": "198.51.100.1", "ipv6": "2001:db8:2::1"}
OTHER_EXTERNAL = {"ipv4": "198.51.100.2", "ipv6": "2001:db8:2::2"}
NETWORKS = {"ipv4": ["192.0.2.0/24", "203.0.113.0/24"], "ipv6": ["2001:db8:1::/64"]}

CLOSED = DataplaneSettings(queue=3, fail_open=False)
OPEN = DataplaneSettings(queue=3, fail_open=True)
# Redirect ports other than the defaults, to see that the configured ones are used
RANGES = DataplaneSettings(queue=3, kernel_redirect_ports=(50000, 50099), user_redirect_ports=(50100, 50199))
OPEN_RANGES = DataplaneSettings(queue=3, fail_open=True, kernel_redirect_ports=(50000, 50099),
                                user_redirect_ports=(50100, 50199))
FAMS = ["ipv4", "ipv6"]


def iptables_text(fam: Family, rs: Ruleset) -> str:
    """What the iptables backend gives iptables-restore for one family."""
    return IptablesBackend().render(rules_of(rs), fam)


def nft_text(rs: Ruleset) -> str:
    """What the nft backend gives nft."""
    return NftBackend().render(rules_of(rs))


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
    f = tables(iptables_text(fam, Ruleset(CLOSED, IFACES)))["filter"]
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
    f = tables(iptables_text(fam, Ruleset(OPEN, IFACES)))["filter"]
    rules = appended(f, "PINHOLE-FORWARD")
    queue = [r for r in rules if "NFQUEUE" in r]
    assert len(queue) == 3, rules  # user-mode flows, new flows, and what is left
    assert all(r.endswith("-j NFQUEUE --queue-num 3 --queue-bypass") for r in queue)
    assert any("--ctstate NEW" in r for r in queue)
    assert rules[-1] == "-A PINHOLE-FORWARD -j NFQUEUE --queue-num 3 --queue-bypass"
    # No unconditional DROP: a dead enforcer must let traffic pass. (Replies of
    # admitted one-way flows may still be dropped, a client's new flows beyond its
    # caps, and connections another tool's conntrack helper expected: that is not the
    # enforcer's absence.)
    drops = [r for r in rules if r.endswith("-j DROP")]
    assert all(("--ctdir REPLY" in r and "--mark" in r) or ("--ctstate NEW" in r and "limit" in r)
               or "--ctstatus EXPECTED" in r for r in drops), drops
    assert "-A PINHOLE-FORWARD -j DROP" not in rules


@pytest.mark.parametrize("fam", FAMS)
def test_admitted_flows_accepted_before_the_queue(fam: str) -> None:
    for settings in (CLOSED, OPEN):
        rules = appended(tables(iptables_text(fam, Ruleset(settings, IFACES)))["filter"], "PINHOLE-FORWARD")
        accepts = [i for i, r in enumerate(rules) if r.endswith("-j ACCEPT")]
        first_queue = next(i for i, r in enumerate(rules) if "NFQUEUE" in r)
        # Two accepts, both before the queue: kernel-mode flows (by their connmark, part of
        # the base that stays when the enforcer stops), then packets the enforcer
        # rewrote (by their packet mark).
        assert len(accepts) == 2, rules
        kernel, rewritten = accepts
        assert kernel < rewritten < first_queue
        assert "-m connmark" not in rules[rewritten]
        assert _mark(rules[rewritten], "-m mark --mark") == (MARK_REWRITTEN, MARK_REWRITTEN)
        value, mask = _mark(rules[kernel], "-m connmark --mark")
        assert value & mask == MARK_KERNEL and mask & MARK_KERNEL
        assert (value, mask) == (MARK_KERNEL, MARK_MODE)


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("settings", [CLOSED, OPEN], ids=["closed", "open"])
def test_rewritten_packets_accepted_before_any_queue(fam: str, settings: DataplaneSettings) -> None:
    rules = appended(tables(iptables_text(fam, Ruleset(settings, IFACES)))["filter"], "PINHOLE-FORWARD")
    rewritten = [i for i, r in enumerate(rules)
                 if f"-m mark --mark {MARK_REWRITTEN:#010x}/{MARK_REWRITTEN:#010x} -j ACCEPT" in r]
    queues = [i for i, r in enumerate(rules) if "NFQUEUE" in r]
    assert len(rewritten) == 1 and queues
    assert rewritten[0] < min(queues)
    # Only the base's head may come before it: expected connections' drop, the one-way
    # reply drop (a reply is never rewritten) and kernel-mode flows.
    assert rules[:rewritten[0]] == base_head()


def test_queue_number_is_the_configured_one() -> None:
    text = iptables_text("ipv4", Ruleset(DataplaneSettings(queue=65535), IFACES))
    assert set(re.findall(r"--queue-num (\d+)", text)) == {"65535"}


@pytest.mark.parametrize("fam", FAMS)
def test_each_worker_s_flows_go_to_its_queue_before_the_main_queue(fam: str) -> None:
    """A user-mode flow's packets go to the queue of the worker its connmark names (worker
    0, none: the main queue), in both backends."""
    rs = Ruleset(DataplaneSettings(queue=10, workers=2), IFACES)
    forward = [r for r in appended(tables(iptables_text(fam, rs))["filter"], "PINHOLE-FORWARD")
               if "NFQUEUE" in r]
    queues = [re.search(r"--queue-num (\d+)", r).group(1) for r in forward]  # type: ignore[union-attr]
    assert queues[:3] == ["11", "12", "10"], forward
    for k, rule in ((1, forward[0]), (2, forward[1])):
        assert _mark(rule, "--mark") == (MARK_USER | worker_mark(k), MARK_MODE | MARK_WORKER), rule
    assert "connmark" in forward[2] and f"{MARK_MODE | MARK_WORKER:#010x}" not in forward[2]
    nft = [r for r in nft_chain(nft_text(rs), "filter_forward") if "queue" in r]
    assert [re.search(r"queue num (\d+)", r).group(1) for r in nft][:3] == ["11", "12", "10"]  # type: ignore[union-attr]


# --- connmark save -------------------------------------------------------------------------

def _mark(rule: str, option: str) -> tuple[int, int]:
    m = re.search(re.escape(option) + r" (0x[0-9a-f]+)/(0x[0-9a-f]+)", rule)
    assert m, rule
    return int(m.group(1), 16), int(m.group(2), 16)


@pytest.mark.parametrize("fam", FAMS)
def test_connmark_save_rule(fam: str) -> None:
    mangle = tables(iptables_text(fam, Ruleset(CLOSED, IFACES)))["mangle"]
    saves = [r for r in appended(mangle, "PINHOLE-POSTROUTING") if "-j CONNMARK --save-mark" in r]
    assert len(saves) == 1
    save = saves[0]
    # every admitted flow, kernel or user mode: any mode bit set
    assert f"-m mark ! --mark 0x00000000/{MARK_MODE:#010x}" in save
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
def test_no_source_network_snat_without_nat(fam: str) -> None:
    """Without NAT, only flows marked for an external address (redirected flows) are
    source-translated: one rule per external address of the family, by mark."""
    nat = tables(iptables_text(fam, Ruleset(CLOSED, IFACES)))["nat"]
    rules = appended(nat, "PINHOLE-POSTROUTING")
    assert not any(" -s " in r for r in rules), rules
    assert rules == [
        f"-A PINHOLE-POSTROUTING -m mark --mark {1 << 24:#010x}/{MARK_SNAT:#010x} -o ext0 "
        f"-j SNAT --to-source {FIRST_EXTERNAL[fam]}",
        f"-A PINHOLE-POSTROUTING -m mark --mark {2 << 24:#010x}/{MARK_SNAT:#010x} -o ext0 "
        f"-j SNAT --to-source {OTHER_EXTERNAL[fam]}",
    ]
    # The mark that selects an address is the one an admitting verdict sets for it.
    for index, rule in enumerate(rules):
        value, mask = _mark(rule, "-m mark --mark")
        assert mask == MARK_SNAT and value == mark_for(False, False, index) & MARK_SNAT
    for network in NETWORKS[fam]:
        assert network not in "\n".join(nat)
    assert "-I POSTROUTING 1 -j PINHOLE-POSTROUTING" in nat
    assert not any("PREROUTING" in r for r in nat)  # redirects' DNAT is in the maps table


@pytest.mark.parametrize("fam", FAMS)
def test_mark_based_snat_precedes_source_network_snat(fam: str) -> None:
    """A redirected flow marked for the second address must not be caught by the
    source-network rule that sends the rest out of the first."""
    rules = appended(tables(iptables_text(fam, Ruleset(CLOSED, IFACES, True)))["nat"], "PINHOLE-POSTROUTING")
    by_mark = [i for i, r in enumerate(rules) if "-m mark --mark" in r]
    by_source = [i for i, r in enumerate(rules) if " -s " in r]
    assert len(by_mark) == 2 and len(by_source) == len(NETWORKS[fam])
    assert max(by_mark) < min(by_source)
    assert len(rules) == len(by_mark) + len(by_source)


def test_no_mark_based_snat_without_an_external_address_of_the_family() -> None:
    v4only = Interfaces(IFACES.internal, IFACES.external, IFACES.internal_networks,
                        (ipaddress.ip_address("198.51.100.1"),), IFACES.internal_addresses)
    nat = tables(iptables_text("ipv6", Ruleset(CLOSED, v4only)))["nat"]
    assert appended(nat, "PINHOLE-POSTROUTING") == []
    assert appended(tables(iptables_text("ipv4", Ruleset(CLOSED, v4only)))["nat"],
                    "PINHOLE-POSTROUTING") == [
        f"-A PINHOLE-POSTROUTING -m mark --mark 0x01000000/{MARK_SNAT:#010x} -o ext0 "
        "-j SNAT --to-source 198.51.100.1"]


@pytest.mark.parametrize("fam", FAMS)
def test_snat_per_internal_network_to_the_first_external_address(fam: str) -> None:
    nat = tables(iptables_text(fam, Ruleset(CLOSED, IFACES, True)))["nat"]
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
    rules = appended(tables(iptables_text(fam, Ruleset(CLOSED, IFACES, True)))["nat"], "PINHOLE-POSTROUTING")
    version = 4 if fam == "ipv4" else 6
    for r in rules:
        address = r.rsplit("--to-source ", 1)[1]
        assert ipaddress.ip_address(address).version == version
    assert not any(f"-s {n} " in r and OTHER_EXTERNAL[fam] in r for r in rules for n in NETWORKS[fam])


def test_snat_on_every_external_interface() -> None:
    two = Interfaces(IFACES.internal, {"ext0": 4, "ext1": 5}, IFACES.internal_networks,
                     IFACES.external_addresses)
    rules = [r for r in appended(tables(iptables_text("ipv4", Ruleset(CLOSED, two, True)))["nat"],
                                 "PINHOLE-POSTROUTING") if " -s " in r]
    assert sorted(rules) == sorted(
        f"-A PINHOLE-POSTROUTING -s {n} -o {ext} -j SNAT --to-source 198.51.100.1"
        for n in NETWORKS["ipv4"] for ext in ("ext0", "ext1"))


def test_no_snat_without_an_external_address_of_the_family() -> None:
    v4only = Interfaces(IFACES.internal, IFACES.external, IFACES.internal_networks,
                        (ipaddress.ip_address("198.51.100.1"),))
    text = iptables_text("ipv6", Ruleset(CLOSED, v4only, True))
    assert "SNAT" not in text
    tables(text)  # still well-formed


# --- hygiene: only our chains ---------------------------------------------------------------

@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("nat", [False, True])
@pytest.mark.parametrize("settings", [CLOSED, OPEN], ids=["closed", "open"])
def test_every_chain_is_ours(fam: str, nat: bool, settings: DataplaneSettings) -> None:
    text = iptables_text(fam, Ruleset(settings, IFACES, nat))
    parsed = tables(text)
    # nat too without NAT: kernel-mode redirects and redirected flows' SNAT live there
    assert set(parsed) == {"raw", "filter", "mangle", "nat"}
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

def nft_chain(text: str, name: str) -> list[str]:
    """The statements of one chain of a rendered nft table (its type line included)."""
    lines = text.splitlines()
    start = lines.index(f"  chain {name} {{")
    end = lines.index("  }", start)
    return [line.strip() for line in lines[start + 1:end]]


def test_nft_fail_closed_and_open() -> None:
    closed = nft_text(Ruleset(CLOSED, IFACES))
    opened = nft_text(Ruleset(OPEN, IFACES))
    assert "queue num 3" in closed and "bypass" not in closed
    assert "\n    drop\n" in closed
    forward = nft_chain(opened, "filter_forward")
    # user-mode flows, new flows, the rest
    assert sum("queue num 3 bypass" in line for line in forward) == 3
    assert forward[-1] == "queue num 3 bypass"
    assert nft_chain(closed, "filter_forward")[-1] == "drop"
    assert "\n    drop\n" not in opened
    assert closed.startswith(f"table inet {dataplane.NFT_TABLE} {{")
    assert closed.count("{") == closed.count("}")


def test_nft_rewritten_packets_accepted_before_any_queue() -> None:
    for settings in (CLOSED, OPEN):
        forward = nft_chain(nft_text(Ruleset(settings, IFACES)), "filter_forward")
        rewritten = forward.index(f"meta mark and {MARK_REWRITTEN:#010x} == {MARK_REWRITTEN:#010x} accept")
        kernel = forward.index(f"ct mark and {MARK_MODE:#010x} == {MARK_KERNEL:#010x} accept")
        first_queue = next(i for i, line in enumerate(forward) if "queue num" in line)
        assert kernel < rewritten < first_queue


def test_nft_nat() -> None:
    routed = nft_text(Ruleset(CLOSED, IFACES))
    # Without NAT: no source-network SNAT, only the mark-based rules of redirected flows.
    assert "saddr" not in "\n".join(nft_chain(routed, "source_nat"))
    assert nft_chain(routed, "source_nat")[1:] == [
        'meta nfproto ipv4 meta mark and 0x0f000000 == 0x01000000 oifname "ext0" snat ip to 198.51.100.1',
        'meta nfproto ipv4 meta mark and 0x0f000000 == 0x02000000 oifname "ext0" snat ip to 198.51.100.2',
        'meta nfproto ipv6 meta mark and 0x0f000000 == 0x01000000 oifname "ext0" snat ip6 to 2001:db8:2::1',
        'meta nfproto ipv6 meta mark and 0x0f000000 == 0x02000000 oifname "ext0" snat ip6 to 2001:db8:2::2',
    ]
    text = nft_text(Ruleset(CLOSED, IFACES, True))
    for n in NETWORKS["ipv4"]:
        assert f'ip saddr {n} oifname "ext0" snat ip to 198.51.100.1' in text
    assert 'ip6 saddr 2001:db8:1::/64 oifname "ext0" snat ip6 to 2001:db8:2::1' in text
    assert 'snat ip to 198.51.100.2' in text  # the mark-based rules stay
    assert text.count("{") == text.count("}")


# Words nft's grammar reserves: a chain or map named so would not parse.
NFT_KEYWORDS = {
    "table", "chain", "map", "set", "element", "rule", "type", "hook", "priority", "policy",
    "filter", "nat", "route", "raw", "mangle", "prerouting", "input", "forward", "output",
    "postrouting", "ingress", "egress", "accept", "drop", "queue", "reject", "redirect", "dnat",
    "snat", "masquerade", "mark", "meta", "ct", "ip", "ip6", "inet", "tcp", "udp", "counter",
    "log", "limit", "return", "jump", "goto", "continue", "flags", "timeout", "elements",
}


def test_nft_chains_and_maps() -> None:
    text = nft_text(Ruleset(CLOSED, IFACES))
    maps_text = render_nft_maps(Ruleset(CLOSED, IFACES))
    chains = [name for t in (text, maps_text) for name in re.findall(r"^  chain (\S+) \{$", t, re.M)]
    maps = re.findall(r"^  map (\S+) \{", maps_text, re.M)
    sets = re.findall(r"^  set (\S+) \{", text, re.M)
    map_sets = re.findall(r"^  set (\S+) \{", maps_text, re.M)
    assert {"raw_prerouting", "filter_input", "filter_forward", "redirect_dnat", "grants"} <= set(chains)
    assert set(maps) == {"redirect_mark_ip", "redirect_to_ip", "redirect_mark_ip6", "redirect_to_ip6",
                         "bind_to_ip", "bind_to_ip6", "bind_from_ip", "bind_from_ip6",
                         "grant_mark_ip", "grant_mark_ip6"}
    assert set(map_sets) == {"grant_ip", "grant_ip6", "new_flow_rate_ip", "new_flow_rate_ip6",
                             "flows_ip", "flows_ip6"}
    assert "map " not in text  # per-grant state lives in the maps table only
    assert len(chains) == len(set(chains))
    for name in [*chains, *maps, *sets, *map_sets]:
        assert name not in NFT_KEYWORDS, name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
    # every map or set a rule looks up exists
    assert set(re.findall(r"@(\w+)", maps_text)) == {*maps, *map_sets}
    assert set(re.findall(r"@(\w+)", text)) == set(sets)
    assert maps_text.startswith(f"table inet {dataplane.MAPS_TABLE} {{")
    assert "map redirect_mark_ip { type ipv4_addr . ipv4_addr . inet_proto . inet_service : mark; }" \
        in maps_text
    assert ("map redirect_to_ip6 { type ipv6_addr . ipv6_addr . inet_proto . inet_service : "
            "ipv6_addr . inet_service; }") in maps_text
    assert nft_chain(text, "raw_prerouting")[0] == "type filter hook prerouting priority raw; policy accept;"
    assert nft_chain(text, "filter_input")[0] == "type filter hook input priority filter; policy accept;"
    dnat = nft_chain(maps_text, "redirect_dnat")
    assert dnat[0] == "type nat hook prerouting priority dstnat; policy accept;"
    assert dnat[1:] == [
        line for p, k in (("ip", "ip saddr . ip daddr . meta l4proto . th dport"),
                          ("ip6", "ip6 saddr . ip6 daddr . meta l4proto . th dport"))
        for line in (f"ct state new meta mark set {k} map @redirect_mark_{p} dnat {p} to {k} "
                     f"map @redirect_to_{p}",
                     f"ct state new dnat {p} to {p} daddr . meta l4proto . th dport map @bind_to_{p}")]
    # a bind's flow that is to come from the fw: source NAT once admitted (after the forward
    # hook), looked up by the bind's address (where the flow went first) and the client's port
    assert "map bind_from_ip6 { type ipv6_addr . ipv6_addr . inet_proto . inet_service : ipv6_addr; }" \
        in maps_text
    snat = nft_chain(maps_text, "bind_snat")
    assert snat == ["type nat hook postrouting priority srcnat; policy accept;",
                    *(f"ct state new snat {p} to ct original {p} daddr . {p} daddr . meta l4proto . "
                      f"th dport map @bind_from_{p}" for p in ("ip", "ip6"))]
    assert maps_text.count("{") == maps_text.count("}")


@pytest.mark.parametrize("fail_open", [False, True])
def test_nft_raw_queues_only_user_redirect_ports(fail_open: bool) -> None:
    text = nft_text(Ruleset(OPEN_RANGES if fail_open else RANGES, IFACES))
    queue = "queue num 3" + (" bypass" if fail_open else "")
    assert nft_chain(text, "raw_prerouting")[2:] == [
        'iifname "int0" ip daddr 192.0.2.1 meta l4proto { tcp, udp } th dport 50100-50199 ' + queue,
        'iifname "int1" ip daddr 203.0.113.1 meta l4proto { tcp, udp } th dport 50100-50199 ' + queue,
        'iifname "int0" ip6 daddr 2001:db8:1::1 meta l4proto { tcp, udp } th dport 50100-50199 ' + queue,
    ]


def test_nft_input_drops_both_redirect_ranges() -> None:
    text = nft_text(Ruleset(RANGES, IFACES))
    assert sorted(line for line in nft_chain(text, "filter_input") if "th dport" in line) == sorted(
        f"{p} daddr {a} meta l4proto {{ tcp, udp }} th dport {ports} drop"
        for p, fam in (("ip", "ipv4"), ("ip6", "ipv6")) for _, a in INTERNAL_ADDRESSES[fam]
        for ports in ("50000-50099", "50100-50199"))


def test_nft_without_internal_addresses_has_empty_redirect_chains() -> None:
    bare = Interfaces(IFACES.internal, IFACES.external, IFACES.internal_networks,
                      IFACES.external_addresses)
    text = nft_text(Ruleset(CLOSED, bare))
    assert not any("queue" in line for line in nft_chain(text, "raw_prerouting"))
    assert not any("th dport" in line for line in nft_chain(text, "filter_input"))
    assert text.count("{") == text.count("}")


# --- redirect ports in the base rules --------------------------------------------------------


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("fail_open", [False, True])
def test_raw_queues_only_the_user_redirect_ports(fam: str, fail_open: bool) -> None:
    settings = OPEN_RANGES if fail_open else RANGES
    raw = tables(iptables_text(fam, Ruleset(settings, IFACES)))["raw"]
    bypass = " --queue-bypass" if fail_open else ""
    assert [r for r in appended(raw, "PINHOLE-PREROUTING") if "NFQUEUE" in r] == [
        f"-A PINHOLE-PREROUTING -i {name} -d {address} -p {proto} --dport 50100:50199 "
        f"-j NFQUEUE --queue-num 3{bypass}"
        for name, address in INTERNAL_ADDRESSES[fam] for proto in ("tcp", "udp")]
    assert ":PINHOLE-PREROUTING - [0:0]" in raw
    assert "-I PREROUTING 1 -j PINHOLE-PREROUTING" in raw
    assert "50000" not in "\n".join(raw)  # kernel-mode ports are not queued before conntrack


@pytest.mark.parametrize("fam", FAMS)
def test_default_user_redirect_ports_are_queued(fam: str) -> None:
    raw = [r for r in appended(tables(iptables_text(fam, Ruleset(CLOSED, IFACES)))["raw"],
                               "PINHOLE-PREROUTING") if "NFQUEUE" in r]
    assert raw and all("--dport 63000:64999 -j NFQUEUE --queue-num 3" in r for r in raw)
    assert not any("--queue-bypass" in r for r in raw)


@pytest.mark.parametrize("fam", FAMS)
def test_input_drops_both_redirect_ranges(fam: str) -> None:
    f = tables(iptables_text(fam, Ruleset(RANGES, IFACES)))["filter"]
    assert sorted(r for r in appended(f, "PINHOLE-INPUT") if "--dport" in r) == sorted(
        f"-A PINHOLE-INPUT -d {address} -p {proto} --dport {ports} -j DROP"
        for _, address in INTERNAL_ADDRESSES[fam] for proto in ("tcp", "udp")
        for ports in ("50000:50099", "50100:50199"))
    assert ":PINHOLE-INPUT - [0:0]" in f
    assert "-I INPUT 1 -j PINHOLE-INPUT" in f


def test_no_internal_addresses_no_redirect_port_rules() -> None:
    bare = Interfaces(IFACES.internal, IFACES.external, IFACES.internal_networks,
                      IFACES.external_addresses)
    parsed = tables(iptables_text("ipv4", Ruleset(CLOSED, bare)))
    assert not any("NFQUEUE" in r for r in appended(parsed["raw"], "PINHOLE-PREROUTING"))
    assert appended(parsed["filter"], "PINHOLE-INPUT") == input_base("ipv4")


def test_interfaces_internal_addresses() -> None:
    assert [(n, str(a)) for n, a in IFACES.internal_of("ipv4")] == \
        [("int0", "192.0.2.1/24"), ("int1", "203.0.113.1/24")]
    assert [(n, str(a)) for n, a in IFACES.internal_of("ipv6")] == [("int0", "2001:db8:1::1/64")]
    assert IFACES.names == ("int0", "int1", "ext0")


def test_interfaces_that_leave_clients_stranded_are_warned_of() -> None:
    """An internal interface without a global address (its packets all fail rule 17), and in
    NAT a family with internal addresses but no external one (its primaries leave
    untranslated)."""
    assert IFACES.warnings(nat=True) == []
    bare = dataclasses.replace(
        IFACES, internal={**IFACES.internal, "int2": 5},
        external_addresses=tuple(a for a in IFACES.external_addresses if a.version == 4))
    assert bare.warnings(nat=False) == [
        "internal interface int2 has no global address: every packet from it is dropped "
        "(no network is behind it)"]
    assert bare.warnings(nat=True)[1:] == [
        "NAT, but no external interface has a global IPv6 address: IPv6 primaries leave "
        "untranslated, from their clients' addresses, and grants for their secondaries are "
        "refused"]


# --- marks -----------------------------------------------------------------------------------

def test_mark_layout_bits_do_not_overlap() -> None:
    parts = [MARK_MODE, MARK_ONE_WAY, MARK_SNAT, MARK_REWRITTEN, MARK_PORT, MARK_LOCAL, MARK_LIVE,
             MARK_WORKER]
    assert sum(parts) == MARK_OWNED
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            assert a & b == 0, (hex(a), hex(b))
    # the connmark keeps the flow's bits, not the packet-only ones
    assert MARK_MASK & (MARK_REWRITTEN | MARK_PORT | MARK_LOCAL) == 0
    # a flow to a Firewall client's bind keeps its mode, the local bit and the bind's port
    assert MARK_LOCAL_KEPT == MARK_MODE | MARK_LOCAL | MARK_PORT


def test_local_mark() -> None:
    assert local_mark(20000) == MARK_KERNEL | MARK_LOCAL | 20000
    assert local_mark(65535) & ~MARK_LOCAL_KEPT == 0
    assert local_mark(20000) != local_mark(20001)
    assert redirect_port(local_mark(20000)) == 20000  # never read as one: INPUT is not decided so


def test_mark_for() -> None:
    assert mark_for(False, False, None) == MARK_KERNEL
    assert mark_for(True, False, None) == MARK_USER
    assert mark_for(True, True, None) == MARK_USER | MARK_ONE_WAY
    assert mark_for(False, True, None) & MARK_SNAT == 0
    assert mark_for(False, False, 0) == MARK_KERNEL | 0x01000000
    assert mark_for(True, False, 2) == MARK_USER | 0x03000000
    assert mark_for(False, True, 14) == MARK_KERNEL | MARK_ONE_WAY | 0x0F000000
    for args in [(u, o, s) for u in (False, True) for o in (False, True) for s in (None, 0, 5)]:
        mark = mark_for(*args)
        assert mark & ~MARK_MASK == 0, args  # never a packet-only bit
        assert redirect_port(mark) is None


def test_redirect_port() -> None:
    assert redirect_port(0) is None
    assert redirect_port(61000) == 61000
    assert redirect_port(0xFFFF) == 65535
    assert redirect_port(MARK_KERNEL | MARK_REWRITTEN | 0x01000000 | 61234) == 61234
    assert redirect_port(MARK_USER | MARK_REWRITTEN | MARK_SNAT) is None


# --- per-grant NAT: map elements -------------------------------------------------------------

RULE4 = RedirectRule(6, ipaddress.ip_address("192.0.2.11"), ipaddress.ip_address("192.0.2.1"),
                     61000, ipaddress.ip_address("198.51.100.21"), 2121)
RULE6 = RedirectRule(17, ipaddress.ip_address("2001:db8:1::11"), ipaddress.ip_address("2001:db8:1::1"),
                     61001, ipaddress.ip_address("2001:db8:2::21"), 53)
BIND4 = BindRule(6, ipaddress.ip_address("198.51.100.1"), 40000, ipaddress.ip_address("192.0.2.11"),
                 40000)
BIND6 = BindRule(17, ipaddress.ip_address("2001:db8:2::1"), 20001,
                 ipaddress.ip_address("2001:db8:1::11"), 41000)
# A bind whose flow reaches the client from the fw's internal address: in NAT, and routed
# (where the bind is the client's own address and port)
FROM_FW4 = BindRule(6, ipaddress.ip_address("198.51.100.1"), 20002, ipaddress.ip_address("192.0.2.11"),
                    40000, ipaddress.ip_address("192.0.2.1"))
FROM_FW6 = BindRule(6, ipaddress.ip_address("2001:db8:1::11"), 40001, ipaddress.ip_address("2001:db8:1::11"),
                    40001, ipaddress.ip_address("2001:db8:1::1"))


def test_redirect_rule_elements() -> None:
    """Keys and values as the kernel holds a concatenation: each part in a 4-byte register,
    addresses and ports in network order, the mark in host order (nft's mark type)."""
    key4 = bytes([192, 0, 2, 11, 192, 0, 2, 1, 6, 0, 0, 0, 0xEE, 0x48, 0, 0])
    assert RULE4.elements() == [
        ("redirect_mark_ip", key4, (61000).to_bytes(4, sys.byteorder)),
        ("redirect_to_ip", key4, bytes([198, 51, 100, 21, 0x08, 0x49, 0, 0]))]
    (mark, key6, value6), (to, key6b, target6) = RULE6.elements()
    assert (mark, to) == ("redirect_mark_ip6", "redirect_to_ip6") and key6 == key6b
    assert key6 == (ipaddress.ip_address("2001:db8:1::11").packed
                    + ipaddress.ip_address("2001:db8:1::1").packed + bytes([17, 0, 0, 0, 0xEE, 0x49, 0, 0]))
    assert redirect_port(int.from_bytes(value6, sys.byteorder)) == 61001
    assert target6 == ipaddress.ip_address("2001:db8:2::21").packed + bytes([0, 53, 0, 0])


def test_securenat_bind_elements() -> None:
    """A SecureNAT bind in NAT: new flows to the external port go on to the client's."""
    assert BIND4.elements() == [("bind_to_ip", bytes([198, 51, 100, 1, 6, 0, 0, 0, 0x9C, 0x40, 0, 0]),
                                 bytes([192, 0, 2, 11, 0x9C, 0x40, 0, 0]))]
    ((name, key, value),) = BIND6.elements()
    assert name == "bind_to_ip6"
    assert key == ipaddress.ip_address("2001:db8:2::1").packed + bytes([17, 0, 0, 0, 0x4E, 0x21, 0, 0])
    assert value == ipaddress.ip_address("2001:db8:1::11").packed + bytes([0xA0, 0x28, 0, 0])


def test_a_bind_from_the_fw_has_a_source_nat_element() -> None:
    """APP-FTP-03: a bind whose flow is to reach the client from the fw: besides the NAT
    to the client's port (in NAT), an element keyed by the bind's address, the client's
    address, protocol and port, whose value is the fw's address the flow then comes from.
    Routed, the bind is the client's own port: the source element alone."""
    assert FROM_FW4.elements() == [
        ("bind_to_ip", bytes([198, 51, 100, 1, 6, 0, 0, 0, 0x4E, 0x22, 0, 0]),
         bytes([192, 0, 2, 11, 0x9C, 0x40, 0, 0])),
        ("bind_from_ip", bytes([198, 51, 100, 1, 192, 0, 2, 11, 6, 0, 0, 0, 0x9C, 0x40, 0, 0]),
         bytes([192, 0, 2, 1]))]
    client = ipaddress.ip_address("2001:db8:1::11").packed
    assert FROM_FW6.elements() == [
        ("bind_from_ip6", client + client + bytes([6, 0, 0, 0, 0x9C, 0x41, 0, 0]),
         ipaddress.ip_address("2001:db8:1::1").packed)]


def test_elements_name_the_maps_the_table_declares() -> None:
    declared = set(re.findall(r"^  map (\S+) ", render_nft_maps(Ruleset(CLOSED, IFACES)), re.M))
    used = {name for rule in (RULE4, RULE6, BIND4, BIND6, FROM_FW4, FROM_FW6)
            for name, _, _ in rule.elements()}
    assert used == declared - {"grant_mark_ip", "grant_mark_ip6"}


# --- replacing an earlier run's rules in one transaction --------------------------------------

def test_stale_rules_are_replaced_in_the_same_transaction() -> None:
    """A crashed run's jumps are deleted, and its chains declared (which flushes them), in
    the restore input that installs the new rules: there is no moment without rules."""
    text = iptables_text("ipv4", Ruleset(CLOSED, IFACES))
    stale = {"filter": ([["FORWARD", "-j", "PINHOLE-FORWARD"]], {"PINHOLE-FORWARD", "PINHOLE-OLD"}),
             "raw": ([], set())}
    replacing = dataplane._replacing(text, stale)
    lines = replacing.splitlines()
    f = tables(replacing)["filter"]
    # the stale jump goes before the new one is inserted, after every chain declaration
    delete = f.index("-D FORWARD -j PINHOLE-FORWARD")
    assert delete < f.index("-I FORWARD 1 -j PINHOLE-FORWARD")
    assert all(not line.startswith(":") for line in f[delete:])
    # a stale chain the new rules do not have is declared (flushed) too, and deleted in the
    # same transaction once its jump is gone, last in its table
    assert ":PINHOLE-OLD - [0:0]" in f
    assert dataplane._declared(replacing, "filter") - dataplane._declared(text, "filter") == {"PINHOLE-OLD"}
    assert f[-1] == "-X PINHOLE-OLD" and "-X PINHOLE-FORWARD" not in f
    # nothing else changed: the new rules are all there, in order
    assert [line for line in lines if not line.startswith(("-D", "-X")) and
            line != ":PINHOLE-OLD - [0:0]"] == text.splitlines()
    assert dataplane._replacing(text, {}) == text


SAVED = """# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [3:180]
:PINHOLE-FORWARD - [0:0]
:PINHOLE-INPUT - [0:0]
:operators-own - [0:0]
-A INPUT -j PINHOLE-INPUT
-A FORWARD -i eth9 -j operators-own
-A FORWARD -j PINHOLE-FORWARD
-A PINHOLE-FORWARD -m comment --comment "-j PINHOLE-X" -j DROP
COMMIT
*security
:PINHOLE-ODD - [0:0]
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
COMMIT
"""


def test_an_iptables_save_listing_gives_our_chains_and_the_jumps_to_them() -> None:
    """Per table, the PINHOLE chains and the built-in chains' jumps to them; the operator's
    chains and jumps, our chains' own rules and tables of no concern are left out."""
    ours = dataplane.parse_saved(SAVED)
    assert ours["filter"] == ([["INPUT", "-j", "PINHOLE-INPUT"], ["FORWARD", "-j", "PINHOLE-FORWARD"]],
                              {"PINHOLE-FORWARD", "PINHOLE-INPUT"})
    assert ours["nat"] == ours["raw"] == ours["mangle"] == ([], set())
    assert "security" not in ours


def test_an_unload_is_one_transaction_that_leaves_nothing_of_ours() -> None:
    """Jumps deleted, chains flushed and deleted, table by table, in one restore input; a
    table with nothing of ours is not named (restoring it would make it)."""
    unload = tables(dataplane.unloading(dataplane.parse_saved(SAVED)))
    assert unload["filter"] == [":PINHOLE-FORWARD - [0:0]", ":PINHOLE-INPUT - [0:0]",
                                "-D INPUT -j PINHOLE-INPUT", "-D FORWARD -j PINHOLE-FORWARD",
                                "-X PINHOLE-FORWARD", "-X PINHOLE-INPUT"]
    assert list(unload) == ["filter"]


# --- Firewall clients' binds and the fw's own ICMP errors -------------------------------------

@pytest.mark.parametrize("fam", FAMS)
def test_new_flows_to_bind_ports_go_to_the_queue(fam: str) -> None:
    """With a SOCKS service, a new flow to a bind port on an external address is queued
    (the enforcer drops what no approved bind admits); what is no flow at all is dropped."""
    assert "--dport 20000:20099" not in iptables_text(fam, Ruleset(CLOSED, IFACES, True))
    rules = appended(tables(iptables_text(fam, Ruleset(CLOSED, IFACES, True, (20000, 20099))))["filter"],
                     "PINHOLE-INPUT")
    binds = [r for r in rules if "--dport 20000:20099" in r]
    externals = IFACES.external_of(fam)
    # tcp and udp: the new beyond a client's caps dropped, the new queued, the invalid
    # dropped; udp first: an admitted flow's datagrams to a bound socket
    assert len(binds) == 9 * len(externals)
    for address in externals:
        for proto in ("tcp", "udp"):
            mine = [r for r in binds if f"-d {address} " in r and f"-p {proto} " in r]
            if proto == "udp":
                admitted = mine.pop(0)
                assert admitted.endswith(f"-m connmark --mark {MARK_LOCAL:#010x}/{MARK_LOCAL:#010x} "
                                         "-m socket -j ACCEPT")
            assert [r.split("--ctstate ")[1].split()[0] for r in mine] == \
                ["NEW", "NEW", "NEW", "INVALID,UNTRACKED"]
            assert "hashlimit" in mine[0] and "connlimit" in mine[1]
            assert mine[2].endswith("-j NFQUEUE --queue-num 3") and mine[3].endswith("-j DROP")
    assert rules.index(binds[-1]) < rules.index(input_base(fam)[0])  # before the base's drop
    nft = nft_text(Ruleset(CLOSED, IFACES, True, (20000, 20099)))
    assert nft.count("th dport 20000-20099 ct state new queue num 3") == len(IFACES.external_addresses)
    admitted = [line for line in nft_chain(nft, "filter_input") if "socket" in line]
    assert admitted == [f"{'ip' if a.version == 4 else 'ip6'} daddr {a} udp dport 20000-20099 ct mark and "
                        f"{MARK_LOCAL:#010x} == {MARK_LOCAL:#010x} socket wildcard 0 accept"
                        for a in sorted(IFACES.external_addresses, key=lambda a: a.version)]
    first_cap = next(i for i, line in enumerate(nft_chain(nft, "filter_input")) if "limit rate" in line)
    assert nft_chain(nft, "filter_input").index(admitted[0]) < first_cap


@pytest.mark.parametrize("fam", FAMS)
def test_a_flow_to_a_firewall_client_s_bind_keeps_its_mark(fam: str) -> None:
    """The verdict marks a flow to a Firewall client's UDP bind (local_mark); a chain of the
    nat table's input hook, after the filter table's, copies it to the connmark for the
    admitted first packet (nat sees no other); without a SOCKS service there is none."""
    assert "PINHOLE-LOCAL" not in tables(iptables_text(fam, Ruleset(CLOSED, IFACES)))["nat"]
    nat = tables(iptables_text(fam, Ruleset(CLOSED, IFACES, True, (20000, 20099))))["nat"]
    assert ":PINHOLE-LOCAL - [0:0]" in nat and "-I INPUT 1 -j PINHOLE-LOCAL" in nat
    assert appended(nat, "PINHOLE-LOCAL") == [
        f"-A PINHOLE-LOCAL -m mark --mark {MARK_LOCAL:#010x}/{MARK_LOCAL:#010x} -j CONNMARK --save-mark "
        f"--nfmask {MARK_LOCAL_KEPT:#010x} --ctmask {MARK_LOCAL_KEPT:#010x}"]
    assert "save_local_mark" not in nft_text(Ruleset(CLOSED, IFACES))
    chain = nft_chain(nft_text(Ruleset(CLOSED, IFACES, True, (20000, 20099))), "save_local_mark")
    assert chain == ["type filter hook input priority filter + 10; policy accept;",
                     f"meta mark and {MARK_LOCAL:#010x} == {MARK_LOCAL:#010x} "
                     f"ct mark set meta mark and {MARK_LOCAL_KEPT:#010x}"]
    lockdown = iptables_text(fam, Ruleset(CLOSED, IFACES, True, (20000, 20099), working=False))
    assert "CONNMARK" not in lockdown and "socket" not in lockdown


@pytest.mark.parametrize("settings", [CLOSED, OPEN], ids=["fail-closed", "fail-open"])
@pytest.mark.parametrize("fam", FAMS)
def test_the_socks_service_and_its_relay_ports_drop_what_comes_from_outside(
        fam: str, settings: DataplaneSettings) -> None:
    """FWC-01 while the enforcer runs, fail_open included (no base): the SOCKS port drops
    what arrives on an external interface for any of the fw's addresses, and the relay
    ports (UDP, the bind range) what arrives there for each internal address, TCP and UDP,
    before anything could accept or answer it; from inside they are open."""
    rules = appended(tables(iptables_text(fam, Ruleset(settings, IFACES, False, (20000, 20099),
                                                      socks_port=1080)))["filter"], "PINHOLE-INPUT")
    assert [r for r in rules if "1080" in r] == \
        [f"-A PINHOLE-INPUT -i ext0 -p {proto} --dport 1080 -j DROP"
         for proto in ("tcp", "udp")]
    assert [r for r in rules if "-i ext0 -d" in r] == \
        [f"-A PINHOLE-INPUT -i ext0 -d {address} -p {proto} --dport 20000:20099 -j DROP"
         for _, address in INTERNAL_ADDRESSES[fam] for proto in ("tcp", "udp")]
    assert not any("-i int" in r and "-j DROP" in r for r in rules)
    without = iptables_text(fam, Ruleset(settings, IFACES, False, None, socks_port=None))
    assert "--dport 1080" not in without
    nft = nft_chain(nft_text(Ruleset(settings, IFACES, False, (20000, 20099), socks_port=1080)),
                    "filter_input")
    assert 'iifname "ext0" meta l4proto { tcp, udp } th dport 1080 drop' in nft
    for _, address in INTERNAL_ADDRESSES[fam]:
        proto = "ip" if fam == "ipv4" else "ip6"
        assert (f'iifname "ext0" {proto} daddr {address} meta l4proto {{ tcp, udp }} '
                "th dport 20000-20099 drop") in nft


@pytest.mark.parametrize("fam", FAMS)
def test_the_fw_s_icmp_errors_about_user_mode_flows_are_queued(fam: str) -> None:
    (rule,) = appended(tables(iptables_text(fam, Ruleset(CLOSED, IFACES)))["filter"], "PINHOLE-OUTPUT")
    assert f"-p {'icmp' if fam == 'ipv4' else 'ipv6-icmp'} " in rule
    assert "--ctstate RELATED --ctstatus CONFIRMED" in rule
    assert f"--mark {MARK_USER:#010x}/{MARK_MODE:#010x}" in rule and rule.endswith("--queue-num 3")


# --- the base: lockdown (rule 15) ------------------------------------------------------------

def base_head() -> list[str]:
    """The forward base's head: connections a conntrack helper expected are dropped (the
    enforcer admitted none, whatever connmark they inherited), replies of one-way flows
    too, and kernel-mode flows pass."""
    return ["-A PINHOLE-FORWARD -m conntrack --ctstatus EXPECTED -j DROP",
            f"-A PINHOLE-FORWARD -m connmark --mark {MARK_ONE_WAY:#010x}/{MARK_ONE_WAY:#010x} "
            "-m conntrack --ctdir REPLY -j DROP",
            f"-A PINHOLE-FORWARD -m connmark --mark {MARK_KERNEL:#010x}/{MARK_MODE:#010x} -j ACCEPT"]


def input_base(fam: str, settings: DataplaneSettings = CLOSED) -> list[str]:
    nd = [f"-A PINHOLE-INPUT -p ipv6-icmp --icmpv6-type {t} -m hl --hl-eq 255 -j ACCEPT"
          for t in (133, 134, 135, 136)] if fam == "ipv6" else []
    return ["-A PINHOLE-INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            "-A PINHOLE-INPUT -i lo -j ACCEPT", *nd,
            "-A PINHOLE-INPUT -i int0 -j ACCEPT", "-A PINHOLE-INPUT -i int1 -j ACCEPT",
            *(f"-A PINHOLE-INPUT -p {'tcp' if p == 6 else 'udp'} --dport {lo if lo == hi else f'{lo}:{hi}'} "
              "-j ACCEPT" for p, (lo, hi) in settings.open_ports),
            "-A PINHOLE-INPUT -j DROP"]


@pytest.mark.parametrize("fam", FAMS)
def test_lockdown_is_the_base_alone(fam: str) -> None:
    """What a stop leaves: kernel-mode flows go on (one-way ones still one way), nothing
    else is forwarded, the fw answers only the internal side; nothing goes to the queue."""
    text = iptables_text(fam, Ruleset(CLOSED, IFACES, True, (20000, 20099), working=False))
    parsed = tables(text)
    assert "NFQUEUE" not in text and "SNAT" not in text and "CONNMARK" not in text
    assert appended(parsed["filter"], "PINHOLE-FORWARD") == [*base_head(), "-A PINHOLE-FORWARD -j DROP"]
    assert appended(parsed["filter"], "PINHOLE-INPUT") == input_base(fam)
    assert appended(parsed["raw"], "PINHOLE-PREROUTING") == [
        f"-A PINHOLE-PREROUTING -i {name} -m rpfilter --invert -j DROP" for name in ("int0", "int1", "ext0")]
    # the tables are there, empty of our chains, so that installing this replaces the
    # working rules in them
    assert parsed["mangle"] == [] and parsed["nat"] == []
    assert ":PINHOLE-OUTPUT - [0:0]" not in parsed["filter"]


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("nat", [False, True])
def test_the_working_rules_sit_inside_the_base(fam: str, nat: bool) -> None:
    """Running, each base chain is the base's head, then the working rules, then the base's
    tail: a stop that takes the working rules away leaves exactly the lockdown."""
    settings = DataplaneSettings(queue=3, open_ports=((6, (22, 22)),))
    running = tables(iptables_text(fam, Ruleset(settings, IFACES, nat, (20000, 20099))))
    stopped = tables(iptables_text(fam, Ruleset(settings, IFACES, nat, (20000, 20099), working=False)))
    for table, chain in (("filter", "PINHOLE-FORWARD"), ("filter", "PINHOLE-INPUT"),
                         ("raw", "PINHOLE-PREROUTING")):
        base, whole = appended(stopped[table], chain), appended(running[table], chain)
        head = next((i for i, (a, b) in enumerate(zip(base, whole, strict=False)) if a != b), len(base))
        tail = len(base) - head
        assert whole[:head] == base[:head] and (tail == 0 or whole[-tail:] == base[head:]), chain
        assert len(whole) > len(base), chain
    assert appended(running["filter"], "PINHOLE-INPUT")[-3:] == [
        "-A PINHOLE-INPUT -i int1 -j ACCEPT", "-A PINHOLE-INPUT -p tcp --dport 22 -j ACCEPT",
        "-A PINHOLE-INPUT -j DROP"]


@pytest.mark.parametrize("fam", FAMS)
def test_failing_open_has_no_lockdown(fam: str) -> None:
    """fail_open: nothing drops what a dead enforcer would have judged, and the fw's own
    services are not closed (a stop removes every rule; see daemon)."""
    for working in (True, False):
        parsed = tables(iptables_text(fam, Ruleset(OPEN, IFACES, working=working)))
        assert "-A PINHOLE-FORWARD -j DROP" not in parsed["filter"]
        assert "-A PINHOLE-INPUT -j DROP" not in parsed["filter"]
    nft = nft_text(Ruleset(OPEN, IFACES, working=False))
    assert "\n    drop\n" not in nft


@pytest.mark.parametrize("fam", FAMS)
def test_reverse_path_filter_on_every_interface(fam: str) -> None:
    """Rule 17: a source not routed back through the interface it came in on is dropped
    before connection tracking, before anything is queued."""
    raw = appended(tables(iptables_text(fam, Ruleset(CLOSED, IFACES)))["raw"], "PINHOLE-PREROUTING")
    checks = [f"-A PINHOLE-PREROUTING -i {name} -m rpfilter --invert -j DROP"
              for name in ("int0", "int1", "ext0")]
    assert raw[:3] == checks and all("NFQUEUE" in r for r in raw[3:])
    assert nft_chain(nft_text(Ruleset(CLOSED, IFACES)), "raw_prerouting")[1] == \
        'iifname { "int0", "int1", "ext0" } fib saddr . iif oif missing drop'


@pytest.mark.parametrize("fam", FAMS)
def test_new_flow_caps_before_the_grants_and_the_queue(fam: str) -> None:
    """Rule 16 in the kernel: a client address's new flows beyond a rate, or beyond the
    flows the kernel tracks for it, are dropped in the grants chain (before the forward
    chain), before a grant the kernel holds is used and before the queue; for either
    backend (the maps table is native nft with both)."""
    limits = Limits(flows_per_client=77, new_flows_per_second=300)
    grants = nft_chain(render_nft_maps(Ruleset(CLOSED, IFACES, limits=limits)), "grants")
    proto = "ip" if fam == "ipv4" else "ip6"
    rate, count, grant = (next(i for i, r in enumerate(grants) if word in r)
                          for word in (f"add @new_flow_rate_{proto} {{ {proto} saddr ",
                                       f"add @flows_{proto} {{ {proto} saddr ", f"@grant_{proto} "))
    assert rate < count < grant
    fresh = (f"meta nfproto {fam} meta mark and {MARK_REWRITTEN:#010x} == 0x00000000 "
             f"ct mark and {MARK_MODE:#010x} == 0x00000000 ct state new")
    assert grants[rate] == (f"{fresh} add @new_flow_rate_{proto} {{ {proto} saddr timeout 10s "
                            "limit rate over 300/second burst 30 packets } counter drop")
    assert grants[count] == f"{fresh} add @flows_{proto} {{ {proto} saddr ct count over 77 }} counter drop"
    rs = Ruleset(CLOSED, IFACES, limits=limits)
    for forward in (appended(tables(iptables_text(fam, rs))["filter"], "PINHOLE-FORWARD"),
                    nft_chain(nft_text(rs), "filter_forward")):
        assert forward and not any(word in rule for rule in forward
                                   for word in ("hashlimit", "connlimit", "limit rate", "ct count"))
    off = render_nft_maps(Ruleset(CLOSED, IFACES, limits=Limits(new_flows_per_second=0)))
    assert "limit rate over" not in off and "ct count over" in off
    assert "burst 10 packets" in render_nft_maps(Ruleset(CLOSED, IFACES, limits=Limits(
        new_flows_per_second=20)))


def test_grants_chain() -> None:
    """A grant the kernel holds admits a new flow's first packet (a bare SYN; no IPv6
    routing header) while the enforcer lives, not a redirect's, nor a later packet of a
    flow admitted already (its connmark has a mode: conntrack calls it new until its first
    reply, and a user-mode flow must stay one): it sets the flow's mark,
    deletes the key and logs the packet to the queue's NFLOG group; each key lets one
    packet through; the sets hold as many keys as may be pending."""
    text = render_nft_maps(Ruleset(CLOSED, IFACES, limits=Limits(pending_total=1000)))
    chain = nft_chain(text, "grants")
    assert chain[:2] == ["type filter hook forward priority filter - 1; policy accept;",
                         "ct state != new accept"]  # what is not new costs one rule
    owned = MARK_LIVE | MARK_REWRITTEN | MARK_PORT
    assert chain[-4:] == [
        f"meta mark and {owned:#010x} == {MARK_LIVE:#010x} ct state new "
        f"ct mark and {MARK_MODE:#010x} == 0x00000000 {first}{rt} {k} @grant_{p} "
        f"ct mark set {k} map @grant_mark_{p} meta mark set ct mark delete @grant_{p} {{ {k} }} log group 3"
        for p, k, rt in (("ip", "ip saddr . ip daddr . meta l4proto . th dport", ""),
                         ("ip6", "ip6 saddr . ip6 daddr . meta l4proto . th dport", " exthdr rt missing"))
        for first in ("tcp flags & (fin | syn | rst | ack) == syn", "meta l4proto udp")]
    assert ("  set grant_ip6 { type ipv6_addr . ipv6_addr . inet_proto . inet_service; flags timeout; "
            "size 1000; limit rate 1/week burst 1 packets; }") in text
    assert ("  map grant_mark_ip { type ipv4_addr . ipv4_addr . inet_proto . inet_service : mark; "
            "flags timeout; size 1000; }") in text


def test_nft_lockdown() -> None:
    text = nft_text(Ruleset(CLOSED, IFACES, True, (20000, 20099), working=False))
    assert "queue" not in text and "snat" not in text and "set " not in text
    assert nft_chain(text, "filter_forward")[1:] == [
        "ct status expected drop",
        f"ct mark and {MARK_ONE_WAY:#010x} == {MARK_ONE_WAY:#010x} ct direction reply drop",
        f"ct mark and {MARK_MODE:#010x} == {MARK_KERNEL:#010x} accept", "drop"]
    assert nft_chain(text, "filter_input")[1:] == [
        "ct state established,related accept", 'iifname "lo" accept',
        "meta nfproto ipv6 icmpv6 type { 133, 134, 135, 136 } ip6 hoplimit 255 accept",
        'iifname { "int0", "int1" } accept', "drop"]
    assert text.count("{") == text.count("}")


# --- the netlink messages, against pyroute2's encoding -----------------------------------------

def _pyroute2_set_elements(name: str, elements: list[tuple[bytes, bytes]], add: bool, seq: int,
                           timeout_ms: int | None = None) -> bytes:
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
    from pyroute2.netlink.nfnetlink.nftsocket import (
        NFT_MSG_DELSETELEM,
        NFT_MSG_NEWSETELEM,
        nft_set_elem_list_msg,
    )

    def value(data: bytes) -> dict[str, object]:
        return {"attrs": [("NFTA_DATA_VALUE", data)]}

    msg = nft_set_elem_list_msg()
    msg["nfgen_family"] = 1
    msg["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if add else NFT_MSG_DELSETELEM)
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if add else 0)
    msg["header"]["sequence_number"] = seq
    msg["attrs"] = [("NFTA_SET_ELEM_LIST_TABLE", dataplane.MAPS_TABLE), ("NFTA_SET_ELEM_LIST_SET", name),
                    ("NFTA_SET_ELEM_LIST_ELEMENTS",
                     [{"attrs": [("NFTA_SET_ELEM_KEY", value(k))] + ([("NFTA_SET_ELEM_DATA", value(v))]
                                                                     if add and v else [])
                       + ([("NFTA_SET_ELEM_TIMEOUT", timeout_ms)] if add and timeout_ms is not None else [])}
                      for k, v in elements])]
    msg.encode()
    return bytes(msg.data)


@pytest.mark.parametrize("add", [True, False])
def test_set_element_messages_are_what_pyroute2_encodes(add: bool) -> None:
    """NatMaps encodes its own messages (pyroute2's encoder is too slow for the packet path):
    byte for byte what pyroute2 makes of the same message."""
    elements = [(key, value) for rule in (RULE4, BIND4) for _, key, value in rule.elements()]
    for name, chosen in (("bind_to_ip", elements[:1]), ("redirect_to_ip6", elements)):
        assert dataplane.set_elements_message(name, chosen, add, 42) == \
            _pyroute2_set_elements(name, chosen, add, 42)


@pytest.mark.parametrize("add", [True, False])
def test_set_elements_with_a_timeout_and_keys_alone_are_what_pyroute2_encodes(add: bool) -> None:
    """A set's elements (an empty value: a key alone) and a per-element timeout (kernel
    grants, bench/kernel_grants.py), byte for byte as pyroute2 encodes them."""
    keys = [key for rule in (RULE4, BIND4) for _, key, _ in rule.elements()]
    for timeout in (None, 30_000):
        for chosen in ([(k, b"") for k in keys], [(k, struct.pack("=I", 0x10000000)) for k in keys]):
            assert dataplane.set_elements_message("once_ip", chosen, add, 9,
                                                  [timeout] * len(chosen)) == \
                _pyroute2_set_elements("once_ip", chosen, add, 9, timeout)


def test_forget_by_mark_is_what_pyroute2_encodes() -> None:
    """A closed bind's flows are forgotten with ctnetlink's delete without a tuple (a flush
    filtered by mark, both families): byte for byte what pyroute2 makes of it."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
    from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_DELETE, nfct_msg

    msg = nfct_msg()
    msg["nfgen_family"] = 0
    msg["header"]["type"] = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = 7
    msg["attrs"] = [("CTA_MARK", local_mark(20001)), ("CTA_MARK_MASK", MARK_LOCAL_KEPT)]
    msg.encode()
    assert dataplane.forget_by_mark_message(local_mark(20001), MARK_LOCAL_KEPT, 7) == bytes(msg.data)


def test_batch_markers_are_what_pyroute2_encodes() -> None:
    from pyroute2.netlink import NLM_F_REQUEST
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg

    for kind in (dataplane.NFNL_MSG_BATCH_BEGIN, dataplane.NFNL_MSG_BATCH_END):
        msg = nfgen_msg()
        msg["res_id"] = NFNL_SUBSYS_NFTABLES
        msg["header"]["type"] = kind
        msg["header"]["flags"] = NLM_F_REQUEST
        msg["header"]["sequence_number"] = 9
        msg.encode()
        assert dataplane.batch_marker(kind, 9) == bytes(msg.data)


# --- what the enforcer asks of conntrack -------------------------------------------------------

def _conntrack_entry(seq: int, src: str, dst: str, dport: int) -> bytes:
    """One IPCTNL_MSG_CT_NEW message of a dump, as the kernel nests it (CTA_TUPLE_ORIG with
    the nested flag, then a reply tuple the reader must pass over)."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    v4 = a.version == 4
    nested = dataplane.NLA_F_NESTED

    def tuple_(x: bytes, y: bytes, port: int) -> bytes:
        ip = (dataplane._attribute(1 if v4 else 3, x) + dataplane._attribute(2 if v4 else 4, y))
        proto = (dataplane._attribute(1, bytes([17])) + dataplane._attribute(2, struct.pack("!H", 5555))
                 + dataplane._attribute(3, struct.pack("!H", port)))
        return dataplane._attribute(1 | nested, ip) + dataplane._attribute(2 | nested, proto)

    body = (dataplane._attribute(1 | nested, tuple_(a.packed, b.packed, dport))
            + dataplane._attribute(2 | nested, tuple_(b.packed, a.packed, 5555)))
    return dataplane._netlink((1 << 8) | 0, 0x2, seq, 2 if v4 else 10, 0, body)


def test_a_redirected_udp_flows_dump_asks_the_kernel_to_compare_ipv4_addresses_alone() -> None:
    """The kernel compares IPv6 addresses the wrong way round (an equal one is rejected):
    an IPv6 dump asks it for the family's UDP flows whose destination it translated only."""
    flags = {}
    for client, address in (("192.0.2.11", "192.0.2.1"), ("2001:db8:1::11", "2001:db8:1::1")):
        msg = dataplane.redirected_udp_message(ipaddress.ip_address(client),
                                               ipaddress.ip_address(address), 9)
        kind, flag_bits, seq = struct.unpack_from("=HHI", msg, 4)
        assert (kind, flag_bits, seq) == ((1 << 8) | dataplane.IPCTNL_MSG_CT_GET,
                                          dataplane.NLM_F_REQUEST | dataplane.NLM_F_DUMP, 9)
        assert msg[16] == (2 if client.startswith("192") else 10)  # nfgenmsg: the family
        (filter_,) = [(a, b) for kind, a, b in dataplane.netlink_attributes(msg, 20, len(msg))
                      if kind == dataplane.CTA_FILTER]
        orig = [struct.unpack_from("=I", msg, a)[0]
                for kind, a, _ in dataplane.netlink_attributes(msg, *filter_)
                if kind == dataplane.CTA_FILTER_ORIG_FLAGS]
        flags[client] = orig
        status = {kind: struct.unpack_from("!I", msg, a)[0]
                  for kind, a, _ in dataplane.netlink_attributes(msg, 20, len(msg))
                  if kind in (dataplane.CTA_STATUS, dataplane.CTA_STATUS_MASK)}
        assert status == {dataplane.CTA_STATUS: dataplane.IPS_DST_NAT,
                          dataplane.CTA_STATUS_MASK: dataplane.IPS_DST_NAT}
    assert flags == {"192.0.2.11": [0b1011], "2001:db8:1::11": [0b1000]}


class _DumpSocket:
    """A netlink socket that answers a request with the datagrams given (then nothing)."""

    def __init__(self, *datagrams: bytes) -> None:
        self.sent: list[bytes] = []
        self.datagrams = list(datagrams)

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.datagrams.pop(0)

    def close(self) -> None:
        pass


def _conntrack_asking(sock: _DumpSocket, seq: int) -> dataplane.Conntrack:
    conntrack = dataplane.Conntrack.__new__(dataplane.Conntrack)
    conntrack.sock, conntrack._seq = sock, itertools.count(seq)  # type: ignore[assignment]
    return conntrack


def test_a_redirected_udp_flows_dump_gives_the_ports_of_the_client_s_flows_to_the_address() -> None:
    """Over a dump of two datagrams: the client's flows to the address only (the kernel does
    not compare IPv6 addresses rightly), not an older request's answers; a refusal the
    kernel answers is a DataplaneError."""
    done = dataplane._netlink(dataplane.NLMSG_DONE, 0x2, 7, 0, 0, b"")
    sock = _DumpSocket(
        _conntrack_entry(7, "2001:db8:1::11", "2001:db8:1::1", 61001)
        + _conntrack_entry(7, "2001:db8:1::12", "2001:db8:1::1", 61002)  # another client
        + _conntrack_entry(7, "2001:db8:1::11", "2001:db8:1::2", 61003)  # another address
        + _conntrack_entry(6, "2001:db8:1::11", "2001:db8:1::1", 61004),  # an older request's
        _conntrack_entry(7, "2001:db8:1::11", "2001:db8:1::1", 61005) + done)
    client, address = ipaddress.ip_address("2001:db8:1::11"), ipaddress.ip_address("2001:db8:1::1")
    assert _conntrack_asking(sock, 7).redirected_udp_ports(client, address) == {61001, 61005}
    assert sock.sent == [dataplane.redirected_udp_message(client, address, 7)]
    refused = struct.pack("=IHHII", 36, dataplane.NLMSG_ERROR, 0, 7, 0) + struct.pack("=i", -1) + b"\0" * 16
    with pytest.raises(dataplane.DataplaneError, match="asking conntrack for 2001:db8:1::11's UDP flows"):
        _conntrack_asking(_DumpSocket(refused), 7).redirected_udp_ports(client, address)
