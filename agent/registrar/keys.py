"""Where the issuing CA's key lives: a file, or a PKCS#11 token (an HSM; SoftHSM2 in tests).

Everything the CA signs (device and server certificates, CRLs, the issuing CA's
own CSR) goes through `sign_certificate`, `sign_crl` or `issuing_csr`. A file key
signs through cryptography directly. A token key cannot be handed to
cryptography's builders, so the builder signs once with a throwaway key of the
same algorithm to produce the to-be-signed bytes (whose signature algorithm,
ecdsa-with-SHA256, is the same), the token signs those, and the result is
assembled as X.509 says: SEQUENCE { tbs, signatureAlgorithm, signature BIT STRING }.

The PIN is read from a file named in registrar.toml, held in memory only, and
never logged or shown.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.errors import ConfigError, StateError
from agent.pki.der import tlv

SEQUENCE, BIT_STRING = 0x30, 0x03
# AlgorithmIdentifier { ecdsa-with-SHA256 } (RFC 5758: parameters absent)
ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
MAX_PIN_BYTES = 256


class IssuingKey(Protocol):
    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign(self, data: bytes) -> bytes:
        """ECDSA-SHA256 over `data`, DER."""
        ...

    def describe(self) -> str: ...


class FileKey:
    """The key in DIR/ca/issuing.key (0600)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self.private = key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private.public_key()

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data, ec.ECDSA(hashes.SHA256()))

    def describe(self) -> str:
        return "file ca/issuing.key"


