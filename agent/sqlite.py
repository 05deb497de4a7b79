"""SQLite as the registrar and the broker use it: WAL, full sync, 0600, one lock.

State changes that must not race run in BEGIN IMMEDIATE transactions
(`_transaction`); the schema version is PRAGMA user_version, which each
store's `_migrate` reads with `_schema_version` and upgrades in one
transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.errors import StateError


class Database:
    def __init__(self, path: Path, owner: str) -> None:
        """`owner` names the program in messages: "the registrar", "the broker"."""
        self.path, self._owner = path, owner
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                       timeout=10.0)
            path.chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            raise StateError(f"{path}: cannot open the database: {e}",
                             f"check that {owner}'s directory is writable by this user "
                             "and the disk is not full") from None
        self._lock = threading.Lock()

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

    @staticmethod
    def _create(db: sqlite3.Connection, schema: str) -> None:
        """`schema`'s statements (CREATE ... IF NOT EXISTS) inside the caller's transaction:
        sqlite3's executescript would commit it first."""
        for statement in schema.split(";"):
            if statement.strip():
                db.execute(statement)

    def _schema_version(self, db: sqlite3.Connection, supported: int, program: str) -> int:
        """The file's schema version; StateError if it is newer than this code knows."""
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > supported:
            raise StateError(f"{self.path}: schema version {version} is newer than this "
                             f"{program} ({supported})", f"upgrade {program}")
        return version
