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


class KeyedBuckets:
    """A token bucket per key (a uid, a sensor, an address), for "journal at most N a
    minute per X". At most `max_keys` are remembered; past that the oldest is forgotten,
    so a flood of new keys costs bounded memory."""

    def __init__(self, burst: int, interval: float, monotonic: Callable[[], float],
                 max_keys: int = 4096) -> None:
        self.burst, self.interval, self.max_keys = burst, interval, max_keys
        self._monotonic = monotonic
        self._buckets: dict[object, TokenBucket] = {}

    def take(self, key: object) -> bool:
        """True if `key` still has room (and a token was taken)."""
        return self.wait(key) is None

    def wait(self, key: object) -> float | None:
        """None if `key` had room (a token was taken); else the seconds until it has."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[key] = TokenBucket(self.burst, self.interval,
                                                      self._monotonic)
        return bucket.take()
