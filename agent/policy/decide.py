"""One decision for one message: which rule allows it and where it goes, or why not. Pure.

Deny by default: a message is allowed only when a rule of the sensor's
profile grants its method on its path, the sensor's attributes meet the
rule's `when`, it is inside the rule's hours, its size and Content-Format
are allowed, and the rule's rate has room. The rate is checked last, so a
message denied for another reason does not use up the sensor's budget.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass

from agent.policy.model import Policy, Rule, path_segments
from agent.ratelimit import TokenBucket
from agent.sensors.model import Sensor

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9._:~-]+$")


@dataclass(frozen=True)
class Message:
    method: str
    path: str
    payload_size: int = 0
    content_format: int | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: str | None = None
    upstream: str | None = None
    spool: bool = False
    to: str | None = None  # the rule's upstream by name; None: the only one configured
    retry_after: float | None = None  # seconds, when the rate was reached

    def to_dict(self) -> dict[str, object]:
        return {"allowed": self.allowed, "reason": self.reason, "rule": self.rule,
                "upstream": self.upstream, "spool": self.spool, "to": self.to}


class Rates:
    """Token buckets per (sensor, rule); bounded by the sensors and rules that exist."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._buckets: dict[tuple[str, str, str], TokenBucket] = {}

    def take(self, sensor: Sensor, rule: Rule) -> float | None:
        key = (sensor.id, sensor.profile, rule.name)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(rule.burst, 60.0 / rule.rate,
                                                      self._monotonic)
        return bucket.take()

    def forget(self, sensor_id: str) -> None:
        for key in [k for k in self._buckets if k[0] == sensor_id]:
            del self._buckets[key]


def _match_path(pattern: str, path: str) -> list[str] | None:
    """None if `path` does not match; else the segments `**` matched."""
    want, got = path_segments(pattern), path_segments(path)
    for i, segment in enumerate(want):
        if segment == "**":
            rest = got[i:]
            return rest if rest and all(s not in (".", "..") for s in rest) else None
        if i >= len(got) or (segment != "*" and segment != got[i]):
            return None
    return [] if len(got) == len(want) else None


def _when(rule: Rule, sensor: Sensor) -> str | None:
    for key, wanted in rule.when.items():
        have = sensor.attributes.get(key)
        allowed = [wanted] if isinstance(wanted, str) else wanted
        if have not in allowed:
            return f"attribute {key}={have or '(unset)'} is not {' or '.join(allowed)}"
    return None


def _inside(rule: Rule, now: datetime.datetime) -> bool:
    minute = now.astimezone(datetime.UTC).hour * 60 + now.astimezone(datetime.UTC).minute
    for start, end in rule.windows():
        if (start <= minute < end) if start < end else (minute >= start or minute < end):
            return True
    return not rule.windows()


def upstream_path(rule: Rule, sensor: Sensor, rest: list[str]) -> str | None:
    """The rule's template filled in; None when a value could escape its segment."""
    values = {"sensor": sensor.id, "name": sensor.name, "profile": sensor.profile,
              "rest": "/".join(rest)}
    values.update({f"attr.{k}": v for k, v in sensor.attributes.items()})

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        value = values.get(name)
        # Only {rest} spans segments (each checked when the path matched).
        parts = value.split("/") if value is not None and name == "rest" else [value]
        if not all(part is not None and _SAFE_VALUE.match(part) for part in parts):
            raise KeyError(name)
        return str(value)

    try:
        return re.sub(r"\{([a-z.]+)\}", fill, rule.upstream)
    except KeyError:
        return None


def decide(policy: Policy, sensor: Sensor, message: Message, now: datetime.datetime,
           rates: Rates | None) -> Decision:
    """`rates` None: explain only (the rate is not checked nor used)."""
    if sensor.status != "active":
        return Decision(False, f"sensor {sensor.name} is {sensor.status}")
    profile = policy.profiles.get(sensor.profile)
    if profile is None:
        return Decision(False, f"profile {sensor.profile!r} is not in the policy: nothing is "
                               "granted")
    near: list[str] = []
    for rule in profile.rules:
        rest = _match_path(rule.path, message.path)
        if rest is None:
            continue
        if message.method not in rule.methods:
            near.append(f"rule {rule.name} allows {', '.join(rule.methods)} on {rule.path}, "
                        f"not {message.method}")
            continue
        unmet = _when(rule, sensor)
        if unmet is not None:
            near.append(f"rule {rule.name}: {unmet}")
            continue
        return _within(rule, sensor, message, now, rates, rest)
    why = "; ".join(near) or f"no rule of profile {sensor.profile} grants " \
                            f"{message.method} {message.path}"
    return Decision(False, why)


def _within(rule: Rule, sensor: Sensor, message: Message, now: datetime.datetime,
            rates: Rates | None, rest: list[str]) -> Decision:
    name = rule.name
    if not _inside(rule, now):
        return Decision(False, f"rule {name}: outside its hours {', '.join(rule.hours or [])} "
                               "UTC", name)
    if message.payload_size > rule.max_payload:
        return Decision(False, f"rule {name}: payload of {message.payload_size} bytes, at most "
                               f"{rule.max_payload}", name)
    if rule.content_formats is not None and message.content_format not in rule.content_formats:
        return Decision(False, f"rule {name}: Content-Format {message.content_format} is not "
                               f"one of {', '.join(map(str, rule.content_formats))}", name)
    upstream = upstream_path(rule, sensor, rest)
    if upstream is None:
        return Decision(False, f"rule {name}: a value in {rule.upstream!r} is unset or has "
                               "characters not allowed upstream", name)
    if rates is not None:
        wait = rates.take(sensor, rule)
        if wait is not None:
            return Decision(False, f"rule {name}: rate of {rule.rate:g}/min (burst "
                                   f"{rule.burst}) reached; room again in {wait:.1f}s", name,
                            retry_after=wait)
    return Decision(True, f"allowed by rule {name}", name, upstream, rule.spool, rule.to)
