"""A credential set as the identity API hands it out, and back. Pure.

The agent turns its current `TlsCredentials` plus the trust bundle into a
document (`credential_document`); a consumer turns that document back into a
checked `CredentialSet` (every PEM parsed, the key matching the certificate)
and from there into files (`files()`, for sinks and `devidctl credentials
fetch --out`) or an `ssl.SSLContext`.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ProtocolError
from agent.pki.certinfo import spki_der
from agent.rotation.credentials import TlsCredentials, load_chain_from_memory
from agent.rotation.tlskey import private_pem
from agent.secret import SecretBytes

FILES = ("cert.pem", "chain.pem", "fullchain.pem", "key.pem", "bundle.pem")
KEY_FILE = "key.pem"


def _pem(certs: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def credential_document(creds: TlsCredentials, bundle: Sequence[x509.Certificate],
                        generation: int) -> dict[str, Any]:
    cert = creds.certificate
    return {
        "device_id": creds.device_id,
        "serial": creds.serial,
        "generation": generation,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "certificate": _pem([cert]),
        "chain": _pem(creds.chain[1:]),
        "bundle": _pem(bundle),
        "key": private_pem(creds.key).decode(),
    }


def _certificates(doc: dict[str, Any], key: str, *, at_least: int) -> list[x509.Certificate]:
    value = doc.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"credentials: {key}: expected PEM text")
    if not value.strip():
        certs: list[x509.Certificate] = []
    else:
        try:
            certs = x509.load_pem_x509_certificates(value.encode())
        except ValueError:
            raise ProtocolError(f"credentials: {key}: not PEM certificates") from None
    if len(certs) < at_least:
        raise ProtocolError(f"credentials: {key}: expected at least {at_least} certificate(s)")
    return certs


def _time(doc: dict[str, Any], key: str) -> datetime.datetime:
    value = doc.get(key)
    try:
        when = datetime.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ProtocolError(f"credentials: {key}: expected an ISO 8601 time with a zone")
    return when


@dataclass(frozen=True)
class CredentialSet:
    device_id: str
    serial: str
    generation: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # intermediates, leaf excluded
    bundle: tuple[x509.Certificate, ...]  # trust anchors for the fleet's servers
    key: SecretBytes  # PKCS#8 PEM; shown as <secret: N bytes>

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> CredentialSet:
        for key in ("device_id", "serial"):
            if not isinstance(doc.get(key), str) or not doc[key]:
                raise ProtocolError(f"credentials: {key}: expected a non-empty string")
        generation = doc.get("generation")
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            raise ProtocolError("credentials: generation: expected a non-negative integer")
        leaf = _certificates(doc, "certificate", at_least=1)
        if len(leaf) != 1:
            raise ProtocolError("credentials: certificate: expected exactly one certificate")
        key_text = doc.get("key")
        if not isinstance(key_text, str):
            raise ProtocolError("credentials: key: expected PEM text")
        try:
            key = serialization.load_pem_private_key(key_text.encode(), password=None)
        except (ValueError, TypeError):
            raise ProtocolError("credentials: key: not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or \
                spki_der(key.public_key()) != spki_der(leaf[0]):
            raise ProtocolError("credentials: key: does not match the certificate")
        return cls(doc["device_id"], doc["serial"], generation, _time(doc, "not_before"),
                   _time(doc, "not_after"), leaf[0],
                   tuple(_certificates(doc, "chain", at_least=0)),
                   tuple(_certificates(doc, "bundle", at_least=1)),
                   SecretBytes(key_text.encode()))

    def files(self) -> dict[str, bytes]:
        """The PEM files a sink (or `credentials fetch --out`) writes, by name."""
        leaf, chain = _pem([self.certificate]).encode(), _pem(self.chain).encode()
        return {"cert.pem": leaf, "chain.pem": chain, "fullchain.pem": leaf + chain,
                KEY_FILE: self.key.reveal(), "bundle.pem": _pem(self.bundle).encode()}

    def summary(self) -> dict[str, Any]:
        """Everything but the key, for printing."""
        return {"device_id": self.device_id, "serial": self.serial,
                "generation": self.generation, "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat(),
                "subject": self.certificate.subject.rfc4514_string(),
                "chain_certificates": len(self.chain), "bundle_certificates": len(self.bundle)}

    def ssl_context(self, purpose: str = "client", trust: str | None = None) -> ssl.SSLContext:
        """TLS >= 1.2 presenting this set; "client" verifies servers against the bundle,
        "server" requires client certificates from it. `trust` (PEM) replaces the bundle,
        e.g. for an upstream under another CA. The key goes through memory only."""
        cadata = trust if trust is not None else _pem(self.bundle)
        if purpose == "client":
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=cadata)
        elif purpose == "server":
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=cadata)
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            raise ValueError(f"purpose: expected 'client' or 'server', got {purpose!r}")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        files = self.files()
        load_chain_from_memory(ctx, files["fullchain.pem"], files[KEY_FILE])
        return ctx
