"""The registrar's certificate authority: keys, certificates and the device profile.

Layout under DIR/ca (keys 0600, written atomically):
  root.pem/root.key        self-signed root, ECDSA P-256; clients pin root.pem
  issuing.pem/issuing.key  issues device certificates
  server.pem/server.key    the HTTPS server certificate (chain: server, issuing)

Device certificates follow IEEE 802.1AR's LDevID shape: the subject carries
the device's serialNumber, the SAN a `urn:devid:<hex>` URI, both derived from
the EK by the registrar, never taken from the CSR. The SAN also names the TPM
(RFC 4108 hardwareModuleName: TCG's TPM 2.0 OID and the EK certificate's
serial number) and, when the device stated them, its make, model, serial and
firmware version as a directoryName of TCG platform attributes (the way EK
certificates name their TPM), which the registrar records as device-asserted.
Every device certificate points to the CRL (CRL Distribution Points) and to
the issuing CA's certificate (Authority Information Access, caIssuers).
docs/protocol.md, "Certificate profile", is the reference.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.enroll.messages import Platform
from agent.errors import ConfigError, DevidError, StateError
from agent.fsutil import ensure_private_dir, write_atomic
from agent.pki.der import hardware_module_name
from agent.registrar.config import Publication, is_ip
from agent.registrar.keys import FileKey, IssuingKey, issuing_csr, sign_certificate, sign_crl

ROOT_LIFETIME = datetime.timedelta(days=20 * 365)
ISSUING_LIFETIME = datetime.timedelta(days=5 * 365)
SERVER_LIFETIME = datetime.timedelta(days=365)
SERVER_RENEW_BEFORE = datetime.timedelta(days=30)
# notBefore is backdated to tolerate relying parties whose clocks lag a little: by 5
# minutes, but never more than a tenth of the lifetime, so that the agent's renewal
# schedule (a fraction of notAfter - notBefore) stays close to the issuing time.
BACKDATE = datetime.timedelta(minutes=5)
DEVICE_KINDS = ("identity", "tls")
# RFC 4108 id-on-hardwareModuleName; its hwType for a TPM 2.0 is TCG's tcg-sv-tpm20.
HARDWARE_MODULE_NAME = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.4")
TPM20_HW_TYPE = "2.23.133.1.2"
# TCG Platform Certificate Profile attributes (tcg-at-platform*), as the SAN's directoryName.
PLATFORM_ATTRIBUTES = (
    ("manufacturer", x509.ObjectIdentifier("2.23.133.5.1.1")),  # platformManufacturerStr
    ("model", x509.ObjectIdentifier("2.23.133.5.1.4")),  # platformModel
    ("version", x509.ObjectIdentifier("2.23.133.5.1.5")),  # platformVersion (firmware)
    ("serial", x509.ObjectIdentifier("2.23.133.5.1.6")),  # platformSerial
)


@dataclass(frozen=True)
class DeviceProfile:
    """What a device certificate says beyond the device ID."""

    hw_serial: bytes  # the EK certificate's serial number, as its DER integer's bytes
    platform: Platform | None = None  # device-asserted


def ek_hw_serial(ek_certificate: x509.Certificate) -> bytes:
    n = ek_certificate.serial_number
    return n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True)


def platform_name(platform: Platform) -> x509.DirectoryName | None:
    attributes = [x509.NameAttribute(oid, value)  # UTF8String, the default for these
                  for field, oid in PLATFORM_ATTRIBUTES
                  if (value := getattr(platform, field)) is not None]
    return x509.DirectoryName(x509.Name([x509.RelativeDistinguishedName([a])
                                         for a in attributes])) if attributes else None


def backdate(lifetime: datetime.timedelta) -> datetime.timedelta:
    return min(BACKDATE, lifetime / 10)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devid-registrar"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


ISSUING_NAME = _name("devid-registrar issuing CA")
ISSUING_HINT = ("have the root sign ca/issuing.csr as a CA: basicConstraints cA (pathLen 0), "
                "keyUsage keyCertSign and cRLSign; then pass that certificate and the root's")


def load_file_key(path: Path) -> FileKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StateError(f"{path}: not an EC private key")
    return FileKey(key)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _serial() -> int:
    return x509.random_serial_number()


def _ca_cert(subject: x509.Name, public: ec.EllipticCurvePublicKey, issuer: x509.Name,
             issuer_key: IssuingKey, now: datetime.datetime,
             lifetime: datetime.timedelta, path_length: int) -> x509.Certificate:
    return sign_certificate(
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer).public_key(public)
        .serial_number(_serial())
        .not_valid_before(now - BACKDATE).not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False), issuer_key)


def _leaf(builder: x509.CertificateBuilder, issuer: x509.Certificate,
          issuer_key: IssuingKey, public: ec.EllipticCurvePublicKey,
          eku: Sequence[x509.ObjectIdentifier]) -> x509.Certificate:
    return sign_certificate(
        builder.issuer_name(issuer.subject).public_key(public).serial_number(_serial())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False), issuer_key)


@dataclass(frozen=True)
class CertificateAuthority:
    directory: Path  # DIR/ca
    root: x509.Certificate
    issuing: x509.Certificate
    issuing_key: IssuingKey

    @property
    def root_path(self) -> Path:
        return self.directory / "root.pem"

    @property
    def server_cert_path(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.directory / "server.key"

    # --- creation and loading --------------------------------------------------

    @classmethod
    def create(cls, directory: Path, now: datetime.datetime,
               issuing_key: IssuingKey | None = None) -> CertificateAuthority:
        """A root (its key in DIR/ca/root.key) and the issuing CA under it; the issuing key
        is `issuing_key` (a token's) or a new one in DIR/ca/issuing.key."""
        if (directory / "root.key").exists() or (directory / "issuing.pem").exists():
            raise ConfigError(f"{directory}: a CA already exists here; not overwriting it")
        ensure_private_dir(directory)
        root_key = FileKey(ec.generate_private_key(ec.SECP256R1()))
        root_name = _name("devid-registrar root CA")
        root = _ca_cert(root_name, root_key.public_key(), root_name, root_key, now,
                        ROOT_LIFETIME, 1)
        key = issuing_key or cls._new_file_key(directory)
        issuing = _ca_cert(ISSUING_NAME, key.public_key(), root_name, root_key, now,
                           ISSUING_LIFETIME, 0)
        write_atomic(directory / "root.key", _pem_key(root_key.private))
        write_atomic(directory / "root.pem", _pem(root), mode=0o644)
        write_atomic(directory / "issuing.pem", _pem(issuing), mode=0o644)
        return cls(directory, root, issuing, key)

    @staticmethod
    def _new_file_key(directory: Path) -> FileKey:
        key = FileKey(ec.generate_private_key(ec.SECP256R1()))
        write_atomic(directory / "issuing.key", _pem_key(key.private))
        return key

    @classmethod
    def request_issuing(cls, directory: Path,
                        issuing_key: IssuingKey | None = None) -> x509.CertificateSigningRequest:
        """For a root kept elsewhere (`init --offline-root`): the issuing key (a token's or a
        new file key) and its request in DIR/ca/issuing.csr; no root key on this host.
        `import_issuing` completes it."""
        if (directory / "issuing.pem").exists() or (directory / "issuing.csr").exists():
            raise ConfigError(f"{directory}: a CA already exists here; not overwriting it")
        ensure_private_dir(directory)
        key = issuing_key or cls._new_file_key(directory)
        csr = issuing_csr(ISSUING_NAME, key)
        write_atomic(directory / "issuing.csr", csr.public_bytes(serialization.Encoding.PEM),
                     mode=0o644)
        return csr

    @classmethod
    def import_issuing(cls, directory: Path, certificate_pem: bytes, root_pem: bytes,
                       key: IssuingKey, now: datetime.datetime) -> CertificateAuthority:
        """Take the issuing CA's certificate signed by the offline root, after checking that
        it certifies our key as a CA that may issue, and chains to that root."""
        try:
            issuing = x509.load_pem_x509_certificates(certificate_pem)[0]
            root = x509.load_pem_x509_certificates(root_pem)[0]
        except (ValueError, IndexError):
            raise DevidError("expected PEM certificates: the issuing CA's, then the "
                              "root's", ISSUING_HINT) from None
        if issuing.public_key() != key.public_key():
            raise DevidError("the certificate is not for this registrar's issuing key "
                              f"({key.describe()}); was it made from ca/issuing.csr?", ISSUING_HINT)
        try:
            constraints = issuing.extensions.get_extension_for_class(x509.BasicConstraints)
            usage = issuing.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound as e:
            raise DevidError(f"the issuing CA certificate lacks {e.oid._name}",
                             ISSUING_HINT) from None
        if not constraints.value.ca or not usage.key_cert_sign or not usage.crl_sign:
            raise DevidError("the issuing CA certificate must be a CA (basicConstraints "
                              "cA) with keyCertSign and cRLSign", ISSUING_HINT)
        try:
            issuing.verify_directly_issued_by(root)
            root.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            raise DevidError("the issuing CA certificate is not signed by that root, or "
                              "the root is not self-signed", ISSUING_HINT) from None
        if not issuing.not_valid_before_utc <= now < issuing.not_valid_after_utc:
            raise DevidError("the issuing CA certificate is not valid now "
                              f"({issuing.not_valid_before_utc} to "
                              f"{issuing.not_valid_after_utc})", ISSUING_HINT)
        write_atomic(directory / "root.pem", _pem(root), mode=0o644)
        write_atomic(directory / "issuing.pem", _pem(issuing), mode=0o644)
        (directory / "issuing.csr").unlink(missing_ok=True)
        return cls(directory, root, issuing, key)

    @classmethod
    def load(cls, directory: Path, issuing_key: IssuingKey | None = None) -> CertificateAuthority:
        """The CA in `directory`; its issuing key from DIR/ca/issuing.key unless given (a
        token's), checked against the issuing certificate."""
        if not (directory / "issuing.pem").exists() and (directory / "issuing.csr").exists():
            raise StateError(f"{directory}: the issuing CA's certificate is not imported yet",
                             "have the offline root sign ca/issuing.csr, then run "
                             "`devid-registrar ca import`")
        try:
            root = x509.load_pem_x509_certificate((directory / "root.pem").read_bytes())
            issuing = x509.load_pem_x509_certificate((directory / "issuing.pem").read_bytes())
            key = issuing_key or load_file_key(directory / "issuing.key")
        except FileNotFoundError as e:
            raise StateError(f"{e.filename}: missing; run `devid-registrar init` first") from None
        except (OSError, ValueError) as e:
            raise StateError(f"{directory}: cannot load the CA: {e}") from None
        if key.public_key() != issuing.public_key():
            raise StateError(f"{directory}: the issuing key ({key.describe()}) does not belong "
                             "to issuing.pem")
        return cls(directory, root, issuing, key)

    # --- certificates ----------------------------------------------------------

    def ensure_server_certificate(self, names: Sequence[str], now: datetime.datetime) -> bool:
        """(Re)issue the TLS server certificate if missing, expiring or for other names."""
        wanted = sorted(names)
        try:
            current = x509.load_pem_x509_certificates(self.server_cert_path.read_bytes())[0]
            san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = sorted([*san.get_values_for_type(x509.DNSName),
                           *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))])
            fresh = current.not_valid_after_utc - now > SERVER_RENEW_BEFORE
            if have == wanted and fresh and self.server_key_path.exists() and \
                    current.issuer == self.issuing.subject:
                return False
        except (OSError, ValueError, IndexError, x509.ExtensionNotFound):
            pass
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(n)) if is_ip(n) else x509.DNSName(n)
            for n in names]
        builder = (x509.CertificateBuilder().subject_name(_name(names[0]))
                   .not_valid_before(now - BACKDATE).not_valid_after(now + SERVER_LIFETIME)
                   .add_extension(x509.SubjectAlternativeName(alt), critical=False))
        cert = _leaf(builder, self.issuing, self.issuing_key, key.public_key(),
                     [ExtendedKeyUsageOID.SERVER_AUTH])
        write_atomic(self.server_key_path, _pem_key(key))
        write_atomic(self.server_cert_path, _pem(cert, self.issuing), mode=0o644)
        return True

    def issue_device(self, device_id: str, public_key: ec.EllipticCurvePublicKey,
                     lifetime: datetime.timedelta, now: datetime.datetime,
                     kind: str, profile: DeviceProfile,
                     publication: Publication) -> x509.Certificate:
        """An LDevID-style certificate; subject and SAN come from `device_id` only.

        `identity` certifies the TPM identity key; `tls` the short-lived TLS key the
        agent makes at every rotation. Both name the same device, so a relying party
        authorizes either the same way; the CN tells them apart for people.
        """
        assert kind in DEVICE_KINDS
        serial_hex = device_id.rsplit(":", 1)[-1]
        not_after = min(now + lifetime, self.issuing.not_valid_after_utc)
        label = "devid" if kind == "identity" else "devid-tls"
        subject = x509.Name([
            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_hex),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{label} {serial_hex[:16]}"),
        ])
        names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(device_id),
            x509.OtherName(HARDWARE_MODULE_NAME,
                           hardware_module_name(TPM20_HW_TYPE, profile.hw_serial))]
        if profile.platform is not None and (dir_name := platform_name(profile.platform)):
            names.append(dir_name)
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .not_valid_before(now - backdate(lifetime)).not_valid_after(not_after)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                       [x509.UniformResourceIdentifier(publication.crl_url)], None, None,
                       None)]), critical=False)
                   .add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
                       x509.AuthorityInformationAccessOID.CA_ISSUERS,
                       x509.UniformResourceIdentifier(publication.ca_issuers_url))]),
                       critical=False))
        return _leaf(builder, self.issuing, self.issuing_key, public_key,
                     [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH])

    def chain_pem(self, cert: x509.Certificate) -> str:
        return _pem(cert, self.issuing).decode("ascii")

    def crl(self, revoked: Sequence[tuple[int, datetime.datetime, x509.ReasonFlags | None]],
            now: datetime.datetime,
            next_update: datetime.timedelta) -> x509.CertificateRevocationList:
        """A CRL over (serial, revocation time, reason) entries, signed by the issuing CA.

        The CRL number is the issuing time in milliseconds: increasing without a
        counter to keep, as long as the registrar's clock does not step back.
        """
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.issuing.subject)
                   .last_update(now).next_update(now + next_update)
                   .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.issuing_key.public_key()), critical=False))
        for serial, when, reason in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
            if reason is not None:
                entry = entry.add_extension(x509.CRLReason(reason), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        return sign_crl(builder, self.issuing_key)
