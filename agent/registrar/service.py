"""The registrar's enrollment decisions, with store, CA, audit log, clock and RNG injected.

No HTTP here: `start` and `complete` take request bodies and return messages
or raise a Problem. Every decision is written to the audit log: a challenge
issued, a certificate issued, or a refusal with its problem type and detail.
The order of checks is the one in docs/protocol.md.
"""

from __future__ import annotations

import datetime
import hashlib
import logging

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC, TPMT_PUBLIC
from tpm2_pytss.utils import make_credential

from agent.enroll import evidence
from agent.enroll.messages import (
    Challenge,
    CompleteRequest,
    Issued,
    StartRequest,
    decode,
)
from agent.enroll.problems import problem
from agent.errors import Problem
from agent.pki.certinfo import public_key_sha256
from agent.pki.ekchain import tpm_claims, verify_ek_chain
from agent.registrar.base import NONCE_BYTES, RegistrarParts, platform_json
from agent.registrar.pcrpolicy import judge_pcrs
from agent.registrar.store import ChallengeRow, DeviceRow

log = logging.getLogger(__name__)

DEVICE_ID_PREFIX = "urn:devid:"
SECRET_BYTES = 32


def device_id_for(ek_certificate: x509.Certificate) -> str:
    """Stable device ID: a hash of the EK's public key (so another TPM is another device)."""
    return DEVICE_ID_PREFIX + public_key_sha256(ek_certificate)[:32]


def token_hash(token: str) -> str:
    # Tokens carry 256 bits of entropy, so an unsalted hash is enough to make a
    # stolen database useless for enrolling.
    return hashlib.sha256(token.encode()).hexdigest()


def _parse_certificate(der: bytes, field: str) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise problem("malformed-request", f"{field}: not a DER X.509 certificate") from None
    try:
        cert.public_key()  # parsed lazily: a bad key would surface later as a 500
    except (ValueError, UnsupportedAlgorithm):
        raise problem("malformed-request", f"{field}: unsupported or malformed public key") \
            from None
    return cert


