"""The control-socket protocol, sans-IO.

One request and one response per connection, each a single line of JSON:

    -> {"v": 1, "method": "status", "params": {}}
    <- {"v": 1, "ok": true, "result": {...}}
    <- {"v": 1, "ok": false, "error": {"type": "...", "message": "...", "hint": "..."}}

These functions only turn bytes into values and back; the asyncio server and
the blocking client are thin shells around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.errors import DevidError, ProtocolError
from agent.framing import decode_line, encode_line

VERSION = 1
MAX_LINE = 1 << 20  # responses carry status documents; requests are tiny
METHODS = ("status", "check", "renew", "decommission", "audit", "certificates", "consumers",
           "consumers-purge")
RENEW_WAIT_MAX = 300.0  # seconds `renew` with wait=true may take before the daemon gives up


@dataclass(frozen=True)
class Request:
    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Response:
    ok: bool
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None


def _encode(doc: dict[str, Any]) -> bytes:
    return encode_line(doc)


def _decode_object(line: bytes, what: str, max_line: int = MAX_LINE) -> dict[str, Any]:
    return decode_line(line, what, VERSION, max_line)


def encode_request(request: Request) -> bytes:
    return _encode({"v": VERSION, "method": request.method, "params": request.params})


def decode_request(line: bytes, methods: tuple[str, ...] = METHODS,
                   max_line: int = MAX_LINE) -> Request:
    """`methods`: what the server answers (the agent's by default; the broker has its own);
    `max_line`: the server's request limit."""
    doc = _decode_object(line, "request", max_line)
    method, params = doc.get("method"), doc.get("params", {})
    if method not in methods:
        raise ProtocolError(f"request: unknown method {method!r} (known: {', '.join(methods)})")
    if not isinstance(params, dict):
        raise ProtocolError("request: params must be an object")
    return Request(method, params)


def encode_result(result: dict[str, Any]) -> bytes:
    return _encode({"v": VERSION, "ok": True, "result": result})


def encode_error(error: DevidError) -> bytes:
    return _encode({"v": VERSION, "ok": False, "error": error.to_dict()})


def decode_response(line: bytes, max_line: int = MAX_LINE) -> Response:
    """`max_line`: larger for answers that carry many records (a batch of sensors)."""
    doc = _decode_object(line, "response", max_line)
    if doc.get("ok") is True and isinstance(doc.get("result"), dict):
        return Response(True, result=doc["result"])
    err = doc.get("error")
    if doc.get("ok") is False and isinstance(err, dict) and isinstance(err.get("message"), str):
        return Response(False, error={k: str(v) for k, v in err.items()})
    raise ProtocolError("response: neither a result nor an error object")
