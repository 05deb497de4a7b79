"""The daemon's AgentService run inside this process, for the tests and benchmarks that
need its TLS credentials (they exist only in the agent's memory)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from agent.config import AgentConfig
from agent.daemon.service import AgentService
from agent.pki.ekchain import load_trust_store


@contextlib.asynccontextmanager
async def agent_in_process(config: AgentConfig,
                           timeout: float = 30.0) -> AsyncIterator[AgentService]:
    """Start the TPM and identity tasks as the daemon does; yield the service once it is
    enrolled and presents TLS credentials; stop it on exit."""
    service = AgentService(config, load_trust_store(config.trust.ek_roots))
    service.enrollment.load()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service.maintain_tpm(stop)),
             asyncio.create_task(service.maintain_identity(stop))]
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while service.holder.current() is None:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no TLS credentials {timeout:.0f}s after start")
            await asyncio.sleep(0.05)
        yield service
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await service.close()
