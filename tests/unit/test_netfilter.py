"""The rules said once (dataplane.rules_of, in enforcer.netfilter's terms), and each backend's
rendering of every kind of match and action: a backend that dropped a condition would render
a rule that matches more than the neutral one, and fails here."""

from __future__ import annotations

import ipaddress
from dataclasses import fields, replace

import pytest

from enforcer.config import DataplaneSettings
from enforcer.core.limits import Limits
from enforcer.dataplane import (
    BACKENDS,
    MARK_KERNEL,
    MARK_LOCAL,
    MARK_LOCAL_KEPT,
    MARK_MASK,
    MARK_MODE,
    MARK_ONE_WAY,
    MARK_REWRITTEN,
    MARK_SNAT,
    MARK_USER,
    Interfaces,
    IptablesBackend,
    NftBackend,
    Ruleset,
    forward_caps,
    rules_of,
)
from enforcer.netfilter import (
    ACCEPT,
    DROP,
    Action,
    Chain,
    CountOver,
    Family,
    Hook,
    MarkIs,
    Match,
    Queue,
    RateOver,
    RestoreMark,
    Rule,
    SaveMark,
    SourceNat,
    Stage,
)

ip, net, itf = ipaddress.ip_address, ipaddress.ip_network, ipaddress.ip_interface
IFACES = Interfaces(
    internal={"int0": 2, "int1": 3},
    external={"ext0": 4},
    internal_networks=(net("192.0.2.0/24"), net("2001:db8:1::/64"), net("203.0.113.0/24")),
    external_addresses=(ip("198.51.100.1"), ip("2001:db8:2::1"), ip("198.51.100.2")),
    internal_addresses=(("int0", itf("192.0.2.1/24")), ("int0", itf("2001:db8:1::1/64")),
                        ("int1", itf("203.0.113.1/24"))),
)
CLOSED = DataplaneSettings(queue=3, kernel_redirect_ports=(50000, 50099), user_redirect_ports=(50100, 50199),
                           open_ports=((6, (22, 22)), (17, (67, 68))))
OPEN = replace(CLOSED, fail_open=True)
LIMITS = Limits(flows_per_client=77, new_flows_per_second=300)
BINDS = (20000, 20099)


def chain(chains: tuple[Chain, ...], hook: Hook, stage: Stage) -> tuple[Rule, ...]:
    (found,) = [c for c in chains if (c.hook, c.stage) == (hook, stage)]
    return found.rules


def forward(rs: Ruleset) -> tuple[Rule, ...]:
    return chain(rules_of(rs), Hook.FORWARD, Stage.FILTER)


def inbound(rs: Ruleset) -> tuple[Rule, ...]:
    return chain(rules_of(rs), Hook.INPUT, Stage.FILTER)


def every_rule(rs: Ruleset) -> list[Rule]:
    return [rule for c in rules_of(rs) for rule in c.rules]


def running(settings: DataplaneSettings = CLOSED, **options: object) -> Ruleset:
    return Ruleset(settings, IFACES, **options)  # type: ignore[arg-type]


# --- the neutral list ------------------------------------------------------------------------

def test_every_chain_has_a_place_in_every_backend() -> None:
    places = [(c.hook, c.stage) for c in rules_of(running())]
    assert len(places) == len(set(places)) == 8
    for backend in BACKENDS:
        assert set(backend.CHAINS) == set(places), backend


BASE_HEAD = [Rule(Match(ct_status="expected"), DROP),
             Rule(Match(ct_mark=MarkIs(MARK_ONE_WAY, MARK_ONE_WAY), ct_reply=True), DROP),
             Rule(Match(ct_mark=MarkIs(MARK_KERNEL, MARK_MODE)), ACCEPT)]


