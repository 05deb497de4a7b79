"""The registrar's side of an enrolled device's life: renewal, decommissioning,
revocation and the CRL. Pure decisions with the parts injected, like enrollment.

A device asks for a nonce (`challenge`), then sends a request signed by the
TPM identity key certified at enrollment. A renewal also carries a fresh
quote by the enrolled AK, judged against the PCR policy exactly as at
enrollment, and a CSR for a new TLS key; both the identity and the TLS
certificate are re-issued. The order of checks is in docs/protocol.md.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.enroll import evidence
from agent.enroll.messages import (
    Decommissioned,
    DecommissionRequest,
    DeviceChallenge,
    DeviceChallengeRequest,
    Renewed,
    RenewRequest,
    decode,
)
from agent.enroll.problems import problem
from agent.errors import Problem
from agent.registrar.base import RegistrarParts, platform_json
from agent.registrar.pcrpolicy import judge_pcrs
from agent.registrar.sealedchallenge import (
    RANDOM_BYTES,
    ChallengeSealer,
    SealedChallenge,
    device_hash,
)
from agent.registrar.store import DeviceChallengeRow, DeviceRow

log = logging.getLogger(__name__)
M = TypeVar("M", RenewRequest, DecommissionRequest)
T = TypeVar("T")

REFUSED_EVENT = {"renew": "renewal-refused", "decommission": "decommission-refused"}
# RFC 5280 5.3.1 reason codes for the CRL; an operator's revocation says no more than
# the operator did (the reason text stays in the audit log).
CRL_REASONS = {"decommissioned": x509.ReasonFlags.cessation_of_operation,
               "superseded": x509.ReasonFlags.superseded}


def check_active(device: DeviceRow) -> DeviceRow:
    """Refuse a retired device. The operator's reason is not said: it is for the audit
    log and the admin CLI, not for whoever holds a challenge."""
    if device.status == "revoked":
        raise problem("device-revoked", f"{device.device_id} was revoked by the operator")
    if device.status == "decommissioned":
        raise problem("device-decommissioned", f"{device.device_id} was decommissioned")
    return device


class LifecycleService(RegistrarParts):
    def __init__(self, *args: Any, challenge_key: bytes | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Sealed challenges survive a restart only with the registrar's stored key.
        self.sealer = ChallengeSealer(challenge_key or self._random(32))

    # --- round trip 1: a nonce for a signed request ------------------------------

    def challenge(self, body: bytes, peer: str) -> DeviceChallenge:
        """A sealed challenge for any well-formed device ID: nothing is stored or looked
        up, so a flood costs nothing and a stranger learns nothing about the device."""
        device_id: str | None = None
        purpose = "renew"
        try:
            request = decode(DeviceChallengeRequest, body)
            device_id, purpose = request.device_id, request.purpose
            if device_hash(device_id) is None:
                raise problem("device-unknown", f"{device_id}: not a device ID this registrar "
                                                "issues (urn:devid: and 32 hex digits)")
            now = self._clock()
            expires = now + datetime.timedelta(seconds=self.config.challenge_ttl)
            sealed = self.sealer.seal(device_id, purpose, int(expires.timestamp()),
                                      self._random(RANDOM_BYTES))
        except Problem as p:
            self._refused(REFUSED_EVENT[purpose], "challenge", p, peer, device_id=device_id)
            raise
        return DeviceChallenge(challenge_id=sealed.id, device_id=device_id, purpose=purpose,
                               nonce=sealed.nonce,
                               expires_at=datetime.datetime.fromtimestamp(
                                   sealed.expires_at, datetime.UTC).isoformat(),
                               pcr_selection=self._pcr_selection())

    def _answer(self, challenge_id: str, purpose: str, model: type[M], body: bytes,
                peer: str, signed: Callable[[SealedChallenge, M], bytes],
                act: Callable[[SealedChallenge, DeviceRow, ec.EllipticCurvePublicKey, M,
                               datetime.datetime, str], T]) -> T:
        """Round trip 2 for either purpose, in the order of docs/protocol.md: open the
        sealed challenge, find the device, verify the identity key's signature over
        `signed(...)`, spend the challenge (single use), refuse a retired device, then
        `act`. Nothing is written before the signature verifies. Refusals are audited."""
        device_id: str | None = None
        spent = False
        try:
            request = decode(model, body)
            now = self._clock()
            challenge = self.sealer.open(challenge_id, purpose, now.timestamp())
            device_id = challenge.device_id
            device = self.store.device(device_id)
            if device is None:
                raise problem("device-unknown", f"{device_id}: not enrolled with this registrar")
            _, identity_key = evidence.check_identity_public(device.identity_public)
            evidence.check_request_signature(request.signature, signed(challenge, request),
                                             identity_key)
            self.store.spend_device_challenge(DeviceChallengeRow(
                challenge.id, device_id, purpose, challenge.nonce, now.timestamp(),
                float(challenge.expires_at)))
            spent = True
            check_active(device)
            return act(challenge, device, identity_key, request, now, peer)
        except Problem as p:
            if spent:
                self.store.settle_device_challenge(challenge_id, "failed")
            self._refused(REFUSED_EVENT[purpose], purpose, p, peer, challenge=challenge_id,
                          device_id=device_id)
            raise

    # --- round trip 2: renewal ----------------------------------------------------

    def renew(self, challenge_id: str, body: bytes, peer: str) -> Renewed:
        return self._answer(challenge_id, "renew", RenewRequest, body, peer,
                            lambda c, r: evidence.renewal_message(
                                c.device_id, c.id, c.nonce, r.quote.attest, r.tls_csr,
                                r.platform),
                            self._verify_and_renew)

    def _verify_and_renew(self, challenge: SealedChallenge, device: DeviceRow,
                          identity_key: ec.EllipticCurvePublicKey, request: RenewRequest,
                          now: datetime.datetime, peer: str) -> Renewed:
        # The identity key's signature was verified first (_answer). Then the renewal
        # rate: after authentication, so a stranger learns nothing
        # about a device's renewals, and before the quote and the two signatures, the
        # work a device renewing in a loop would cost.
        self._check_renewal_rate(device, now)
        ak_public, ak_key = evidence.check_ak_public(request.ak_public)
        if evidence.tpm_name(ak_public) != device.ak_name:
            raise problem("ak-unknown", "ak_public: not the AK activated at enrollment")
        pcrs = sorted(set(self.config.pcr_policy.pcrs))
        quote = evidence.verify_signed("quote", request.quote.attest, request.quote.signature,
                                       ak_key)
        evidence.check_quote(quote, challenge.nonce, pcrs, request.pcr_values)
        pcr_state = judge_pcrs(self.config.pcr_policy, request.pcr_values)
        tls_key = evidence.check_tls_csr(request.tls_csr)

        profile = self._profile(device.ek_certificate, request.platform)
        identity_cert, identity = self._issue(device.device_id, identity_key, "identity", now,
                                              profile)
        tls_cert, tls = self._issue(device.device_id, tls_key, "tls", now, profile)
        renewals = self.store.record_renewal(challenge.id, device.device_id, [identity, tls],
                                             now.isoformat(timespec="seconds"),
                                             platform_json(request.platform))
        not_after = tls_cert.not_valid_after_utc.isoformat(timespec="seconds")
        self.audit.append("certificate-renewed", challenge=challenge.id,
                          device_id=device.device_id, identity_serial=identity.serial,
                          tls_serial=tls.serial, not_after=not_after, pcr_state=pcr_state,
                          renewals=renewals, peer=peer)
        log.info("renewed %s until %s (identity %s, tls %s, PCR state %r)", device.device_id,
                 not_after, identity.serial, tls.serial, pcr_state)
        return Renewed(device_id=device.device_id,
                       identity_chain=self.ca.chain_pem(identity_cert),
                       tls_chain=self.ca.chain_pem(tls_cert), identity_serial=identity.serial,
                       tls_serial=tls.serial, not_after=not_after)

    def _check_renewal_rate(self, device: DeviceRow, now: datetime.datetime) -> None:
        """At most max_renewals_per_window renewals within any renewal_window: a few for
        retries after a fault, never a loop."""
        window, limit = self.config.effective_renewal_window(), \
            self.config.max_renewals_per_window
        if window <= 0:
            return
        recent = self.store.renewals_since(device.device_id, now.timestamp() - window)
        if len(recent) < limit:
            return
        # Allowed again once enough of the recent renewals have left the window.
        reopens = recent[len(recent) - limit] + window
        raise problem("renewal-too-early",
                      f"{device.device_id} renewed {len(recent)} times in the last "
                      f"{window:g}s, the last {max(now.timestamp() - recent[-1], 0):.0f}s ago; "
                      f"this registrar allows {limit} renewal{'s' if limit > 1 else ''} per "
                      f"{window:g}s",
                      retry_after=max(reopens - now.timestamp(), 1.0))

    # --- round trip 2: decommissioning ---------------------------------------------

    def decommission(self, challenge_id: str, body: bytes, peer: str) -> Decommissioned:
        return self._answer(challenge_id, "decommission", DecommissionRequest, body, peer,
                            lambda c, _r: evidence.device_request_message(
                                "decommission", c.device_id, c.id, c.nonce),
                            self._retire)

    def _retire(self, challenge: SealedChallenge, device: DeviceRow,
                _identity_key: ec.EllipticCurvePublicKey, _request: DecommissionRequest,
                now: datetime.datetime, peer: str) -> Decommissioned:
        serials = self.store.retire_device(device.device_id, "decommissioned",
                                           "requested by the device", now.timestamp())
        self.store.settle_device_challenge(challenge.id, "completed")
        self.audit.append("device-decommissioned", device_id=device.device_id,
                          revoked=serials, peer=peer)
        log.info("decommissioned %s at its request; revoked %d certificates",
                 device.device_id, len(serials))
        return Decommissioned(device_id=device.device_id, revoked_serials=serials)

    # --- operator actions and relying parties -----------------------------------------

    def revoke(self, device_id: str, reason: str, operator: str) -> list[str]:
        """Cut a device off: no more renewals, its unexpired certificates in the CRL."""
        serials = self.store.retire_device(device_id, "revoked", reason,
                                           self._clock().timestamp())
        self.audit.append("device-revoked", device_id=device_id, reason=reason,
                          revoked=serials, operator=operator)
        log.warning("revoked %s (%s); %d certificates now on the CRL", device_id, reason,
                    len(serials))
        return serials

    def crl(self) -> x509.CertificateRevocationList:
        now = self._clock()
        entries = [(int(c.serial, 16),
                    datetime.datetime.fromtimestamp(c.revoked_at or 0, datetime.UTC),
                    CRL_REASONS.get(c.reason or ""))
                   for c in self.store.revoked_certificates(now.timestamp())]
        return self.ca.crl(entries, now, datetime.timedelta(seconds=self.config.crl_next_update))

    def crl_der(self) -> bytes:
        return self.crl().public_bytes(serialization.Encoding.DER)
