"""The control protocol's framing, shared by the server and the client.

One JSON object per line. A request is ``{"id": N, "method": "name", "params": {...}}``;
the reply is ``{"id": N, "result": ...}`` or ``{"id": N, "error": {"name", "hresult",
"message"}}``. Lines longer than MAX_REQUEST bytes are refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

MAX_REQUEST = 64 * 1024
MAX_LISTED = 10000  # the most items a listing returns (its 'limit')


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class Listing(list[Any]):
    """What a listing call returns: a list, cut to the call's limit; ``more`` says how
    many items were left out (the reply carries it as ``"more"`` beside ``"result"``
    when it is not 0)."""

    def __init__(self, items: Iterable[Any] = (), more: int = 0) -> None:
        super().__init__(items)
        self.more = more
