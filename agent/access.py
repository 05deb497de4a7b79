"""OS errors in words: which path stops us, who may pass it, and what to run instead.

A field engineer without root who runs `devidctl` against files owned by the
agent's user deserves "…/state is open to user devid-agent only (mode 0700):
run it with sudo", not `PermissionError: [Errno 13]`. This module only reads
metadata (stat, access); every edge that touches files (config loading,
devidctl, the daemons) turns a PermissionError into `AccessDenied` here.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import stat
import sys
from pathlib import Path

from agent.errors import AccessDenied


def blocking_path(path: Path) -> Path:
    """The first directory on the way to `path` this process may not search, else `path`."""
    path = Path(os.path.abspath(path))
    for parent in reversed(path.parents):
        if parent != path and os.path.isdir(parent) and not os.access(parent, os.X_OK):
            return parent
    return path


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def current_user() -> str:
    """This process's effective user, by name (not $LOGNAME, which sudo and setpriv keep)."""
    return _user(os.geteuid())


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def who_may_use(path: Path, write: bool = False) -> tuple[str, str | None]:
    """('user root and group devid-agent (mode 0750)', 'devid-agent'): who may read `path`
    (search a directory, connect to a socket; with `write`, write to it), and the group
    that grants it, if any."""
    try:
        st = path.stat()
    except OSError:
        return "its owner (it cannot be examined from this user)", None
    mode = stat.S_IMODE(st.st_mode)
    if write or stat.S_ISSOCK(st.st_mode):  # connecting to a socket needs write
        bit = (stat.S_IWOTH, stat.S_IWGRP)
    elif stat.S_ISDIR(st.st_mode):
        bit = (stat.S_IXOTH, stat.S_IXGRP)  # search
    else:
        bit = (stat.S_IROTH, stat.S_IRGRP)
    owner = f"user {_user(st.st_uid)}"
    if mode & bit[0]:
        return f"everyone (mode {mode:04o})", None
    if mode & bit[1]:
        group = _group(st.st_gid)
        return f"{owner} and group {group} (mode {mode:04o})", group
    return f"{owner} only (mode {mode:04o})", None


def _obstacle(path: Path) -> str:
    """Which permission stops us at `path`, in words."""
    path = Path(os.path.abspath(path))
    blocked = blocking_path(path)
    if blocked != path:
        return f"the directory {blocked} is open to {who_may_use(blocked)[0]}"
    parent = path.parent
    if not os.path.lexists(path) and os.path.isdir(parent) and \
            not os.access(parent, os.W_OK | os.X_OK):
        return f"it does not exist and cannot be created here: the directory {parent} " \
               f"is writable by {who_may_use(parent, write=True)[0]}"
    return f"{path} is open to {who_may_use(path)[0]}"


def _granting_group(path: Path) -> str | None:
    blocked = blocking_path(Path(path))
    if not os.path.lexists(blocked):
        return None
    group = who_may_use(blocked)[1]
    return group if group != _group(0) else None  # never advise joining root's group


def access_denied(path: Path | str, what: str | None, command: str | None = None
                  ) -> AccessDenied:
    """An AccessDenied for `what` (a config key, "the control socket"; None: the path says
    enough) at `path`, naming who may read it and how to run as them.
    `command` is how the user ran the program, for the sudo suggestion."""
    as_user = current_user()
    how = f"run `sudo {command}`" if command else "run it as root (sudo)"
    group = _granting_group(Path(path))
    if group is not None:
        how += f", or as a member of group {group} (`sudo usermod -aG {group} {as_user}`, " \
               "then log in again)"
    prefix = f"{what}: " if what else ""
    return AccessDenied(f"{prefix}{path}: permission denied for {as_user}; "
                        f"{_obstacle(Path(path))}", how)


def explain(error: PermissionError, what: str | None, command: str | None = None
            ) -> AccessDenied:
    """A PermissionError raised by the OS, explained."""
    return access_denied(error.filename or "?", what, command)


def command_line(program: str, argv: list[str] | None) -> str:
    """How the user ran `program` (argv None: this process's own), for "run `sudo …`"."""
    return shlex.join([program, *(sys.argv[1:] if argv is None else argv)])


def os_error_text(error: OSError, key: str | None = None) -> str:
    """'[paths] state_dir: /var/lib/x: No space left on device' for an OSError that
    reached a program's edge (`key`: the configuration key naming the path, if any)."""
    where = "".join(f"{part}: " for part in (key, error.filename) if part)
    return f"{where}{error.strerror or error}"
