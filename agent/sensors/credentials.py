"""Sensor credentials: minted from the OS's CSPRNG, never chosen, never shared. Pure.

OSCORE (RFC 8613): a 16-byte master secret, an 8-byte master salt, the
sensor's Sender ID (unique on this gateway: the broker finds the security
context by it) and the gateway's. DTLS 1.2 PSK (RFC 7925): a PSK identity
(unique, sent in clear in the handshake) and a 16-byte key.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from agent.errors import StateError
from agent.secret import SecretBytes

TRANSPORTS = ("oscore", "dtls-psk")
OSCORE_SECRET_BYTES = 16
OSCORE_SALT_BYTES = 8
PSK_BYTES = 16
GATEWAY_SENDER_ID = b"\x00"  # ours in every context; each context has its own keys
MAX_OSCORE_ID = 7  # bytes: AES-CCM-16-64-128's nonce (13) minus 6


MINTED_PSK_PREFIX = b"devid-s"  # minted PSK identities; imported ones may not use it


def sensor_sender_id(serial: int) -> bytes:
    """The OSCORE Sender ID minted for the sensor with registry serial `serial`: the serial,
    big-endian, shortest form (serials start at 1: never the gateway's b"\\x00"). The store
    keeps Sender IDs unique, also against imported ones."""
    if not 0 < serial < 1 << (8 * MAX_OSCORE_ID):
        raise ValueError(f"serial {serial} does not fit an OSCORE Sender ID")
    return serial.to_bytes((serial.bit_length() + 7) // 8, "big")


def psk_identity(serial: int) -> bytes:
    return MINTED_PSK_PREFIX + f"{serial:x}".encode()


@dataclass(frozen=True)
class OscoreCredential:
    master_secret: SecretBytes
    master_salt: bytes
    sender_id: bytes  # the sensor's (the gateway's Recipient ID)
    recipient_id: bytes  # the gateway's (the sensor's Recipient ID)
    transport = "oscore"

    @property
    def secret(self) -> SecretBytes:
        return self.master_secret

    @property
    def kid(self) -> bytes:
        """What the broker finds this sensor by in a message: its Sender ID."""
        return self.sender_id

    def to_dict(self) -> dict[str, Any]:
        """The installer's view: what the sensor must be configured with."""
        return {"transport": self.transport, "master_secret": self.master_secret.reveal().hex(),
                "master_salt": self.master_salt.hex(),
                "sender_id": self.sender_id.hex(), "recipient_id": self.recipient_id.hex(),
                "aead": "AES-CCM-16-64-128", "hkdf": "HKDF-SHA-256"}


@dataclass(frozen=True)
class PskCredential:
    identity: bytes
    key: SecretBytes
    transport = "dtls-psk"

    @property
    def secret(self) -> SecretBytes:
        return self.key

    @property
    def kid(self) -> bytes:
        return self.identity

    def to_dict(self) -> dict[str, Any]:
        return {"transport": self.transport, "psk_identity": self.identity.decode("ascii"),
                "psk": self.key.reveal().hex(),
                "cipher_suites": ["TLS_PSK_WITH_AES_128_CCM_8", "TLS_PSK_WITH_AES_128_GCM_SHA256"]}


Credential = OscoreCredential | PskCredential


def mint(transport: str, kid: bytes) -> Credential:
    """Fresh keys for the sensor known by `kid` (its OSCORE Sender ID or PSK identity)."""
    if transport == "oscore":
        return OscoreCredential(SecretBytes(secrets.token_bytes(OSCORE_SECRET_BYTES)),
                                secrets.token_bytes(OSCORE_SALT_BYTES), kid, GATEWAY_SENDER_ID)
    if transport == "dtls-psk":
        return PskCredential(kid, SecretBytes(secrets.token_bytes(PSK_BYTES)))
    raise ValueError(f"unknown transport {transport!r} (known: {', '.join(TRANSPORTS)})")


def encode(credential: Credential) -> bytes:
    """The plaintext sealed at rest (atrest.py): compact JSON, hex fields."""
    return json.dumps(credential.to_dict(), separators=(",", ":"), sort_keys=True).encode()


def decode(data: bytes, where: str) -> Credential:
    """The inverse of encode(); StateError naming `where` for damaged records."""
    try:
        doc = json.loads(data)
        if doc["transport"] == "oscore":
            return OscoreCredential(SecretBytes(bytes.fromhex(doc["master_secret"])),
                                    bytes.fromhex(doc["master_salt"]),
                                    bytes.fromhex(doc["sender_id"]),
                                    bytes.fromhex(doc["recipient_id"]))
        if doc["transport"] == "dtls-psk":
            return PskCredential(doc["psk_identity"].encode("ascii"),
                                 SecretBytes(bytes.fromhex(doc["psk"])))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeError):
        pass
    raise StateError(f"{where}: the stored credential is damaged")
