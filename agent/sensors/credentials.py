"""Sensor credentials: minted from the OS's CSPRNG, never chosen, never shared. Pure.

OSCORE (RFC 8613): a 16-byte master secret, an 8-byte master salt, the
sensor's Sender ID (unique on this gateway: the broker finds the security
context by it) and the gateway's. DTLS 1.2 PSK (RFC 7925): a PSK identity
(unique, sent in clear in the handshake) and a 16-byte key. EDHOC (RFC 9528,
method 3 with cipher suite 2: static Diffie-Hellman keys on P-256 both sides):
the sensor's private key and its key ID, and the gateway's public credential,
so that each side authenticates the other; the OSCORE contexts EDHOC derives
are fresh each time and never stored.
"""

from __future__ import annotations

import functools
import json
import secrets
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import StateError
from agent.secret import SecretBytes

TRANSPORTS = ("oscore", "dtls-psk", "edhoc")
IMPORTABLE = ("oscore", "dtls-psk")  # factory keys; EDHOC sensors are added here
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


EDHOC_METHOD, EDHOC_SUITE = 3, 2  # static DH both sides; AES-CCM-16-64-128, SHA-256, P-256


def p256_private_key() -> SecretBytes:
    """A P-256 private key (its scalar, 32 bytes, big-endian) from the OS's CSPRNG."""
    key = ec.generate_private_key(ec.SECP256R1())
    return SecretBytes(key.private_numbers().private_value.to_bytes(32, "big"))


def edhoc_ccs(private_key: SecretBytes, kid: bytes) -> bytes:
    """The CBOR Web Token Claims Set (RFC 8392) that is a P-256 key's EDHOC credential
    (RFC 9528 3.5.2): {cnf: {COSE_Key: {kty: EC2, kid, crv: P-256, x, y}}}, encoded
    deterministically, as both sides must hash the same bytes."""
    public = ec.derive_private_key(int.from_bytes(private_key.reveal(), "big"),
                                   ec.SECP256R1()).public_key().public_numbers()
    cose_key = {1: 2, 2: kid, -1: 1, -2: public.x.to_bytes(32, "big"),
                -3: public.y.to_bytes(32, "big")}
    return cbor2.dumps({8: {1: cose_key}}, canonical=True)


@dataclass(frozen=True)
class EdhocCredential:
    private_key: SecretBytes  # the sensor's static DH key
    key_id: bytes  # the sensor's credential by reference: ID_CRED_I = {4: key_id}
    gateway_credential: bytes  # CRED_R: the gateway's CCS, which the sensor checks
    transport = "edhoc"

    @property
    def secret(self) -> SecretBytes:
        return self.private_key

    @property
    def kid(self) -> bytes:
        return self.key_id

    @functools.cached_property
    def credential(self) -> bytes:
        """CRED_I: the sensor's CCS, which the gateway checks message 3 against (derived
        once: a point multiplication)."""
        return edhoc_ccs(self.private_key, self.key_id)

    def to_dict(self) -> dict[str, Any]:
        return {"transport": self.transport, "private_key": self.private_key.reveal().hex(),
                "key_id": self.key_id.hex(), "credential": self.credential.hex(),
                "gateway_credential": self.gateway_credential.hex(),
                "method": EDHOC_METHOD, "cipher_suite": EDHOC_SUITE}


Credential = OscoreCredential | PskCredential | EdhocCredential


def mint(transport: str, kid: bytes, gateway_edhoc: bytes | None = None) -> Credential:
    """Fresh keys for the sensor known by `kid` (its OSCORE Sender ID, PSK identity or
    EDHOC key ID); an EDHOC credential also names the gateway's (`gateway_edhoc`)."""
    if transport == "oscore":
        return OscoreCredential(SecretBytes(secrets.token_bytes(OSCORE_SECRET_BYTES)),
                                secrets.token_bytes(OSCORE_SALT_BYTES), kid, GATEWAY_SENDER_ID)
    if transport == "dtls-psk":
        return PskCredential(kid, SecretBytes(secrets.token_bytes(PSK_BYTES)))
    if transport == "edhoc":
        if gateway_edhoc is None:
            raise ValueError("an EDHOC credential needs the gateway's")
        return EdhocCredential(p256_private_key(), kid, gateway_edhoc)
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
        if doc["transport"] == "edhoc":
            return EdhocCredential(SecretBytes(bytes.fromhex(doc["private_key"])),
                                   bytes.fromhex(doc["key_id"]),
                                   bytes.fromhex(doc["gateway_credential"]))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeError):
        pass
    raise StateError(f"{where}: the stored credential is damaged")
