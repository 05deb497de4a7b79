"""Registrar parts without a TPM: CA profile, store races, config, CLI, agent retry timing."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from agent.audit import AuditLog
from agent.config import parse_config
from agent.daemon.enrollment import EnrollmentManager
from agent.enroll.http import _bad_response
from agent.enroll.messages import Challenge, decode
from agent.enroll.problems import problem
from agent.enroll.state import DecommissionStore, EnrollmentStore
from agent.errors import ConfigError, ProtocolError, StateError
from agent.pki.devicecert import verify_chain
from agent.registrar import cli
from agent.registrar.ca import CertificateAuthority, DeviceProfile
from agent.registrar.config import RegistrarConfig
from agent.registrar.store import ChallengeRow, Store
from agent.tomlconfig import parse_toml_model
from tests.certprofile import PROFILE, PUBLICATION

NOW = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture
def ca(tmp_path):
    return CertificateAuthority.create(tmp_path / "ca", NOW)


def test_device_certificate_is_built_from_the_device_id_only(ca):
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = ca.issue_device("urn:devid:" + "ab" * 16, key, datetime.timedelta(hours=24), NOW,
                           "identity", PROFILE, PUBLICATION)
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "ab" * 16
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:devid:" + "ab" * 16]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert cert.not_valid_after_utc - NOW == datetime.timedelta(hours=24)
    verify_chain([cert, ca.issuing], [ca.root], "identity", NOW + datetime.timedelta(hours=1))


def test_ca_is_never_overwritten_and_loads_back(ca, tmp_path):
    with pytest.raises(ConfigError, match="already exists"):
        CertificateAuthority.create(tmp_path / "ca", NOW)
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.issuing == ca.issuing
    assert (tmp_path / "ca" / "issuing.key").stat().st_mode & 0o777 == 0o600


def test_server_certificate_is_reissued_only_when_names_change(ca):
    assert ca.ensure_server_certificate(["127.0.0.1", "localhost"], NOW)
    assert not ca.ensure_server_certificate(["localhost", "127.0.0.1"], NOW)
    assert ca.ensure_server_certificate(["gw-registrar.example"], NOW)


@pytest.mark.parametrize("text, needle", [
    ("listen = 'nowhere'", "listen: expected HOST:PORT"),
    ("cert_lifetime = '1s'", "cert_lifetime: must be between 5s and 366d"),
    ("crl_next_update = '10s'", "crl_next_update: must be between 1m and 7d"),
    ("cert_lifetime = 'soon'", "cert_lifetime: expected a duration"),
    ("requier_token = true", "requier_token: unknown key (known: listen"),
    ("[pcr_policy]\nmode = 'lenient'", "[pcr_policy] mode"),
    ("[pcr_policy]\npcrs = [0]\n[[pcr_policy.allowed]]\nname = 'x'\nvalues = { '0' = 'zz' }",
     "[pcr_policy] allowed[0].values: Value error, PCR 0: not a hex string"),
])
def test_registrar_config_errors_name_the_key(text, needle):
    with pytest.raises(ConfigError) as exc:
        parse_toml_model(RegistrarConfig, text, Path("/srv/reg/registrar.toml"))
    assert needle.replace("Value error, ", "") in exc.value.message


def test_registrar_cli_usage_and_audit_exit_codes(tmp_path, capsys):
    assert cli.main(["token", "create"]) == cli.EXIT_USAGE
    assert cli.main(["token", "create", "--dir", str(tmp_path), "--ttl", "99d"]) == cli.EXIT_USAGE
    assert cli.main(["devices", "list", "--dir", str(tmp_path / "none")]) == cli.EXIT_CONFIG
    assert cli.main(["init", "--dir", str(tmp_path / "r"), "--pcrs", "0-7"]) == 0
    log = tmp_path / "r" / "audit.log"
    assert cli.main(["audit", "verify", "--dir", str(tmp_path / "r")]) == 0
    log.write_text(log.read_text().replace("registrar-initialized", "registrar-initialised"))
    assert cli.main(["audit", "verify", "--dir", str(tmp_path / "r")]) == cli.EXIT_FAILURE
    assert "hash mismatch" in capsys.readouterr().err


def test_agent_waits_at_least_retry_after(tmp_path):
    ca = tmp_path / "ca.pem"
    CertificateAuthority.create(tmp_path / "ca", NOW).root_path.replace(ca)
    config = parse_config(f'[enrollment]\nurl = "https://r:8443"\nca = "{ca}"\n'
                          'retry_initial = "1s"\nretry_max = "2s"\n', tmp_path / "agent.toml")
    manager = EnrollmentManager(config.enrollment, tmp_path, AuditLog(tmp_path / "audit.log"),
                                clock=lambda: NOW)
    busy = problem("registrar-busy", "busy", retry_after=30)
    assert manager._failed(busy) >= 30
    assert manager.facts().next_attempt >= NOW + datetime.timedelta(seconds=30)
    assert manager._failed(problem("token-used", "used")) <= 2
    assert manager.facts().state == "failed"
    assert manager.facts().last_error["type"] == "token-used"
    assert manager.attempts == 2


@pytest.mark.parametrize("content, needle", [
    (b"{not json", "not valid JSON"),
    (b'{"version": 9}', "unsupported format version 9"),
    (b'{"version": 1, "device_id": "urn:devid:x"}', "registrar: expected a non-empty string"),
    (b'{"version": 1, "device_id": "d", "registrar": "r", "enrolled_at": "yesterday", '
     b'"serial": "1", "certificate_chain": "x"}', "enrolled_at: not an ISO 8601 time"),
    (b'{"version": 1, "device_id": "d", "registrar": "r", "enrolled_at": '
     b'"2026-11-21T00:00:00+00:00", "serial": "1", "certificate_chain": "not pem"}',
     "certificate_chain: not PEM"),
])
def test_damaged_enrollment_state_is_set_aside_not_trusted(tmp_path, content, needle):
    state = tmp_path / "enrollment.json"
    state.write_bytes(content)
    with pytest.raises(StateError) as exc:
        EnrollmentStore(tmp_path).load()
    assert needle in exc.value.message
    manager = EnrollmentManager(None, tmp_path, AuditLog(tmp_path / "audit.log"))
    manager.load()  # logs, moves the damage aside, and enrolls again
    assert manager.stored is None and not state.exists()
    assert (tmp_path / "enrollment.json.damaged").read_bytes() == content


@pytest.mark.parametrize("body", [b"[]", b'{"challenge_id": 1}', b"<html>"])
def test_garbage_from_the_registrar_is_a_protocol_error(body):
    with pytest.raises(ProtocolError, match="registrar's response is not valid"):
        decode(Challenge, body, _bad_response)


def test_registrar_lifecycle_cli_refuses_unknown_devices_clearly(tmp_path, capsys):
    home = str(tmp_path / "r")
    vendor = tmp_path / "vendor.pem"
    vendor.write_bytes(b"")  # revoke and crl never read the vendor roots
    assert cli.main(["init", "--dir", home, "--ek-root", str(vendor)]) == 0
    capsys.readouterr()
    for action in ("revoke", "show"):
        assert cli.main(["devices", action, "--dir", home, "urn:devid:nope"]) == cli.EXIT_FAILURE
        err = capsys.readouterr().err
        assert "urn:devid:nope" in err and "Traceback" not in err
    assert cli.main(["devices", "revoke", "--dir", home]) == cli.EXIT_USAGE
    assert cli.main(["crl", "--dir", home, "-o", str(tmp_path / "crl.der")]) == 0
    assert x509.load_der_x509_crl((tmp_path / "crl.der").read_bytes()).next_update_utc


@pytest.mark.parametrize("content, needle", [
    (b"[]", "expected a JSON object"),
    (b'{"device_id": "d", "at": "2026-11-21T00:00:00+00:00"}', "registrar_notified"),
    (b'{"device_id": "d", "at": "soon", "registrar_notified": true}', "at: not an ISO 8601"),
])
def test_damaged_decommission_marker_is_refused_by_field(tmp_path, content, needle):
    (tmp_path / "decommissioned.json").write_bytes(content)
    with pytest.raises(StateError) as exc:
        DecommissionStore(tmp_path).load()
    assert needle in exc.value.message
    assert (tmp_path / "decommissioned.json").read_bytes() == content


def test_devices_show_says_how_many_certificates_it_lists(tmp_path, capsys):
    from agent.registrar.store import DeviceRow, IssuedCertificate, Store

    home = tmp_path / "r"
    vendor = tmp_path / "vendor.pem"
    vendor.write_bytes(b"")
    assert cli.main(["init", "--dir", str(home), "--ek-root", str(vendor)]) == 0
    store = Store(home / "registrar.db")
    row = ChallengeRow("c" * 32, "urn:devid:x", b"ek", b"ak", b"s", b"n" * 32, None, 1.0, 9e9)
    store.add_challenge(row)
    store.claim_challenge(row.id, 2.0)
    store.complete_enrollment(row, DeviceRow("urn:devid:x", b"ek", b"ak", b"id", "active",
                                             None, "t", "t", 1, "s0", "t"),
                              IssuedCertificate("s0", "urn:devid:x", "identity", 2.0, 9e9), 2.0)
    for i in range(1, 13):
        store.record_renewal("c" * 32, "urn:devid:x", [
            IssuedCertificate(f"s{i}", "urn:devid:x", "identity", 2.0 + i, 9e9)], "t")
    store.close()
    capsys.readouterr()
    assert cli.main(["devices", "show", "--dir", str(home), "urn:devid:x"]) == 0
    out = capsys.readouterr().out
    assert "certificates (13, the last 10 shown; --json lists all):" in out
    assert sum(1 for line in out.splitlines() if line.startswith("  s")) == 10


def test_device_certificate_carries_the_8021ar_profile_openssl_shows(ca, tmp_path):
    """hardwareModuleName (RFC 4108) naming the TPM by its EK certificate's serial, the
    device-asserted platform as TCG attributes in a directoryName, CRL DP and AIA."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = ca.issue_device("urn:devid:" + "ab" * 16, key, datetime.timedelta(hours=1), NOW,
                           "tls", PROFILE, PUBLICATION)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    [other] = san.get_values_for_type(x509.OtherName)
    assert other.type_id.dotted_string == "1.3.6.1.5.5.7.8.4"
    # SEQUENCE { OID 2.23.133.1.2, OCTET STRING 01 23 45 }
    assert other.value == bytes.fromhex("300c") + bytes.fromhex("06056781050102") + \
        bytes.fromhex("0403012345")
    [directory] = san.get_values_for_type(x509.DirectoryName)
    assert {a.oid.dotted_string: a.value for a in directory} == {
        "2.23.133.5.1.1": "Acme", "2.23.133.5.1.4": "GW-100", "2.23.133.5.1.5": "1.2.3",
        "2.23.133.5.1.6": "SN-42"}
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for n in dp[0].full_name] == [PUBLICATION.crl_url]
    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [(d.access_method, d.access_location.value) for d in aia] == [
        (x509.AuthorityInformationAccessOID.CA_ISSUERS, PUBLICATION.ca_issuers_url)]

    path = tmp_path / "device.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(path)],
                          capture_output=True, text=True, check=True).stdout
    assert "X509v3 CRL Distribution Points" in text and PUBLICATION.crl_url in text
    assert f"CA Issuers - URI:{PUBLICATION.ca_issuers_url}" in text
    assert "2.23.133.5.1.1=Acme" in text and "2.23.133.5.1.6=SN-42" in text, text
    assert "2.23.133.5.1.4=GW-100" in text and "2.23.133.5.1.5=1.2.3" in text
    # OpenSSL 3.0 names the otherName without decoding it; its DER is the hwSerialNum.
    assert "othername:" in text.lower()


