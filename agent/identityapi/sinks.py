"""File sinks: a consumer's credentials as PEM files on tmpfs, swapped atomically.

For programs that only read files (mosquitto, nginx, curl). Layout of one sink,
the same as Kubernetes' atomic writer so that a reader never sees a new
certificate with an old key:

    SINK_ROOT/NAME/                 0700 + ACL: the consumer's user (and group) r-x
        ..gen-<serial>-<n>/         one complete set, files 0600 + ACL r--
        ..data -> ..gen-…           swapped with one rename(2)
        cert.pem -> ..data/cert.pem (and chain, fullchain, key, bundle)

The agent runs without CAP_CHOWN (the unit keeps its exposure low), so the
files stay owned by the agent's user and the consumer reads them through a
POSIX ACL entry naming its uid (and, with sink_mode "0640", its gid). The
sink root must be on tmpfs or ramfs: the key never reaches persistent storage.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import struct
import time
from collections.abc import Mapping
from pathlib import Path

from agent.errors import ConfigError, StateError

VOLATILE_FILESYSTEMS = ("tmpfs", "ramfs")
DATA_LINK = "..data"
GEN_PREFIX = "..gen-"

# Linux POSIX ACL extended attribute (include/uapi/linux/posix_acl_xattr.h).
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED_ID = 0xFFFFFFFF


def posix_acl(owner: int, users: Mapping[int, int], groups: Mapping[int, int]) -> bytes:
    """The xattr value of an access ACL: the owner gets `owner` permission bits (rwx as
    4/2/1), named users and groups theirs, the owning group and others nothing."""
    mask = 0
    for perm in (*users.values(), *groups.values()):
        mask |= perm
    entries = [(_USER_OBJ, owner, _UNDEFINED_ID)]
    entries += [(_USER, perm, uid) for uid, perm in sorted(users.items())]
    entries.append((_GROUP_OBJ, 0, _UNDEFINED_ID))
    entries += [(_GROUP, perm, gid) for gid, perm in sorted(groups.items())]
    entries += [(_MASK, mask, _UNDEFINED_ID), (_OTHER, 0, _UNDEFINED_ID)]
    return struct.pack("<I", _ACL_VERSION) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(path: Path, mountinfo: str) -> str | None:
    """The type of the filesystem `path` (absolute, resolved) is on, from
    /proc/self/mountinfo text: the last-mounted longest mount point above it."""
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if not sep or len(fields) < 5 or not after:
            continue
        mount_point = Path(_unescape(fields[4]))
        if path == mount_point or mount_point in path.parents:
            depth = len(mount_point.parts)
            if best is None or depth >= best[0]:
                best = (depth, after[0])
    return best[1] if best else None


def check_volatile(directory: Path, mountinfo: str | None = None,
                   what: str = "[identity_api] sink_root") -> None:
    """Refuse a directory for keys that is not on tmpfs or ramfs (ConfigError naming
    `what`: the configuration key, or the command-line option)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    resolved = directory.resolve()
    fstype = filesystem_type(resolved, mountinfo)
    if fstype not in VOLATILE_FILESYSTEMS:
        raise ConfigError(
            f"{what}: {directory} is on {fstype or 'an unknown filesystem'}, "
            "not tmpfs or ramfs: a private key written there could reach persistent storage",
            "put the sinks under /run (tmpfs on systemd systems) or mount a tmpfs there")


class FileSink:
    """One consumer's sink directory."""

    def __init__(self, root: Path, name: str, uid: int, gid: int | None,
                 group_readable: bool) -> None:
        self.root, self.directory = root, root / name
        self.uid, self.gid, self.group_readable = uid, gid, group_readable
        self._counter = itertools.count(time.monotonic_ns())  # unique across restarts

    def _acl(self, path: Path, read: int) -> None:
        me = os.geteuid()
        users = {self.uid: read} if self.uid != me else {}
        groups = {self.gid: read} if self.group_readable and self.gid is not None else {}
        owner = 0o7 if read == 0o5 else 0o6
        os.setxattr(path, _ACL_XATTR, posix_acl(owner, users, groups), follow_symlinks=False)

    def _prepare_root(self) -> None:
        # Others may traverse the root to reach their own directory, not list it.
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self._acl(self.directory, 0o5)

    def write(self, files: Mapping[str, bytes], serial: str) -> Path:
        """Write a complete set and make it current with one rename; returns its dir."""
        try:
            self._prepare_root()
            generation = self.directory / f"{GEN_PREFIX}{serial}-{next(self._counter)}"
            generation.mkdir(mode=0o700)
            for name, data in files.items():
                path = generation / name
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                self._acl(path, 0o4)
            self._acl(generation, 0o5)
            link = self.directory / f"{DATA_LINK}.tmp"
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(generation.name)
            os.replace(link, self.directory / DATA_LINK)  # the atomic switch
            for name in files:
                target = self.directory / name
                if not target.is_symlink():
                    with contextlib.suppress(FileNotFoundError):
                        target.unlink()
                    target.symlink_to(f"{DATA_LINK}/{name}")
            self._prune(keep=generation.name)
        except OSError as e:
            raise StateError(f"file sink {self.directory}: {e.strerror or e}",
                             "the agent must be able to write under [identity_api] sink_root, "
                             "on a tmpfs that supports POSIX ACLs") from None
        return generation

    def _prune(self, keep: str) -> None:
        for entry in self.directory.iterdir():
            if entry.name.startswith(GEN_PREFIX) and entry.name != keep:
                shutil.rmtree(entry, ignore_errors=True)

    def remove(self) -> bool:
        """Delete the sink (withdrawal, or the consumer was removed); True if it existed."""
        if not self.directory.exists():
            return False
        shutil.rmtree(self.directory, ignore_errors=True)
        return True
