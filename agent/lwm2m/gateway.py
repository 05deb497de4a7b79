"""The LwM2M Gateway object (/25, OMA registry 25.xml, version 2.0) as the gateway shows
its sensors to an upstream LwM2M server: pure.

Each registered sensor is one instance of /25:
- 0 Device ID: the sensor's ID (urn:devid:sensor:...);
- 1 Prefix: the path segment under which the upstream server reaches the
  sensor's objects (/PREFIX/3303/0/5700);
- 3 IoT Device Objects: the sensor's objects as link format under that
  prefix (`</m-7/3/0>,</m-7/3303/0>`).

The instance ID is the sensor's serial (stable across restarts and never
reused, as serials are not); the prefix is its endpoint name where that is a
plain path segment, else `_` and its serial. `route` maps an upstream path
back to the sensor and the path on it. The edge that registers with the
upstream server and relays operations is still to come (issue 13).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from agent.lwm2m.registration import MAX_ID, Registration

OBJECT = 25
VERSION = "2.0"
DEVICE_ID, PREFIX, IOT_DEVICE_OBJECTS = 0, 1, 3
_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class GatewayInstance:
    instance: int
    device_id: str
    prefix: str
    objects: str  # link format, under the prefix

    def resources(self) -> dict[int, str]:
        return {DEVICE_ID: self.device_id, PREFIX: self.prefix,
                IOT_DEVICE_OBJECTS: self.objects}


def prefix_of(registration: Registration) -> str:
    """A plain endpoint name (a letter, then letters, digits, - and _) is the prefix;
    anything else would need escaping in a path, so `_` and the serial, which no plain
    name can be (endpoint names are unique per sensor: so are prefixes)."""
    endpoint = registration.endpoint
    return endpoint if _PLAIN.match(endpoint) else f"_{registration.serial}"


class GatewayObject:
    """/25 for the registrations of a moment: its instances, what the gateway registers
    upstream, and the way from an upstream path to a sensor (by prefix, in a dict)."""

    def __init__(self, registrations: Iterable[Registration]) -> None:
        self.instances: list[GatewayInstance] = []
        for registration in sorted(registrations, key=lambda r: r.serial):
            if registration.serial > MAX_ID:
                continue  # no instance ID for it (a registry past 65,534 sensors)
            prefix = prefix_of(registration)
            links = []
            for obj, ids in registration.objects.items():
                links += [f"</{prefix}/{obj}/{i}>" for i in ids] if ids else \
                    [f"</{prefix}/{obj}>"]
            self.instances.append(GatewayInstance(registration.serial,
                                                  registration.sensor_id, prefix,
                                                  ",".join(links)))
        self._by_prefix = {g.prefix: g for g in self.instances}

    def registration_payload(self, own: Iterable[tuple[int, int]]) -> bytes:
        """What the gateway registers upstream: its own object instances, then /25 and one
        instance per sensor (LwM2M 1.2: the sensors' objects are read from /25/N/3, not
        listed here)."""
        links = ['</>;rt="oma.lwm2m";ct=11543']
        links += [f"</{obj}/{inst}>" for obj, inst in own]
        links.append(f"</{OBJECT}>;ver={VERSION}")
        links += [f"</{OBJECT}/{g.instance}>" for g in self.instances]
        return ",".join(links).encode("ascii")

    def route(self, path: tuple[str, ...]) -> tuple[int, tuple[int, ...]] | None:
        """(sensor serial, path on the sensor) for an upstream request to /PREFIX/...; None
        when the first segment is no sensor's prefix or the rest is not an LwM2M path."""
        if not 2 <= len(path) <= 5:
            return None
        instance = self._by_prefix.get(path[0])
        rest = path[1:]
        if instance is None or not all(
                s.isdigit() and (s == "0" or not s.startswith("0")) and int(s) <= MAX_ID
                for s in rest):
            return None
        return instance.instance, tuple(int(s) for s in rest)
