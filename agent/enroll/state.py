"""The enrollment result as stored on the gateway: STATE_DIR/enrollment.json.

One JSON document written atomically (0600), holding the certificate chain
and what the agent needs to know about it, so a restart never re-enrolls and
a crash never leaves a certificate without its metadata. Loading is parsing
outside data: damage is a StateError naming the file and field.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.codec import decode_json_object
from agent.enroll.client import EnrollmentResult
from agent.errors import StateError
from agent.fsutil import ensure_private_dir, read_state_file, write_atomic

FORMAT_VERSION = 1
FILE_NAME = "enrollment.json"


@dataclass(frozen=True)
class StoredEnrollment:
    device_id: str
    registrar: str
    enrolled_at: datetime.datetime
    serial: str
    chain: tuple[x509.Certificate, ...]  # leaf first

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @classmethod
    def from_result(cls, result: EnrollmentResult, registrar: str,
                    now: datetime.datetime) -> StoredEnrollment:
        return cls(result.device_id, registrar, now, result.serial, result.chain)

    def chain_pem(self) -> str:
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in self.chain)

    def to_json(self) -> bytes:
        return json.dumps({
            "version": FORMAT_VERSION,
            "device_id": self.device_id,
            "registrar": self.registrar,
            "enrolled_at": self.enrolled_at.isoformat(timespec="seconds"),
            "serial": self.serial,
            "certificate_chain": self.chain_pem(),
        }, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> StoredEnrollment:
        doc = decode_json_object(data, where, StateError)
        if doc.get("version") != FORMAT_VERSION:
            raise StateError(f"{where}: unsupported format version {doc.get('version')!r}")
        fields = {}
        for key in ("device_id", "registrar", "enrolled_at", "serial", "certificate_chain"):
            value = doc.get(key)
            if not isinstance(value, str) or not value:
                raise StateError(f"{where}: {key}: expected a non-empty string")
            fields[key] = value
        try:
            enrolled_at = datetime.datetime.fromisoformat(fields["enrolled_at"])
        except ValueError:
            raise StateError(f"{where}: enrolled_at: not an ISO 8601 time") from None
        try:
            chain = tuple(x509.load_pem_x509_certificates(fields["certificate_chain"].encode()))
        except ValueError:
            raise StateError(f"{where}: certificate_chain: not PEM certificates") from None
        return cls(fields["device_id"], fields["registrar"], enrolled_at, fields["serial"], chain)


class EnrollmentStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME

    def load(self) -> StoredEnrollment | None:
        data = read_state_file(self.path)
        return None if data is None else StoredEnrollment.from_json(data, str(self.path))

    def save(self, enrollment: StoredEnrollment) -> None:
        ensure_private_dir(self.path.parent)
        write_atomic(self.path, enrollment.to_json())
