"""Sensor secrets at rest: AES-256-GCM under the broker's data key. Pure.

The data key is a 32-byte secret the agent keeps sealed to the TPM (the
identity API's `secrets`); the broker holds it in memory only. Each record is
sealed with a fresh 96-bit nonce and bound (AAD) to the sensor's ID and the
record's purpose, so a ciphertext copied onto another sensor's row does not
open. Duplicate keys are found without decrypting: a keyed fingerprint
(HMAC-SHA-256 under a key derived from the data key) is stored beside each
record, unique in the database.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import StateError
from agent.secret import SecretBytes

DATA_KEY_BYTES = 32
NONCE_BYTES = 12
_AAD_LABEL = b"devid-sensor-record-v1"


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=label).derive(key)


class RecordCipher:
    def __init__(self, data_key: SecretBytes) -> None:
        if len(data_key) != DATA_KEY_BYTES:
            raise ValueError(f"the data key must be {DATA_KEY_BYTES} bytes")
        raw = data_key.reveal()
        self._aead = AESGCM(_derive(raw, b"devid-sensor-records"))
        self._fingerprint_key = _derive(raw, b"devid-sensor-fingerprints")
        # Identifies the key (not secret): tells a wrong data key from damaged records.
        self.key_id = hashlib.sha256(_derive(raw, b"devid-sensor-key-id")).hexdigest()[:16]

    def seal(self, sensor_id: str, purpose: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, self._aad(sensor_id, purpose))

    def open(self, sensor_id: str, purpose: str, sealed: bytes) -> bytes:
        if len(sealed) < NONCE_BYTES + 16:
            raise StateError(f"sensor {sensor_id}: the sealed {purpose} is truncated")
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                      self._aad(sensor_id, purpose))
        except InvalidTag:
            raise StateError(f"sensor {sensor_id}: the sealed {purpose} does not open with "
                             "this data key (damaged, or moved from another row)") from None

    def fingerprint(self, secret: SecretBytes) -> bytes:
        return hmac.new(self._fingerprint_key, secret.reveal(), hashlib.sha256).digest()

    @staticmethod
    def _aad(sensor_id: str, purpose: str) -> bytes:
        return b"\x00".join((_AAD_LABEL, sensor_id.encode(), purpose.encode()))
