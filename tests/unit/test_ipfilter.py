"""enforcer.core.ipfilter: the IFWXIpFilter object of SPEC.md rule 10, IPv4 and IPv6 (IPF-01)."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.core.ipfilter import MAX_RANGES, IpFilter
from enforcer.core.packet import IPAddress
from enforcer.core.results import InvalidArgument

ip = ipaddress.ip_address

# A base address per family; tests name addresses as offsets from it.
BASES = {4: ip("10.0.0.0"), 6: ip("2001:db8::")}
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def at(family: int, offset: int) -> IPAddress:
    return BASES[family] + offset


def include(f: IpFilter, family: int, low: int, high: int) -> None:
    f.include_range(at(family, low), at(family, high))


def exclude(f: IpFilter, family: int, low: int, high: int) -> None:
    f.exclude_range(at(family, low), at(family, high))


def offsets(f: IpFilter, family: int) -> list[tuple[int, int]]:
    """The filter's ranges of one family, as offsets from that family's base."""
    base = int(BASES[family])
    return [(int(lo) - base, int(hi) - base) for lo, hi in f.ranges() if lo.version == family]


def members(f: IpFilter, family: int, span: range) -> set[int]:
    return {n for n in span if f.is_included(at(family, n))}


# --- the empty filter -----------------------------------------------------------------


def test_a_new_filter_is_empty_and_blocks_every_address() -> None:
    f = IpFilter()
    assert f.is_empty
    assert f.ranges() == []
    assert f.to_dict() == {"ranges": []}
    for address in ("0.0.0.0", "10.0.0.1", "255.255.255.255", "::", "2001:db8::1", "::ffff:10.0.0.1",
                    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"):
        assert not f.is_included(ip(address)), address


@FAMILIES
def test_a_filter_whose_ranges_were_all_excluded_is_empty_again(family: int) -> None:
    f = IpFilter()
    include(f, family, 10, 20)
    assert not f.is_empty
    exclude(f, family, 0, 30)
    assert f.is_empty
    assert f == IpFilter()
    assert not f.is_included(at(family, 15))


# --- include_range ----------------------------------------------------------------------


@FAMILIES
def test_include_range_is_inclusive_at_both_ends(family: int) -> None:
    f = IpFilter()
    include(f, family, 10, 20)
    assert members(f, family, range(0, 40)) == set(range(10, 21))
    assert offsets(f, family) == [(10, 20)]
    assert not f.is_empty


@FAMILIES
def test_a_single_address_range(family: int) -> None:
    f = IpFilter()
    include(f, family, 7, 7)
    assert members(f, family, range(0, 20)) == {7}
    assert offsets(f, family) == [(7, 7)]


def test_ranges_may_be_given_as_strings_or_address_objects() -> None:
    by_text, by_object = IpFilter(), IpFilter()
    by_text.include_range("192.0.2.10", "192.0.2.20")
    by_text.include_range("2001:db8::a", "2001:db8::14")
    by_object.include_range(ip("192.0.2.10"), ip("192.0.2.20"))
    by_object.include_range(ip("2001:db8::a"), ip("2001:db8::14"))
    assert by_text == by_object
    assert by_text.ranges() == [(ip("192.0.2.10"), ip("192.0.2.20")), (ip("2001:db8::a"), ip("2001:db8::14"))]


@FAMILIES
@pytest.mark.parametrize(
    ("existing", "added", "expected"),
    [
        ([(10, 20)], (15, 30), [(10, 30)]),              # overlaps the right end
        ([(10, 20)], (5, 12), [(5, 20)]),                # overlaps the left end
        ([(10, 20)], (21, 30), [(10, 30)]),              # adjacent on the right
        ([(10, 20)], (0, 9), [(0, 20)]),                 # adjacent on the left
        ([(10, 20)], (12, 18), [(10, 20)]),              # inside
        ([(10, 20)], (10, 20), [(10, 20)]),              # the same
        ([(10, 20)], (0, 40), [(0, 40)]),                # around
        ([(10, 20)], (22, 30), [(10, 20), (22, 30)]),    # a gap of one address stays
        ([(10, 20)], (0, 8), [(0, 8), (10, 20)]),        # a gap of one address on the left
        ([(0, 5), (10, 20), (30, 40), (50, 60)], (6, 29), [(0, 40), (50, 60)]),  # bridges by adjacency
        ([(0, 5), (10, 20), (30, 40), (50, 60)], (15, 55), [(0, 5), (10, 60)]),  # swallows several
        ([(10, 20), (30, 40)], (25, 25), [(10, 20), (25, 25), (30, 40)]),        # lands in a gap
        ([(10, 20), (30, 40)], (21, 29), [(10, 40)]),    # fills a gap exactly
    ],
)
def test_include_range_merges_overlapping_and_adjacent_ranges(
        family: int, existing: list[tuple[int, int]], added: tuple[int, int],
        expected: list[tuple[int, int]]) -> None:
    f = IpFilter()
    for low, high in existing:
        include(f, family, low, high)
    include(f, family, *added)
    assert offsets(f, family) == expected
    covered = set().union(*(range(lo, hi + 1) for lo, hi in expected))
    assert members(f, family, range(0, 70)) == covered


@FAMILIES
def test_include_range_in_any_order_gives_sorted_ranges(family: int) -> None:
    f = IpFilter()
    for low, high in [(50, 60), (0, 5), (30, 40), (10, 20)]:
        include(f, family, low, high)
    assert offsets(f, family) == [(0, 5), (10, 20), (30, 40), (50, 60)]


@pytest.mark.parametrize(
    ("low", "high"),
    [("0.0.0.0", "255.255.255.255"), ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")],
    ids=["ipv4", "ipv6"],
)
def test_the_whole_address_space_and_its_edges(low: str, high: str) -> None:
    f = IpFilter()
    f.include_range(low, high)
    assert f.is_included(ip(low)) and f.is_included(ip(high))
    f.exclude_range(high, high)
    assert not f.is_included(ip(high))
    assert f.is_included(ip(high) - 1)
    f.exclude_range(low, low)
    assert not f.is_included(ip(low))
    assert f.ranges() == [(ip(low) + 1, ip(high) - 1)]
    f.include_range(high, high)
    f.include_range(low, low)
    assert f.ranges() == [(ip(low), ip(high))]


# --- exclude_range ----------------------------------------------------------------------


@FAMILIES
@pytest.mark.parametrize(
    ("removed", "expected"),
    [
        ((15, 16), [(10, 14), (17, 20)]),    # the middle: split in two
        ((10, 10), [(11, 20)]),              # the left edge
        ((20, 20), [(10, 19)]),              # the right edge
        ((5, 12), [(13, 20)]),               # overlapping the left end
        ((18, 25), [(10, 17)]),              # overlapping the right end
        ((10, 20), []),                      # the whole range
        ((0, 40), []),                       # a superset
        ((0, 9), [(10, 20)]),                # adjacent on the left: nothing to remove
        ((21, 30), [(10, 20)]),              # adjacent on the right: nothing to remove
        ((11, 19), [(10, 10), (20, 20)]),    # all but the edges
    ],
)
def test_exclude_range_trims_and_splits(family: int, removed: tuple[int, int],
                                        expected: list[tuple[int, int]]) -> None:
    f = IpFilter()
    include(f, family, 10, 20)
    exclude(f, family, *removed)
    assert offsets(f, family) == expected
    covered = set().union(*(range(lo, hi + 1) for lo, hi in expected))
    assert members(f, family, range(0, 40)) == covered


@FAMILIES
def test_exclude_range_across_several_ranges(family: int) -> None:
    f = IpFilter()
    for low, high in [(0, 5), (10, 20), (30, 40), (50, 60)]:
        include(f, family, low, high)
    exclude(f, family, 3, 35)
    assert offsets(f, family) == [(0, 2), (36, 40), (50, 60)]
    exclude(f, family, 41, 49)  # only the gap: no change
    assert offsets(f, family) == [(0, 2), (36, 40), (50, 60)]
    exclude(f, family, 37, 37)
    assert offsets(f, family) == [(0, 2), (36, 36), (38, 40), (50, 60)]


@FAMILIES
def test_exclude_range_from_an_empty_filter_is_allowed_and_changes_nothing(family: int) -> None:
    f = IpFilter()
    exclude(f, family, 0, 10)
    assert f.is_empty


# --- the families are independent --------------------------------------------------------


def test_an_ipv4_range_holds_no_ipv6_address_and_the_reverse() -> None:
    f = IpFilter()
    f.include_range("0.0.0.0", "0.0.0.255")
    assert f.is_included(ip("0.0.0.1"))
    assert not f.is_included(ip("::1"))            # the same integer, the other family
    assert not f.is_included(ip("::ffff:0.0.0.1"))
    f.exclude_range("::", "::ff")                   # the same integers in IPv6 remove nothing
    assert f.ranges() == [(ip("0.0.0.0"), ip("0.0.0.255"))]
    f.include_range("::", "::ff")
    f.exclude_range("0.0.0.0", "0.0.0.255")
    assert f.ranges() == [(ip("::"), ip("::ff"))]
    assert f.is_included(ip("::1")) and not f.is_included(ip("0.0.0.1"))


def test_ipv4_mapped_ipv6_addresses_are_ipv6() -> None:
    f = IpFilter()
    f.include_range("::ffff:192.0.2.0", "::ffff:192.0.2.255")
    assert f.is_included(ip("::ffff:192.0.2.7"))
    assert not f.is_included(ip("192.0.2.7"))
    assert f.ranges()[0][0].version == 6
    g = IpFilter()
    g.include_range("192.0.2.0", "192.0.2.255")
    assert not g.is_included(ip("::ffff:192.0.2.7"))
    assert f != g
    with pytest.raises(InvalidArgument, match="span families"):
        IpFilter().include_range("192.0.2.0", "::ffff:192.0.2.255")


def test_ranges_lists_ipv4_before_ipv6_each_sorted() -> None:
    f = IpFilter()
    f.include_range("2001:db8::9", "2001:db8::9")
    f.include_range("2001:db8::1", "2001:db8::2")
    f.include_range("198.51.100.1", "198.51.100.1")
    f.include_range("192.0.2.1", "192.0.2.3")
    assert f.ranges() == [
        (ip("192.0.2.1"), ip("192.0.2.3")),
        (ip("198.51.100.1"), ip("198.51.100.1")),
        (ip("2001:db8::1"), ip("2001:db8::2")),
        (ip("2001:db8::9"), ip("2001:db8::9")),
    ]


# --- invalid arguments --------------------------------------------------------------------


BAD_RANGES = [
    pytest.param("192.0.2.1", "2001:db8::1", "span families", id="mixed-families"),
    pytest.param("2001:db8::1", "192.0.2.1", "span families", id="mixed-families-reversed"),
    pytest.param("192.0.2.9", "192.0.2.1", "above high", id="ipv4-low-above-high"),
    pytest.param("2001:db8::9", "2001:db8::1", "above high", id="ipv6-low-above-high"),
    pytest.param("192.0.2.2", "192.0.2.1", "above high", id="ipv4-low-just-above-high"),
    pytest.param("2001:db8::2", "2001:db8::1", "above high", id="ipv6-low-just-above-high"),
    pytest.param("192.0.2", "192.0.2.1", "not an IP address", id="bad-low-text"),
    pytest.param("192.0.2.1", "example.com", "not an IP address", id="bad-high-text"),
    pytest.param("", "192.0.2.1", "not an IP address", id="empty-text"),
    pytest.param("192.0.2.0/24", "192.0.2.1", "not an IP address", id="network-text"),
    pytest.param(3221225985, "192.0.2.1", "got int", id="integer"),
    pytest.param(None, "192.0.2.1", "got NoneType", id="none"),
    pytest.param("192.0.2.1", b"\xc0\x00\x02\x01", "got bytes", id="bytes"),
    pytest.param(ipaddress.ip_network("192.0.2.0/24"), "192.0.2.1", "got IPv4Network", id="network"),
    pytest.param("fe80::1%eth0", "fe80::2", "scope id", id="scoped-text"),
    pytest.param("fe80::1", ipaddress.IPv6Address("fe80::2%1"), "scope id", id="scoped-object"),
]


@pytest.mark.parametrize("method", ["include_range", "exclude_range"])
@pytest.mark.parametrize(("low", "high", "problem"), BAD_RANGES)
def test_bad_ranges_are_invalid_arguments_and_change_nothing(
        method: str, low: Any, high: Any, problem: str) -> None:
    f = IpFilter()
    f.include_range("192.0.2.0", "192.0.2.255")
    f.include_range("2001:db8::", "2001:db8::ff")
    before = f.ranges()
    with pytest.raises(InvalidArgument, match=problem) as caught:
        getattr(f, method)(low, high)
    assert caught.value.name == "E_INVALIDARG"
    assert f.ranges() == before


@pytest.mark.parametrize("bad", ["nonsense", "", 42, None, "fe80::1%eth0"])
def test_is_included_rejects_what_is_not_an_address(bad: Any) -> None:
    with pytest.raises(InvalidArgument):
        IpFilter().is_included(bad)


def test_is_included_accepts_the_text_form() -> None:
    f = IpFilter()
    f.include_range("192.0.2.1", "192.0.2.1")
    assert f.is_included("192.0.2.1")
    assert not f.is_included("192.0.2.2")


@pytest.mark.parametrize("method", ["include_filter", "exclude_filter", "compare"])
@pytest.mark.parametrize("bad", [None, "192.0.2.1", {"ranges": []}])
def test_filter_arguments_must_be_filters(method: str, bad: Any) -> None:
    f = IpFilter()
    f.include_range("192.0.2.1", "192.0.2.1")
    with pytest.raises(InvalidArgument, match="expected an IpFilter"):
        getattr(f, method)(bad)
    assert f.ranges() == [(ip("192.0.2.1"), ip("192.0.2.1"))]


# --- include_filter and exclude_filter ------------------------------------------------------


def both_families(*spans: tuple[int, int]) -> IpFilter:
    f = IpFilter()
    for family in (4, 6):
        for low, high in spans:
            include(f, family, low, high)
    return f


@FAMILIES
def test_include_filter_is_the_union(family: int) -> None:
    f = both_families((0, 5), (20, 30))
    other = both_families((6, 10), (25, 40), (50, 50))
    other_before = other.ranges()
    f.include_filter(other)
    assert offsets(f, family) == [(0, 10), (20, 40), (50, 50)]
    assert other.ranges() == other_before


@FAMILIES
def test_exclude_filter_is_the_difference(family: int) -> None:
    f = both_families((0, 10), (20, 40), (50, 60))
    other = both_families((5, 5), (15, 25), (38, 52))
    other_before = other.ranges()
    f.exclude_filter(other)
    assert offsets(f, family) == [(0, 4), (6, 10), (26, 37), (53, 60)]
    assert other.ranges() == other_before


def test_filter_operations_keep_the_families_apart() -> None:
    f = IpFilter()
    f.include_range("0.0.0.0", "0.0.0.9")
    other = IpFilter()
    other.include_range("::", "::9")
    f.exclude_filter(other)
    assert f.ranges() == [(ip("0.0.0.0"), ip("0.0.0.9"))]
    f.include_filter(other)
    assert f.ranges() == [(ip("0.0.0.0"), ip("0.0.0.9")), (ip("::"), ip("::9"))]


def test_filter_operations_with_the_empty_filter_and_with_itself() -> None:
    f = both_families((0, 5), (20, 30))
    before = f.clone()
    f.include_filter(IpFilter())
    assert f == before
    f.exclude_filter(IpFilter())
    assert f == before
    f.include_filter(f)
    assert f == before
    empty = IpFilter()
    empty.include_filter(f)
    assert empty == f
    f.exclude_filter(f)
    assert f.is_empty


# --- compare, equality, hashing -------------------------------------------------------------


def test_filters_holding_the_same_addresses_compare_equal_however_they_were_built() -> None:
    a = IpFilter()
    a.include_range("192.0.2.0", "192.0.2.255")
    a.include_range("2001:db8::", "2001:db8::ff")
    b = IpFilter()
    b.include_range("2001:db8::80", "2001:db8::ff")
    b.include_range("192.0.2.128", "192.0.2.255")
    b.include_range("192.0.2.0", "192.0.2.127")    # adjacent: merged
    b.include_range("2001:db8::", "2001:db8::90")  # overlapping: merged
    c = IpFilter()
    c.include_range("192.0.0.0", "192.0.5.255")
    c.exclude_range("192.0.3.0", "192.0.5.255")
    c.exclude_range("192.0.0.0", "192.0.1.255")
    c.include_range("2001:db8::", "2001:db8::ff")
    for x, y in [(a, b), (b, c), (a, c)]:
        assert x.compare(y) == 0
        assert y.compare(x) == 0
        assert x == y
        assert hash(x) == hash(y)
    assert len({a, b, c}) == 1


def test_compare_orders_by_ipv4_ranges_then_ipv6_ranges() -> None:
    def make(*spans: tuple[str, str]) -> IpFilter:
        f = IpFilter()
        for low, high in spans:
            f.include_range(low, high)
        return f

    ascending = [
        make(),                                                    # the empty filter is least
        make(("::1", "::1")),                                      # no IPv4, some IPv6
        make(("::1", "::2")),                                      # same low, higher high
        make(("10.0.0.1", "10.0.0.1")),                            # any IPv4 beats IPv4-less
        make(("10.0.0.1", "10.0.0.1"), ("::", "::")),              # a prefix comes first
        make(("10.0.0.1", "10.0.0.1"), ("10.0.0.3", "10.0.0.3")),  # IPv4 decides before IPv6
        make(("10.0.0.1", "10.0.0.2")),
        make(("10.0.0.2", "10.0.0.2")),
    ]
    for i, x in enumerate(ascending):
        for j, y in enumerate(ascending):
            expected = (i > j) - (i < j)
            assert x.compare(y) == expected, (i, j)
            assert (x == y) == (i == j)


def test_compare_with_an_equal_clone_is_zero_and_a_change_makes_it_nonzero() -> None:
    a = both_families((0, 10))
    b = a.clone()
    assert a.compare(b) == 0
    b.exclude_range(at(6, 10), at(6, 10))
    assert a.compare(b) == 1 and b.compare(a) == -1
    assert a != b


def test_equality_with_other_types_is_false() -> None:
    f = IpFilter()
    assert f != {"ranges": []}
    assert f != None  # noqa: E711
    assert f != []


# --- clone --------------------------------------------------------------------------------------


def test_clone_is_an_independent_copy() -> None:
    original = both_families((0, 10), (20, 30))
    copy = original.clone()
    assert copy == original and copy is not original
    copy.exclude_range(at(4, 0), at(4, 30))
    copy.include_range(at(6, 100), at(6, 110))
    assert original.ranges() == both_families((0, 10), (20, 30)).ranges()
    original.include_range(at(4, 11), at(4, 19))
    assert offsets(copy, 4) == []
    assert offsets(original, 4) == [(0, 30)]
    assert offsets(copy, 6) == [(0, 10), (20, 30), (100, 110)]


def test_clone_of_the_empty_filter_is_independent_too() -> None:
    original = IpFilter()
    copy = original.clone()
    copy.include_range("192.0.2.1", "192.0.2.1")
    assert original.is_empty
    assert not copy.is_empty


# --- repr -----------------------------------------------------------------------------------------


def test_repr_shows_the_ranges() -> None:
    f = IpFilter()
    f.include_range("192.0.2.1", "192.0.2.1")
    f.include_range("2001:db8::1", "2001:db8::5")
    assert repr(f) == "IpFilter(192.0.2.1, 2001:db8::1-2001:db8::5)"


# --- to_dict and from_dict -----------------------------------------------------------------------


def test_to_dict_and_from_dict_round_trip_through_json() -> None:
    f = IpFilter()
    f.include_range("2001:db8::1", "2001:db8::ffff")
    f.include_range("192.0.2.1", "192.0.2.1")
    f.include_range("198.51.100.0", "198.51.100.255")
    f.include_range("::ffff:192.0.2.1", "::ffff:192.0.2.1")
    data = f.to_dict()
    assert data == {"ranges": [["192.0.2.1", "192.0.2.1"], ["198.51.100.0", "198.51.100.255"],
                               ["::ffff:c000:201", "::ffff:c000:201"], ["2001:db8::1", "2001:db8::ffff"]]}
    again = IpFilter.from_dict(json.loads(json.dumps(data)))
    assert again == f
    assert again.ranges() == f.ranges()


def test_from_dict_normalises_overlapping_and_adjacent_pairs() -> None:
    f = IpFilter.from_dict({"ranges": [["192.0.2.10", "192.0.2.20"], ["192.0.2.21", "192.0.2.30"],
                                       ["192.0.2.25", "192.0.2.40"], ["2001:db8::1", "2001:db8::1"]]})
    assert f.to_dict() == {"ranges": [["192.0.2.10", "192.0.2.40"], ["2001:db8::1", "2001:db8::1"]]}


def test_from_dict_of_no_ranges_is_the_empty_filter() -> None:
    f = IpFilter.from_dict({"ranges": []})
    assert f.is_empty
    assert not f.is_included(ip("192.0.2.1"))


def test_from_dict_accepts_the_most_ranges_allowed() -> None:
    pairs = [[str(at(4, 2 * i)), str(at(4, 2 * i))] for i in range(MAX_RANGES)]
    f = IpFilter.from_dict({"ranges": pairs})
    assert len(f.ranges()) == MAX_RANGES


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        pytest.param(None, "expected an object, got NoneType", id="none"),
        pytest.param([["192.0.2.1", "192.0.2.1"]], "expected an object, got list", id="list"),
        pytest.param("192.0.2.1", "expected an object, got str", id="string"),
        pytest.param({}, "'ranges' is missing", id="missing-ranges"),
        pytest.param({"ranges": [], "family": "ipv4"}, "unknown key.*'family'", id="extra-key"),
        pytest.param({"Ranges": []}, "unknown key.*'Ranges'", id="misspelt-key"),
        pytest.param({"ranges": [], 1: 2}, "unknown key.*1", id="non-string-key"),
        pytest.param({"ranges": None}, "'ranges' must be a list, got NoneType", id="ranges-none"),
        pytest.param({"ranges": "192.0.2.1"}, "'ranges' must be a list, got str", id="ranges-string"),
        pytest.param({"ranges": {"192.0.2.1": "192.0.2.2"}}, "must be a list, got dict", id="ranges-dict"),
        pytest.param({"ranges": (("192.0.2.1", "192.0.2.2"),)}, "must be a list, got tuple",
                     id="ranges-tuple"),
        pytest.param({"ranges": [["192.0.2.1", "192.0.2.1"], "192.0.2.2"]},
                     r"ranges\[1\]: expected a \[low, high\] pair", id="entry-string"),
        pytest.param({"ranges": [("192.0.2.1", "192.0.2.2")]},
                     r"ranges\[0\]: expected a \[low, high\] pair", id="entry-tuple"),
        pytest.param({"ranges": [["192.0.2.1"]]}, r"ranges\[0\]: expected a \[low, high\] pair",
                     id="entry-short"),
        pytest.param({"ranges": [[]]}, r"ranges\[0\]: expected a \[low, high\] pair", id="entry-empty"),
        pytest.param({"ranges": [["192.0.2.1", "192.0.2.2", "192.0.2.3"]]},
                     r"ranges\[0\]: expected a \[low, high\] pair", id="entry-long"),
        pytest.param({"ranges": [[3221225985, "192.0.2.2"]]}, r"ranges\[0\]: low must be a string, got int",
                     id="low-int"),
        pytest.param({"ranges": [["192.0.2.1", None]]}, r"ranges\[0\]: high must be a string, got NoneType",
                     id="high-none"),
        pytest.param({"ranges": [["192.0.2.1", ["192.0.2.2"]]]}, r"ranges\[0\]: high must be a string",
                     id="high-list"),
        pytest.param({"ranges": [[ip("192.0.2.1"), "192.0.2.2"]]},
                     r"ranges\[0\]: low must be a string, got IPv4Address", id="low-address-object"),
        pytest.param({"ranges": [["192.0.2.1", "192.0.2.2"], ["192.0.2.x", "192.0.2.9"]]},
                     r"ranges\[1\]: range low: '192.0.2.x' is not an IP address", id="bad-address"),
        pytest.param({"ranges": [["192.0.2.9", "192.0.2.1"]]}, r"ranges\[0\]: .*low is above high",
                     id="low-above-high"),
        pytest.param({"ranges": [["192.0.2.1", "2001:db8::1"]]}, r"ranges\[0\]: .*span families",
                     id="mixed-families"),
        pytest.param({"ranges": [["fe80::1%eth0", "fe80::2"]]}, r"ranges\[0\]: .*scope id", id="scoped"),
        pytest.param({"ranges": [["192.0.2.1", "192.0.2.1"]] * (MAX_RANGES + 1)},
                     f"{MAX_RANGES + 1} entries, more than {MAX_RANGES}", id="too-many"),
    ],
)
def test_from_dict_rejects_bad_input_naming_the_problem(data: Any, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem) as caught:
        IpFilter.from_dict(data)
    assert caught.value.name == "E_INVALIDARG"


# --- the limit on normalised ranges --------------------------------------------------------------


def full_filter(v4: int, v6: int) -> IpFilter:
    """A filter of v4 + v6 disjoint single-address ranges at even offsets."""
    f = IpFilter()
    for family, count in ((4, v4), (6, v6)):
        for i in range(count):
            include(f, family, 2 * i, 2 * i)
    return f


def test_at_most_max_ranges_may_be_held() -> None:
    f = full_filter(MAX_RANGES, 0)
    assert len(f.ranges()) == MAX_RANGES
    before = f.clone()
    with pytest.raises(InvalidArgument, match=f"{MAX_RANGES + 1} ranges, more than {MAX_RANGES}"):
        include(f, 4, 2 * MAX_RANGES, 2 * MAX_RANGES)
    assert f == before
    assert not f.is_included(at(4, 2 * MAX_RANGES))


def test_the_limit_counts_both_families_together() -> None:
    f = full_filter(MAX_RANGES // 2, MAX_RANGES // 2)
    before = f.clone()
    with pytest.raises(InvalidArgument, match="more than"):
        include(f, 6, 2 * MAX_RANGES, 2 * MAX_RANGES)
    with pytest.raises(InvalidArgument, match="more than"):
        include(f, 4, 2 * MAX_RANGES, 2 * MAX_RANGES)
    assert f == before


def test_at_the_limit_changes_that_do_not_add_ranges_still_work() -> None:
    f = full_filter(MAX_RANGES, 0)
    include(f, 4, 0, 0)          # already held
    include(f, 4, 1, 1)          # bridges two ranges: one fewer
    assert len(f.ranges()) == MAX_RANGES - 1
    include(f, 4, 2 * MAX_RANGES, 2 * MAX_RANGES)  # back to the limit
    exclude(f, 4, 0, 0)          # trims a range: no more ranges
    assert len(f.ranges()) == MAX_RANGES


def test_an_exclusion_that_would_split_past_the_limit_is_refused() -> None:
    f = full_filter(MAX_RANGES - 1, 0)
    include(f, 4, 2 * MAX_RANGES, 2 * MAX_RANGES + 10)
    before = f.clone()
    with pytest.raises(InvalidArgument, match="more than"):
        exclude(f, 4, 2 * MAX_RANGES + 5, 2 * MAX_RANGES + 5)
    assert f == before
    assert f.is_included(at(4, 2 * MAX_RANGES + 5))


@pytest.mark.parametrize("method", ["include_filter", "exclude_filter"])
def test_a_filter_operation_past_the_limit_is_refused_and_changes_nothing(method: str) -> None:
    if method == "include_filter":
        f = full_filter(MAX_RANGES // 2, 0)
        other = IpFilter()
        for i in range(MAX_RANGES // 2 + 1):
            include(other, 6, 2 * i, 2 * i)
    else:
        f = IpFilter()
        include(f, 4, -1, 2 * MAX_RANGES + 10)
        other = full_filter(MAX_RANGES, 0)  # MAX_RANGES holes inside: MAX_RANGES + 1 pieces remain
    before = f.clone()
    with pytest.raises(InvalidArgument, match="more than"):
        getattr(f, method)(other)
    assert f == before


# --- exhaustive: every small case against a brute-force model ----------------------------------------

TINY = range(6)  # offsets 0..5: every range, and every pair of them, can be tried
TINY_RANGES = [(lo, hi) for lo in TINY for hi in TINY if lo <= hi]


def runs(values: set[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers, ascending."""
    out: list[tuple[int, int]] = []
    for v in sorted(values):
        if out and out[-1][1] + 1 == v:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


