"""Keeping Python's cyclic garbage collector off the per-message path.

Under load aiocoap keeps every answer for deduplication for the CoAP exchange
lifetime (247 s): hundreds of thousands of long-lived objects at 1,000
requests/s. Every full collection walks all of them. bench/broker.py measured
the cost: a quarter of the broker's CPU, and pauses of 100 to 250 ms that made
the p99 latency. So every second the survivors are frozen (`gc.freeze`:
moved where the collector does not look). Reference counting still frees them
when aiocoap lets them go. What only the collector can free (reference cycles)
is reclaimed by one full collection of everything every `full_every` seconds;
its duration is in the status.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any


class Collector:
    name = "collector"

    def __init__(self, freeze_every: float = 1.0, full_every: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._freeze_every, self._full_every, self._clock = freeze_every, full_every, clock
        self.full_collections, self.last_full_ms, self.last_freed = 0, 0.0, 0

    def full(self) -> None:
        """Everything back in sight, and one full collection."""
        started = self._clock()
        gc.unfreeze()
        self.last_freed = gc.collect()
        self.last_full_ms = (self._clock() - started) * 1000
        self.full_collections += 1

    async def run(self) -> None:
        next_full = self._clock() + self._full_every
        try:
            while True:
                await asyncio.sleep(self._freeze_every)
                if self._clock() >= next_full:
                    self.full()
                    next_full = self._clock() + self._full_every
                gc.freeze()
        finally:
            gc.unfreeze()

    def status_section(self) -> dict[str, Any]:
        return {"frozen": gc.get_freeze_count(), "full_collections": self.full_collections,
                "last_full_ms": round(self.last_full_ms, 1), "last_freed": self.last_freed}
