"""EK chain verification with synthetic vendor PKIs shaped like real ones."""

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import ConfigError, ProtocolError
from agent.pki.ekchain import (
    TCG_EK_CERTIFICATE_EKU,
    TPM_MANUFACTURER_OID,
    TPM_MODEL_OID,
    TPM_VERSION_OID,
    TrustStore,
    load_trust_store,
    split_der_certificates,
    tpm_claims,
    verify_ek_chain,
)

NOW = datetime.datetime(2026, 11, 21, tzinfo=datetime.UTC)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer_name, issuer_key, key, ca, *, days=3650, not_before=None,
          ek=False, key_usage=True):
    nb = not_before or NOW - datetime.timedelta(days=1)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(nb).not_valid_after(nb + datetime.timedelta(days=days)))
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if ca and key_usage:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                          False), critical=True)
    if ek:
        tpm = x509.Name([x509.NameAttribute(TPM_MANUFACTURER_OID, "id:49465800"),
                         x509.NameAttribute(TPM_MODEL_OID, "SLB9672"),
                         x509.NameAttribute(TPM_VERSION_OID, "id:00070055")])
        b = b.add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm)]),
                            critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([TCG_EK_CERTIFICATE_EKU]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def vendor():
    root_key, int_key, ek_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
    root = _cert(_name("Vendor Root"), _name("Vendor Root"), root_key, root_key, True)
    inter = _cert(_name("Vendor EK CA 01"), root.subject, root_key, int_key, True)
    ek = _cert(x509.Name([]), inter.subject, int_key, ek_key, None, ek=True)
    return root, inter, ek, root_key, int_key


def test_chain_through_intermediate_from_tpm_nv(vendor):
    root, inter, ek, *_ = vendor
    verdict = verify_ek_chain(ek, TrustStore((root,)), [inter], now=NOW)
    assert verdict.verified, verdict.reason
    assert verdict.chain == ("", "CN=Vendor EK CA 01", "CN=Vendor Root")


def test_intermediate_in_trust_bundle_is_used_but_not_trusted_as_anchor(vendor, tmp_path):
    root, inter, ek, *_ = vendor
    bundle = tmp_path / "vendor.pem"
    bundle.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (inter, root)))
    store = load_trust_store([bundle])
    assert store.anchors == (root,) and store.intermediates == (inter,)
    assert verify_ek_chain(ek, store, now=NOW).verified
    # The intermediate alone is not an anchor.
    only_inter = tmp_path / "inter.pem"
    only_inter.write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    assert not verify_ek_chain(ek, load_trust_store([only_inter]), now=NOW).verified


def test_missing_intermediate_or_other_vendor_fails_with_issuer_named(vendor):
    root, inter, ek, *_ = vendor
    verdict = verify_ek_chain(ek, TrustStore((root,)), [], now=NOW)
    assert not verdict.verified and "CN=Vendor EK CA 01" in verdict.reason
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert(_name("Other Root"), _name("Other Root"), other_key, other_key, True)
    assert not verify_ek_chain(ek, TrustStore((other,)), [inter], now=NOW).verified


def test_no_roots_configured_is_explicit(vendor):
    _, inter, ek, *_ = vendor
    verdict = verify_ek_chain(ek, TrustStore(()), [inter], now=NOW)
    assert not verdict.verified and "ek_roots" in verdict.reason


def test_issuer_without_ca_basic_constraints_is_rejected(vendor):
    root, _, _, root_key, _ = vendor
    fake_key, ek_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    not_ca = _cert(_name("Leaf posing as CA"), root.subject, root_key, fake_key, False)
    ek = _cert(x509.Name([]), not_ca.subject, fake_key, ek_key, None, ek=True)
    assert not verify_ek_chain(ek, TrustStore((root,)), [not_ca], now=NOW).verified


def test_intermediate_without_key_usage_is_tolerated(vendor):
    root, _, _, root_key, _ = vendor
    k, ek_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    inter = _cert(_name("Quirky CA"), root.subject, root_key, k, True, key_usage=False)
    ek = _cert(x509.Name([]), inter.subject, k, ek_key, None, ek=True)
    assert verify_ek_chain(ek, TrustStore((root,)), [inter], now=NOW).verified


def test_expired_ek_certificate_fails(vendor):
    root, inter, _, _, int_key = vendor
    ek = _cert(x509.Name([]), inter.subject, int_key, ec.generate_private_key(ec.SECP256R1()),
               None, ek=True, days=10, not_before=NOW - datetime.timedelta(days=30))
    assert not verify_ek_chain(ek, TrustStore((root,)), [inter], now=NOW).verified


def test_tpm_claims_from_san(vendor):
    claims = tpm_claims(vendor[2])
    assert (claims.manufacturer, claims.model, claims.version) == (
        "id:49465800", "SLB9672", "id:00070055")


def test_split_der_handles_concatenation_and_padding(vendor):
    root, inter, *_ = vendor
    der = b"".join(c.public_bytes(serialization.Encoding.DER) for c in (inter, root))
    assert split_der_certificates(der + b"\xff" * 40, "nv") == [inter, root]
    assert split_der_certificates(b"", "nv") == []


@pytest.mark.parametrize("data, needle", [
    (b"\x31\x03abc", "byte 0: not the start"),
    (b"\x30\x84\xff\xff\xff\xff", "truncated"),
    (b"\x30\x03abc", "not a valid X.509"),
    (b"\x30\x80", "bad DER length"),
])
def test_split_der_rejects_garbage_with_position(data, needle):
    with pytest.raises(ProtocolError) as exc:
        split_der_certificates(data, "NV index 0x01c00100")
    assert needle in exc.value.message and "NV index 0x01c00100" in exc.value.message


def test_trust_file_without_certificates_is_config_error(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="no valid PEM certificate"):
        load_trust_store([bad])
