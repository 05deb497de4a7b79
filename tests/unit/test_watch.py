"""The watch core against a simulated fleet (a controllable clock, no network): 1,000
sensors with realistic jitter over 7 days give at most 0.1 % false-positive sensor-days,
and each kind of injected anomaly is found within 3 expected intervals."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from agent.policy.model import WatchSection
from agent.watch import findings as kinds
from agent.watch.baseline import Baseline
from agent.watch.detector import Detector

DAY = 86400.0
START = 1_700_000_000.0 - 1_700_000_000.0 % DAY  # a midnight, UTC


@dataclass
class SimSensor:
    """A sensor's habits: a period, multiplicative jitter, loss, a payload size, the
    paths it uses, and, for some, daytime hours only."""

    serial: int
    period: float
    jitter: float
    loss: float
    sizes: tuple[int, ...]
    actions: tuple[str, ...]
    daytime: bool
    address: str
    rng: random.Random = field(repr=False)

    def next_after(self, t: float) -> float:
        t += self.period * math.exp(self.rng.gauss(0.0, self.jitter))
        while self.daytime and not 6 <= t // 3600 % 24 < 22:
            t += 3600 - t % 3600  # asleep: wakes at 06:00
            t += self.rng.uniform(0, self.period)
        return t


def fleet(n: int, seed: int) -> list[SimSensor]:
    rng = random.Random(seed)
    sensors = []
    for serial in range(1, n + 1):
        # Every 2 minutes to half an hour, most every 5 to 15 (environmental sensors).
        period = rng.choice([120.0, 300.0, 300.0, 600.0, 600.0, 900.0, 900.0, 1800.0])
        sensors.append(SimSensor(
            serial, period, rng.choice([0.01, 0.03, 0.05, 0.1, 0.15]),
            rng.choice([0.0, 0.005, 0.01, 0.02]),
            rng.choice([(11,), (11, 13), (30, 31, 32), (120, 124, 128)]),
            ("POST telemetry",) if rng.random() < 0.7 else ("POST telemetry", "GET config"),
            rng.random() < 0.1, f"[fd00::{serial:x}]:5683", random.Random(rng.random())))
    return sensors


def run(detector: Detector, sensors: list[SimSensor], days: float,
        until: float | None = None) -> Iterator[tuple[float, int, object]]:
    """Feeds the detector the fleet's messages in time order, and a tick every 10 simulated
    minutes; yields (time, serial, finding) for each finding."""
    end = until if until is not None else START + days * DAY
    queue = [(s.next_after(START), s.serial) for s in sensors]
    heapq.heapify(queue)
    by_serial = {s.serial: s for s in sensors}
    next_tick = START + 600
    while queue and queue[0][0] < end:
        t, serial = heapq.heappop(queue)
        while next_tick <= t:
            newly, _ = detector.tick(next_tick)
            for found_serial, finding in newly:
                yield next_tick, found_serial, finding
            next_tick += 600
        sensor = by_serial[serial]
        if sensor.rng.random() >= sensor.loss:
            size = sensor.rng.choice(sensor.sizes)
            action = sensor.actions[0] if sensor.rng.random() < 0.9 else sensor.actions[-1]
            found = detector.message(serial, "p", t, size, action, sensor.address)
            if found is not None:
                yield t, serial, found
        heapq.heappush(queue, (sensor.next_after(t), serial))


SETTINGS = WatchSection()  # the defaults: learning a day, alert


def test_a_thousand_sensors_over_a_week_give_few_false_findings() -> None:
    detector = Detector(lambda _: SETTINGS)
    sensors = fleet(1000, seed=7)
    flagged: set[tuple[int, int]] = set()
    seen: list[tuple[int, str]] = []
    for t, serial, finding in run(detector, sensors, days=7):
        day = int((t - START) // DAY)
        if day >= 1:  # after the learning day
            flagged.add((serial, day))
            seen.append((serial, finding.summary()))  # type: ignore[attr-defined]
    sensor_days = 1000 * 6
    assert len(flagged) <= 0.001 * sensor_days, seen[:20]
    assert len(detector) == 1000


def _learned(sensor: SimSensor, days: float = 1.5) -> tuple[Detector, float]:
    detector = Detector(lambda _: SETTINGS)
    last = START
    for t, _, finding in run(detector, [sensor], days=days):
        raise AssertionError(f"a finding while healthy at {t}: {finding}")
    baseline = detector.baselines[sensor.serial]
    last = baseline.last
    return detector, last


def _sensor(period: float = 300.0, jitter: float = 0.05, daytime: bool = False,
            seed: int = 1) -> SimSensor:
    return SimSensor(1, period, jitter, 0.0, (11, 13), ("POST telemetry",), daytime,
                     "[fd00::1]:5683", random.Random(seed))


def _first(detector: Detector, events: Iterator[tuple[float, object]], kind: str,
           start: float, period: float) -> float:
    """Feeds (time, message-or-refusal) events; the delay to the first finding of `kind`,
    in expected intervals."""
    for t, event in events:
        if event == "auth" or event == "denied":
            found = detector.refused(1, "p", t, event == "auth")
        else:
            size, action, address = event  # type: ignore[misc]
            found = detector.message(1, "p", t, size, action, address)
        if found is not None:
            assert found.kind == kind, found
            return (t - start) / period
    raise AssertionError(f"no {kind} finding")


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", [kinds.INTERVAL, kinds.BURST, kinds.SIZE, kinds.NEW_PATH,
                                  kinds.HOURS, kinds.AUTH_FAILURES, kinds.DENIALS,
                                  kinds.TWO_ADDRESSES])
def test_each_injected_anomaly_is_found_within_three_expected_intervals(
        kind: str, seed: int) -> None:
    period = 300.0
    sensor = _sensor(period, daytime=kind == kinds.HOURS, seed=seed)
    detector, last = _learned(sensor)
    rng = random.Random(seed)
    start = last
    if kind == kinds.HOURS:  # the night after: a message at 02:00
        start = last - last % DAY + DAY + 2 * 3600
    normal = (11, "POST telemetry", "[fd00::1]:5683")

    def events() -> Iterator[tuple[float, object]]:
        t = start
        for i in range(200):
            if kind == kinds.INTERVAL:  # a new cadence: every 60 to 150 s
                t += rng.uniform(0.2, 0.5) * period
                yield t, normal
            elif kind == kinds.BURST:
                t += rng.uniform(0.5, 2.0)
                yield t, normal
            elif kind == kinds.SIZE:
                t += period * math.exp(rng.gauss(0, 0.05))
                yield t, (rng.choice([48, 52, 60]), "POST telemetry", normal[2])
            elif kind == kinds.NEW_PATH:
                t += period * math.exp(rng.gauss(0, 0.05))
                yield t, (11, "PUT firmware" if i == 1 else "POST telemetry", normal[2])
            elif kind == kinds.HOURS:
                t += period * math.exp(rng.gauss(0, 0.05))
                yield t, normal
            elif kind == kinds.AUTH_FAILURES or kind == kinds.DENIALS:
                t += rng.uniform(1, 10)
                yield t, "auth" if kind == kinds.AUTH_FAILURES else "denied"
            else:  # two devices with one credential, each at the learned cadence
                t += period * math.exp(rng.gauss(0, 0.05)) / 2
                yield t, (11, "POST telemetry", "[fd00::1]:5683" if i % 2 else "[fd00::99]:7")

    assert _first(detector, events(), kind, start, period) <= 3.0


def test_a_silent_sensor_is_found_and_deprovisioned_and_a_sleeping_one_is_not() -> None:
    settings = WatchSection(silent_after=5, deprovision_after=3600)
    detector = Detector(lambda _: settings)
    awake, sleeper = _sensor(300.0, seed=3), _sensor(300.0, daytime=True, seed=4)
    sleeper.serial = 2
    found = list(run(detector, [awake, sleeper], days=3))
    assert found == []  # the sleeper's nights are not silence
    last = detector.baselines[1].last
    newly, retire = detector.tick(last + 5 * 300 + 60)
    assert [(s, f.kind) for s, f in newly] == [(1, kinds.SILENT)]
    assert retire == []
    newly, retire = detector.tick(last + 5 * 300 + 60 + 3600)
    assert newly == [] and [r.serial for r in retire] == [1]
    assert 1 not in detector.baselines  # forgotten: it must be onboarded again


def test_a_baseline_stays_small() -> None:
    import sys

    baseline = Baseline(START)
    for i in range(100):
        baseline.message(START + 300 * i, 11, f"POST p{i % 3}", "[fd00::1]:5683", SETTINGS)
    size = sys.getsizeof(baseline) + sys.getsizeof(baseline.actions) + sum(
        sys.getsizeof(getattr(baseline, slot)) for slot in Baseline.__slots__)
    assert size < 1024, size


def test_sensors_show_prints_what_the_watch_learned_and_found() -> None:
    from agent.cli.render import render_sensor

    text = render_sensor({
        "name": "t-1", "status": "quarantined", "id": "urn:devid:sensor:x",
        "status_reason": "watch: interval (score 12.0): 0.1 s since the last message; "
                         "expected one every 0.4 s (±5 %)", "profile": "temperature",
        "transport": "oscore", "kid": "01",
        "watch": {"messages": 12, "learned": True, "interval_s": 0.4, "payload_bytes": 11.0,
                  "findings": [{"kind": "interval", "score": 12.0, "at": START,
                                "evidence": "0.1 s since the last message",
                                "baseline": "one every 0.4 s (±5 %)"}]}})
    assert "t-1  quarantined (watch: interval (score 12.0)" in text
    assert "watch       learned from 12 messages: one every 0.4 s, 11.0 bytes" in text
    assert "finding   2023-11-14 00:00:00 interval (score 12.0): 0.1 s since the last " \
        "message; expected one every 0.4 s (±5 %)" in text


@pytest.mark.parametrize(("toml", "what"), [
    ('[profiles.m.watch]\non_anomaly = "panic"\n', "on_anomaly"),
    ("[profiles.m.watch]\nburst = 1\n", "burst"),
    ('[profiles.m.watch]\nlearning = "soon"\n', "learning"),
    ("[profiles.m.watch]\nmin_messages = 1\n", "min_messages"),
    ("[profiles.m.watch]\ninterval_score = 0\n", "interval_score"),
    ('[profiles.m.watch]\nmax_silence = "-1s"\n', "max_silence"),
    ("[profiles.m.watch]\nlisten = true\n", "unknown key"),
])
def test_bad_watch_settings_are_refused_naming_the_key(toml: str, what: str) -> None:
    from pathlib import Path

    from agent.errors import ConfigError
    from agent.policy.model import parse_policy

    with pytest.raises(ConfigError) as caught:
        parse_policy(toml, Path("policy.toml"))
    assert what in caught.value.message and "m.watch" in caught.value.message
