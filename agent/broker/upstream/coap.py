"""A CoAP-native upstream: coaps+tcp (RFC 8323) with aiocoap, under the gateway's identity.

Requests are pipelined over one pooled TLS connection (aiocoap keeps it per
host and port and matches responses by token), so throughput is not bound
by one round trip at a time. The connection presents the gateway's current
certificate and verifies the upstream against `bundle` (default: the trust
bundle the agent hands out).

After a rotation, new requests go out on a new connection with the new
certificate. The old connection is closed once its last request has been
answered, so that no request in flight is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiocoap
from aiocoap import Code, Message
from aiocoap import error as coap_error
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import StringOption

from agent.broker.gatewaycreds import GatewayCredentials
from agent.broker.upstream import SENSOR_OPTION, Forward, Reply
from agent.errors import ConfigError, UpstreamError
from agent.identityapi.credentialset import CredentialSet

log = logging.getLogger(__name__)


@dataclass
class _Connection:
    """One aiocoap client context: one TLS identity, its requests in flight."""

    context: aiocoap.Context
    serial: str
    in_flight: int = 0
    retired: bool = False
    shut: bool = False


def parse_coap_url(url: str) -> tuple[str, int, tuple[str, ...]]:
    """(host, port, base path) of a coaps+tcp URL; ConfigError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "coaps+tcp":
        raise ConfigError(f"{url!r}: expected a coaps+tcp:// URL")
    try:
        port = parts.port or aiocoap.COAPS_PORT
    except ValueError:
        raise ConfigError(f"{url!r}: the port is not a number from 1 to 65535") from None
    if not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{url!r}: expected coaps+tcp://HOST[:PORT][/BASE/PATH]")
    return parts.hostname, port, tuple(s for s in parts.path.split("/") if s)


class CoapUpstream:
    def __init__(self, name: str, url: str, trust: str | None,
                 credentials: GatewayCredentials) -> None:
        self.name, self.url = name, url
        self._host, self._port, self._base = parse_coap_url(url)
        self._trust, self._credentials = trust, credentials
        self._tls: tuple[str, ssl.SSLContext] | None = None
        self._current: _Connection | None = None
        self._opening = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.last_error: str | None = None

    async def start(self) -> None:
        self._credentials.subscribe(self._rotated)

    def _rotated(self, credentials: CredentialSet | None) -> None:
        if credentials is None:
            self._tls = None
        else:
            self._tls = (credentials.serial, credentials.ssl_context("client", self._trust))
        if self._current is not None:
            self._retire(self._current)
            self._current = None

    def _retire(self, connection: _Connection) -> None:
        connection.retired = True
        if connection.in_flight == 0 and not connection.shut:
            connection.shut = True
            task = asyncio.get_running_loop().create_task(connection.context.shutdown())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _connection(self) -> _Connection:
        async with self._opening:
            if self._current is not None:
                return self._current
            if self._tls is None:
                why = self._credentials.withdrawn or self._credentials.error or \
                    "waiting for the agent"
                raise UpstreamError(f"the gateway has no TLS credentials ({why})")
            serial, tls = self._tls
            context = await aiocoap.Context.create_client_context(transports=["tlsclient"])
            # aiocoap asks its credentials map for each new connection's TLS context.
            context.client_credentials.ssl_client_context = lambda _scheme, _host: tls
            self._current = _Connection(context, serial)
            self.connections += 1
            return self._current

    async def forward(self, request: Forward) -> Reply:
        connection = await self._connection()
        message = Message(code=Code[request.method], payload=request.payload,
                          uri=f"coaps+tcp://{self._host}:{self._port}")
        message.opt.uri_path = self._base + tuple(s for s in request.path.split("/") if s)
        if request.content_format is not None:
            message.opt.content_format = request.content_format
        if request.accept is not None:
            message.opt.accept = request.accept
        message.opt.add_option(StringOption(OptionNumber(SENSOR_OPTION), request.sensor.id))
        connection.in_flight += 1
        try:
            response = await connection.context.request(message).response
        except (coap_error.Error, OSError) as e:
            self.last_error = str(e) or type(e).__name__
            if connection is self._current:  # a broken connection: the next request redials
                self._current = None
                self._retire(connection)
            raise UpstreamError(f"{self.url}: {self.last_error}") from None
        finally:
            connection.in_flight -= 1
            if connection.retired and connection.in_flight == 0 and \
                    connection is not self._current:
                self._retire(connection)
        self.last_error = None
        return Reply(int(response.code), response.payload, response.opt.content_format,
                     response.opt.max_age)

    async def close(self) -> None:
        if self._current is not None:
            await self._current.context.shutdown()
            self._current = None
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task

    def status_section(self) -> dict[str, Any]:
        current = self._current
        return {"url": self.url, "kind": "coaps+tcp", "connections_opened": self.connections,
                "in_flight": current.in_flight if current else 0,
                "certificate_serial": current.serial if current else None,
                "last_error": self.last_error}
