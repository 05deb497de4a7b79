"""EK certificate chain verification against trusted TPM vendor roots. Pure.

EK certificates are odd X.509: empty or placeholder subjects, a *critical*
subjectAltName holding a directoryName with the TPM manufacturer, model and
version, an EKU of tcg-kp-EKCertificate. Strict web-PKI leaf rules reject
them, which is why incumbents' verifiers fail on real vendor chains. We use
cryptography's RFC 5280 path builder with:

- a CA policy that requires basicConstraints (cA=TRUE) and, when keyUsage is
  present, keyCertSign, but tolerates the rest of vendors' CA quirks;
- a leaf policy that accepts the EK profile's extensions.

Intermediates come from the TPM's EK-chain NV indices and from the configured
trust files: a self-signed certificate in those files is a trust anchor, any
other certificate is only a candidate intermediate, never an anchor.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509 import verification as v

from agent.errors import ConfigError, ProtocolError
from agent.pki.certinfo import is_validity_error, plain_verification_error

TCG_EK_CERTIFICATE_EKU = x509.ObjectIdentifier("2.23.133.8.1")
TPM_MANUFACTURER_OID = x509.ObjectIdentifier("2.23.133.2.1")
TPM_MODEL_OID = x509.ObjectIdentifier("2.23.133.2.2")
TPM_VERSION_OID = x509.ObjectIdentifier("2.23.133.2.3")
MAX_CHAIN_DEPTH = 6


@dataclass(frozen=True)
class TrustStore:
    anchors: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChainVerdict:
    verified: bool
    reason: str
    chain: tuple[str, ...] = field(default=())  # subjects, leaf first
    dated: bool = False  # failed on a date: with a wrong clock, the clock is the cause

    def to_dict(self) -> dict[str, object]:
        return {"verified": self.verified, "reason": self.reason, "chain": list(self.chain)}


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def load_trust_store(paths: Sequence[Path], setting: str = "[trust] ek_roots") -> TrustStore:
    """Read PEM bundles; a file that holds no certificate is a ConfigError."""
    anchors: list[x509.Certificate] = []
    intermediates: list[x509.Certificate] = []
    for path in paths:
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except OSError as e:
            raise ConfigError(f"{setting}: {path}: cannot read: {e.strerror}") from None
        except ValueError:
            raise ConfigError(
                f"{setting}: {path}: no valid PEM certificate in file"
            ) from None
        for cert in certs:
            (anchors if _is_self_signed(cert) else intermediates).append(cert)
    return TrustStore(tuple(anchors), tuple(intermediates), tuple(str(p) for p in paths))


def split_der_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    """Parse concatenated DER certificates (the TCG EK-chain NV format).

    NV indices are often padded with 0x00 or 0xFF after the last certificate.
    """
    certs: list[x509.Certificate] = []
    pos = 0
    while pos < len(data) and data[pos] not in (0x00, 0xFF):
        if data[pos] != 0x30 or pos + 2 > len(data):
            raise ProtocolError(f"{where}: byte {pos}: not the start of a DER certificate")
        length_byte = data[pos + 1]
        if length_byte < 0x80:
            header, length = 2, length_byte
        else:
            n = length_byte & 0x7F
            if n == 0 or n > 4 or pos + 2 + n > len(data):
                raise ProtocolError(f"{where}: byte {pos}: bad DER length")
            header, length = 2 + n, int.from_bytes(data[pos + 2:pos + 2 + n], "big")
        end = pos + header + length
        if end > len(data):
            raise ProtocolError(f"{where}: byte {pos}: certificate truncated")
        try:
            certs.append(x509.load_der_x509_certificate(data[pos:end]))
        except ValueError:
            raise ProtocolError(f"{where}: byte {pos}: not a valid X.509 certificate") from None
        pos = end
    return certs


def _require_ca(_policy: v.Policy, _cert: x509.Certificate, ext: x509.BasicConstraints) -> None:
    if not ext.ca:
        raise ValueError("basicConstraints cA is not set on an issuing certificate")


def _cert_sign_if_present(_policy: v.Policy, _cert: x509.Certificate,
                          ext: x509.KeyUsage | None) -> None:
    if ext is not None and not ext.key_cert_sign:
        raise ValueError("keyUsage lacks keyCertSign on an issuing certificate")


def _ca_policy() -> v.ExtensionPolicy:
    return (
        v.ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, v.Criticality.AGNOSTIC, _require_ca)
        .may_be_present(x509.KeyUsage, v.Criticality.AGNOSTIC, _cert_sign_if_present)
    )


def verify_ek_chain(
    ek_cert: x509.Certificate,
    trust: TrustStore,
    extra_intermediates: Iterable[x509.Certificate] = (),
    now: datetime.datetime | None = None,
) -> ChainVerdict:
    if not trust.anchors:
        return ChainVerdict(False, "no trusted TPM vendor root configured ([trust] ek_roots)")
    when = now or datetime.datetime.now(datetime.UTC)
    builder = (
        v.PolicyBuilder()
        .store(v.Store(list(trust.anchors)))
        .time(when)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=_ca_policy(), ee_policy=v.ExtensionPolicy.permit_all())
    )
    pool = [*extra_intermediates, *trust.intermediates]
    try:
        verified = builder.build_client_verifier().verify(ek_cert, pool)
    except v.VerificationError as e:
        return ChainVerdict(
            False,
            f"issued by {ek_cert.issuer.rfc4514_string()!r}, which does not chain to a trusted "
            f"TPM vendor root ({plain_verification_error(e)})"
            + ("; the certificates' dates do not cover this gateway's clock: check the clock "
               "first" if is_validity_error(e) else ""),
            dated=is_validity_error(e),
        )
    return ChainVerdict(True, "chains to a trusted TPM vendor root",
                        tuple(c.subject.rfc4514_string() for c in verified.chain))


@dataclass(frozen=True)
class TpmIdentityClaims:
    """What the EK certificate's SAN says about the TPM (TCG EK Credential Profile)."""

    manufacturer: str | None
    model: str | None
    version: str | None


def tpm_claims(ek_cert: x509.Certificate) -> TpmIdentityClaims:
    try:
        san = ek_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return TpmIdentityClaims(None, None, None)
    values: dict[x509.ObjectIdentifier, str] = {}
    for name in san.get_values_for_type(x509.DirectoryName):
        for attr in name:
            if isinstance(attr.value, str):
                values[attr.oid] = attr.value
    return TpmIdentityClaims(
        values.get(TPM_MANUFACTURER_OID), values.get(TPM_MODEL_OID), values.get(TPM_VERSION_OID)
    )
