"""One connection per certificate generation, for every kind of upstream.

After a rotation, new requests go out on a new connection that presents the
new certificate. The old connection is closed once its last request has been
answered, so that no request in flight is dropped. A connection that breaks
is retired the same way and the next request redials. The kind of upstream
supplies how to open and close a connection; this class does the counting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from agent.broker.gatewaycreds import GatewayCredentials
from agent.errors import UpstreamError
from agent.identityapi.credentialset import CredentialSet

log = logging.getLogger(__name__)
C = TypeVar("C")


@dataclass(eq=False)
class Generation(Generic[C]):
    connection: C
    serial: str  # of the certificate it presents
    in_flight: int = 0
    retired: bool = False
    closed: bool = False


class Generations(Generic[C]):
    def __init__(self, trust: str | None, credentials: GatewayCredentials,
                 open_: Callable[[ssl.SSLContext], Awaitable[C]],
                 close: Callable[[C], Awaitable[None]]) -> None:
        self._trust, self._credentials = trust, credentials
        self._open, self._close = open_, close
        self._tls: tuple[str, ssl.SSLContext] | None = None
        self.current: Generation[C] | None = None
        self._opening = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self.opened = 0

    def start(self) -> None:
        self._credentials.subscribe(self._rotated)

    def _rotated(self, credentials: CredentialSet | None) -> None:
        self._tls = None if credentials is None else \
            (credentials.serial, credentials.ssl_context("client", self._trust))
        if self.current is not None:
            self.retire(self.current)

    def retire(self, generation: Generation[C]) -> None:
        """No new requests on it; closed once the last one in flight is answered."""
        generation.retired = True
        if generation is self.current:
            self.current = None
        if generation.in_flight == 0 and not generation.closed:
            generation.closed = True
            task = asyncio.get_running_loop().create_task(self._close(generation.connection))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _get(self) -> Generation[C]:
        async with self._opening:
            if self.current is not None:
                return self.current
            if self._tls is None:
                why = self._credentials.withdrawn or self._credentials.error or \
                    "waiting for the agent"
                raise UpstreamError(f"the gateway has no TLS credentials ({why})")
            serial, context = self._tls
            self.current = Generation(await self._open(context), serial)
            self.opened += 1
            return self.current

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Generation[C]]:
        """A connection for one request, counted in flight while the caller uses it."""
        generation = await self._get()
        generation.in_flight += 1
        try:
            yield generation
        finally:
            generation.in_flight -= 1
            if generation.retired:
                self.retire(generation)

    async def close(self) -> None:
        if self.current is not None:
            generation, self.current = self.current, None
            generation.closed = True
            await self._close(generation.connection)
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task

    def status_section(self) -> dict[str, object]:
        current = self.current
        return {"connections_opened": self.opened,
                "in_flight": current.in_flight if current else 0,
                "certificate_serial": current.serial if current else None}
