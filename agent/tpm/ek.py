"""Endorsement keys and their certificates, as the TCG EK Credential Profile lays them out.

The EK certificate sits in NV at a per-key-type index; the EK itself is not
stored but re-derived from the endorsement seed with the TCG default template
(or a template the vendor stored next to the certificate). The recreated
public key must equal the certificate's, or the certificate is not this TPM's.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from tpm2_pytss.internal.templates import ek_template
from tpm2_pytss.types import TPM2B_PUBLIC

from agent.errors import EkMismatch
from agent.pki.certinfo import spki_der

# ECC first: on real TPMs an RSA primary takes seconds, an ECC one milliseconds.
EK_PREFERENCE = (
    "EK-ECC256", "EK-HIGH-ECC256", "EK-HIGH-ECC384", "EK-HIGH-ECC521",
    "EK-RSA2048", "EK-HIGH-RSA2048", "EK-HIGH-RSA3072", "EK-HIGH-RSA4096",
)
EK_CHAIN_FIRST = 0x01C00100
EK_CHAIN_LAST = 0x01C001FF


def cert_index(kind: str) -> int:
    return int(ek_template.lookup(kind).cert_index)


@dataclass(frozen=True)
class EndorsementKey:
    kind: str  # e.g. "EK-HIGH-ECC384"
    nv_index: int
    certificate: x509.Certificate
    template: TPM2B_PUBLIC
    public: TPM2B_PUBLIC  # as recreated by this TPM

    def public_der(self) -> bytes:
        return self.public.to_der()


def public_matches_certificate(public: TPM2B_PUBLIC, cert: x509.Certificate) -> bool:
    """Pure comparison of a TPM public area's key with a certificate's key.

    A public area that is not a valid key (e.g. an EC point off the curve) matches nothing.
    """
    try:
        ours = public.to_der()
    except (ValueError, TypeError):
        return False
    return bool(ours == spki_der(cert))


def check_ek(kind: str, public: TPM2B_PUBLIC, cert: x509.Certificate) -> None:
    if not public_matches_certificate(public, cert):
        raise EkMismatch(
            f"{kind}: the EK recreated by this TPM does not match the EK certificate in NV "
            f"(certificate subject {cert.subject.rfc4514_string()!r}, "
            f"issuer {cert.issuer.rfc4514_string()!r})"
        )

