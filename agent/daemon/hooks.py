"""Reload hooks: commands run after each successful rotation.

No shell and no PATH lookup (the config insists on absolute paths); each
runs with a timeout, its environment carries what it may need to know
(device ID, serials, expiry), and its outcome is recorded, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from agent import events

log = logging.getLogger(__name__)
MAX_OUTPUT = 2000


@dataclass(frozen=True)
class HookResult:
    command: str
    ok: bool
    detail: str  # "exit 0", "exit 3: <stderr tail>", "timed out after 30s", ...

    def to_dict(self) -> dict[str, object]:
        return {"command": self.command, "ok": self.ok, "detail": self.detail}


# The service manager's variables are the daemon's alone: a hook that called
# systemd-notify must not speak (or ping the watchdog) for the agent.
_SERVICE_MANAGER_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                         "LISTEN_PID", "LISTEN_FDNAMES")


def _inherited() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _SERVICE_MANAGER_VARS}


async def run_hook(argv: Sequence[str], env: dict[str, str], timeout: float) -> HookResult:
    command = " ".join(argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env={**_inherited(), **env})
    except OSError as e:
        return HookResult(command, False, f"cannot run: {e.strerror}")
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return HookResult(command, False, f"timed out after {timeout:.0f}s; killed")
    if proc.returncode == 0:
        return HookResult(command, True, "exit 0")
    tail = stderr[-MAX_OUTPUT:].decode(errors="replace").strip()
    return HookResult(command, False, f"exit {proc.returncode}" + (f": {tail}" if tail else ""))


async def run_hooks(argvs: Sequence[Sequence[str]], env: dict[str, str],
                    timeout: float) -> list[HookResult]:
    results = []
    for argv in argvs:  # in order: a later hook may depend on an earlier one
        result = await run_hook(argv, env, timeout)
        if result.ok:
            log.info("reload hook %s: %s", result.command, result.detail)
        else:
            events.emit(log, "hook-failed", "reload hook %s: %s", result.command, result.detail,
                        device_id=env.get("DEVID_DEVICE_ID"), command=result.command)
        results.append(result)
    return results