@pytest.mark.parametrize("nat", [False, True])
def test_lockdown_queues_nothing_and_drops_new_forwarded_flows(nat: bool) -> None:
    """The base alone (a stop, or --lockdown): no rule goes to the queue or changes a mark or
    an address; kernel-mode flows go on (one-way ones still one way), everything else
    forwarded is dropped; the fw answers what it began, its loopback, neighbour discovery,
    the internal side and the open ports, and drops the rest."""
    rs = Ruleset(CLOSED, IFACES, nat, BINDS, LIMITS, working=False, socks_port=1080)
    assert not any(isinstance(rule.action, Queue | SourceNat | RestoreMark | SaveMark)
                   for rule in every_rule(rs))
    assert list(forward(rs)) == [*BASE_HEAD, Rule(Match(), DROP)]
    assert list(inbound(rs)) == [
        Rule(Match(ct_state=("established", "related")), ACCEPT),
        Rule(Match(iif=("lo",)), ACCEPT),
        Rule(Match(family="ipv6", protocols=("icmp",), icmp_types=(133, 134, 135, 136), hop_limit=255),
             ACCEPT),
        Rule(Match(iif=("int0", "int1")), ACCEPT),
        Rule(Match(protocols=("tcp",), dports=((22, 22),)), ACCEPT),
        Rule(Match(protocols=("udp",), dports=((67, 68),)), ACCEPT),
        Rule(Match(), DROP)]
    assert chain(rules_of(rs), Hook.PREROUTING, Stage.RAW) == (
        Rule(Match(iif=("int0", "int1", "ext0"), reverse_path_fails=True), DROP),)


def test_failing_open_has_no_lockdown() -> None:
    """fail_open: nothing drops everything, running or not (the fw's services stay open)."""
    for working in (True, False):
        rs = Ruleset(OPEN, IFACES, True, BINDS, LIMITS, working=working, socks_port=1080)
        assert Rule(Match(), DROP) not in every_rule(rs)
    assert inbound(Ruleset(OPEN, IFACES, working=False)) == ()


@pytest.mark.parametrize("settings", [CLOSED, OPEN], ids=["closed", "open"])
@pytest.mark.parametrize("nat", [False, True])
def test_the_working_rules_sit_inside_the_base(settings: DataplaneSettings, nat: bool) -> None:
    """Each chain of the base is a head and a tail of the same chain running: a stop that
    takes the working rules away leaves exactly the lockdown."""
    whole = rules_of(Ruleset(settings, IFACES, nat, BINDS, LIMITS, socks_port=1080))
    base = rules_of(Ruleset(settings, IFACES, nat, BINDS, LIMITS, working=False, socks_port=1080))
    for running_chain, base_chain in zip(whole, base, strict=True):
        rules, kept = running_chain.rules, base_chain.rules
        head = next((i for i, (a, b) in enumerate(zip(kept, rules, strict=False)) if a != b), len(kept))
        assert rules[:head] == kept[:head] and rules[len(rules) - len(kept) + head:] == kept[head:]


@pytest.mark.parametrize("settings", [CLOSED, OPEN], ids=["closed", "open"])
def test_running_forward(settings: DataplaneSettings) -> None:
    """After the base's head: packets the enforcer rewrote pass, user-mode flows are queued,
    new flows are queued (the caps on them come first, in the grants chain); failing
    open, what is left is queued too (a dead enforcer lets it pass), else dropped."""
    queue = Queue(3, settings.fail_open)
    assert list(forward(running(settings, limits=LIMITS))) == [
        *BASE_HEAD,
        Rule(Match(mark=MarkIs(MARK_REWRITTEN, MARK_REWRITTEN)), ACCEPT),
        Rule(Match(ct_mark=MarkIs(MARK_USER, MARK_MODE)), queue),
        Rule(Match(ct_state=("new",)), queue),
        Rule(Match(), queue) if settings.fail_open else Rule(Match(), DROP)]


def test_forward_caps() -> None:
    """Each family's caps drop a client's new flows beyond them: of what is new and not
    admitted yet (neither a flow's connmark nor a rewritten packet's mark says how it runs)."""
    fresh = Match(mark=MarkIs(0, MARK_REWRITTEN), ct_mark=MarkIs(0, MARK_MODE), ct_state=("new",))
    assert forward_caps(LIMITS) == [Rule(replace(fresh, family=family, over=over), DROP)
                                    for family in ("ipv4", "ipv6")
                                    for over in (RateOver(300, 30), CountOver(77))]


