"""Every refusal the issue names, against a real registrar over HTTPS and real swtpms.

Each test changes one thing in an otherwise honest enrollment and asserts: the
registrar answers with that failure's own problem type, nothing is issued, and
the refusal is in the audit log.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from gateway import Gateway

from agent.errors import Problem

NO_TOKEN = {"require_token": "false"}


@pytest.fixture
def make_gateway(tmp_path):
    made = []

    def make(tpm, registrar, name="gw"):
        gw = Gateway(tpm.tcti, tmp_path / name, registrar.url, registrar.ca)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


def assert_refused(registrar, call, code, status=None):
    with pytest.raises(Problem) as exc:
        call()
    assert exc.value.code == code, exc.value
    if status is not None:
        assert exc.value.status == status
    records = registrar.audit()
    assert records[-1]["event"] == "enrollment-refused", records[-1]
    assert records[-1]["problem"] == code
    assert not [r for r in records if r["event"] == "certificate-issued"]
    assert registrar.devices() == []
    return exc.value


@pytest.fixture(params=["sqlite", "postgresql"])
def registrar_factory(request, registrar_factory, postgres):
    """Every refusal on both backends: the embedded SQLite file and PostgreSQL."""
    if request.param == "sqlite":
        return registrar_factory
    from postgres import registrar_toml

    return lambda *args, **kwargs: registrar_factory(*args, extra_toml=registrar_toml(postgres),
                                                     **kwargs)


def test_honest_gateway_is_issued_a_certificate_for_its_tpm_key(tpm, registrar_factory,
                                                                 make_gateway):
    registrar = registrar_factory([tpm.vendor_ca], settings=NO_TOKEN)
    gw = make_gateway(tpm, registrar)
    issued = gw.enroll()
    leaf = x509.load_pem_x509_certificates(issued.certificate_chain.encode())[0]
    identity = gw.custody.identity_key()
    assert leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == identity.public_key_der
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [issued.device_id]
    assert [d["device_id"] for d in registrar.devices()] == [issued.device_id]
    assert registrar.audit()[-1]["event"] == "certificate-issued"


def test_ek_from_untrusted_vendor_is_refused(tpm_factory, registrar_factory, make_gateway):
    ours, foreign = tpm_factory(), tpm_factory()
    registrar = registrar_factory([ours.vendor_ca], settings=NO_TOKEN)  # not foreign's vendor
    gw = make_gateway(foreign, registrar)
    p = assert_refused(registrar, gw.start, "ek-untrusted", 403)
    assert "does not chain to a trusted TPM vendor root" in p.message


def test_ek_public_area_not_matching_certificate_is_refused(tpm_factory, registrar_factory,
                                                            make_gateway):
    tpm, other = tpm_factory(), tpm_factory()
    registrar = registrar_factory([tpm.vendor_ca], settings=NO_TOKEN)
    gw, other_gw = make_gateway(tpm, registrar), make_gateway(other, registrar, "other")
    assert_refused(registrar, lambda: gw.start(ek_public=other_gw.evidence.ek_public),
                   "ek-mismatch")


def test_ak_without_restricted_attribute_is_refused(tpm, registrar_factory, make_gateway):
    registrar = registrar_factory([tpm.vendor_ca], settings=NO_TOKEN)
    gw = make_gateway(tpm, registrar)
    unrestricted = bytes(gw.custody.identity_key().public.marshal())  # a plain signing key
    p = assert_refused(registrar, lambda: gw.start(ak_public=unrestricted), "ak-invalid")
    assert "restricted" in p.message


def test_wrong_activation_proof_is_refused(tpm, registrar_factory, make_gateway):
    registrar = registrar_factory([tpm.vendor_ca], settings=NO_TOKEN)
    gw = make_gateway(tpm, registrar)
    challenge = gw.start()
    request = gw.answer(challenge, proof=b"\x00" * 32)
    assert_refused(registrar, lambda: gw.complete(challenge, request), "activation-failed")


def test_replayed_nonce_is_refused(tpm, registrar_factory, make_gateway):
    registrar = registrar_factory([tpm.vendor_ca], settings=NO_TOKEN)
    gw = make_gateway(tpm, registrar)
    old = gw.answer(gw.start())  # genuine evidence for a challenge that is then abandoned
    challenge = gw.start()
    replay = gw.answer(challenge, quote=old.quote, pcr_values=old.pcr_values)
    assert_refused(registrar, lambda: gw.complete(challenge, replay), "nonce-mismatch")
    challenge = gw.start()
    replay = gw.answer(challenge, certify=old.certify)
    assert_refused(registrar, lambda: gw.complete(challenge, replay), "nonce-mismatch")


def test_completed_challenge_cannot_be_answered_again(tpm, registrar_factory, make_gateway):
    registrar = registrar_factory([tpm.vendor_ca], settings=NO_TOKEN)
    gw = make_gateway(tpm, registrar)
    challenge = gw.start()
    request = gw.answer(challenge)
    gw.complete(challenge, request)
    with pytest.raises(Problem) as exc:
        gw.complete(challenge, request)
    assert (exc.value.code, exc.value.status) == ("challenge-used", 409)
    records = registrar.audit()
    assert records[-1]["problem"] == "challenge-used"
    assert len([r for r in records if r["event"] == "certificate-issued"]) == 1


def test_failed_challenge_cannot_be_retried(tpm, registrar_factory, make_gateway):
    registrar = registrar_factory([tpm.vendor_ca], settings=NO_TOKEN)
    gw = make_gateway(tpm, registrar)
    challenge = gw.start()
    assert_refused(registrar, lambda: gw.complete(challenge, gw.answer(challenge, proof=b"x")),
                   "activation-failed")
    assert_refused(registrar, lambda: gw.complete(challenge), "challenge-used")


def test_expired_challenge_is_refused(tpm, registrar_factory, make_gateway):
    registrar = registrar_factory([tpm.vendor_ca],
                                  settings={**NO_TOKEN, "challenge_ttl": '"1s"'})
    gw = make_gateway(tpm, registrar)
    challenge = gw.start()
    request = gw.answer(challenge)
    time.sleep(1.2)  # let the registrar's clock pass expires_at; no timing is asserted
    assert_refused(registrar, lambda: gw.complete(challenge, request), "challenge-expired", 410)


def test_pcr_values_outside_policy_are_refused(tpm, registrar_factory, make_gateway):
    registrar = registrar_factory([tpm.vendor_ca], settings=NO_TOKEN)
    gw = make_gateway(tpm, registrar)
    gw.custody.extend_pcr(7, b"an unexpected boot component")
    challenge = gw.start()
    p = assert_refused(registrar, lambda: gw.complete(challenge), "pcr-policy-violation")
    assert "PCRs [7] differ" in p.message
    assert '"7" = "' in p.message  # the quoted values, ready to paste into the policy


def test_quote_or_certify_signed_by_another_tpms_ak_is_refused(tpm_factory, registrar_factory,
                                                               make_gateway):
    tpm, other = tpm_factory(), tpm_factory()
    registrar = registrar_factory([tpm.vendor_ca], settings=NO_TOKEN)
    gw, intruder = make_gateway(tpm, registrar), make_gateway(other, registrar, "intruder")
    # The intruder TPM signs this challenge's nonce with its own AK.
    challenge = gw.start()
    quote = asyncio.run(intruder.tpm.quote(challenge.nonce, challenge.pcr_selection.pcrs))
    request = gw.answer(challenge, quote=quote.evidence, pcr_values=list(quote.pcr_values))
    assert_refused(registrar, lambda: gw.complete(challenge, request), "signature-invalid")
    challenge = gw.start()
    certify = asyncio.run(intruder.tpm.certify_identity(challenge.nonce))
    request = gw.answer(challenge, certify=certify)
    assert_refused(registrar, lambda: gw.complete(challenge, request), "signature-invalid")


def test_csr_for_another_key_is_refused(tpm, registrar_factory, make_gateway):
    registrar = registrar_factory([tpm.vendor_ca], settings=NO_TOKEN)
    gw = make_gateway(tpm, registrar)
    software_key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .sign(software_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    challenge = gw.start()
    assert_refused(registrar, lambda: gw.complete(challenge, gw.answer(challenge, csr=csr)),
                   "csr-key-mismatch")


def test_missing_token_is_refused(tpm, registrar_factory, make_gateway):
    registrar = registrar_factory([tpm.vendor_ca])  # require_token = true (the default)
    gw = make_gateway(tpm, registrar)
    assert_refused(registrar, gw.start, "token-required", 401)
    assert_refused(registrar, lambda: gw.start(token="x" * 43), "token-invalid", 403)


def test_token_is_single_use(tpm_factory, registrar_factory, make_gateway):
    first, second = tpm_factory(), tpm_factory()
    registrar = registrar_factory([first.vendor_ca, second.vendor_ca])
    token = registrar.token()
    make_gateway(first, registrar, "first").enroll(token)
    gw = make_gateway(second, registrar, "second")
    with pytest.raises(Problem) as exc:
        gw.start(token=token)
    assert exc.value.code == "token-used"
    records = registrar.audit()
    assert records[-1]["problem"] == "token-used"
    assert len(registrar.devices()) == 1


def test_token_is_consumed_only_by_a_successful_enrollment(tpm, registrar_factory,
                                                           make_gateway):
    registrar = registrar_factory([tpm.vendor_ca])
    token = registrar.token()
    gw = make_gateway(tpm, registrar)
    challenge = gw.start(token)
    with pytest.raises(Problem):
        gw.complete(challenge, gw.answer(challenge, proof=b"wrong"))
    gw.enroll(token)  # the failed attempt did not burn the operator's token
    assert len(registrar.devices()) == 1
