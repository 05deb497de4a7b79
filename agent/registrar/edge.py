"""The registrar's connection edge: how many TLS connections it keeps, and for how long
a connection may take to deliver a request.

uvicorn holds a connection for as long as the client keeps it open and trickles
bytes: 1,100 idle TLS clients exhausted its descriptors, 200 slowloris clients
were held indefinitely. Here every connection must deliver a complete request
(head and body) within `request_timeout` of being accepted or of its previous
response, or it is closed; and when `max_connections` are open, a new
connection evicts the oldest one that has not delivered a request, so an honest
client always gets in while the attacker's connections churn. Warnings are
rate-limited: a flood leaves a few lines in the log, never a traceback per
connection.

`ConnectionGuard` decides (pure, fed the monotonic clock); `guarded_protocol`
fits it into uvicorn's h11 protocol, the only place that touches uvicorn's
internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.libc import libc
from agent.registrar.admission import RateLimitedWarning

log = logging.getLogger(__name__)

BURST = 64  # connections: after this many drain, freed memory is handed back (malloc_trim)


class ConnectionGuard:
    """Which connections are waiting for a request, and which one to drop."""

    def __init__(self, max_connections: int, request_timeout: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.open = 0
        self._waiting: OrderedDict[int, None] = OrderedDict()  # owing a request, oldest first
        self.evicted = 0
        self.timed_out = 0
        self._peak = 0  # most connections open since memory was last handed back
        self._warning = RateLimitedWarning(log, monotonic=monotonic)

    def opened(self, key: int) -> int | None:
        """A connection was made; the one to evict (oldest without a request), if over."""
        self.open += 1
        self._waiting[key] = None
        if self.open <= self.max_connections:
            return None
        victim = next((k for k in self._waiting if k != key), None)
        if victim is not None:
            self.evicted += 1
            self._warning.warn("%d connections open (max_connections %d): closing the oldest "
                               "that sent no request; %d closed so far", self.open,
                               self.max_connections, self.evicted)
        return victim

    def waiting(self, key: int) -> None:
        """The connection now owes a request (made, or its response was sent)."""
        self._waiting.pop(key, None)
        self._waiting[key] = None

    def delivered(self, key: int) -> None:
        """A complete request arrived: it is being served, not idling."""
        self._waiting.pop(key, None)

    def expired(self, key: int) -> None:
        self.timed_out += 1
        self._warning.warn("closed a connection that sent no complete request within %gs "
                           "(request_timeout); %d so far", self.request_timeout,
                           self.timed_out)

    def closed(self, key: int) -> bool:
        """A connection closed; True when a burst of connections has just drained (the
        time to hand the memory they used back to the system)."""
        self.open -= 1
        self._waiting.pop(key, None)
        self._peak = max(self._peak, self.open + 1)
        if self._peak >= BURST and self.open <= self._peak // 8:
            self._peak = self.open
            return True
        return False


def guarded_protocol(guard: ConnectionGuard) -> type[H11Protocol]:
    """uvicorn's h11 protocol, with `guard` deciding timeouts and evictions."""
    protocols: dict[int, GuardedH11Protocol] = {}

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            protocols[id(self)] = self
            victim = guard.opened(id(self))
            self._await_request()
            if victim is not None and victim in protocols:
                protocols[victim].transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_deadline()
            if protocols.pop(id(self), None) is not None and guard.closed(id(self)):
                self.loop.call_soon(release_free_memory)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self.conn.their_state is not \
                    h11.SEND_BODY:
                self._cancel_deadline()  # the whole request is in
                guard.delivered(id(self))

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_request()

        def _await_request(self) -> None:
            self._cancel_deadline()
            guard.waiting(id(self))
            self._deadline = self.loop.call_later(guard.request_timeout, self._expire)

        def _cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                guard.expired(id(self))
                self.transport.abort()

    return GuardedH11Protocol


def release_free_memory() -> None:
    """Hand freed heap memory back to the system. glibc keeps what a burst of TLS
    connections used (about 0.3 MiB each) in its arenas otherwise; elsewhere, nothing."""
    c = libc()
    if c is None:
        return
    with contextlib.suppress(AttributeError):  # not glibc: no malloc_trim
        c.malloc_trim(0)


def quiet_accept_errors(logger: logging.Logger, monotonic: Callable[[], float] = time.monotonic
                        ) -> logging.Filter:
    """asyncio logs "socket.accept() out of system resource" with a traceback each time
    accept() fails (EMFILE); keep one line a minute, without the traceback."""
    warning = RateLimitedWarning(log, monotonic=monotonic)

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "out of system resource" not in str(record.msg):
                return True
            error: Any = record.exc_info[1] if record.exc_info else None
            warning.warn("cannot accept connections: %s; raise LimitNOFILE or lower "
                         "max_connections", getattr(error, "strerror", None) or error)
            return False

    accept_filter = _Filter()
    logger.addFilter(accept_filter)
    return accept_filter
