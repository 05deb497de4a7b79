"""The registrar's problem types: one stable code per reason for refusing.

The HTTP `type` is PROBLEM_URN_PREFIX + code. The title is the same for every
instance of a type; the `detail` says what exactly was wrong; the hint tells
the engineer at the gateway what to do. docs/protocol.md lists them all (a
test keeps the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import Problem

PROBLEM_URN_PREFIX = "urn:devid:problem:"
PROBLEM_CONTENT_TYPE = "application/problem+json"


@dataclass(frozen=True)
class ProblemType:
    code: str
    status: int
    title: str
    hint: str


_TYPES = (
    # malformed requests
    ProblemType("malformed-request", 400, "The request is not a valid enrollment message",
                "a client/registrar version mismatch or a corrupted request; see detail"),
    ProblemType("unsupported-media-type", 415, "Request body must be application/json",
                "send Content-Type: application/json"),
    ProblemType("body-too-large", 413, "The request body exceeds the registrar's limit",
                "enrollment messages are a few kilobytes; check what the client sends"),
    ProblemType("not-found", 404, "No such resource", "check the registrar URL"),
    ProblemType("method-not-allowed", 405, "The resource does not take this method",
                "the Allow header lists the methods it takes (docs/openapi.json)"),
    # tokens
    ProblemType("token-required", 401, "This registrar requires an enrollment token",
                "create one with `devid-registrar token create` and set [enrollment] token"),
    ProblemType("token-invalid", 403, "The enrollment token is unknown or expired",
                "create a new token with `devid-registrar token create`"),
    ProblemType("token-used", 403, "The enrollment token was already used",
                "tokens are single-use; create a new one for this gateway"),
    # endorsement
    ProblemType("ek-untrusted", 403, "The EK certificate does not chain to a trusted TPM vendor",
                "add the TPM vendor's root CA to the registrar's ek_roots if this vendor is "
                "trusted; otherwise this TPM is not acceptable"),
    ProblemType("ek-mismatch", 403, "The EK public area does not match the EK certificate",
                "the EK certificate belongs to another TPM; do not enroll this device"),
    ProblemType("ak-invalid", 403, "The attestation key lacks required attributes",
                "the AK must be a restricted ECC signing key with fixedTPM, fixedParent and "
                "sensitiveDataOrigin; the gateway's TPM state may have been tampered with"),
    ProblemType("device-revoked", 403, "This device has been revoked",
                "a revoked device cannot renew or re-enroll; ask the fleet operator"),
    ProblemType("device-decommissioned", 403, "This device was decommissioned",
                "it no longer renews; to return it to service, enroll it again with a new "
                "token"),
    ProblemType("device-unknown", 404, "No such enrolled device",
                "the registrar has no record of this device; enroll it (again)"),
    # challenge
    ProblemType("challenge-unknown", 404, "No such challenge",
                "ask for a new challenge (start a new enrollment or renewal)"),
    ProblemType("challenge-expired", 410, "The challenge has expired",
                "ask for a new challenge; check the gateway's TPM speed and network latency"),
    ProblemType("challenge-used", 409, "The challenge was already used",
                "each challenge answers once; ask for a new one"),
    ProblemType("activation-failed", 403, "The credential activation proof is wrong",
                "the AK is not in the TPM whose EK was presented"),
    ProblemType("nonce-mismatch", 403, "The evidence does not carry this challenge's nonce",
                "stale or replayed evidence; start a new enrollment"),
    ProblemType("evidence-invalid", 403, "A quote or certification is not valid TPM evidence",
                "the evidence was not produced by a TPM for this request; see detail"),
    ProblemType("signature-invalid", 403, "The evidence is not signed by the enrolling AK",
                "quote and certify must be signed by the AK that was activated"),
    ProblemType("ak-unknown", 403, "The attestation key is not the one this device enrolled "
                "with", "the gateway's TPM keys were replaced since enrollment; decommission "
                "the device and enroll it again"),
    ProblemType("request-signature-invalid", 403,
                "The request is not signed by the device's identity key",
                "renewal and decommission requests must be signed by the TPM identity key "
                "that was certified at enrollment"),
    ProblemType("pcr-policy-violation", 403, "The platform state is outside the registrar's policy",
                "the quoted PCR values are not in any allowed set: the boot chain changed; if "
                "the new state is trusted, add it to the registrar's pcr_policy"),
    ProblemType("identity-key-invalid", 403, "The identity key is not provably TPM-resident",
                "the certified key must have fixedTPM, fixedParent and sensitiveDataOrigin"),
    ProblemType("csr-key-mismatch", 403, "The CSR's key is not the certified identity key",
                "the CSR must be signed by the identity key the TPM certified"),
    ProblemType("csr-invalid", 400, "The CSR is malformed or its signature is wrong",
                "the CSR must be a DER PKCS#10 request signed by the identity key"),
    # availability
    ProblemType("renewal-too-early", 429, "This device renewed too recently",
                "the agent retries after the time in Retry-After; renewals this frequent "
                "usually mean the gateway's clock is wrong (see the clock check in "
                "`devidctl check`)"),
    ProblemType("registrar-busy", 503, "The registrar is busy",
                "retry after the time in Retry-After"),
    ProblemType("internal-error", 500, "The registrar failed to process the request",
                "see the registrar's log; the request can be retried"),
)

PROBLEM_TYPES: dict[str, ProblemType] = {t.code: t for t in _TYPES}


def problem(code: str, detail: str, retry_after: float | None = None) -> Problem:
    """A Problem of a catalogued type; KeyError for an unknown code (a programming error)."""
    t = PROBLEM_TYPES[code]
    return Problem(code, detail, t.status, t.hint, retry_after)


def problem_document(p: Problem, instance: str | None = None) -> dict[str, object]:
    t = PROBLEM_TYPES.get(p.code)
    doc: dict[str, object] = {
        "type": PROBLEM_URN_PREFIX + p.code,
        "title": t.title if t else p.code,
        "status": p.status,
        "detail": p.message,
    }
    if p.hint:
        doc["hint"] = p.hint
    if instance:
        doc["instance"] = instance
    return doc


def problem_from_document(doc: dict[str, object], status: int) -> Problem:
    """Rebuild a Problem from a response body; tolerant, since it is for display."""
    raw = doc.get("type")
    code = raw.removeprefix(PROBLEM_URN_PREFIX) if isinstance(raw, str) else "unknown"
    detail = doc.get("detail")
    hint = doc.get("hint")
    title = doc.get("title")
    message = detail if isinstance(detail, str) else (title if isinstance(title, str) else code)
    return Problem(code, message, status, hint if isinstance(hint, str) else None)
