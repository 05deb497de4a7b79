"""The registrar's database: SQLite in WAL mode (one registrar) or PostgreSQL (replicas),
safe across threads, processes and replicas (agent/registrar/sql.py).

Tables: devices, challenges (enrollment), device_challenges (sealed renewal
and decommissioning challenges once answered: their single use), certificates
(every certificate issued, for the CRL), tokens. State changes that must not
race (claim a challenge, consume a token, record a device) run in write
transactions that admit one writer at a time (BEGIN IMMEDIATE; on PostgreSQL
an advisory lock), so two concurrent requests can never both use one
challenge or one token. Challenge secrets are wiped as soon as the challenge
is settled.

The schema version is PRAGMA user_version (a schema_version table on
PostgreSQL); `_migrate` upgrades older databases in one transaction.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.clock import isoformat_utc
from agent.enroll.problems import problem
from agent.errors import StateError
from agent.registrar.sql import Connection, SqliteConnection, Tx

SCHEMA_VERSION = 3
DEVICE_STATUSES = ("active", "revoked", "decommissioned")
DEVICES_TABLE = """
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    ek_certificate BLOB NOT NULL,
    ak_name BLOB NOT NULL,
    identity_public BLOB NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked', 'decommissioned')),
    tpm_manufacturer TEXT,
    enrolled_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    enrollments INTEGER NOT NULL DEFAULT 1,
    cert_serial TEXT NOT NULL,
    cert_not_after TEXT NOT NULL,
    renewals INTEGER NOT NULL DEFAULT 0,
    status_reason TEXT,
    platform TEXT
)"""
SCHEMA = """
CREATE TABLE IF NOT EXISTS challenges (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    ek_certificate BLOB NOT NULL,
    ak_public BLOB NOT NULL,
    secret BLOB,
    nonce BLOB NOT NULL UNIQUE,
    token_hash TEXT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'claimed', 'completed', 'failed'))
);
CREATE INDEX IF NOT EXISTS challenges_pending ON challenges (state, expires_at);
CREATE TABLE IF NOT EXISTS device_challenges (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    purpose TEXT NOT NULL CHECK (purpose IN ('renew', 'decommission')),
    nonce BLOB NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'claimed', 'completed', 'failed'))
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('identity', 'tls')),
    issued_at REAL NOT NULL,
    not_after REAL NOT NULL,
    revoked_at REAL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS certificates_device ON certificates (device_id);
CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates (revoked_at, not_after);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    label TEXT,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    used_by TEXT
);
"""


@dataclass(frozen=True)
class ChallengeRow:
    id: str
    device_id: str
    ek_certificate: bytes
    ak_public: bytes
    secret: bytes
    nonce: bytes
    token_hash: str | None
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class DeviceChallengeRow:
    """A nonce for one signed request by an enrolled device (renew or decommission)."""

    id: str
    device_id: str
    purpose: str
    nonce: bytes
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class Enrolled:
    enrollments: int  # how many times this device has enrolled, this one included
    superseded: list[str]  # serials of its earlier certificates, revoked now


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    ek_certificate: bytes
    ak_name: bytes
    identity_public: bytes
    status: str
    tpm_manufacturer: str | None
    enrolled_at: str
    updated_at: str
    enrollments: int
    cert_serial: str
    cert_not_after: str
    renewals: int = 0
    status_reason: str | None = None
    # The device's own word on its make, model, serial and firmware (JSON of
    # agent.enroll.messages.Platform), as its last enrollment or renewal stated it.
    platform: str | None = None

    def summary(self) -> dict[str, object]:
        return {"device_id": self.device_id, "status": self.status,
                "status_reason": self.status_reason,
                "tpm_manufacturer": self.tpm_manufacturer, "enrolled_at": self.enrolled_at,
                "updated_at": self.updated_at, "enrollments": self.enrollments,
                "renewals": self.renewals, "cert_serial": self.cert_serial,
                "cert_not_after": self.cert_not_after,
                "platform": None if self.platform is None else {
                    **json.loads(self.platform), "asserted_by": "device"}}


@dataclass(frozen=True)
class IssuedCertificate:
    serial: str  # hex, as in the certificate
    device_id: str
    kind: str  # identity | tls
    issued_at: float
    not_after: float
    revoked_at: float | None = None
    reason: str | None = None


class Store:
    """The registrar's state over a Connection (agent/registrar/sql.py): a Path opens the
    embedded SQLite file; PostgreSQL connections come from `open_store`."""

    def __init__(self, connection: Connection | Path) -> None:
        self._conn: Connection = SqliteConnection(connection) \
            if isinstance(connection, Path) else connection
        self.where = self._conn.where
        self._migrate()

    def close(self) -> None:
        self._conn.close()

    def _transaction(self) -> Any:
        return self._conn.transaction()

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        return self._conn.query(sql, args)

    def _migrate(self) -> None:
        with self._transaction() as db:
            version = self._conn.schema_version(db)
            if version > SCHEMA_VERSION:
                raise StateError(f"{self.where}: schema version {version} is newer than this "
                                 f"devid-registrar ({SCHEMA_VERSION})", "upgrade devid-registrar")
            has_devices = self._conn.table_exists(db, "devices")
            if not has_devices:
                self._conn.create(db, DEVICES_TABLE)
            elif version < 2:
                # v1 -> v2 (SQLite only: PostgreSQL starts at v3): more device statuses (a
                # CHECK change needs a table rebuild), renewal counter, status reason; the
                # current certificates are recorded.
                db.execute(DEVICES_TABLE.replace("TABLE devices", "TABLE devices_v2"))
                db.execute(f"INSERT INTO devices_v2 ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} "
                           "FROM devices")
                db.execute("DROP TABLE devices")
                db.execute("ALTER TABLE devices_v2 RENAME TO devices")
            elif version < 3:
                db.execute("ALTER TABLE devices ADD COLUMN platform TEXT")  # v2 -> v3
            self._conn.create(db, SCHEMA)
            if has_devices and version < 2:
                for device_id, serial, not_after in db.execute(
                        "SELECT device_id, cert_serial, cert_not_after FROM devices").fetchall():
                    stamp = datetime.datetime.fromisoformat(not_after).timestamp()
                    db.execute("INSERT INTO certificates (serial, device_id, kind, issued_at, "
                               "not_after) VALUES (?, ?, 'identity', ?, ?) "
                               "ON CONFLICT (serial) DO NOTHING",
                               (serial, device_id, stamp, stamp))
            self._conn.set_schema_version(db, SCHEMA_VERSION)

    # --- tokens ------------------------------------------------------------

    def add_token(self, token_hash: str, label: str | None, created: float,
                  expires: float) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO tokens (hash, label, created_at, expires_at) "
                       "VALUES (?, ?, ?, ?)", (token_hash, label, created, expires))

    def check_token(self, token_hash: str, now: float) -> None:
        """Raise the right Problem unless the token exists, is unexpired and unused."""
        rows = self._query("SELECT expires_at, used_at FROM tokens WHERE hash = ?",
                           (token_hash,))
        if not rows:
            raise problem("token-invalid", "token: not issued by this registrar")
        expires_at, used_at = rows[0]
        if used_at is not None:
            raise problem("token-used", "token: already used for an enrollment")
        if float(expires_at) <= now:  # type: ignore[arg-type]
            raise problem("token-invalid", "token: expired")

    # --- enrollment challenges -------------------------------------------------

    def pending_challenges(self, now: float) -> int:
        """Open enrollment challenges (device challenges are sealed, not stored)."""
        rows = self._query("SELECT count(*) FROM challenges WHERE state = 'pending' "
                           "AND expires_at > ?", (now,))
        return int(rows[0][0])  # type: ignore[call-overload]

    def add_challenge(self, row: ChallengeRow, keep_per_device: int = 2) -> None:
        """Record an enrollment challenge. A device has at most `keep_per_device` open:
        a new one replaces the oldest, so one EK cannot fill the pending pool."""
        with self._transaction() as db:
            # Prune challenges expired for an hour; the audit log keeps the history.
            db.execute("DELETE FROM challenges WHERE expires_at < ?", (row.created_at - 3600,))
            db.execute(
                "INSERT INTO challenges (id, device_id, ek_certificate, ak_public, secret, nonce, "
                "token_hash, created_at, expires_at, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                (row.id, row.device_id, row.ek_certificate, row.ak_public, row.secret, row.nonce,
                 row.token_hash, row.created_at, row.expires_at))
            # The new one always stays; of the others the newest keep_per_device - 1.
            db.execute(
                "UPDATE challenges SET state = 'failed', secret = NULL WHERE id IN ("
                "SELECT id FROM challenges WHERE device_id = ? AND state = 'pending' "
                "AND id <> ? ORDER BY created_at DESC, id DESC LIMIT 1000000000 OFFSET ?)",
                (row.device_id, row.id, keep_per_device - 1))

    def claim_challenge(self, challenge_id: str, now: float) -> ChallengeRow:
        """Take a pending challenge for one completion attempt; single use."""
        with self._transaction() as db:
            found = db.execute(
                "SELECT id, device_id, ek_certificate, ak_public, secret, nonce, token_hash, "
                "created_at, expires_at, state FROM challenges WHERE id = ?",
                (challenge_id,)).fetchone()
            *fields, _ = _claimable(found, challenge_id, now, db)
        return ChallengeRow(*fields)

    def fail_challenge(self, challenge_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE challenges SET state = 'failed', secret = NULL WHERE id = ?",
                       (challenge_id,))

    # --- device challenges (renewal, decommissioning) -----------------------------

    def spend_device_challenge(self, row: DeviceChallengeRow) -> None:
        """Record a sealed device challenge as answered (state 'claimed'); challenge-used if
        it already was. Only a request the device's identity key signed gets here, so
        rows grow with honest renewals, never with anonymous requests."""
        with self._transaction() as db:
            db.execute("DELETE FROM device_challenges WHERE expires_at < ?",
                       (row.created_at - 3600,))
            spent = db.execute("SELECT state FROM device_challenges WHERE id = ?",
                               (row.id,)).fetchone()
            if spent is not None:
                raise problem("challenge-used", f"challenge {row.id!r} was already answered "
                                                f"({spent[0]})")
            db.execute("INSERT INTO device_challenges (id, device_id, purpose, nonce, "
                       "created_at, expires_at, state) VALUES (?, ?, ?, ?, ?, ?, 'claimed')",
                       (row.id, row.device_id, row.purpose, row.nonce, row.created_at,
                        row.expires_at))

    def settle_device_challenge(self, challenge_id: str, state: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE device_challenges SET state = ? WHERE id = ?",
                       (state, challenge_id))

    # --- devices -----------------------------------------------------------

    def device(self, device_id: str) -> DeviceRow | None:
        rows = self._query(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?",
                           (device_id,))
        return DeviceRow(*rows[0]) if rows else None  # type: ignore[arg-type]

    def devices(self) -> list[DeviceRow]:
        rows = self._query(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY enrolled_at")
        return [DeviceRow(*r) for r in rows]  # type: ignore[arg-type]

    def complete_enrollment(self, challenge: ChallengeRow, device: DeviceRow,
                            certificate: IssuedCertificate, now: float) -> Enrolled:
        """Consume the token, record the device and its certificate and settle the
        challenge, all or nothing. Enrolling again supersedes the device's earlier
        certificates: their keys can no longer renew, so they go on the CRL."""
        with self._transaction() as db:
            if challenge.token_hash is not None:
                used = db.execute(
                    "UPDATE tokens SET used_at = ?, used_by = ? WHERE hash = ? "
                    "AND used_at IS NULL", (now, device.device_id, challenge.token_hash))
                if used.rowcount != 1:
                    raise problem("token-used", "token: used by another enrollment meanwhile")
            existing = db.execute("SELECT status, enrollments FROM devices WHERE device_id = ?",
                                  (device.device_id,)).fetchone()
            if existing is not None and existing[0] == "revoked":
                raise problem("device-revoked", f"{device.device_id} is revoked")
            count = 1 if existing is None else int(existing[1]) + 1
            superseded = _revoke_certificates(db, device.device_id, "superseded", now)
            # Enrolling again keeps enrolled_at and starts the renewal count afresh.
            db.execute(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, NULL, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in _UPSERTED),
                (device.device_id, device.ek_certificate, device.ak_name,
                 device.identity_public, "active", device.tpm_manufacturer,
                 device.enrolled_at, device.updated_at, count, device.cert_serial,
                 device.cert_not_after, device.platform))
            _record(db, certificate)
            db.execute("UPDATE challenges SET state = 'completed', secret = NULL WHERE id = ?",
                       (challenge.id,))
        return Enrolled(count, superseded)

    def record_renewal(self, challenge_id: str, device_id: str,
                       certificates: list[IssuedCertificate], updated_at: str,
                       platform: str | None = None) -> int:
        """Record renewed certificates, unless the device was revoked meanwhile.
        Returns the device's renewal count."""
        identity = next(c for c in certificates if c.kind == "identity")
        with self._transaction() as db:
            status = db.execute("SELECT status FROM devices WHERE device_id = ?",
                                (device_id,)).fetchone()
            if status is None or status[0] != "active":
                raise problem("device-revoked", f"{device_id} was revoked during the renewal")
            for cert in certificates:
                _record(db, cert)
            db.execute("UPDATE devices SET renewals = renewals + 1, cert_serial = ?, "
                       "cert_not_after = ?, updated_at = ?, platform = ? WHERE device_id = ?",
                       (identity.serial, isoformat_utc(identity.not_after), updated_at,
                        platform, device_id))
            db.execute("UPDATE device_challenges SET state = 'completed' WHERE id = ?",
                       (challenge_id,))
            return int(db.execute("SELECT renewals FROM devices WHERE device_id = ?",
                                  (device_id,)).fetchone()[0])

    def retire_device(self, device_id: str, status: str, reason: str, now: float) -> list[str]:
        """Set a device revoked or decommissioned and revoke its unexpired certificates.

        Returns the serials revoked now (empty if the device had none left)."""
        assert status in DEVICE_STATUSES and status != "active"
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE devices SET status = ?, status_reason = ?, updated_at = ? "
                "WHERE device_id = ?", (status, reason, isoformat_utc(now), device_id)).rowcount
            if changed != 1:
                raise problem("device-unknown", f"{device_id}: no such device")
            return _revoke_certificates(db, device_id, status, now)

    # --- certificates ------------------------------------------------------

    def revoked_certificates(self, now: float) -> list[IssuedCertificate]:
        """Revoked certificates that have not expired yet: the CRL's entries."""
        rows = self._query("SELECT serial, device_id, kind, issued_at, not_after, revoked_at, "
                           "reason FROM certificates WHERE revoked_at IS NOT NULL "
                           "AND not_after > ? ORDER BY revoked_at", (now,))
        return [IssuedCertificate(*r) for r in rows]  # type: ignore[arg-type]

    def renewals_since(self, device_id: str, since: float) -> list[float]:
        """When the device renewed (a TLS certificate was issued) after `since`, oldest
        first. Enrollment issues only an identity certificate, so it is not counted."""
        rows = self._query("SELECT issued_at FROM certificates WHERE device_id = ? AND "
                           "kind = 'tls' AND issued_at > ? ORDER BY issued_at",
                           (device_id, since))
        return [float(r[0]) for r in rows]  # type: ignore[arg-type]

    def certificates_of(self, device_id: str) -> list[IssuedCertificate]:
        rows = self._query("SELECT serial, device_id, kind, issued_at, not_after, revoked_at, "
                           "reason FROM certificates WHERE device_id = ? ORDER BY issued_at",
                           (device_id,))
        return [IssuedCertificate(*r) for r in rows]  # type: ignore[arg-type]


