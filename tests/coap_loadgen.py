"""A lean CoAP-over-UDP client for the benchmarks: one socket, confirmable requests
matched to their answers by token, OSCORE (a sensor's context in memory) where asked.

aiocoap's client spends more CPU per request than the servers the benchmarks measure;
this one keeps the load generator from being the limit. It does no retransmission:
on loopback nothing is lost, and a request unanswered in time counts as a failure."""

from __future__ import annotations

import asyncio
from typing import Any

import aiocoap
from aiocoap import Code, Message


class RawCoap(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self._waiting: dict[bytes, asyncio.Future[Message]] = {}
        self._next = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            answer = Message.decode(data)
        except Exception:
            return
        if answer.mtype == aiocoap.CON:  # a separate response: acknowledged, or resent
            assert self.transport is not None
            ack = Message(code=Code.EMPTY)
            ack.mtype, ack.mid = aiocoap.ACK, answer.mid
            self.transport.sendto(ack.encode())
        waiting = self._waiting.pop(answer.token, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(answer)

    async def exchange(self, request: Message, secure: Any = None, timeout: float = 5.0
                       ) -> Message:
        """The answer to `request` (unprotected with `secure`, an OSCORE context, when
        given); TimeoutError when none comes, and OSCORE's errors when it does not
        verify."""
        self._next += 1
        request_id = None
        if secure is not None:
            request, request_id = secure.protect(request)
        request.mtype, request.mid = aiocoap.CON, self._next & 0xFFFF
        request.token = self._next.to_bytes(4, "big")
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[request.token] = future
        assert self.transport is not None
        self.transport.sendto(request.encode())
        try:
            answer = await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(request.token, None)
        if secure is not None:
            answer, _ = secure.unprotect(answer, request_id)
        return answer

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def raw_client(port: int, host: str = "127.0.0.1") -> RawCoap:
    _, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        RawCoap, remote_addr=(host, port))
    return protocol
