"""Renewal and decommissioning challenges that cost the registrar nothing to issue. Pure.

Anyone may ask for a device challenge (device IDs are printed in every
certificate), so issuing one must not spend anything a flood could exhaust: no
row, no pool, no per-device slot an attacker could take from the real device.
The challenge ID therefore carries everything the registrar needs to check the
answer, sealed with an HMAC key only the registrar holds:

    base64url( version 1 | expires_at u32 | purpose 1 | device 16 | random 8 | mac 16 )

`device` is the 128-bit hash in the device ID (`urn:devid:<32 hex>`), `mac`
the first 16 bytes of HMAC-SHA256(key, "devid-challenge-id" | the bytes
before it), and the nonce the device quotes and signs is HMAC-SHA256(key,
"devid-challenge-nonce" | the same bytes): fresh and unpredictable, never
stored. The registrar writes a row only when the device answers with a valid
identity-key signature, to make the challenge single-use (see
LifecycleService). Any number of challenges may be outstanding for a device;
a flood of them neither fills anything nor displaces the device's own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from dataclasses import dataclass

from agent.enroll.problems import problem
from agent.registrar.base import NONCE_BYTES

VERSION = 1
PURPOSES = {"renew": 1, "decommission": 2}
DEVICE_ID = re.compile(r"^urn:devid:([0-9a-f]{32})$")
_HEADER = struct.Struct(">BIB16s8s")  # version, expires_at, purpose, device, random
MAC_BYTES = 16
RANDOM_BYTES = 8
SEALED_BYTES = _HEADER.size + MAC_BYTES  # 46
ID_LENGTH = 62  # base64url of 46 bytes, unpadded
ID_PATTERN = re.compile(rf"^[A-Za-z0-9_-]{{{ID_LENGTH}}}$")
ID_FORM = f"{ID_LENGTH} base64url characters"  # for "challenge id must be …"


@dataclass(frozen=True)
class SealedChallenge:
    id: str
    device_id: str
    purpose: str
    expires_at: int  # unix seconds
    nonce: bytes


def device_hash(device_id: str) -> bytes | None:
    """The 16 bytes a registrar-issued device ID carries; None for any other string."""
    match = DEVICE_ID.match(device_id)
    return bytes.fromhex(match.group(1)) if match else None


class ChallengeSealer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("a challenge key needs at least 32 bytes")
        self._key = key

    def _mac(self, label: bytes, body: bytes) -> bytes:
        return hmac.new(self._key, label + body, hashlib.sha256).digest()

    def seal(self, device_id: str, purpose: str, expires_at: int,
             random: bytes) -> SealedChallenge:
        """A challenge for `device_id` (which must be a registrar-issued ID)."""
        device = device_hash(device_id)
        if device is None:
            raise ValueError(f"{device_id!r} is not a device ID this registrar issues")
        if len(random) != RANDOM_BYTES:
            raise ValueError(f"random must be {RANDOM_BYTES} bytes")
        body = _HEADER.pack(VERSION, expires_at, PURPOSES[purpose], device, random)
        sealed = body + self._mac(b"devid-challenge-id", body)[:MAC_BYTES]
        challenge_id = base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")
        return SealedChallenge(challenge_id, device_id, purpose, expires_at,
                               self._mac(b"devid-challenge-nonce", body)[:NONCE_BYTES])

    def open(self, challenge_id: str, purpose: str, now: float) -> SealedChallenge:
        """The challenge behind an ID this registrar sealed for `purpose`, unexpired;
        else challenge-unknown or challenge-expired (which say nothing about devices)."""
        if not ID_PATTERN.match(challenge_id):
            raise problem("challenge-unknown", f"challenge id must be {ID_FORM}")
        try:
            sealed = base64.urlsafe_b64decode(challenge_id + "==")
        except (binascii.Error, ValueError):
            raise problem("challenge-unknown", "challenge id is not base64url") from None
        body, mac = sealed[:_HEADER.size], sealed[_HEADER.size:]
        # One spelling per challenge: the ID is its single-use key.
        canonical = base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")
        if len(sealed) != SEALED_BYTES or canonical != challenge_id or not hmac.compare_digest(
                mac, self._mac(b"devid-challenge-id", body)[:MAC_BYTES]):
            raise problem("challenge-unknown", "challenge id was not issued by this registrar")
        version, expires_at, purpose_code, device, _ = _HEADER.unpack(body)
        if version != VERSION or purpose_code != PURPOSES[purpose]:
            raise problem("challenge-unknown", f"challenge was not issued for {purpose}")
        if expires_at <= now:
            raise problem("challenge-expired", f"challenge expired {now - expires_at:.0f}s ago")
        return SealedChallenge(challenge_id, f"urn:devid:{device.hex()}", purpose, expires_at,
                               self._mac(b"devid-challenge-nonce", body)[:NONCE_BYTES])
