"""The identity API's socket: an asyncio shell around protocol.py and api.py.

Any local user may connect (0666); the kernel says who the peer is
(SO_PEERCRED) and api.py decides. Bounded against local abuse: a request
line is at most protocol.MAX_REQUEST bytes and must arrive within
FIRST_REQUEST_S, an idle connection is closed after IDLE_S, and there are at
most MAX_CONNECTIONS at once (MAX_PER_UID per user). A malformed line gets an
error that says what was wrong, then the connection is closed; the agent
goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from pathlib import Path

from agent.config import ConsumerSection
from agent.control.peer import PeerCredentials, read_peer_credentials
from agent.control.server import listen_unix
from agent.errors import ControlError, DevidError, ProtocolError
from agent.identityapi import protocol
from agent.identityapi.api import IdentityApi

log = logging.getLogger(__name__)

SOCKET_MODE = 0o666  # who may do what is decided per peer, not by the file mode
FIRST_REQUEST_S = 5.0
IDLE_S = 60.0
SEND_TIMEOUT_S = 10.0  # a watcher that stops reading is dropped, not waited for
MAX_CONNECTIONS = 64
MAX_PER_UID = 16


class _StreamPeer:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def send(self, line: bytes) -> None:
        self._writer.write(line)
        await asyncio.wait_for(self._writer.drain(), SEND_TIMEOUT_S)


class IdentityServer:
    def __init__(self, path: Path, api: IdentityApi) -> None:
        self.path, self.api = path, api
        self._server: asyncio.AbstractServer | None = None
        self._per_uid: Counter[int] = Counter()
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def connections(self) -> int:
        return sum(self._per_uid.values())

    async def start(self) -> None:
        self._server = await listen_unix(self.path, self._serve, protocol.MAX_REQUEST,
                                         SOCKET_MODE, None, "[identity_api] socket")
        log.info("identity API listening at %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):  # watches would keep wait_closed() waiting
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = read_peer_credentials(writer.get_extra_info("socket"))
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._per_uid[peer.uid] += 1
        try:
            if self.connections > MAX_CONNECTIONS or self._per_uid[peer.uid] > MAX_PER_UID:
                writer.write(protocol.encode_error(ControlError(
                    "too many connections to the identity API", "close idle connections; "
                    f"at most {MAX_PER_UID} per user and {MAX_CONNECTIONS} in all")))
                await writer.drain()
                return
            await self._converse(peer, reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._per_uid[peer.uid] -= 1
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _converse(self, peer: PeerCredentials, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        timeout = FIRST_REQUEST_S
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except TimeoutError:
                if timeout == FIRST_REQUEST_S:
                    writer.write(protocol.encode_error(ProtocolError(
                        f"request: none arrived within {FIRST_REQUEST_S:g}s")))
                return
            except ValueError:  # over the StreamReader limit
                writer.write(protocol.encode_error(ProtocolError(
                    f"request: longer than {protocol.MAX_REQUEST} bytes")))
                return
            if not line:
                return
            if not line.endswith(b"\n"):
                writer.write(protocol.encode_error(ProtocolError(
                    "request: the connection was half-closed before the end of the line")))
                return
            if not await self._answer(peer, line, reader, writer):
                return
            await asyncio.wait_for(writer.drain(), SEND_TIMEOUT_S)
            timeout = IDLE_S

    async def _answer(self, peer: PeerCredentials, line: bytes, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        """Answer one request line; False when the connection should end."""
        try:
            consumer = await self.api.identify(peer)
        except DevidError as e:  # a stranger: told why, and not listened to any further
            writer.write(protocol.encode_error(e))
            return False
        try:
            request = protocol.decode_request(line)
            await self.api.check_grant(peer, consumer, request.method)
            if request.method == "watch":
                await self._watch(consumer, reader, writer)
                return False
            writer.write(protocol.encode_result(await self.api.handle(consumer, request)))
            return True
        except ProtocolError as e:  # the peer's framing cannot be trusted any further
            writer.write(protocol.encode_error(e))
            return False
        except DevidError as e:
            writer.write(protocol.encode_error(e))
            return True
        except Exception:
            log.exception("identity API request failed")
            writer.write(protocol.encode_error(DevidError(
                "internal error in the agent",
                "see the agent's log (journalctl -u devid-agent) and report it")))
            return False

    async def _watch(self, consumer: ConsumerSection, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        closed = asyncio.Event()

        async def until_eof() -> None:
            with contextlib.suppress(ConnectionError, ValueError):
                while await reader.read(4096):
                    pass  # a watcher has nothing more to say; anything sent is ignored
            closed.set()

        eof = asyncio.create_task(until_eof())
        try:
            await self.api.watch(consumer, _StreamPeer(writer), closed)
        finally:
            eof.cancel()
