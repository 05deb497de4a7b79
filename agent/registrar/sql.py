"""The registrar's database connection: SQLite (the embedded default) or PostgreSQL
(the fleet backend, several replicas on one database), behind one narrow interface.

The store writes its SQL once, with `?` placeholders and types both understand
(upserts with ON CONFLICT, no rowid); this module adapts the rest: placeholder
style, column types in DDL, the schema version (PRAGMA user_version or a
one-row table), and what makes a write transaction exclusive. SQLite's BEGIN
IMMEDIATE lets one writer in at a time; on PostgreSQL every write transaction
takes the same transaction-scoped advisory lock first, so writers from all
replicas are serialized exactly the same way, and the store's race guarantees
(a challenge claimed once, a token consumed once) hold across replicas
unchanged. Reads take no lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from agent.errors import StateError
from agent.sqlite import Database

# pg_advisory_xact_lock key: "devid" + registrar writes (any 64-bit number, fixed).
WRITE_LOCK = 0x6465766964_0001


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor: ...


class Connection(Protocol):
    where: str  # for messages: a file path or host/database, never a password

    def transaction(self) -> Any: ...  # a context manager yielding a Tx

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]: ...

    def table_exists(self, tx: Tx, name: str) -> bool: ...

    def schema_version(self, tx: Tx) -> int: ...

    def set_schema_version(self, tx: Tx, version: int) -> None: ...

    def create(self, tx: Tx, schema: str) -> None: ...

    def close(self) -> None: ...


class SqliteConnection(Database):
    def __init__(self, path: Path) -> None:
        super().__init__(path, "the registrar")
        self.where = str(path)

    def transaction(self) -> Any:
        return self._transaction()

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        return self._query(sql, args)

    def table_exists(self, tx: Tx, name: str) -> bool:
        return tx.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                          (name,)).fetchone() is not None

    def schema_version(self, tx: Tx) -> int:
        return int(tx.execute("PRAGMA user_version").fetchone()[0])

    def set_schema_version(self, tx: Tx, version: int) -> None:
        tx.execute(f"PRAGMA user_version = {int(version)}")

    def create(self, tx: Tx, schema: str) -> None:
        self._create(tx, schema)  # type: ignore[arg-type]


class _PgTx:
    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        self._cursor.execute(sql.replace("?", "%s"), tuple(args))
        return self._cursor  # type: ignore[no-any-return]


class PostgresConnection:
    """One connection per process, used by one thread at a time (as SQLite's), re-made
    after the server closed it."""

    def __init__(self, conninfo: str, where: str) -> None:
        import psycopg  # the fleet backend only

        self._psycopg = psycopg
        self._conninfo, self.where = conninfo, where
        self._lock = threading.Lock()
        self._conn = self._connect()

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10)
        except self._psycopg.Error as e:
            raise StateError(f"PostgreSQL {self.where}: cannot connect: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else e}",
                             "check [database] url, that the server runs, and that this "
                             "user may connect") from None

    def _live(self) -> Any:
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock:
            conn = self._live()
            try:
                with conn.transaction(), conn.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    yield _PgTx(cursor)
            except self._psycopg.OperationalError as e:
                raise StateError(f"PostgreSQL {self.where}: {e}",
                                 "the database went away; the request was not applied") from None

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            conn = self._live()
            try:
                with conn.cursor() as cursor:
                    cursor.execute(sql.replace("?", "%s"), args)
                    return list(cursor.fetchall())
            except self._psycopg.OperationalError as e:
                raise StateError(f"PostgreSQL {self.where}: {e}") from None

    def table_exists(self, tx: Tx, name: str) -> bool:
        return tx.execute("SELECT to_regclass(?)", (name,)).fetchone()[0] is not None

    def schema_version(self, tx: Tx) -> int:
        tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = tx.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def set_schema_version(self, tx: Tx, version: int) -> None:
        tx.execute("DELETE FROM schema_version")
        tx.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def create(self, tx: Tx, schema: str) -> None:
        for statement in pg_ddl(schema).split(";"):
            if statement.strip():
                tx.execute(statement)

    def close(self) -> None:
        self._conn.close()


def pg_ddl(schema: str) -> str:
    """SQLite column types as PostgreSQL spells them."""
    return schema.replace(" BLOB", " BYTEA").replace(" REAL", " DOUBLE PRECISION")


def make_conninfo(url: str, password: str | None = None) -> str:
    from psycopg.conninfo import make_conninfo as make

    return make(url, password=password) if password is not None else url


def redact_url(url: str) -> str:
    """HOST:PORT/DATABASE of a database URL, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"
