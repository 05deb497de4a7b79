"""The registrar's database: SQLite in WAL mode, safe across threads and processes.

Tables: devices, challenges, tokens. State changes that must not race (claim
a challenge, consume a token, record a device) run in BEGIN IMMEDIATE
transactions, so two concurrent requests can never both use one challenge or
one token. Challenge secrets are wiped as soon as the challenge is settled.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.enroll.problems import problem

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    ek_certificate BLOB NOT NULL,
    ak_name BLOB NOT NULL,
    identity_public BLOB NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    tpm_manufacturer TEXT,
    enrolled_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    enrollments INTEGER NOT NULL DEFAULT 1,
    cert_serial TEXT NOT NULL,
    cert_not_after TEXT NOT NULL
);
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

    def summary(self) -> dict[str, object]:
        return {"device_id": self.device_id, "status": self.status,
                "tpm_manufacturer": self.tpm_manufacturer, "enrolled_at": self.enrolled_at,
                "updated_at": self.updated_at, "enrollments": self.enrollments,
                "cert_serial": self.cert_serial, "cert_not_after": self.cert_not_after}


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=10.0)
        path.chmod(0o600)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

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

    # --- challenges ----------------------------------------------------------

    def pending_challenges(self, now: float) -> int:
        rows = self._query("SELECT count(*) FROM challenges WHERE state = 'pending' "
                           "AND expires_at > ?", (now,))
        return int(rows[0][0])  # type: ignore[call-overload]

    def add_challenge(self, row: ChallengeRow) -> None:
        with self._transaction() as db:
            # Prune challenges expired for an hour; the audit log keeps the history.
            db.execute("DELETE FROM challenges WHERE expires_at < ?", (row.created_at - 3600,))
            db.execute(
                "INSERT INTO challenges (id, device_id, ek_certificate, ak_public, secret, nonce, "
                "token_hash, created_at, expires_at, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                (row.id, row.device_id, row.ek_certificate, row.ak_public, row.secret, row.nonce,
                 row.token_hash, row.created_at, row.expires_at))

    def claim_challenge(self, challenge_id: str, now: float) -> ChallengeRow:
        """Take a pending challenge for one completion attempt; single use."""
        with self._transaction() as db:
            found = db.execute(
                "SELECT id, device_id, ek_certificate, ak_public, secret, nonce, token_hash, "
                "created_at, expires_at, state FROM challenges WHERE id = ?",
                (challenge_id,)).fetchone()
            if found is None:
                raise problem("challenge-unknown", f"challenge {challenge_id!r} does not exist")
            *fields, state = found
            if state != "pending":
                raise problem("challenge-used",
                              f"challenge {challenge_id!r} was already answered ({state})")
            row = ChallengeRow(*fields)
            if row.expires_at <= now:
                db.execute("UPDATE challenges SET state = 'failed', secret = NULL WHERE id = ?",
                           (challenge_id,))
                raise problem("challenge-expired", f"challenge {challenge_id!r} expired "
                                                   f"{now - row.expires_at:.0f}s ago")
            db.execute("UPDATE challenges SET state = 'claimed' WHERE id = ?", (challenge_id,))
        return row

    def fail_challenge(self, challenge_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE challenges SET state = 'failed', secret = NULL WHERE id = ?",
                       (challenge_id,))

    # --- devices -----------------------------------------------------------

    def device(self, device_id: str) -> DeviceRow | None:
        rows = self._query(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?",
                           (device_id,))
        return DeviceRow(*rows[0]) if rows else None  # type: ignore[arg-type]

    def devices(self) -> list[DeviceRow]:
        rows = self._query(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY enrolled_at")
        return [DeviceRow(*r) for r in rows]  # type: ignore[arg-type]

    def complete_enrollment(self, challenge: ChallengeRow, device: DeviceRow, now: float) -> int:
        """Consume the token, record the device and settle the challenge, all or nothing.

        Returns how many times this device has enrolled.
        """
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
            db.execute(
                f"INSERT OR REPLACE INTO devices ({_DEVICE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, COALESCE((SELECT enrolled_at FROM devices "
                "WHERE device_id = ?), ?), ?, ?, ?, ?)",
                (device.device_id, device.ek_certificate, device.ak_name,
                 device.identity_public, "active", device.tpm_manufacturer, device.device_id,
                 device.enrolled_at, device.updated_at, count, device.cert_serial,
                 device.cert_not_after))
            db.execute("UPDATE challenges SET state = 'completed', secret = NULL WHERE id = ?",
                       (challenge.id,))
        return count

    def set_device_status(self, device_id: str, status: str) -> bool:
        with self._transaction() as db:
            return db.execute("UPDATE devices SET status = ? WHERE device_id = ?",
                              (status, device_id)).rowcount == 1


_DEVICE_COLUMNS = ("device_id, ek_certificate, ak_name, identity_public, status, "
                   "tpm_manufacturer, enrolled_at, updated_at, enrollments, cert_serial, "
                   "cert_not_after")
