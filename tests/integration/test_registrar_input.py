"""Malformed input at the registrar's HTTPS endpoints: always a 4xx problem, never a 500.

Crafted cases name each kind of damage; a hypothesis test then throws random
JSON and mutated real TPM structures at both endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets

import pytest
import requests
from cryptography import x509
from gateway import Gateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.enroll.evidence import device_request_message
from agent.enroll.messages import RenewRequest, encode
from agent.rotation.tlskey import new_tls_key, tls_csr

FIELDS = ("ek_certificate", "ek_chain", "ek_public", "ak_public", "token")
COMPLETE_FIELDS = ("proof", "quote", "pcr_values", "certify", "identity_public", "csr")


@pytest.fixture
def target(tpm, registrar_factory, tmp_path):
    registrar = registrar_factory([tpm.vendor_ca], settings={"require_token": "false"})
    gw = Gateway(tpm.tcti, tmp_path / "gw", registrar.url, registrar.ca)
    session = requests.Session()
    yield registrar, gw, session
    session.close()
    gw.close()


def post(registrar, session, path, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return session.post(f"{registrar.url}/v1{path}", data=data, verify=str(registrar.ca),
                        headers={"Content-Type": content_type}, timeout=20)


def assert_problem(response, status=None, code=None, detail=None):
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/problem+json")
    doc = response.json()
    assert doc["type"].startswith("urn:devid:problem:")
    assert doc["status"] == response.status_code and doc["title"] and doc["detail"]
    assert "Traceback" not in response.text
    if status is not None:
        assert response.status_code == status, doc
    if code is not None:
        assert doc["type"] == f"urn:devid:problem:{code}", doc
    if detail is not None:
        assert detail in doc["detail"], doc
    return doc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_crafted_malformed_requests_get_precise_problems(target):
    registrar, gw, session = target
    good = encode(gw.start_request())
    ek_public = gw.evidence.ek_public
    cases = [
        (b"not json", 400, "malformed-request", "not valid JSON"),
        ([1, 2], 400, "malformed-request", "expected a JSON object"),
        ({}, 400, "malformed-request", "ek_certificate: required field missing"),
        ({**good, "ek_public": "***"}, 400, "malformed-request", "ek_public: not valid base64"),
        ({**good, "ek_public": b64(ek_public[:-10])}, 400, "malformed-request",
         "ek_public: not a valid TPM2B_PUBLIC"),
        ({**good, "ak_public": b64(gw.evidence.ak_public + b"\0\0")}, 400, "malformed-request",
         "ak_public: 2 trailing bytes"),
        ({**good, "ek_certificate": b64(b"\x30\x03abc")}, 400, "malformed-request",
         "ek_certificate: not a DER X.509 certificate"),
        ({**good, "ek_chain": ["AAAA"]}, 400, "malformed-request",
         "ek_chain[0]: not a DER X.509 certificate"),
        ({**good, "ek_chain": "AAAA"}, 400, "malformed-request", "ek_chain"),
        ({**good, "ek_public": b64(b"\0" * 12289)}, 400, "malformed-request", "longer than"),
        ({**good, "surprise": 1}, 400, "malformed-request", "surprise: unknown field"),
        ({**good, "token": 12}, 400, "malformed-request", "token"),
        (b"{" + b" " * 70_000 + b"}", 413, "body-too-large", "limit"),
    ]
    for body, status, code, detail in cases:
        assert_problem(post(registrar, session, "/enrollments", body), status, code, detail)
    assert_problem(post(registrar, session, "/enrollments", good, "text/plain"), 415,
                   "unsupported-media-type")


def _attest_cut(answer):
    quote = answer["quote"]
    return {**quote, "attest": b64(base64.b64decode(quote["attest"])[:-4])}


COMPLETION_DAMAGE = [
    (lambda a: {**a, "quote": {**a["quote"], "signature": b64(b"\x00\x18")}}, 400,
     "malformed-request", "quote.signature: not a valid TPMT_SIGNATURE"),
    (lambda a: {**a, "quote": _attest_cut(a)}, 403, "signature-invalid", "quote"),
    (lambda a: {**a, "pcr_values": []}, 400, "malformed-request", "pcr_values"),
    (lambda a: {**a, "quote": "x"}, 400, "malformed-request", "quote"),
    (lambda a: {**a, "identity_public": b64(b"\x00\x02\x00")}, 400, "malformed-request",
     "identity_public: not a valid TPM2B_PUBLIC"),
    (lambda a: {**a, "csr": b64(b"\x30\x00")}, 400, "csr-invalid", "csr"),
]


@pytest.mark.parametrize("damage, status, code, detail", COMPLETION_DAMAGE)
def test_malformed_evidence_at_completion_gets_problems(target, damage, status, code, detail):
    registrar, gw, session = target
    challenge = gw.start()
    body = damage(encode(gw.answer(challenge)))
    path = f"/enrollments/{challenge.challenge_id}/complete"
    assert_problem(post(registrar, session, path, body), status, code, detail)


def test_unknown_routes_and_challenges_get_problems(target):
    registrar, gw, session = target
    answer = encode(gw.answer(gw.start()))
    assert_problem(post(registrar, session, "/enrollments/nothex/complete", answer), 404,
                   "challenge-unknown")
    assert_problem(post(registrar, session, f"/enrollments/{secrets.token_hex(16)}/complete",
                        answer), 404, "challenge-unknown")
    wrong = session.get(f"{registrar.url}/v1/enrollments", verify=str(registrar.ca))
    assert_problem(wrong, 405, "method-not-allowed")
    assert wrong.headers["Allow"] == "POST"
    assert_problem(session.get(f"{registrar.url}/nowhere", verify=str(registrar.ca)), 404)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)


def _mutate(data: bytes, how: int, position: int, junk: bytes) -> bytes:
    position %= max(len(data), 1)
    if how == 0:
        return data[:position]  # truncated
    if how == 1:
        return data + junk  # trailing garbage
    if how == 2:
        return data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1:]
    return junk  # unrelated bytes


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_structures_never_cause_a_server_error(target, data):
    registrar, gw, session = target
    good = encode(gw.start_request())
    kind = data.draw(st.sampled_from(["random-json", "random-fields", "mutated-structure"]))
    if kind == "random-json":
        body = data.draw(json_values)
    elif kind == "random-fields":
        keys = data.draw(st.sets(st.sampled_from(FIELDS + COMPLETE_FIELDS), max_size=8))
        body = {k: data.draw(json_values | st.binary(max_size=300).map(b64)) for k in keys}
    else:
        field = data.draw(st.sampled_from(["ek_certificate", "ek_public", "ak_public"]))
        raw = base64.b64decode(good[field])
        mutated = _mutate(raw, data.draw(st.integers(0, 3)), data.draw(st.integers(0, 5000)),
                          data.draw(st.binary(min_size=1, max_size=64)))
        body = {**good, field: b64(mutated) if mutated else "AA=="}
    endpoint = data.draw(st.sampled_from(["/enrollments",
                                          f"/enrollments/{secrets.token_hex(16)}/complete"]))
    response = post(registrar, session, endpoint, body)
    if response.status_code == 201:  # a mutation the TPM structures tolerate is fine
        return
    assert_problem(response)


def test_registrar_is_healthy_and_audit_intact_after_abuse(target):
    registrar, _gw, session = target
    for body in (b"\xff\xfe", b"[]", b'{"ek_certificate": null}'):
        assert_problem(post(registrar, session, "/enrollments", body))
    health = session.get(f"{registrar.url}/v1/health", verify=str(registrar.ca))
    assert health.json()["status"] == "ok"
    assert registrar.cli("audit", "verify", "--dir", str(registrar.directory)).returncode == 0
    assert {r["problem"] for r in registrar.audit() if r["event"] == "enrollment-refused"} == \
        {"malformed-request"}


# --- an enrolled device's requests: challenges, renewal, decommissioning ------------------

def _renew_body(gw: Gateway, challenge: dict, device_id: str, **damage: bytes) -> dict:
    """An honest renewal request for `challenge`, signed by the identity key over whatever
    parts `damage` substitutes (so only the damaged part is wrong)."""
    nonce = base64.b64decode(challenge["nonce"])
    quote = asyncio.run(gw.tpm.quote(nonce, challenge["pcr_selection"]["pcrs"]))
    csr = damage.get("tls_csr", tls_csr(new_tls_key()))
    message = device_request_message("renew", device_id, challenge["challenge_id"], nonce,
                                     quote.evidence.attest, csr)
    return encode(RenewRequest(ak_public=damage.get("ak_public", gw.evidence.ak_public),
                               quote=quote.evidence, pcr_values=list(quote.pcr_values),
                               tls_csr=csr, signature=asyncio.run(gw.tpm.sign(message))))


def test_garbage_at_the_device_routes_gets_problems_and_changes_nothing(target):
    registrar, gw, session = target
    device_id = gw.enroll().device_id

    def challenge(purpose: str = "renew") -> dict:
        response = post(registrar, session, "/challenges",
                        {"device_id": device_id, "purpose": purpose})
        assert response.status_code == 201, response.text
        return response.json()

    for body, status, code, detail in [
        (b"not json", 400, "malformed-request", "not valid JSON"),
        ({}, 400, "malformed-request", "device_id: required field missing"),
        ({"device_id": device_id, "purpose": "reboot"}, 400, "malformed-request", "purpose"),
        ({"device_id": 7, "purpose": "renew"}, 400, "malformed-request", "device_id"),
        ({"device_id": "x" * 200, "purpose": "renew"}, 400, "malformed-request", "device_id"),
        ({"device_id": device_id, "purpose": "renew", "extra": 1}, 400, "malformed-request",
         "extra: unknown field"),
        ({"device_id": "urn:devid:00", "purpose": "renew"}, 404, "device-unknown", "urn:devid:00"),
    ]:
        assert_problem(post(registrar, session, "/challenges", body), status, code, detail)

    good = _renew_body(gw, challenge(), device_id)
    for damage, status, code, detail in [
        ({"signature": b64(b"\x30\x00")}, 403, "request-signature-invalid", "signature"),
        ({"signature": "***"}, 400, "malformed-request", "signature: not valid base64"),
        ({"pcr_values": []}, 400, "malformed-request", "pcr_values"),
        ({"quote": {"attest": "AA==", "signature": "AA=="}}, 403,
         "request-signature-invalid", "signature"),
    ]:
        c = challenge()
        body = {**_renew_body(gw, c, device_id), **damage}
        assert_problem(post(registrar, session, f"/challenges/{c['challenge_id']}/renew",
                            body), status, code, detail)
    for parts, status, code, detail in [
        ({"ak_public": b"\x00\x02\x00"}, 400, "malformed-request",
         "ak_public: not a valid TPM2B_PUBLIC"),
        ({"tls_csr": b"\x30\x00"}, 400, "csr-invalid", "tls_csr"),
    ]:
        c = challenge()
        assert_problem(post(registrar, session, f"/challenges/{c['challenge_id']}/renew",
                            _renew_body(gw, c, device_id, **parts)), status, code, detail)
    decommission_challenge = challenge("decommission")
    assert_problem(post(registrar, session,
                        f"/challenges/{decommission_challenge['challenge_id']}/renew", good),
                   404, "challenge-unknown", "not issued for renew")
    assert_problem(post(registrar, session, "/challenges/nothex/renew", good), 404,
                   "challenge-unknown")
    assert_problem(post(registrar, session,
                        f"/challenges/{challenge('decommission')['challenge_id']}/decommission",
                        {"signature": "***"}), 400, "malformed-request", "signature")
    assert_problem(post(registrar, session,
                        f"/challenges/{challenge('decommission')['challenge_id']}/decommission",
                        {"signature": b64(b"\x30\x00")}), 403, "request-signature-invalid")

    # Nothing changed: still active, never renewed, nothing revoked, the audit chain intact.
    [device] = registrar.devices()
    assert device["status"] == "active" and device["renewals"] == 0
    crl = session.get(f"{registrar.url}/v1/crl", verify=str(registrar.ca), timeout=10)
    assert len(x509.load_der_x509_crl(crl.content)) == 0
    assert registrar.cli("audit", "verify", "--dir", str(registrar.directory)).returncode == 0
    assert not [r for r in registrar.audit() if r["event"] == "certificate-renewed"]
