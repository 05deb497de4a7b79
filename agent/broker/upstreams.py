"""The configured upstreams ([upstreams.NAME] in broker.toml), made and held together.

They share one watch of the gateway's TLS credentials (with the LwM2M
upstream, lwm2mupstream.py). A broker with no upstream never asks the agent
for them, so it needs only the `secrets` grant.
"""

from __future__ import annotations

from typing import Any

from agent.broker.config import BrokerConfig
from agent.broker.gatewaycreds import GatewayCredentials
from agent.broker.upstream import Upstream
from agent.broker.upstream.coap import CoapUpstream, parse_coap_url
from agent.broker.upstream.mqtt import MqttUpstream, parse_mqtt_url
from agent.consumer import IdentityClient
from agent.errors import ConfigError
from agent.pki.bundle import read_trust


def check_url(url: str) -> None:
    """ConfigError unless `url` is an upstream this broker can reach."""
    if url.startswith("mqtts:"):
        parse_mqtt_url(url)
    elif url.startswith("coaps+tcp:"):
        parse_coap_url(url)
    else:
        raise ConfigError(f"{url!r}: expected a coaps+tcp:// or mqtts:// URL")


class Upstreams:
    name = "upstreams"

    def __init__(self, by_name: dict[str, Upstream],
                 credentials: GatewayCredentials | None) -> None:
        self.by_name, self.credentials = by_name, credentials

    async def start(self) -> None:
        for upstream in self.by_name.values():
            await upstream.start()

    async def close(self) -> None:
        for upstream in self.by_name.values():
            await upstream.close()

    def status_section(self) -> dict[str, Any]:
        return {name: u.status_section() for name, u in self.by_name.items()}


def make_upstreams(config: BrokerConfig, client: IdentityClient) -> Upstreams:
    if not config.upstreams and config.lwm2m_upstream is None and config.siem is None:
        return Upstreams({}, None)
    credentials = GatewayCredentials(client, config.identity.retry)
    by_name: dict[str, Upstream] = {}
    for name, section in config.upstreams.items():
        trust = read_trust(section.bundle, f"upstreams.{name}")
        by_name[name] = MqttUpstream(name, section.url, trust, credentials, section.timeout,
                                     section.client_id) \
            if section.url.startswith("mqtts:") else \
            CoapUpstream(name, section.url, trust, credentials, section.timeout)
    return Upstreams(by_name, credentials)
