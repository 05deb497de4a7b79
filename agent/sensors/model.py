"""What a sensor is to the broker, and the rules its fields follow. Pure.

A sensor has an ID derived from the registry and its serial
(`urn:devid:sensor:` + 32 hex digits, never reused: serials only grow), a
name, a profile (its role in the policy), free attributes the policy can
match (`site`, `zone`, `kind`, ...), a transport, a status, times and
counters. Its credential lives sealed in the store (atrest.py).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("active", "quarantined", "revoked")
ID_PREFIX = "urn:devid:sensor:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PROFILE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_ATTR_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_ATTRIBUTES = 16
MAX_ATTR_VALUE = 128


def sensor_id(registry_id: str, serial: int) -> str:
    """Unique across gateways (the registry's random ID) and never reused (serials grow)."""
    digest = hashlib.sha256(f"devid-sensor\x00{registry_id}\x00{serial}".encode()).hexdigest()
    return ID_PREFIX + digest[:32]


def check_name(name: str) -> str | None:
    if not _NAME.match(name):
        return f"{name!r}: expected 1-64 of A-Z, a-z, 0-9, '.', '_', '-', starting with a " \
               "letter or digit"
    return None


def check_profile(profile: str) -> str | None:
    if not _PROFILE.match(profile):
        return f"{profile!r}: expected 1-32 of a-z, 0-9, '_', '-', starting with a letter"
    return None


def check_attributes(attributes: dict[str, Any]) -> str | None:
    if len(attributes) > MAX_ATTRIBUTES:
        return f"{len(attributes)} attributes, at most {MAX_ATTRIBUTES}"
    for key, value in attributes.items():
        if not isinstance(key, str) or not _ATTR_KEY.match(key):
            return f"key {key!r}: expected 1-32 of a-z, 0-9, '_', starting with a letter"
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ATTR_VALUE or \
                not value.isprintable():
            return f"{key}: expected 1-{MAX_ATTR_VALUE} printable characters"
    return None


@dataclass(frozen=True, slots=True)
class Sensor:
    serial: int
    id: str
    name: str
    profile: str
    transport: str
    status: str
    kid: bytes  # OSCORE Sender ID or PSK identity: how a message names the sensor
    attributes: dict[str, str] = field(default_factory=dict)
    status_reason: str | None = None
    created_at: str = ""
    updated_at: str = ""
    last_seen: str | None = None
    messages: int = 0
    denials: int = 0
    auth_failures: int = 0  # messages that named this sensor but did not authenticate

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "profile": self.profile,
                "transport": self.transport, "status": self.status,
                "status_reason": self.status_reason, "attributes": dict(self.attributes),
                "kid": self.kid.hex() if self.transport in ("oscore", "edhoc") else
                self.kid.decode("ascii", "replace"),
                "created_at": self.created_at, "updated_at": self.updated_at,
                "last_seen": self.last_seen, "messages": self.messages,
                "denials": self.denials, "auth_failures": self.auth_failures}
