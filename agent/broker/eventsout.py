"""The broker's events out to the SIEM, with `[siem]` in broker.toml: over TLS with the
gateway's certificate from the agent (agent/siem/). The recent ones for `devidctl events`
are the EventTap's, as in the agent."""

from __future__ import annotations

import ssl

from agent.broker.config import BrokerConfig
from agent.broker.gatewaycreds import GatewayCredentials
from agent.pki.bundle import read_trust
from agent.siem.forwarder import SiemSender


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
