"""Firmware update of LwM2M sensors through the Firmware Update object (/5, LwM2M
Core E.6), run by the gateway and followed to the end.

`devidctl sensors firmware SENSOR FILE` (push: the package written block-wise
to /5/0/0) or `--uri URI` (pull: the sensor fetches it from /5/0/1) starts a
job; the broker then:

1. writes the package, or its URI;
2. waits for State (/5/0/3) Downloaded (2);
3. executes Update (/5/0/2);
4. waits, through the sensor's reboot, for Update Result (/5/0/5): 1 is
   success, 2 to 9 the failure LwM2M names;
5. reads the firmware version the sensor now reports (/3/0/3).

Each step goes through the profile's grants like any operator request
(write /5/0/0 or /5/0/1, execute /5/0/2, read /5/0/3, /5/0/5 and /3/0/3). The
outcome, with the version, is kept in lwm2m.db and shown by `sensors show`
and `sensors list --json` (`firmware_version`): the gateway can tell which of
its sensors run patched firmware. Start and outcome are audited and
journaled.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from agent import events
from agent.audit import AuditLog
from agent.broker.lwm2m import Lwm2mServer
from agent.clock import isoformat_utc
from agent.errors import Lwm2mError
from agent.sensors.model import Sensor

log = logging.getLogger(__name__)

STATES = {0: "idle", 1: "downloading", 2: "downloaded", 3: "updating"}
RESULTS = {0: "initial", 1: "success", 2: "not enough flash memory", 3: "out of RAM",
           4: "connection lost during download", 5: "integrity check failure",
           6: "unsupported package type", 7: "invalid URI", 8: "firmware update failed",
           9: "unsupported protocol"}
MAX_PACKAGE = 4 << 20  # bytes; the control socket carries it base64-encoded
POLL, DOWNLOAD_WITHIN, UPDATE_WITHIN = 1.0, 120.0, 300.0


class FirmwareUpdates:
    name = "firmware"

    def __init__(self, lwm2m: Lwm2mServer, audit: AuditLog,
                 clock: Callable[[], float] = time.time, poll: float = POLL,
                 download_within: float = DOWNLOAD_WITHIN,
                 update_within: float = UPDATE_WITHIN) -> None:
        self._lwm2m, self._audit, self._clock = lwm2m, audit, clock
        self._poll, self._download_within, self._update_within = \
            poll, download_within, update_within
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self.totals = {"started": 0, "updated": 0, "failed": 0}

    def handlers(self) -> dict[str, Any]:
        return {"lwm2m-firmware": self.start}

    async def start(self, params: dict[str, Any]) -> dict[str, Any]:
        ref, uri, encoded = params.get("sensor"), params.get("uri"), params.get("package")
        if not isinstance(ref, str) or (uri is None) == (encoded is None):
            raise Lwm2mError("firmware: a sensor, and either a package or a URI")
        if uri is not None and (not isinstance(uri, str) or not 0 < len(uri) <= 255):
            raise Lwm2mError("firmware: the URI is 1 to 255 characters")
        package = None
        if encoded is not None:
            try:
                package = base64.b64decode(str(encoded), validate=True)
            except (binascii.Error, ValueError):
                raise Lwm2mError("firmware: the package is not base64") from None
            if not 0 < len(package) <= MAX_PACKAGE:
                raise Lwm2mError(f"firmware: a package of 1 byte to {MAX_PACKAGE >> 20} MiB")
        sensor = await asyncio.to_thread(self._lwm2m.registry.store.get, ref)
        if sensor.serial in self._tasks:
            raise Lwm2mError(f"sensor {sensor.name}: a firmware update is already running",
                             "follow it with `devidctl sensors show`")
        # Every step's grant up front: a job the profile does not allow never starts.
        for operation, path in (("write", (5, 0, 0) if package is not None else (5, 0, 1)),
                                ("read", (5, 0, 3)), ("execute", (5, 0, 2)),
                                ("read", (5, 0, 5)), ("read", (3, 0, 3))):
            self._lwm2m.check_grant(sensor, operation, path)
        if self._lwm2m.table.of(sensor.serial) is None:
            raise Lwm2mError(f"sensor {sensor.name} is not registered (LwM2M)")
        job: dict[str, Any] = {"state": "starting", "started_at": isoformat_utc(self._clock()),
                               "source": uri if uri is not None else "package"}
        if package is not None:
            job["package_sha256"] = hashlib.sha256(package).hexdigest()
            job["package_bytes"] = len(package)
        self._lwm2m.firmware_started(sensor, job)
        self.totals["started"] += 1
        await asyncio.to_thread(self._audit.append, "lwm2m-firmware", sensor=sensor.id,
                                name=sensor.name, outcome="started",
                                **{k: v for k, v in job.items() if k != "state"})
        task = asyncio.create_task(self._run(sensor, job, package, uri))
        self._tasks[sensor.serial] = task
        task.add_done_callback(lambda _t: self._tasks.pop(sensor.serial, None))
        return {"sensor": sensor.name, **job}  # what the sensor runs now in "version"

    async def _run(self, sensor: Sensor, job: dict[str, Any], package: bytes | None,
                   uri: str | None) -> None:
        try:
            job["state"] = "writing"
            if package is not None:
                self._check(await self._lwm2m.ask(sensor, "write", "/5/0/0", package))
            else:
                self._check(await self._lwm2m.ask(sensor, "write", "/5/0/1", uri))
            job["state"] = "downloading"
            await self._until(sensor, "/5/0/3", lambda state: state == 2,
                              self._download_within, "State Downloaded (2)")
            job["state"] = "updating"
            self._check(await self._lwm2m.ask(sensor, "execute", "/5/0/2"))
            result = await self._until(sensor, "/5/0/5", lambda result: result != 0,
                                       self._update_within, "an Update Result")
            if result != 1:
                raise Lwm2mError(f"the sensor's Update Result is {result} "
                                 f"({RESULTS.get(result, 'unknown')})")
            job["version"] = await self._value(sensor, "/3/0/3")
        except Exception as e:  # reported in the job, the journal and the audit log
            step = job["state"]
            job.update(state="failed", failed_while=step,
                       reason=getattr(e, "message", None) or repr(e))
            self.totals["failed"] += 1
            events.emit(log, "lwm2m-firmware-failed", "sensor %s: firmware update failed "
                        "while %s: %s", sensor.name, step, job["reason"], sensor=sensor.id,
                        reason=job["reason"])
        else:
            job["state"] = "updated"
            self.totals["updated"] += 1
            events.emit(log, "lwm2m-firmware-updated", "sensor %s runs firmware %s",
                        sensor.name, job["version"], sensor=sensor.id,
                        version=str(job["version"]))
        job["finished_at"] = isoformat_utc(self._clock())
        self._lwm2m.firmware_done(sensor, job)
        await asyncio.to_thread(self._audit.append, "lwm2m-firmware", sensor=sensor.id,
                                name=sensor.name, outcome=job["state"],
                                version=job.get("version"), reason=job.get("reason"))

    @staticmethod
    def _check(doc: dict[str, Any]) -> None:
        if not doc["code"].startswith("2."):
            raise Lwm2mError(f"{doc['operation']} {doc['path']}: the sensor answered "
                             f"{doc['code']} {doc.get('error', '')}".rstrip())

    async def _value(self, sensor: Sensor, path: str) -> Any:
        doc = await self._lwm2m.ask(sensor, "read", path)
        self._check(doc)
        values = doc.get("values") or []
        if len(values) != 1:
            raise Lwm2mError(f"read {path}: expected one value, got {len(values)}")
        return values[0]["value"]

    async def _until(self, sensor: Sensor, path: str, done: Callable[[int], bool],
                     within: float, what: str) -> int:
        """Read `path` every poll interval until `done(value)`; the sensor being out of
        reach meanwhile (it reboots to update) is expected."""
        deadline = time.monotonic() + within
        last: object = None
        while time.monotonic() < deadline:
            try:
                value = await self._value(sensor, path)
                last = value
                number = int(value)
                if done(number):
                    return number
            except (Lwm2mError, ValueError, TypeError):
                pass  # rebooting, or not answering yet
            await asyncio.sleep(self._poll)
        raise Lwm2mError(f"no {what} at {path} within {within:g} s (last: {last!r})")

    def status_section(self) -> dict[str, Any]:
        return {**self.totals, "running": len(self._tasks)}
