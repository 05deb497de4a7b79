"""The agent's events to the SIEM, with `[siem]` in agent.toml: enrollment, rotation,
revocation and the identity API's refusals, over TLS with the gateway's current TLS
certificate, the collector verified against `bundle` or else the pinned registrar CA
(agent/siem/). A subsystem: the daemon only wires it."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import AgentConfig
from agent.daemon.subsystem import Handler
from agent.pki.bundle import read_trust
from agent.rotation.credentials import CredentialHolder
from agent.siem.forwarder import EventTap, SiemSender
from agent.siem.settings import SiemSection

log = logging.getLogger(__name__)


class SiemSubsystem:
    name = "siem"

    def __init__(self, section: SiemSection, tap: EventTap, holder: CredentialHolder,
                 pinned: Callable[[], Sequence[x509.Certificate]]) -> None:
        self._section = section
        trust = read_trust(section.bundle, "siem")

        def tls() -> ssl.SSLContext | None:
            current = holder.current()
            if current is None:
                return None
            anchors = trust or "".join(c.public_bytes(serialization.Encoding.PEM).decode()
                                       for c in pinned())
            return current.ssl_context("client", anchors) if anchors else None

        self.sender = SiemSender(section.url, section.framing, section.queue, "devid-agent",
                                 tls, section.sd_id)
        tap.sender = self.sender

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def run(self, stop: asyncio.Event) -> None:
        await self.sender.run(stop)

    def status_section(self) -> dict[str, Any]:
        return self.sender.status_section()

    def handlers(self) -> dict[str, Handler]:
        return {}

    def check(self, config: AgentConfig) -> None:
        pass  # [siem] waits for a restart (agent/daemon/reload.py)

    def apply(self, config: AgentConfig) -> None:
        pass
