"""The connection guard's decisions and the rate-limited warning, fed a fake clock."""

from __future__ import annotations

import logging

from agent.registrar.admission import RateLimitedWarning
from agent.registrar.edge import BURST, ConnectionGuard


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_over_the_cap_the_oldest_connection_without_a_request_is_evicted():
    guard = ConnectionGuard(max_connections=3, request_timeout=5.0, monotonic=Clock())
    for key in (1, 2, 3):
        assert guard.opened(key) is None
    guard.delivered(1)  # being served: not evictable
    assert guard.opened(4) == 2  # the oldest still owing a request
    guard.closed(2)
    guard.waiting(1)  # its response went out: owes the next request, newest in line
    assert guard.opened(5) == 3
    guard.closed(3)
    assert guard.opened(6) == 4
    assert guard.evicted == 3 and guard.open == 4  # 6 made, 2 closed, 4 about to be


def test_when_everyone_is_being_served_nobody_is_evicted():
    guard = ConnectionGuard(max_connections=1, request_timeout=5.0, monotonic=Clock())
    assert guard.opened(1) is None
    guard.delivered(1)
    assert guard.opened(2) is None  # 1 is busy and 2 is the newcomer itself


def test_a_drained_burst_is_reported_once():
    guard = ConnectionGuard(max_connections=1000, request_timeout=5.0, monotonic=Clock())
    for key in range(BURST):
        guard.opened(key)
    drained = [guard.closed(key) for key in range(BURST)]
    assert drained.count(True) == 1
    for key in range(3):  # a few connections later: no burst, nothing to hand back
        guard.opened(key)
    assert not any(guard.closed(key) for key in range(3))


def test_warnings_are_rate_limited(caplog):
    clock = Clock()
    warning = RateLimitedWarning(logging.getLogger("test.edge"), every=60.0, monotonic=clock)
    with caplog.at_level(logging.WARNING, logger="test.edge"):
        assert warning.warn("busy %d", 1)
        assert not warning.warn("busy %d", 2)
        clock.now = 61.0
        assert warning.warn("busy %d", 3)
    assert [r.getMessage() for r in caplog.records] == ["busy 1", "busy 3"]
