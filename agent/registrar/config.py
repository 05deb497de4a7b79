"""registrar.toml: the registrar's configuration, validated strictly at load.

Relative paths are relative to the file. See `devid-registrar init`, which
writes a commented file with every default.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator

from agent.enroll.messages import API_PREFIX
from agent.errors import ConfigError
from agent.tomlconfig import (
    Duration,
    DurationOrZero,
    StrictSection,
    check_named_file,
    checked_by,
    parse_toml_model,
    read_config_text,
)

CONFIG_NAME = "registrar.toml"
CRL_PATH = f"{API_PREFIX}/crl"
CA_ISSUERS_PATH = f"{API_PREFIX}/ca/issuing.crt"
# Certificates this short are for tests and demonstrations; `serve` warns below 5 minutes.
MIN_CERT_LIFETIME = 5.0
SHORT_CERT_LIFETIME = 300.0
# Without renewal_window: a tenth of cert_lifetime, at most this.
DEFAULT_RENEWAL_WINDOW_CAP = 600.0


@dataclass(frozen=True)
class Publication:
    """Where relying parties fetch the CRL and the issuing CA's certificate."""

    crl_url: str
    ca_issuers_url: str


class AllowedPcrs(StrictSection):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    # PCR index (as a TOML key, so a string) -> hex sha256 value
    values: dict[str, str]

    @field_validator("values")
    @classmethod
    def _hex_values(cls, v: dict[str, str]) -> dict[str, str]:
        for pcr, value in v.items():
            if not pcr.isdigit() or not 0 <= int(pcr) <= 23:
                raise ValueError(f"PCR {pcr!r}: expected an index 0..23")
            try:
                raw = bytes.fromhex(value)
            except ValueError:
                raise ValueError(f"PCR {pcr}: not a hex string") from None
            if len(raw) != 32:
                raise ValueError(f"PCR {pcr}: expected 32 bytes (64 hex digits), got {len(raw)}")
        return {k: v.lower() for k, v in v.items()}


class PcrPolicyConfig(StrictSection):
    # enforce: the quoted values must equal one allowed set.
    # permissive: any values pass (the quote itself is still verified); logged as a warning.
    mode: Literal["enforce", "permissive"] = "enforce"
    bank: Literal["sha256"] = "sha256"
    pcrs: list[Annotated[int, Field(ge=0, le=23)]] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7], min_length=1, max_length=24)
    allowed: list[AllowedPcrs] = Field(default_factory=list)

    @model_validator(mode="after")
    def _sets_cover_selection(self) -> PcrPolicyConfig:
        wanted = {str(p) for p in self.pcrs}
        for i, allowed in enumerate(self.allowed):
            if set(allowed.values) != wanted:
                raise ValueError(
                    f"allowed[{i}] ({allowed.name!r}) must give exactly PCRs {sorted(self.pcrs)}")
        return self


class CaKeySection(StrictSection):
    """Where the issuing CA's key lives (agent/registrar/keys.py)."""

    backend: Literal["file", "pkcs11"] = "file"
    module: Path | None = None  # the token's PKCS#11 library, e.g. libsofthsm2.so
    token_label: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    key_label: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    pin_file: Path | None = None  # the user PIN, in a file of its own (0600)

    @model_validator(mode="after")
    def _complete(self) -> CaKeySection:
        keys = ("module", "token_label", "key_label", "pin_file")
        given = [k for k in keys if getattr(self, k) is not None]
        if self.backend == "pkcs11" and len(given) != len(keys):
            missing = ", ".join(k for k in keys if k not in given)
            raise ValueError(f"backend \"pkcs11\" needs {', '.join(keys)} (missing: {missing})")
        if self.backend == "file" and given:
            raise ValueError(f"{', '.join(given)}: only for backend = \"pkcs11\"")
        return self


