"""Human- and JSON-friendly summaries of X.509 certificates. Pure."""

from __future__ import annotations

import datetime
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization


def spki_der(cert_or_key: x509.Certificate | object) -> bytes:
    """The DER SubjectPublicKeyInfo of a certificate's (or a public key's) key."""
    key = cert_or_key.public_key() if isinstance(cert_or_key, x509.Certificate) else cert_or_key
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_sha256(cert_or_key: x509.Certificate | object) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, the stable fingerprint of a key."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki_der(cert_or_key))
    return digest.finalize().hex()


def summarize(cert: x509.Certificate, now: datetime.datetime | None = None) -> dict[str, object]:
    when = now or datetime.datetime.now(datetime.UTC)
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    return {
        "subject": cert.subject.rfc4514_string() or "(empty)",
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": not_before.isoformat(),
        "not_after": not_after.isoformat(),
        "valid_now": not_before <= when <= not_after,
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


_CERT_REPR = re.compile(r"<Certificate\(subject=<Name\((?P<subject>.*?)\)>, \.\.\.\)>")
_ENCOUNTERED = re.compile(r" \(encountered processing (?P<what>.*)\)$")


def plain_verification_error(error: Exception) -> str:
    """cryptography's path-validation message without Python reprs:
    'cert is not valid at validation time (encountered processing <Certificate(subject=
    <Name(CN=x)>, ...)>)' becomes 'CN=x: cert is not valid at validation time'."""
    text = str(error).removeprefix("validation failed: ")
    text = _CERT_REPR.sub(lambda m: m.group("subject"), text)
    found = _ENCOUNTERED.search(text)
    if found:
        text = f"{found.group('what')}: {text[:found.start()]}"
    return text


def is_validity_error(error: Exception) -> bool:
    """The chain failed on a date: with a wrong clock, the clock is the cause."""
    return "not valid at validation time" in str(error)
