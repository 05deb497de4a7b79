"""Store and forward: telemetry accepted while its upstream is unreachable.

For rules marked `spool = true`, a request the upstream cannot take (it is
down, refuses the connection, or the connection breaks) is written to
`spool.db` in the broker's state directory. The sensor hears 2.04 only once
the write is durable (SQLite, synchronous=FULL), so nothing acknowledged to
a sensor is lost, even across a SIGKILL. While a sensor has messages waiting
for an upstream, its new ones queue behind them, so that each sensor's
messages arrive in order. A full spool is refused with 5.03 and a Max-Age
(backpressure), never dropped silently.

A delivery task sends the oldest waiting message of each upstream first. It
deletes each one once the upstream has taken it, and backs off while the
upstream is still down. Delivery is at least once: a message whose answer
was lost in a crash is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.aio import first_of
from agent.backoff import Backoff
from agent.broker.upstream import Forward, Reply, Upstream
from agent.errors import UpstreamError
from agent.sensors.model import Sensor
from agent.sqlite import Database

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    upstream TEXT NOT NULL,
    sensor_serial INTEGER NOT NULL,
    sensor_id TEXT NOT NULL,
    sensor_name TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    payload BLOB NOT NULL,
    content_format INTEGER,
    accepted_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS spool_by_upstream ON spool (upstream, seq);
"""
_COLUMNS = "seq, upstream, sensor_serial, sensor_id, sensor_name, method, path, payload, " \
           "content_format, accepted_at"


class SpoolFull(Exception):
    """The spool holds its maximum; the sensor is told to come back later (5.03)."""


@dataclass(frozen=True)
class Spooled:
    seq: int
    upstream: str
    forward: Forward
    accepted_at: float


class SpoolStore(Database):
    def __init__(self, path: Path, max_messages: int, max_bytes: int) -> None:
        super().__init__(path, "the broker")
        self.max_messages, self.max_bytes = max_messages, max_bytes
        with self._transaction() as db:
            self._schema_version(db, SCHEMA_VERSION, "devid-broker")
            self._create(db, SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        rows = self._query("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM spool")
        self.count, self.bytes = int(rows[0][0]), int(rows[0][1])  # type: ignore[arg-type]
        # (upstream, sensor serial) pairs with messages waiting: their next ones queue too.
        self.waiting: dict[tuple[str, int], int] = {}
        for upstream, serial, n in self._query(
                "SELECT upstream, sensor_serial, COUNT(*) FROM spool GROUP BY 1, 2"):
            self.waiting[(str(upstream), int(serial))] = int(n)  # type: ignore[arg-type]

    def append(self, upstream: str, request: Forward, now: float) -> int:
        """Durable on return; SpoolFull when it would pass a limit."""
        if self.count >= self.max_messages or \
                self.bytes + len(request.payload) > self.max_bytes:
            raise SpoolFull(f"the spool holds {self.count} messages, {self.bytes} bytes")
        sensor = request.sensor
        with self._transaction() as db:
            cursor = db.execute(
                f"INSERT INTO spool ({_COLUMNS}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (upstream, sensor.serial, sensor.id, sensor.name, request.method, request.path,
                 request.payload, request.content_format, now))
            seq = int(cursor.lastrowid or 0)
        self.count += 1
        self.bytes += len(request.payload)
        key = (upstream, sensor.serial)
        self.waiting[key] = self.waiting.get(key, 0) + 1
        return seq

    def oldest(self, upstream: str, limit: int) -> list[Spooled]:
        rows = self._query(f"SELECT {_COLUMNS} FROM spool WHERE upstream = ? ORDER BY seq "
                           "LIMIT ?", (upstream, limit))
        out = []
        for seq, up, serial, sid, name, method, path, payload, fmt, at in rows:
            # The sensor as it was when the message was accepted: authentic then.
            sensor = Sensor(int(serial), str(sid), str(name), "", "", "active", b"")  # type: ignore[arg-type]
            out.append(Spooled(int(seq), str(up), Forward(  # type: ignore[arg-type]
                sensor, str(method), str(path), bytes(payload),  # type: ignore[arg-type]
                None if fmt is None else int(fmt)), float(at)))  # type: ignore[arg-type]
        return out

    def delivered(self, item: Spooled) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM spool WHERE seq = ?", (item.seq,))
        self.count -= 1
        self.bytes -= len(item.forward.payload)
        key = (item.upstream, item.forward.sensor.serial)
        left = self.waiting.get(key, 1) - 1
        if left > 0:
            self.waiting[key] = left
        else:
            self.waiting.pop(key, None)

    def per_upstream(self) -> dict[str, int]:
        return {str(u): int(n) for u, n in self._query(  # type: ignore[call-overload]
            "SELECT upstream, COUNT(*) FROM spool GROUP BY upstream")}


