"""The sensor registry: one SQLite file in the broker's state directory.

Credentials are sealed (atrest.py) under the data key; the database also
remembers which key that was (its key ID), so a file copied to another
gateway, or opened after the agent's secret was purged, is refused with the
reason instead of failing on every row. Serials come from AUTOINCREMENT and
are never reused, so neither are sensor IDs. Names, (transport, kid) and key
fingerprints are unique: no two sensors share a name, an identifier on the
wire, or a key.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ImportRefused, SensorError, SensorNotFound, StateError
from agent.secret import SecretBytes
from agent.sensors import credentials as creds
from agent.sensors.atrest import RecordCipher
from agent.sensors.importing import ImportedSensor
from agent.sensors.model import (
    STATUSES,
    Sensor,
    check_attributes,
    check_name,
    check_profile,
    sensor_id,
)
from agent.sqlite import Database

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS registry (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sensors (
    serial INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL UNIQUE,
    profile TEXT NOT NULL,
    transport TEXT NOT NULL CHECK (transport IN ('oscore', 'dtls-psk', 'edhoc')),
    kid BLOB NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'quarantined', 'revoked')),
    status_reason TEXT,
    attributes TEXT NOT NULL,
    credential BLOB NOT NULL,
    fingerprint BLOB NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    last_seen TEXT,
    messages INTEGER NOT NULL DEFAULT 0,
    denials INTEGER NOT NULL DEFAULT 0,
    auth_failures INTEGER NOT NULL DEFAULT 0,
    UNIQUE (transport, kid)
);
-- OSCORE replay state (RFC 8613 Appendix B.1): the next sequence number the gateway may
-- use (reserved ahead in chunks) and the replay window, or NULL while a broker runs with
-- the window in memory only: after a crash the sensor's next request is checked by Echo.
CREATE TABLE IF NOT EXISTS oscore_state (
    serial INTEGER PRIMARY KEY REFERENCES sensors (serial) ON DELETE CASCADE,
    next_to_send INTEGER NOT NULL,
    window TEXT
);
"""
_COLUMNS = ("serial, id, name, profile, transport, status, kid, attributes, status_reason, "
            "created_at, updated_at, last_seen, messages, denials, auth_failures")


def _rebuilt_sensors_table() -> tuple[str, ...]:
    """SQLite cannot change a CHECK constraint in place: the table is made anew from the
    current schema and the rows copied (foreign keys are not enforced on this file). The
    serial counter is carried over, so that no serial, and no sensor ID, is used twice."""
    create = next(st for st in SCHEMA.split(";") if "TABLE IF NOT EXISTS sensors (" in st)
    columns = _COLUMNS + ", credential, fingerprint"
    return ("CREATE TEMP TABLE serial_kept AS SELECT seq FROM sqlite_sequence "
            "WHERE name = 'sensors'",
            create.replace("IF NOT EXISTS sensors (", "sensors_new ("),
            f"INSERT INTO sensors_new ({columns}) SELECT {columns} FROM sensors",
            "DROP TABLE sensors", "ALTER TABLE sensors_new RENAME TO sensors",
            "DELETE FROM sqlite_sequence WHERE name = 'sensors'",
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'sensors', seq FROM serial_kept",
            "DROP TABLE serial_kept")


# Schema upgrades, by the version they start from.
_UPGRADES = {1: ("ALTER TABLE sensors ADD COLUMN auth_failures INTEGER NOT NULL DEFAULT 0",),
             2: _rebuilt_sensors_table()}  # v3: the transport `edhoc`
CREDENTIAL = "credential"  # the AAD purpose of the sealed credential
EDHOC_KEY = "edhoc-key"  # ... and of the gateway's EDHOC key


@dataclass(frozen=True)
class NewSensor:
    name: str
    profile: str
    transport: str = "oscore"
    attributes: dict[str, str] = field(default_factory=dict)

    def problem(self) -> str | None:
        if self.transport not in creds.TRANSPORTS:
            return f"transport: {self.transport!r}, expected one of " \
                   f"{', '.join(creds.TRANSPORTS)}"
        for key, reason in (("name", check_name(self.name)),
                            ("profile", check_profile(self.profile)),
                            ("attributes", check_attributes(self.attributes))):
            if reason is not None:
                return f"{key}: {reason}"
        return None


def _sensor(row: Any) -> Sensor:  # a row of _COLUMNS, in order
    (serial, sid, name, profile, transport, status, kid, attributes, reason, created,
     updated, seen, messages, denials, auth_failures) = row
    # Profile, transport and status repeat across a fleet: one string each, not one per
    # sensor held (10,000 contexts in memory hold 10,000 Sensors).
    return Sensor(serial, sid, name, sys.intern(profile), sys.intern(transport),
                  sys.intern(status), bytes(kid), json.loads(attributes), reason, created,
                  updated, seen, messages, denials, auth_failures)


