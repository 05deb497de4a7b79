"""devid-broker's configuration: a TOML file validated strictly at start.

    [paths]
    state_dir = "/var/lib/devid-broker"
    control_socket = "/run/devid-broker/control.sock"

    [identity]                      # the agent's identity API, as consumer "broker"
    socket = "/run/devid-agent/identity.sock"
    data_key = "sensor-db"          # the sealed secret the registry is encrypted under

    [control]
    group = "devid-broker"          # who besides root may use `devidctl sensors`

    [policy]
    file = "/etc/devid-broker/policy.toml"

    [listen]
    oscore = "[::]:5683"            # UDP, IPv6 and IPv4; "" turns the listener off
    dtls = "[::]:5684"              # DTLS 1.2 PSK (RFC 7925)

    [upstreams.cloud]               # where policy rules send traffic (`to = "cloud"`)
    url = "coaps+tcp://coap.example.net:5684"   # or mqtts://broker.example.net:8883
    bundle = "/etc/devid-broker/cloud-ca.pem"   # optional: else the agent's trust bundle
    timeout = "10s"

    [lwm2m_upstream]                # the fleet's LwM2M server: the gateway as /25
    url = "coaps://lwm2m.example.net:5684"

    [siem]                          # every event also to the SIEM (RFC 5425)
    url = "tls://siem.example.net:6514"

Errors name the file, section and key, as the agent's do.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from agent.config import ControlSection, LogSection
from agent.identityapi.protocol import SECRET_NAME
from agent.siem.settings import SiemSection
from agent.tomlconfig import (
    Duration,
    StrictSection,
    checked_by,
    host_port_url,
    parse_toml_model,
    read_config_text,
)

DEFAULT_CONFIG = Path("/etc/devid-broker/broker.toml")
DEFAULT_CONTROL_SOCKET = Path("/run/devid-broker/control.sock")



class BrokerPaths(StrictSection):
    state_dir: Path = Path("/var/lib/devid-broker")
    control_socket: Path = DEFAULT_CONTROL_SOCKET


class IdentitySection(StrictSection):
    socket: Path = Path("/run/devid-agent/identity.sock")
    data_key: Annotated[str, Field(pattern=SECRET_NAME.pattern)] = "sensor-db"
    # While the agent is not up yet, retry this often (and say so in STATUS=).
    retry: Duration = 2.0


class PolicySection(StrictSection):
    # Profiles and rules (docs/broker.md, 'Policy'). A missing file grants nothing.
    file: Path = Path("/etc/devid-broker/policy.toml")


_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>\d{1,5})$")


def parse_address(text: str) -> tuple[str, int]:
    """"[::]:5683" or "127.0.0.1:5683" as (host, port); ValueError saying what is wrong."""
    m = _ADDRESS.match(text)
    if m is None:
        raise ValueError(f"{text!r}: expected IPV4:PORT or [IPV6]:PORT")
    host = m.group("v6") or m.group("v4")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    port = int(m.group("port"))
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port {port} is not from 1 to 65535")
    return host, port


def _address_or_off(text: str) -> str:
    if text:
        parse_address(text)
    return text


ListenAddress = Annotated[str, AfterValidator(_address_or_off)]


class ListenSection(StrictSection):
    oscore: ListenAddress = "[::]:5683"
    dtls: ListenAddress = "[::]:5684"
    # Plain CoAP, only for sensors of profiles with `insecure = true`: off by default.
    plain: ListenAddress = ""
    # DTLS sessions held at once (each a few kB), and how long an idle one is kept.
    dtls_max_sessions: Annotated[int, Field(ge=1, le=1_000_000)] = 20000
    dtls_idle_timeout: Duration = 600.0
    # EDHOC sessions (on the OSCORE listener) end after this; the sensor runs EDHOC again.
    edhoc_lifetime: Annotated[Duration, Field(ge=10)] = 3600.0


def _check_upstream_url(url: str) -> None:
    from agent.broker.upstreams import check_url  # aiocoap and paho only when configured

    check_url(url)


class UpstreamSection(StrictSection):
    url: Annotated[str, AfterValidator(checked_by(_check_upstream_url))]
    bundle: Path | None = None  # PEM CAs the upstream is verified against
    timeout: Duration = 10.0
    # MQTT only: the client ID's prefix (a number is added per connection).
    client_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,40}$")] = "devid-broker"


def parse_lwm2m_url(url: str) -> tuple[str, int]:
    """(host, port) of the LwM2M server's `coaps://HOST[:PORT]`; ConfigError if not."""
    return host_port_url(url, "coaps", 5684,
                         "LwM2M over DTLS with the gateway's certificate")


class Lwm2mUpstreamSection(StrictSection):
    # The fleet's LwM2M server the gateway registers with as an LwM2M Gateway (/25),
    # over DTLS with its own certificate.
    url: Annotated[str, AfterValidator(checked_by(parse_lwm2m_url))]
    bundle: Path | None = None  # PEM CAs the server is verified against
    # The gateway's endpoint name; empty: its device ID (from its certificate).
    endpoint: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{0,128}$")] = ""
    lifetime: Annotated[int, Field(ge=30, le=86400)] = 300
    timeout: Duration = 10.0


class SpoolSection(StrictSection):
    # Store and forward for rules with `spool = true` (docs/broker.md, "Spool").
    max_messages: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    max_bytes: Annotated[int, Field(ge=1024, le=1 << 40)] = 64 << 20
    # The Max-Age of the 5.03 a sensor gets while the spool is full.
    retry_after: Annotated[int, Field(ge=1, le=86400)] = 30


class BrokerConfig(StrictSection):
    paths: BrokerPaths = Field(default_factory=BrokerPaths)
    identity: IdentitySection = Field(default_factory=IdentitySection)
    control: ControlSection = Field(default_factory=ControlSection)
    policy: PolicySection = Field(default_factory=PolicySection)
    listen: ListenSection = Field(default_factory=ListenSection)
    upstreams: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")],
                    UpstreamSection] = Field(default_factory=dict)
    spool: SpoolSection = Field(default_factory=SpoolSection)
    lwm2m_upstream: Lwm2mUpstreamSection | None = None
    siem: SiemSection | None = None
    log: LogSection = Field(default_factory=LogSection)
    source: Path | None = Field(default=None, exclude=True)


_PATH_KEYS = (("paths", "state_dir"), ("paths", "control_socket"), ("identity", "socket"),
              ("policy", "file"), ("upstreams", "*", "bundle"),
              ("lwm2m_upstream", "bundle"), ("siem", "bundle"))


def parse_broker_config(text: str, source: Path) -> BrokerConfig:
    config = parse_toml_model(BrokerConfig, text, source, _PATH_KEYS)
    return config.model_copy(update={"source": source})


def load_broker_config(path: Path, command: str | None = None) -> BrokerConfig:
    return parse_broker_config(read_config_text(path, command), path.resolve())
