"""The baselines of all sensors, and findings out of what the broker sees. Pure.

The broker feeds it each authenticated message (`message`), each refusal
naming a sensor (`refused`) and, every few seconds, the time (`tick`), which
finds the silent sensors. Each finding is reported once per kind and sensor
within `COOLDOWN` seconds: the first one is what acts (alert or quarantine);
repeats would only be noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.policy.model import WatchSection
from agent.watch import findings as kinds
from agent.watch.baseline import Baseline
from agent.watch.findings import Finding

COOLDOWN = 600.0
MIN_SILENCE = 60.0  # a sensor is never silent after less than this


@dataclass(frozen=True)
class Deprovision:
    serial: int
    silent_for: float  # seconds


class Detector:
    def __init__(self, settings: Callable[[str], WatchSection]) -> None:
        self._settings = settings  # a profile's watch settings, by profile name
        self.baselines: dict[int, Baseline] = {}
        self._reported: dict[int, dict[str, float]] = {}  # serial -> kind -> when
        self.silent: dict[int, float] = {}  # serial -> when it was found silent

    def __len__(self) -> int:
        return len(self.baselines)

    def message(self, serial: int, profile: str, now: float, size: int, action: str,
                address: str) -> Finding | None:
        baseline = self.baselines.get(serial)
        if baseline is None:
            baseline = self.baselines[serial] = Baseline(now, profile)
        elif baseline.profile != profile:
            baseline.profile = profile
        if self.silent:
            self.silent.pop(serial, None)
        found = baseline.message(now, size, action, address, self._settings(profile))
        return self._once(serial, found)

    def refused(self, serial: int, profile: str, now: float, auth: bool) -> Finding | None:
        baseline = self.baselines.get(serial)
        if baseline is None:
            baseline = self.baselines[serial] = Baseline(now, profile)
        baseline.profile = profile
        return self._once(serial, baseline.refused(now, auth, self._settings(profile)))

    def _once(self, serial: int, found: Finding | None) -> Finding | None:
        if found is None:
            return None
        reported = self._reported.setdefault(serial, {})
        last = reported.get(found.kind)
        if last is not None and found.at - last < COOLDOWN:
            return None
        reported[found.kind] = found.at
        return found

    def tick(self, now: float) -> tuple[list[tuple[int, Finding]], list[Deprovision]]:
        """The sensors that fell silent since the last tick (past `silent_after` learned
        intervals, or `max_silence`), and those silent past `deprovision_after` more."""
        newly: list[tuple[int, Finding]] = []
        retire: list[Deprovision] = []
        for serial, baseline in self.baselines.items():
            settings = self._settings(baseline.profile)
            since = self.silent.get(serial)
            if since is not None:
                if settings.deprovision_after and now - since >= settings.deprovision_after:
                    retire.append(Deprovision(serial, now - baseline.last))
                continue
            limit = self._silence_limit(baseline, settings, now)
            # Silence counts in the hours it was active in while learning: a sensor that
            # sleeps at night is not silent at night, nor at dawn before its first message.
            quiet = now - max(baseline.last, baseline.active_since(now))
            if limit is not None and quiet > limit:
                self.silent[serial] = now
                newly.append((serial, Finding(
                    kinds.SILENT, quiet / limit, f"no message for {quiet:.0f} s",
                    f"one every {baseline.interval:.3g} s (silent after {limit:.0f} s)",
                    now)))
        for item in retire:
            self.forget(item.serial)
        return newly, retire

    @staticmethod
    def _silence_limit(baseline: Baseline, settings: WatchSection, now: float
                       ) -> float | None:
        limits = []
        if baseline.learned(settings, now) and baseline.n >= 2:
            limits.append(max(MIN_SILENCE, settings.silent_after * baseline.interval))
        if settings.max_silence:
            limits.append(settings.max_silence)
        return min(limits) if limits else None

    def forget(self, serial: int) -> None:
        """The sensor is gone (removed, revoked) or starts over (released, rekeyed)."""
        self.baselines.pop(serial, None)
        self._reported.pop(serial, None)
        self.silent.pop(serial, None)
