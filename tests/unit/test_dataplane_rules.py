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
    MARK_ONE_WAY,
    MARK_OWNED,
    MARK_PORT,
    MARK_REWRITTEN,
    MARK_SNAT,
    MARK_USER,
    BindRule,
    Interfaces,
    RedirectRule,
    mark_for,
    redirect_port,
    render_nft,
    render_nft_redirects,
    render_redirects,
    render_rules,
)

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
        accepts = [i for i, r in enumerate(rules) if r.endswith("-j ACCEPT")]
        first_queue = next(i for i, r in enumerate(rules) if "NFQUEUE" in r)
        # Two accepts, both before the queue: packets the enforcer rewrote (by their
        # packet mark), then kernel-mode flows (by their connmark).
        assert len(accepts) == 2, rules
        rewritten, kernel = accepts
        assert rewritten < kernel < first_queue
        assert "-m connmark" not in rules[rewritten]
        assert _mark(rules[rewritten], "-m mark --mark") == (MARK_REWRITTEN, MARK_REWRITTEN)
        value, mask = _mark(rules[kernel], "-m connmark --mark")
        assert value & mask == MARK_KERNEL and mask & MARK_KERNEL
        assert (value, mask) == (MARK_KERNEL, MARK_MODE)


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("settings", [CLOSED, OPEN], ids=["closed", "open"])
def test_rewritten_packets_accepted_before_any_queue(fam: str, settings: DataplaneSettings) -> None:
    rules = appended(tables(render_rules(fam, settings, IFACES, nat=False))["filter"], "PINHOLE-FORWARD")
    rewritten = [i for i, r in enumerate(rules)
                 if f"-m mark --mark {MARK_REWRITTEN:#010x}/{MARK_REWRITTEN:#010x} -j ACCEPT" in r]
    queues = [i for i, r in enumerate(rules) if "NFQUEUE" in r]
    assert len(rewritten) == 1 and queues
    assert rewritten[0] < min(queues)
    # Only the one-way reply drop may come before it (a reply is never rewritten).
    assert all("--ctdir REPLY -j DROP" in r for r in rules[:rewritten[0]])


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
def test_no_source_network_snat_without_nat(fam: str) -> None:
    """Without NAT, only flows marked for an external address (redirected flows) are
    source-translated: one rule per external address of the family, by mark."""
    nat = tables(render_rules(fam, CLOSED, IFACES, nat=False))["nat"]
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
    assert "-I PREROUTING 1 -j PINHOLE-PREROUTING" in nat


@pytest.mark.parametrize("fam", FAMS)
def test_mark_based_snat_precedes_source_network_snat(fam: str) -> None:
    """A redirected flow marked for the second address must not be caught by the
    source-network rule that sends the rest out of the first."""
    rules = appended(tables(render_rules(fam, CLOSED, IFACES, nat=True))["nat"], "PINHOLE-POSTROUTING")
    by_mark = [i for i, r in enumerate(rules) if "-m mark --mark" in r]
    by_source = [i for i, r in enumerate(rules) if " -s " in r]
    assert len(by_mark) == 2 and len(by_source) == len(NETWORKS[fam])
    assert max(by_mark) < min(by_source)
    assert len(rules) == len(by_mark) + len(by_source)


def test_no_mark_based_snat_without_an_external_address_of_the_family() -> None:
    v4only = Interfaces(IFACES.internal, IFACES.external, IFACES.internal_networks,
                        (ipaddress.ip_address("198.51.100.1"),), IFACES.internal_addresses)
    nat = tables(render_rules("ipv6", CLOSED, v4only, nat=False))["nat"]
    assert appended(nat, "PINHOLE-POSTROUTING") == []
    assert appended(tables(render_rules("ipv4", CLOSED, v4only, nat=False))["nat"],
                    "PINHOLE-POSTROUTING") == [
        f"-A PINHOLE-POSTROUTING -m mark --mark 0x01000000/{MARK_SNAT:#010x} -o ext0 "
        "-j SNAT --to-source 198.51.100.1"]


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
    closed = render_nft(CLOSED, IFACES, nat=False)
    opened = render_nft(OPEN, IFACES, nat=False)
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
        forward = nft_chain(render_nft(settings, IFACES, nat=False), "filter_forward")
        rewritten = forward.index(f"meta mark and {MARK_REWRITTEN:#010x} == {MARK_REWRITTEN:#010x} accept")
        kernel = forward.index(f"ct mark and {MARK_MODE:#010x} == {MARK_KERNEL:#010x} accept")
        first_queue = next(i for i, line in enumerate(forward) if "queue num" in line)
        assert rewritten < kernel < first_queue


