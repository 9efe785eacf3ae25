"""The one place where the testbed's packet timeouts are set.

``POSITIVE`` is how long a check waits for a packet that should arrive;
``NEGATIVE`` is how long a check watches for a packet that must not arrive.
Both can be overridden from the environment (seconds, a positive number):

- ``PINHOLE_POSITIVE_TIMEOUT`` (default 3.0)
- ``PINHOLE_NEGATIVE_TIMEOUT`` (default 1.0)

A bad value raises :class:`TimeoutConfigError` naming the variable, at import.
"""

from __future__ import annotations

import math
import os

__all__ = [
    "DEFAULT_NEGATIVE",
    "DEFAULT_POSITIVE",
    "NEGATIVE",
    "NEGATIVE_ENV",
    "POSITIVE",
    "POSITIVE_ENV",
    "TimeoutConfigError",
    "read_timeout",
]

POSITIVE_ENV = "PINHOLE_POSITIVE_TIMEOUT"
NEGATIVE_ENV = "PINHOLE_NEGATIVE_TIMEOUT"
DEFAULT_POSITIVE = 3.0
DEFAULT_NEGATIVE = 1.0


class TimeoutConfigError(ValueError):
    """An environment variable holds a timeout that is not a positive number."""


def read_timeout(var: str, default: float, environ: dict[str, str] | None = None) -> float:
    """Return the timeout in seconds from environment variable ``var``, or ``default``."""
    env = os.environ if environ is None else environ
    raw = env.get(var)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise TimeoutConfigError(
            f"{var}={raw!r} is not a number; set it to a timeout in seconds, e.g. {var}={default}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise TimeoutConfigError(
            f"{var}={raw!r} must be a positive, finite number of seconds (e.g. {default})"
        )
    return value


POSITIVE: float = read_timeout(POSITIVE_ENV, DEFAULT_POSITIVE)
NEGATIVE: float = read_timeout(NEGATIVE_ENV, DEFAULT_NEGATIVE)
