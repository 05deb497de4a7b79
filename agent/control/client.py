"""devidctl's side of the control socket: blocking, one request per connection."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

from agent.access import access_denied
from agent.control import protocol
from agent.errors import ControlError, DaemonNotRunning, PermissionDenied

DEFAULT_TIMEOUT_S = 30.0


def call(path: Path, method: str, params: dict[str, Any] | None = None,
         timeout: float = DEFAULT_TIMEOUT_S, command: str | None = None,
         max_line: int = protocol.MAX_LINE) -> dict[str, Any]:
    """Send one request; return its result or raise the daemon's error as ControlError.
    `command` is how the user ran us, for the "run `sudo …`" hint."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise DaemonNotRunning(f"devid-agent is not running (no control socket at {path})"
                                   ) from None
        except ConnectionRefusedError:
            raise DaemonNotRunning(f"devid-agent is not running (nobody listens on {path})"
                                   ) from None
        except PermissionError:
            denied = access_denied(path, "the agent's control socket", command)
            raise PermissionDenied(denied.message, denied.hint) from None
        except OSError as e:
            if e.errno == errno.ENOTSOCK:
                raise ControlError(f"{path} is not a socket") from None
            raise ControlError(f"cannot connect to {path}: {e.strerror}") from None
        try:
            sock.sendall(protocol.encode_request(protocol.Request(method, params or {})))
            line = _read_line(sock, max_line)
        except TimeoutError:
            raise ControlError(f"devid-agent did not answer within {timeout:.0f}s",
                               hint="the agent may be hung; check its log") from None
        except OSError as e:
            raise ControlError(f"control socket {path}: {e.strerror or e}") from None
    response = protocol.decode_response(line, max_line)
    if response.ok:
        assert response.result is not None
        return response.result
    err = response.error or {}
    cls = PermissionDenied if err.get("type") == PermissionDenied.code else ControlError
    error = cls(err.get("message", "unknown error"), err.get("hint") or None)
    error.code = err.get("type", error.code)
    raise error


def _read_line(sock: socket.socket, max_line: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n") or size > max_line:
            break
    return b"".join(chunks)