class SensorStore(Database):
    def __init__(self, path: Path, cipher: RecordCipher) -> None:
        super().__init__(path, "the broker")
        self._cipher = cipher
        self.registry_id = self._migrate()

    def _migrate(self) -> str:
        with self._transaction() as db:
            version = self._schema_version(db, SCHEMA_VERSION, "devid-broker")
            for step in range(version, SCHEMA_VERSION) if version else ():
                for statement in _UPGRADES.get(step, ()):
                    db.execute(statement)
            self._create(db, SCHEMA)
            db.execute("INSERT OR IGNORE INTO registry (key, value) VALUES ('registry_id', ?)",
                       (uuid.uuid4().hex,))
            db.execute("INSERT OR IGNORE INTO registry (key, value) VALUES ('key_id', ?)",
                       (self._cipher.key_id,))
            values = dict(db.execute("SELECT key, value FROM registry").fetchall())
            if values["key_id"] != self._cipher.key_id:
                raise StateError(
                    f"{self.path}: the sensor registry was sealed under another data key "
                    f"(key ID {values['key_id']}, this one {self._cipher.key_id})",
                    "the file was copied from another gateway, or the agent's sealed secret "
                    "was destroyed or re-made: its sensor credentials cannot be read here; "
                    "onboard the sensors again (docs/broker.md, 'Backups')")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return str(values["registry_id"])

    # --- reading -----------------------------------------------------------------------

    def get(self, ref: str) -> Sensor:
        """A sensor by name or ID."""
        rows = self._query(f"SELECT {_COLUMNS} FROM sensors WHERE name = ? OR id = ?",
                           (ref, ref))
        if not rows:
            raise SensorNotFound(f"no sensor named {ref!r}", "see `devidctl sensors list`")
        return _sensor(rows[0])

    def list(self) -> list[Sensor]:
        return [_sensor(r) for r in self._query(f"SELECT {_COLUMNS} FROM sensors "
                                                "ORDER BY serial")]

    def find(self, transport: str, kid: bytes) -> tuple[Sensor, bytes] | None:
        """The sensor a message names by `kid` (OSCORE Sender ID, PSK identity), with its
        key's fingerprint (which changes when it is rekeyed); None if there is none."""
        rows = self._query(f"SELECT {_COLUMNS}, fingerprint FROM sensors WHERE transport = ? "
                           "AND kid = ?", (transport, kid))
        return (_sensor(rows[0][:-1]), bytes(rows[0][-1])) if rows else None  # type: ignore

    def by_address(self, address: str) -> list[Sensor]:
        """Sensors whose attribute `address` is this IP address (plain-CoAP sensors of an
        insecure profile are known by nothing else)."""
        return [_sensor(r) for r in self._query(
            f"SELECT {_COLUMNS} FROM sensors WHERE json_extract(attributes, '$.address') = ?",
            (address,))]

    def current(self, serials: Sequence[int]) -> dict[int, tuple[Sensor, bytes]]:
        """These sensors as they are now (absent: removed), with their key fingerprints."""
        found: dict[int, tuple[Sensor, bytes]] = {}
        for start in range(0, len(serials), 500):  # SQLite's bound-parameter limit
            chunk = tuple(serials[start:start + 500])
            marks = ", ".join("?" * len(chunk))
            for row in self._query(f"SELECT {_COLUMNS}, fingerprint FROM sensors "
                                   f"WHERE serial IN ({marks})", chunk):
                sensor = _sensor(row[:-1])
                found[sensor.serial] = (sensor, bytes(row[-1]))  # type: ignore[arg-type]
        return found

    def follow(self, held: Sequence[tuple[Sensor, bytes]]) -> list[Sensor | None]:
        """Each held (sensor, key fingerprint) as the registry has it now: the sensor as it
        is now while it keeps that key; None once it was rekeyed or removed."""
        current = self.current([sensor.serial for sensor, _ in held])
        now = [current.get(sensor.serial) for sensor, _ in held]
        return [found[0] if found is not None and found[1] == fingerprint else None
                for found, (_, fingerprint) in zip(now, held, strict=True)]

    def credential(self, sensor: Sensor) -> creds.Credential:
        rows = self._query("SELECT credential FROM sensors WHERE serial = ?", (sensor.serial,))
        if not rows:
            raise SensorNotFound(f"no sensor {sensor.id}")
        sealed = bytes(rows[0][0])  # type: ignore[arg-type]
        return creds.decode(self._cipher.open(sensor.id, CREDENTIAL, sealed),
                            f"sensor {sensor.name}")

    def counts(self) -> dict[str, int]:
        found: dict[Any, Any] = dict(self._query("SELECT status, COUNT(*) FROM sensors "
                                                 "GROUP BY status"))
        return {status: int(found.get(status, 0)) for status in STATUSES}

    # --- OSCORE replay state and traffic counters -------------------------------------

    def oscore_state(self, serial: int) -> tuple[int, str | None] | None:
        """(next sequence number to send, replay window JSON or None if unknown), or None
        for a context never used."""
        rows = self._query("SELECT next_to_send, window FROM oscore_state WHERE serial = ?",
                           (serial,))
        return (int(rows[0][0]), rows[0][1]) if rows else None  # type: ignore[arg-type]

    def save_oscore_state(self, states: Sequence[tuple[int, int, str | None]]) -> None:
        """(serial, next_to_send, window) for each; one transaction, durable on return."""
        with self._transaction() as db:
            # A sensor removed meanwhile keeps no state.
            db.executemany("INSERT INTO oscore_state (serial, next_to_send, window) "
                           "SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM sensors WHERE "
                           "serial = ?1) ON CONFLICT (serial) DO UPDATE SET "
                           "next_to_send = excluded.next_to_send, window = excluded.window",
                           states)

    def add_traffic(self, deltas: Sequence[tuple[int, int, int, int, str | None]]) -> None:
        """(serial, messages, denials, auth failures, last seen) added in one transaction."""
        with self._transaction() as db:
            db.executemany("UPDATE sensors SET messages = messages + ?, denials = denials + ?, "
                           "auth_failures = auth_failures + ?, "
                           "last_seen = COALESCE(?, last_seen) WHERE serial = ?",
                           [(m, d, a, seen, serial) for serial, m, d, a, seen in deltas])

    # --- adding ------------------------------------------------------------------------

    def add(self, sensors: Sequence[NewSensor], now: str
            ) -> list[tuple[Sensor, creds.Credential]]:
        """Mint a credential for each; all are added or none (one transaction)."""
        for new in sensors:
            problem = new.problem()
            if problem is not None:
                raise SensorError(f"sensor {new.name!r}: {problem}")
        with self._transaction() as db:
            # Once per call, not per sensor: a batch of 10,000 names the same key.
            gateway = self._gateway_edhoc(db) \
                if any(new.transport == "edhoc" for new in sensors) else None
            added = []
            for new in sensors:
                serial = self._next_serial(db)
                sid = sensor_id(self.registry_id, serial)
                credential = creds.mint(new.transport, self._free_kid(db, new.transport, serial),
                                        gateway)
                added.append(self._insert(db, serial, sid, new.name, new.profile,
                                          new.attributes, credential, now))
            return added

    def import_sensors(self, sensors: Sequence[ImportedSensor], now: str) -> list[Sensor]:
        """Factory-keyed sensors (already checked line by line); refused whole when one
        collides with the registry, naming the line."""
        with self._transaction() as db:
            problems = []
            for imported in sensors:
                cred = imported.credential
                for what, sql, args in (
                        ("name", "SELECT name FROM sensors WHERE name = ?", (imported.name,)),
                        ("sender_id/psk_identity", "SELECT name FROM sensors WHERE "
                         "transport = ? AND kid = ?", (cred.transport, cred.kid)),
                        ("key", "SELECT name FROM sensors WHERE fingerprint = ?",
                         (self._cipher.fingerprint(cred.secret),))):
                    row = db.execute(sql, args).fetchone()
                    if row is not None:
                        problems.append(f"{imported.where}: {what}: already used by sensor "
                                        f"{row[0]}")
            if problems:
                raise ImportRefused(f"{len(problems)} sensor(s) collide with the registry; "
                                    "nothing was imported", problems)
            added = []
            for imported in sensors:
                serial = self._next_serial(db)
                sensor, _ = self._insert(db, serial, sensor_id(self.registry_id, serial),
                                         imported.name, imported.profile, imported.attributes,
                                         imported.credential, now)
                added.append(sensor)
            return added

    @staticmethod
    def _next_serial(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'sensors'").fetchone()
        return (int(row[0]) if row else 0) + 1

    @staticmethod
    def _free_kid(db: sqlite3.Connection, transport: str, serial: int) -> bytes:
        kid = creds.psk_identity(serial) if transport == "dtls-psk" else \
            creds.sensor_sender_id(serial)
        # An imported OSCORE Sender ID may already hold the serial's form: draw another.
        # (Imported PSK identities cannot: the minted prefix is reserved.)
        while transport != "dtls-psk" and db.execute(
                "SELECT 1 FROM sensors WHERE transport = ? AND kid = ?",
                (transport, kid)).fetchone() is not None:
            kid = secrets.token_bytes(creds.MAX_OSCORE_ID)
        return kid

    def _gateway_edhoc(self, db: sqlite3.Connection) -> bytes:
        """The gateway's EDHOC credential (CCS), which every EDHOC credential names."""
        return creds.edhoc_ccs(self._edhoc_key(db), creds.GATEWAY_SENDER_ID)

    def _edhoc_key(self, db: sqlite3.Connection) -> SecretBytes:
        row = db.execute("SELECT value FROM registry WHERE key = 'edhoc_key'").fetchone()
        if row is None:
            key = creds.p256_private_key()
            db.execute("INSERT INTO registry (key, value) VALUES ('edhoc_key', ?)",
                       (self._cipher.seal(self.registry_id, EDHOC_KEY,
                                          key.reveal()).hex(),))
            return key
        return SecretBytes(self._cipher.open(self.registry_id, EDHOC_KEY,
                                             bytes.fromhex(row[0])))

    def gateway_edhoc_key(self) -> tuple[SecretBytes, bytes]:
        """The gateway's static EDHOC key and its credential (CCS), made on first use and
        kept sealed in the registry like the sensors' credentials."""
        with self._transaction() as db:
            key = self._edhoc_key(db)
        return key, creds.edhoc_ccs(key, creds.GATEWAY_SENDER_ID)

    def _insert(self, db: sqlite3.Connection, serial: int, sid: str, name: str, profile: str,
                attributes: dict[str, str], credential: creds.Credential, now: str
                ) -> tuple[Sensor, creds.Credential]:
        sealed = self._cipher.seal(sid, CREDENTIAL, creds.encode(credential))
        try:
            db.execute("INSERT INTO sensors (serial, id, name, profile, transport, kid, status, "
                       "attributes, credential, fingerprint, created_at, updated_at) VALUES "
                       "(?, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?)",
                       (serial, sid, name, profile, credential.transport, credential.kid,
                        json.dumps(attributes, sort_keys=True), sealed,
                        self._cipher.fingerprint(credential.secret), now, now))
        except sqlite3.IntegrityError as e:
            which = "name" if "name" in str(e) else "key or identifier"
            raise SensorError(f"sensor {name!r}: its {which} is already in the registry",
                              "choose another name" if which == "name" else None) from None
        return Sensor(serial, sid, name, profile, credential.transport, "active",
                      credential.kid, dict(attributes), None, now, now), credential

    # --- changing ----------------------------------------------------------------------

    def set_status(self, ref: str, status: str, reason: str | None, now: str) -> Sensor:
        if status not in STATUSES:
            raise SensorError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
        sensor = self.get(ref)
        if sensor.status == "revoked" and status != "revoked":
            raise SensorError(f"sensor {sensor.name} is revoked; a revoked credential is not "
                              "used again", "rekey it (devidctl sensors rekey) to onboard "
                              "it with a new credential")
        with self._transaction() as db:
            db.execute("UPDATE sensors SET status = ?, status_reason = ?, updated_at = ? "
                       "WHERE serial = ?", (status, reason, now, sensor.serial))
        return self.get(sensor.id)

    def rekey(self, ref: str, now: str) -> tuple[Sensor, creds.Credential]:
        """A fresh key under the same identifier; the sensor becomes active again."""
        sensor = self.get(ref)
        credential = self.fresh_credential(sensor)
        return self.replace_credential(sensor, credential, now), credential

    def fresh_credential(self, sensor: Sensor) -> creds.Credential:
        """A new credential for `sensor` under its identifier, not yet in force (LwM2M
        bootstrap writes it to the sensor first; `replace_credential` puts it in force)."""
        with self._transaction() as db:
            gateway = self._gateway_edhoc(db) if sensor.transport == "edhoc" else None
        return creds.mint(sensor.transport, sensor.kid, gateway)

    def replace_credential(self, sensor: Sensor, credential: creds.Credential, now: str
                           ) -> Sensor:
        """`credential` in force from now on; the old one is refused, the sensor active."""
        with self._transaction() as db:
            db.execute("UPDATE sensors SET credential = ?, fingerprint = ?, status = 'active', "
                       "status_reason = NULL, updated_at = ? WHERE serial = ?",
                       (self._cipher.seal(sensor.id, CREDENTIAL, creds.encode(credential)),
                        self._cipher.fingerprint(credential.secret), now, sensor.serial))
            # A new key starts a new OSCORE context: sequence numbers and window from zero.
            db.execute("DELETE FROM oscore_state WHERE serial = ?", (sensor.serial,))
        return self.get(sensor.id)

    def remove(self, ref: str) -> Sensor:
        sensor = self.get(ref)
        with self._transaction() as db:
            db.execute("DELETE FROM oscore_state WHERE serial = ?", (sensor.serial,))
            db.execute("DELETE FROM sensors WHERE serial = ?", (sensor.serial,))
        return sensor
