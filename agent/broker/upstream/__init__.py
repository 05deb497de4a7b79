"""Where allowed sensor traffic goes, under the gateway's identity.

An upstream takes a `Forward` (which sensor, what, to which path) and gives
a `Reply` in CoAP terms, or raises UpstreamError (the sensor gets 5.02) or
UpstreamTimeout (5.04). One module per kind: coap.py (coaps+tcp, RFC 8323).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from agent.sensors.model import Sensor

# The CoAP option in which the broker asserts, upstream, which sensor spoke. From the
# experimental range (RFC 7252, 12.2): elective and safe to forward. A sensor cannot
# set it: nothing a sensor sends is copied upstream but the payload and its format.
SENSOR_OPTION = 65000


@dataclass(frozen=True)
class Forward:
    sensor: Sensor
    method: str  # GET, POST, ...
    path: str  # the rule's upstream template, filled in: "sensors/urn:.../telemetry"
    payload: bytes
    content_format: int | None = None
    accept: int | None = None


@dataclass(frozen=True)
class Reply:
    code: int  # CoAP code: class * 32 + detail (2.04 is 68)
    payload: bytes = b""
    content_format: int | None = None
    max_age: int | None = None


class Upstream(Protocol):
    name: str
    url: str
    timeout: float  # seconds until the sensor gets 5.04

    async def start(self) -> None: ...

    async def forward(self, request: Forward) -> Reply: ...

    async def close(self) -> None: ...

    def status_section(self) -> dict[str, Any]: ...
