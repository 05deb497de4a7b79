"""The TPM side of enrollment and renewal: TpmCustody behind the async EnrollmentTpm
and RenewalTpm ports.

`run` executes a blocking custody call off the event loop (the daemon passes
its single TPM worker thread), so TPM commands never run concurrently.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization

from agent.enroll.client import EndorsementEvidence, Quote
from agent.enroll.evidence import pcr_digest, quoted_pcr_digest
from agent.enroll.messages import Evidence
from agent.errors import TpmError
from agent.secret import SecretBytes
from agent.tpm.blobs import KeyBlob
from agent.tpm.custody import AK_BLOB, IDENTITY_BLOB, TpmCustody
from agent.tpm.ek import EndorsementKey

Runner = Callable[..., Awaitable[Any]]
QUOTE_ATTEMPTS = 3


class CustodyTpm:
    def __init__(self, custody: TpmCustody, run: Runner,
                 seal_pcrs: Sequence[int] = (0, 1, 2, 3, 4, 5, 6, 7)) -> None:
        self._custody = custody
        self._run = run
        self._seal_pcrs = tuple(seal_pcrs)
        self._eks: dict[str, EndorsementKey] = {}

    async def endorsement(self) -> EndorsementEvidence:
        # Only the preferred EK: recreating an RSA EK costs seconds on a real TPM.
        ek = (await self._run(self._custody.endorsement_keys, 1))[0]
        self._eks[ek.kind] = ek
        chain = await self._run(self._custody.ek_chain_certificates)
        ak = self._custody.stored_key(AK_BLOB)
        return EndorsementEvidence(
            ek_certificate=ek.certificate.public_bytes(serialization.Encoding.DER),
            ek_chain=tuple(c.public_bytes(serialization.Encoding.DER) for c in chain),
            ek_public=bytes(ek.public.marshal()), ak_public=bytes(ak.public.marshal()),
            ek_kind=ek.kind)

    async def activate(self, ek_kind: str, credential_blob: bytes,
                       encrypted_secret: bytes) -> SecretBytes:
        ek = self._eks[ek_kind]
        result: SecretBytes = await self._run(self._custody.activate_credential, ek,
                                              credential_blob, encrypted_secret)
        return result

    async def quote(self, nonce: bytes, pcrs: Sequence[int]) -> Quote:
        # The quote signs a digest of the PCRs; the values are read after it, and must
        # hash to the quoted digest (else an extend came in between: quote again).
        for _ in range(QUOTE_ATTEMPTS):
            attestation = await self._run(self._custody.quote, nonce, pcrs)
            values = await self._run(self._custody.read_pcrs, pcrs)
            if quoted_pcr_digest(attestation.attest) == pcr_digest(values):
                return Quote(Evidence(attest=attestation.attest,
                                      signature=attestation.signature.tpmt), tuple(values))
        raise TpmError(f"PCRs {list(pcrs)} kept changing while quoting; try again later")

    async def certify_identity(self, nonce: bytes) -> Evidence:
        attestation = await self._run(self._custody.certify_identity, nonce)
        return Evidence(attest=attestation.attest, signature=attestation.signature.tpmt)

    # The public areas come from the key blobs (no TPM command): connecting proved they
    # load, and the registrar checks TPM2_Certify and every signature against them.

    async def identity_public(self) -> bytes:
        return bytes(self._custody.stored_key(IDENTITY_BLOB).public.marshal())

    async def identity_csr(self) -> bytes:
        csr: bytes = await self._run(self._custody.identity_csr)
        return csr

    # --- renewal ---------------------------------------------------------------

    async def attestation_public(self) -> bytes:
        return bytes(self._custody.stored_key(AK_BLOB).public.marshal())

    async def identity_public_der(self) -> bytes:
        return self._custody.stored_key(IDENTITY_BLOB).public_key_der

    async def sign(self, message: bytes) -> bytes:
        signature = await self._run(self._custody.sign, message)
        return bytes(signature.der)

    async def seal(self, secret: SecretBytes) -> KeyBlob:
        blob: KeyBlob = await self._run(self._custody.seal, secret, self._seal_pcrs)
        return blob

    async def unseal(self, blob: KeyBlob) -> SecretBytes:
        secret: SecretBytes = await self._run(self._custody.unseal, blob)
        return secret
