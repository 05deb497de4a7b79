"""The agent enrolls itself: real devid-agent processes, swtpm, and devid-registrar over HTTPS."""

from __future__ import annotations

import concurrent.futures
import datetime
import json

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from stack import AgentProcess, enrollment_toml, write_agent_config

from agent.pki.devicecert import verify_chain


def _state(agent: AgentProcess) -> dict:
    return json.loads((agent.config.parent / "state" / "enrollment.json").read_text())


def test_agent_enrolls_with_a_certificate_for_its_tpm_key(tpm, registrar_factory,
                                                          agent_factory):
    registrar = registrar_factory([tpm.vendor_ca])
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token()))
    doc = agent.wait_enrollment("enrolled")

    chain = x509.load_pem_x509_certificates(_state(agent)["certificate_chain"].encode())
    anchors = x509.load_pem_x509_certificates(registrar.ca.read_bytes())
    verify_chain(chain, anchors, "identity", datetime.datetime.now(datetime.UTC))  # raises if not
    spki = chain[0].public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    assert digest.finalize().hex() == doc["identity"]["public_key_sha256"]

    assert doc["state"] == "OK", doc["reasons"]
    enrollment, cert = doc["enrollment"], doc["certificate"]
    assert enrollment["state"] == "enrolled"
    assert enrollment["device_id"].startswith("urn:devid:")
    assert cert["serial"] == f"{chain[0].serial_number:x}"
    assert cert["subject"] == chain[0].subject.rfc4514_string()
    assert cert["not_after"] == chain[0].not_valid_after_utc.isoformat()
    assert cert["key_matches_tpm"] is True
    assert [d["device_id"] for d in registrar.devices()] == [enrollment["device_id"]]

    text = agent.ctl("status").stdout
    assert f"device ID  {enrollment['device_id']}" in text
    _, check = agent.ctl_json("check")
    results = {r["name"]: r for r in check["results"]}
    assert results["registrar"]["level"] == "pass"
    assert results["enrollment"]["level"] == "pass"

    # A restart uses the stored identity: no second enrollment.
    assert agent.stop() == 0
    agent.start()
    assert agent.wait_enrollment("enrolled")["enrollment"]["device_id"] == \
        enrollment["device_id"]
    issued = [r for r in registrar.audit() if r["event"] == "certificate-issued"]
    assert len(issued) == 1
    assert registrar.cli("audit", "verify", "--dir", str(registrar.directory)).returncode == 0


def test_refused_enrollment_shows_the_registrars_reason(tpm, registrar_factory,
                                                        agent_factory):
    # A policy that does not allow this TPM's PCR 0 value.
    registrar = registrar_factory([tpm.vendor_ca], allowed={i: ("11" if i == 0 else "00") * 32
                                                             for i in range(8)})
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token()))
    doc = agent.wait_enrollment("failed")
    error = doc["enrollment"]["last_error"]
    assert error["type"] == "pcr-policy-violation"
    assert "PCRs [0] differ" in error["message"]
    assert doc["state"] == "FAIL"
    assert doc["certificate"] is None
    proc = agent.ctl("status")
    assert proc.returncode == 2
    assert "last error pcr-policy-violation" in proc.stdout
    assert "hint: the quoted PCR values are not in any allowed set" in proc.stdout


def test_agent_waits_for_an_unreachable_registrar_then_enrolls(tpm, registrar_factory,
                                                               agent_factory):
    registrar = registrar_factory([tpm.vendor_ca], start=False)
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token()))
    doc = agent.wait_enrollment("failed")
    assert doc["enrollment"]["last_error"]["type"] == "registrar-unreachable"
    assert doc["enrollment"]["next_attempt"] is not None
    _, check = agent.ctl_json("check")
    assert {r["name"]: r["level"] for r in check["results"]}["registrar"] == "fail"
    registrar.start()
    assert agent.wait_enrollment("enrolled")["state"] == "OK"


def test_registrar_with_an_unpinned_certificate_is_not_trusted(tpm, registrar_factory,
                                                               agent_factory):
    registrar = registrar_factory([tpm.vendor_ca])
    impostor_ca = registrar_factory([tpm.vendor_ca], start=False).ca  # another registrar's CA
    section = enrollment_toml(registrar, registrar.token()).replace(str(registrar.ca),
                                                                    str(impostor_ca))
    agent = agent_factory(tpm, extra=section)
    doc = agent.wait_enrollment("failed")
    assert doc["enrollment"]["last_error"]["type"] == "registrar-not-trusted"
    _, check = agent.ctl_json("check")
    result = {r["name"]: r for r in check["results"]}["registrar"]
    assert result["level"] == "fail"
    assert "pinned CA" in result["summary"]
    assert registrar.devices() == []


def test_twenty_gateways_enroll_concurrently(tpm_factory, registrar_factory, tmp_path):
    count = 20
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        tpms = list(pool.map(lambda _: tpm_factory(), range(count)))
        registrar = registrar_factory([t.vendor_ca for t in tpms])
        tokens = list(pool.map(lambda _: registrar.token(), range(count)))
    agents = []
    try:
        for i, (tpm, token) in enumerate(zip(tpms, tokens, strict=True)):
            config = write_agent_config(tmp_path / f"gw{i}" / "agent.toml", tpm.tcti,
                                        [tpm.vendor_ca], enrollment_toml(registrar, token))
            agents.append(AgentProcess(config).start(wait=False))
        docs = [agent.wait_enrollment("enrolled", timeout=120) for agent in agents]
    finally:
        for agent in agents:
            agent.stop()
    ids = {doc["enrollment"]["device_id"] for doc in docs}
    assert len(ids) == count
    assert {d["device_id"] for d in registrar.devices()} == ids
    issued = [r for r in registrar.audit() if r["event"] == "certificate-issued"]
    assert len(issued) == count
    assert registrar.cli("audit", "verify", "--dir", str(registrar.directory)).returncode == 0
