"""The service manager's side channel: sd_notify(3) through systemd-python.

Outside systemd (no NOTIFY_SOCKET) every message is dropped, so the daemon
runs the same code in a terminal, in tests and under systemd.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Protocol


class Notifier(Protocol):
    def send(self, fields: Mapping[str, str]) -> None: ...


def one_line(text: str, limit: int = 200) -> str:
    """STATUS= must be one line; keep it short enough for `systemctl status`."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def monotonic_usec() -> str:
    """RELOADING=1 carries CLOCK_MONOTONIC in µs (systemd ≥ 253 insists; older ignore it)."""
    return str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))

    def send(self, fields: Mapping[str, str]) -> None:
        if not self.enabled or not fields:
            return
        from systemd import daemon  # only needed under a service manager

        daemon.notify("\n".join(f"{k}={v}" for k, v in fields.items()))


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """sd_watchdog_enabled(3): seconds between pings (half of WATCHDOG_USEC), or None.

    WATCHDOG_PID, when set, must be ours: a child that inherited the variables
    must not ping on our behalf.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 1_000_000 / 2