class EnrollmentService(RegistrarParts):
    # --- round trip 1 ------------------------------------------------------------

    def start(self, body: bytes, peer: str) -> Challenge:
        device_id: str | None = None
        try:
            request = decode(StartRequest, body)
            now = self._clock()
            self._check_token(request.token, now.timestamp())
            ek_cert = _parse_certificate(request.ek_certificate, "ek_certificate")
            device_id = device_id_for(ek_cert)
            chain = [_parse_certificate(c, f"ek_chain[{i}]")
                     for i, c in enumerate(request.ek_chain)]
            assert self.trust is not None
            verdict = verify_ek_chain(ek_cert, self.trust, chain, now)
            if not verdict.verified:
                raise problem("ek-untrusted", f"ek_certificate: {verdict.reason}")
            ek_public = evidence.check_ek_public(request.ek_public, ek_cert)
            ak_public, _ = evidence.check_ak_public(request.ak_public)
            known = self.store.device(device_id)
            if known is not None and known.status == "revoked":
                raise problem("device-revoked", f"{device_id} was revoked")
            if self.store.pending_challenges(now.timestamp()) >= \
                    self.config.max_pending_challenges:
                raise problem("registrar-busy", "too many enrollments in progress",
                              retry_after=5.0)
            return self._issue_challenge(request, ek_cert, ek_public, ak_public, device_id,
                                         now, peer)
        except Problem as p:
            self._refused("enrollment-refused", "start", p, peer, device_id=device_id)
            raise

    def _check_token(self, token: str | None, now: float) -> None:
        if token is None:
            if self.config.require_token:
                raise problem("token-required", "token: missing")
            return
        self.store.check_token(token_hash(token), now)

    def _issue_challenge(self, request: StartRequest, ek_cert: x509.Certificate,
                         ek_public: TPMT_PUBLIC, ak_public: TPMT_PUBLIC, device_id: str,
                         now: datetime.datetime, peer: str) -> Challenge:
        secret, nonce = self._random(SECRET_BYTES), self._random(NONCE_BYTES)
        challenge_id = self._new_challenge_id()
        try:
            blob, encrypted = make_credential(TPM2B_PUBLIC(publicArea=ek_public), secret,
                                              TPM2B_NAME(evidence.tpm_name(ak_public)))
        except (ValueError, TypeError) as e:
            raise problem("ek-mismatch", f"ek_public: cannot make a credential for it: {e}") \
                from None
        expires = now + datetime.timedelta(seconds=self.config.challenge_ttl)
        self.store.add_challenge(ChallengeRow(
            id=challenge_id, device_id=device_id, ek_certificate=request.ek_certificate,
            ak_public=request.ak_public, secret=secret, nonce=nonce,
            token_hash=token_hash(request.token) if request.token else None,
            created_at=now.timestamp(), expires_at=expires.timestamp()))
        self.audit.append("challenge-issued", challenge=challenge_id, device_id=device_id,
                          ek_issuer=ek_cert.issuer.rfc4514_string(), peer=peer)
        return Challenge(
            challenge_id=challenge_id, device_id=device_id,
            credential_blob=bytes(blob.marshal()), encrypted_secret=bytes(encrypted.marshal()),
            nonce=nonce, expires_at=expires.isoformat(timespec="seconds"),
            pcr_selection=self._pcr_selection())

    # --- round trip 2 ------------------------------------------------------------

    def complete(self, challenge_id: str, body: bytes, peer: str) -> Issued:
        device_id: str | None = None
        claimed = False
        try:
            request = decode(CompleteRequest, body)
            now = self._clock()
            challenge = self.store.claim_challenge(challenge_id, now.timestamp())
            claimed, device_id = True, challenge.device_id
            issued = self._verify_and_issue(challenge, request, now, peer)
        except Problem as p:
            if claimed:
                self.store.fail_challenge(challenge_id)
            self._refused("enrollment-refused", "complete", p, peer, challenge=challenge_id,
                          device_id=device_id)
            raise
        return issued

    def _verify_and_issue(self, challenge: ChallengeRow, request: CompleteRequest,
                          now: datetime.datetime, peer: str) -> Issued:
        nonce = challenge.nonce
        ak_public, ak_key = evidence.check_ak_public(challenge.ak_public)
        evidence.check_proof(request.proof, challenge.secret, challenge.id, nonce)
        pcrs = sorted(set(self.config.pcr_policy.pcrs))
        quote = evidence.verify_signed("quote", request.quote.attest, request.quote.signature,
                                       ak_key)
        evidence.check_quote(quote, nonce, pcrs, request.pcr_values)
        pcr_state = judge_pcrs(self.config.pcr_policy, request.pcr_values)
        certify = evidence.verify_signed("certify", request.certify.attest,
                                         request.certify.signature, ak_key)
        identity_public, identity_key = evidence.check_identity_public(request.identity_public)
        evidence.check_certify(certify, nonce, identity_public)
        evidence.check_csr(request.csr, identity_key)

        cert, record = self._issue(challenge.device_id, identity_key, "identity", now,
                                   self._profile(challenge.ek_certificate, request.platform))
        ek_cert = x509.load_der_x509_certificate(challenge.ek_certificate)
        serial = record.serial
        not_after = cert.not_valid_after_utc.isoformat(timespec="seconds")
        stamp = now.isoformat(timespec="seconds")
        enrolled = self.store.complete_enrollment(challenge, DeviceRow(
            device_id=challenge.device_id, ek_certificate=challenge.ek_certificate,
            ak_name=evidence.tpm_name(ak_public), identity_public=request.identity_public,
            status="active", tpm_manufacturer=tpm_claims(ek_cert).manufacturer,
            enrolled_at=stamp, updated_at=stamp, enrollments=1, cert_serial=serial,
            cert_not_after=not_after, platform=platform_json(request.platform)), record,
            now.timestamp())
        if enrolled.superseded:
            # The TPM enrolled again (wiped agent state, a new token): its earlier keys
            # cannot renew any more, so their certificates must not stay valid either.
            self.audit.append("certificates-superseded", device_id=challenge.device_id,
                              revoked=enrolled.superseded, enrollments=enrolled.enrollments)
            log.warning("%s enrolled again: %d earlier certificates put on the CRL",
                        challenge.device_id, len(enrolled.superseded))
        self.audit.append("certificate-issued", challenge=challenge.id,
                          device_id=challenge.device_id, serial=serial, not_after=not_after,
                          pcr_state=pcr_state, enrollments=enrolled.enrollments,
                          platform=platform_json(request.platform), peer=peer)
        log.info("issued %s to %s (serial %s, PCR state %r)", not_after, challenge.device_id,
                 serial, pcr_state)
        return Issued(device_id=challenge.device_id, certificate_chain=self.ca.chain_pem(cert),
                      serial=serial, not_after=not_after)