def parse_database_url(url: str) -> str:
    """postgresql://USER@HOST[:PORT]/DATABASE, without a password (that goes in
    password_file); ConfigError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise ConfigError(f"{url!r}: expected postgresql://USER@HOST[:PORT]/DATABASE")
    if parts.password is not None:
        raise ConfigError("the database URL holds a password; put it in password_file "
                          "instead (the URL is shown in logs and status)")
    if not parts.path.strip("/") or "/" in parts.path.strip("/"):
        raise ConfigError(f"{url!r}: name one database after the host")
    try:
        parts.port  # noqa: B018 (raises for a bad port)
    except ValueError:
        raise ConfigError(f"{url!r}: the port is not a number from 1 to 65535") from None
    return url


class DatabaseSection(StrictSection):
    """Unset url: the embedded SQLite file DIR/registrar.db. A PostgreSQL url: the fleet
    backend, which several `serve` replicas share (agent/registrar/sql.py)."""

    url: Annotated[str, AfterValidator(checked_by(parse_database_url))] | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _password_needs_url(self) -> DatabaseSection:
        if self.password_file is not None and self.url is None:
            raise ValueError("password_file: only with a PostgreSQL url")
        return self


PATH_KEYS = (("ek_roots",), ("ca_key", "module"), ("ca_key", "pin_file"),
             ("database", "password_file"))


class RegistrarConfig(StrictSection):
    listen: str = "127.0.0.1:8443"
    server_names: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "::1"], min_length=1)
    ek_roots: list[Path] = Field(default_factory=list)
    require_token: bool = True
    cert_lifetime: Duration = 24 * 3600.0
    challenge_ttl: Duration = 120.0
    max_pending_challenges: Annotated[int, Field(ge=1)] = 1000
    # A device may renew at most max_renewals_per_window times within any renewal_window;
    # more is refused (renewal-too-early). Unset: a tenth of cert_lifetime, at most 10
    # minutes. "0s" turns the check off.
    renewal_window: DurationOrZero | None = None
    max_renewals_per_window: Annotated[int, Field(ge=1, le=100)] = 3
    # Requests verified at once (enrollment, renewal, decommissioning); more get
    # registrar-busy (503) with Retry-After instead of queueing.
    max_in_flight: Annotated[int, Field(ge=1, le=1024)] = 8
    max_body_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 64 * 1024
    # TLS connections kept open; beyond, a new one closes the oldest that sent no request.
    max_connections: Annotated[int, Field(ge=8, le=100_000)] = 512
    # A connection must deliver a whole request this soon after it is made (or after its
    # previous response), and finish the TLS handshake within handshake_timeout.
    request_timeout: Duration = 20.0
    handshake_timeout: Duration = 10.0
    crl_next_update: Duration = 3600.0
    # Where relying parties find the CRL (PKI_URL/v1/crl) and the issuing CA certificate
    # (PKI_URL/v1/ca/issuing.crt): written into every device certificate. Unset: this
    # registrar itself, https://SERVER_NAMES[0]:PORT.
    pki_url: Annotated[str, AfterValidator(checked_by(parse_pki_url))] | None = None
    pcr_policy: PcrPolicyConfig = Field(default_factory=PcrPolicyConfig)
    ca_key: CaKeySection = Field(default_factory=CaKeySection)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host_port(v)
        return v

    @field_validator("cert_lifetime")
    @classmethod
    def _lifetime(cls, v: float) -> float:
        if not MIN_CERT_LIFETIME <= v <= 366 * 86400:
            raise ValueError("must be between 5s and 366d")
        return v

    @field_validator("renewal_window")
    @classmethod
    def _renewal_window(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v <= 30 * 86400:
            raise ValueError("must be between 0s and 30d")
        return v

    def effective_renewal_window(self) -> float:
        """Seconds within which a device may renew max_renewals_per_window times."""
        if self.renewal_window is not None:
            return self.renewal_window
        return min(self.cert_lifetime / 10, DEFAULT_RENEWAL_WINDOW_CAP)

    def publication(self) -> Publication:
        if self.pki_url is not None:
            base = parse_pki_url(self.pki_url)
        else:
            name = self.server_names[0]
            host = f"[{name}]" if ":" in name else name
            base = f"https://{host}:{host_port(self.listen)[1]}"
        return Publication(crl_url=f"{base}{CRL_PATH}", ca_issuers_url=f"{base}{CA_ISSUERS_PATH}")

    @field_validator("crl_next_update")
    @classmethod
    def _crl_next_update(cls, v: float) -> float:
        if not 60 <= v <= 7 * 86400:
            raise ValueError("must be between 1m and 7d")
        return v


def parse_pki_url(url: str) -> str:
    """http(s)://HOST[:PORT][/PATH] without a trailing slash; ConfigError saying what is
    wrong. RFC 5280 prefers plain HTTP for CRLs and caIssuers (no TLS loop for a
    relying party checking the registrar's own chain): a static mirror fed by
    `devid-registrar crl -o` and issuing.pem works as well as the registrar."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{url!r}: expected http(s)://HOST[:PORT][/PATH]")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{url!r}: no query, fragment or user information")
    try:
        parts.port  # noqa: B018 (raises for a bad port)
    except ValueError:
        raise ConfigError(f"{url!r}: the port is not a number from 1 to 65535") from None
    return url.rstrip("/")


