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


def human_duration(seconds: float) -> str:
    """'2d 3h', '3h 4m', '5m 6s' or '7s': the two largest units, rounded down."""
    whole = int(seconds)
    if whole >= 86400:
        return f"{whole // 86400}d {whole % 86400 // 3600}h"
    if whole >= 3600:
        return f"{whole // 3600}h {whole % 3600 // 60}m"
    if whole >= 60:
        return f"{whole // 60}m {whole % 60}s"
    return f"{whole}s"
