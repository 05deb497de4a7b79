"""Consumers' sealed secrets on disk: STATE_DIR/consumers/NAME/SECRET.json.

Each file is a TPM-sealed object (agent.tpm.blobs.KeyBlob) holding 32 random
bytes under the PCR policy; only this TPM, in the same platform state, will
unseal it. Purging a consumer deletes its directory: a sealed object has no
other copy, so the secrets are gone (backups of the state directory are
copies: see docs/identity-api.md).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from agent.fsutil import ensure_private_dir, fsync_dir, read_state_file, write_atomic
from agent.identityapi.protocol import SECRET_NAME
from agent.tpm.blobs import KeyBlob

CONSUMERS_DIR = "consumers"


class SecretStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / CONSUMERS_DIR

    def _path(self, consumer: str, name: str) -> Path:
        if not SECRET_NAME.match(name) or not SECRET_NAME.match(consumer):
            raise ValueError(f"invalid consumer or secret name {consumer!r}/{name!r}")
        return self.root / consumer / f"{name}.json"

    def load(self, consumer: str, name: str) -> KeyBlob | None:
        path = self._path(consumer, name)
        data = read_state_file(path)
        return None if data is None else KeyBlob.from_json(data, str(path))

    def save(self, consumer: str, name: str, blob: KeyBlob) -> None:
        path = self._path(consumer, name)
        ensure_private_dir(path.parent)
        write_atomic(path, blob.to_json())

    def names(self, consumer: str) -> list[str]:
        try:
            return sorted(p.stem for p in (self.root / consumer).glob("*.json"))
        except OSError:
            return []

    def owners(self) -> list[str]:
        """Every consumer name that has secrets on disk."""
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def purge(self, consumer: str) -> list[str]:
        """Destroy every sealed secret of `consumer`; returns their names."""
        names = self.names(consumer)
        directory = self.root / consumer
        if directory.exists():
            shutil.rmtree(directory)
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(self.root)
        return names
