"""The IEEE 802.1AR certificate profile end to end: a real swtpm, agent and registrar.

What openssl shows of an issued certificate (hardwareModuleName naming the TPM,
the device-asserted platform, CRL DP, AIA), that the registrar serves what the
certificate points to, and that `openssl verify -crl_check` with the fetched CRL
passes for a valid device and fails for a revoked one.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.pki.der import hardware_module_name
from agent.registrar.ca import ek_hw_serial
from tests.processes import wait_until
from tests.stack import enrollment_toml, rotation_toml

DEVICE = """
[device]
manufacturer = "Acme Industrial"
model = "GW-100"
serial = "GW100-000042"
version = "2.4.1"
"""


def _openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def _fetch(url: str, registrar) -> bytes:
    response = requests.get(url, verify=str(registrar.ca), timeout=10)
    assert response.status_code == 200, response.text
    return response.content


def _verify(directory: Path, device: x509.Certificate, registrar) -> subprocess.CompletedProcess:
    """openssl verify -crl_check with the CRL and issuing CA the certificate points to."""
    dp = device.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    aia = device.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    [crl_url] = [n.value for n in dp[0].full_name]
    [issuer_url] = [d.access_location.value for d in aia]
    crl = x509.load_der_x509_crl(_fetch(crl_url, registrar))
    issuing = x509.load_der_x509_certificate(_fetch(issuer_url, registrar))
    (directory / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    (directory / "issuing.pem").write_bytes(issuing.public_bytes(serialization.Encoding.PEM))
    (directory / "device.pem").write_bytes(device.public_bytes(serialization.Encoding.PEM))
    return _openssl("verify", "-crl_check", "-CAfile", str(registrar.ca),
                    "-untrusted", str(directory / "issuing.pem"),
                    "-CRLfile", str(directory / "crl.pem"), str(directory / "device.pem"),
                    check=False)


def _certificates(agent) -> tuple[x509.Certificate, x509.Certificate]:
    stored = json.loads((agent.config.parent / "state" / "enrollment.json").read_text())
    identity = x509.load_pem_x509_certificates(stored["certificate_chain"].encode())[0]
    tls = x509.load_pem_x509_certificates(stored["tls"]["certificate_chain"].encode())[0]
    return identity, tls


def test_issued_certificates_follow_the_profile_and_openssl_checks_revocation(
        tpm, registrar_factory, agent_factory, tmp_path):
    registrar = registrar_factory([tpm.vendor_ca], settings={"cert_lifetime": '"1h"'})
    agent = agent_factory(tpm, extra=DEVICE + enrollment_toml(registrar, registrar.token())
                          + rotation_toml())
    device_id = agent.wait_generation(1)["enrollment"]["device_id"]
    identity, tls = _certificates(agent)

    # hardwareModuleName: TCG's TPM 2.0 OID and the serial of this TPM's EK certificate.
    with sqlite3.connect(registrar.directory / "registrar.db") as db:
        [(ek_der,)] = db.execute("SELECT ek_certificate FROM devices").fetchall()
    ek = x509.load_der_x509_certificate(ek_der)
    for cert in (identity, tls):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [o.value for o in san.get_values_for_type(x509.OtherName)] == [
            hardware_module_name("2.23.133.1.2", ek_hw_serial(ek))]
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [device_id]

    (tmp_path / "identity.pem").write_bytes(identity.public_bytes(serialization.Encoding.PEM))
    text = _openssl("x509", "-noout", "-text", "-in", str(tmp_path / "identity.pem")).stdout
    for shown in ("2.23.133.5.1.1=Acme Industrial", "2.23.133.5.1.4=GW-100",
                  "2.23.133.5.1.5=2.4.1", "2.23.133.5.1.6=GW100-000042",
                  f"URI:{registrar.url}/v1/crl",
                  f"CA Issuers - URI:{registrar.url}/v1/ca/issuing.crt"):
        assert shown in text, (shown, text)
    assert "othername:" in text.lower()  # OpenSSL 3.0 names it without decoding it

    # The registrar records the platform as the device's own word.
    shown = json.loads(registrar.cli("devices", "show", "--dir", str(registrar.directory),
                                     device_id, "--json").stdout)
    assert shown["platform"] == {"manufacturer": "Acme Industrial", "model": "GW-100",
                                 "serial": "GW100-000042", "version": "2.4.1",
                                 "asserted_by": "device"}

    # A firmware update: the next renewal says so (signed), and the certificates follow.
    config = agent.config
    config.write_text(config.read_text().replace('version = "2.4.1"', 'version = "2.5.0"'))
    agent.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "applied: [device]" in agent.log_path.read_text(), "the reload")
    code, renewed = agent.ctl_json("renew", "--wait")
    assert code == 0, renewed
    identity, tls = _certificates(agent)
    san = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    [directory] = san.get_values_for_type(x509.DirectoryName)
    assert directory.get_attributes_for_oid(x509.ObjectIdentifier("2.23.133.5.1.5"))[0].value \
        == "2.5.0"
    shown = json.loads(registrar.cli("devices", "show", "--dir", str(registrar.directory),
                                     device_id, "--json").stdout)
    assert shown["platform"]["version"] == "2.5.0"

    # openssl verify with the fetched CRL: valid now, revoked after `devices revoke`.
    for cert in (identity, tls):
        ok = _verify(tmp_path, cert, registrar)
        assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    registrar.cli("devices", "revoke", "--dir", str(registrar.directory), device_id,
                  "--reason", "test")
    for cert in (identity, tls):
        refused = _verify(tmp_path, cert, registrar)
        assert refused.returncode != 0
        assert "certificate revoked" in refused.stdout + refused.stderr