def read_secret_file(path: Path, what: str) -> str:
    """A PIN or password kept in a file of its own: its first line, stripped. The value
    is never put in a message."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what}: {path}: cannot read it: {e.strerror}",
                          "the file holds a secret, readable by the registrar user only "
                          "(0600)") from None
    secret = raw.decode("utf-8", "replace").strip()
    if not secret or len(raw) > MAX_PIN_BYTES or "\n" in secret:
        raise ConfigError(f"{what}: {path}: expected one line of at most {MAX_PIN_BYTES} "
                          "bytes")
    return secret


def read_pin(path: Path) -> str:
    return read_secret_file(path, "[ca_key] pin_file")


class Pkcs11Key:
    """A P-256 private key in a PKCS#11 token, found by token and key label; it never
    leaves the token (made sensitive and not extractable by `generate`)."""

    def __init__(self, module: Path, token_label: str, key_label: str, pin: str) -> None:
        import pkcs11  # a compiled binding: imported only by registrars that use a token

        self._pkcs11 = pkcs11
        self.module, self.token_label, self.key_label = module, token_label, key_label
        self._lock = threading.Lock()  # one session, used by one thread at a time
        self._session = self._open(pin)
        try:
            self._private = self._session.get_key(
                object_class=pkcs11.ObjectClass.PRIVATE_KEY, key_type=pkcs11.KeyType.EC,
                label=key_label)
            public = self._session.get_key(
                object_class=pkcs11.ObjectClass.PUBLIC_KEY, key_type=pkcs11.KeyType.EC,
                label=key_label)
        except (pkcs11.NoSuchKey, pkcs11.MultipleObjectsReturned) as e:
            self.close()
            what = "no" if isinstance(e, pkcs11.NoSuchKey) else "more than one"
            raise StateError(f"PKCS#11 token {token_label!r}: {what} EC key pair labelled "
                             f"{key_label!r}",
                             "check [ca_key] key_label; `pkcs11-tool --module MODULE "
                             "--list-objects --login` lists what the token holds") from None
        self._public = _ec_point_key(public[pkcs11.Attribute.EC_POINT])

    def _open(self, pin: str) -> Any:
        pkcs11 = self._pkcs11
        try:
            lib = pkcs11.lib(str(self.module))
        except (RuntimeError, OSError, pkcs11.PKCS11Error) as e:
            raise ConfigError(f"[ca_key] module: cannot load {self.module}: {e}") from None
        try:
            token = lib.get_token(token_label=self.token_label)
        except pkcs11.NoSuchToken:
            labels = sorted(s.get_token().label for s in lib.get_slots(token_present=True))
            raise ConfigError(f"[ca_key] token_label: no token {self.token_label!r} in "
                              f"{self.module}", f"tokens present: {', '.join(labels) or 'none'}"
                              ) from None
        try:
            return token.open(rw=True, user_pin=pin)
        except pkcs11.PinIncorrect:
            raise ConfigError(f"[ca_key] pin_file: the token {self.token_label!r} refused the "
                              "PIN", "check the PIN file (the token may lock after several "
                                     "wrong PINs)") from None
        except pkcs11.PKCS11Error as e:
            raise StateError(f"PKCS#11 token {self.token_label!r}: cannot open a session: "
                             f"{type(e).__name__}") from None

    @classmethod
    def generate(cls, module: Path, token_label: str, key_label: str,
                 pin: str) -> Pkcs11Key:
        """Make a P-256 key pair in the token: sensitive, not extractable, sign only."""
        import pkcs11
        from pkcs11.util.ec import encode_named_curve_parameters

        probe = cls.__new__(cls)
        probe._pkcs11, probe.module, probe.token_label = pkcs11, module, token_label
        session = probe._open(pin)
        try:
            existing = list(session.get_objects({pkcs11.Attribute.LABEL: key_label}))
            if existing:
                raise ConfigError(f"PKCS#11 token {token_label!r} already holds objects "
                                  f"labelled {key_label!r}; not making another key",
                                  "choose another key label, or delete those objects")
            params = session.create_domain_parameters(
                pkcs11.KeyType.EC,
                {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True)
            A = pkcs11.Attribute
            params.generate_keypair(
                store=True, label=key_label,
                public_template={A.VERIFY: True, A.TOKEN: True},
                private_template={A.SIGN: True, A.SENSITIVE: True, A.EXTRACTABLE: False,
                                  A.TOKEN: True, A.PRIVATE: True})
        finally:
            session.close()
        return cls(module, token_label, key_label, pin)

    @property
    def extractable(self) -> bool:
        A = self._pkcs11.Attribute
        with self._lock:
            return bool(self._private[A.EXTRACTABLE]) or not bool(self._private[A.SENSITIVE])

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        digest = hashlib.sha256(data).digest()
        with self._lock:
            try:
                raw = self._private.sign(digest, mechanism=self._pkcs11.Mechanism.ECDSA)
            except self._pkcs11.PKCS11Error as e:
                raise StateError(f"PKCS#11 token {self.token_label!r}: signing failed: "
                                 f"{type(e).__name__}", "is the token still present and "
                                                         "logged in?") from None
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                    int.from_bytes(raw[half:], "big"))

    def describe(self) -> str:
        return f"PKCS#11 token {self.token_label!r}, key {self.key_label!r}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._session.close()


def _ec_point_key(ec_point: bytes) -> ec.EllipticCurvePublicKey:
    """CKA_EC_POINT is the uncompressed point, DER OCTET STRING wrapped (most tokens)."""
    point = ec_point
    if point[:1] == b"\x04" and len(point) >= 2 and point[1] == len(point) - 2:
        point = point[2:]
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise StateError("the token's public key is not a P-256 point") from None


# --- signing with any IssuingKey ------------------------------------------------------

_THROWAWAY = ec.generate_private_key(ec.SECP256R1())


def _assemble(tbs: bytes, signature: bytes) -> bytes:
    return tlv(SEQUENCE, tbs + ECDSA_WITH_SHA256 + tlv(BIT_STRING, b"\x00" + signature))


def sign_certificate(builder: x509.CertificateBuilder, key: IssuingKey) -> x509.Certificate:
    if isinstance(key, FileKey):
        return builder.sign(key.private, hashes.SHA256())
    tbs = builder.sign(_THROWAWAY, hashes.SHA256()).tbs_certificate_bytes
    cert = x509.load_der_x509_certificate(_assemble(tbs, key.sign(tbs)))
    _check(key, cert.signature, cert.tbs_certificate_bytes)
    return cert


def sign_crl(builder: x509.CertificateRevocationListBuilder,
             key: IssuingKey) -> x509.CertificateRevocationList:
    if isinstance(key, FileKey):
        return builder.sign(key.private, hashes.SHA256())
    tbs = builder.sign(_THROWAWAY, hashes.SHA256()).tbs_certlist_bytes
    crl = x509.load_der_x509_crl(_assemble(tbs, key.sign(tbs)))
    _check(key, crl.signature, crl.tbs_certlist_bytes)
    return crl


def issuing_csr(subject: x509.Name, key: IssuingKey) -> x509.CertificateSigningRequest:
    """The issuing CA's PKCS#10 request for an offline root (RFC 2986), built here for any
    key: cryptography's builder puts the signing key's own public key in the request,
    which for a token key it cannot hold. No attributes; the root decides the rest."""
    info = tlv(SEQUENCE, bytes.fromhex("020100") + subject.public_bytes() + public_der(key)
               + b"\xa0\x00")
    csr = x509.load_der_x509_csr(_assemble(info, key.sign(info)))
    if not csr.is_signature_valid:
        raise StateError(f"{key.describe()}: the request's signature does not verify")
    return csr


def _check(key: IssuingKey, signature: bytes, tbs: bytes) -> None:
    """What the token signed verifies with its public key (a wrong key label that finds
    another key is caught here, not by relying parties)."""
    try:
        key.public_key().verify(signature, tbs, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise StateError(f"{key.describe()}: its signature does not verify with its public "
                         "key") from None


def public_der(key: IssuingKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