@FAMILIES
@pytest.mark.parametrize("method", ["include_range", "exclude_range", "include_filter", "exclude_filter"])
def test_exhaustively_every_operation_on_every_two_range_filter(family: int, method: str) -> None:
    for first in TINY_RANGES:
        for second in TINY_RANGES:
            start = {*range(first[0], first[1] + 1), *range(second[0], second[1] + 1)}
            for low, high in TINY_RANGES:
                f = IpFilter()
                include(f, family, *first)
                include(f, family, *second)
                if method.endswith("range"):
                    getattr(f, method)(at(family, low), at(family, high))
                else:
                    other = IpFilter()
                    include(other, family, low, high)
                    getattr(f, method)(other)
                span = set(range(low, high + 1))
                expected = start | span if method.startswith("include") else start - span
                case = (first, second, method, (low, high))
                assert offsets(f, family) == runs(expected), case
                assert members(f, family, range(-1, 7)) == expected, case


# --- property: IpFilter against a brute-force model -------------------------------------------------

# Three small address spaces, each enumerable: an IPv4 /24, an IPv6 /120, and the IPv4-mapped
# IPv6 form of the same /24 (which must stay apart from the IPv4 addresses).
SPACES: dict[str, IPAddress] = {
    "v4": ipaddress.IPv4Address("192.0.2.0"),
    "v6": ipaddress.IPv6Address("2001:db8::"),
    "mapped": ipaddress.IPv6Address("::ffff:192.0.2.0"),
}


