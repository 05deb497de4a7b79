"""LwM2M content formats, decoded to (path, value) and encoded for a Write. Pure.

What a sensor answers a Read with comes from outside: every decoder checks
lengths, nesting and types, and refuses with a ContentError saying what and
where (the byte offset, or the SenML record), never with a traceback.

- TLV (11542, and 1.0's 1542): OMA LwM2M Core 7.4.3. TLV carries no types, so a
  resource's bytes are read by the small model below where it knows the
  resource, else as text when they are printable UTF-8, an integer when they
  are 1, 2, 4 or 8 bytes, and hex otherwise; the output says which (`as`).
- SenML JSON (110) and SenML CBOR (112, through cbor2): RFC 8428 records, with
  LwM2M's base name and name giving the path, and `vlo` for object links.
- Plain text (0) and opaque (42) for one resource; CBOR (60) for one value.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import cbor2

from agent.errors import Lwm2mError

TEXT, OPAQUE, CBOR, SENML_JSON, SENML_CBOR, TLV, TLV_10, JSON_10 = \
    0, 42, 60, 110, 112, 11542, 1542, 11543
NAMES = {TEXT: "text", OPAQUE: "opaque", CBOR: "cbor", SENML_JSON: "senml-json",
         SENML_CBOR: "senml-cbor", TLV: "tlv", TLV_10: "tlv"}
MAX_VALUES = 4096
_PATH = re.compile(r"^/(0|[1-9][0-9]{0,4})(/(0|[1-9][0-9]{0,4})){0,3}$")

# Types of resources common sensors expose (OMA registry): what TLV cannot say.
MODEL: dict[tuple[int, int], str] = {
    (3, 0): "string", (3, 1): "string", (3, 2): "string", (3, 3): "string",
    (3, 9): "integer", (3, 10): "integer", (3, 11): "integer", (3, 13): "time",
    (3, 14): "string", (3, 15): "string", (3, 16): "string", (3, 17): "string",
    (3, 18): "string", (3, 19): "string", (3, 20): "integer", (3, 21): "integer",
    (5, 1): "string", (5, 3): "integer", (5, 5): "integer", (5, 6): "string",
    (5, 7): "string", (5, 9): "integer",
    (3303, 5700): "float", (3303, 5701): "string", (3303, 5601): "float",
    (3303, 5602): "float", (3304, 5700): "float", (3304, 5701): "string",
}


class ContentError(Lwm2mError):
    """A payload that is not what its Content-Format says."""


@dataclass(frozen=True)
class Value:
    path: str  # /object/instance/resource[/resource-instance]
    value: str | int | float | bool | bytes | None
    kind: str  # string, integer, float, boolean, opaque, time, objlnk, hex

    def to_dict(self) -> dict[str, Any]:
        value = self.value.hex() if isinstance(self.value, bytes) else self.value
        return {"path": self.path, "value": value, "as": self.kind}


def parse_path(text: str) -> tuple[int, ...]:
    """/3/0/1 -> (3, 0, 1); Lwm2mError unless 1 to 4 IDs from 0 to 65534."""
    if not _PATH.match(text) or any(int(p) > 65534 for p in text.split("/")[1:]):
        raise Lwm2mError(f"path {text[:40]!r}: expected /OBJECT[/INSTANCE[/RESOURCE["
                         "/RESOURCE-INSTANCE]]], each an ID from 0 to 65534")
    return tuple(int(p) for p in text.split("/")[1:])


def decode(content_format: int | None, payload: bytes, path: tuple[int, ...]) -> list[Value]:
    """The values in a Read's answer to `path`."""
    if content_format in (TLV, TLV_10):
        if len(path) < 3:
            return _Tlv(payload, path).values()
        # A resource (or resource instance) comes as its own TLV, ID included (Core
        # 7.4.3): read from the level above, and it must be the one asked for.
        values = _Tlv(payload, path[:-1]).values()
        where = _text_path(path)
        for value in values:
            if value.path != where and not value.path.startswith(where + "/"):
                raise ContentError(f"TLV: {value.path} in the answer to a Read of {where}")
        return values
    if content_format == SENML_JSON:
        try:
            records = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ContentError(f"SenML JSON: not JSON ({e})") from None
        return _senml(records, path, "JSON")
    if content_format == SENML_CBOR:
        try:
            records = cbor2.loads(payload)
        except Exception as e:  # cbor2 raises several kinds for damaged input
            raise ContentError(f"SenML CBOR: not CBOR ({type(e).__name__}: {e})") from None
        return _senml(records, path, "CBOR")
    where = _text_path(path)
    if content_format in (None, TEXT):
        try:
            return [Value(where, payload.decode("utf-8"), "string")]
        except UnicodeDecodeError as e:
            raise ContentError(f"text/plain: not UTF-8 at byte {e.start}") from None
    if content_format == OPAQUE:
        return [Value(where, payload, "opaque")]
    if content_format == CBOR:
        try:
            item = cbor2.loads(payload)
        except Exception as e:
            raise ContentError(f"CBOR: not CBOR ({type(e).__name__}: {e})") from None
        if not isinstance(item, str | int | float | bool | bytes):
            raise ContentError(f"CBOR: a {type(item).__name__}, not one resource value")
        return [Value(where, item, _kind(item))]
    raise ContentError(f"Content-Format {content_format}: not one LwM2M uses (text 0, "
                       "opaque 42, CBOR 60, SenML JSON 110, SenML CBOR 112, TLV 11542)")