def test_nft_nat() -> None:
    routed = render_nft(CLOSED, IFACES, nat=False)
    # Without NAT: no source-network SNAT, only the mark-based rules of redirected flows.
    assert "saddr" not in "\n".join(nft_chain(routed, "source_nat"))
    assert nft_chain(routed, "source_nat")[1:] == [
        'meta mark and 0x0f000000 == 0x01000000 meta nfproto ipv4 oifname "ext0" snat ip to 198.51.100.1',
        'meta mark and 0x0f000000 == 0x02000000 meta nfproto ipv4 oifname "ext0" snat ip to 198.51.100.2',
        'meta mark and 0x0f000000 == 0x01000000 meta nfproto ipv6 oifname "ext0" snat ip6 to 2001:db8:2::1',
        'meta mark and 0x0f000000 == 0x02000000 meta nfproto ipv6 oifname "ext0" snat ip6 to 2001:db8:2::2',
    ]
    text = render_nft(CLOSED, IFACES, nat=True)
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


def test_nft_chains_and_maps_of_redirects() -> None:
    text = render_nft(CLOSED, IFACES, nat=False)
    chains = re.findall(r"^  chain (\S+) \{$", text, re.M)
    maps = re.findall(r"^  map (\S+) \{", text, re.M)
    assert {"raw_prerouting", "filter_input", "redirect_dnat"} <= set(chains)
    assert set(maps) == {"redirect_mark_ip", "redirect_to_ip", "redirect_mark_ip6", "redirect_to_ip6",
                         "bind_to_ip", "bind_to_ip6"}
    assert len(chains) == len(set(chains))
    for name in [*chains, *maps]:
        assert name not in NFT_KEYWORDS, name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
    # every map a rule looks up exists
    assert set(re.findall(r"@(\w+)", text)) == set(maps)
    assert "map redirect_mark_ip { type ipv4_addr . ipv4_addr . inet_proto . inet_service : mark; }" in text
    assert ("map redirect_to_ip6 { type ipv6_addr . ipv6_addr . inet_proto . inet_service : "
            "ipv6_addr . inet_service; }") in text
    assert nft_chain(text, "raw_prerouting")[0] == "type filter hook prerouting priority raw; policy accept;"
    assert nft_chain(text, "filter_input")[0] == "type filter hook input priority filter; policy accept;"
    dnat = nft_chain(text, "redirect_dnat")
    assert dnat[0] == "type nat hook prerouting priority dstnat; policy accept;"
    assert dnat[1:] == [
        line for p, k in (("ip", "ip saddr . ip daddr . meta l4proto . th dport"),
                          ("ip6", "ip6 saddr . ip6 daddr . meta l4proto . th dport"))
        for line in (f"ct state new meta mark set {k} map @redirect_mark_{p} dnat {p} to {k} "
                     f"map @redirect_to_{p}",
                     f"ct state new dnat {p} to {p} daddr . meta l4proto . th dport map @bind_to_{p}")]


@pytest.mark.parametrize("fail_open", [False, True])
def test_nft_raw_queues_only_user_redirect_ports(fail_open: bool) -> None:
    text = render_nft(OPEN_RANGES if fail_open else RANGES, IFACES, nat=False)
    queue = "queue num 3" + (" bypass" if fail_open else "")
    assert nft_chain(text, "raw_prerouting")[1:] == [
        'iifname "int0" ip daddr 192.0.2.1 meta l4proto { tcp, udp } th dport 50100-50199 ' + queue,
        'iifname "int1" ip daddr 203.0.113.1 meta l4proto { tcp, udp } th dport 50100-50199 ' + queue,
        'iifname "int0" ip6 daddr 2001:db8:1::1 meta l4proto { tcp, udp } th dport 50100-50199 ' + queue,
    ]


def test_nft_input_drops_both_redirect_ranges() -> None:
    text = render_nft(RANGES, IFACES, nat=False)
    assert sorted(nft_chain(text, "filter_input")[1:]) == sorted(
        f"{p} daddr {a} meta l4proto {{ tcp, udp }} th dport {ports} drop"
        for p, fam in (("ip", "ipv4"), ("ip6", "ipv6")) for _, a in INTERNAL_ADDRESSES[fam]
        for ports in ("50000-50099", "50100-50199"))