def in_space(space: str, offset: int) -> IPAddress:
    base = SPACES[space]
    return ipaddress.IPv4Address(int(base) + offset) if base.version == 4 else ipaddress.IPv6Address(
        int(base) + offset)


PROBES = [in_space(space, n) for space in SPACES for n in range(-1, 257)]

Model = frozenset[IPAddress]


@st.composite
def range_ops(draw: st.DrawFn) -> tuple[str, str, int, int]:
    method = draw(st.sampled_from(["include_range", "exclude_range"]))
    space = draw(st.sampled_from(sorted(SPACES)))
    # mostly short ranges in a few addresses at either end of the space, so that they often overlap,
    # touch or leave one-address gaps; sometimes anywhere, up to the whole space
    low = draw(st.integers(0, 4) | st.integers(251, 255) | st.integers(0, 255))
    width = draw(st.integers(0, 1) | st.integers(0, 255))
    return method, space, low, min(255, low + width)


filter_ops = st.tuples(st.sampled_from(["include_filter", "exclude_filter"]),
                       st.lists(range_ops(), max_size=6))
op_sequences = st.lists(range_ops() | filter_ops, max_size=20)


def build(ops: list[Any]) -> tuple[IpFilter, Model]:
    """Apply ops to a fresh filter and to a plain set of addresses."""
    f, model = IpFilter(), set[IPAddress]()
    for op in ops:
        if op[0] in ("include_range", "exclude_range"):
            method, space, low, high = op
            getattr(f, method)(in_space(space, low), in_space(space, high))
            span = {in_space(space, n) for n in range(low, high + 1)}
        else:
            method, sub_ops = op
            other, other_model = build(sub_ops)
            other_before = other.clone()
            getattr(f, method)(other)
            assert other == other_before
            span = set(other_model)
        if method.startswith("include"):
            model |= span
        else:
            model -= span
        # after every step, not only at the end: a later step could hide an earlier mistake
        assert f.ranges() == model_ranges(frozenset(model)), op
    return f, frozenset(model)