def test_a_device_without_platform_data_gets_no_directory_name(ca):
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = ca.issue_device("urn:devid:" + "cd" * 16, key, datetime.timedelta(hours=1), NOW,
                           "identity", DeviceProfile(hw_serial=b"\x00\x80"), PUBLICATION)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DirectoryName) == []
    assert len(san.get_values_for_type(x509.OtherName)) == 1


@pytest.mark.parametrize(("url", "what"), [
    ("ftp://pki.example", "expected http"), ("https://", "expected http"),
    ("http://pki.example/?x=1", "no query"), ("http://u@pki.example", "no query"),
    ("http://pki.example:99999", "port"),
])
def test_a_bad_pki_url_is_refused_saying_why(url, what):
    with pytest.raises(ValidationError, match=what):
        RegistrarConfig(ek_roots=[Path("/dev/null")], pki_url=url)


def test_the_publication_urls_default_to_the_registrar_itself():
    config = RegistrarConfig(ek_roots=[Path("/dev/null")], listen="[::]:9443",
                             server_names=["::1"])
    assert config.publication().crl_url == "https://[::1]:9443/v1/crl"
    mirrored = RegistrarConfig(ek_roots=[Path("/dev/null")], pki_url="http://pki.example/d/")
    assert mirrored.publication().ca_issuers_url == "http://pki.example/d/v1/ca/issuing.crt"