def test_no_rate_cap_without_a_rate() -> None:
    rules = [*every_rule(running(limits=Limits(new_flows_per_second=0), bind_ports=BINDS)),
             *forward_caps(Limits(new_flows_per_second=0))]
    assert not any(isinstance(rule.match.over, RateOver) for rule in rules)
    assert sum(isinstance(rule.match.over, CountOver) for rule in rules) == 2 + 3  # forward + binds
    assert RateOver(20, 10) in [rule.match.over for rule in forward_caps(Limits(new_flows_per_second=20))]


@pytest.mark.parametrize("fail_open", [False, True])
def test_the_queue_is_the_configured_one(fail_open: bool) -> None:
    rs = Ruleset(DataplaneSettings(queue=65535, fail_open=fail_open), IFACES, True, BINDS, socks_port=1080)
    queues = {rule.action for rule in every_rule(rs) if isinstance(rule.action, Queue)}
    assert queues == {Queue(65535, fail_open)}


def test_user_redirect_ports_are_queued_before_conntrack_and_both_ranges_dropped_at_input() -> None:
    raw = chain(rules_of(running()), Hook.PREROUTING, Stage.RAW)
    assert list(raw[1:]) == [
        Rule(Match(iif=(name,), daddr=ip(address), protocols=("tcp", "udp"), dports=((50100, 50199),)),
             Queue(3, False))
        for name, address in (("int0", "192.0.2.1"), ("int1", "203.0.113.1"), ("int0", "2001:db8:1::1"))]
    ranges = (((50000, 50099),), ((50100, 50199),))
    drops = [rule for rule in inbound(running()) if rule.match.dports in ranges]
    assert drops == [Rule(Match(daddr=ip(address), protocols=("tcp", "udp"), dports=(ports,)), DROP)
                     for address in ("192.0.2.1", "203.0.113.1", "2001:db8:1::1")
                     for ports in ((50000, 50099), (50100, 50199))]


def test_socks_ports_drop_what_comes_from_outside_only_with_a_socks_service() -> None:
    """From outside, the SOCKS port drops what reaches any address of the fw's (a closed
    one's reset would answer it), the relay ports what reaches an internal one."""
    socks = [rule for rule in inbound(running(bind_ports=BINDS, socks_port=1080))
             if rule.match.iif is not None and rule.action == DROP]
    assert socks == [Rule(Match(iif=("ext0",), protocols=("tcp", "udp"), dports=((1080, 1080),)),
                          DROP),
                     *(Rule(Match(iif=("ext0",), daddr=ip(address), protocols=("tcp", "udp"),
                                  dports=(BINDS,)), DROP)
                       for address in ("192.0.2.1", "203.0.113.1", "2001:db8:1::1"))]
    assert not any(rule.match.dports in (((1080, 1080),), (BINDS,)) and rule.match.iif
                   for rule in every_rule(running()))


def test_binds_on_each_external_address() -> None:
    """With binds: per external address, an admitted UDP flow's datagrams go to the bound
    socket, the client's caps apply, new flows are queued, what is no flow is dropped; the
    verdict's local mark is kept after the verdict. Without binds, none of it."""
    rs = running(bind_ports=BINDS, limits=LIMITS)
    binds = [rule for rule in inbound(rs) if rule.match.dports == (BINDS,)]
    expected = []
    for address in ("198.51.100.1", "198.51.100.2", "2001:db8:2::1"):
        where = Match(daddr=ip(address), protocols=("tcp", "udp"), dports=(BINDS,))
        expected += [
            Rule(replace(where, protocols=("udp",), ct_mark=MarkIs(MARK_LOCAL, MARK_LOCAL),
                         local_socket=True), ACCEPT),
            Rule(replace(where, ct_state=("new",), over=RateOver(300, 30)), DROP),
            Rule(replace(where, ct_state=("new",), over=CountOver(77)), DROP),
            Rule(replace(where, ct_state=("new",)), Queue(3, False)),
            Rule(replace(where, ct_state=("invalid", "untracked")), DROP)]
    assert binds == expected
    assert chain(rules_of(rs), Hook.INPUT, Stage.AFTER_FILTER) == (
        Rule(Match(mark=MarkIs(MARK_LOCAL, MARK_LOCAL)), SaveMark(MARK_LOCAL_KEPT)),)
    assert chain(rules_of(running()), Hook.INPUT, Stage.AFTER_FILTER) == ()
    assert not any(rule.match.local_socket for rule in every_rule(running()))