def model_intervals(model: Model) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """The normalised intervals of a set, by brute force: maximal runs of consecutive integers."""
    result: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for address in sorted(model, key=lambda a: (a.version, int(a))):
        runs, value = result[address.version], int(address)
        if runs and runs[-1][1] + 1 == value:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return tuple(result[4]), tuple(result[6])


def model_ranges(model: Model) -> list[tuple[IPAddress, IPAddress]]:
    """What IpFilter.ranges() must return for a set: its maximal runs, IPv4 first."""
    v4, v6 = model_intervals(model)
    return [(ipaddress.IPv4Address(lo), ipaddress.IPv4Address(hi)) for lo, hi in v4] + [
        (ipaddress.IPv6Address(lo), ipaddress.IPv6Address(hi)) for lo, hi in v6]


@settings(max_examples=300, deadline=None)
@given(op_sequences)
def test_property_ipfilter_matches_a_set_of_addresses(ops: list[Any]) -> None:
    f, model = build(ops)
    for address in PROBES:
        assert f.is_included(address) == (address in model), address
    assert f.ranges() == model_ranges(model)
    assert f.is_empty == (not model)
    assert IpFilter.from_dict(json.loads(json.dumps(f.to_dict()))) == f


@settings(max_examples=300, deadline=None)
@given(op_sequences, op_sequences)
def test_property_compare_is_zero_exactly_for_the_same_set(ops_a: list[Any], ops_b: list[Any]) -> None:
    a, model_a = build(ops_a)
    b, model_b = build(ops_b)
    key_a, key_b = model_intervals(model_a), model_intervals(model_b)
    expected = (key_a > key_b) - (key_a < key_b)   # the documented order
    assert a.compare(b) == expected
    assert b.compare(a) == -expected
    assert (expected == 0) == (model_a == model_b)
    assert (a == b) == (model_a == model_b)
    if model_a == model_b:
        assert hash(a) == hash(b)
    assert a.compare(a.clone()) == 0


@settings(max_examples=100, deadline=None)
@given(op_sequences, op_sequences)
def test_property_equal_sets_built_two_ways_compare_equal(ops_a: list[Any], ops_b: list[Any]) -> None:
    """The union by include_filter equals the union rebuilt range by range; so for the difference."""
    a, model_a = build(ops_a)
    b, model_b = build(ops_b)
    union = a.clone()
    union.include_filter(b)
    rebuilt = IpFilter()
    for low, high in a.ranges() + b.ranges():
        rebuilt.include_range(low, high)
    assert union.compare(rebuilt) == 0 and union == rebuilt and hash(union) == hash(rebuilt)
    for address in PROBES:
        assert union.is_included(address) == (address in model_a | model_b)
    difference = a.clone()
    difference.exclude_filter(b)
    for address in PROBES:
        assert difference.is_included(address) == (address in model_a - model_b)