def test_nft_without_internal_addresses_has_empty_redirect_chains() -> None:
    bare = Interfaces(IFACES.internal, IFACES.external, IFACES.internal_networks,
                      IFACES.external_addresses)
    text = render_nft(CLOSED, bare, nat=False)
    assert nft_chain(text, "raw_prerouting")[1:] == []
    assert nft_chain(text, "filter_input")[1:] == []
    assert text.count("{") == text.count("}")


# --- redirect ports in the base rules --------------------------------------------------------


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("fail_open", [False, True])
def test_raw_queues_only_the_user_redirect_ports(fam: str, fail_open: bool) -> None:
    settings = OPEN_RANGES if fail_open else RANGES
    raw = tables(render_rules(fam, settings, IFACES, nat=False))["raw"]
    bypass = " --queue-bypass" if fail_open else ""
    assert appended(raw, "PINHOLE-PREROUTING") == [
        f"-A PINHOLE-PREROUTING -i {name} -d {address} -p {proto} --dport 50100:50199 "
        f"-j NFQUEUE --queue-num 3{bypass}"
        for name, address in INTERNAL_ADDRESSES[fam] for proto in ("tcp", "udp")]
    assert ":PINHOLE-PREROUTING - [0:0]" in raw
    assert "-I PREROUTING 1 -j PINHOLE-PREROUTING" in raw
    assert "50000" not in "\n".join(raw)  # kernel-mode ports are not queued before conntrack


@pytest.mark.parametrize("fam", FAMS)
def test_default_user_redirect_ports_are_queued(fam: str) -> None:
    raw = appended(tables(render_rules(fam, CLOSED, IFACES, nat=False))["raw"], "PINHOLE-PREROUTING")
    assert raw and all("--dport 63000:64999 -j NFQUEUE --queue-num 3" in r for r in raw)
    assert not any("--queue-bypass" in r for r in raw)


@pytest.mark.parametrize("fam", FAMS)
def test_input_drops_both_redirect_ranges(fam: str) -> None:
    f = tables(render_rules(fam, RANGES, IFACES, nat=False))["filter"]
    assert sorted(appended(f, "PINHOLE-INPUT")) == sorted(
        f"-A PINHOLE-INPUT -d {address} -p {proto} --dport {ports} -j DROP"
        for _, address in INTERNAL_ADDRESSES[fam] for proto in ("tcp", "udp")
        for ports in ("50000:50099", "50100:50199"))
    assert ":PINHOLE-INPUT - [0:0]" in f
    assert "-I INPUT 1 -j PINHOLE-INPUT" in f


def test_no_internal_addresses_no_redirect_port_rules() -> None:
    bare = Interfaces(IFACES.internal, IFACES.external, IFACES.internal_networks,
                      IFACES.external_addresses)
    parsed = tables(render_rules("ipv4", CLOSED, bare, nat=False))
    assert appended(parsed["raw"], "PINHOLE-PREROUTING") == []
    assert appended(parsed["filter"], "PINHOLE-INPUT") == []


def test_interfaces_internal_addresses() -> None:
    assert [(n, str(a)) for n, a in IFACES.internal_of("ipv4")] == \
        [("int0", "192.0.2.1/24"), ("int1", "203.0.113.1/24")]
    assert [(n, str(a)) for n, a in IFACES.internal_of("ipv6")] == [("int0", "2001:db8:1::1/64")]
    assert IFACES.internal_interface_of(ipaddress.ip_address("203.0.113.1")) == "int1"
    assert IFACES.internal_interface_of(ipaddress.ip_address("2001:db8:1::1")) == "int0"


# --- marks -----------------------------------------------------------------------------------

def test_mark_layout_bits_do_not_overlap() -> None:
    parts = [MARK_MODE, MARK_ONE_WAY, MARK_SNAT, MARK_REWRITTEN, MARK_PORT]
    assert sum(parts) == MARK_OWNED
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            assert a & b == 0, (hex(a), hex(b))
    # the connmark keeps the flow's bits, not the packet-only ones
    assert MARK_MASK & (MARK_REWRITTEN | MARK_PORT) == 0


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


# --- kernel-mode redirects -------------------------------------------------------------------

RULE4 = RedirectRule("int0", 6, ipaddress.ip_address("192.0.2.11"), ipaddress.ip_address("192.0.2.1"),
                     61000, ipaddress.ip_address("198.51.100.21"), 2121)
RULE6 = RedirectRule("int0", 17, ipaddress.ip_address("2001:db8:1::11"),
                     ipaddress.ip_address("2001:db8:1::1"), 61001,
                     ipaddress.ip_address("2001:db8:2::21"), 53)
BIND4 = BindRule(6, ipaddress.ip_address("198.51.100.1"), 40000, ipaddress.ip_address("192.0.2.11"),
                 40000)