def test_marks_restored_and_saved() -> None:
    """The verdict's mark is saved to the connection of a flow just admitted (once), our bits
    only, and restored on the way in for a user-mode flow (whose packets are queued),
    except on a packet the enforcer rewrote (it has its mark)."""
    rs = running()
    assert chain(rules_of(rs), Hook.PREROUTING, Stage.MANGLE) == (
        Rule(Match(mark=MarkIs(0, MARK_REWRITTEN), ct_mark=MarkIs(MARK_USER, MARK_MODE)),
             RestoreMark(MARK_MASK)),)
    assert chain(rules_of(rs), Hook.POSTROUTING, Stage.MANGLE) == (
        Rule(Match(mark=MarkIs(0, MARK_MODE, negate=True), ct_mark=MarkIs(0, MARK_MODE)),
             SaveMark(MARK_MASK)),)


def test_the_fw_s_icmp_errors_about_user_mode_flows_are_queued() -> None:
    assert chain(rules_of(running()), Hook.OUTPUT, Stage.FILTER) == (
        Rule(Match(protocols=("icmp",), ct_mark=MarkIs(MARK_USER, MARK_MODE), ct_state=("related",),
                   ct_status="confirmed"), Queue(3, False)),)


@pytest.mark.parametrize("nat", [False, True])
def test_source_nat(nat: bool) -> None:
    """Flows marked for an external address leave from it; in NAT, the rest from the internal
    networks leave from the family's first; on every external interface."""
    two = replace(IFACES, external={"ext0": 4, "ext1": 5})
    expected = []
    for family, ours, networks in (
            ("ipv4", ("198.51.100.1", "198.51.100.2"), ("192.0.2.0/24", "203.0.113.0/24")),
            ("ipv6", ("2001:db8:2::1",), ("2001:db8:1::/64",))):
        for ext in ("ext0", "ext1"):
            expected += [Rule(Match(family=family, mark=MarkIs((i + 1) << 24, MARK_SNAT), oif=(ext,)),
                              SourceNat(ip(a))) for i, a in enumerate(ours)]
            expected += [Rule(Match(saddr=net(n), oif=(ext,)), SourceNat(ip(ours[0])))
                         for n in networks if nat]
    assert list(chain(rules_of(Ruleset(CLOSED, two, nat)), Hook.POSTROUTING, Stage.SOURCE_NAT)) == expected


def test_rules_of_a_family_are_of_that_family() -> None:
    rs = Ruleset(CLOSED, IFACES, True, BINDS, LIMITS, socks_port=1080)
    for rule in every_rule(rs):
        match = rule.match
        if isinstance(rule.action, SourceNat) or match.over is not None or match.icmp_types is not None:
            assert match.of_family is not None, rule


# --- each backend's rendering of each kind of match and action -------------------------------

# (match, iptables lines for IPv4, for IPv6, nft statement): each condition alone, or with
# what it needs; the action is accept
CONDITIONS: list[tuple[Match, list[str], list[str], str]] = [
    (Match(), ["-j ACCEPT"], ["-j ACCEPT"], "accept"),
    (Match(family="ipv6"), [], ["-j ACCEPT"], "meta nfproto ipv6 accept"),
    (Match(family="ipv4"), ["-j ACCEPT"], [], "meta nfproto ipv4 accept"),
    (Match(iif=("a",)), ["-i a -j ACCEPT"], ["-i a -j ACCEPT"], 'iifname "a" accept'),
    (Match(iif=("a", "b")), ["-i a -j ACCEPT", "-i b -j ACCEPT"], ["-i a -j ACCEPT", "-i b -j ACCEPT"],
     'iifname { "a", "b" } accept'),
    (Match(saddr=net("192.0.2.0/24")), ["-s 192.0.2.0/24 -j ACCEPT"], [], "ip saddr 192.0.2.0/24 accept"),
    (Match(saddr=net("2001:db8::/64")), [], ["-s 2001:db8::/64 -j ACCEPT"], "ip6 saddr 2001:db8::/64 accept"),
    (Match(daddr=ip("192.0.2.1")), ["-d 192.0.2.1 -j ACCEPT"], [], "ip daddr 192.0.2.1 accept"),
    (Match(daddr=ip("2001:db8::1")), [], ["-d 2001:db8::1 -j ACCEPT"], "ip6 daddr 2001:db8::1 accept"),
    (Match(protocols=("udp",)), ["-p udp -j ACCEPT"], ["-p udp -j ACCEPT"], "meta l4proto udp accept"),
    (Match(protocols=("tcp", "icmp")), ["-p tcp -j ACCEPT", "-p icmp -j ACCEPT"],
     ["-p tcp -j ACCEPT", "-p ipv6-icmp -j ACCEPT"], "meta l4proto { tcp, icmp, ipv6-icmp } accept"),
    (Match(family="ipv6", protocols=("icmp",)), [], ["-p ipv6-icmp -j ACCEPT"],
     "meta nfproto ipv6 meta l4proto ipv6-icmp accept"),
    (Match(protocols=("tcp",), dports=((80, 80),)), ["-p tcp --dport 80 -j ACCEPT"],
     ["-p tcp --dport 80 -j ACCEPT"], "tcp dport 80 accept"),
    (Match(protocols=("tcp", "udp"), dports=((1000, 2000),)),
     ["-p tcp --dport 1000:2000 -j ACCEPT", "-p udp --dport 1000:2000 -j ACCEPT"],
     ["-p tcp --dport 1000:2000 -j ACCEPT", "-p udp --dport 1000:2000 -j ACCEPT"],
     "meta l4proto { tcp, udp } th dport 1000-2000 accept"),
    (Match(protocols=("udp",), dports=((53, 53), (1000, 2000))),
     ["-p udp -m multiport --dports 53,1000:2000 -j ACCEPT"],
     ["-p udp -m multiport --dports 53,1000:2000 -j ACCEPT"], "udp dport { 53, 1000-2000 } accept"),
    (Match(family="ipv6", protocols=("icmp",), icmp_types=(135, 136)), [],
     ["-p ipv6-icmp --icmpv6-type 135 -j ACCEPT", "-p ipv6-icmp --icmpv6-type 136 -j ACCEPT"],
     "meta nfproto ipv6 icmpv6 type { 135, 136 } accept"),
    (Match(family="ipv4", protocols=("icmp",), icmp_types=(8,)), ["-p icmp --icmp-type 8 -j ACCEPT"], [],
     "meta nfproto ipv4 icmp type 8 accept"),
    (Match(family="ipv6", hop_limit=255), [], ["-m hl --hl-eq 255 -j ACCEPT"],
     "meta nfproto ipv6 ip6 hoplimit 255 accept"),
    (Match(family="ipv4", hop_limit=1), ["-m ttl --ttl-eq 1 -j ACCEPT"], [],
     "meta nfproto ipv4 ip ttl 1 accept"),
    (Match(reverse_path_fails=True), ["-m rpfilter --invert -j ACCEPT"], ["-m rpfilter --invert -j ACCEPT"],
     "fib saddr . iif oif missing accept"),
    (Match(mark=MarkIs(0x10, 0x30)), ["-m mark --mark 0x00000010/0x00000030 -j ACCEPT"],
     ["-m mark --mark 0x00000010/0x00000030 -j ACCEPT"], "meta mark and 0x00000030 == 0x00000010 accept"),
    (Match(mark=MarkIs(0, 0x30, negate=True)), ["-m mark ! --mark 0x00000000/0x00000030 -j ACCEPT"],
     ["-m mark ! --mark 0x00000000/0x00000030 -j ACCEPT"], "meta mark and 0x00000030 != 0x00000000 accept"),
    (Match(oif=("x", "y")), ["-o x -j ACCEPT", "-o y -j ACCEPT"], ["-o x -j ACCEPT", "-o y -j ACCEPT"],
     'oifname { "x", "y" } accept'),
    (Match(ct_mark=MarkIs(0x10, 0x30)), ["-m connmark --mark 0x00000010/0x00000030 -j ACCEPT"],
     ["-m connmark --mark 0x00000010/0x00000030 -j ACCEPT"], "ct mark and 0x00000030 == 0x00000010 accept"),
    (Match(ct_mark=MarkIs(0, 0x30, negate=True)), ["-m connmark ! --mark 0x00000000/0x00000030 -j ACCEPT"],
     ["-m connmark ! --mark 0x00000000/0x00000030 -j ACCEPT"], "ct mark and 0x00000030 != 0x00000000 accept"),
    (Match(ct_state=("invalid", "untracked")), ["-m conntrack --ctstate INVALID,UNTRACKED -j ACCEPT"],
     ["-m conntrack --ctstate INVALID,UNTRACKED -j ACCEPT"], "ct state invalid,untracked accept"),
    (Match(ct_status="confirmed"), ["-m conntrack --ctstatus CONFIRMED -j ACCEPT"],
     ["-m conntrack --ctstatus CONFIRMED -j ACCEPT"], "ct status confirmed accept"),
    (Match(ct_status="expected"), ["-m conntrack --ctstatus EXPECTED -j ACCEPT"],
     ["-m conntrack --ctstatus EXPECTED -j ACCEPT"], "ct status expected accept"),
    (Match(ct_reply=True), ["-m conntrack --ctdir REPLY -j ACCEPT"], ["-m conntrack --ctdir REPLY -j ACCEPT"],
     "ct direction reply accept"),
    (Match(ct_state=("related",), ct_status="confirmed", ct_reply=True),
     ["-m conntrack --ctstate RELATED --ctstatus CONFIRMED --ctdir REPLY -j ACCEPT"],
     ["-m conntrack --ctstate RELATED --ctstatus CONFIRMED --ctdir REPLY -j ACCEPT"],
     "ct state related ct status confirmed ct direction reply accept"),
    (Match(local_socket=True), ["-m socket -j ACCEPT"], ["-m socket -j ACCEPT"], "socket wildcard 0 accept"),
    (Match(family="ipv4", over=RateOver(300, 30)),
     ["-m hashlimit --hashlimit-above 300/sec --hashlimit-burst 30 --hashlimit-mode srcip "
      "--hashlimit-srcmask 32 --hashlimit-name pinhole-new -j ACCEPT"], [],
     "meta nfproto ipv4 add @new_flow_rate_ip { ip saddr timeout 10s limit rate over 300/second burst 30 "
     "packets } accept"),
    (Match(daddr=ip("2001:db8::1"), over=RateOver(300, 30)), [],
     ["-d 2001:db8::1 -m hashlimit --hashlimit-above 300/sec --hashlimit-burst 30 --hashlimit-mode srcip "
      "--hashlimit-srcmask 128 --hashlimit-name pinhole-new -j ACCEPT"],
     "ip6 daddr 2001:db8::1 add @new_flow_rate_ip6 { ip6 saddr timeout 10s limit rate over 300/second "
     "burst 30 packets } accept"),
    (Match(family="ipv6", over=CountOver(77)), [],
     ["-m connlimit --connlimit-above 77 --connlimit-mask 128 --connlimit-saddr -j ACCEPT"],
     "meta nfproto ipv6 add @flows_ip6 { ip6 saddr ct count over 77 } accept"),
    (Match(family="ipv4", over=CountOver(5)), ["-m connlimit --connlimit-above 5 --connlimit-mask 32 "
                                                "--connlimit-saddr -j ACCEPT"], [],
     "meta nfproto ipv4 add @flows_ip { ip saddr ct count over 5 } accept"),
]
ACTIONS: list[tuple[Action, str, str]] = [
    (ACCEPT, "-j ACCEPT", "accept"),
    (DROP, "-j DROP", "drop"),
    (Queue(7, False), "-j NFQUEUE --queue-num 7", "queue num 7"),
    (Queue(7, True), "-j NFQUEUE --queue-num 7 --queue-bypass", "queue num 7 bypass"),
    (RestoreMark(0x7F000000), "-j CONNMARK --restore-mark --nfmask 0x7f000000 --ctmask 0x7f000000",
     "meta mark set ct mark and 0x7f000000"),
    (SaveMark(0x7F000000), "-j CONNMARK --save-mark --nfmask 0x7f000000 --ctmask 0x7f000000",
     "ct mark set meta mark and 0x7f000000"),
]


