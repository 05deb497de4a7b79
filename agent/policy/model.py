"""A policy file: profiles (roles), each with rules that grant what a sensor may do. Pure.

    [profiles.temperature]
    [[profiles.temperature.rules]]
    name = "telemetry"
    methods = ["POST"]
    path = "/telemetry"                              # what the sensor sends to
    upstream = "sensors/{sensor}/telemetry"          # where it goes
    max_payload = 256                                # bytes
    content_formats = [60, 110, 112]                 # CoAP Content-Format numbers
    rate = 60                                        # messages per minute
    burst = 10
    hours = ["06:00-22:00"]                          # UTC; optional
    when = { site = ["plant-7"], kind = "outdoor" }  # sensor attributes; optional
    spool = true                                     # store and forward when upstream is down
    to = "cloud"                 # which [upstreams.NAME] of broker.toml; optional if only one

    [profiles.temperature.lwm2m]                     # may register over LwM2M; optional
    deprovision_after = 3                            # lifetimes missed before revocation

A rule's `path` is literal segments, `*` for one segment, and a final `**`
for the rest; `upstream` may use {sensor}, {name}, {profile}, {attr.KEY} and
{rest} (what `**` matched), and must contain {sensor} so that no sensor
reaches another's namespace.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from agent.tomlconfig import Duration, DurationOrZero, StrictSection, parse_toml_model

METHODS = ("GET", "POST", "PUT", "DELETE", "FETCH", "PATCH", "iPATCH")
_SEGMENT = re.compile(r"^[A-Za-z0-9._~-]+$")
_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]|24):([0-5]\d)$")
_VARIABLE = re.compile(r"\{([a-z.]+)\}")
_KNOWN = re.compile(r"^(sensor|name|profile|rest|attr\.[a-z][a-z0-9_]{0,31})$")



def path_segments(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"{path!r}: a path starts with '/'")
    return [s for s in path.split("/")[1:] if s != ""] if path != "/" else []


class Rule(StrictSection):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
    methods: Annotated[list[Literal[METHODS]], Field(min_length=1)]  # type: ignore[valid-type]
    path: str
    upstream: str
    max_payload: Annotated[int, Field(ge=0, le=65536)] = 1024
    content_formats: list[Annotated[int, Field(ge=0, le=65535)]] | None = None
    rate: Annotated[float, Field(gt=0, le=600_000)] = 60.0
    burst: Annotated[int, Field(ge=1, le=100_000)] = 10
    hours: list[str] | None = None
    when: dict[str, str | list[str]] = Field(default_factory=dict)
    spool: bool = False
    to: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")] | None = None

    @field_validator("path")
    @classmethod
    def _pattern(cls, v: str) -> str:
        segments = path_segments(v)
        for i, segment in enumerate(segments):
            if segment == "**" and i != len(segments) - 1:
                raise ValueError(f"{v!r}: '**' only as the last segment")
            if segment not in ("*", "**") and not _SEGMENT.match(segment):
                raise ValueError(f"{v!r}: segment {segment!r} has characters a path may not")
        return v

    @field_validator("upstream")
    @classmethod
    def _template(cls, v: str) -> str:
        names = _VARIABLE.findall(v)
        unknown = [n for n in names if not _KNOWN.match(n)]
        if unknown:
            raise ValueError(f"{v!r}: unknown variable {{{unknown[0]}}} (known: {{sensor}}, "
                             "{name}, {profile}, {rest}, {attr.KEY})")
        if "sensor" not in names:
            raise ValueError(f"{v!r}: must contain {{sensor}}, so that a sensor reaches only "
                             "its own namespace")
        if ".." in v.split("/"):
            raise ValueError(f"{v!r}: '..' is not a path segment here")
        return v

    @field_validator("hours")
    @classmethod
    def _hours(cls, v: list[str] | None) -> list[str] | None:
        for window in v or []:
            if not _HOURS.match(window):
                raise ValueError(f"{window!r}: expected HH:MM-HH:MM (UTC)")
        return v

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a method is listed twice")
        return v

    @model_validator(mode="after")
    def _rest_needs_globstar(self) -> Rule:
        if "{rest}" in self.upstream and not self.path.endswith("/**"):
            raise ValueError("upstream uses {rest}: the path must end with '/**'")
        return self

    def windows(self) -> list[tuple[int, int]]:
        """Minutes after midnight UTC, [start, end); end may be past start (wraps)."""
        out = []
        for window in self.hours or []:
            m = _HOURS.match(window)
            assert m is not None
            h1, m1, h2, m2 = (int(g) for g in m.groups())
            out.append((h1 * 60 + m1, h2 * 60 + m2))
        return out


LWM2M_OPERATIONS = ("read", "write", "execute", "discover", "observe")
LWM2M_CALLERS = ("operator", "upstream")
_LWM2M_PATH = re.compile(r"^(/(0|[1-9][0-9]{0,4}|\*))*(/\*\*)?$")


class Lwm2mGrant(StrictSection):
    """What the operator (devidctl) or the upstream LwM2M server may do on a sensor."""

    who: Annotated[list[Literal[LWM2M_CALLERS]], Field(min_length=1)] = ["operator"]  # type: ignore[valid-type]
    operations: Annotated[list[Literal[LWM2M_OPERATIONS]], Field(min_length=1)]  # type: ignore[valid-type]
    # /OBJECT/INSTANCE/RESOURCE with '*' for one ID and a final '**' for the rest.
    paths: Annotated[list[str], Field(min_length=1)]

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for path in v:
            if not path or not _LWM2M_PATH.match(path) or path.count("/") > 4:
                raise ValueError(f"{path!r}: expected /OBJECT[/INSTANCE[/RESOURCE]] of IDs "
                                 "or '*', optionally ending in '/**'")
        return v

    def matches(self, who: str, operation: str, path: tuple[int, ...]) -> bool:
        if who not in self.who or operation not in self.operations:
            return False
        return any(_lwm2m_match(pattern, path) for pattern in self.paths)


def _lwm2m_match(pattern: str, path: tuple[int, ...]) -> bool:
    want = pattern.split("/")[1:]
    for i, segment in enumerate(want):
        if segment == "**":
            return True
        if i >= len(path) or (segment != "*" and int(segment) != path[i]):
            return False
    return len(path) == len(want)


class Lwm2mSection(StrictSection):
    """`[profiles.NAME.lwm2m]`: the profile's sensors may register with the gateway's
    LwM2M server (agent/broker/lwm2m.py); without it they may not."""

    # Lifetimes a Register or Update may ask for, in seconds (outside: 4.00).
    min_lifetime: Annotated[int, Field(ge=1, le=2**31 - 1)] = 30
    max_lifetime: Annotated[int, Field(ge=1, le=2**31 - 1)] = 7 * 86400
    # After this many lifetimes without an Update the sensor's credential is revoked
    # (deprovisioned); 0: it is only marked offline.
    deprovision_after: Annotated[int, Field(ge=0, le=10_000)] = 3
    # Sensors arrive with a bootstrap credential and get their operational one by LwM2M
    # Bootstrap from the gateway (agent/broker/bootstrap.py).
    bootstrap: bool = False
    # A sensor in queue mode listens this long after its last Register or Update (CoAP's
    # MAX_TRANSMIT_WAIT); later, the gateway's requests wait for its next Update.
    queue_awake: Annotated[int, Field(ge=1, le=3600)] = 93
    # Downlink operations (Read, Write, Execute, Discover, Observe): none unless granted.
    grants: list[Lwm2mGrant] = Field(default_factory=list)

    def grant(self, who: str, operation: str, path: tuple[int, ...]) -> int | None:
        """The index of the first grant that allows it, or None (deny by default)."""
        return next((i for i, g in enumerate(self.grants) if g.matches(who, operation, path)),
                    None)

    @model_validator(mode="after")
    def _range(self) -> Lwm2mSection:
        if self.min_lifetime > self.max_lifetime:
            raise ValueError("min_lifetime is above max_lifetime")
        return self


class WatchSection(StrictSection):
    """How the broker watches a profile's sensors (agent/watch/): what it learns, when a
    change is a finding, and what a finding does. Every profile is watched; by default
    findings only alert."""

    # Findings start once a sensor was seen this long and sent `min_messages`.
    learning: Duration = 86400.0
    min_messages: Annotated[int, Field(ge=5, le=100_000)] = 20
    on_anomaly: Literal["alert", "quarantine"] = "alert"
    # Evidence summed over consecutive unusual intervals (or payload sizes), in robust
    # deviations beyond 4 each, before it is a finding; one wild one can be enough.
    interval_score: Annotated[float, Field(ge=2, le=1000)] = 8.0
    size_score: Annotated[float, Field(ge=2, le=1000)] = 8.0
    # Unusual intervals faster than this many times the learned rate are a burst.
    burst: Annotated[int, Field(ge=2, le=10_000)] = 5
    # In 10 minutes (decaying): failed authentications naming the sensor, and denials.
    auth_failures: Annotated[int, Field(ge=1, le=100_000)] = 5
    denials: Annotated[int, Field(ge=1, le=100_000)] = 10
    # Activity in an hour of the day (UTC) never seen while learning (a day at least).
    hours: bool = True
    # Silent: offline after this many learned intervals (or `max_silence`, if shorter),
    # then deprovisioned (credential revoked) after `deprovision_after` more; 0: never.
    silent_after: Annotated[float, Field(ge=2, le=100_000)] = 10.0
    max_silence: DurationOrZero = 0.0
    deprovision_after: DurationOrZero = 0.0


class Profile(StrictSection):
    description: str = ""
    # Plain CoAP, without OSCORE or DTLS: only where a profile says so (never by default).
    insecure: bool = False
    lwm2m: Lwm2mSection | None = None
    watch: WatchSection = Field(default_factory=WatchSection)
    rules: list[Rule] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _names(cls, v: list[Rule]) -> list[Rule]:
        names = [r.name for r in v]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two rules are named {name!r}")
        return v


class Policy(StrictSection):
    profiles: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")], Profile] = \
        Field(default_factory=dict)
    source: Path | None = Field(default=None, exclude=True)

    def insecure_profiles(self) -> list[str]:
        return [name for name, p in self.profiles.items() if p.insecure]


def parse_policy(text: str, source: Path) -> Policy:
    """ConfigError naming the file, profile, rule and key for anything wrong."""
    policy = parse_toml_model(Policy, text, source)
    return policy.model_copy(update={"source": source})
