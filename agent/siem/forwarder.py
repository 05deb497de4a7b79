"""Events out of a daemon: the recent ones for `devidctl events`, and all of them to a
SIEM over TLS.

`EventTap` is a logging handler on the daemon's "agent" logger. It takes each
record that is an event (it has a journald MESSAGE_ID: agent/events.py),
numbers it, keeps the last `RECENT` for the control socket, and, when a SIEM
is configured, queues it for the `SiemSender`. Handing over never blocks and
never fails the code that logged: the queue is bounded, and when the
collector is away longer than it holds, the oldest events are dropped and
counted (`dropped` in the status; nothing else is lost silently).

`SiemSender` keeps one TLS connection to the collector, presenting the
gateway's certificate and verifying the collector against its bundle, and
writes each event as RFC 5425 octet-counted syslog or a JSON line. An event
leaves the queue once written to the connection; one written into a
connection that then breaks is lost with it (RFC 5425 has no acknowledgement).
It reconnects with backoff, up to a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from agent.backoff import Backoff
from agent.errors import ControlError
from agent.events import DEVICE_FIELD, EVENT_FIELD, FIELD_PREFIX
from agent.siem.format import Event, json_line, octet_counted, syslog_message
from agent.siem.settings import parse_siem_url

log = logging.getLogger(__name__)
RECENT = 1000
BATCH = 256


def event_of(record: logging.LogRecord) -> Event | None:
    """The event a log record carries, or None for a plain log line."""
    message_id = getattr(record, "MESSAGE_ID", None)
    name = getattr(record, EVENT_FIELD, None)
    if not isinstance(message_id, str) or not isinstance(name, str):
        return None
    fields = {key[len(FIELD_PREFIX):].lower(): str(value)
              for key, value in record.__dict__.items()
              if key.startswith(FIELD_PREFIX) and key != EVENT_FIELD}
    device = getattr(record, DEVICE_FIELD, None)
    if device is not None:
        fields["device_id"] = str(device)
    return Event(name, message_id, record.levelno, record.created, record.getMessage(),
                 fields)


class EventTap(logging.Handler):
    def __init__(self, recent: int = RECENT) -> None:
        super().__init__(logging.DEBUG)
        self._lock = threading.Lock()
        self.recent: deque[tuple[int, Event]] = deque(maxlen=recent)
        self.sequence = 0
        self.sender: SiemSender | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = event_of(record)
        except Exception:  # never fail the code that logged
            return
        if event is None:
            return
        with self._lock:
            self.sequence += 1
            self.recent.append((self.sequence, event))
        if self.sender is not None:
            self.sender.put(event)

    def since(self, after: int, limit: int = RECENT) -> list[dict[str, Any]]:
        """The recent events numbered above `after`, oldest first, as `devidctl events`
        shows them."""
        with self._lock:
            picked = [(n, e) for n, e in self.recent if n > after][-limit:]
        return [{"seq": n, "time": e.time, "event": e.name, "message_id": e.message_id,
                 "severity": e.severity, "message": e.message, "fields": e.fields}
                for n, e in picked]

    async def control(self, params: dict[str, Any]) -> dict[str, Any]:
        """The control method `events` (`devidctl events`): the recent events after
        `after`, at most `limit`, and the last number given so far."""
        after, limit = params.get("after", 0), params.get("limit", 100)
        for name, value in (("after", after), ("limit", limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ControlError(f"events: {name}: expected a whole number from 0")
        return {"events": self.since(after, min(limit, RECENT)), "last": self.sequence}

    def attach(self, logger: logging.Logger) -> None:
        logger.addHandler(self)

    def detach(self, logger: logging.Logger) -> None:
        logger.removeHandler(self)


class SiemSender:
    name = "siem"

    def __init__(self, url: str, framing: str, max_queue: int, app: str,
                 tls: Callable[[], ssl.SSLContext | None], sd_id: str,
                 hostname: str | None = None) -> None:
        self.url = url
        self.host, self.port = parse_siem_url(url)
        self.framing, self._app, self._tls, self._sd_id = framing, app, tls, sd_id
        self._hostname = hostname or socket.gethostname()
        self._queue: deque[Event] = deque()
        self._max, self._lock = max_queue, threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self.sent = self.dropped = self.connections = 0
        self.connected = False
        self.error: str | None = None

    def put(self, event: Event) -> None:
        with self._lock:
            if len(self._queue) >= self._max:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(event)
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to wake
                loop.call_soon_threadsafe(self._wake.set)

    def frame(self, event: Event) -> bytes:
        if self.framing == "json":
            return json_line(event, self._hostname, self._app)
        return octet_counted(syslog_message(event, self._hostname, self._app, os.getpid(),
                                            self._sd_id))

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        backoff = Backoff(initial=1.0, cap=60.0)
        while not stop.is_set():
            try:
                await self._session(stop)
                backoff.reset()
            except (OSError, ssl.SSLError, TimeoutError) as e:
                why = f"{type(e).__name__}: {e}" if not str(e).startswith("[") else str(e)
                if why != self.error:
                    log.warning("SIEM %s: %s; events wait in the queue (at most %d)",
                                self.url, why, self._max)
                self.error = why
                self.connected = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff.next_delay())

    async def _session(self, stop: asyncio.Event) -> None:
        context = self._tls()
        if context is None:
            raise OSError("no TLS credentials yet (waiting for the agent)")
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=context, server_hostname=self.host)
        self.connected, self.error = True, None
        self.connections += 1
        try:
            while not stop.is_set():
                with self._lock:
                    batch = list(self._queue)[:BATCH]
                if not batch:
                    self._wake.clear()
                    waiting = [asyncio.ensure_future(self._wake.wait()),
                               asyncio.ensure_future(stop.wait()),
                               asyncio.ensure_future(reader.read(1))]
                    done, pending = await asyncio.wait(
                        waiting, return_when=asyncio.FIRST_COMPLETED)
                    for task in pending:
                        task.cancel()
                    if waiting[2] in done:  # the collector closed (or sent what it must not)
                        raise OSError("the collector closed the connection")
                    continue
                writer.write(b"".join(self.frame(event) for event in batch))
                async with asyncio.timeout(30):
                    await writer.drain()
                written = {id(event) for event in batch}
                with self._lock:  # the batch left; any of it dropped meanwhile is gone
                    while self._queue and id(self._queue[0]) in written:
                        self._queue.popleft()
                self.sent += len(batch)
        finally:
            self.connected = False
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    def status_section(self) -> dict[str, Any]:
        with self._lock:
            queued = len(self._queue)
        return {"url": self.url, "framing": self.framing, "connected": self.connected,
                "sent": self.sent, "queued": queued, "dropped": self.dropped,
                "connections": self.connections, "error": self.error}
