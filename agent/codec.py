"""Decoding outside data: JSON objects, base64, TPM structures. Pure.

Every parser in the project (control socket, key blobs, enrollment messages)
goes through these helpers, so they all refuse bad input the same way: a
typed DevidError that says what was wrong and where, never a traceback.
The caller picks the error type (ProtocolError for a peer's message,
StateError for our own files).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from agent.errors import DevidError, ProtocolError


class _Unmarshallable(Protocol):
    @classmethod
    def unmarshal(cls, data: bytes) -> tuple[Any, int]: ...


T = TypeVar("T", bound=_Unmarshallable)
# An error class, or any callable that turns a message into an error.
ErrorFactory = Callable[[str], DevidError]


def format_location(parts: Sequence[int | str]) -> str:
    """`key[0].sub` for a path into a decoded document (config or message)."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def decode_json_object(data: bytes, where: str,
                       error: ErrorFactory = ProtocolError) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise error(f"{where}: expected a JSON object, got {type(doc).__name__}")
    return doc


def b64decode_strict(value: object, where: str,
                     error: ErrorFactory = ProtocolError) -> bytes:
    """Standard base64 with padding; any other character is refused, not skipped."""
    if not isinstance(value, str):
        raise error(f"{where}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise error(f"{where}: not valid base64") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unmarshal_exact(cls: type[T], data: bytes, where: str,
                    error: ErrorFactory = ProtocolError) -> T:
    """Unmarshal a TPM structure that must use all of `data`."""
    try:
        obj, used = cls.unmarshal(data)
    except Exception:  # the TSS MU layer raises its own exception types
        raise error(f"{where}: not a valid {cls.__name__}") from None
    if used != len(data):
        raise error(f"{where}: {len(data) - used} trailing bytes after {cls.__name__}")
    return obj  # type: ignore[no-any-return]
