"""Rotation end to end: real devid-agent processes, swtpm, and devid-registrar over HTTPS,
with certificates that live seconds so that many renewals happen in one test."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
from cryptography import x509
from stack import AgentProcess, enrollment_toml, rotation_toml

from agent.enroll.state import EnrollmentStore
from agent.pki.certinfo import spki_der
from agent.rotation.tlskey import key_from_secret
from agent.tpm.custody import TpmCustody


def _enrolled_agent(tpm, registrar_factory, agent_factory, lifetime: str = "6s",
                    extra: str = "", **kwargs):
    registrar = registrar_factory([tpm.vendor_ca],
                                  settings={"cert_lifetime": json.dumps(lifetime)})
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + (extra or rotation_toml()), **kwargs)
    agent.wait_enrollment("enrolled")
    return registrar, agent


def _state_dir(agent: AgentProcess) -> Path:
    return agent.config.parent / "state"


def _agent_audit(agent: AgentProcess) -> list[dict]:
    code, doc = agent.ctl_json("audit", "--limit", "1000")
    assert code == 0 and doc["intact"], doc
    return doc["records"]


def test_short_certificates_rotate_by_themselves_and_on_request(tpm, registrar_factory,
                                                                 agent_factory, tmp_path):
    hook_out = tmp_path / "hook.out"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\necho \"$DEVID_GENERATION $DEVID_TLS_SERIAL\" >> {hook_out}\n")
    hook.chmod(0o755)
    registrar, agent = _enrolled_agent(tpm, registrar_factory, agent_factory,
                                       extra=rotation_toml(hooks=[str(hook)]))
    doc = agent.wait_generation(3)

    assert doc["state"] == "OK", doc["reasons"]
    cert, tls, rotation = doc["certificate"], doc["tls_certificate"], doc["rotation"]
    assert cert["renew_at"] is not None
    assert cert["not_before"] < cert["renew_at"] < cert["not_after"]
    assert tls["presented"] is True and tls["subject"].startswith("CN=devid-tls")
    assert rotation["last"]["result"] == "renewed"
    assert rotation["last"]["hooks"] == [{"command": str(hook), "ok": True, "detail": "exit 0"}]

    # devidctl renew --wait forces one and reports it.
    proc = agent.ctl("renew", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("renewed in ")
    code, renewed = agent.ctl_json("renew", "--wait")
    assert code == 0 and renewed["outcome"]["result"] == "renewed"

    # Every rotation is in the agent's audit log, in order, and the hooks saw each one.
    rotated = [r for r in _agent_audit(agent) if r["event"] == "rotated"]
    generations = [r["generation"] for r in rotated]
    assert generations == list(range(1, len(generations) + 1)) and len(generations) >= 5
    hook_lines = hook_out.read_text().split("\n")[:-1]
    assert [line.split()[1] for line in hook_lines] == [r["tls_serial"] for r in rotated]

    # The registrar saw the same renewals, each re-attested.
    renewed_at_registrar = [r for r in registrar.audit() if r["event"] == "certificate-renewed"]
    assert [r["tls_serial"] for r in renewed_at_registrar] == [r["tls_serial"] for r in rotated]
    assert {r["pcr_state"] for r in renewed_at_registrar} == {"swtpm fresh"}

    # What is on disk matches: the sealed key unseals to the TLS certificate's key.
    assert agent.stop() == 0
    stored = EnrollmentStore(_state_dir(agent)).load()
    with TpmCustody.open(tpm.tcti, _state_dir(agent), readonly=True) as custody:
        key = key_from_secret(custody.unseal(stored.tls.sealed_key))
        assert spki_der(key.public_key()) == spki_der(stored.tls.certificate)
        assert spki_der(stored.certificate) == custody.identity_key().public_key_der
    assert stored.generation == rotated[-1]["generation"]
    assert "BEGIN" not in (_state_dir(agent) / "enrollment.json").read_text().split(
        '"sealed_key"')[1]  # no PEM private key on disk, only the sealed blob


def test_changed_platform_state_is_refused_at_renewal_in_plain_words(tpm, registrar_factory,
                                                                      agent_factory):
    registrar, agent = _enrolled_agent(tpm, registrar_factory, agent_factory, lifetime="1h")
    assert agent.stop() == 0
    with TpmCustody.open(tpm.tcti, _state_dir(agent)) as custody:
        custody.extend_pcr(7, b"a new bootloader")
    agent.start()
    doc = agent.wait_status("renewal refused", lambda d: (d["rotation"].get("last") or {})
                            .get("result") == "failed")
    error = doc["rotation"]["last"]["error"]
    assert error["type"] == "pcr-policy-violation"
    assert "PCRs [7] differ" in error["message"] and error["hint"]
    # The sealed TLS key is bound to PCR 7 too: it is not unsealed, so not presented.
    assert "PCR policy not satisfied; changed since sealing: sha256:7" in \
        doc["rotation"]["restore_error"]["message"]
    assert doc["tls_certificate"]["presented"] is False
    assert doc["state"] == "WARN"
    text = agent.ctl("status").stdout
    assert "error    pcr-policy-violation" in text and "restore  unsealing refused" in text
    refused = [r for r in registrar.audit() if r["event"] == "renewal-refused"]
    assert refused and refused[-1]["problem"] == "pcr-policy-violation"


def test_registrar_down_longer_than_the_lifetime(tpm, registrar_factory, agent_factory):
    registrar, agent = _enrolled_agent(tpm, registrar_factory, agent_factory, lifetime="12s")
    before = agent.wait_generation(2)["rotation"]["generation"]
    registrar.stop()

    seen: dict[str, dict] = {}
    warnings: set[str] = set()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and "FAIL" not in seen:
        doc = agent.ctl_json("status")[1]
        seen.setdefault(doc["state"], doc)
        if doc["state"] == "WARN":
            warnings.update(doc["reasons"])
        time.sleep(0.1)
    # A failed renewal while still valid: WARN, and under 1/6 of the lifetime left it says
    # so; expired: FAIL, and never presented expired.
    assert "WARN" in seen and "FAIL" in seen, list(seen)
    assert any("last renewal failed: registrar-unreachable" in r for r in warnings), warnings
    assert any("expires in" in r for r in warnings), warnings
    failed = seen["FAIL"]
    assert any("TLS certificate" in r and "expired" in r for r in failed["reasons"])
    assert failed["tls_certificate"]["presented"] is False
    assert failed["rotation"]["last"]["error"]["type"] == "registrar-unreachable"
    assert failed["rotation"]["failures"] >= 2 and failed["rotation"]["next_attempt"]
    assert agent.proc.poll() is None  # still running

    registrar.start()
    doc = agent.wait_status("recovered", lambda d: d["state"] == "OK", timeout=30)
    assert doc["rotation"]["generation"] > before
    assert doc["tls_certificate"]["presented"] is True
    failures = [r for r in _agent_audit(agent) if r["event"] == "rotation-failed"]
    assert failures and all(r["error"] == "registrar-unreachable" for r in failures)


def test_revoked_device_stops_presenting_and_destroys_its_tls_key(tpm, registrar_factory,
                                                                  agent_factory):
    registrar, agent = _enrolled_agent(tpm, registrar_factory, agent_factory, lifetime="1h")
    device_id = agent.wait_generation(1)["enrollment"]["device_id"]
    out = registrar.cli("devices", "revoke", "--dir", str(registrar.directory), device_id,
                        "--reason", "stolen from site 7").stdout
    assert "renewals refused" in out

    # The agent learns it at its next renewal (forced here instead of waiting an hour).
    code, renewed = agent.ctl_json("renew", "--wait")
    assert code == 2 and renewed["outcome"]["result"] == "revoked"
    doc = agent.wait_status("revoked", lambda d: d["enrollment"]["state"] == "revoked")
    assert doc["state"] == "FAIL"
    # The operator's words stay with the operator (audit log, devices show).
    assert "revoked by the operator" in doc["enrollment"]["revoked_reason"]
    assert "stolen" not in json.dumps(doc)
    shown = registrar.cli("devices", "show", "--dir", str(registrar.directory), device_id)
    assert "stolen from site 7" in shown.stdout
    assert doc["tls_certificate"] is None and doc["rotation"]["state"] == "revoked"
    stored = json.loads((_state_dir(agent) / "enrollment.json").read_text())
    assert stored["lifecycle"] == "revoked" and stored["tls"] is None
    revoked = [r for r in _agent_audit(agent) if r["event"] == "revoked"]
    assert revoked[0]["tls_key"] == "destroyed"
    assert "no longer presents its identity" in agent.log_path.read_text()

    # The CRL names every certificate of the device still unexpired, signed by the CA.
    show = json.loads(registrar.cli("devices", "show", "--dir", str(registrar.directory),
                                    device_id, "--json").stdout)
    on_crl = {c["serial"] for c in show["certificates"] if c["revoked_at"]}
    assert on_crl
    response = requests.get(f"{registrar.url}/v1/crl", verify=str(registrar.ca), timeout=10)
    assert response.headers["Content-Type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(response.content)
    issuing = x509.load_pem_x509_certificate(
        (registrar.directory / "ca" / "issuing.pem").read_bytes())
    assert crl.is_signature_valid(issuing.public_key())
    assert {format(r.serial_number, "x") for r in crl} >= on_crl

    # A restart stays revoked and asks the registrar for nothing.
    requests_before = len(registrar.audit())
    assert agent.stop() == 0
    agent.start()
    doc = agent.wait_status("revoked after restart",
                            lambda d: d["enrollment"]["state"] == "revoked")
    time.sleep(1)
    assert len(registrar.audit()) == requests_before
    assert agent.ctl("renew").returncode == 2


def test_decommission_retires_the_device_on_both_sides(tpm, registrar_factory, agent_factory):
    registrar, agent = _enrolled_agent(tpm, registrar_factory, agent_factory, lifetime="1h")
    device_id = agent.ctl_json("status")[1]["enrollment"]["device_id"]
    assert agent.ctl("decommission").returncode == 64  # needs --yes
    code, done = agent.ctl_json("decommission", "--yes")
    assert code == 0, done
    assert done["registrar_notified"] is True and done["device_id"] == device_id
    # the enrollment's identity certificate, then the first renewal's identity and TLS ones
    assert len(done["revoked_serials"]) == 3

    state = _state_dir(agent)
    assert not (state / "enrollment.json").exists()
    assert not (state / "tpm" / "identity.json").exists()
    assert not (state / "tpm" / "ak.json").exists()
    assert json.loads((state / "decommissioned.json").read_text())["device_id"] == device_id
    [device] = registrar.devices()
    assert device["status"] == "decommissioned"
    assert [r for r in registrar.audit() if r["event"] == "device-decommissioned"]
    assert [r for r in _agent_audit(agent) if r["event"] == "decommissioned"]

    doc = agent.ctl_json("status")[1]
    assert doc["enrollment"]["state"] == "decommissioned" and doc["state"] == "WARN"
    assert doc["tls_certificate"] is None
    # Restarting does not re-enroll or make new keys.
    assert agent.stop() == 0
    agent.start()
    doc = agent.wait_status("decommissioned", lambda d: d["enrollment"]["state"]
                            == "decommissioned")
    assert not (state / "tpm" / "identity.json").exists()
    assert len(registrar.devices()) == 1
    assert agent.ctl("renew").returncode == 2


def test_full_disk_leaves_the_old_state_and_recovers(tpm, registrar_factory, agent_factory,
                                                     tmp_path):
    """A real ENOSPC: the state directory on a tiny tmpfs that is then filled up."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        registrar, agent = _enrolled_agent(tpm, registrar_factory, agent_factory,
                                           lifetime="1h", state_dir=str(mount / "state"))
        state_file = mount / "state" / "enrollment.json"
        before = state_file.read_bytes()
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # ENOSPC: full
        finally:
            os.close(fd)
        code, doc = agent.ctl_json("renew", "--wait")
        assert code == 2
        error = doc["outcome"]["error"]
        assert "No space left on device" in error["message"]
        assert state_file.read_bytes() == before
        assert not [p for p in state_file.parent.iterdir() if p.name.endswith(".tmp")]
        status = agent.ctl_json("status")[1]
        assert status["tls_certificate"]["presented"] is True  # the old credentials serve on
        # Still valid, but the renewal failed: a warning that says why.
        assert status["state"] == "WARN", status["reasons"]
        assert "No space left on device" in status["reasons"][0], status["reasons"]

        filler.unlink()
        code, doc = agent.ctl_json("renew", "--wait")
        assert code == 0, doc
        assert state_file.read_bytes() != before
    finally:
        for agent_proc in [a for a in (locals().get("agent"),) if a]:
            agent_proc.stop()
        subprocess.run(["umount", "-l", str(mount)], check=False)
        os.sync()
