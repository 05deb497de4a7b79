"""The daemon's side of the control socket: an asyncio shell around protocol.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent import faults
from agent.control import protocol
from agent.control.peer import authorize, read_peer_credentials
from agent.errors import ControlError, DevidError, PermissionDenied

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
READ_TIMEOUT_S = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def listen_unix(path: Path, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                   Awaitable[None]],
                      limit: int, mode: int, gid: int | None, key: str,
                      program: str = "devid-agent") -> asyncio.AbstractServer:
    """Listen on a Unix socket at `path`, taking over a stale one left by a crash.
    Bound with a tight umask, then widened to `mode`: never a window with more."""
    _take_over_stale_socket(path, key, program)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(serve, path=str(path), limit=limit)
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    return server


def _take_over_stale_socket(path: Path, key: str, program: str) -> None:
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left over from a crash: nobody is listening
            return
    raise ControlError(
        f"another process is already serving {path}",
        hint=f"stop the other {program} first, or give this one another {key}",
    )


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler], allowed_gid: int | None,
                 max_request: int = protocol.MAX_LINE, program: str = "devid-agent") -> None:
        """`max_request`: larger where a request carries a file (the broker's imports)."""
        self.path = path
        self.handlers = handlers
        self.allowed_gid = allowed_gid
        self.max_request, self.program = max_request, program
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await listen_unix(self.path, self._serve, self.max_request,
                                         SOCKET_MODE, self.allowed_gid, "control_socket",
                                         self.program)
        log.info("control socket listening at %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._answer(reader, writer)
            writer.write(reply)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        peer = read_peer_credentials(writer.get_extra_info("socket"))
        # Read the (bounded, time-limited) request before answering even a
        # refused peer: closing first would hand it EPIPE instead of the reason.
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
        except (TimeoutError, ValueError) as e:  # ValueError: line over the limit
            return protocol.encode_error(ControlError(f"bad request: {e or 'timed out'}"))
        refusal = authorize(peer, os.geteuid(), self.allowed_gid)
        if refusal is not None:
            log.warning("control socket: refused %s", refusal)
            return protocol.encode_error(PermissionDenied(f"permission denied: {refusal}"))
        try:
            request = protocol.decode_request(line, tuple(self.handlers), self.max_request)
            faults.point(f"control.{request.method}")  # tests: a blocked loop
            result = await self.handlers[request.method](request.params)
            return protocol.encode_result(result)
        except DevidError as e:
            return protocol.encode_error(e)
        except Exception:
            log.exception("control request failed")
            return protocol.encode_error(
                DevidError("internal error in the agent", "see the agent's log (journalctl -u "
                           "devid-agent) and report it")
            )