def one_rule(rule: Rule, hook: Hook = Hook.FORWARD, stage: Stage = Stage.FILTER) -> tuple[Chain, ...]:
    return (Chain(hook, stage, (rule,)),)


def iptables_lines(chains: tuple[Chain, ...], family: Family) -> list[str]:
    """What a rendering appends to our chains, without '-A CHAIN'."""
    return [line.split(" ", 2)[2] for line in IptablesBackend().render(chains, family).splitlines()
            if line.startswith("-A ")]


def nft_statements(chains: tuple[Chain, ...]) -> list[str]:
    lines = NftBackend().render(chains).splitlines()
    return [line.strip() for line in lines
            if line.startswith("    ") and not line.strip().startswith("type ")]


def test_every_condition_is_rendered_by_both_backends() -> None:
    """Each field of Match has a case below whose rendering says it: a field added without
    its rendering in a backend fails here."""
    given = {f.name for match, *_ in CONDITIONS for f in fields(Match)
             if getattr(match, f.name) != f.default}
    assert given == {f.name for f in fields(Match)}


@pytest.mark.parametrize(("match", "ipv4", "ipv6", "nft"), CONDITIONS,
                         ids=[str(i) for i in range(len(CONDITIONS))])
def test_each_condition(match: Match, ipv4: list[str], ipv6: list[str], nft: str) -> None:
    chains = one_rule(Rule(match, ACCEPT))
    assert iptables_lines(chains, "ipv4") == ipv4
    assert iptables_lines(chains, "ipv6") == ipv6
    assert nft_statements(chains) == [nft]


