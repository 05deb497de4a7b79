"""Sealed device challenges: everything the registrar needs is in the ID, MAC-protected."""

from __future__ import annotations

import base64

import pytest

from agent.errors import Problem
from agent.registrar.sealedchallenge import ID_LENGTH, ChallengeSealer, device_hash

DEVICE = "urn:devid:" + "ab" * 16
KEY = bytes(range(32))
NOW = 1_800_000_000


def _refused(sealer: ChallengeSealer, challenge_id: str, purpose: str = "renew",
             now: float = NOW) -> Problem:
    with pytest.raises(Problem) as exc:
        sealer.open(challenge_id, purpose, now)
    return exc.value


def test_a_sealed_challenge_opens_to_what_was_sealed():
    sealer = ChallengeSealer(KEY)
    sealed = sealer.seal(DEVICE, "renew", NOW + 120, b"\x01" * 8)
    assert len(sealed.id) == ID_LENGTH and len(sealed.nonce) == 32
    opened = sealer.open(sealed.id, "renew", NOW)
    assert opened == sealed
    # Another random part: another ID and another nonce for the same device.
    again = sealer.seal(DEVICE, "renew", NOW + 120, b"\x02" * 8)
    assert again.id != sealed.id and again.nonce != sealed.nonce


def test_what_is_refused_and_why():
    sealer = ChallengeSealer(KEY)
    sealed = sealer.seal(DEVICE, "renew", NOW + 120, b"\x01" * 8)
    assert _refused(sealer, sealed.id, "decommission").message == \
        "challenge was not issued for decommission"
    expired = _refused(sealer, sealed.id, now=NOW + 130)
    assert expired.code == "challenge-expired" and "10s ago" in expired.message
    other_key = _refused(ChallengeSealer(bytes(32)), sealed.id)
    assert other_key.code == "challenge-unknown" and "not issued by this registrar" in \
        other_key.message
    raw = bytearray(base64.urlsafe_b64decode(sealed.id + "=="))
    raw[5] ^= 1  # another purpose or device, MAC unchanged
    tampered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert _refused(sealer, tampered).code == "challenge-unknown"
    assert _refused(sealer, "c" * 32).message == "challenge id must be 62 base64url characters"
    assert _refused(sealer, "!" * 62).code == "challenge-unknown"


def test_one_spelling_per_challenge():
    # The last character carries 2 unused bits: another spelling of the same bytes must
    # not count as another challenge (the ID is the single-use key).
    sealer = ChallengeSealer(KEY)
    sealed = sealer.seal(DEVICE, "renew", NOW + 120, b"\x01" * 8)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sealed.id[-1])
    variant = sealed.id[:-1] + alphabet[last ^ 1]
    assert base64.urlsafe_b64decode(variant + "==") == \
        base64.urlsafe_b64decode(sealed.id + "==")
    assert _refused(sealer, variant).code == "challenge-unknown"


def test_only_registrar_made_device_ids_can_be_sealed():
    assert device_hash(DEVICE) == bytes.fromhex("ab" * 16)
    for bad in ("urn:devid:ab", "urn:devid:" + "AB" * 16, "urn:other:" + "ab" * 16, ""):
        assert device_hash(bad) is None
    with pytest.raises(ValueError, match="not a device ID"):
        ChallengeSealer(KEY).seal("urn:devid:ab", "renew", NOW, b"\x00" * 8)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        ChallengeSealer(b"short")
