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

    [enrollment]
    url = "https://registrar.example:8443"
    ca = "/etc/devid-agent/registrar-ca.pem"
    token_file = "/etc/devid-agent/enrollment-token"

    [rotation]
    renew_fraction = 0.667
    reload_hooks = ["/usr/bin/systemctl reload my-uplink"]
"""

from __future__ import annotations

import grp
import pwd
import re
import shlex
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from agent.access import explain
from agent.enroll.messages import Platform, PlatformText
from agent.enroll.platform import platform_of
from agent.errors import ConfigError
from agent.siem.settings import SiemSection
from agent.tomlconfig import (
    Duration,
    StrictSection,
    check_named_file,
    parse_toml_model,
    read_config_text,
)
from agent.tpm.tcti import parse_tcti


class TpmSection(StrictSection):
    tcti: str = "device:/dev/tpmrm0"
    # A TPM command still running after this long means a wedged TPM or driver: the
    # agent stops its watchdog pings so that systemd restarts it. RSA key creation on
    # a slow TPM takes seconds, never minutes.
    hang_timeout: Duration = 120.0
    # A persistent handle (owner range, e.g. 0x81000002) for the storage root key: made
    # there once (EvictControl), then used at every start instead of a CreatePrimary.
    # Unset: a transient SRK re-derived at each start (nothing left in the TPM's NV).
    srk_handle: Annotated[int, Field(ge=0x81000000, le=0x817FFFFF)] | None = None

    @field_validator("tcti")
    @classmethod
    def _tcti_valid(cls, v: str) -> str:
        parse_tcti(v)  # tpm2-tss would only notice when connecting, and retry forever
        return v


class PathsSection(StrictSection):
    state_dir: Path = Path("/var/lib/devid-agent")
    control_socket: Path = Path("/run/devid-agent/control.sock")


class TrustSection(StrictSection):
    ek_roots: list[Path] = Field(default_factory=list)


class ControlSection(StrictSection):
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


class EnrollmentSection(StrictSection):
    url: str  # https://registrar:8443
    ca: Path  # the registrar's root CA, pinned for TLS and for the issued chain
    # One-time enrollment token, inline or in a file (e.g. provisioned at install time).
    token: SecretStr | None = None
    token_file: Path | None = None
    timeout: Duration = 30.0
    retry_initial: Duration = 5.0
    retry_max: Duration = 600.0

    @field_validator("url")
    @classmethod
    def _https(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"expected an https:// URL, got {v!r}")
        if parts.query or parts.fragment:
            raise ValueError("the URL must not have a query or fragment")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _one_token_source(self) -> EnrollmentSection:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set token or token_file, not both")
        return self

    def read_token(self) -> str | None:
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except PermissionError as e:
            denied = explain(e, "[enrollment] token_file")
            raise ConfigError(denied.message, "the agent's user must be able to read it: "
                              f"chown or chmod it ({denied.hint})") from None
        except FileNotFoundError:
            raise ConfigError(f"[enrollment] token_file: {self.token_file}: no such file",
                              "provision the enrollment token file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"[enrollment] token_file: {self.token_file}: cannot read: "
                              f"{getattr(e, 'strerror', None) or e}",
                              "provision the enrollment token file") from None
        return token or None


def _absolute_command(command: str, where: str) -> None:
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    if not argv or not Path(argv[0]).is_absolute():
        raise ValueError(f"{where}{command!r}: start with an absolute path to the program "
                         "(commands run without a shell or PATH lookup)")


class RotationSection(StrictSection):
    # Renew at this fraction of the certificate lifetime, moved by up to ±jitter of it.
    renew_fraction: Annotated[float, Field(ge=0.1, le=0.95)] = 2 / 3
    jitter: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    # Backoff after a failed renewal (capped exponential with jitter).
    retry_initial: Duration = 5.0
    retry_max: Duration = 300.0
    # Automatic renewals are at least this far apart, and at least half the planned
    # interval (capped at half the lifetime), whatever the clocks say. `devidctl renew`
    # is not held back.
    min_interval: Duration = 30.0
    # How far the local clock may differ from the registrar's before `devidctl check`
    # fails the clock (renewals are planned in the registrar's time either way).
    clock_skew: Duration = 300.0
    # PCRs (sha256) the TLS key is sealed to; a changed value makes the agent rotate.
    seal_pcrs: list[Annotated[int, Field(ge=0, le=23)]] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7], min_length=1, max_length=24)
    # Commands run (no shell) after each successful rotation, e.g. "systemctl reload x".
    reload_hooks: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    hook_timeout: Duration = 30.0

    @field_validator("reload_hooks")
    @classmethod
    def _commands(cls, v: list[str]) -> list[str]:
        for i, command in enumerate(v):
            _absolute_command(command, f"[{i}]: ")
        return v

    def hook_argvs(self) -> list[list[str]]:
        return [shlex.split(c) for c in self.reload_hooks]


class IdentityApiSection(StrictSection):
    # The local identity API (docs/identity-api.md); any local user may connect,
    # the agent decides from the peer's uid/gid/unit which consumer it is.
    socket: Path = Path("/run/devid-agent/identity.sock")
    # Where file sinks go: one directory per consumer; must be on tmpfs or ramfs.
    sink_root: Path = Path("/run/devid-agent/tls")
    # PCRs (sha256) consumers' secrets are sealed to. Unlike the TLS key, a secret cannot
    # be re-made after these change (firmware update): choose what must stay the same.
    secret_pcrs: list[Annotated[int, Field(ge=0, le=23)]] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7], min_length=1, max_length=24)


CONSUMER_NAME = r"^[a-z][a-z0-9-]{0,31}$"
UNIT_NAME = r"^[A-Za-z0-9:_.@\\-]+\.(service|scope)$"


def _user_id(value: str | int, what: str) -> int:
    if isinstance(value, int):
        if not 0 <= value < 2**32 - 1:
            raise ValueError(f"{what} {value} is out of range")
        return value
    try:
        return pwd.getpwnam(value).pw_uid if what == "uid" else grp.getgrnam(value).gr_gid
    except KeyError:
        kind = "user" if what == "uid" else "group"
        raise ValueError(f"no such {kind} {value!r} on this system") from None


class ConsumerSection(StrictSection):
    """One program allowed to use the gateway's identity ([[consumers]])."""
    name: Annotated[str, Field(pattern=CONSUMER_NAME)]
    # Who may act as this consumer: a user (name or uid), optionally also a group
    # (primary or supplementary) and the systemd unit the peer runs in.
    user: str | int
    group: str | int | None = None
    unit: Annotated[str, Field(pattern=UNIT_NAME)] | None = None
    grants: Annotated[list[Literal["credentials", "sign", "secrets"]], Field(min_length=1)]
    # `sign`: at most sign_burst signatures at once, then one per sign_interval.
    sign_burst: Annotated[int, Field(ge=1, le=100)] = 5
    sign_interval: Duration = 10.0
    # A file sink: cert.pem, chain.pem, fullchain.pem, key.pem, bundle.pem under
    # [identity_api] sink_root/NAME, readable by the user (0600) or also the group (0640).
    sink: bool = False
    sink_mode: Literal["0600", "0640"] = "0600"
    # Run (no shell, absolute path) after the sink changed, e.g. to reload the consumer.
    reload: Annotated[str, Field(min_length=1)] | None = None

    @field_validator("user")
    @classmethod
    def _user_exists(cls, v: str | int) -> str | int:
        _user_id(v, "uid")
        return v

    @field_validator("group")
    @classmethod
    def _group_exists(cls, v: str | int | None) -> str | int | None:
        if v is not None:
            _user_id(v, "gid")
        return v

    @field_validator("grants")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a grant is listed twice")
        return v

    @field_validator("reload")
    @classmethod
    def _command(cls, v: str | None) -> str | None:
        if v is not None:
            _absolute_command(v, "")
        return v

    @model_validator(mode="after")
    def _sink_needs(self) -> ConsumerSection:
        if (self.sink or self.reload) and "credentials" not in self.grants:
            raise ValueError("sink and reload need the grant \"credentials\"")
        if self.reload and not self.sink:
            raise ValueError("reload runs after the sink changes: set sink = true")
        if self.sink_mode == "0640" and self.group is None:
            raise ValueError("sink_mode \"0640\" makes the files readable by the group: "
                             "set group")
        return self

    @property
    def uid(self) -> int:
        return _user_id(self.user, "uid")

    @property
    def gid(self) -> int | None:
        return None if self.group is None else _user_id(self.group, "gid")

    def reload_argv(self) -> list[str] | None:
        return shlex.split(self.reload) if self.reload else None


