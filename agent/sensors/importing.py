"""Factory-embedded sensor keys from a CSV or JSON file, checked line by line. Pure.

CSV: a header row, then one sensor per row. JSON: a list of objects. Fields:

    name, profile, transport (oscore | dtls-psk), attr.KEY (CSV) / attributes (JSON)
    oscore:   master_secret (hex, >= 16 bytes), master_salt (hex, optional),
              sender_id (hex, 1-7 bytes: the sensor's), recipient_id (hex, default 00)
    dtls-psk: psk_identity (text), psk (hex, >= 16 bytes)

Every problem is reported with its line (CSV) or index (JSON) and nothing is
imported when there is any: a file is taken whole or not at all.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from typing import Any

from agent.errors import ImportRefused
from agent.secret import SecretBytes
from agent.sensors.credentials import (
    GATEWAY_SENDER_ID,
    IMPORTABLE,
    MAX_OSCORE_ID,
    MINTED_PSK_PREFIX,
    OSCORE_SECRET_BYTES,
    PSK_BYTES,
    Credential,
    OscoreCredential,
    PskCredential,
)
from agent.sensors.keycheck import weak_key_reason
from agent.sensors.model import check_attributes, check_name, check_profile

MAX_SENSORS = 100_000
_PSK_IDENTITY = re.compile(r"^[\x21-\x7e]{1,128}$")


@dataclass(frozen=True)
class ImportedSensor:
    where: str  # "line 3" or "[2]"
    name: str
    profile: str
    attributes: dict[str, str]
    credential: Credential


class _Row:
    def __init__(self, where: str, fields: dict[str, Any], problems: list[str]) -> None:
        self.where, self.fields, self.problems = where, fields, problems

    def text(self, key: str, required: bool = True) -> str | None:
        value = self.fields.get(key)
        if value is None or value == "":
            if required:
                self.problems.append(f"{self.where}: {key}: missing")
            return None
        if not isinstance(value, str):
            self.problems.append(f"{self.where}: {key}: expected text")
            return None
        return value.strip()

    def hex(self, key: str, required: bool = True) -> bytes | None:
        value = self.text(key, required)
        if value is None:
            return None
        try:
            return bytes.fromhex(value)
        except ValueError:
            self.problems.append(f"{self.where}: {key}: not hex")
            return None

    def check(self, key: str, reason: str | None) -> bool:
        if reason is not None:
            self.problems.append(f"{self.where}: {key}: {reason}")
        return reason is None


def _credential(row: _Row, transport: str) -> Credential | None:
    if transport == "oscore":
        secret = row.hex("master_secret")
        salt = row.hex("master_salt", required=False) or b""
        sender = row.hex("sender_id")
        recipient = row.hex("recipient_id", required=False) or GATEWAY_SENDER_ID
        ok = secret is not None and row.check(
            "master_secret", weak_key_reason(secret, OSCORE_SECRET_BYTES))
        ok &= row.check("master_salt", None if len(salt) <= 32 else "longer than 32 bytes")
        if sender is not None:
            ok &= row.check("sender_id", None if 0 < len(sender) <= MAX_OSCORE_ID else
                            f"{len(sender)} bytes, expected 1 to {MAX_OSCORE_ID}")
            ok &= row.check("recipient_id", None if recipient != sender else
                            "equals sender_id")
        if not ok or secret is None or sender is None:
            return None
        return OscoreCredential(SecretBytes(secret), salt, sender, recipient)
    identity = row.text("psk_identity")
    key = row.hex("psk")
    ok = key is not None and row.check("psk", weak_key_reason(key, PSK_BYTES))
    if identity is not None:
        ok &= row.check("psk_identity", None if _PSK_IDENTITY.match(identity) else
                        "expected 1-128 printable characters without spaces")
        ok &= row.check("psk_identity", None if not identity.encode().startswith(
            MINTED_PSK_PREFIX) else f"{MINTED_PSK_PREFIX.decode()}… is reserved for minted "
                                    "identities")
    if not ok or identity is None or key is None:
        return None
    return PskCredential(identity.encode(), SecretBytes(key))


def _sensor(row: _Row) -> ImportedSensor | None:
    name, profile = row.text("name"), row.text("profile")
    transport = row.text("transport")
    attributes = row.fields.get("attributes") or {}
    ok = name is not None and row.check("name", check_name(name))
    ok &= profile is not None and row.check("profile", check_profile(profile))
    ok &= isinstance(attributes, dict) and row.check("attributes",
                                                      check_attributes(attributes))
    if transport is not None and transport not in IMPORTABLE:
        row.problems.append(f"{row.where}: transport: {transport!r}, expected one of "
                            f"{', '.join(IMPORTABLE)} (EDHOC sensors are added with "
                            "`sensors add`)")
        return None
    credential = _credential(row, transport) if transport else None
    if not ok or credential is None or name is None or profile is None:
        return None
    return ImportedSensor(row.where, name, profile, dict(attributes), credential)


def _rows(text: str, filename: str) -> list[tuple[str, dict[str, Any]]]:
    if filename.endswith(".json") or text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ImportRefused(f"{filename}: not valid JSON ({e})", []) from None
        if not isinstance(doc, list) or not all(isinstance(item, dict) for item in doc):
            raise ImportRefused(f"{filename}: expected a JSON list of objects", [])
        return [(f"[{i}]", item) for i, item in enumerate(doc)]
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "name" not in reader.fieldnames:
        raise ImportRefused(f"{filename}: expected a CSV header row naming at least "
                            "name, profile, transport and the key columns", [])
    rows = []
    for record in reader:
        if None in record:
            return [(f"line {reader.line_num}", {"__extra__": True})]
        attrs = {k.removeprefix("attr."): v for k, v in record.items()
                 if k.startswith("attr.") and v}
        rows.append((f"line {reader.line_num}", {**record, "attributes": attrs}))
    return rows


def parse_import(text: str, filename: str) -> list[ImportedSensor]:
    """Every sensor in the file, or ImportRefused listing every problem."""
    rows = _rows(text, filename)
    if len(rows) > MAX_SENSORS:
        raise ImportRefused(f"{filename}: {len(rows)} sensors, at most {MAX_SENSORS} per "
                            "file", [])
    problems: list[str] = []
    sensors: list[ImportedSensor] = []
    for where, fields in rows:
        if fields.get("__extra__"):
            problems.append(f"{where}: more fields than the header names")
            continue
        sensor = _sensor(_Row(where, fields, problems))
        if sensor is not None:
            sensors.append(sensor)
    problems += _duplicates(sensors)
    if problems:
        raise ImportRefused(f"{filename}: {len(problems)} problem(s); nothing was imported",
                            problems, "fix the lines named and import the file again")
    if not sensors:
        raise ImportRefused(f"{filename}: no sensors in the file", [])
    return sensors


def _duplicates(sensors: list[ImportedSensor]) -> list[str]:
    problems: list[str] = []
    seen: dict[tuple[str, bytes], str] = {}
    for sensor in sensors:
        cred = sensor.credential
        for what, value in (("name", sensor.name.encode()), ("key", cred.secret.reveal()),
                            ("kid", cred.kid)):
            label = {"name": "name", "key": "the same key as",
                     "kid": "sender_id/psk_identity"}[what]
            first = seen.setdefault((what, value), sensor.where)
            if first != sensor.where:
                problems.append(f"{sensor.where}: {label} {first}" if what == "key" else
                                f"{sensor.where}: {label}: the same as {first}")
    return problems
