"""Who is on the other end of the control socket, and may they ask?

The socket file is 0660, but file modes are only the first fence: the kernel
tells us the peer's uid/gid (SO_PEERCRED) and we decide from that, so a
mis-set mode or a passed file descriptor does not open the door.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_MAX_GROUPS = 1024


def read_peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid, supplementary_groups(sock, pid))


def supplementary_groups(sock: socket.socket, pid: int) -> frozenset[int]:
    """The peer's supplementary groups as of connect() (kernel), else from /proc."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_GROUPS)
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return frozenset()
    return parse_groups(status)


def parse_groups(proc_status: str) -> frozenset[int]:
    for line in proc_status.splitlines():
        if line.startswith("Groups:"):
            return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    return frozenset()


def authorize(peer: PeerCredentials, own_uid: int, allowed_gid: int | None) -> str | None:
    """None if `peer` may use the socket, else the reason for refusal."""
    if peer.uid in (0, own_uid):
        return None
    if allowed_gid is not None and (peer.gid == allowed_gid or allowed_gid in peer.groups):
        return None
    who = f"uid {peer.uid} (pid {peer.pid})"
    if allowed_gid is None:
        return f"{who} is not root nor the agent's user, and no control group is configured"
    return f"{who} is not root, the agent's user, nor a member of gid {allowed_gid}"
