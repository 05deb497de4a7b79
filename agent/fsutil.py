"""Durable, private file writes for agent state.

Every state write goes through `write_atomic`: temp file in the same directory,
fsync, rename over the target, fsync the directory. A crash leaves either the
old or the new content, never a torn file, and files are created 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from agent import faults
from agent.access import explain
from agent.errors import StateError

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
TEMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Replace `path` with `data` atomically and durably.

    On any failure (ENOSPC included) the previous content of `path` is intact and
    the temp file is removed.
    """
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX,
                                    dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.point(f"write.{path.name}.before_rename")
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    faults.point(f"write.{path.name}.after_rename")
    fsync_dir(directory)


def remove_durably(path: Path) -> None:
    """Delete `path` (if it exists) so that the deletion survives a crash."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def read_state_file(path: Path) -> bytes | None:
    """A state file's bytes; None if it does not exist, StateError if it cannot be read.
    Not ours to read is AccessDenied, not damage: the file must not be moved aside."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except PermissionError as e:
        raise explain(e, "state file") from None
    except OSError as e:
        raise StateError(f"{path}: cannot read: {e.strerror}") from None


def ensure_private_dir(path: Path) -> None:
    """Create `path` (and parents) if needed; the leaf is made 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)


def remove_stale_temp_files(directory: Path) -> list[str]:
    """Delete temp files `write_atomic` left in `directory` when the process was killed
    mid-write (never read, but they would pile up); returns their names."""
    removed = []
    try:
        names = [p for p in directory.iterdir() if p.name.startswith(".")
                 and p.name.endswith(TEMP_SUFFIX)]
    except FileNotFoundError:
        return []
    for path in names:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed
