"""A token bucket: the identity API's `sign` limit per consumer, the policy's rates. Pure.

A real TPM signs in 25-190 ms and serves the agent's own renewals too: a
consumer may sign `burst` times at once, then once per `interval`.
"""

from __future__ import annotations

from collections.abc import Callable


class TokenBucket:
    def __init__(self, burst: int, interval: float, monotonic: Callable[[], float]) -> None:
        self.burst, self.interval = burst, interval
        self._monotonic = monotonic
        self._tokens = float(burst)
        self._at = monotonic()

    def _refill(self) -> None:
        now = self._monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) / self.interval)
        self._at = now

    def take(self) -> float | None:
        """None if a token was taken; else the seconds until one is available."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return (1.0 - self._tokens) * self.interval

    def reshape(self, burst: int, interval: float) -> None:
        """Apply a reloaded limit without handing out a fresh burst."""
        self._refill()
        self.burst, self.interval = burst, interval
        self._tokens = min(self._tokens, float(burst))
