"""TPM key blobs at rest.

A child key's private part leaves the TPM only wrapped by the storage root key
(TPM2B_PRIVATE), so it is safe on disk: it loads only into the TPM that made it.
Blobs are small JSON documents, one per key, written atomically 0600 under
`STATE_DIR/tpm/`. Reading them is parsing outside data: any damage is a
StateError naming the file and field, never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC

from agent.codec import T, b64decode_strict, b64encode, decode_json_object, unmarshal_exact
from agent.errors import StateError
from agent.fsutil import ensure_private_dir, read_state_file, remove_durably, write_atomic

FORMAT_VERSION = 1


def _unb64(value: object, where: str) -> bytes:
    return b64decode_strict(value, where, StateError)


def _unmarshal(cls: type[T], data: bytes, where: str) -> T:
    return unmarshal_exact(cls, data, where, StateError)


@dataclass(frozen=True)
class KeyBlob:
    """A TPM child key as stored: public area and parent-wrapped private area."""

    public: bytes
    private: bytes
    # Present on sealed objects: the PCR policy and values at sealing time, kept
    # to tell the user which PCR changed when unsealing is refused.
    pcr_bank: str | None = None
    pcrs: tuple[int, ...] = ()
    pcr_values: tuple[bytes, ...] = field(default=())

    def tpm_public(self) -> TPM2B_PUBLIC:
        return _unmarshal(TPM2B_PUBLIC, self.public, "public")

    def tpm_private(self) -> TPM2B_PRIVATE:
        return _unmarshal(TPM2B_PRIVATE, self.private, "private")

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1).encode() + b"\n"

    def to_dict(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "version": FORMAT_VERSION,
            "public": b64encode(self.public),
            "private": b64encode(self.private),
        }
        if self.pcr_bank is not None:
            doc["pcr_policy"] = {
                "bank": self.pcr_bank,
                "pcrs": list(self.pcrs),
                "values_at_seal": [v.hex() for v in self.pcr_values],
            }
        return doc

    @classmethod
    def from_json(cls, data: bytes, where: str) -> KeyBlob:
        return cls.from_dict(decode_json_object(data, where, StateError), where)

    @classmethod
    def from_dict(cls, doc: object, where: str) -> KeyBlob:
        if not isinstance(doc, dict):
            raise StateError(f"{where}: expected an object")
        if doc.get("version") != FORMAT_VERSION:
            raise StateError(f"{where}: unsupported format version {doc.get('version')!r}")
        public = _unb64(doc.get("public"), f"{where}: public")
        private = _unb64(doc.get("private"), f"{where}: private")
        blob = cls(public=public, private=private)
        policy = doc.get("pcr_policy")
        if policy is not None:
            blob = cls._with_policy(blob, policy, f"{where}: pcr_policy")
        _unmarshal(TPM2B_PUBLIC, public, f"{where}: public")
        _unmarshal(TPM2B_PRIVATE, private, f"{where}: private")
        return blob

    @classmethod
    def _with_policy(cls, blob: KeyBlob, policy: object, where: str) -> KeyBlob:
        if not isinstance(policy, dict):
            raise StateError(f"{where}: expected an object")
        bank, pcrs, values = policy.get("bank"), policy.get("pcrs"), policy.get("values_at_seal")
        if bank != "sha256":
            raise StateError(f"{where}: bank: expected 'sha256'")
        if not isinstance(pcrs, list) or not all(isinstance(p, int) and 0 <= p <= 23
                                                 for p in pcrs):
            raise StateError(f"{where}: pcrs: expected a list of PCR indices 0..23")
        if not isinstance(values, list) or len(values) != len(pcrs):
            raise StateError(f"{where}: values_at_seal: expected one value per PCR")
        try:
            raw = tuple(bytes.fromhex(v) for v in values)
        except (TypeError, ValueError):
            raise StateError(f"{where}: values_at_seal: expected hex strings") from None
        return cls(blob.public, blob.private, bank, tuple(pcrs), raw)

    @classmethod
    def sealed(cls, public: bytes, private: bytes, pcrs: Sequence[int],
               values: Sequence[bytes]) -> KeyBlob:
        return cls(public, private, "sha256", tuple(pcrs), tuple(values))


class BlobStore:
    """Named blobs in one private directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        if not name.isidentifier():
            raise ValueError(f"invalid blob name {name!r}")
        return self.directory / f"{name}.json"

    def load(self, name: str) -> KeyBlob | None:
        path = self.path(name)
        data = read_state_file(path)
        return None if data is None else KeyBlob.from_json(data, str(path))

    def save(self, name: str, blob: KeyBlob) -> None:
        ensure_private_dir(self.directory)
        write_atomic(self.path(name), blob.to_json())

    def remove(self, name: str) -> None:
        remove_durably(self.path(name))

    def load_bytes(self, name: str) -> bytes | None:
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            return None

    def save_bytes(self, name: str, data: bytes) -> None:
        ensure_private_dir(self.directory)
        write_atomic(self.directory / name, data)