BIND6 = BindRule(17, ipaddress.ip_address("2001:db8:2::1"), 20001,
                 ipaddress.ip_address("2001:db8:1::11"), 41000)


def test_securenat_bind_rules() -> None:
    """A SecureNAT bind in NAT: new flows to the external port go on to the client's."""
    assert render_redirects([BIND4, BIND6], add=True) == {
        "ipv4": "*nat\n-A PINHOLE-PREROUTING -d 198.51.100.1 -p tcp --dport 40000 -m conntrack "
                "--ctstate NEW -j DNAT --to-destination 192.0.2.11:40000\nCOMMIT\n",
        "ipv6": "*nat\n-A PINHOLE-PREROUTING -d 2001:db8:2::1 -p udp --dport 20001 -m conntrack "
                "--ctstate NEW -j DNAT --to-destination [2001:db8:1::11]:41000\nCOMMIT\n"}
    assert render_redirects([BIND4], add=False)["ipv4"].splitlines()[1].startswith(
        "-D PINHOLE-PREROUTING -d 198.51.100.1 -p tcp --dport 40000 ")
    assert render_nft_redirects([BIND4, BIND6], add=True) == (
        "add element inet pinhole bind_to_ip { 198.51.100.1 . tcp . 40000 : 192.0.2.11 . 40000 }\n"
        "add element inet pinhole bind_to_ip6 { 2001:db8:2::1 . udp . 20001 : 2001:db8:1::11 . 41000 }\n")
    assert render_nft_redirects([BIND4], add=False) == \
        "delete element inet pinhole bind_to_ip { 198.51.100.1 . tcp . 40000 }\n"


def test_redirect_rule_iptables() -> None:
    assert RULE4.family == "ipv4" and RULE6.family == "ipv6"
    match4 = "PINHOLE-PREROUTING -i int0 -s 192.0.2.11 -d 192.0.2.1 -p tcp --dport 61000"
    assert RULE4.iptables("-A") == [
        f"-A {match4} -j MARK --set-xmark 0x0000ee48/0x0000ffff",
        f"-A {match4} -j DNAT --to-destination 198.51.100.21:2121",
    ]
    match6 = "PINHOLE-PREROUTING -i int0 -s 2001:db8:1::11 -d 2001:db8:1::1 -p udp --dport 61001"
    assert RULE6.iptables("-D") == [
        f"-D {match6} -j MARK --set-xmark 0x0000ee49/0x0000ffff",
        f"-D {match6} -j DNAT --to-destination [2001:db8:2::21]:53",
    ]
    value, mask = _mark(RULE4.iptables("-A")[0], "--set-xmark")
    assert (value, mask) == (61000, MARK_PORT)
    assert redirect_port(value) == RULE4.port


def test_render_redirects_per_family() -> None:
    added = render_redirects([RULE4, RULE6], add=True)
    assert set(added) == {"ipv4", "ipv6"}
    assert tables(added["ipv4"]) == {"nat": RULE4.iptables("-A")}
    assert tables(added["ipv6"]) == {"nat": RULE6.iptables("-A")}
    deleted = render_redirects([RULE4], add=False)
    assert set(deleted) == {"ipv4"}
    assert tables(deleted["ipv4"]) == {"nat": RULE4.iptables("-D")}
    assert all(r.startswith("-D PINHOLE-PREROUTING ") for r in tables(deleted["ipv4"])["nat"])
    assert render_redirects([], add=True) == {}
    two = render_redirects([RULE4, RULE4], add=True)["ipv4"]
    assert tables(two)["nat"] == RULE4.iptables("-A") * 2


def test_render_nft_redirects() -> None:
    assert render_nft_redirects([RULE4, RULE6], add=True) == (
        "add element inet pinhole redirect_mark_ip { 192.0.2.11 . 192.0.2.1 . tcp . 61000 : 0x0000ee48 }\n"
        "add element inet pinhole redirect_to_ip "
        "{ 192.0.2.11 . 192.0.2.1 . tcp . 61000 : 198.51.100.21 . 2121 }\n"
        "add element inet pinhole redirect_mark_ip6 "
        "{ 2001:db8:1::11 . 2001:db8:1::1 . udp . 61001 : 0x0000ee49 }\n"
        "add element inet pinhole redirect_to_ip6 "
        "{ 2001:db8:1::11 . 2001:db8:1::1 . udp . 61001 : 2001:db8:2::21 . 53 }\n")
    assert render_nft_redirects([RULE4, RULE6], add=False) == (
        "delete element inet pinhole redirect_mark_ip { 192.0.2.11 . 192.0.2.1 . tcp . 61000 }\n"
        "delete element inet pinhole redirect_to_ip { 192.0.2.11 . 192.0.2.1 . tcp . 61000 }\n"
        "delete element inet pinhole redirect_mark_ip6 { 2001:db8:1::11 . 2001:db8:1::1 . udp . 61001 }\n"
        "delete element inet pinhole redirect_to_ip6 { 2001:db8:1::11 . 2001:db8:1::1 . udp . 61001 }\n")
    assert render_nft_redirects([], add=True) == ""
    # the maps named are the ones the table declares
    declared = set(re.findall(r"^  map (\S+) ", render_nft(CLOSED, IFACES, nat=False), re.M))
    used = set(re.findall(r"element inet pinhole (\S+) ",
                          render_nft_redirects([RULE4, RULE6, BIND4, BIND6], True)))
    assert used == declared


