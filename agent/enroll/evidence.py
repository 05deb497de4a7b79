"""Checks of TPM evidence, as the registrar performs them. Pure: no TPM, no I/O.

Each function takes bytes a client sent, decodes them strictly and either
returns the decoded value or raises a Problem of the right type. The order of
checks in the registrar is in docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPMS_ATTEST, TPMT_PUBLIC, TPMT_SIGNATURE

from agent.codec import unmarshal_exact
from agent.enroll.messages import Platform
from agent.enroll.problems import problem
from agent.errors import Problem
from agent.tpm.ek import public_matches_certificate
from agent.tpm.templates import RESIDENT, pcr_selection

_CURVES = {TPM2_ECC.NIST_P256: "P-256", TPM2_ECC.NIST_P384: "P-384"}
_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    TPM2_ALG.SHA256: hashes.SHA256, TPM2_ALG.SHA384: hashes.SHA384,
}
PROOF_LABEL = b"devid-enroll-v1 activation proof\x00"


def _malformed(message: str) -> Problem:
    return problem("malformed-request", message)


def parse_public(data: bytes, field: str) -> TPMT_PUBLIC:
    return unmarshal_exact(TPM2B_PUBLIC, data, field, _malformed).publicArea


def tpm_name(public: TPMT_PUBLIC) -> bytes:
    """nameAlg || H(public area): what the TPM calls this object."""
    return bytes(public.get_name())


def public_key(public: TPMT_PUBLIC, field: str) -> ec.EllipticCurvePublicKey:
    if public.type != TPM2_ALG.ECC or public.parameters.eccDetail.curveID not in _CURVES:
        raise problem("malformed-request", f"{field}: expected an ECC P-256 or P-384 key")
    try:
        key = load_der_public_key(TPM2B_PUBLIC(publicArea=public).to_der())
    except (ValueError, TypeError):
        raise problem("malformed-request", f"{field}: the ECC point is not on the curve") from None
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _missing(attrs: int, required: TPMA_OBJECT) -> list[str]:
    names = {TPMA_OBJECT.FIXEDTPM: "fixedTPM", TPMA_OBJECT.FIXEDPARENT: "fixedParent",
             TPMA_OBJECT.SENSITIVEDATAORIGIN: "sensitiveDataOrigin",
             TPMA_OBJECT.RESTRICTED: "restricted", TPMA_OBJECT.SIGN_ENCRYPT: "sign",
             TPMA_OBJECT.DECRYPT: "decrypt"}
    return [n for bit, n in names.items() if required & bit and not attrs & bit]


def check_ek_public(data: bytes, certificate: x509.Certificate) -> TPMT_PUBLIC:
    public = parse_public(data, "ek_public")
    attrs = int(public.objectAttributes)
    missing = _missing(attrs, RESIDENT | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT)
    if missing:
        raise problem("ek-mismatch", f"ek_public is not an endorsement key: lacks "
                                     f"{', '.join(missing)}")
    if not public_matches_certificate(TPM2B_PUBLIC(publicArea=public), certificate):
        raise problem("ek-mismatch", "ek_public's key differs from the EK certificate's key")
    return public


def check_ak_public(data: bytes) -> tuple[TPMT_PUBLIC, ec.EllipticCurvePublicKey]:
    public = parse_public(data, "ak_public")
    attrs = int(public.objectAttributes)
    missing = _missing(attrs, RESIDENT | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT)
    if missing:
        raise problem("ak-invalid", f"ak_public lacks {', '.join(missing)}")
    if attrs & TPMA_OBJECT.DECRYPT:
        raise problem("ak-invalid", "ak_public is also a decryption key; an AK must only sign")
    if public.type != TPM2_ALG.ECC:
        raise problem("ak-invalid", "ak_public must be an ECC key")
    return public, public_key(public, "ak_public")


def check_identity_public(data: bytes) -> tuple[TPMT_PUBLIC, ec.EllipticCurvePublicKey]:
    public = parse_public(data, "identity_public")
    attrs = int(public.objectAttributes)
    missing = _missing(attrs, RESIDENT | TPMA_OBJECT.SIGN_ENCRYPT)
    if missing:
        raise problem("identity-key-invalid", f"identity_public lacks {', '.join(missing)}")
    if attrs & (TPMA_OBJECT.DECRYPT | TPMA_OBJECT.RESTRICTED):
        raise problem("identity-key-invalid",
                      "identity_public must be an unrestricted signing-only key")
    return public, public_key(public, "identity_public")


def activation_proof(secret: bytes, challenge_id: str, nonce: bytes) -> bytes:
    """What the agent sends to show it activated the credential, without revealing it."""
    return hmac.new(secret, PROOF_LABEL + challenge_id.encode() + b"\x00" + nonce,
                    hashlib.sha256).digest()


def check_proof(proof: bytes, secret: bytes, challenge_id: str, nonce: bytes) -> None:
    if not hmac.compare_digest(proof, activation_proof(secret, challenge_id, nonce)):
        raise problem("activation-failed",
                      "proof does not match the credential's secret: the AK was not activated "
                      "by the TPM that holds the presented EK")


def verify_signed(evidence_field: str, attest: bytes, signature: bytes,
                  ak_key: ec.EllipticCurvePublicKey) -> TPMS_ATTEST:
    """Decode a TPMS_ATTEST and check the AK's signature over exactly those bytes."""
    sig = unmarshal_exact(TPMT_SIGNATURE, signature, f"{evidence_field}.signature",
                          _malformed)
    if sig.sigAlg != TPM2_ALG.ECDSA or int(sig.signature.ecdsa.hash) not in _HASHES:
        raise problem("signature-invalid",
                      f"{evidence_field}.signature: expected ECDSA with SHA-256 or SHA-384")
    der = encode_dss_signature(int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big"),
                               int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big"))
    algorithm = _HASHES[int(sig.signature.ecdsa.hash)]()
    try:
        ak_key.verify(der, attest, ec.ECDSA(algorithm))
    except InvalidSignature:
        raise problem("signature-invalid",
                      f"{evidence_field}: signature does not verify with the enrolling AK "
                      "(signed by another key or altered)") from None
    decoded = unmarshal_exact(TPMS_ATTEST, attest, f"{evidence_field}.attest",
                              _malformed)
    if decoded.magic != TPM2_GENERATED.VALUE:
        raise problem("evidence-invalid", f"{evidence_field}: not generated by a TPM "
                                          "(magic is not TPM_GENERATED_VALUE)")
    return decoded


def _check_nonce(evidence_field: str, attest: TPMS_ATTEST, nonce: bytes) -> None:
    if not hmac.compare_digest(bytes(attest.extraData), nonce):
        raise problem("nonce-mismatch",
                      f"{evidence_field}: qualifying data is not this challenge's nonce")


def pcr_digest(values: Sequence[bytes]) -> bytes:
    """What a TPM2_Quote signs of the PCRs (sha256 bank): H(value || value || ...)."""
    return hashlib.sha256(b"".join(values)).digest()


def quoted_pcr_digest(attest: bytes) -> bytes:
    """The PCR digest inside a marshalled quote (the agent's own, just made)."""
    decoded, _ = TPMS_ATTEST.unmarshal(attest)
    return bytes(decoded.attested.quote.pcrDigest)


def check_quote(attest: TPMS_ATTEST, nonce: bytes, pcrs: Sequence[int],
                values: Sequence[bytes]) -> None:
    """The quote covers exactly `pcrs` (sha256), for this nonce, and `values` are what it quoted."""
    if attest.type != TPM2_ST.ATTEST_QUOTE:
        raise problem("evidence-invalid", "quote: the attestation is not a TPM2_Quote")
    _check_nonce("quote", attest, nonce)
    info = attest.attested.quote
    if bytes(info.pcrSelect.marshal()) != bytes(pcr_selection(pcrs).marshal()):
        raise problem("evidence-invalid",
                      f"quote: does not cover exactly sha256 PCRs {sorted(pcrs)}")
    if len(values) != len(pcrs) or any(len(v) != 32 for v in values):
        raise problem("malformed-request",
                      f"pcr_values: expected {len(pcrs)} sha256 values (32 bytes each)")
    if not hmac.compare_digest(bytes(info.pcrDigest), pcr_digest(values)):
        raise problem("evidence-invalid",
                      "pcr_values: do not match the digest the TPM quoted")


def check_certify(attest: TPMS_ATTEST, nonce: bytes, identity: TPMT_PUBLIC) -> None:
    """The AK certified exactly this identity public area, for this nonce."""
    if attest.type != TPM2_ST.ATTEST_CERTIFY:
        raise problem("evidence-invalid", "certify: the attestation is not a TPM2_Certify")
    _check_nonce("certify", attest, nonce)
    if bytes(attest.attested.certify.name) != tpm_name(identity):
        raise problem("identity-key-invalid",
                      "certify: the TPM certified a different key than identity_public")


def check_csr(data: bytes,
              identity_key: ec.EllipticCurvePublicKey) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_der_x509_csr(data)
    except ValueError:
        raise problem("csr-invalid", "csr: not a DER PKCS#10 certificate request") from None
    try:
        key = csr.public_key()
    except (ValueError, TypeError):
        raise problem("csr-invalid", "csr: unsupported public key") from None
    if key != identity_key:
        raise problem("csr-key-mismatch",
                      "csr: its public key is not the identity key the TPM certified")
    if not csr.is_signature_valid:
        raise problem("csr-invalid", "csr: signature does not verify with its own key")
    return csr


def check_tls_csr(data: bytes) -> ec.EllipticCurvePublicKey:
    """The CSR for the agent's software TLS key: P-256 or P-384, self-signed correctly."""
    try:
        csr = x509.load_der_x509_csr(data)
        key = csr.public_key()
    except (ValueError, TypeError):
        raise problem("csr-invalid", "tls_csr: not a DER PKCS#10 request with a supported "
                                     "key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or \
            key.curve.name not in ("secp256r1", "secp384r1"):
        raise problem("csr-invalid", "tls_csr: expected an ECC P-256 or P-384 key")
    if not csr.is_signature_valid:
        raise problem("csr-invalid", "tls_csr: signature does not verify with its own key")
    return key


# --- requests signed by the identity key (renewal, decommissioning) -------------------

REQUEST_LABEL = b"devid-device-request-v1"


def device_request_message(purpose: str, device_id: str, challenge_id: str, nonce: bytes,
                           *parts: bytes) -> bytes:
    """The bytes the identity key signs for a device request.

    Every field is length-prefixed, so no two different requests share a
    signing input; the registrar's nonce makes each signature single-use and the
    purpose keeps a renewal signature from serving as a decommissioning one.
    """
    out = bytearray()
    for field in (REQUEST_LABEL, purpose.encode(), device_id.encode(), challenge_id.encode(),
                  nonce, *parts):
        out += len(field).to_bytes(4, "big") + field
    return bytes(out)


def renewal_message(device_id: str, challenge_id: str, nonce: bytes, attest: bytes,
                    tls_csr: bytes, platform: Platform | None) -> bytes:
    """What the identity key signs for a renewal: the quote, the TLS CSR and, when the
    device sends it, its platform (so that a renewal's firmware version is its own)."""
    extra = [platform.signed_bytes()] if platform is not None else []
    return device_request_message("renew", device_id, challenge_id, nonce, attest, tls_csr,
                                  *extra)


def check_request_signature(signature: bytes, message: bytes,
                            identity_key: ec.EllipticCurvePublicKey) -> None:
    """An ECDSA-SHA256 signature (DER) by the device's certified identity key."""
    try:
        identity_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise problem("request-signature-invalid",
                      "signature: does not verify with the identity key certified at "
                      "enrollment") from None