def _text_path(path: tuple[int, ...]) -> str:
    if len(path) < 3:
        raise ContentError("a single value answers a resource, not "
                           + "/".join(["", *map(str, path)]))
    return "/" + "/".join(map(str, path))


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, bytes):
        return "opaque"
    return "string"


# TLV identifier types, and the path length each stands at.
_TLV_KINDS = ("object instance", "resource instance", "multiple resource", "resource")
_TLV_DEPTH = (2, 4, 3, 3)


class _Tlv:
    def __init__(self, data: bytes, path: tuple[int, ...]) -> None:
        self.data, self.path, self.count = data, path, 0

    def values(self) -> list[Value]:
        return self._entries(0, len(self.data), self.path)

    def _entries(self, at: int, end: int, path: tuple[int, ...]) -> list[Value]:
        out: list[Value] = []
        while at < end:
            kind, ident, start, length = self._header(at, end)
            inner = (*path, ident)
            if len(inner) != _TLV_DEPTH[kind]:
                raise ContentError(f"TLV, byte {at}: {_TLV_KINDS[kind]} at "
                                   f"{'/'.join(['', *map(str, inner)])} is not where LwM2M "
                                   "puts one")
            if kind in (0, 2):  # object instance, multiple resource: TLVs inside
                out += self._entries(start, start + length, inner)
            else:
                self.count += 1
                if self.count > MAX_VALUES:
                    raise ContentError(f"TLV: more than {MAX_VALUES} values")
                out.append(_typed(inner, self.data[start:start + length]))
            at = start + length
        return out

    def _header(self, at: int, end: int) -> tuple[int, int, int, int]:
        """(identifier type, identifier, value start, value length) of the TLV at `at`."""
        data = self.data
        if at >= end:
            raise ContentError(f"TLV, byte {at}: expected a type byte, found the end")
        byte = data[at]
        kind, id_len, len_type = byte >> 6, 2 if byte & 0x20 else 1, (byte >> 3) & 3
        pos = at + 1
        if pos + id_len + len_type > end:
            raise ContentError(f"TLV, byte {at}: the header runs past the end")
        ident = int.from_bytes(data[pos:pos + id_len], "big")
        pos += id_len
        length = byte & 7 if len_type == 0 else int.from_bytes(data[pos:pos + len_type], "big")
        pos += len_type
        if pos + length > end:
            raise ContentError(f"TLV, byte {at}: a value of {length} bytes runs past the end "
                               f"(byte {end})")
        if ident > 65534:
            raise ContentError(f"TLV, byte {at}: identifier {ident} is above 65534")
        return kind, ident, pos, length


def _typed(path: tuple[int, ...], raw: bytes) -> Value:
    where = "/" + "/".join(map(str, path))
    kind = MODEL.get((path[0], path[2])) if len(path) >= 3 else None
    try:
        if kind == "string":
            return Value(where, raw.decode("utf-8"), kind)
        if kind in ("integer", "time") and len(raw) in (1, 2, 4, 8):
            return Value(where, int.from_bytes(raw, "big", signed=True), kind)
        if kind == "float" and len(raw) in (4, 8):
            number = struct.unpack(">f" if len(raw) == 4 else ">d", raw)[0]
            return Value(where, round(number, 7) if len(raw) == 4 else number, kind)
    except UnicodeDecodeError:
        pass  # not what the model says: shown as the bytes it is
    if raw and all(32 <= b < 127 for b in raw):
        return Value(where, raw.decode("ascii"), "string")
    if len(raw) in (1, 2, 4, 8):
        return Value(where, int.from_bytes(raw, "big", signed=True), "integer")
    return Value(where, raw, "hex")


_SENML_LABELS = {-2: "bn", -3: "bt", 0: "n", 2: "v", 3: "vs", 4: "vb", 8: "vd", 6: "t",
                 1: "u", 5: "s"}


