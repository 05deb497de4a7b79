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
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.config import ControlSection
from agent.identityapi.protocol import SECRET_NAME
from agent.tomlconfig import Duration, parse_toml_model, read_config_text

DEFAULT_CONFIG = Path("/etc/devid-broker/broker.toml")
DEFAULT_CONTROL_SOCKET = Path("/run/devid-broker/control.sock")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BrokerPaths(_Section):
    state_dir: Path = Path("/var/lib/devid-broker")
    control_socket: Path = DEFAULT_CONTROL_SOCKET


class IdentitySection(_Section):
    socket: Path = Path("/run/devid-agent/identity.sock")
    data_key: Annotated[str, Field(pattern=SECRET_NAME.pattern)] = "sensor-db"
    # While the agent is not up yet, retry this often (and say so in STATUS=).
    retry: Duration = 2.0


class PolicySection(_Section):
    # Profiles and rules (docs/broker.md, 'Policy'). A missing file grants nothing.
    file: Path = Path("/etc/devid-broker/policy.toml")


class BrokerLog(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class BrokerConfig(_Section):
    paths: BrokerPaths = Field(default_factory=BrokerPaths)
    identity: IdentitySection = Field(default_factory=IdentitySection)
    control: ControlSection = Field(default_factory=ControlSection)
    policy: PolicySection = Field(default_factory=PolicySection)
    log: BrokerLog = Field(default_factory=BrokerLog)
    source: Path | None = Field(default=None, exclude=True)


_PATH_KEYS = (("paths", "state_dir"), ("paths", "control_socket"), ("identity", "socket"),
              ("policy", "file"))


def parse_broker_config(text: str, source: Path) -> BrokerConfig:
    config = parse_toml_model(BrokerConfig, text, source, _PATH_KEYS)
    return config.model_copy(update={"source": source})


def load_broker_config(path: Path, command: str | None = None) -> BrokerConfig:
    return parse_broker_config(read_config_text(path, command), path.resolve())
