"""JSON-lines framing shared by the agent's local sockets. Pure.

Both the control socket and the identity API speak one JSON object per
line, each carrying the protocol version in `v`: these helpers turn such a
line into a dict and back, refusing oversized, non-JSON or wrong-version
lines with a ProtocolError that says which.
"""

from __future__ import annotations

import json
from typing import Any

from agent.codec import decode_json_object
from agent.errors import ProtocolError


def encode_line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def decode_line(line: bytes, what: str, version: int, max_line: int) -> dict[str, Any]:
    if len(line) > max_line:
        raise ProtocolError(f"{what}: longer than {max_line} bytes")
    if not line.strip():
        raise ProtocolError(f"{what}: empty line (or the connection closed first)")
    doc = decode_json_object(line, what)
    if doc.get("v") != version:
        raise ProtocolError(f"{what}: unsupported protocol version {doc.get('v')!r} "
                            f"(this side speaks {version})")
    return doc
