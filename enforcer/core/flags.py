"""Permission flags (SPEC.md): single bits in one enum; unknown bits are an invalid argument."""

from __future__ import annotations

import enum
from collections.abc import Iterable

from enforcer.core.results import InvalidArgument


class Flags(enum.IntFlag):
    ADDRESS_BASED = 0x01
    ALLOW_MULTIPLE = 0x02
    TIMEOUT = 0x04
    NO_KERNEL_MODE = 0x08
    BIDIRECTIONAL = 0x10
    INCREASE_RECEIVE_BUFFER = 0x20


# A plain int: the complement of an IntFlag stays inside the flag's own bits.
ALL_FLAGS = sum(f.value for f in Flags)
MAX_FLAG_NAMES = len(Flags)


def parse_flags(value: int | Iterable[str] | None) -> Flags:
    """Flags from an integer or a list of names; anything unknown is E_INVALIDARG."""
    if value is None:
        return Flags(0)
    if isinstance(value, bool):
        raise InvalidArgument("flags must be an integer or a list of flag names")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument("flags must not be negative")
        if value & ~ALL_FLAGS:
            raise InvalidArgument(f"unknown flag bits 0x{value & ~ALL_FLAGS:x}")
        return Flags(value)
    names = list(value)
    if len(names) > MAX_FLAG_NAMES:
        raise InvalidArgument(f"too many flags: {len(names)} (there are {MAX_FLAG_NAMES})")
    out = Flags(0)
    for name in names:
        if not isinstance(name, str) or name not in Flags.__members__:
            raise InvalidArgument(f"unknown flag {name!r} (known: {', '.join(Flags.__members__)})")
        out |= Flags[name]
    return out


def flag_names(flags: Flags) -> list[str]:
    return [f.name for f in Flags if f in flags and f.name]