def host_port(listen: str) -> tuple[str, int]:
    """'127.0.0.1:8443' or '[::1]:8443' -> (host, port); ValueError otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    return host, int(port)


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def load_registrar_config(directory: Path) -> RegistrarConfig:
    path = (directory / CONFIG_NAME).resolve()
    config = parse_toml_model(RegistrarConfig, read_config_text(path), path, PATH_KEYS)
    if not config.ek_roots:
        raise ConfigError(f"{path}: ek_roots: no trusted TPM vendor root configured; every "
                          "enrollment would be refused",
                          "list the PEM files of the TPM vendors' root CAs in ek_roots")
    for i, root in enumerate(config.ek_roots):
        check_named_file(path, f"ek_roots[{i}]", root)
    if config.ca_key.backend == "pkcs11":
        assert config.ca_key.module is not None and config.ca_key.pin_file is not None
        check_named_file(path, "[ca_key] module", config.ca_key.module)
        check_named_file(path, "[ca_key] pin_file", config.ca_key.pin_file)
    return config.model_copy(update={"source": path})


DEFAULT_CONFIG = """\
# devid-registrar configuration (written by `devid-registrar init`).
# Relative paths are relative to this file. Durations: "90s", "10m", "24h", "7d".

# Address and port to serve HTTPS on. "[::]:8443" or "0.0.0.0:8443" serves the network.
listen = {listen}

# Names and addresses put in the server's TLS certificate (re-issued at start when changed).
server_names = {server_names}

# PEM files with the root CAs (and any intermediates) of trusted TPM vendors.
# An EK certificate must chain to one of these roots, or enrollment is refused.
ek_roots = {ek_roots}

# Require a one-time token (`devid-registrar token create`) for each enrollment.
require_token = true

# Lifetime of issued device certificates (identity and TLS). Gateways renew at about
# two thirds of it, re-attesting each time. 5s is allowed, for tests.
cert_lifetime = "24h"

# How far ahead the CRL (GET /v1/crl) announces its next update.
crl_next_update = "1h"

# Where relying parties find the CRL (PKI_URL/v1/crl) and the issuing CA's certificate
# (PKI_URL/v1/ca/issuing.crt); every device certificate names both (CRL Distribution
# Points, Authority Information Access). Default: this registrar,
# https://SERVER_NAMES[0]:PORT. A plain-HTTP mirror is what RFC 5280 prefers.
# pki_url = "http://pki.example.net/devid"

# How long an enrollment challenge may be answered.
challenge_ttl = "2m"

# Refuse new enrollments (503 + Retry-After) while this many challenges are pending.
max_pending_challenges = 1000

# A device may renew at most max_renewals_per_window times within any renewal_window;
# more is refused (renewal-too-early, 429 + Retry-After). The few allowed are for a
# retry after a fault (a renewal that could not be saved, a restart that lost its TLS
# key); a device renewing in a loop is stopped. Default window: a tenth of
# cert_lifetime, at most 10 minutes; "0s" turns the check off. Gateways hold
# themselves to a longer floor of their own.
# renewal_window = "10m"
max_renewals_per_window = 3

# Requests verified at once (enrollment, renewal, decommissioning); more are answered
# registrar-busy (503 + Retry-After) at once instead of piling up.
max_in_flight = 8

# Largest accepted request body, in bytes.
max_body_bytes = 65536

# TLS connections kept open at once; beyond, a new connection closes the oldest one
# that has not sent a request. Each costs a descriptor (the unit sets LimitNOFILE).
max_connections = 512

# A connection must deliver a complete request within request_timeout of being made
# (or of its previous response), and finish its TLS handshake within handshake_timeout;
# idle and slow ("slowloris") connections are closed.
request_timeout = "20s"
handshake_timeout = "10s"

[pcr_policy]
# "enforce": the quoted PCR values must equal one of the allowed sets below.
# "permissive": any values pass (the quote is still verified); the registrar warns at start.
mode = "enforce"
bank = "sha256"
pcrs = {pcrs}

# One table per trusted platform state. A refused enrollment's detail shows the
# quoted values in this form, to copy here once the state is known to be good.
# [[pcr_policy.allowed]]
# name = "firmware 1.2, shim 15.7, grub 2.06"
# values = {{ "0" = "<64 hex digits>", "1" = "...", ... }}
{allowed}
# [database]
# Unset: SQLite in this directory (registrar.db), for one registrar process. For several
# `serve` replicas (same CA and challenge key: a shared directory, or copies of ca/ and
# challenge.key), one PostgreSQL database they share; the password, if any, in a file.
# url = "postgresql://devid@db.example.net:5432/registrar"
# password_file = "/etc/devid-registrar/db.password"
"""


CA_KEY_PKCS11 = """
[ca_key]
# The issuing CA's key is in a PKCS#11 token (an HSM): made there by `init`, sensitive
# and not extractable. The PIN is read from pin_file (keep it 0600, the registrar
# user's), held in memory only and never logged.
backend = "pkcs11"
module = {module}
token_label = {token_label}
key_label = {key_label}
pin_file = {pin_file}
"""
