"""Requests from the gateway to a sensor (LwM2M device management), over the sensor's
own secure channel.

The way back to a sensor is the one its last LwM2M message came by: the route
is remembered at Register and Update. Over OSCORE the request is protected
with the sensor's own context (its sequence numbers are reserved ahead on
disk like every other the gateway sends) and sent through the OSCORE
listener; over DTLS it goes into the sensor's session; on the plain listener
(insecure profiles only) to its address. Routes live in memory: after a
broker restart a sensor is reachable again from its next Update.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiocoap
from aiocoap import Code, Message
from aiocoap.oscore import DecodeError, NotAProtectedMessage, ProtectionInvalid
from aiocoap.transports.oscore import OSCOREAddress

from agent.broker.dtls import DtlsRemote
from agent.errors import Lwm2mError, Lwm2mNotFound
from agent.sensors.model import Sensor

TIMEOUT = 10.0
BLOCK_EXPONENT = 5  # 512-byte blocks: within a sensor's 1,280-byte IPv6 MTU under OSCORE


class Listener(Protocol):
    name: str

    @property
    def context(self) -> aiocoap.Context | None: ...


@dataclass(frozen=True)
class Route:
    listener: str  # oscore, dtls or plain
    remote: Any  # what the sensor's message came from


def route_of(remote: Any) -> Route:
    if isinstance(remote, OSCOREAddress):
        return Route("oscore", remote)
    if isinstance(remote, DtlsRemote):
        return Route("dtls", remote)
    return Route("plain", remote)


class Downlink:
    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.listeners: Mapping[str, Listener] = {}
        self._routes: dict[int, Route] = {}

    def remember(self, sensor: Sensor, remote: Any) -> None:
        self._routes[sensor.serial] = route_of(remote)

    def forget(self, serial: int) -> None:
        self._routes.pop(serial, None)

    def _way(self, sensor: Sensor) -> tuple[aiocoap.Context, Route]:
        route = self._routes.get(sensor.serial)
        if route is None:
            raise Lwm2mNotFound(f"sensor {sensor.name}: no way to it yet (it reaches the "
                                "gateway after its next LwM2M Register or Update)")
        listener = self.listeners.get(route.listener)
        context = listener.context if listener is not None else None
        if context is None:
            raise Lwm2mError(f"sensor {sensor.name}: the {route.listener} listener is not "
                             "running")
        return context, route

    async def request(self, sensor: Sensor, message: Message) -> Message:
        """The sensor's answer; Lwm2mError when it cannot be reached or does not answer."""
        context, route = self._way(sensor)
        request, inner = _start(context, route, message)
        try:
            return inner(await asyncio.wait_for(request.response, self.timeout))
        except TimeoutError:
            raise Lwm2mError(f"sensor {sensor.name} did not answer within "
                             f"{self.timeout:g} s (asleep, out of reach, or gone)") from None
        except aiocoap.error.Error as e:
            raise Lwm2mError(f"sensor {sensor.name}: {type(e).__name__}: {e}") from None

    async def observe(self, sensor: Sensor, message: Message, count: int, seconds: float
                      ) -> list[Message]:
        """Observe (RFC 7641): the first answer and the notifications that follow, until
        `count` in all or `seconds` have passed; then the observation is cancelled."""
        got: list[Message] = []

        def take(answer: Message) -> bool:
            got.append(answer)
            return len(got) < count

        await self.follow(sensor, message, take, seconds)
        return got

    async def follow(self, sensor: Sensor, message: Message,
                     take: Callable[[Message], bool], seconds: float | None = None) -> None:
        """Observe `message`'s resource: `take` gets the first answer, then each
        notification, until it returns False, the observation ends, or `seconds` pass
        after the first answer (None: until cancelled). The observation is cancelled on
        the way out. Lwm2mError when the first answer does not come."""
        context, route = self._way(sensor)
        message.opt.observe = 0
        request, inner = _start(context, route, message)
        answered = False
        try:
            first = inner(await asyncio.wait_for(request.response, self.timeout))
            answered = True
            if not take(first) or not first.code.is_successful() or first.opt.observe is None:
                return  # enough, refused, or not observable: one answer

            async def notifications() -> None:
                async for notification in request.observation:
                    if not take(inner(notification)):
                        return

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(notifications(), seconds)
        except TimeoutError:
            raise Lwm2mError(f"sensor {sensor.name} did not answer within "
                             f"{self.timeout:g} s (asleep, out of reach, or gone)") from None
        except aiocoap.error.Error as e:
            if not answered:
                raise Lwm2mError(f"sensor {sensor.name}: {type(e).__name__}: {e}") from None
            # else the observation ended (the sensor cancelled it)
        finally:
            request.observation.cancel()

    async def request_blockwise(self, sensor: Sensor, message: Message,
                                size_exponent: int = BLOCK_EXPONENT) -> Message:
        """A request with a large payload (a firmware package) in Block1 pieces (RFC 7959),
        each sent and protected on its own: inside OSCORE, block-wise is the inner
        message's, so aiocoap's own block-wise (outer) would not do. The last answer."""
        size = 16 << size_exponent
        payload, count = message.payload, max(1, -(-len(message.payload) // size))
        response = None
        for number in range(count):
            piece = message.copy(payload=payload[number * size:(number + 1) * size])
            piece.opt.block1 = (number, number < count - 1, size_exponent)
            response = await self.request(sensor, piece)
            if number < count - 1 and response.code != Code.CONTINUE:
                return response  # refused midway: the sensor's answer says why
        assert response is not None
        return response


def _start(context: aiocoap.Context, route: Route, message: Message
           ) -> tuple[Any, Callable[[Message], Message]]:
    """The request on its way, and what makes the sensor's answers plain: nothing, or
    OSCORE's unprotect with this request's identifiers (each notification carries its
    own partial IV)."""
    if route.listener != "oscore":
        message.remote = route.remote
        return context.request(message, handle_blockwise=True), lambda answer: answer
    security = route.remote.security_context
    protected, request_id = security.protect(message)
    protected.remote = route.remote.underlying_address

    def inner(outer: Message) -> Message:
        try:
            plain, _ = security.unprotect(outer, request_id)
        except NotAProtectedMessage:
            raise Lwm2mError(f"the sensor answered {outer.code} without OSCORE (it does not "
                             "know this context: rekeyed, or restarted without its state)"
                             ) from None
        except (ProtectionInvalid, DecodeError) as e:
            raise Lwm2mError(f"the sensor's answer does not verify: {e}") from None
        return plain  # type: ignore[no-any-return]

    return context.request(protected, handle_blockwise=False), inner
