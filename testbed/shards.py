"""Shards of the clause suite: ``I/N`` runs the checks whose node id hashes to I of N.

A check's shard depends on its node id alone (relative to ``testbed/clauses``, the same
on every machine), never on the order or the number of checks collected: every run of
the same selection splits the same way, and every check is in exactly one shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    index: int  # 1 .. count
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``I/N``; a ValueError that names the problem otherwise."""
        index, sep, count = text.partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"{text!r} is not I/N (two whole numbers, e.g. 1/4)")
        shard = cls(int(index), int(count))
        if shard.count < 1:
            raise ValueError(f"{text!r}: N is at least 1")
        if not 1 <= shard.index <= shard.count:
            raise ValueError(f"{text!r}: I is from 1 to N ({shard.count})")
        return shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def has(self, nodeid: str) -> bool:
        return shard_of(nodeid, self.count) == self.index


WHOLE = Shard(1, 1)


def shard_of(nodeid: str, count: int) -> int:
    """The shard (1 .. count) of a check, by a hash of its node id."""
    digest = hashlib.sha256(nodeid.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count + 1
