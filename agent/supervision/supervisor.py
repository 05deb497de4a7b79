"""What systemd learns about the daemon: readiness, a one-line status, watchdog pings.

Runs as a task on the daemon's event loop, so a blocked loop stops the pings
and systemd restarts the agent (WatchdogSec=). Each tick it:

- sends READY=1 once `ready()` is true (TPM reachable, identity loaded);
  until then EXTEND_TIMEOUT_USEC=, so a daemon whose loop is alive but whose
  TPM is missing waits for the TPM (saying why in STATUS=) instead of being
  killed and restarted in a loop, while a hung start-up still times out;
- sends STATUS= whenever the headline changes;
- pings WATCHDOG=1 every half WATCHDOG_USEC, unless a TPM command has been
  running longer than the hang limit: a wedged TPM driver is also a reason
  for a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from agent import events
from agent.aio import first_of
from agent.supervision.notify import Notifier, monotonic_usec, one_line

log = logging.getLogger(__name__)

MAX_TICK = 1.0  # how stale STATUS= may get
START_TICK = 0.1  # until READY=1: readiness is noticed within this
# Before READY=1: how long systemd waits for the next sign of life.
START_EXTENSION = 30.0


class Supervisor:
    def __init__(self, notifier: Notifier, watchdog_interval: float | None,
                 ready: Callable[[], bool], headline: Callable[[], str],
                 hung: Callable[[], str | None],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._notifier = notifier
        self._interval = watchdog_interval
        self._ready = ready
        self._headline = headline
        self._hung = hung
        self._monotonic = monotonic
        self.ready_sent = False
        self.status = ""
        self._next_ping = monotonic()
        self._hung_reported = False
        self._wake = asyncio.Event()

    @property
    def period(self) -> float:
        tick = MAX_TICK if self.ready_sent else START_TICK
        return min(tick, self._interval) if self._interval else tick

    def tick(self) -> dict[str, str]:
        """Work out and send this tick's message; returns it (for tests and logs)."""
        fields: dict[str, str] = {}
        if not self.ready_sent and self._ready():
            fields["READY"] = "1"
            self.ready_sent = True
        status = one_line(self._headline())
        if status != self.status or "READY" in fields:
            fields["STATUS"] = self.status = status
        if not self.ready_sent:
            extension = max(START_EXTENSION, 2 * (self._interval or 0))
            fields["EXTEND_TIMEOUT_USEC"] = str(int(extension * 1_000_000))
        now = self._monotonic()
        if self._interval is not None and now >= self._next_ping:
            self._next_ping = now + self._interval
            hung = self._hung()
            if hung is None:
                fields["WATCHDOG"] = "1"
                self._hung_reported = False
            elif not self._hung_reported:
                self._hung_reported = True
                events.emit(log, "tpm-hung", "%s; withholding watchdog pings so that systemd "
                            "restarts the agent", hung)
        self._notifier.send(fields)
        return fields

    def wake(self) -> None:
        """Re-evaluate now (state changed) rather than at the next tick."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.tick()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first_of(stop, self._wake), self.period)

    # --- reload and stop: sent at once, outside the tick ---------------------------

    def reloading(self) -> None:
        self._notifier.send({"RELOADING": "1", "MONOTONIC_USEC": monotonic_usec(),
                             "STATUS": "reloading the configuration"})
        self.status = "reloading the configuration"

    def reloaded(self) -> None:
        self.status = one_line(self._headline())
        fields = {"STATUS": self.status}
        if self.ready_sent:
            fields["READY"] = "1"
        self._notifier.send(fields)

    def stopping(self) -> None:
        self._notifier.send({"STOPPING": "1", "STATUS": "stopping"})

