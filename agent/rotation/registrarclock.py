"""The registrar's clock as the agent estimates it. Pure: local time comes in as arguments.

Certificates are dated by the registrar's clock. A gateway whose own clock is
wrong (a bad RTC, a wrong NTP server) would misread every validity period: a
clock ahead by a third of the lifetime sees each new certificate as already
due for renewal and renews in a loop; a clock behind renews after expiry. So
the agent plans and judges validity in registrar time: its own clock plus the
offset measured from the `Date` header of the registrar's responses (RFC 9110,
section 6.6.1; one-second resolution, plenty against lifetimes of minutes).

The offset is kept in the identity record so that a restart starts from it,
but it is stale then, and after the local clock jumps: the daemon measures it
again (GET /v1/health, no cryptography) before it relies on a plan.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from agent.clock import human_duration


@dataclass
class RegistrarClock:
    offset: float | None = None  # registrar minus local, seconds
    measured_at: datetime.datetime | None = None  # local time of the last measurement
    stale: bool = True  # not measured since the start or the last local clock jump

    def now(self, local: datetime.datetime) -> datetime.datetime:
        """The registrar's time; the local time while the offset has never been measured."""
        return local + datetime.timedelta(seconds=self.offset or 0.0)

    def observe(self, offset: float | None, local: datetime.datetime) -> None:
        """A response's Date header was read (None: the response had none)."""
        if offset is not None:
            self.offset, self.measured_at, self.stale = offset, local, False

    def local_clock_jumped(self) -> None:
        self.stale = True


def beyond_skew(offset: float | None, skew: float) -> bool:
    return offset is not None and abs(offset) > skew


def describe_offset(offset: float) -> str:
    """'the local clock is 25m 0s ahead of the registrar's' for offset -1500."""
    if abs(offset) < 1:
        return "the local clock agrees with the registrar's"
    direction = "ahead of" if offset < 0 else "behind"
    # The Date header has 1 s resolution: 172799 s is "2d 0h", not "1d 23h".
    size = round(abs(offset) / 60) * 60 if abs(offset) >= 3600 else abs(offset)
    return f"the local clock is {human_duration(size)} {direction} the registrar's"