def test_a_version_2_database_gains_the_platform_column_keeping_its_devices(tmp_path):
    import sqlite3

    path = tmp_path / "registrar.db"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE devices DROP COLUMN platform")
        db.execute("INSERT INTO devices (device_id, ek_certificate, ak_name, identity_public, "
                   "status, enrolled_at, updated_at, cert_serial, cert_not_after) VALUES "
                   "('urn:devid:1', x'00', x'00', x'00', 'active', 't', 't', 'ab', "
                   "'2026-01-01T00:00:00+00:00')")
        db.execute("PRAGMA user_version = 2")
    store = Store(path)
    [device] = store.devices()
    assert device.device_id == "urn:devid:1" and device.platform is None
    assert device.summary()["platform"] is None
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3


@pytest.mark.parametrize(("ca_key", "what"), [
    ({"backend": "pkcs11", "module": Path("/x.so")},
     "missing: token_label, key_label, pin_file"),
    ({"backend": "file", "key_label": "k"}, "key_label: only for backend"),
    ({"backend": "hsm"}, "Input should be 'file' or 'pkcs11'"),
    ({"backend": "pkcs11", "module": Path("/x.so"), "token_label": "t" * 33,
      "key_label": "k", "pin_file": Path("/p")}, "at most 32 characters"),
])
def test_a_bad_ca_key_section_is_refused_saying_why(ca_key, what):
    with pytest.raises(ValidationError, match=what):
        RegistrarConfig(ek_roots=[Path("/dev/null")], ca_key=ca_key)


