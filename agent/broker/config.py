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

Errors name the file, section and key, as the agent's do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from agent.config import ControlSection, LogSection
from agent.identityapi.protocol import SECRET_NAME
from agent.tomlconfig import Duration, StrictSection, parse_toml_model, read_config_text

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


class BrokerConfig(StrictSection):
    paths: BrokerPaths = Field(default_factory=BrokerPaths)
    identity: IdentitySection = Field(default_factory=IdentitySection)
    control: ControlSection = Field(default_factory=ControlSection)
    policy: PolicySection = Field(default_factory=PolicySection)
    log: LogSection = Field(default_factory=LogSection)
    source: Path | None = Field(default=None, exclude=True)


_PATH_KEYS = (("paths", "state_dir"), ("paths", "control_socket"), ("identity", "socket"),
              ("policy", "file"))


def parse_broker_config(text: str, source: Path) -> BrokerConfig:
    config = parse_toml_model(BrokerConfig, text, source, _PATH_KEYS)
    return config.model_copy(update={"source": source})


def load_broker_config(path: Path, command: str | None = None) -> BrokerConfig:
    return parse_broker_config(read_config_text(path, command), path.resolve())
