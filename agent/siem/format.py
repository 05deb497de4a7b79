"""An event as the SIEM gets it: RFC 5424 syslog with structured data, or a JSON line.
Pure.

    <132>1 2026-11-23T23:45:01.123456Z gw-7 devid-broker 812 sensor-anomaly
        [devid@32473 event="sensor-anomaly" message_id="..." sensor="urn:..."
        finding="interval" ...] sensor t-1: interval (score 12.0): ...

- PRI: facility `authpriv` (10) and the event's severity.
- MSGID: the event's name (at most 32 printable characters, as RFC 5424 6.2.7 says).
- Structured data: one element, `devid@32473`, with the event's name, its journald
  MESSAGE_ID, the gateway's device ID and every field the event carries
  (lower-case, without the DEVID_ prefix). 32473 is the private enterprise number
  RFC 5612 sets aside for documentation: a deployment with its own PEN may rename
  the element (`[siem] sd_id`). Values are escaped as RFC 5424 6.3.3 says
  (`"`, `\\` and `]`), and names limited to 32 printable characters without `= ]"`.
- Framing over TLS: octet counting (RFC 5425 4.3): the length, a space, the message.

JSON lines carry the same: one object per line, with the time in RFC 3339.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

FACILITY_AUTHPRIV = 10
SD_ID = "devid@32473"
_SEVERITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}
_NAME = re.compile(r"[^!-~]|[=\]\"]")  # not allowed in an SD-NAME or PARAM-NAME


@dataclass(frozen=True)
class Event:
    """One journaled event, as the forwarder took it from the log record."""

    name: str
    message_id: str
    level: int
    time: float  # seconds since the epoch
    message: str
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def severity(self) -> int:
        return next((s for level, s in sorted(_SEVERITY.items(), reverse=True)
                     if self.level >= level), 7)


def _timestamp(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


def _header_field(text: str, limit: int) -> str:
    """A header field: printable US-ASCII, no spaces, at most `limit`; NILVALUE if empty."""
    clean = re.sub(r"[^!-~]", "_", text)[:limit]
    return clean or "-"


def _param_name(key: str) -> str:
    return _NAME.sub("_", key)[:32] or "_"


def _param_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(event: Event, hostname: str, app: str, procid: int,
                   sd_id: str = SD_ID) -> bytes:
    """The RFC 5424 message (without framing), UTF-8 with the BOM before MSG."""
    pri = FACILITY_AUTHPRIV * 8 + event.severity
    params = {"event": event.name, "message_id": event.message_id, **event.fields}
    sd = f"[{_param_name(sd_id)}" + "".join(
        f' {_param_name(k)}="{_param_value(v)}"' for k, v in params.items()) + "]"
    header = f"<{pri}>1 {_timestamp(event.time)} {_header_field(hostname, 255)} " \
             f"{_header_field(app, 48)} {procid} {_header_field(event.name, 32)}"
    return f"{header} {sd} ".encode() + b"\xef\xbb\xbf" + event.message.encode(
        "utf-8", "replace")


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 4.3 framing: MSG-LEN SP SYSLOG-MSG."""
    return str(len(message)).encode() + b" " + message


def json_line(event: Event, hostname: str, app: str) -> bytes:
    doc: dict[str, Any] = {"time": _timestamp(event.time), "host": hostname, "app": app,
                           "event": event.name, "message_id": event.message_id,
                           "severity": event.severity, "message": event.message,
                           **event.fields}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
