"""IpFilter: the IFWXIpFilter object of SPEC.md rule 10, a set of IP addresses.

A filter restricts the *remote peer* of a bound socket (RetroactiveAllowBind).
It is a set of inclusive address ranges, IPv4 and IPv6. The two families are
independent: an IPv4 range never holds an IPv6 address, and an IPv4-mapped
IPv6 address (``::ffff:192.0.2.1``) is an IPv6 address like any other.

A filter with no ranges blocks everything. "NULL", no filter at all, means
unrestricted: that is the caller's ``None``, not an instance of this class.

Each family is kept normalised: a sorted list of disjoint, non-adjacent
intervals of integers, stored as two parallel lists (lows and highs) so that
a membership test, which runs on every packet to a restricted bind, is one
``bisect``. Including a range merges every interval it overlaps or touches;
excluding one trims or splits the intervals it overlaps. Because the
normalised form of a set is unique, two filters hold the same addresses
exactly when their interval lists are equal, which is what ``compare``,
``__eq__`` and ``__hash__`` use.

No filter may hold more than ``MAX_RANGES`` normalised ranges (both families
together): an operation that would exceed it raises ``InvalidArgument`` and
leaves the filter unchanged.
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from enforcer.core.packet import IPAddress
from enforcer.core.results import InvalidArgument

MAX_RANGES = 4096
"""The most normalised ranges one filter may hold, and the most ``from_dict`` accepts."""

Interval = tuple[int, int]
_SetOperation = Callable[[Sequence[Interval], Sequence[Interval]], list[Interval]]

_VERSIONS = (4, 6)
_FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}


def _address(value: object, what: str) -> IPAddress:
    """An address from an IPAddress or its text form; anything else is InvalidArgument."""
    if isinstance(value, str):
        try:
            address: IPAddress = ipaddress.ip_address(value)
        except ValueError:
            raise InvalidArgument(f"{what}: {value!r} is not an IP address") from None
    elif isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        address = value
    else:
        raise InvalidArgument(f"{what}: expected an IP address or a string, got {type(value).__name__}")
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise InvalidArgument(f"{what}: {value!s} has a scope id, which an IpFilter cannot hold")
    return address


def _endpoints(low: object, high: object) -> tuple[int, int, int]:
    """(version, low, high) of a valid inclusive range, else InvalidArgument naming the problem."""
    lo = _address(low, "range low")
    hi = _address(high, "range high")
    if lo.version != hi.version:
        raise InvalidArgument(f"range {lo} - {hi}: low is {_FAMILY_NAMES[lo.version]} but high is "
                              f"{_FAMILY_NAMES[hi.version]}; a range cannot span families")
    if int(lo) > int(hi):
        raise InvalidArgument(f"range {lo} - {hi}: low is above high")
    return lo.version, int(lo), int(hi)


def _make(version: int, value: int) -> IPAddress:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def _union(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    """The normalised union of two normalised interval lists (linear)."""
    out: list[Interval] = []
    for lo, hi in heapq.merge(a, b):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _difference(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    """The normalised difference a - b of two normalised interval lists (linear)."""
    out: list[Interval] = []
    j = 0
    for lo, hi in a:
        while j < len(b) and b[j][1] < lo:
            j += 1
        start = lo
        k = j
        while k < len(b) and b[k][0] <= hi:
            if b[k][0] > start:
                out.append((start, b[k][0] - 1))
            start = b[k][1] + 1
            k += 1
        if start <= hi:
            out.append((start, hi))
    return out


class IpFilter:
    """A set of IPv4 and IPv6 addresses made of inclusive ranges (IFWXIpFilter).

    Mutable, like the COM object it mirrors. ``__hash__`` follows the current
    contents, so a filter must not be changed while it is a set member or a
    dictionary key; ``clone`` first.
    """

    __slots__ = ("_highs", "_lows")

    def __init__(self) -> None:
        """An empty filter, which blocks every address (IFWXIpFilter as created)."""
        self._lows: dict[int, list[int]] = {v: [] for v in _VERSIONS}
        self._highs: dict[int, list[int]] = {v: [] for v in _VERSIONS}

    # --- the IFWXIpFilter methods ------------------------------------------------

    def include_range(self, low: IPAddress | str, high: IPAddress | str) -> None:
        """Add the addresses low..high inclusive (IFWXIpFilter::IncludeRange).

        low and high must be of one family with low <= high, else InvalidArgument.
        """
        version, lo, hi = _endpoints(low, high)
        lows, highs = self._lows[version], self._highs[version]
        # intervals i..j-1 overlap or touch [lo, hi]: they all merge with it
        i = bisect.bisect_left(highs, lo - 1)
        j = bisect.bisect_right(lows, hi + 1)
        if i < j:
            lo, hi = min(lo, lows[i]), max(hi, highs[j - 1])
        self._check_count(self._count() - (j - i) + 1)
        lows[i:j] = [lo]
        highs[i:j] = [hi]

    def exclude_range(self, low: IPAddress | str, high: IPAddress | str) -> None:
        """Remove the addresses low..high inclusive (IFWXIpFilter::ExcludeRange).

        low and high must be of one family with low <= high, else InvalidArgument.
        Removing addresses the filter does not hold is not an error.
        """
        version, lo, hi = _endpoints(low, high)
        lows, highs = self._lows[version], self._highs[version]
        # intervals i..j-1 overlap [lo, hi]: what is left of them is at most two pieces
        i = bisect.bisect_left(highs, lo)
        j = bisect.bisect_right(lows, hi)
        if i >= j:
            return
        new_lows: list[int] = []
        new_highs: list[int] = []
        if lows[i] < lo:
            new_lows.append(lows[i])
            new_highs.append(lo - 1)
        if highs[j - 1] > hi:
            new_lows.append(hi + 1)
            new_highs.append(highs[j - 1])
        self._check_count(self._count() - (j - i) + len(new_lows))
        lows[i:j] = new_lows
        highs[i:j] = new_highs

    def include_filter(self, other: IpFilter) -> None:
        """Add every address of another filter: set union (IFWXIpFilter::IncludeFilter)."""
        self._combine(_require_filter(other, "include_filter"), _union)

    def exclude_filter(self, other: IpFilter) -> None:
        """Remove every address of another filter: set difference (IFWXIpFilter::ExcludeFilter)."""
        self._combine(_require_filter(other, "exclude_filter"), _difference)

    def is_included(self, address: IPAddress | str) -> bool:
        """Whether the filter holds the address (IFWXIpFilter::IsIncluded); O(log n)."""
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            address = _address(address, "address")
        version, value = address.version, int(address)
        i = bisect.bisect_right(self._lows[version], value) - 1
        return i >= 0 and value <= self._highs[version][i]

    def compare(self, other: IpFilter) -> int:
        """-1, 0 or 1: a total order on filters (IFWXIpFilter::Compare).

        0 exactly when both filters hold the same addresses. Otherwise the order
        is lexicographic on the normalised IPv4 intervals, as (low, high) integer
        pairs in ascending order, and then on the IPv6 intervals; a list that is
        a prefix of another comes first (so the empty filter is the least).
        """
        a, b = self._key(), _require_filter(other, "compare")._key()
        return (a > b) - (a < b)

    def clone(self) -> IpFilter:
        """An independent copy: changing either leaves the other as it was (IFWXIpFilter::Clone)."""
        copy = IpFilter()
        for version in _VERSIONS:
            copy._lows[version] = list(self._lows[version])
            copy._highs[version] = list(self._highs[version])
        return copy

    # --- inspection and serialisation ---------------------------------------------

    def ranges(self) -> list[tuple[IPAddress, IPAddress]]:
        """The normalised ranges, ascending, IPv4 before IPv6."""
        return [(_make(v, lo), _make(v, hi))
                for v in _VERSIONS for lo, hi in zip(self._lows[v], self._highs[v], strict=True)]

    @property
    def is_empty(self) -> bool:
        """True when the filter holds no address, and so blocks every peer."""
        return not any(self._lows[v] for v in _VERSIONS)

    def to_dict(self) -> dict[str, list[list[str]]]:
        """The JSON control API form: ``{"ranges": [[low, high], ...]}``, normalised."""
        return {"ranges": [[str(lo), str(hi)] for lo, hi in self.ranges()]}

    @classmethod
    def from_dict(cls, data: Any) -> IpFilter:
        """A filter from its JSON control API form, validated strictly.

        ``data`` must be a dict whose only key is "ranges", a list of at most
        MAX_RANGES ``[low, high]`` pairs of address strings; overlapping or
        adjacent pairs are merged. Anything else is InvalidArgument naming the
        part that is wrong.
        """
        if not isinstance(data, dict):
            raise InvalidArgument(f"IpFilter: expected an object, got {type(data).__name__}")
        unknown = sorted(repr(k) for k in data if k != "ranges")
        if unknown:
            raise InvalidArgument(f"IpFilter: unknown key(s) {', '.join(unknown)}; only 'ranges' is allowed")
        if "ranges" not in data:
            raise InvalidArgument("IpFilter: 'ranges' is missing")
        ranges = data["ranges"]
        if not isinstance(ranges, list):
            raise InvalidArgument(f"IpFilter: 'ranges' must be a list, got {type(ranges).__name__}")
        if len(ranges) > MAX_RANGES:
            raise InvalidArgument(f"IpFilter: 'ranges' has {len(ranges)} entries, more than {MAX_RANGES}")
        result = cls()
        for index, pair in enumerate(ranges):
            where = f"IpFilter: ranges[{index}]"
            if not isinstance(pair, list) or len(pair) != 2:
                raise InvalidArgument(f"{where}: expected a [low, high] pair")
            for end, value in zip(("low", "high"), pair, strict=True):
                if not isinstance(value, str):
                    raise InvalidArgument(f"{where}: {end} must be a string, got {type(value).__name__}")
            try:
                result.include_range(pair[0], pair[1])
            except InvalidArgument as error:
                raise InvalidArgument(f"{where}: {error.message}") from None
        return result

    # --- Python protocols ---------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        """Equal exactly when both hold the same addresses (compare() == 0)."""
        if not isinstance(other, IpFilter):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        parts = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges()]
        return f"IpFilter({', '.join(parts)})"

    # --- internals ------------------------------------------------------------------

    def _intervals(self, version: int) -> list[Interval]:
        return list(zip(self._lows[version], self._highs[version], strict=True))

    def _key(self) -> tuple[tuple[Interval, ...], tuple[Interval, ...]]:
        return tuple(self._intervals(4)), tuple(self._intervals(6))

    def _count(self) -> int:
        return sum(len(self._lows[v]) for v in _VERSIONS)

    @staticmethod
    def _check_count(count: int) -> None:
        if count > MAX_RANGES:
            raise InvalidArgument(f"IpFilter: the result would have {count} ranges, more than {MAX_RANGES}")

    def _combine(self, other: IpFilter, operation: _SetOperation) -> None:
        """Replace each family by operation(self's intervals, other's), all or nothing."""
        results = {v: operation(self._intervals(v), other._intervals(v)) for v in _VERSIONS}
        self._check_count(sum(len(r) for r in results.values()))
        for version, intervals in results.items():
            self._lows[version] = [lo for lo, _ in intervals]
            self._highs[version] = [hi for _, hi in intervals]


def _require_filter(value: object, method: str) -> IpFilter:
    if not isinstance(value, IpFilter):
        raise InvalidArgument(f"IpFilter.{method}: expected an IpFilter, got {type(value).__name__}")
    return value
