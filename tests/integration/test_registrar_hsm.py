"""The issuing CA's key in a PKCS#11 token (Debian's SoftHSM2), and a root kept offline.

A real SoftHSM2 token per test (its own softhsm2.conf and token directory), the
real registrar and agent over swtpm: enrollment and renewal are signed inside
the token, the key cannot be read out of it, and the PIN appears nowhere but in
its file. With --offline-root the registrar holds no root key: openssl, playing
the offline root, signs the issuing CA's request, and `ca import` completes it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import requests
from cryptography import x509

from tests.stack import enrollment_toml, rotation_toml

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "739201-not-a-real-pin"


@pytest.fixture
def token(tmp_path, monkeypatch):
    """A fresh SoftHSM2 token labelled devid-ca; SOFTHSM2_CONF is inherited by the
    registrar processes the test starts."""
    directory = tmp_path / "softhsm"
    (directory / "tokens").mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\n"
                    "objectstore.backend = file\nlog.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "devid-ca",
                    "--pin", PIN, "--so-pin", "so-" + PIN], check=True, capture_output=True,
                   timeout=30)
    pin_file = directory / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    return pin_file


def _hsm_args(pin_file: Path) -> list[str]:
    return ["--pkcs11-module", str(SOFTHSM_MODULE), "--pkcs11-token", "devid-ca",
            "--pkcs11-key-label", "issuing", "--pkcs11-pin-file", str(pin_file)]


def _token_private_key():
    import pkcs11

    session = pkcs11.lib(str(SOFTHSM_MODULE)).get_token(token_label="devid-ca").open(
        user_pin=PIN)
    return session, session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY,
                                    label="issuing")


def _everything_written(registrar) -> str:
    texts = [registrar.log_path.read_text(errors="replace")]
    for path in registrar.directory.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    return "\n".join(texts)


def test_enrollment_and_renewal_are_signed_in_the_token(tpm, registrar_factory, agent_factory,
                                                        token):
    import pkcs11

    registrar = registrar_factory([tpm.vendor_ca], init_args=_hsm_args(token),
                                  settings={"cert_lifetime": '"1h"'})
    assert not (registrar.directory / "ca" / "issuing.key").exists()
    assert "backend = \"pkcs11\"" in (registrar.directory / "registrar.toml").read_text()
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml())
    agent.wait_generation(1)
    code, renewed = agent.ctl_json("renew", "--wait")
    assert code == 0, renewed

    issuing = x509.load_pem_x509_certificate(
        (registrar.directory / "ca" / "issuing.pem").read_bytes())
    shown = registrar.cli("devices", "list", "--dir", str(registrar.directory), "--json")
    assert '"status": "active"' in shown.stdout
    crl = x509.load_der_x509_crl(requests.get(f"{registrar.url}/v1/crl",
                                              verify=str(registrar.ca), timeout=10).content)
    assert crl.is_signature_valid(issuing.public_key())
    # The agent verified both chains to the pinned root before storing them; the
    # issuing key that signed them is the token's.
    session, key = _token_private_key()
    try:
        assert key[pkcs11.Attribute.EXTRACTABLE] is False
        assert key[pkcs11.Attribute.SENSITIVE] is True
        with pytest.raises(pkcs11.PKCS11Error):
            key[pkcs11.Attribute.VALUE]
    finally:
        session.close()
    assert "issuing CA key: PKCS#11 token 'devid-ca'" in registrar.log_path.read_text()
    assert PIN not in _everything_written(registrar)


def test_a_wrong_pin_is_a_configuration_error_that_names_the_key(tpm, registrar_factory,
                                                                 token):
    registrar = registrar_factory([tpm.vendor_ca], init_args=_hsm_args(token))
    registrar.stop()
    token.write_text("000000\n")
    proc = registrar.cli("crl", "--dir", str(registrar.directory), check=False)
    assert proc.returncode == 78
    assert "[ca_key] pin_file: the token 'devid-ca' refused the PIN" in proc.stderr
    assert "000000" not in proc.stderr and "Traceback" not in proc.stderr


def _offline_root(directory: Path) -> tuple[Path, Path]:
    """What an offline root does, with openssl: its own key and self-signed certificate."""
    directory.mkdir()
    key, cert = directory / "root.key", directory / "root.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "3650", "-subj", "/O=Fleet/CN=Fleet offline root",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                   check=True, capture_output=True, timeout=30)
    return key, cert


def _root_signs(directory: Path, csr: Path, root_key: Path, root_cert: Path,
                extensions: str) -> Path:
    ext = directory / "issuing.ext"
    ext.write_text(extensions)
    out = directory / "issuing.pem"
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(root_cert),
                    "-CAkey", str(root_key), "-CAcreateserial", "-days", "1825", "-sha256",
                    "-extfile", str(ext), "-out", str(out)],
                   check=True, capture_output=True, timeout=30)
    return out


CA_EXTENSIONS = ("basicConstraints=critical,CA:TRUE,pathlen:0\n"
                 "keyUsage=critical,keyCertSign,cRLSign\n"
                 "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")


def test_an_offline_root_signs_the_token_key_and_gateways_enroll_under_it(
        tpm, registrar_factory, agent_factory, token, tmp_path):
    registrar = registrar_factory([tpm.vendor_ca], start=False,
                                  init_args=[*_hsm_args(token), "--offline-root"])
    ca_dir = registrar.directory / "ca"
    assert not (ca_dir / "root.key").exists() and (ca_dir / "issuing.csr").exists()
    refused = registrar.cli("serve", "--dir", str(registrar.directory), check=False)
    assert refused.returncode != 0 and "not imported yet" in refused.stderr, refused.stderr
    assert "ca import" in refused.stderr

    root_key, root_cert = _offline_root(tmp_path / "offline")
    # Refused, saying why: a certificate that is not a CA, and one for another key.
    leaf = _root_signs(tmp_path / "offline", ca_dir / "issuing.csr", root_key, root_cert,
                       "basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature\n")
    refused = registrar.cli("ca", "import", "--dir", str(registrar.directory), "--certificate",
                            str(leaf), "--root", str(root_cert), check=False)
    assert refused.returncode == 1 and "must be a CA" in refused.stderr, refused.stderr
    assert "keyCertSign" in refused.stderr  # the hint says what the root must sign
    refused = registrar.cli("ca", "import", "--dir", str(registrar.directory), "--certificate",
                            str(root_cert), "--root", str(root_cert), check=False)
    assert refused.returncode == 1 and "not for this registrar's issuing key" in refused.stderr
    assert (ca_dir / "issuing.csr").exists() and not (ca_dir / "issuing.pem").exists()

    issuing = _root_signs(tmp_path / "offline", ca_dir / "issuing.csr", root_key, root_cert,
                          CA_EXTENSIONS)
    registrar.cli("ca", "import", "--dir", str(registrar.directory), "--certificate",
                  str(issuing), "--root", str(root_cert))
    assert (ca_dir / "root.pem").read_bytes() == root_cert.read_bytes()
    assert not (ca_dir / "root.key").exists()
    registrar.start()

    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml())
    agent.wait_generation(1)
    stored = json.loads((agent.config.parent / "state" / "enrollment.json").read_text())
    device = tmp_path / "device.pem"
    device.write_text(stored["tls"]["certificate_chain"])
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(root_cert), "-untrusted",
                               str(ca_dir / "issuing.pem"), str(device)],
                              capture_output=True, text=True, timeout=30)
    assert verified.returncode == 0 and ": OK" in verified.stdout, verified.stderr
    status = agent.status()
    assert status["enrollment"]["state"] == "enrolled"
    assert status["tls_certificate"]["presented"] is True
