"""A data filter for the tests: it changes lengths both ways, so sequence numbers must be shifted."""

from __future__ import annotations

from enforcer.core.datafilter import Direction
from enforcer.core.packet import FlowKey


class Shout:
    """Client to server: "ping" becomes "PONG!!" (+2 bytes); back: "!!" becomes "?" (-1)."""

    def __init__(self, key: FlowKey) -> None:
        self.key = key

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        if direction is Direction.OUT:
            return data.replace(b"ping", b"PONG!!")
        return data.replace(b"!!", b"?")


class Brittle:
    """Passes every byte, until the client sends "secret": then it raises (a filter's bug)."""

    def __init__(self, key: FlowKey) -> None:
        self.key = key

    def on_data(self, direction: Direction, data: bytes) -> bytes:
        if b"secret" in data:
            raise ValueError("a bug in the filter")
        return data
