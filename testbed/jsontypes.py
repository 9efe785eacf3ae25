"""The JSON the harness reads back (a run's report, a testbed's ledger): each value's type
checked where it is read, and said as JSON names it when it is not what was written."""

from __future__ import annotations

from typing import Any

JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "true or false",
              int: "a number", float: "a number", type(None): "null"}
NAME_OR_NULL = (str, type(None))


def typed(where: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    """``value``, if it is of ``kind`` (true and false are not numbers); else a ValueError
    saying what it is instead: ``pids[0].pid is a string, not a number``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(dict.fromkeys(JSON_TYPES[k] for k in kinds))
        raise ValueError(f"{where} is {JSON_TYPES.get(type(value), 'something else')}, not {wanted}")
    return value