@pytest.mark.parametrize(("action", "iptables", "nft"), ACTIONS, ids=[str(i) for i in range(len(ACTIONS))])
def test_each_action(action: Action, iptables: str, nft: str) -> None:
    chains = one_rule(Rule(Match(), action))
    assert iptables_lines(chains, "ipv4") == iptables_lines(chains, "ipv6") == [iptables]
    assert nft_statements(chains) == [nft]


def test_source_nat_action() -> None:
    chains = one_rule(Rule(Match(family="ipv4", oif=("ext0",)), SourceNat(ip("198.51.100.1"))),
                      Hook.POSTROUTING, Stage.SOURCE_NAT)
    assert iptables_lines(chains, "ipv4") == ["-o ext0 -j SNAT --to-source 198.51.100.1"]
    assert iptables_lines(chains, "ipv6") == []
    assert nft_statements(chains) == ['meta nfproto ipv4 oifname "ext0" snat ip to 198.51.100.1']
    six = one_rule(Rule(Match(saddr=net("2001:db8:1::/64")), SourceNat(ip("2001:db8:2::1"))),
                   Hook.POSTROUTING, Stage.SOURCE_NAT)
    assert nft_statements(six) == ["ip6 saddr 2001:db8:1::/64 snat ip6 to 2001:db8:2::1"]


def test_a_rule_that_matches_nothing_is_not_rendered() -> None:
    """An empty "any of" rules out every packet: no line (not a rule without the condition)."""
    for match in (Match(iif=()), Match(oif=(), ct_state=("new",)), Match(protocols=()), Match(dports=()),
                  Match(ct_state=()), Match(family="ipv6", protocols=("icmp",), icmp_types=())):
        chains = (Chain(Hook.INPUT, Stage.FILTER, (Rule(match, DROP), Rule(Match(), ACCEPT))),)
        assert match.matches_nothing
        assert iptables_lines(chains, "ipv4") == iptables_lines(chains, "ipv6") == ["-j ACCEPT"]
        assert nft_statements(chains) == ["accept"]


def test_a_meter_needs_a_family_in_nft() -> None:
    with pytest.raises(ValueError, match="per family"):
        NftBackend().render(one_rule(Rule(Match(over=CountOver(3)), DROP)))