def _claimable(found: tuple[object, ...] | None, challenge_id: str, now: float,
               db: Tx) -> tuple[object, ...]:
    """Check a fetched enrollment challenge row (state last, expires_at before it) and
    mark it claimed."""
    if found is None:
        raise problem("challenge-unknown", f"challenge {challenge_id!r} does not exist")
    state, expires_at = found[-1], float(found[-2])  # type: ignore[arg-type]
    if state != "pending":
        raise problem("challenge-used",
                      f"challenge {challenge_id!r} was already answered ({state})")
    if expires_at <= now:
        db.execute("UPDATE challenges SET state = 'failed', secret = NULL WHERE id = ?",
                   (challenge_id,))
        raise problem("challenge-expired", f"challenge {challenge_id!r} expired "
                                           f"{now - expires_at:.0f}s ago")
    db.execute("UPDATE challenges SET state = 'claimed' WHERE id = ?", (challenge_id,))
    return found


def _revoke_certificates(db: Tx, device_id: str, reason: str,
                         now: float) -> list[str]:
    """Put a device's unexpired certificates on the CRL; the serials revoked now."""
    serials = [str(r[0]) for r in db.execute(
        "SELECT serial FROM certificates WHERE device_id = ? AND revoked_at IS NULL "
        "AND not_after > ?", (device_id, now)).fetchall()]
    db.execute("UPDATE certificates SET revoked_at = ?, reason = ? WHERE device_id = ? "
               "AND revoked_at IS NULL AND not_after > ?", (now, reason, device_id, now))
    return serials


def _record(db: Tx, cert: IssuedCertificate) -> None:
    db.execute("INSERT INTO certificates (serial, device_id, kind, issued_at, not_after) "
               "VALUES (?, ?, ?, ?, ?)",
               (cert.serial, cert.device_id, cert.kind, cert.issued_at, cert.not_after))




_V1_COLUMNS = ("device_id, ek_certificate, ak_name, identity_public, status, "
               "tpm_manufacturer, enrolled_at, updated_at, enrollments, cert_serial, "
               "cert_not_after")
_DEVICE_COLUMNS = _V1_COLUMNS + ", renewals, status_reason, platform"
_UPSERTED = [c.strip() for c in _DEVICE_COLUMNS.split(",")
             if c.strip() not in ("device_id", "enrolled_at")]
