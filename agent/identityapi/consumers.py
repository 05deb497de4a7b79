"""Which declared consumer a peer is, and what it may do. Pure.

The kernel tells the agent who connected (SO_PEERCRED: pid, uid, gid and the
supplementary groups); the unit comes from the peer's cgroup. A peer is the
most specific consumer it matches (unit over group over user alone); the
configuration refuses two consumers that would match the same peers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.config import ConsumerSection
from agent.control.peer import PeerCredentials

# Reads the systemd unit a pid runs in: the unit name, None for none, or a str
# reason wrapped in UnitUnknown when it cannot be told.
UnitReader = Callable[[int], "str | UnitUnknown | None"]


@dataclass(frozen=True)
class UnitUnknown:
    reason: str


@dataclass(frozen=True)
class Refusal:
    reason: str
    hint: str


def _specificity(consumer: ConsumerSection) -> int:
    return (consumer.unit is not None) * 2 + (consumer.group is not None)


def identify(peer: PeerCredentials, consumers: Sequence[ConsumerSection],
             read_unit: UnitReader) -> ConsumerSection | Refusal:
    """The consumer `peer` is, or why it is none. The unit is read only when needed."""
    who = f"uid {peer.uid} gid {peer.gid} (pid {peer.pid})"
    candidates = [c for c in consumers if c.uid == peer.uid and
                  (c.gid is None or c.gid == peer.gid or c.gid in peer.groups)]
    if not candidates:
        return Refusal(f"{who} matches no consumer declared in the agent's configuration",
                       "declare it under [[consumers]] in agent.toml (docs/identity-api.md) "
                       "and reload the agent")
    candidates.sort(key=_specificity, reverse=True)
    unit: str | UnitUnknown | None = None
    if any(c.unit is not None for c in candidates):
        unit = read_unit(peer.pid)
    for consumer in candidates:
        if consumer.unit is None or consumer.unit == unit:
            return consumer
    wanted = ", ".join(sorted({c.unit for c in candidates if c.unit}))
    if isinstance(unit, UnitUnknown):
        return Refusal(f"{who} must run in {wanted}, and its unit cannot be told: "
                       f"{unit.reason}", "see docs/identity-api.md, 'Matching by unit'")
    return Refusal(f"{who} runs in {unit or 'no systemd unit'}, not in {wanted}",
                   "run the program in its declared unit, or fix unit= in agent.toml")


def grant_refusal(consumer: ConsumerSection, grant: str | None, method: str) -> Refusal | None:
    if grant is None or grant in consumer.grants:
        return None
    return Refusal(f"consumer {consumer.name!r} is not granted {grant!r} (needed by "
                   f"{method}; it has: {', '.join(consumer.grants)})",
                   f"add \"{grant}\" to its grants in agent.toml if it should have it")


def read_unit_of_pid(pid: int) -> str | UnitUnknown | None:
    """The unit `pid` runs in, from /proc (the edge that unit_from_cgroup judges)."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            return unit_from_cgroup(f.read())
    except FileNotFoundError:
        return UnitUnknown(f"/proc/{pid} is not visible to the agent (the process exited, or "
                           "/proc is hidden from the agent: ProtectProc=invisible)")
    except OSError as e:
        return UnitUnknown(f"/proc/{pid}/cgroup: {e.strerror}")


def unit_from_cgroup(text: str) -> str | None:
    """The systemd unit in /proc/PID/cgroup text (v2 `0::`, or v1 `name=systemd`):
    the deepest path component naming a service or scope; None if there is none."""
    path = None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, cgroup = rest.partition(":")
        if (hierarchy == "0" and controllers == "") or controllers == "name=systemd":
            path = cgroup
            if hierarchy == "0":
                break
    if path is None:
        return None
    units = [part for part in path.split("/") if part.endswith((".service", ".scope"))]
    return units[-1] if units else None
