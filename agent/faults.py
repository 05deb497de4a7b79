"""Named fault-injection points for the crash tests.

`DEVID_FAILPOINTS=rotation.sealed,write.enrollment.json.before_rename` in the
environment makes the process kill itself with SIGKILL the first time it
reaches one of the named points: the closest a test can get to pulling the
plug at an exact step. Unset (always, in production) a point costs one set
lookup. The points are listed in docs/rotation.md.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "DEVID_FAILPOINTS"
_ARMED = frozenset(p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip())


def point(name: str) -> None:
    if name in _ARMED:
        sys.stderr.write(f"devid-agent: failpoint {name}: SIGKILL\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