class DeviceSection(StrictSection):
    """What the gateway says about itself (agent/enroll/platform.py): each key set here
    wins over the firmware's DMI data; the registrar records it as device-asserted."""

    manufacturer: PlatformText | None = None
    model: PlatformText | None = None
    serial: PlatformText | None = None
    version: PlatformText | None = None  # firmware version
    dmi: bool = True  # fill what is not set from /sys/class/dmi/id

    def platform(self, dmi_dir: Path | None = None) -> Platform | None:
        configured = self.model_dump(exclude={"dmi"})
        if dmi_dir is None:
            return platform_of(configured, self.dmi)
        return platform_of(configured, self.dmi, dmi_dir)


class LogSection(StrictSection):
    level: Literal["debug", "info", "warning", "error"] = "info"


class AgentConfig(StrictSection):
    tpm: TpmSection = Field(default_factory=TpmSection)
    paths: PathsSection = Field(default_factory=PathsSection)
    trust: TrustSection = Field(default_factory=TrustSection)
    control: ControlSection = Field(default_factory=ControlSection)
    log: LogSection = Field(default_factory=LogSection)
    device: DeviceSection = Field(default_factory=DeviceSection)
    enrollment: EnrollmentSection | None = None
    rotation: RotationSection = Field(default_factory=RotationSection)
    identity_api: IdentityApiSection = Field(default_factory=IdentityApiSection)
    consumers: list[ConsumerSection] = Field(default_factory=list)
    siem: SiemSection | None = None
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("consumers")
    @classmethod
    def _distinct(cls, v: list[ConsumerSection]) -> list[ConsumerSection]:
        names: set[str] = set()
        who: dict[tuple[int, int | None, str | None], str] = {}
        for consumer in v:
            if consumer.name in names:
                raise ValueError(f"two consumers are named {consumer.name!r}")
            names.add(consumer.name)
            key = (consumer.uid, consumer.gid, consumer.unit)
            if key in who:
                raise ValueError(f"{who[key]!r} and {consumer.name!r} match the same peers "
                                 "(same user, group and unit): a peer must be one consumer")
            who[key] = consumer.name
        return v


