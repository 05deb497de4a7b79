"""A gateway driven step by step, to put crafted messages on the wire in tests.

It uses the agent's own pieces (TpmCustody, the TPM port, the HTTPS client)
so the honest path is exactly the agent's, and each test changes one thing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agent.enroll.client import EndorsementEvidence
from agent.enroll.evidence import activation_proof
from agent.enroll.http import RegistrarClient
from agent.enroll.messages import Challenge, CompleteRequest, StartRequest
from agent.enroll.tpmport import CustodyTpm
from agent.tpm.custody import TpmCustody


async def _direct(fn: Any, *args: Any) -> Any:
    return fn(*args)


class Gateway:
    def __init__(self, tcti: str, state_dir: Path, url: str, ca: Path) -> None:
        self.custody = TpmCustody.open(tcti, state_dir)
        self.tpm = CustodyTpm(self.custody, _direct)
        self.client = RegistrarClient(url, ca, timeout=20)
        self.evidence: EndorsementEvidence = asyncio.run(self.tpm.endorsement())

    def close(self) -> None:
        self.client.close()
        self.custody.close()

    def start_request(self, token: str | None = None, **changes: Any) -> StartRequest:
        e = self.evidence
        fields = dict(ek_certificate=e.ek_certificate, ek_chain=list(e.ek_chain),
                      ek_public=e.ek_public, ak_public=e.ak_public, token=token)
        fields.update(changes)
        return StartRequest(**fields)

    def start(self, token: str | None = None, **changes: Any) -> Challenge:
        return self.client.start(self.start_request(token, **changes))

    def answer(self, challenge: Challenge, **changes: Any) -> CompleteRequest:
        """The honest answer to `challenge`, with `changes` applied."""
        secret = asyncio.run(self.tpm.activate(self.evidence.ek_kind, challenge.credential_blob,
                                               challenge.encrypted_secret))
        quote = asyncio.run(self.tpm.quote(challenge.nonce, challenge.pcr_selection.pcrs))
        fields: dict[str, Any] = dict(
            proof=activation_proof(secret.reveal(), challenge.challenge_id, challenge.nonce),
            quote=quote.evidence, pcr_values=list(quote.pcr_values),
            certify=asyncio.run(self.tpm.certify_identity(challenge.nonce)),
            identity_public=asyncio.run(self.tpm.identity_public()),
            csr=asyncio.run(self.tpm.identity_csr()))
        fields.update(changes)
        return CompleteRequest(**fields)

    def complete(self, challenge: Challenge, request: CompleteRequest | None = None) -> Any:
        return self.client.complete(challenge.challenge_id, request or self.answer(challenge))

    def enroll(self, token: str | None = None) -> Any:
        challenge = self.start(token)
        return self.complete(challenge)
