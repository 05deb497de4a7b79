"""The agent's side of enrollment: two round trips, with the TPM and the registrar injected.

`enroll` is a straight line through docs/protocol.md. It knows nothing about
threads, sockets or files: the TPM and registrar come in as small async
ports, so the daemon, the benchmark (which times each port) and tests can
drive it. What it returns has been checked: the certificate chains to the
pinned registrar CA, names the device the registrar announced, and certifies
this TPM's identity key.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from agent.enroll.evidence import activation_proof
from agent.enroll.messages import (
    Challenge,
    CompleteRequest,
    Evidence,
    Issued,
    Platform,
    StartRequest,
)
from agent.errors import ProtocolError
from agent.pki.certinfo import spki_der
from agent.pki.devicecert import check_device_chain, parse_chain
from agent.secret import SecretBytes


@dataclass(frozen=True)
class EndorsementEvidence:
    ek_certificate: bytes  # DER
    ek_chain: tuple[bytes, ...]  # DER intermediates from NV
    ek_public: bytes  # marshalled TPM2B_PUBLIC
    ak_public: bytes
    ek_kind: str  # which EK (e.g. EK-HIGH-ECC384), to activate with the same one


@dataclass(frozen=True)
class Quote:
    evidence: Evidence
    pcr_values: tuple[bytes, ...]


class EnrollmentTpm(Protocol):
    async def endorsement(self) -> EndorsementEvidence: ...
    async def activate(self, ek_kind: str, credential_blob: bytes,
                       encrypted_secret: bytes) -> SecretBytes: ...
    async def quote(self, nonce: bytes, pcrs: Sequence[int]) -> Quote: ...
    async def certify_identity(self, nonce: bytes) -> Evidence: ...
    async def identity_public(self) -> bytes: ...
    async def identity_csr(self) -> bytes: ...


class Registrar(Protocol):
    async def start(self, request: StartRequest) -> Challenge: ...
    async def complete(self, challenge_id: str, request: CompleteRequest) -> Issued: ...


@dataclass(frozen=True)
class EnrollmentResult:
    device_id: str
    chain: tuple[x509.Certificate, ...]  # leaf first
    serial: str

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc


async def enroll(tpm: EnrollmentTpm, registrar: Registrar, token: str | None,
                 pinned_ca: Sequence[x509.Certificate], skew: float = 0.0,
                 now: Callable[[], datetime.datetime] | None = None,
                 platform: Platform | None = None) -> EnrollmentResult:
    """One attested enrollment. `now` is the registrar's time as the caller estimates it
    (agent.rotation.registrarclock), to judge the issued certificate's validity."""
    ek = await tpm.endorsement()
    challenge = await registrar.start(StartRequest(
        ek_certificate=ek.ek_certificate, ek_chain=list(ek.ek_chain), ek_public=ek.ek_public,
        ak_public=ek.ak_public, token=token))

    secret = await tpm.activate(ek.ek_kind, challenge.credential_blob,
                                challenge.encrypted_secret)
    proof = activation_proof(secret.reveal(), challenge.challenge_id, challenge.nonce)
    quote = await tpm.quote(challenge.nonce, challenge.pcr_selection.pcrs)
    certify = await tpm.certify_identity(challenge.nonce)
    identity_public = await tpm.identity_public()
    csr = await tpm.identity_csr()

    issued = await registrar.complete(challenge.challenge_id, CompleteRequest(
        proof=proof, quote=quote.evidence, pcr_values=list(quote.pcr_values), certify=certify,
        identity_public=identity_public, csr=csr, platform=platform))
    return check_issued(issued, challenge.device_id, csr, pinned_ca,
                        now() if now is not None else None, skew)


def check_issued(issued: Issued, device_id: str, csr_der: bytes,
                 pinned_ca: Sequence[x509.Certificate],
                 now: datetime.datetime | None = None, skew: float = 0.0) -> EnrollmentResult:
    """Trust but verify: what the registrar returned is for us and chains to the pinned CA."""
    if issued.device_id != device_id:
        raise ProtocolError(f"the registrar issued for {issued.device_id}, expected {device_id}")
    chain = parse_chain(issued.certificate_chain, "identity")
    csr = x509.load_der_x509_csr(csr_der)
    check_device_chain(chain, "identity", device_id, spki_der(csr.public_key()), pinned_ca,
                       now or datetime.datetime.now(datetime.UTC), skew)
    return EnrollmentResult(device_id, chain, issued.serial)
