"""The TLS key: a fresh software P-256 key per rotation, sealed to the TPM at rest.

Python's ssl module cannot delegate signing to the TPM, so TLS runs on this
key instead of the identity key. It exists in clear only in process memory:
on disk it is a TPM-sealed object (PCR policy) holding the 32-byte private
scalar, which only this TPM, in the same platform state, will unseal.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import StateError
from agent.secret import SecretBytes

CURVE = ec.SECP256R1()
SCALAR_BYTES = 32


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def tls_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PKCS#10 request (DER); empty subject: the registrar names the device itself."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def key_to_secret(key: ec.EllipticCurvePrivateKey) -> SecretBytes:
    """The private scalar: the smallest form to seal (a TPM sealed object holds 128 bytes)."""
    return SecretBytes(key.private_numbers().private_value.to_bytes(SCALAR_BYTES, "big"))


def key_from_secret(secret: SecretBytes) -> ec.EllipticCurvePrivateKey:
    raw = secret.reveal()
    if len(raw) != SCALAR_BYTES:
        raise StateError(f"the unsealed TLS key is {len(raw)} bytes, expected {SCALAR_BYTES}")
    try:
        return ec.derive_private_key(int.from_bytes(raw, "big"), CURVE)
    except ValueError:
        raise StateError("the unsealed TLS key is not a valid P-256 scalar") from None


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
