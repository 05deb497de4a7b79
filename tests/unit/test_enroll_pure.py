"""Pure enrollment logic: messages, problems, EK policy, PCR policy, audit log, docs in step."""

from __future__ import annotations

import datetime
import json
import threading
from pathlib import Path

import pytest
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.internal.templates import template_policy

from agent.audit import AuditLog
from agent.enroll.http import retry_after_seconds
from agent.enroll.messages import StartRequest, decode, encode
from agent.enroll.problems import PROBLEM_TYPES, problem, problem_document, problem_from_document
from agent.errors import Problem, ProtocolError
from agent.registrar import openapi
from agent.registrar.config import AllowedPcrs, PcrPolicyConfig
from agent.registrar.pcrpolicy import judge_pcrs
from agent.tpm.ekpolicy import ek_policy, policy_a, policy_b

DOCS = Path(__file__).resolve().parents[2] / "docs"


# --- messages -------------------------------------------------------------------


def test_messages_round_trip_through_json():
    request = StartRequest(ek_certificate=b"\x30\x01", ek_public=b"\x00\x01", ak_public=b"\x02",
                           token="t" * 20)
    again = decode(StartRequest, json.dumps(encode(request)).encode())
    assert again == request


@pytest.mark.parametrize("body, needle", [
    (b"{", "body: not valid JSON"),
    (b'"x"', "expected a JSON object, got str"),
    (b'{"ek_certificate": "AA==", "ek_public": "AA==", "ak_public": "A A="}',
     "ak_public: not valid base64"),
    (b'{"ek_certificate": "AA==", "ek_public": "AA==", "ak_public": 5}',
     "ak_public: expected a base64 string, got int"),
    (b'{"ek_certificate": "AA==", "ek_public": "AA==", "ak_public": "AA==", "ek_chain": [1]}',
     "ek_chain[0]: expected a base64 string"),
    (b'{"ek_certificate": "", "ek_public": "AA==", "ak_public": "AA=="}',
     "ek_certificate: must not be empty"),
])
def test_bad_messages_are_refused_naming_the_field(body, needle):
    with pytest.raises(Problem) as exc:
        decode(StartRequest, body)
    assert exc.value.code == "malformed-request"
    assert needle in exc.value.message


def test_responses_decode_with_the_callers_error_type():
    with pytest.raises(ProtocolError):
        decode(StartRequest, b"[]", ProtocolError)


# --- problems --------------------------------------------------------------------


def test_problem_documents_round_trip():
    p = problem("registrar-busy", "too many", retry_after=5)
    doc = problem_document(p, "/v1/enrollments")
    assert doc["type"] == "urn:devid:problem:registrar-busy" and doc["status"] == 503
    back = problem_from_document(doc, 503)
    assert (back.code, back.message, back.hint) == (p.code, p.message, p.hint)


def test_every_problem_type_is_documented():
    text = (DOCS / "protocol.md").read_text()
    missing = [code for code in PROBLEM_TYPES if f"| `{code}` |" not in text]
    assert not missing, f"add to docs/protocol.md: {missing}"


def test_openapi_document_is_current():
    assert (DOCS / "openapi.json").read_text() == openapi.render(), \
        "regenerate: python -m agent.registrar.openapi > docs/openapi.json"


@pytest.mark.parametrize("header, seconds", [
    ("7", 7.0), (None, None), ("soon", None),
    ("Sat, 21 Nov 2026 12:00:10 GMT", 10.0),
])
def test_retry_after_is_parsed_as_seconds_or_http_date(header, seconds):
    now = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC).timestamp()
    assert retry_after_seconds(header, now) == seconds


# --- EK policy -------------------------------------------------------------------


def test_ek_policies_match_the_tcg_template_values():
    assert policy_a(TPM2_ALG.SHA256) == template_policy.low
    for alg, expected in ((TPM2_ALG.SHA256, template_policy.sha256),
                          (TPM2_ALG.SHA384, template_policy.sha384),
                          (TPM2_ALG.SHA512, template_policy.sha512)):
        assert policy_b(alg) == expected
        assert len(ek_policy(alg, expected).or_branches) == 2
    assert ek_policy(TPM2_ALG.SHA256, template_policy.low).or_branches == ()
    with pytest.raises(ValueError, match="vendor-specific"):
        ek_policy(TPM2_ALG.SHA256, b"\x01" * 32)


# --- PCR policy ------------------------------------------------------------------

ZERO, ONE = "00" * 32, "11" * 32


def _policy(mode="enforce", allowed=({"0": ZERO, "7": ZERO},)):
    return PcrPolicyConfig(mode=mode, pcrs=[0, 7], allowed=[
        AllowedPcrs(name=f"set{i}", values=v) for i, v in enumerate(allowed)])


def test_pcr_values_matching_an_allowed_set_pass_with_its_name():
    assert judge_pcrs(_policy(), [bytes(32), bytes(32)]) == "set0"


def test_pcr_violation_names_the_differing_pcrs_and_shows_values():
    with pytest.raises(Problem) as exc:
        judge_pcrs(_policy(), [bytes(32), bytes.fromhex(ONE)])
    assert exc.value.code == "pcr-policy-violation"
    assert "PCRs [7] differ from the closest allowed set 'set0'" in exc.value.message
    assert f'"7" = "{ONE}"' in exc.value.message


def test_permissive_mode_accepts_any_values():
    assert judge_pcrs(_policy("permissive"), [bytes(32), bytes.fromhex(ONE)]) == "permissive"


def test_policy_sets_must_cover_exactly_the_selection():
    with pytest.raises(ValueError, match="must give exactly PCRs"):
        _policy(allowed=({"0": ZERO},))


# --- audit log ---------------------------------------------------------------------


@pytest.fixture
def audit(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    for i in range(5):
        log.append("event", n=i)
    return log


def test_intact_audit_log_verifies(audit):
    verdict = audit.verify()
    assert verdict.ok and verdict.records == 5
    assert (audit.path.stat().st_mode & 0o777) == 0o600


def test_edited_line_is_detected(audit):
    lines = audit.path.read_text().splitlines()
    lines[2] = lines[2].replace('"n":2', '"n":9')
    audit.path.write_text("\n".join(lines) + "\n")
    verdict = audit.verify()
    assert not verdict.ok and "line 3: hash mismatch" in verdict.problem


def test_deleted_line_is_detected(audit):
    lines = audit.path.read_text().splitlines()
    del lines[1]
    audit.path.write_text("\n".join(lines) + "\n")
    verdict = audit.verify()
    assert not verdict.ok and "line 2: chain broken" in verdict.problem


def test_removed_tail_is_detected(audit):
    lines = audit.path.read_text().splitlines()
    audit.path.write_text("\n".join(lines[:-1]) + "\n")
    verdict = audit.verify()
    assert not verdict.ok and "lines removed from the end" in verdict.problem


def test_concurrent_appends_keep_one_chain(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    writers = [threading.Thread(target=lambda: [log.append("e") for _ in range(25)])
               for _ in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert log.verify().ok and log.verify().records == 100