_PATH_KEYS = (("paths", "state_dir"), ("paths", "control_socket"), ("trust", "ek_roots"),
              ("enrollment", "ca"), ("enrollment", "token_file"), ("identity_api", "socket"),
              ("identity_api", "sink_root"), ("siem", "bundle"))


def named_files(config: AgentConfig) -> list[tuple[str, Path]]:
    """(key, path) of every file the configuration names that must exist at start.
    ([enrollment] token_file may be provisioned later; it is checked when enrolling.)"""
    files = [(f"[trust] ek_roots[{i}]", root) for i, root in enumerate(config.trust.ek_roots)]
    if config.enrollment is not None:
        files.append(("[enrollment] ca", config.enrollment.ca))
    return files


def hook_programs(config: AgentConfig) -> list[tuple[str, Path]]:
    """(key, program) of every reload hook, which must exist and be executable."""
    programs = [(f"[rotation] reload_hooks[{i}]", Path(argv[0]))
                for i, argv in enumerate(config.rotation.hook_argvs())]
    for i, consumer in enumerate(config.consumers):
        argv = consumer.reload_argv()
        if argv:
            programs.append((f"[[consumers]][{i}] reload", Path(argv[0])))
    return programs


def key_for_path(config: AgentConfig, path: Path | str) -> str | None:
    """The configuration key naming `path` or a directory above it, for error messages."""
    target = Path(path)
    candidates = [("[paths] state_dir", config.paths.state_dir),
                  ("[paths] control_socket", config.paths.control_socket),
                  ("[identity_api] socket", config.identity_api.socket),
                  ("[identity_api] sink_root", config.identity_api.sink_root),
                  *named_files(config), *hook_programs(config)]
    for key, named in candidates:
        if target == named or named in target.parents:
            return key
    return None


def parse_config(text: str, source: Path, *, others_may_read: bool = False,
                 command: str | None = None) -> AgentConfig:
    """Parse and validate config text; raise ConfigError naming file and key.

    `others_may_read`: the caller is devidctl, not the agent, which reads these files as
    its own user: a file this user may not read is left for the agent to judge."""
    config = parse_toml_model(AgentConfig, text, source, _PATH_KEYS)
    for key, path in named_files(config):
        check_named_file(source, key, path, others_may_read=others_may_read, command=command)
    for key, program in hook_programs(config):
        check_named_file(source, key, program, others_may_read=others_may_read,
                         command=command, executable=True)
    return config.model_copy(update={"source": source})


def load_config(path: Path, *, others_may_read: bool = False,
                command: str | None = None) -> AgentConfig:
    return parse_config(read_config_text(path, command), path.resolve(),
                        others_may_read=others_may_read, command=command)


def _socket_of(path: Path, section: str, key: str, default: Path) -> Path:
    """The socket `[section] key` in a configuration file, read leniently (the file may
    no longer validate, or even parse, or not be ours to read): `default` when it cannot
    be told."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return default
    try:
        table = tomllib.loads(text).get(section)
        value = table.get(key) if isinstance(table, dict) else None
    except tomllib.TOMLDecodeError:  # not TOML any more: the line may still be there
        found = re.search(rf'^\s*{key}\s*=\s*"([^"]+)"', text, re.MULTILINE)
        value = found.group(1) if found else None
    if not isinstance(value, str) or not value:
        return default
    socket = Path(value)
    return socket if socket.is_absolute() else path.resolve().parent / socket


def control_socket_of(path: Path) -> Path:
    """devidctl uses it to reach a daemon still running on the configuration it loaded
    earlier, when the file no longer validates."""
    return _socket_of(path, "paths", "control_socket", PathsSection().control_socket)


def identity_socket_of(path: Path) -> Path:
    """A consumer's devidctl (`credentials`) usually may not read agent.toml at all: the
    identity API's socket, or its default, is all it needs from it."""
    return _socket_of(path, "identity_api", "socket", IdentityApiSection().socket)


def secret_keys() -> set[tuple[str, str]]:
    """(section, key) of every secret setting, for redaction (support bundles)."""
    found = set()
    for section, field in AgentConfig.model_fields.items():
        models = [a for a in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        for model in models:
            for key, inner in model.model_fields.items():
                if SecretStr in (inner.annotation, *typing.get_args(inner.annotation)):
                    found.add((section, key))
    return found
