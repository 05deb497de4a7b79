"""The aiocoap server context under every listener (OSCORE, DTLS, plain CoAP).

aiocoap's public constructors know only its own transports, so the listeners
attach theirs through the hook those constructors use themselves
(`_append_tokenmanaged_messagemanaged_transport`; aiocoap is pinned below 0.5
for it). The context differs from aiocoap's in one thing: it does not name
each request's rendering task after the request. aiocoap formats the whole
message, addresses included, for that name, and under load this formatting
was a tenth of the broker's CPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiocoap
from aiocoap import interfaces
from aiocoap.pipe import error_to_message, run_driving_pipe
from aiocoap.transports.udp6 import MessageInterfaceUDP6

from agent.broker.config import parse_address
from agent.errors import ListenerError

MakeTransport = Callable[[interfaces.MessageManager], Awaitable[Any]]


class ServerContext(aiocoap.Context):  # type: ignore[misc]
    def render_to_pipe(self, pipe: Any) -> None:
        run_driving_pipe(error_to_message(pipe, self.log), self._render_to_pipe(pipe),
                         name="devid-broker request")


def udp(interface: type[MessageInterfaceUDP6] = MessageInterfaceUDP6
        ) -> Callable[[str, int], MakeTransport]:
    """aiocoap's CoAP-over-UDP transport (or a subclass) as `serve` takes it."""
    def on(host: str, port: int) -> MakeTransport:
        return lambda mman: interface.create_server_transport_endpoint(
            mman, log=mman.log, loop=asyncio.get_running_loop(), bind=(host, port),
            multicast=[])
    return on


async def serve(listener: str, address: str, site: interfaces.Resource,
                transport: Callable[[str, int], MakeTransport]) -> ServerContext:
    """A context serving `site` on `address` (HOST:PORT) through `transport(host, port)`;
    ListenerError naming the listener's config key when the address cannot be bound."""
    host, port = parse_address(address)
    context = ServerContext(loop=asyncio.get_running_loop(), serversite=site,
                            loggername=f"coap-{listener}")
    try:
        await context._append_tokenmanaged_messagemanaged_transport(transport(host, port))
    except OSError as e:  # nothing was started: nothing to shut down
        raise ListenerError(f"{listener} listener {address}: {e.strerror or e}",
                            f"another program has the port, or [listen] {listener} names "
                            "an address this host does not have") from None
    return context
