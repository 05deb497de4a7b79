"""The gateway's identity record: STATE_DIR/enrollment.json.

One JSON document, written atomically (0600), holds everything that must
change together: the identity certificate chain, the TLS certificate chain
and its TPM-sealed key, and the lifecycle state. A rotation replaces the
whole document with one rename, so after a crash the agent finds the old
set or the new set, never a certificate without its key. Loading is
parsing outside data: damage is a StateError naming the file and field.

Format 1 (before rotation existed) is read as an identity without TLS
credentials; the next save writes format 2.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.codec import decode_json_object
from agent.enroll.client import EnrollmentResult
from agent.errors import StateError
from agent.fsutil import ensure_private_dir, read_state_file, remove_durably, write_atomic
from agent.tpm.blobs import KeyBlob

FORMAT_VERSION = 2
FILE_NAME = "enrollment.json"
ACTIVE = "active"
REVOKED = "revoked"


def chain_pem(chain: tuple[x509.Certificate, ...]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)


@dataclass(frozen=True)
class StoredTls:
    chain: tuple[x509.Certificate, ...]  # leaf first
    serial: str
    sealed_key: KeyBlob  # the TLS private scalar, sealed to the TPM's PCR policy

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]


@dataclass(frozen=True)
class StoredEnrollment:
    device_id: str
    registrar: str
    enrolled_at: datetime.datetime
    serial: str  # of the identity certificate
    chain: tuple[x509.Certificate, ...]  # identity certificate first
    tls: StoredTls | None = None
    generation: int = 0  # rotations completed since enrollment
    renewed_at: datetime.datetime | None = None
    lifecycle: str = ACTIVE  # active | revoked
    revoked_reason: str | None = None
    # The registrar's clock minus ours when the certificates came (agent.rotation.
    # registrarclock): where a restart starts planning from until it measures again.
    registrar_offset_s: float | None = None

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @classmethod
    def from_result(cls, result: EnrollmentResult, registrar: str, now: datetime.datetime,
                    registrar_offset_s: float | None = None) -> StoredEnrollment:
        return cls(result.device_id, registrar, now, result.serial, result.chain,
                   registrar_offset_s=registrar_offset_s)

    def renewed(self, identity_chain: tuple[x509.Certificate, ...], identity_serial: str,
                tls: StoredTls, now: datetime.datetime,
                registrar_offset_s: float | None = None) -> StoredEnrollment:
        offset = self.registrar_offset_s if registrar_offset_s is None else registrar_offset_s
        return replace(self, chain=identity_chain, serial=identity_serial, tls=tls,
                       generation=self.generation + 1, renewed_at=now,
                       registrar_offset_s=offset)

    def revoked(self, reason: str) -> StoredEnrollment:
        """Revoked by the registrar: the sealed TLS key is dropped from the record."""
        return replace(self, tls=None, lifecycle=REVOKED, revoked_reason=reason)

    def chain_pem(self) -> str:
        return chain_pem(self.chain)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "device_id": self.device_id,
            "registrar": self.registrar,
            "enrolled_at": self.enrolled_at.isoformat(timespec="seconds"),
            "serial": self.serial,
            "certificate_chain": self.chain_pem(),
            "generation": self.generation,
            "renewed_at": self.renewed_at.isoformat(timespec="seconds")
            if self.renewed_at else None,
            "lifecycle": self.lifecycle,
            "revoked_reason": self.revoked_reason,
            "registrar_offset_s": self.registrar_offset_s,
            "tls": None if self.tls is None else {
                "certificate_chain": chain_pem(self.tls.chain),
                "serial": self.tls.serial,
                "sealed_key": self.tls.sealed_key.to_dict(),
            },
        }
        return json.dumps(doc, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> StoredEnrollment:
        doc = decode_json_object(data, where, StateError)
        version = doc.get("version")
        if version not in (1, FORMAT_VERSION):
            raise StateError(f"{where}: unsupported format version {version!r}")
        fields = {key: _string(doc, key, where) for key in
                  ("device_id", "registrar", "enrolled_at", "serial", "certificate_chain")}
        stored = cls(fields["device_id"], fields["registrar"],
                     _time(fields["enrolled_at"], f"{where}: enrolled_at"), fields["serial"],
                     _chain(fields["certificate_chain"], f"{where}: certificate_chain"))
        if version == 1:
            return stored
        generation = doc.get("generation")
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise StateError(f"{where}: generation: expected a non-negative integer")
        renewed_at = doc.get("renewed_at")
        if renewed_at is not None and not isinstance(renewed_at, str):
            raise StateError(f"{where}: renewed_at: expected a time or null")
        lifecycle = doc.get("lifecycle")
        if lifecycle not in (ACTIVE, REVOKED):
            raise StateError(f"{where}: lifecycle: expected 'active' or 'revoked'")
        reason = doc.get("revoked_reason")
        if reason is not None and not isinstance(reason, str):
            raise StateError(f"{where}: revoked_reason: expected a string or null")
        offset = doc.get("registrar_offset_s")  # absent in records written before it existed
        if offset is not None and (not isinstance(offset, int | float)
                                   or isinstance(offset, bool) or not math.isfinite(offset)):
            raise StateError(f"{where}: registrar_offset_s: expected seconds or null")
        return replace(stored, generation=generation,
                       registrar_offset_s=float(offset) if offset is not None else None,
                       renewed_at=_time(renewed_at, f"{where}: renewed_at") if renewed_at
                       else None,
                       lifecycle=lifecycle, revoked_reason=reason,
                       tls=_tls(doc.get("tls"), f"{where}: tls"))


def _string(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise StateError(f"{where}: {key}: expected a non-empty string")
    return value


def _time(value: str, where: str) -> datetime.datetime:
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise StateError(f"{where}: not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise StateError(f"{where}: the time has no UTC offset")
    return when


def _chain(pem: str, where: str) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificates(pem.encode()))
    except ValueError:
        raise StateError(f"{where}: not PEM certificates") from None


def _tls(doc: object, where: str) -> StoredTls | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise StateError(f"{where}: expected an object or null")
    chain = _chain(_string(doc, "certificate_chain", where), f"{where}: certificate_chain")
    serial = _string(doc, "serial", where)
    return StoredTls(chain, serial, KeyBlob.from_dict(doc.get("sealed_key"),
                                                      f"{where}: sealed_key"))


class _Record(Protocol):
    def to_json(self) -> bytes: ...


R = TypeVar("R", bound=_Record)


class RecordFile(Generic[R]):
    """One JSON record in the state directory: read strictly, written atomically (0600),
    removed durably."""

    def __init__(self, path: Path, parse: Callable[[bytes, str], R]) -> None:
        self.path = path
        self._parse = parse

    def load(self) -> R | None:
        data = read_state_file(self.path)
        return None if data is None else self._parse(data, str(self.path))

    def save(self, record: R) -> None:
        ensure_private_dir(self.path.parent)
        write_atomic(self.path, record.to_json())

    def remove(self) -> None:
        remove_durably(self.path)


class EnrollmentStore(RecordFile[StoredEnrollment]):
    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir / FILE_NAME, StoredEnrollment.from_json)


DECOMMISSIONED_FILE = "decommissioned.json"


@dataclass(frozen=True)
class Decommissioned:
    """Left behind by `devidctl decommission`: this gateway has no identity on purpose."""

    device_id: str
    at: datetime.datetime
    registrar_notified: bool

    def to_json(self) -> bytes:
        return json.dumps({"device_id": self.device_id,
                           "at": self.at.isoformat(timespec="seconds"),
                           "registrar_notified": self.registrar_notified},
                          indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Decommissioned:
        doc = decode_json_object(data, where, StateError)
        notified = doc.get("registrar_notified")
        if not isinstance(notified, bool):
            raise StateError(f"{where}: registrar_notified: expected true or false")
        return cls(_string(doc, "device_id", where), _time(_string(doc, "at", where),
                                                            f"{where}: at"), notified)


class DecommissionStore(RecordFile[Decommissioned]):
    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir / DECOMMISSIONED_FILE, Decommissioned.from_json)
