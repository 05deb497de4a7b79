"""The registrar's directory: where each piece lives, and opening them together.

    DIR/registrar.toml   configuration
    DIR/ca/              the CA (see agent.registrar.ca)
    DIR/registrar.db     SQLite: devices, challenges, tokens
    DIR/audit.log        hash-chained audit log (+ audit.log.head)
    DIR/challenge.key    HMAC key sealing renewal/decommission challenges (0600)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from agent.access import access_denied, blocking_path
from agent.audit import AuditLog
from agent.errors import ConfigError, StateError
from agent.fsutil import ensure_private_dir, read_state_file, write_atomic
from agent.pki.ekchain import load_trust_store
from agent.registrar.ca import CertificateAuthority, load_file_key
from agent.registrar.config import (
    CA_KEY_PKCS11,
    CONFIG_NAME,
    DEFAULT_CONFIG,
    PATH_KEYS,
    SHORT_CERT_LIFETIME,
    CaKeySection,
    DatabaseSection,
    RegistrarConfig,
    load_registrar_config,
)
from agent.registrar.dbaudit import DatabaseAuditLog
from agent.registrar.keys import IssuingKey, Pkcs11Key, read_pin, read_secret_file
from agent.registrar.lifecycle import LifecycleService
from agent.registrar.service import EnrollmentService
from agent.registrar.sql import PostgresConnection, make_conninfo, redact_url
from agent.registrar.store import Store
from agent.tomlconfig import parse_toml_model, read_config_text

log = logging.getLogger(__name__)

CHALLENGE_KEY = "challenge.key"


@dataclass(frozen=True)
class RegistrarHome:
    directory: Path
    command: str | None = None  # how the user ran us, for "run `sudo …`" hints

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_NAME

    @property
    def ca_dir(self) -> Path:
        return self.directory / "ca"

    def require_access(self) -> None:
        """Every verb reads and writes here (the database journal, the audit log): the
        directory is the registrar user's alone, so say so before SQLite says "unable to
        open database file"."""
        blocked = blocking_path(self.directory)
        if blocked != Path(os.path.abspath(self.directory)) or (
                os.path.isdir(blocked) and not os.access(blocked, os.X_OK | os.W_OK)):
            raise access_denied(self.directory, "the registrar's directory", self.command)
        for name in (CONFIG_NAME, "registrar.db", "audit.log"):
            path = self.directory / name
            if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
                raise access_denied(path, "the registrar's files", self.command)

    def store(self) -> Store:
        self.require_access()
        if not self.config_path.exists():
            raise ConfigError(f"{self.config_path}: no such file",
                              f"run `devid-registrar init --dir {self.directory}` first")
        return self._open_store(self._config().database)

    def _config(self) -> RegistrarConfig:
        """registrar.toml as written, without the checks `serve` makes (the CLI's verbs
        work while, say, an EK root file is being replaced)."""
        path = self.config_path.resolve()
        return parse_toml_model(RegistrarConfig, read_config_text(path), path, PATH_KEYS)

    def _open_store(self, section: DatabaseSection) -> Store:
        if section.url is None:
            return Store(self.directory / "registrar.db")
        return Store(self._postgres(section))

    @staticmethod
    def _postgres(section: DatabaseSection) -> PostgresConnection:
        assert section.url is not None
        password = None
        if section.password_file is not None:
            password = read_secret_file(section.password_file, "[database] password_file")
        return PostgresConnection(make_conninfo(section.url, password=password),
                                  redact_url(section.url))

    def audit(self) -> AuditLog | DatabaseAuditLog:
        """The file DIR/audit.log, or with a PostgreSQL [database] the table every replica
        appends to (agent/registrar/dbaudit.py)."""
        self.require_access()
        database = self._config().database if self.config_path.exists() else None
        if database is not None and database.url is not None:
            return DatabaseAuditLog(self._postgres(database))
        return AuditLog(self.directory / "audit.log")

    def challenge_key(self) -> bytes:
        """The key that seals device challenges (agent.registrar.sealedchallenge), made on
        first use: kept, so that a challenge issued before a restart is still answered."""
        path = self.directory / CHALLENGE_KEY
        key = read_state_file(path)
        if key is None:
            write_atomic(path, secrets.token_bytes(32), mode=0o600)
            # Read back, not the bytes just made: if another process sharing the
            # directory made one at the same moment, both end up with the file's.
            key = path.read_bytes()
        if len(key) != 32:
            raise StateError(f"{path}: {len(key)} bytes, expected 32",
                             "delete it: a new key is made at the next start (challenges "
                             "issued before are then refused, and the devices ask again)")
        return key

    def init(self, ek_roots: list[Path], listen: str, server_names: list[str],
             pcrs: list[int], allowed_toml: str = "", ca_key: CaKeySection | None = None,
             offline_root: bool = False) -> CertificateAuthority | x509.CertificateSigningRequest:
        """Create the CA and a commented registrar.toml; refuses to overwrite either.

        `ca_key` (pkcs11): the issuing key is made in that token. `offline_root`: no root
        here; the issuing CA's request is returned (and in ca/issuing.csr) for the root
        to sign, and `import_issuing` completes the CA."""
        if self.config_path.exists():
            raise ConfigError(f"{self.config_path}: already exists; not overwriting it")
        text = DEFAULT_CONFIG.format(
            listen=json.dumps(listen), server_names=json.dumps(server_names),
            ek_roots=json.dumps([str(p.resolve()) for p in ek_roots]),
            pcrs=json.dumps(pcrs), allowed=allowed_toml)
        if ca_key is not None and ca_key.backend == "pkcs11":
            text += CA_KEY_PKCS11.format(**{k: json.dumps(str(v)) for k, v in
                                            ca_key.model_dump(exclude={"backend"}).items()})
        config = parse_toml_model(RegistrarConfig, text, self.config_path, PATH_KEYS)
        ensure_private_dir(self.directory)
        key: IssuingKey | None = None
        if config.ca_key.backend == "pkcs11":
            section = config.ca_key
            assert section.module and section.token_label and section.key_label \
                and section.pin_file
            key = Pkcs11Key.generate(section.module, section.token_label, section.key_label,
                                     read_pin(section.pin_file))
        now = datetime.datetime.now(datetime.UTC)
        made: CertificateAuthority | x509.CertificateSigningRequest
        if offline_root:
            made = CertificateAuthority.request_issuing(self.ca_dir, key)
        else:
            made = CertificateAuthority.create(self.ca_dir, now, key)
            made.ensure_server_certificate(server_names, now)
        write_atomic(self.config_path, text.encode(), mode=0o644)
        self._open_store(config.database).close()
        root = None if isinstance(made, x509.CertificateSigningRequest) else made.root
        self.audit().append("registrar-initialized",
                            issuing_key=key.describe() if key else "file ca/issuing.key",
                            offline_root=offline_root,
                            root_ca=root.subject.rfc4514_string() if root else None)
        return made

    def issuing_key(self, config: RegistrarConfig) -> IssuingKey | None:
        """The token's key when [ca_key] says pkcs11; None: the CA's own file."""
        section = config.ca_key
        if section.backend != "pkcs11":
            return None
        assert section.module and section.token_label and section.key_label \
            and section.pin_file
        return Pkcs11Key(section.module, section.token_label, section.key_label,
                         read_pin(section.pin_file))

    def import_issuing(self, certificate_pem: bytes, root_pem: bytes) -> CertificateAuthority:
        """`ca import`: the offline root's certificate for our issuing key."""
        self.require_access()
        config = load_registrar_config(self.directory)
        now = datetime.datetime.now(datetime.UTC)
        key = self.issuing_key(config) or load_file_key(self.ca_dir / "issuing.key")
        ca = CertificateAuthority.import_issuing(self.ca_dir, certificate_pem, root_pem, key,
                                                 now)
        ca.ensure_server_certificate(config.server_names, now)
        self.audit().append("issuing-ca-imported", root_ca=ca.root.subject.rfc4514_string(),
                            issuing_serial=f"{ca.issuing.serial_number:x}")
        return ca

    def lifecycle(self) -> LifecycleService:
        """The lifecycle operations alone (the CLI's revoke and crl)."""
        self.require_access()
        config = load_registrar_config(self.directory)
        return LifecycleService(config, CertificateAuthority.load(self.ca_dir,
                                                                  self.issuing_key(config)),
                                self.store(),
                                self.audit(), challenge_key=self.challenge_key())

    def open_service(self) -> tuple[RegistrarConfig, EnrollmentService, LifecycleService]:
        self.require_access()
        config = load_registrar_config(self.directory)
        trust = load_trust_store(config.ek_roots, "ek_roots")
        ca = CertificateAuthority.load(self.ca_dir, self.issuing_key(config))
        log.info("issuing CA key: %s", ca.issuing_key.describe())
        if ca.ensure_server_certificate(config.server_names,
                                        datetime.datetime.now(datetime.UTC)):
            log.info("issued a new TLS server certificate for %s", ", ".join(config.server_names))
        if config.pcr_policy.mode == "permissive":
            log.warning("pcr_policy.mode is 'permissive': quotes are verified but any PCR values "
                        "are accepted; set mode = \"enforce\" with allowed sets for production")
        elif not config.pcr_policy.allowed:
            log.warning("pcr_policy has no allowed sets: every enrollment will be refused with "
                        "pcr-policy-violation until one is added")
        if config.cert_lifetime < SHORT_CERT_LIFETIME:
            log.warning("cert_lifetime is %.0fs: certificates this short are for tests; "
                        "gateways will renew every %.0fs", config.cert_lifetime,
                        config.cert_lifetime * 2 / 3)
        store, audit = self.store(), self.audit()
        service = EnrollmentService(config, ca, store, audit, trust)
        lifecycle = LifecycleService(config, ca, store, audit, trust,
                                     challenge_key=self.challenge_key())
        return config, service, lifecycle