# --- replacing an earlier run's rules in one transaction --------------------------------------

def test_stale_rules_are_replaced_in_the_same_transaction() -> None:
    """A crashed run's jumps are deleted, and its chains declared (which flushes them), in
    the restore input that installs the new rules: there is no moment without rules."""
    text = render_rules("ipv4", CLOSED, IFACES, nat=False)
    stale = {"filter": ([["FORWARD", "-j", "PINHOLE-FORWARD"]], {"PINHOLE-FORWARD", "PINHOLE-OLD"}),
             "raw": ([], set())}
    replacing = dataplane._replacing(text, stale)
    lines = replacing.splitlines()
    f = tables(replacing)["filter"]
    # the stale jump goes before the new one is inserted, after every chain declaration
    delete = f.index("-D FORWARD -j PINHOLE-FORWARD")
    assert delete < f.index("-I FORWARD 1 -j PINHOLE-FORWARD")
    assert all(not line.startswith(":") for line in f[delete:])
    # a stale chain the new rules do not have is declared (flushed) too; once its jump
    # is gone it is unreferenced, and the installer deletes it afterwards
    assert ":PINHOLE-OLD - [0:0]" in f
    assert dataplane._declared(replacing, "filter") - dataplane._declared(text, "filter") == {"PINHOLE-OLD"}
    # nothing else changed: the new rules are all there, in order
    assert [line for line in lines if not line.startswith("-D") and line != ":PINHOLE-OLD - [0:0]"] \
        == text.splitlines()
    assert dataplane._replacing(text, {}) == text


# --- Firewall clients' binds and the fw's own ICMP errors -------------------------------------

@pytest.mark.parametrize("fam", FAMS)
def test_new_flows_to_bind_ports_go_to_the_queue(fam: str) -> None:
    """With a SOCKS service, a new flow to a bind port on an external address is queued
    (the enforcer drops what no approved bind admits); what is no flow at all is dropped."""
    assert "--dport 20000:20099" not in render_rules(fam, CLOSED, IFACES, nat=True)
    rules = appended(tables(render_rules(fam, CLOSED, IFACES, nat=True, bind_ports=(20000, 20099)))["filter"],
                     "PINHOLE-INPUT")
    binds = [r for r in rules if "--dport 20000:20099" in r]
    externals = IFACES.external_of(fam)
    assert len(binds) == 4 * len(externals)  # tcp and udp: queue the new, drop the invalid
    for address in externals:
        for proto in ("tcp", "udp"):
            mine = [r for r in binds if f"-d {address} " in r and f"-p {proto} " in r]
            assert [r.split("--ctstate ")[1].split()[0] for r in mine] == ["NEW", "INVALID,UNTRACKED"]
            assert mine[0].endswith("-j NFQUEUE --queue-num 3") and mine[1].endswith("-j DROP")
    nft = render_nft(CLOSED, IFACES, nat=True, bind_ports=(20000, 20099))
    assert nft.count("th dport 20000-20099 ct state new queue num 3") == len(IFACES.external_addresses)


@pytest.mark.parametrize("fam", FAMS)
def test_the_fw_s_icmp_errors_about_user_mode_flows_are_queued(fam: str) -> None:
    (rule,) = appended(tables(render_rules(fam, CLOSED, IFACES, nat=False))["filter"], "PINHOLE-OUTPUT")
    assert f"-p {'icmp' if fam == 'ipv4' else 'ipv6-icmp'} " in rule
    assert "--ctstate RELATED --ctstatus CONFIRMED" in rule
    assert f"--mark {MARK_USER:#010x}/{MARK_MODE:#010x}" in rule and rule.endswith("--queue-num 3")
