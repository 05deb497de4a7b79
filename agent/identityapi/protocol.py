"""The identity API's wire protocol, sans-IO (docs/identity-api.md).

One JSON object per line over a Unix stream socket, version 1:

    -> {"v": 1, "method": "credentials", "params": {}}
    <- {"v": 1, "ok": true, "result": {...}}
    <- {"v": 1, "ok": false, "error": {"type": "...", "message": "...", "hint": "..."}}

A connection may carry several requests, one after the other. `watch` is
the last request on its connection: the agent then sends one event line per
change, `{"v": 1, "ok": true, "event": "credentials" | "withdrawn", "result":
{...}}`, until either side closes.

Both sides use these functions: the agent's server (agent/identityapi/
server.py) and the consumer client (agent/consumer/client.py) are thin
shells around them.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from agent.codec import b64decode_strict
from agent.errors import DevidError, ProtocolError
from agent.framing import decode_line, encode_line

VERSION = 1
MAX_REQUEST = 64 * 1024  # the largest request is `sign` with MAX_SIGN_DATA, base64
MAX_RESPONSE = 1 << 20  # credential sets with long chains
MAX_SIGN_DATA = 16 * 1024  # a JWT or similar assertion, not a file

# Method -> the grant it needs (None: any declared consumer).
GRANT_FOR = {"hello": None, "credentials": "credentials", "watch": "credentials",
             "sign": "sign", "secret": "secrets"}
METHODS = tuple(GRANT_FOR)
GRANTS = ("credentials", "sign", "secrets")
EVENTS = ("credentials", "withdrawn")

SECRET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SECRET_BYTES = 32
MAX_SECRETS = 16  # per consumer: each is a TPM object created and a file kept


@dataclass(frozen=True)
class Request:
    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    """One line from the agent: a result, an error, or a watch event."""
    ok: bool
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    event: str | None = None


def encode_request(request: Request) -> bytes:
    return encode_line({"v": VERSION, "method": request.method, "params": request.params})


def decode_request(line: bytes) -> Request:
    doc = decode_line(line, "request", VERSION, MAX_REQUEST)
    method, params = doc.get("method"), doc.get("params", {})
    if method not in GRANT_FOR:
        raise ProtocolError(f"request: unknown method {method!r} (known: {', '.join(METHODS)})")
    if not isinstance(params, dict):
        raise ProtocolError("request: params must be an object")
    if method == "sign":
        sign_data(params)
    elif method == "secret":
        secret_name(params)
    return Request(method, params)


def sign_data(params: dict[str, Any]) -> bytes:
    """The bytes a `sign` request asks the identity key to sign."""
    data = b64decode_strict(params.get("data"), "request: params.data")
    if not 0 < len(data) <= MAX_SIGN_DATA:
        raise ProtocolError(f"request: params.data: {len(data)} bytes; expected 1 to "
                            f"{MAX_SIGN_DATA}")
    return data


def secret_name(params: dict[str, Any]) -> str:
    name = params.get("name")
    if not isinstance(name, str) or not SECRET_NAME.match(name):
        raise ProtocolError(f"request: params.name: expected 1-63 characters of a-z, 0-9, "
                            f"'-' and '_', starting with a letter or digit; got {name!r}")
    return name


def encode_result(result: dict[str, Any]) -> bytes:
    return encode_line({"v": VERSION, "ok": True, "result": result})


def encode_event(event: str, result: dict[str, Any]) -> bytes:
    assert event in EVENTS
    return encode_line({"v": VERSION, "ok": True, "event": event, "result": result})


def encode_error(error: DevidError) -> bytes:
    return encode_line({"v": VERSION, "ok": False, "error": error.to_dict()})


def decode_message(line: bytes) -> Message:
    doc = decode_line(line, "identity API message", VERSION, MAX_RESPONSE)
    event = doc.get("event")
    if event is not None and event not in EVENTS:
        raise ProtocolError(f"identity API message: unknown event {event!r}")
    if doc.get("ok") is True and isinstance(doc.get("result"), dict):
        return Message(True, result=doc["result"], event=event)
    err = doc.get("error")
    if doc.get("ok") is False and isinstance(err, dict) and isinstance(err.get("message"), str):
        return Message(False, error={k: str(v) for k, v in err.items()})
    raise ProtocolError("identity API message: neither a result nor an error object")


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2), for JWS signatures."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(value: str, where: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", value):
        raise ProtocolError(f"{where}: not base64url")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{where}: not base64url") from None
