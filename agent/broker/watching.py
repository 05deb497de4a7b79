"""The broker's watch over its sensors: the edge of agent/watch/.

Traffic hands it every authenticated message the policy let through (or a
local LwM2M service took) and every refusal naming a sensor. The detector
(pure) learns each sensor's baseline and makes findings; this part acts on
them, as the sensor's profile says (`[profiles.NAME.watch] on_anomaly`):

- "alert": journaled (`sensor-anomaly`, with the kind, score, evidence and
  baseline), audited, counted, and shown by `devidctl sensors show`;
- "quarantine": all that, and the sensor is quarantined through the registry
  with the finding as the reason, which the listeners follow at once (its next
  message gets 4.01). `devidctl sensors release SENSOR --reason ...` lifts it,
  audited; the sensor's baseline then starts over.

Every few seconds the task lets time pass: a sensor silent past its limit is
journaled (`sensor-silent`), and one silent past `deprovision_after` more is
deprovisioned: its credential is revoked (audited, `sensor-deprovisioned`).
Baselines live in memory: after a restart each sensor learns again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from agent import events
from agent.audit import AuditLog
from agent.broker.policy import PolicyHolder
from agent.broker.registry import SensorRegistry
from agent.broker.traffic import AUTH_REFUSALS
from agent.errors import DevidError
from agent.policy.model import WatchSection
from agent.sensors.model import Sensor
from agent.watch.detector import Deprovision, Detector
from agent.watch.findings import Finding

log = logging.getLogger(__name__)
TICK = 5.0
KEPT = 5  # findings kept per sensor for `sensors show`
DEFAULT = WatchSection()


class Watching:
    name = "watch"

    def __init__(self, registry: SensorRegistry, policy: PolicyHolder, audit: AuditLog,
                 clock: Callable[[], float] = time.time) -> None:
        self._registry, self._policy, self._audit, self._clock = registry, policy, audit, clock
        self.detector = Detector(self._settings)
        self.findings: dict[int, deque[dict[str, Any]]] = {}
        self.totals: Counter[str] = Counter()
        self._acting: set[asyncio.Task[None]] = set()
        self._held: set[int] = set()  # quarantined sensors, to notice their release

    def _settings(self, profile: str) -> WatchSection:
        found = self._policy.policy.profiles.get(profile)
        return found.watch if found is not None else DEFAULT

    # --- what Traffic hands over ---------------------------------------------------------

    def message(self, sensor: Sensor, action: str, size: int, remote: str) -> None:
        found = self.detector.message(sensor.serial, sensor.profile, self._clock(), size,
                                      action, remote)
        if found is not None:
            self._found(sensor, found)

    def refusal(self, sensor: Sensor, kind: str) -> None:
        if kind == "disabled" or (kind != "denied" and kind not in AUTH_REFUSALS):
            return  # a quarantined sensor's messages: already acted on
        found = self.detector.refused(sensor.serial, sensor.profile, self._clock(),
                                      kind != "denied")
        if found is not None:
            self._found(sensor, found)

    def _found(self, sensor: Sensor, finding: Finding) -> None:
        settings = self._settings(sensor.profile)
        self.totals[f"findings.{finding.kind}"] += 1
        kept = self.findings.setdefault(sensor.serial, deque(maxlen=KEPT))
        kept.append(finding.to_dict())
        action = settings.on_anomaly if sensor.status == "active" else "alert"
        events.emit(log, "sensor-anomaly", "sensor %s: %s (%s)", sensor.name,
                    finding.summary(), "quarantining it" if action == "quarantine" else
                    "alert only", sensor=sensor.id, finding=finding.kind,
                    score=f"{finding.score:.1f}", evidence=finding.evidence,
                    baseline=finding.baseline, action=action)
        self._later(self._act(sensor, finding, action))

    def _later(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._acting.add(task)
        task.add_done_callback(self._acting.discard)

    async def _act(self, sensor: Sensor, finding: Finding, action: str) -> None:
        await asyncio.to_thread(self._audit.append, "sensor-anomaly", sensor=sensor.id,
                                name=sensor.name, action=action, **finding.to_dict())
        if action == "quarantine":
            try:
                await self._registry.change({"sensor": sensor.id, "change": "quarantine",
                                             "reason": f"watch: {finding.summary()}"})
                self.totals["quarantined"] += 1
            except DevidError as e:  # removed meanwhile
                log.warning("cannot quarantine sensor %s: %s", sensor.name, e)

    # --- time ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK)
            await self.tick()
        if self._acting:
            await asyncio.wait(list(self._acting))

    async def tick(self) -> None:
        newly, retire = self.detector.tick(self._clock())
        if not newly and not retire:
            return
        serials = [serial for serial, _ in newly] + [r.serial for r in retire]
        current = await asyncio.to_thread(self._registry.store.current, serials)
        for serial, finding in newly:
            found = current.get(serial)
            if found is None or found[0].status == "revoked":
                self.detector.forget(serial)
                continue
            sensor = found[0]
            self.totals["silent"] += 1
            self.findings.setdefault(serial, deque(maxlen=KEPT)).append(finding.to_dict())
            events.emit(log, "sensor-silent", "sensor %s is silent: %s; expected %s",
                        sensor.name, finding.evidence, finding.baseline, sensor=sensor.id,
                        evidence=finding.evidence, baseline=finding.baseline)
        for item in retire:
            found = current.get(item.serial)
            if found is not None and found[0].status == "active":
                await self._deprovision(found[0], item)

    async def _deprovision(self, sensor: Sensor, item: Deprovision) -> None:
        reason = f"watch: silent for {item.silent_for:.0f} s"
        await self._registry.change({"sensor": sensor.id, "change": "revoke",
                                     "reason": reason})
        self.totals["deprovisioned"] += 1
        events.emit(log, "sensor-deprovisioned", "sensor %s deprovisioned: %s; onboard it "
                    "again to use it", sensor.name, reason, sensor=sensor.id, reason=reason)

    # --- the registry --------------------------------------------------------------------

    def refresh(self) -> None:
        """After a registry change: removed and revoked sensors are forgotten; a released
        one starts learning again (its baseline may have learned from the attack)."""
        serials = list(self.detector.baselines)
        if not serials:
            return
        now = self._registry.store.current(serials)
        for serial in serials:
            found = now.get(serial)
            status = found[0].status if found is not None else None
            if status is None or status == "revoked":
                self.detector.forget(serial)
                self.findings.pop(serial, None)
                self._held.discard(serial)
            elif status == "quarantined":
                self._held.add(serial)
            elif serial in self._held:  # released
                self._held.discard(serial)
                self.detector.forget(serial)

    # --- what others see -----------------------------------------------------------------

    def details_of(self, sensor: Sensor) -> dict[str, Any] | None:
        baseline = self.detector.baselines.get(sensor.serial)
        kept = self.findings.get(sensor.serial)
        if baseline is None and not kept:
            return None
        doc: dict[str, Any] = {"findings": list(kept or [])}
        if baseline is not None:
            settings = self._settings(sensor.profile)
            doc.update(messages=baseline.n, learned=baseline.learned(settings, self._clock()),
                       interval_s=round(baseline.interval, 3),
                       payload_bytes=round(baseline.s_mean, 1))
        return doc

    def status_section(self) -> dict[str, Any]:
        return {"watched": len(self.detector), "silent": len(self.detector.silent),
                "totals": dict(sorted(self.totals.items()))}
