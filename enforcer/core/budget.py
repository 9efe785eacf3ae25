"""Byte budgets: caps on bytes held, one inside another (SPEC rule 16).

A flow's budget may sit inside its client's, which sits inside the total: bytes
taken count at every level, and a take succeeds only if every level has room.
Pure bookkeeping: whoever holds the bytes takes them and gives them back.
"""

from __future__ import annotations

from collections.abc import Iterator


class ByteBudget:
    """At most ``limit`` bytes held here, and within ``parent``'s limit too."""

    __slots__ = ("limit", "parent", "used")

    def __init__(self, limit: int, parent: ByteBudget | None = None) -> None:
        if limit < 0:
            raise ValueError(f"a byte budget's limit cannot be negative: {limit}")
        self.limit = limit
        self.parent = parent
        self.used = 0

    def _levels(self) -> Iterator[ByteBudget]:
        level: ByteBudget | None = self
        while level is not None:
            yield level
            level = level.parent

    @property
    def room(self) -> int:
        """How many bytes a take may ask for now (the least room of any level; below
        zero after a charge past a limit)."""
        return min(level.limit - level.used for level in self._levels())

    def take(self, n: int) -> bool:
        """Hold ``n`` more bytes if every level has room for them; False (nothing
        taken) if one has not."""
        if n < 0:
            raise ValueError(f"cannot take a negative number of bytes: {n}")
        if n > self.room:
            return False
        self.charge(n)
        return True

    def charge(self, n: int) -> None:
        """Hold ``n`` more bytes whether or not there is room: for bytes already made
        (a filter's output, larger than its input, cannot be unmade). Takes then
        fail until enough has been given back."""
        if n < 0:
            raise ValueError(f"cannot charge a negative number of bytes: {n}")
        for level in self._levels():
            level.used += n

    def give(self, n: int) -> None:
        """Hold ``n`` bytes fewer."""
        if n < 0 or n > self.used:
            raise ValueError(f"cannot give back {n} bytes of {self.used} held")
        for level in self._levels():
            level.used -= n

    def __repr__(self) -> str:
        inside = "" if self.parent is None else f" in {self.parent!r}"
        return f"<ByteBudget {self.used}/{self.limit}{inside}>"


class ClientBudgets:
    """The byte budgets of every client inside one total: each client's budget is made on
    first use and forgotten once it holds nothing (``prune``)."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = ByteBudget(total)
        self.clients: dict[object, ByteBudget] = {}

    def of(self, client: object) -> ByteBudget:
        budget = self.clients.get(client)
        if budget is None:
            budget = self.clients[client] = ByteBudget(self.per_client, self.total)
        return budget

    def prune(self) -> None:
        for client in [c for c, budget in self.clients.items() if not budget.used]:
            del self.clients[client]

    def status(self) -> dict[str, dict[str, object]]:
        """As the other caps show theirs (``status``): the total's use, the highest
        client's and the top three."""
        top = sorted(self.clients.items(), key=lambda item: item[1].used, reverse=True)[:3]
        return {"buffered_bytes_total": {"cap": self.total.limit, "used": self.total.used},
                "buffered_bytes_per_client": {
                    "cap": self.per_client, "highest": top[0][1].used if top else 0,
                    "top": [[str(client), budget.used] for client, budget in top]}}
