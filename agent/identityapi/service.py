"""The identity API as one of the agent's subsystems (agent/daemon/subsystem.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.config import AgentConfig
from agent.daemon.subsystem import Handler
from agent.errors import ControlError
from agent.identityapi.api import IdentityApi
from agent.identityapi.server import IdentityServer


class IdentityApiSubsystem:
    name = "identity_api"

    def __init__(self, config: AgentConfig, api: IdentityApi) -> None:
        self.api = api
        self.server = IdentityServer(config.identity_api.socket, api)

    async def start(self) -> None:
        await self.server.start()

    async def close(self) -> None:
        await self.server.close()

    async def run(self, stop: asyncio.Event) -> None:
        await self.api.run(stop)

    def status_section(self) -> dict[str, Any]:
        return {**self.api.status_section(), "connections": self.server.connections}

    def handlers(self) -> dict[str, Handler]:
        return {"consumers": self._consumers, "consumers-purge": self._purge}

    def check(self, config: AgentConfig) -> None:
        self.api.check(config)

    def apply(self, config: AgentConfig) -> None:
        self.api.apply(config)

    async def _consumers(self, _params: dict[str, Any]) -> dict[str, Any]:
        return self.status_section()

    async def _purge(self, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        if not isinstance(name, str):
            raise ControlError("consumers-purge: params.name must be a consumer name")
        return await self.api.purge(name)
