"""What the listeners saw: counters per sensor and in total, refusals journaled and audited.

Counting happens in memory, constant work per message. The per-sensor
counters and last-seen times reach the registry every `flush_interval`, in one
transaction, so that no message waits for a disk write. Every refusal is
counted. Each refusal (unknown or disabled credential, failed authentication,
replay, policy denial) is also journaled and audited, at most 10 a minute per
sensor, or per source address when no sensor is known. A flood therefore
cannot fill the disk, and the counters still say how many there were.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent import events
from agent.audit import AuditLog
from agent.clock import isoformat_utc
from agent.ratelimit import KeyedBuckets
from agent.sensors.model import Sensor
from agent.sensors.store import SensorStore

log = logging.getLogger(__name__)

# Why a message was not forwarded. "auth" kinds are refused before the policy is asked.
AUTH_REFUSALS = ("unknown-credential", "disabled", "auth-failed", "replay")
_JOURNAL_BURST, _JOURNAL_INTERVAL = 10, 6.0  # per sensor or address: 10 a minute
_AUDIT_QUEUE = 1000
FLUSH_INTERVAL = 2.0


class Observer(Protocol):
    """Sees each message the gateway took and each refusal naming a sensor (the watch)."""

    def message(self, sensor: Sensor, action: str, size: int, remote: str) -> None: ...

    def refusal(self, sensor: Sensor, kind: str) -> None: ...


@dataclass
class _Delta:
    messages: int = 0
    denials: int = 0
    auth_failures: int = 0
    last_seen: float | None = None


class Traffic:
    name = "traffic"

    def __init__(self, store: SensorStore, audit: AuditLog,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 flush_interval: float = FLUSH_INTERVAL) -> None:
        self._store, self._audit, self._clock = store, audit, clock
        self._flush_interval = flush_interval
        self.totals: Counter[str] = Counter()
        self._deltas: dict[int, _Delta] = {}
        self._journal = KeyedBuckets(_JOURNAL_BURST, _JOURNAL_INTERVAL, monotonic)
        self._audit_queue: asyncio.Queue[tuple[str, dict[str, Any]]] = \
            asyncio.Queue(_AUDIT_QUEUE)
        self.flush_error: str | None = None
        self.observers: list[Observer] = []

    def _delta(self, sensor: Sensor) -> _Delta:
        delta = self._deltas.get(sensor.serial)
        if delta is None:
            delta = self._deltas[sensor.serial] = _Delta()
        return delta

    # --- what the listeners and the gateway report ---------------------------------------

    def received(self, listener: str) -> None:
        self.totals[f"received.{listener}"] += 1

    def accepted(self, sensor: Sensor) -> None:
        """An authenticated message from `sensor` (before the policy is asked)."""
        delta = self._delta(sensor)
        delta.messages += 1
        delta.last_seen = self._clock()
        self.totals["authenticated"] += 1

    def behaved(self, sensor: Sensor, action: str, size: int, remote: str) -> None:
        """An authenticated message the gateway took (the policy allowed it, or a local
        LwM2M service): for the observers (the watch), as `action` (METHOD and rule)."""
        for observer in self.observers:
            observer.message(sensor, action, size, remote)

    def forwarded(self, sensor: Sensor, upstream: str) -> None:
        self.totals["forwarded"] += 1
        self.totals[f"forwarded.{upstream}"] += 1

    def upstream_failed(self, sensor: Sensor, upstream: str, reason: str) -> None:
        self.totals["upstream_failed"] += 1
        if self._journal.take(("upstream", upstream)):
            events.emit(log, "upstream-failed", "upstream %s: a request of sensor %s failed: %s",
                        upstream, sensor.name, reason, sensor=sensor.id, upstream=upstream,
                        reason=reason)

    def malformed(self, listener: str, remote: str, reason: str) -> None:
        """A datagram that is not a message at all: dropped, counted, logged rarely."""
        self.totals["malformed"] += 1
        if self._journal.take(("malformed", listener)):
            log.info("%s listener: dropped a malformed datagram from %s: %s", listener, remote,
                     reason)

    def refused(self, kind: str, reason: str, remote: str, sensor: Sensor | None = None,
                request: str | None = None) -> None:
        """Not forwarded: an authentication refusal (AUTH_REFUSALS) or a policy denial
        ("denied")."""
        self.totals[f"refused.{kind}"] += 1
        if sensor is not None:
            for observer in self.observers:
                observer.refusal(sensor, kind)
            delta = self._delta(sensor)
            if kind == "denied":
                delta.denials += 1
            elif kind != "disabled":
                delta.auth_failures += 1
        if not self._journal.take(sensor.serial if sensor else remote):
            self.totals["refusals_not_journaled"] += 1
            return
        event = "policy-denied" if kind == "denied" else "sensor-auth-failed"
        who = f"sensor {sensor.name}" if sensor else "an unknown sender"
        events.emit(log, event, "%s from %s refused (%s): %s%s", request or "a message", who,
                    kind, reason, f" [{remote}]" if remote else "",
                    sensor=sensor.id if sensor else None, reason=reason, refusal=kind,
                    remote=remote)
        record = {"refusal": kind, "reason": reason, "remote": remote, "request": request,
                  "sensor": sensor.id if sensor else None}
        try:
            self._audit_queue.put_nowait((event, record))
        except asyncio.QueueFull:
            self.totals["audit_dropped"] += 1

    # --- the subsystem ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._flush_interval)
            await self.flush()

    async def flush(self) -> None:
        """Counters to the registry, refusals to the audit log."""
        deltas, self._deltas = self._deltas, {}
        rows = [(serial, d.messages, d.denials, d.auth_failures,
                 isoformat_utc(d.last_seen) if d.last_seen is not None else None)
                for serial, d in deltas.items()]
        if rows:
            try:
                await asyncio.to_thread(self._store.add_traffic, rows)
                self.flush_error = None
            except Exception as e:  # a full disk must not stop the listeners
                self.flush_error = str(e)
                log.error("cannot save sensor counters (kept for the next try): %s", e)
                for serial, old in deltas.items():
                    new = self._deltas.setdefault(serial, _Delta())
                    new.messages += old.messages
                    new.denials += old.denials
                    new.auth_failures += old.auth_failures
                    new.last_seen = max(new.last_seen or 0.0, old.last_seen or 0.0) or None
        records = []
        while not self._audit_queue.empty():
            records.append(self._audit_queue.get_nowait())
        if records:
            await asyncio.to_thread(self._append_all, records)

    def _append_all(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        for event, record in records:
            self._audit.append(event, **record)

    def status_section(self) -> dict[str, Any]:
        return {"totals": dict(sorted(self.totals.items())),
                "pending_sensors": len(self._deltas), "flush_error": self.flush_error}
