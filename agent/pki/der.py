"""The few DER encodings the certificate profile needs that cryptography has no type for
(RFC 4108's HardwareModuleName). Pure; X.690 definite-length encoding only."""

from __future__ import annotations

SEQUENCE, OCTET_STRING, OBJECT_IDENTIFIER = 0x30, 0x04, 0x06


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _base128(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39):
        raise ValueError(f"{dotted!r}: not an object identifier")
    body = _base128(arcs[0] * 40 + arcs[1]) + b"".join(_base128(a) for a in arcs[2:])
    return tlv(OBJECT_IDENTIFIER, body)


def hardware_module_name(hw_type: str, hw_serial: bytes) -> bytes:
    """HardwareModuleName ::= SEQUENCE { hwType OBJECT IDENTIFIER, hwSerialNum OCTET STRING }"""
    return tlv(SEQUENCE, oid(hw_type) + tlv(OCTET_STRING, hw_serial))