PLACES = {  # (hook, stage): (iptables table, built-in chain, our chain), (nft chain, its type line)
    (Hook.PREROUTING, Stage.RAW): (("raw", "PREROUTING", "PINHOLE-PREROUTING"),
                                   ("raw_prerouting", "type filter hook prerouting priority raw")),
    (Hook.FORWARD, Stage.FILTER): (("filter", "FORWARD", "PINHOLE-FORWARD"),
                                   ("filter_forward", "type filter hook forward priority filter")),
    (Hook.INPUT, Stage.FILTER): (("filter", "INPUT", "PINHOLE-INPUT"),
                                 ("filter_input", "type filter hook input priority filter")),
    (Hook.OUTPUT, Stage.FILTER): (("filter", "OUTPUT", "PINHOLE-OUTPUT"),
                                  ("filter_output", "type filter hook output priority filter")),
    (Hook.PREROUTING, Stage.MANGLE): (("mangle", "PREROUTING", "PINHOLE-PREROUTING"),
                                      ("restore_mark", "type filter hook prerouting priority mangle")),
    (Hook.POSTROUTING, Stage.MANGLE): (("mangle", "POSTROUTING", "PINHOLE-POSTROUTING"),
                                       ("save_mark", "type filter hook postrouting priority mangle")),
    (Hook.INPUT, Stage.AFTER_FILTER): (("nat", "INPUT", "PINHOLE-LOCAL"),
                                       ("save_local_mark", "type filter hook input priority filter + 10")),
    (Hook.POSTROUTING, Stage.SOURCE_NAT): (("nat", "POSTROUTING", "PINHOLE-POSTROUTING"),
                                           ("source_nat", "type nat hook postrouting priority srcnat")),
}


@pytest.mark.parametrize(("hook", "stage"), list(PLACES))
def test_each_chain_s_place(hook: Hook, stage: Stage) -> None:
    """A chain goes to its table and hook, jumped to first from the built-in chain (iptables),
    or is a base chain of its type and priority (nft); every table is in the iptables input
    (so that restoring it replaces our chains in each), only a chain with rules in either."""
    (table, builtin, ours), (name, kind) = PLACES[hook, stage]
    text = IptablesBackend().render(one_rule(Rule(Match(), DROP), hook, stage), "ipv4")
    sections = [line for line in text.splitlines() if line.startswith("*")]
    assert sections == ["*raw", "*filter", "*mangle", "*nat"]
    section = text.split(f"*{table}\n", 1)[1].split("COMMIT\n", 1)[0]
    assert section == f":{ours} - [0:0]\n-A {ours} -j DROP\n-I {builtin} 1 -j {ours}\n"
    assert text.count("[0:0]") == 1
    nft = NftBackend().render(one_rule(Rule(Match(), DROP), hook, stage))
    assert nft == (f"table inet pinhole {{\n  chain {name} {{\n    {kind}; policy accept;\n"
                   "    drop\n  }\n}\n")
    assert IptablesBackend().render((Chain(hook, stage, ()),), "ipv4") == \
        "*raw\nCOMMIT\n*filter\nCOMMIT\n*mangle\nCOMMIT\n*nat\nCOMMIT\n"
    assert NftBackend().render((Chain(hook, stage, ()),)) == "table inet pinhole {\n}\n"


def test_nft_declares_each_meter_once_before_the_chains() -> None:
    rules = tuple(Rule(Match(family=family, ct_state=("new",), over=over), DROP) for _ in range(2)
                  for family in ("ipv4", "ipv6") for over in (RateOver(9, 10), CountOver(3)))
    lines = NftBackend().render((Chain(Hook.FORWARD, Stage.FILTER, rules),)).splitlines()
    assert lines[1:5] == ["  set new_flow_rate_ip { type ipv4_addr; flags dynamic, timeout; }",
                          "  set flows_ip { type ipv4_addr; flags dynamic; }",
                          "  set new_flow_rate_ip6 { type ipv6_addr; flags dynamic, timeout; }",
                          "  set flows_ip6 { type ipv6_addr; flags dynamic; }"]
    assert lines[5] == "  chain filter_forward {"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_the_iptables_rendering_is_the_neutral_list_line_for_line(family: Family) -> None:
    """Every neutral rule of the family becomes its lines, in order, in its chain: none is
    left out, added or moved by the rendering."""
    rs = Ruleset(CLOSED, IFACES, True, BINDS, LIMITS, socks_port=1080)
    backend = IptablesBackend()
    text = backend.render(rules_of(rs), family)
    for c in rules_of(rs):
        table, _, ours = backend.CHAINS[c.hook, c.stage]
        section = text.split(f"*{table}\n", 1)[1].split("COMMIT\n", 1)[0]
        appended = [line.split(" ", 2)[2] for line in section.splitlines() if line.startswith(f"-A {ours} ")]
        assert appended == [line for rule in c.rules for line in iptables_lines(one_rule(rule), family)]
