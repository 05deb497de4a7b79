"""What strangers can do to a registrar served on loopback, with honest gateways working
meanwhile: a flood of anonymous renewal challenges, asking about a revoked device, and a
TPM that enrolls again (its earlier certificates go on the CRL)."""

from __future__ import annotations

import concurrent.futures
import json
import sqlite3
import threading

import requests
from cryptography import x509
from gateway import Gateway
from stack import enrollment_toml, rotation_toml

FLOOD = 1000  # anonymous challenge requests, as in the report
FLOOD_THREADS = 8


def _flood(registrar, device_id: str, stop: threading.Event) -> list[int]:
    """FLOOD anonymous renewal challenges for `device_id` (or fewer, if stopped)."""
    local = threading.local()

    def one(_: int) -> int:
        if stop.is_set():
            return 0
        if not hasattr(local, "session"):
            local.session = requests.Session()
        response = local.session.post(
            f"{registrar.url}/v1/challenges", json={"device_id": device_id, "purpose": "renew"},
            verify=str(registrar.ca), timeout=30)
        return response.status_code

    with concurrent.futures.ThreadPoolExecutor(FLOOD_THREADS) as pool:
        return list(pool.map(one, range(FLOOD)))


def test_a_challenge_flood_costs_nothing_and_honest_gateways_go_on(tpm_factory,
                                                                  registrar_factory,
                                                                  agent_factory, tmp_path):
    tpm, newcomer = tpm_factory(), tpm_factory()
    registrar = registrar_factory([tpm.vendor_ca, newcomer.vendor_ca],
                                  settings={"renewal_window": '"0s"',
                                            "max_pending_challenges": "16"})
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml())
    device_id = agent.wait_generation(1)["enrollment"]["device_id"]  # its TLS credentials
    audit_before = len(registrar.audit())
    db = sqlite3.connect(registrar.directory / "registrar.db")
    answered_before = db.execute("SELECT count(*) FROM device_challenges").fetchone()[0]

    stop = threading.Event()
    flood = concurrent.futures.ThreadPoolExecutor(1).submit(_flood, registrar, device_id, stop)
    try:
        # During the flood: the device renews, and another gateway enrolls.
        code, renewed = agent.ctl_json("renew", "--wait")
        assert code == 0 and renewed["outcome"]["result"] == "renewed", renewed
        gw = Gateway(newcomer.tcti, tmp_path / "newcomer", registrar.url, registrar.ca)
        try:
            assert gw.enroll(registrar.token()).device_id != device_id
        finally:
            gw.close()
    finally:
        statuses = flood.result(timeout=300)
        stop.set()
    assert statuses.count(201) == FLOOD, {s: statuses.count(s) for s in set(statuses)}

    # Nothing of the flood was stored or audited: only the honest renewal's challenge.
    assert db.execute("SELECT count(*) FROM device_challenges").fetchone()[0] == \
        answered_before + 1
    events = [r["event"] for r in registrar.audit()[audit_before:]]
    assert "renewal-refused" not in events and events.count("certificate-renewed") == 1
    # After it, renewing still works.
    code, renewed = agent.ctl_json("renew", "--wait")
    assert code == 0 and renewed["outcome"]["result"] == "renewed", renewed


def test_strangers_learn_nothing_of_a_revocation(tpm, registrar_factory, agent_factory):
    registrar = registrar_factory([tpm.vendor_ca])
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml())
    device_id = agent.wait_enrollment("enrolled")["enrollment"]["device_id"]
    agent.stop()
    registrar.cli("devices", "revoke", "--dir", str(registrar.directory), device_id,
                  "--reason", "stolen from site 7")
    with requests.Session() as session:
        asked = session.post(f"{registrar.url}/v1/challenges",
                             json={"device_id": device_id, "purpose": "decommission"},
                             verify=str(registrar.ca), timeout=10)
        assert asked.status_code == 201, asked.text  # as for any device: nothing said
        challenge = asked.json()
        answered = session.post(
            f"{registrar.url}/v1/challenges/{challenge['challenge_id']}/decommission",
            json={"signature": "MAA="}, verify=str(registrar.ca), timeout=10)
    assert answered.status_code == 403, answered.text
    assert answered.json()["type"] == "urn:devid:problem:request-signature-invalid"
    for text in (asked.text, answered.text):
        assert "stolen" not in text and "revoked" not in text
    # The operator still sees it.
    shown = json.loads(registrar.cli("devices", "show", "--dir", str(registrar.directory),
                                     device_id, "--json").stdout)
    assert shown["status"] == "revoked" and shown["status_reason"] == "stolen from site 7"


def test_enrolling_again_puts_the_earlier_certificates_on_the_crl(tpm, registrar_factory,
                                                                  tmp_path):
    registrar = registrar_factory([tpm.vendor_ca])
    first = Gateway(tpm.tcti, tmp_path / "first", registrar.url, registrar.ca)
    try:
        earlier = first.enroll(registrar.token())
    finally:
        first.close()
    # The same TPM, its agent state wiped: a new token, the same device.
    again = Gateway(tpm.tcti, tmp_path / "wiped", registrar.url, registrar.ca)
    try:
        later = again.enroll(registrar.token())
    finally:
        again.close()
    assert later.device_id == earlier.device_id and later.serial != earlier.serial
    crl = x509.load_der_x509_crl(requests.get(f"{registrar.url}/v1/crl",
                                              verify=str(registrar.ca), timeout=10).content)
    entry = crl.get_revoked_certificate_by_serial_number(int(earlier.serial, 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.superseded
    assert crl.get_revoked_certificate_by_serial_number(int(later.serial, 16)) is None
    superseded = [r for r in registrar.audit() if r["event"] == "certificates-superseded"]
    assert superseded and superseded[0]["revoked"] == [earlier.serial]
