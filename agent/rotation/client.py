"""The agent's side of renewal and decommissioning, with TPM and registrar injected.

`renew` is one re-attested rotation (docs/protocol.md, "Renewal"):

1. ask the registrar for a nonce;
2. make a fresh TLS key and its CSR; quote the PCRs over the nonce with the AK;
   sign (nonce, quote, CSR) with the identity key;
3. seal the TLS key to the TPM, before anything is sent, so that what comes
   back can be stored at once;
4. send it; check both returned chains (our keys, our device ID, the pinned CA).

Like `enroll`, it knows nothing about threads, sockets or files. `progress`
is told each step's name as it completes: the daemon logs it and uses it
for fault injection in the crash tests.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.enroll.client import Quote
from agent.enroll.evidence import device_request_message, renewal_message
from agent.enroll.messages import (
    Decommissioned,
    DecommissionRequest,
    DeviceChallenge,
    DeviceChallengeRequest,
    Platform,
    Renewed,
    RenewRequest,
)
from agent.errors import ProtocolError
from agent.pki.certinfo import spki_der
from agent.pki.devicecert import check_device_chain, parse_chain
from agent.rotation.tlskey import key_to_secret, new_tls_key, tls_csr
from agent.secret import SecretBytes
from agent.tpm.blobs import KeyBlob

Progress = Callable[[str], None]
# The steps `progress` reports, in order (the crash tests kill the agent after each).
RENEWAL_STEPS = ("challenged", "quoted", "signed", "sealed", "issued", "checked")


class RenewalTpm(Protocol):
    async def quote(self, nonce: bytes, pcrs: Sequence[int]) -> Quote: ...
    async def attestation_public(self) -> bytes: ...
    async def identity_public_der(self) -> bytes: ...
    async def sign(self, message: bytes) -> bytes: ...
    async def seal(self, secret: SecretBytes) -> KeyBlob: ...


class LifecycleRegistrar(Protocol):
    async def challenge(self, request: DeviceChallengeRequest) -> DeviceChallenge: ...
    async def renew(self, challenge_id: str, request: RenewRequest) -> Renewed: ...
    async def decommission(self, challenge_id: str,
                           request: DecommissionRequest) -> Decommissioned: ...


@dataclass(frozen=True)
class RenewalResult:
    identity_chain: tuple[x509.Certificate, ...]
    tls_chain: tuple[x509.Certificate, ...]
    tls_key: ec.EllipticCurvePrivateKey
    sealed_tls_key: KeyBlob
    identity_serial: str
    tls_serial: str


def _ignore(_step: str) -> None:
    pass


async def renew(tpm: RenewalTpm, registrar: LifecycleRegistrar, device_id: str,
                pinned_ca: Sequence[x509.Certificate], now: Callable[[], datetime.datetime],
                skew: float = 0.0, progress: Progress = _ignore,
                platform: Platform | None = None) -> RenewalResult:
    challenge = await registrar.challenge(DeviceChallengeRequest(device_id=device_id,
                                                                 purpose="renew"))
    _check_challenge(challenge, device_id, "renew")
    progress("challenged")
    key = new_tls_key()
    csr = tls_csr(key)
    quote = await tpm.quote(challenge.nonce, challenge.pcr_selection.pcrs)
    progress("quoted")
    message = renewal_message(device_id, challenge.challenge_id, challenge.nonce,
                              quote.evidence.attest, csr, platform)
    signature = await tpm.sign(message)
    progress("signed")
    sealed = await tpm.seal(key_to_secret(key))
    progress("sealed")
    renewed = await registrar.renew(challenge.challenge_id, RenewRequest(
        ak_public=await tpm.attestation_public(), quote=quote.evidence,
        pcr_values=list(quote.pcr_values), tls_csr=csr, signature=signature,
        platform=platform))
    progress("issued")
    if renewed.device_id != device_id:
        raise ProtocolError(f"the registrar renewed {renewed.device_id}, expected {device_id}")
    identity_chain = parse_chain(renewed.identity_chain, "identity")
    tls_chain = parse_chain(renewed.tls_chain, "TLS")
    at = now()
    check_device_chain(identity_chain, "identity", device_id, await tpm.identity_public_der(),
                       pinned_ca, at, skew)
    check_device_chain(tls_chain, "TLS", device_id, spki_der(key.public_key()), pinned_ca, at,
                       skew)
    progress("checked")
    return RenewalResult(identity_chain, tls_chain, key, sealed, renewed.identity_serial,
                         renewed.tls_serial)


async def decommission(tpm: RenewalTpm, registrar: LifecycleRegistrar,
                       device_id: str) -> Decommissioned:
    """Ask the registrar to retire this device, signed by the identity key."""
    challenge = await registrar.challenge(DeviceChallengeRequest(device_id=device_id,
                                                                 purpose="decommission"))
    _check_challenge(challenge, device_id, "decommission")
    message = device_request_message("decommission", device_id, challenge.challenge_id,
                                     challenge.nonce)
    done = await registrar.decommission(challenge.challenge_id, DecommissionRequest(
        signature=await tpm.sign(message)))
    if done.device_id != device_id:
        raise ProtocolError(f"the registrar decommissioned {done.device_id}, expected "
                            f"{device_id}")
    return done


def _check_challenge(challenge: DeviceChallenge, device_id: str, purpose: str) -> None:
    if challenge.device_id != device_id or challenge.purpose != purpose:
        raise ProtocolError(f"the registrar sent a {challenge.purpose} challenge for "
                            f"{challenge.device_id}, expected {purpose} for {device_id}")