def _senml(records: object, path: tuple[int, ...], framing: str) -> list[Value]:
    if not isinstance(records, list):
        raise ContentError(f"SenML {framing}: expected an array of records")
    if len(records) > MAX_VALUES:
        raise ContentError(f"SenML {framing}: more than {MAX_VALUES} records")
    base = ""
    out: list[Value] = []
    for index, record in enumerate(records):
        where = f"SenML {framing}, record {index}"
        if not isinstance(record, dict):
            raise ContentError(f"{where}: not a map")
        fields = {(_SENML_LABELS.get(k, str(k)) if isinstance(k, int) else k): v
                  for k, v in record.items()}
        if "bn" in fields:
            if not isinstance(fields["bn"], str):
                raise ContentError(f"{where}: bn is not a string")
            base = fields["bn"]
        name = fields.get("n", "")
        if not isinstance(name, str):
            raise ContentError(f"{where}: n is not a string")
        full = base + name
        try:
            parse_path(full)
        except Lwm2mError:
            raise ContentError(f"{where}: name {full[:40]!r} is not an LwM2M path") from None
        present = [k for k in ("v", "vs", "vb", "vd", "vlo") if k in fields]
        if len(present) != 1:
            raise ContentError(f"{where}: expected one value (v, vs, vb, vd or vlo), "
                               f"found {len(present)}")
        key = present[0]
        value = fields[key]
        out.append(_senml_value(where, full, key, value, framing))
    return out


def _senml_value(where: str, path: str, key: str, value: object, framing: str) -> Value:
    if key == "v":
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                (isinstance(value, float) and not math.isfinite(value)):
            raise ContentError(f"{where}: v is not a finite number")
        return Value(path, value, "integer" if isinstance(value, int) else "float")
    if key == "vb":
        if not isinstance(value, bool):
            raise ContentError(f"{where}: vb is not a boolean")
        return Value(path, value, "boolean")
    if key == "vd":
        if framing == "CBOR":
            if not isinstance(value, bytes):
                raise ContentError(f"{where}: vd is not a byte string")
            return Value(path, value, "opaque")
        if not isinstance(value, str):
            raise ContentError(f"{where}: vd is not base64url text")
        try:
            return Value(path, base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)),
                         "opaque")
        except ValueError:
            raise ContentError(f"{where}: vd is not base64url") from None
    if not isinstance(value, str):
        raise ContentError(f"{where}: {key} is not a string")
    return Value(path, value, "objlnk" if key == "vlo" else "string")


def encode_text(value: str) -> tuple[int, bytes]:
    """A Write of one resource, as text/plain (every LwM2M version takes it)."""
    return TEXT, value.encode("utf-8")


Resource = str | int | bool | bytes


def encode_tlv(resources: dict[int, Resource]) -> bytes:
    """An object instance's resources as TLV (for a Write or a Bootstrap-Write): strings
    as UTF-8, integers in the fewest of 1, 2, 4 or 8 bytes, booleans as one byte."""
    out = bytearray()
    for ident, value in resources.items():
        if isinstance(value, bool):
            raw = bytes([int(value)])
        elif isinstance(value, int):
            size = next(n for n in (1, 2, 4, 8) if -(1 << (8 * n - 1)) <= value < 1 << (8 * n - 1))
            raw = value.to_bytes(size, "big", signed=True)
        elif isinstance(value, str):
            raw = value.encode("utf-8")
        else:
            raw = bytes(value)
        out += _tlv_header(3, ident, len(raw)) + raw
    return bytes(out)


def encode_tlv_instances(instances: dict[int, dict[int, Resource]]) -> bytes:
    """Object instances, each with its resources, as TLV (a Read of a whole object)."""
    out = bytearray()
    for ident, resources in instances.items():
        inner = encode_tlv(resources)
        out += _tlv_header(0, ident, len(inner)) + inner
    return bytes(out)


def encode_senml_json(base: str, resources: dict[str, Resource]) -> bytes:
    """Resources as SenML JSON (RFC 8428, LwM2M 1.1+): `base` the path they share,
    names relative to it; strings as vs, numbers as v, booleans as vb."""
    records: list[dict[str, Any]] = []
    for name, value in resources.items():
        record: dict[str, Any] = {"n": name}
        if isinstance(value, bool):
            record["vb"] = value
        elif isinstance(value, int):
            record["v"] = value
        elif isinstance(value, bytes):
            record["vd"] = base64.urlsafe_b64encode(value).rstrip(b"=").decode()
        else:
            record["vs"] = value
        records.append(record)
    if records:
        records[0] = {"bn": base, **records[0]}
    return json.dumps(records, separators=(",", ":")).encode()


def _tlv_header(kind: int, ident: int, length: int) -> bytes:
    byte = kind << 6 | (0x20 if ident > 0xFF else 0)
    ident_bytes = ident.to_bytes(2 if ident > 0xFF else 1, "big")
    if length < 8:
        return bytes([byte | length]) + ident_bytes
    size = 1 if length < 1 << 8 else 2 if length < 1 << 16 else 3
    return bytes([byte | size << 3]) + ident_bytes + length.to_bytes(size, "big")
