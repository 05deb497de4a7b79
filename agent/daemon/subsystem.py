"""What a part of the agent offers the composition root (agent/daemon/main.py).

A subsystem has a name, `start` (before the daemon says it is up; a failure
stops the daemon), a long-running task, `close` (at shutdown), a status section, control-socket
methods, and takes part in SIGHUP: `check` refuses a configuration it cannot
run with (nothing has changed yet), `apply` switches to it. The daemon only
wires subsystems together; it does not know what they do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from agent.config import AgentConfig

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Subsystem(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def run(self, stop: asyncio.Event) -> None: ...

    def status_section(self) -> dict[str, Any]: ...

    def handlers(self) -> dict[str, Handler]: ...

    def check(self, config: AgentConfig) -> None: ...

    def apply(self, config: AgentConfig) -> None: ...