class Spool:
    """The spool as the gateway and the delivery task use it."""

    name = "spool"

    def __init__(self, store: SpoolStore, upstreams: Mapping[str, Upstream],
                 retry_after: int = 30, clock: Callable[[], float] = time.time) -> None:
        self.store, self._upstreams, self._clock = store, upstreams, clock
        self.retry_after = retry_after  # the Max-Age of a 5.03 when full
        self._wake = asyncio.Event()
        self.delivered = 0
        self.refused_full = 0
        self.last_error: dict[str, str] = {}

    def behind(self, upstream: str, sensor: Sensor) -> bool:
        """True while this sensor has messages waiting for this upstream."""
        return (upstream, sensor.serial) in self.store.waiting

    async def accept(self, upstream: str, request: Forward) -> Reply:
        """Keep it for later; 2.04 once it is on disk, 5.03 with Max-Age when full."""
        try:
            await asyncio.to_thread(self.store.append, upstream, request, self._clock())
        except SpoolFull as e:
            self.refused_full += 1
            return Reply(0xA3, f"{e}; try again later".encode(), None, self.retry_after)
        self._wake.set()
        return Reply(68, b"spooled")

    async def run(self, stop: asyncio.Event) -> None:
        backoff = {name: Backoff(initial=1.0, cap=30.0) for name in self._upstreams}
        while not stop.is_set():
            self._wake.clear()  # before looking: what arrives from now on wakes the next round
            waits = []
            for name, upstream in self._upstreams.items():
                wait = await self._deliver(name, upstream, backoff[name])
                if wait is not None:
                    waits.append(wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first_of(stop, self._wake),
                                       min(waits) if waits else None)

    async def _deliver(self, name: str, upstream: Upstream, backoff: Backoff) -> float | None:
        """Send what waits for `name`, oldest first; the seconds to wait after a failure."""
        while True:
            batch = await asyncio.to_thread(self.store.oldest, name, 50)
            if not batch:
                backoff.reset()
                return None
            for item in batch:
                try:
                    reply = await asyncio.wait_for(upstream.forward(item.forward),
                                                   upstream.timeout)
                except (UpstreamError, TimeoutError) as e:
                    self.last_error[name] = getattr(e, "message", None) or "timed out"
                    return backoff.next_delay()
                if reply.code >= 0xA0:  # a 5.xx: the upstream is not taking it now
                    self.last_error[name] = f"answered {reply.code >> 5}.{reply.code & 31:02d}"
                    return backoff.next_delay()
                # Delivered (or refused for good with a 4.xx: it will never be taken).
                await asyncio.to_thread(self.store.delivered, item)
                self.delivered += 1
                self.last_error.pop(name, None)

    def status_section(self) -> dict[str, Any]:
        return {"messages": self.store.count, "bytes": self.store.bytes,
                "max_messages": self.store.max_messages, "max_bytes": self.store.max_bytes,
                "delivered": self.delivered, "refused_full": self.refused_full,
                "by_upstream": self.store.per_upstream(), "last_error": self.last_error}
