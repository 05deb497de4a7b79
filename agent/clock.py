"""The wall clock, injected wherever time matters so tests and benchmarks can set it."""

from __future__ import annotations

import datetime
from collections.abc import Callable

Clock = Callable[[], datetime.datetime]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def isoformat_utc(timestamp: float) -> str:
    """A POSIX timestamp as RFC 3339 UTC, to the second."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")
