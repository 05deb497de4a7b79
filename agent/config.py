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
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import ConfigError

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


# Pydantic's strict mode rejects str for Path; TOML has no path type, so we
# convert known path keys before validation, keeping the location for errors.
_PATH_KEYS = {("paths", "state_dir"), ("paths", "control_socket")}
_PATH_LIST_KEYS = {("trust", "ek_roots")}


def _coerce_paths(raw: dict[str, Any], base: Path) -> None:
    for section, key in _PATH_KEYS | _PATH_LIST_KEYS:
        sec = raw.get(section)
        if not isinstance(sec, dict) or key not in sec:
            continue
        value = sec[key]
        if (section, key) in _PATH_LIST_KEYS:
            if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
                sec[key] = [base / v for v in value]
        elif isinstance(value, str) and value:
            sec[key] = base / value


def _location(loc: tuple[int | str, ...]) -> str:
    if not loc:
        return "(top level)"
    head, *rest = loc
    if not rest:
        return f"[{head}]"
    key = str(rest[0])
    for part in rest[1:]:
        key += f"[{part}]" if isinstance(part, int) else f".{part}"
    return f"[{head}] {key}"


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] = AgentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        if not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return [k for k in model.model_fields if k != "source"]


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    where = _location(loc)
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc)
        hint = f" (known: {', '.join(known)})" if known else ""
        what = "unknown section" if len(loc) == 1 else "unknown key"
        return f"{where}: {what}{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "is_instance_of":
        msg = "should be a non-empty path string"
    if (err["type"].endswith("_type") or err["type"] == "is_instance_of") and "input" in err:
        msg += f", got {type(err['input']).__name__} {err['input']!r}"
    return f"{where}: {msg}"


def parse_config(text: str, source: Path) -> AgentConfig:
    """Parse and validate config text; raise ConfigError naming file and key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    _coerce_paths(raw, source.parent)
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(_describe(err) for err in e.errors())
        raise ConfigError(f"{source}: {problems}") from None
    for i, root in enumerate(config.trust.ek_roots):
        if not root.is_file():
            raise ConfigError(f"{source}: [trust] ek_roots[{i}]: {root}: no such file")
    return config.model_copy(update={"source": source})


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", "pass --config with an existing file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return parse_config(text, path.resolve())
