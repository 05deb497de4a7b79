"""A stand-in for systemd's notification socket: what the daemon tells its service manager.

Binds an AF_UNIX datagram socket (as systemd does for NOTIFY_SOCKET) and
records every message with the monotonic time it arrived.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Notification:
    at: float
    fields: dict[str, str]


class NotifyListener:
    def __init__(self) -> None:
        # sun_path is 108 bytes: pytest's tmp paths can be longer.
        self.dir = Path(tempfile.mkdtemp(prefix="notify-"))
        self.path = self.dir / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[Notification] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self._lock:
                self.messages.append(Notification(time.monotonic(), fields))

    def snapshot(self) -> list[Notification]:
        with self._lock:
            return list(self.messages)

    def with_field(self, key: str, value: str | None = None) -> list[Notification]:
        return [m for m in self.snapshot()
                if key in m.fields and (value is None or m.fields[key] == value)]

    def wait_for(self, what: str, predicate: Callable[[Notification], bool],
                 timeout: float = 30.0, after: float = 0.0) -> Notification:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.snapshot():
                if m.at >= after and predicate(m):
                    return m
            time.sleep(0.05)
        raise TimeoutError(f"no {what} notification after {timeout}s; got "
                           f"{[m.fields for m in self.snapshot()][-20:]}")

    def pings(self, since: float = 0.0) -> list[float]:
        return [m.at for m in self.with_field("WATCHDOG", "1") if m.at >= since]

    def last_status(self) -> str | None:
        statuses = self.with_field("STATUS")
        return statuses[-1].fields["STATUS"] if statuses else None

    def close(self) -> None:
        self._closed.set()
        self.sock.close()
        self._thread.join(timeout=2)
        self.path.unlink(missing_ok=True)
        os.rmdir(self.dir)
