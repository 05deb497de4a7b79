"""The sensor registry as the broker serves it: control methods, audit, journal.

Every change is audited in the broker's hash-chained log and journaled; a
new credential leaves the broker once, in the answer to the request that
minted it, and is never logged. `changed` is set after every change so that
listeners can pick it up at once (no restart).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agent import events
from agent.audit import AuditLog
from agent.clock import isoformat_utc
from agent.daemon.subsystem import Handler
from agent.errors import SensorError
from agent.sensors.credentials import Credential
from agent.sensors.importing import parse_import
from agent.sensors.model import Sensor
from agent.sensors.store import NewSensor, SensorStore

log = logging.getLogger(__name__)
MAX_BATCH = 10_000
CHANGES = {"quarantine": "quarantined", "release": "active", "revoke": "revoked"}


def _text(params: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = params.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise SensorError(f"{key}: expected a non-empty string")
    return value


def _issued(sensor: Sensor, credential: Credential) -> dict[str, Any]:
    return {**sensor.to_dict(), "credential": credential.to_dict()}


class SensorRegistry:
    name = "sensors"

    def __init__(self, store: SensorStore, audit: AuditLog,
                 before_read: Callable[[], Awaitable[None]] | None = None) -> None:
        self.store, self._audit = store, audit
        self.changed = asyncio.Event()
        # Counters live in memory between flushes; reads flush them first, so that
        # `sensors show` right after a message counts it.
        self._before_read = before_read
        # Other parts' view of a sensor for `sensors show` (LwM2M: its registration).
        self.details: dict[str, Callable[[Sensor], Any]] = {}
        # ... and for `sensors list` (kept short: 10,000 lines): its firmware version.
        self.summaries: dict[str, Callable[[Sensor], Any]] = {}

    def _now(self) -> str:
        return isoformat_utc(time.time())

    async def _record(self, event: str, sensor: Sensor, change: str, **fields: Any) -> None:
        await asyncio.to_thread(self._audit.append, event, sensor=sensor.id, name=sensor.name,
                                change=change, **fields)
        self.changed.set()

    def status_section(self) -> dict[str, Any]:
        return {"registry": str(self.store.path), "registry_id": self.store.registry_id,
                "counts": self.store.counts()}

    def handlers(self) -> dict[str, Handler]:
        return {"sensors-add": self.add, "sensors-import": self.import_file,
                "sensors-list": self.list, "sensors-show": self.show,
                "sensors-change": self.change, "sensors-rekey": self.rekey,
                "sensors-remove": self.remove}

    async def add(self, params: dict[str, Any]) -> dict[str, Any]:
        profile, transport = _text(params, "profile"), _text(params, "transport")
        attributes = params.get("attributes", {})
        count = params.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= MAX_BATCH:
            raise SensorError(f"count: expected 1 to {MAX_BATCH}, got {count!r}")
        if not isinstance(attributes, dict):
            raise SensorError("attributes: expected an object")
        if count == 1:
            names = [_text(params, "name")]
        else:
            prefix = _text(params, "prefix")
            names = [f"{prefix}{i:0{len(str(count))}d}" for i in range(1, count + 1)]
        new = [NewSensor(str(n), str(profile), str(transport), attributes) for n in names]
        added = await asyncio.to_thread(self.store.add, new, self._now())
        for sensor, _ in added[:20]:
            events.emit(log, "sensor-added", "sensor %s (%s) onboarded: profile %s, %s",
                        sensor.name, sensor.id, sensor.profile, sensor.transport,
                        sensor=sensor.id)
        if len(added) > 20:
            events.emit(log, "sensor-added", "%d more sensors onboarded in the same batch",
                        len(added) - 20, sensor=added[-1][0].id)
        await asyncio.to_thread(self._audit.append, "sensors-added", count=len(added),
                                first=added[0][0].id, last=added[-1][0].id,
                                profile=profile, transport=transport)
        self.changed.set()
        return {"sensors": [_issued(s, c) for s, c in added]}

    async def import_file(self, params: dict[str, Any]) -> dict[str, Any]:
        text, filename = _text(params, "text"), _text(params, "filename")
        sensors = parse_import(str(text), str(filename))
        added = await asyncio.to_thread(self.store.import_sensors, sensors, self._now())
        await asyncio.to_thread(self._audit.append, "sensors-imported", count=len(added),
                                file=filename)
        events.emit(log, "sensor-added", "%d sensor(s) imported from %s with factory keys",
                    len(added), filename, sensor=added[-1].id)
        self.changed.set()
        return {"sensors": [s.to_dict() for s in added]}

    async def _fresh(self) -> None:
        if self._before_read is not None:
            await self._before_read()

    async def list(self, _params: dict[str, Any]) -> dict[str, Any]:
        await self._fresh()
        sensors = await asyncio.to_thread(self.store.list)
        listed = []
        for sensor in sensors:
            doc = sensor.to_dict()
            for key, summarize in self.summaries.items():
                value = summarize(sensor)
                if value is not None:
                    doc[key] = value
            listed.append(doc)
        return {"sensors": listed, "counts": self.store.counts()}

    async def show(self, params: dict[str, Any]) -> dict[str, Any]:
        await self._fresh()
        sensor = await asyncio.to_thread(self.store.get, str(_text(params, "sensor")))
        doc = sensor.to_dict()
        for key, describe in self.details.items():
            value = describe(sensor)
            if value is not None:
                doc[key] = value
        return doc

    async def change(self, params: dict[str, Any]) -> dict[str, Any]:
        ref, how = str(_text(params, "sensor")), str(_text(params, "change"))
        reason = _text(params, "reason", required=False)
        if how not in CHANGES:
            raise SensorError(f"change: expected one of {', '.join(CHANGES)}, got {how!r}")
        sensor = await asyncio.to_thread(self.store.set_status, ref, CHANGES[how], reason,
                                         self._now())
        events.emit(log, "sensor-changed", "sensor %s: %s%s", sensor.name, how,
                    f" ({reason})" if reason else "", sensor=sensor.id, change=how)
        await self._record("sensor-changed", sensor, how, reason=reason)
        return sensor.to_dict()

    async def rekey(self, params: dict[str, Any]) -> dict[str, Any]:
        sensor, credential = await asyncio.to_thread(self.store.rekey,
                                                     str(_text(params, "sensor")), self._now())
        events.emit(log, "sensor-changed", "sensor %s: rekeyed; the old key is refused from "
                    "now on", sensor.name, sensor=sensor.id, change="rekey")
        await self._record("sensor-changed", sensor, "rekey")
        return _issued(sensor, credential)

    async def remove(self, params: dict[str, Any]) -> dict[str, Any]:
        sensor = await asyncio.to_thread(self.store.remove, str(_text(params, "sensor")))
        events.emit(log, "sensor-changed", "sensor %s (%s): removed; its ID is never reused",
                    sensor.name, sensor.id, sensor=sensor.id, change="remove")
        await self._record("sensor-changed", sensor, "remove")
        return sensor.to_dict()
