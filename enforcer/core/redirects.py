"""RedirectConnections: where a redirect port leads, and the pools its ports come from.

A call for N ConnectAddresses takes a block of N consecutive ports on the fw's
internal address that faces the client; InternalAddress is the block's lowest
port, and port base+i leads to ConnectAddresses[i]. Kernel-mode and user-mode
redirects take their blocks from two separate ranges, because the kernel must
tell their packets apart before it has looked anything up: a user-mode port's
packets go to the enforcer before connection tracking, a kernel-mode port's do
not. A block returns to its pool when every action of the block is done.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from enforcer.core.packet import Endpoint, IPAddress
from enforcer.core.results import InvalidArgument, IsBusy

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
MAX_ADDRESSES = 64  # ConnectAddresses in one call
# Above Linux's ephemeral ports (32768-60999), so the fw's own sockets never want them
DEFAULT_KERNEL_REDIRECT_PORTS = (61000, 62999)
DEFAULT_USER_REDIRECT_PORTS = (63000, 64999)


@dataclass(frozen=True, slots=True)
class Redirect:
    """What a RedirectConnections action adds to a permission: its port and its target."""

    protocol: int
    client: IPAddress
    internal: IPAddress
    internal_port: int
    target: IPAddress
    target_port: int
    block: int  # the block's base port (InternalAddress's port)
    user_mode: bool

    @property
    def internal_endpoint(self) -> Endpoint:
        return self.internal, self.internal_port

    @property
    def target_endpoint(self) -> Endpoint:
        return self.target, self.target_port


class PortPool:
    """Blocks of consecutive ports from an inclusive range.

    First fit, searching from just after the last block handed out, so that a port
    just returned is the last to be handed out again (a late packet of an old flow
    then rarely meets a new redirect).
    """

    def __init__(self, low: int, high: int, name: str) -> None:
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {low}-{high}")
        self.low, self.high, self.name = low, high, name
        self._blocks: dict[int, int] = {}  # base -> length
        self._used: set[int] = set()
        self._cursor = low

    def allocate(self, count: int, avoid: Callable[[int], bool] | None = None,
                 avoided: str = "avoided") -> int:
        """The base of a free block of ``count`` ports, none of them one that ``avoid``
        names; IsBusy when there is none (``avoided`` says why the caller avoids ports)."""
        size = self.high - self.low + 1
        if not 1 <= count <= size:
            raise InvalidArgument(f"{count} ports do not fit the {self.name} ports "
                                  f"{self.low}-{self.high}")
        start = self._cursor
        avoiding: dict[int, bool] = {}  # each port asked of ``avoid`` once

        def taken(port: int) -> bool:
            if port in self._used:
                return True
            if avoid is None:
                return False
            if port not in avoiding:
                avoiding[port] = avoid(port)
            return avoiding[port]

        for step in range(size):
            base = self.low + (start - self.low + step) % size
            if base + count - 1 > self.high:
                continue
            if not any(taken(p) for p in range(base, base + count)):
                self._blocks[base] = count
                self._used.update(range(base, base + count))
                self._cursor = base + count if base + count <= self.high else self.low
                return base
        skipped = sum(avoiding.values())
        more = f", {skipped} {avoided}" if skipped else ""
        raise IsBusy(f"no {count} consecutive free ports among the {self.name} ports "
                     f"{self.low}-{self.high} ({len(self._used)} in use{more})")

    def release(self, base: int) -> None:
        count = self._blocks.pop(base)
        self._used.difference_update(range(base, base + count))

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    @property
    def in_use(self) -> int:
        return len(self._used)

    def to_dict(self) -> dict[str, object]:
        return {"range": [self.low, self.high], "in_use": self.in_use, "blocks": len(self._blocks)}
