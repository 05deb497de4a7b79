"""The aiocoap server context under every listener (OSCORE, DTLS, plain CoAP).

aiocoap's public constructors know only its own transports, so the listeners
attach theirs through the hook those constructors use themselves
(`_append_tokenmanaged_messagemanaged_transport`; aiocoap is pinned below 0.5
for it). The context differs from aiocoap's in one thing: it does not name
each request's rendering task after the request. aiocoap formats the whole
message, addresses included, for that name, and under load this formatting
was a tenth of the broker's CPU.

Its message layer (CompactMessageManager) keeps aiocoap's deduplication
(RFC 7252 4.5: a duplicate CON within EXCHANGE_LIFETIME, 247 s, gets the same
answer again) in a leaner form: each answer as its encoded bytes rather than
the Message object, and the expiry in one queue swept as messages arrive
rather than a timer per message. Under load aiocoap's form held about 2 KiB
per request for four minutes (hundreds of MiB at a thousand requests a
second) and scheduled a timer for each. It is also bounded in number
(MAX_REMEMBERED), so that a flood of distinct requests cannot grow it
without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiocoap
from aiocoap import CON, Message, interfaces
from aiocoap.messagemanager import MessageManager
from aiocoap.pipe import error_to_message, run_driving_pipe
from aiocoap.tokenmanager import TokenManager
from aiocoap.transports.udp6 import MessageInterfaceUDP6

from agent.broker.config import parse_address
from agent.errors import ListenerError

# At most this many messages are remembered for deduplication (about 700 bytes each).
# Past it, the oldest are forgotten before their 247 s: a retransmission of one of those
# is then taken as new, and for OSCORE refused as a replay (the sensor sends anew).
MAX_REMEMBERED = 65536

MakeTransport = Callable[[interfaces.MessageManager], Awaitable[Any]]


class CompactMessageManager(MessageManager):  # type: ignore[misc]
    """aiocoap's message layer with a leaner deduplication memory (the module's doc)."""

    def __init__(self, token_manager: Any, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        super().__init__(token_manager)
        self._clock = clock
        self._expiry: deque[tuple[float, Any]] = deque()
        self.forgotten_early = 0

    def _deduplicate_message(self, message: Message) -> bool:
        now = self._clock()
        self._expire(now)
        key = (message.remote, message.mid)
        recent = self._recent_messages
        if key in recent:
            stored = recent[key]
            if message.mtype is CON and stored is not None:
                data, remote = stored  # the same answer again, as it was sent
                self.message_interface.send(Message.decode(data, remote))
            return True
        recent[key] = None
        expiry = self._expiry
        expiry.append((now + message.transport_tuning.EXCHANGE_LIFETIME, key))
        if len(expiry) > MAX_REMEMBERED:  # a flood: forget the oldest early
            recent.pop(expiry.popleft()[1], None)
            self.forgotten_early += 1
        return False

    def sweep(self) -> None:
        """Forget what expired, also while no message arrives (the listener's task calls
        this every few seconds), so that memory returns after a burst."""
        self._expire(self._clock())

    def _store_response_for_duplicates(self, message: Message) -> None:
        key = (message.remote, message.mid)
        if key in self._recent_messages:
            self._recent_messages[key] = (message.encode(), message.remote)

    def _expire(self, now: float) -> None:
        expiry, recent = self._expiry, self._recent_messages
        while expiry and expiry[0][0] <= now:
            recent.pop(expiry.popleft()[1], None)

    @property
    def remembered(self) -> int:
        """Messages remembered for deduplication now."""
        return len(self._recent_messages)


class ServerContext(aiocoap.Context):  # type: ignore[misc]
    def render_to_pipe(self, pipe: Any) -> None:
        run_driving_pipe(error_to_message(pipe, self.log), self._render_to_pipe(pipe),
                         name="devid-broker request")

    async def _append_tokenmanaged_messagemanaged_transport(
            self, message_interface_constructor: MakeTransport) -> None:
        """aiocoap's own wiring of a transport (protocol.py), with the compact message
        layer."""
        tman = TokenManager(self)
        mman = CompactMessageManager(tman)
        transport = await message_interface_constructor(mman)
        mman.message_interface = transport
        tman.token_interface = mman
        self.request_interfaces.append(tman)


def message_layer(context: aiocoap.Context | None) -> CompactMessageManager | None:
    if context is None or not context.request_interfaces:
        return None
    layer = context.request_interfaces[0].token_interface
    return layer if isinstance(layer, CompactMessageManager) else None


def deduplication(context: aiocoap.Context | None) -> dict[str, int]:
    """What a listener's message layer remembers for deduplication, for its status."""
    layer = message_layer(context)
    if layer is None:
        return {}
    return {"remembered": layer.remembered, "forgotten_early": layer.forgotten_early}


async def sweep_deduplication(contexts: Callable[[], list[aiocoap.Context | None]],
                              stop: asyncio.Event, interval: float = 5.0) -> None:
    """Every `interval`, each listener's deduplication memory forgets what expired."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        for context in contexts():
            layer = message_layer(context)
            if layer is not None:
                layer.sweep()


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
