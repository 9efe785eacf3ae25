"""The refusals an application filter logs: the first few of each primary's.

A client can repeat a refused request as often as it sends (hundreds of PORT commands
at a cap in one segment, an RRQ in each datagram of a TFTP flow); a line logged for
each would fill the enforcer's log and spend its time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

LOGGED_REFUSALS = 8  # a primary's refusals logged; all are counted


@dataclass
class Refusals:
    """One primary's refusals: all counted, the first LOGGED_REFUSALS logged, the last
    logged saying that the rest are not."""

    log: logging.Logger
    session: int
    primary: str  # what the filter watches, as the last line logged names it: "flow"
    count: int = 0

    def __call__(self, why: str, *args: object, times: int = 1) -> None:
        """``times`` refusals for one reason, ``why % args``: logged once, if the first
        of them is among the first LOGGED_REFUSALS."""
        if self.count < LOGGED_REFUSALS:
            last = self.count + times >= LOGGED_REFUSALS
            log_line = "session %d: " + why + (f" (this {self.primary}'s further refusals are "
                                                "not logged)" if last else "")
            self.log.info(log_line, self.session, *args)
        self.count += times
