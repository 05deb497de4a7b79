"""Agent configuration: a TOML file, validated strictly at start.

A wrong key, type or value is refused with a message naming the file, the
section and the key, e.g. `agent.toml: [tpm] tcit: unknown key (known: tcti)`.
Relative paths are taken relative to the config file's directory.

Example:

    [tpm]
    tcti = "device:/dev/tpmrm0"

    [paths]
    state_dir = "/var/lib/devid-agent"
    control_socket = "/run/devid-agent/control.sock"

    [trust]
    ek_roots = ["/etc/devid-agent/tpm-vendors.pem"]

    [control]
    group = "devid"
"""

from __future__ import annotations

import grp
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.errors import ConfigError
from agent.tomlconfig import parse_toml_model, read_config_text

KNOWN_TCTIS = ("device", "swtpm", "mssim", "tabrmd", "libtpms")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TpmSection(_Section):
    tcti: str = "device:/dev/tpmrm0"

    @field_validator("tcti")
    @classmethod
    def _tcti_known(cls, v: str) -> str:
        name = v.split(":", 1)[0]
        if name not in KNOWN_TCTIS:
            raise ValueError(
                f"unknown TCTI {name!r}; use one of {', '.join(KNOWN_TCTIS)} "
                "(e.g. 'device:/dev/tpmrm0' or 'swtpm:host=127.0.0.1,port=2321')"
            )
        return v


class PathsSection(_Section):
    state_dir: Path = Path("/var/lib/devid-agent")
    control_socket: Path = Path("/run/devid-agent/control.sock")


class TrustSection(_Section):
    ek_roots: list[Path] = Field(default_factory=list)


class ControlSection(_Section):
    # Group whose members may use the control socket besides root.
    group: Annotated[str, Field(min_length=1)] | None = None

    @field_validator("group")
    @classmethod
    def _group_exists(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                grp.getgrnam(v)
            except KeyError:
                raise ValueError(f"no such group {v!r} on this system") from None
        return v


class LogSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class AgentConfig(_Section):
    tpm: TpmSection = Field(default_factory=TpmSection)
    paths: PathsSection = Field(default_factory=PathsSection)
    trust: TrustSection = Field(default_factory=TrustSection)
    control: ControlSection = Field(default_factory=ControlSection)
    log: LogSection = Field(default_factory=LogSection)
    source: Path | None = Field(default=None, exclude=True)


_PATH_KEYS = (("paths", "state_dir"), ("paths", "control_socket"), ("trust", "ek_roots"))


def parse_config(text: str, source: Path) -> AgentConfig:
    """Parse and validate config text; raise ConfigError naming file and key."""
    config = parse_toml_model(AgentConfig, text, source, _PATH_KEYS)
    for i, root in enumerate(config.trust.ek_roots):
        if not root.is_file():
            raise ConfigError(f"{source}: [trust] ek_roots[{i}]: {root}: no such file")
    return config.model_copy(update={"source": source})


def load_config(path: Path) -> AgentConfig:
    return parse_config(read_config_text(path), path.resolve())
