"""Fleet-wide admission: how many requests the registrar verifies at once. Pure.

Verifying a request (an EK chain, a quote, two signatures) is CPU work. When
more arrive than `limit`, the rest are refused at once with registrar-busy and
a Retry-After, which costs nothing, instead of queueing in the thread pool
until every request is slow and the fleet's retries pile up on top. The
Retry-After is spread (1x to 2x the base) so that refused gateways do not
come back in the same second.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from agent.enroll.problems import problem
from agent.errors import Problem

log = logging.getLogger(__name__)

RETRY_AFTER = 2.0  # seconds, the least a refused client is told to wait
WARN_EVERY = 60.0  # seconds between two "busy" warnings in the log


class RateLimitedWarning:
    """A warning logged at most once per `every` seconds, whatever floods it."""

    def __init__(self, logger: logging.Logger, every: float = WARN_EVERY,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._every = every
        self._monotonic = monotonic
        self._warned_at: float | None = None

    def warn(self, message: str, *args: object) -> bool:
        """Log `message` unless one was logged less than `every` ago; whether it was."""
        now = self._monotonic()
        if self._warned_at is not None and now - self._warned_at < self._every:
            return False
        self._log.warning(message, *args)
        self._warned_at = now
        return True


class InFlightLimit:
    def __init__(self, limit: int, retry_after: float = RETRY_AFTER,
                 rng: Callable[[], float] = random.random,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.in_flight = 0
        self.refused = 0  # since the last warning
        self._rng = rng
        self._warning = RateLimitedWarning(log, monotonic=monotonic)

    def enter(self) -> None:
        """Take a slot, or raise registrar-busy. Called on the event loop, so no lock."""
        if self.in_flight >= self.limit:
            self.refused += 1
            if self._warning.warn("busy: %d requests in flight (max_in_flight %d); refused %d "
                                  "with registrar-busy since the last warning",
                                  self.in_flight, self.limit, self.refused):
                self.refused = 0
            raise self.busy()
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    def busy(self) -> Problem:
        return problem("registrar-busy", f"{self.in_flight} requests are being verified, the "
                       f"limit (max_in_flight) is {self.limit}",
                       retry_after=self.retry_after * (1 + self._rng()))
