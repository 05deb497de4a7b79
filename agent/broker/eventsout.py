"""The broker's events out: the recent ones for `devidctl events` (the control method
`events`), and, with `[siem]` in broker.toml, all of them to the SIEM over TLS with the
gateway's certificate from the agent (agent/siem/)."""

from __future__ import annotations

import ssl
from typing import Any

from agent.broker.config import BrokerConfig
from agent.broker.gatewaycreds import GatewayCredentials
from agent.broker.upstreams import read_trust
from agent.errors import ControlError
from agent.siem.forwarder import RECENT, EventTap, SiemSender


def make_siem(config: BrokerConfig, credentials: GatewayCredentials | None
              ) -> SiemSender | None:
    section = config.siem
    if section is None:
        return None
    assert credentials is not None  # make_upstreams watches them for [siem] too
    trust = read_trust(section.bundle, "siem")

    def tls() -> ssl.SSLContext | None:
        current = credentials.current
        return current.ssl_context("client", trust) if current is not None else None

    return SiemSender(section.url, section.framing, section.queue, "devid-broker", tls,
                      section.sd_id)


def events_handler(tap: EventTap) -> Any:
    async def events(params: dict[str, Any]) -> dict[str, Any]:
        after, limit = params.get("after", 0), params.get("limit", 100)
        for name, value in (("after", after), ("limit", limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ControlError(f"events: {name}: expected a whole number from 0")
        return {"events": tap.since(after, min(limit, RECENT)), "last": tap.sequence}
    return events
