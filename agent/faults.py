"""Named fault-injection points for the crash and watchdog tests.

`DEVID_FAILPOINTS=rotation.sealed,write.enrollment.json.before_rename` in the
environment makes the process kill itself with SIGKILL the first time it
reaches one of the named points: the closest a test can get to pulling the
plug at an exact step. `name=stall:SECONDS` instead blocks the thread that
reaches the point (the event loop, or the TPM worker) for that long, each
time: a hung loop or a hung TPM command, for the watchdog tests.
Unset (always, in production) a point costs one dict lookup. The points are
listed in docs/rotation.md and docs/service.md.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "DEVID_FAILPOINTS"
KILL = "kill"
STALL = "stall:"


def _parse(value: str) -> dict[str, str]:
    armed = {}
    for entry in value.split(","):
        name, _, action = entry.strip().partition("=")
        if name:
            armed[name] = action or KILL
    return armed


_ARMED = _parse(os.environ.get(ENV, ""))


def point(name: str) -> None:
    action = _ARMED.get(name)
    if action is None:
        return
    if action.startswith(STALL):
        seconds = float(action.removeprefix(STALL))
        sys.stderr.write(f"devid-agent: failpoint {name}: stalling {seconds:g}s\n")
        time.sleep(seconds)
        return
    sys.stderr.write(f"devid-agent: failpoint {name}: SIGKILL\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
