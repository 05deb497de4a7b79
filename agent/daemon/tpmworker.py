"""Confines all TPM work to one thread.

ESAPI contexts are not thread-safe and a TPM executes one command at a time,
so every custody call from the event loop goes through this single worker;
the loop itself never blocks on the TPM. The worker remembers when the call
in progress began, so the supervisor can tell a slow TPM from a hung one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from agent import faults

T = TypeVar("T")


class TpmWorker:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpm")
        self._monotonic = monotonic
        self._busy_since: float | None = None
        self._busy_with = ""

    def _timed(self, fn: Callable[..., T], *args: object) -> T:
        self._busy_since, self._busy_with = self._monotonic(), getattr(fn, "__name__", "?")
        try:
            faults.point(f"tpm.{self._busy_with}")  # tests: a hung TPM command
            return fn(*args)
        finally:
            self._busy_since = None

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed,
                                                                fn, *args)

    def busy(self) -> tuple[str, float] | None:
        """(operation, seconds) of the call in progress, or None when idle."""
        since = self._busy_since
        if since is None:
            return None
        return self._busy_with, self._monotonic() - since

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