def test_an_offline_root_request_certifies_the_issuing_key_and_import_checks_it(tmp_path):
    """The hand-built PKCS#10 request verifies, and import refuses a certificate for
    another key without touching the directory."""
    from agent.errors import DevidError
    from agent.registrar.ca import ISSUING_NAME, load_file_key

    directory = tmp_path / "ca"
    csr = CertificateAuthority.request_issuing(directory)
    assert csr.is_signature_valid and csr.subject == ISSUING_NAME
    key = load_file_key(directory / "issuing.key")
    assert csr.public_key() == key.public_key()
    other = CertificateAuthority.create(tmp_path / "other", NOW)
    pem = other.issuing.public_bytes(serialization.Encoding.PEM)
    root = other.root.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(DevidError, match="not for this registrar's issuing key"):
        CertificateAuthority.import_issuing(directory, pem, root, key, NOW)
    with pytest.raises(DevidError, match="expected PEM certificates"):
        CertificateAuthority.import_issuing(directory, b"garbage", root, key, NOW)
    assert sorted(p.name for p in directory.iterdir()) == ["issuing.csr", "issuing.key"]
    with pytest.raises(StateError, match="not imported yet"):
        CertificateAuthority.load(directory)


@pytest.mark.parametrize(("database", "what"), [
    ({"url": "mysql://u@h/db"}, "expected postgresql://USER@HOST"),
    ({"url": "postgresql://u:secret@h/db"}, "holds a password; put it in password_file"),
    ({"url": "postgresql://u@h/"}, "name one database"),
    ({"url": "postgresql://u@h:0x/db"}, "port is not a number"),
    ({"password_file": Path("/p")}, "only with a PostgreSQL url"),
])
def test_a_bad_database_section_is_refused_saying_why(database, what):
    with pytest.raises(ValidationError, match=what) as exc:
        RegistrarConfig(ek_roots=[Path("/dev/null")], database=database)
    assert "secret" not in str(exc.value).split("input_value")[0]
