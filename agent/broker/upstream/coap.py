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

import logging
import ssl
from typing import Any
from urllib.parse import urlsplit

import aiocoap
from aiocoap import Code, Message
from aiocoap import error as coap_error
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import StringOption

from agent.broker.gatewaycreds import GatewayCredentials
from agent.broker.upstream import SENSOR_OPTION, Forward, Reply
from agent.broker.upstream.generations import Generations
from agent.errors import ConfigError, UpstreamError

log = logging.getLogger(__name__)


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
                 credentials: GatewayCredentials, timeout: float = 10.0) -> None:
        self.name, self.url, self.timeout = name, url, timeout
        self._host, self._port, self._base = parse_coap_url(url)
        # Where every request goes, parsed once (aiocoap parses a URI per message).
        origin = Message(uri=f"coaps+tcp://{self._host}:{self._port}")
        self._remote, self._uri_host = origin.remote, origin.opt.uri_host
        self._connections: Generations[aiocoap.Context] = Generations(
            trust, credentials, self._open, self._close)
        self.last_error: str | None = None

    async def start(self) -> None:
        self._connections.start()

    @staticmethod
    async def _open(tls: ssl.SSLContext) -> aiocoap.Context:
        context = await aiocoap.Context.create_client_context(transports=["tlsclient"])
        # aiocoap asks its credentials map for each new connection's TLS context.
        context.client_credentials.ssl_client_context = lambda _scheme, _host: tls
        return context

    @staticmethod
    async def _close(context: aiocoap.Context) -> None:
        await context.shutdown()

    async def forward(self, request: Forward) -> Reply:
        message = Message(code=Code[request.method], payload=request.payload)
        message.remote, message.opt.uri_host = self._remote, self._uri_host
        message.opt.uri_path = self._base + tuple(s for s in request.path.split("/") if s)
        if request.content_format is not None:
            message.opt.content_format = request.content_format
        if request.accept is not None:
            message.opt.accept = request.accept
        message.opt.add_option(StringOption(OptionNumber(SENSOR_OPTION), request.sensor.id))
        async with self._connections.use() as generation:
            try:
                response = await generation.connection.request(message).response
            except (coap_error.Error, OSError) as e:
                self.last_error = str(e) or type(e).__name__
                self._connections.retire(generation)  # broken: the next request redials
                raise UpstreamError(f"{self.url}: {self.last_error}") from None
        self.last_error = None
        return Reply(int(response.code), response.payload, response.opt.content_format,
                     response.opt.max_age)

    async def close(self) -> None:
        await self._connections.close()

    def status_section(self) -> dict[str, Any]:
        return {"url": self.url, "kind": "coaps+tcp", **self._connections.status_section(),
                "last_error": self.last_error}
