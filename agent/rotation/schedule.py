"""When to renew, and how healthy a certificate is. Pure: time comes in as arguments.

A certificate of lifetime L (notAfter - notBefore) is renewed at
notBefore + fraction * L, moved by up to ±jitter * fraction * L so that a
fleet enrolled together does not renew together. The jitter is derived from
the certificate's serial, so a restart keeps the same plan. After a failed
attempt, retries back off (agent.backoff) but never past the point where
the current certificate expires without another try.

All times here are the registrar's: certificates are dated by its clock, so
the daemon plans against its estimate of that clock (agent.rotation.
registrarclock), never against a local clock that may be wrong. The plan is
re-made on every tick: a clock jump forward renews at once if the renewal
point has passed (instead of skipping it), a jump back simply waits longer.

Whatever the plan says, two renewals are never closer than `renewal_floor`
(except `devidctl renew`): a wrong clock, a tiny renew_fraction or a bug can
cost the registrar and the TPM one renewal per floor, not one per tick.
"""

from __future__ import annotations

import datetime
import hashlib
from enum import Enum

from agent.pki.devicecert import Validity

DEFAULT_FRACTION = 2 / 3
DEFAULT_JITTER = 0.10
WARN_FRACTION = 1 / 6  # status WARN when less than this share of the lifetime is left
MAX_TICK = 10.0  # seconds between re-plans while waiting (clock-jump detection)
JUMP_TOLERANCE = 2.0  # seconds of wall-vs-monotonic disagreement taken as a clock jump
DEFAULT_MIN_INTERVAL = 30.0  # seconds: [rotation] min_interval


def serial_jitter(serial: str) -> float:
    """A value in [-1, 1] fixed by the certificate serial."""
    digest = hashlib.sha256(serial.encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64) * 2 - 1


def renew_at(validity: Validity, serial: str, fraction: float = DEFAULT_FRACTION,
             jitter: float = DEFAULT_JITTER) -> datetime.datetime:
    """When to renew a certificate: `fraction` into its lifetime, ±`jitter` of that."""
    offset = validity.lifetime * fraction * (1 + jitter * serial_jitter(serial))
    return min(validity.not_before + offset, validity.not_after)


def retry_at(now: datetime.datetime, delay: float, validity: Validity | None,
             floor: float = 1.0, not_before: float = 0.0) -> datetime.datetime:
    """When to retry after a failure: `delay` from now, but if the certificate would
    expire before that, one last attempt shortly before it expires. Never sooner than
    `not_before` seconds (the registrar's Retry-After: asking earlier is refused)."""
    when = now + datetime.timedelta(seconds=delay)
    if validity is not None and now < validity.not_after < when:
        before_expiry = validity.not_after - datetime.timedelta(
            seconds=max(floor, validity.lifetime.total_seconds() / 20))
        if before_expiry > now:  # past it, the last attempt was made: back off as usual
            when = max(now + datetime.timedelta(seconds=floor), before_expiry)
    return max(when, now + datetime.timedelta(seconds=not_before))


def renewal_floor(lifetime: float, fraction: float = DEFAULT_FRACTION,
                  min_interval: float = DEFAULT_MIN_INTERVAL) -> float:
    """The least time, in seconds, between two automatic renewals of certificates of
    `lifetime`: half the planned interval, at least `min_interval`, but at most half the
    lifetime, so that holding back can never let a certificate expire."""
    return min(max(min_interval, lifetime * fraction / 2), lifetime / 2)


def wait_seconds(now: datetime.datetime, target: datetime.datetime,
                 tick: float = MAX_TICK) -> float:
    """How long to sleep before re-planning: until `target`, at most one tick."""
    return max(0.0, min((target - now).total_seconds(), tick))


def clock_jump(last_wall: datetime.datetime, last_monotonic: float,
               wall: datetime.datetime, monotonic: float,
               tolerance: float = JUMP_TOLERANCE) -> float | None:
    """Seconds the wall clock jumped since the last observation (None if it did not)."""
    drift = (wall - last_wall).total_seconds() - (monotonic - last_monotonic)
    return drift if abs(drift) > tolerance else None


class Health(Enum):
    OK = "ok"
    EXPIRING = "expiring"  # less than WARN_FRACTION of the lifetime left
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"  # beyond the tolerated skew: the local clock is behind


def health(validity: Validity, now: datetime.datetime, skew: float = 0.0) -> Health:
    if now > validity.not_after:
        return Health.EXPIRED
    if now < validity.not_before - datetime.timedelta(seconds=skew):
        return Health.NOT_YET_VALID
    if validity.remaining(now) < validity.lifetime * WARN_FRACTION:
        return Health.EXPIRING
    return Health.OK
