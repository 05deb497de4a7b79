"""The audit log of registrar replicas that share PostgreSQL: the same hash-chained records
as agent/audit.py's file, kept as rows of one table.

An append reads the last record and inserts the next inside a write transaction,
under the advisory lock every write takes (agent/registrar/sql.py), so replicas on
any number of hosts extend one chain, in one order, with no gap and no fork.
`devid-registrar audit verify` walks it as it walks the file. What the file's head
guards against (records cut from the end) is for the database's own access control
here: whoever may delete rows may also rewrite a head row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from agent.audit import GENESIS, AuditVerdict, check_chain, encode_record, new_record
from agent.clock import Clock, utcnow
from agent.registrar.sql import Connection

TABLE = """
CREATE TABLE IF NOT EXISTS registrar_audit (
    seq BIGINT PRIMARY KEY,
    record TEXT NOT NULL
)"""


class DatabaseAuditLog:
    def __init__(self, connection: Connection, clock: Clock = utcnow) -> None:
        self._conn = connection
        self._clock = clock
        self.path = f"{connection.where} (table registrar_audit)"
        with self._conn.transaction() as tx:
            self._conn.create(tx, TABLE)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        with self._conn.transaction() as tx:
            last = tx.execute("SELECT seq, record FROM registrar_audit ORDER BY seq DESC "
                              "LIMIT 1").fetchone()
            seq, prev = (int(last[0]), str(json.loads(last[1])["hash"])) if last \
                else (0, GENESIS)
            record = new_record(seq + 1, self._clock().isoformat(timespec="seconds"), event,
                                fields, prev)
            tx.execute("INSERT INTO registrar_audit (seq, record) VALUES (?, ?)",
                       (record["seq"], encode_record(record).decode("ascii")))
        return record

    def _rows(self) -> list[str]:
        return [str(r[1]) for r in self._conn.query(
            "SELECT seq, record FROM registrar_audit ORDER BY seq")]

    def records(self) -> Iterator[dict[str, Any]]:
        for row in self._rows():
            try:
                record = json.loads(row)
            except ValueError:
                return
            if not isinstance(record, dict):
                return
            yield record

    def verify(self) -> AuditVerdict:
        verdict, _ = check_chain((row.encode() for row in self._rows()), "row")
        return verdict

    def close(self) -> None:
        self._conn.close()
