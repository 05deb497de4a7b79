"""The status document `devidctl status` shows, and its headline. Pure.

The headline is the worst of the parts: FAIL when the device cannot prove its
identity (TPM unusable, EK missing/mismatched/untrusted, identity key not
resident), WARN when it can but something needs attention.
"""

from __future__ import annotations

import datetime
from typing import Any

from agent.diagnostics.checks import (
    HEADLINE,
    Level,
    check_clock,
    check_ek,
    check_identity,
    check_tpm,
)
from agent.diagnostics.enrollment import (
    EnrollmentFacts,
    certificate_section,
    check_enrollment,
    enrollment_section,
)
from agent.diagnostics.facts import ClockFacts, TpmFacts
from agent.diagnostics.rotation import (
    RotationFacts,
    check_rotation,
    rotation_section,
    tls_certificate_section,
)
from agent.diagnostics.service import ServiceFacts, check_service, service_section
from agent.diagnostics.suite import attribute_causes, certificate_starts


def _tpm_section(facts: TpmFacts) -> dict[str, Any]:
    section: dict[str, Any] = {"tcti": facts.tcti, "reachable": facts.reachable}
    if facts.error is not None:
        section["error"] = facts.error.to_dict()
    if facts.info is not None:
        section.update(facts.info.to_dict())
    certs = [
        {"type": ek.kind, "nv_index": f"0x{ek.nv_index:08x}", **ek.certificate,
         "matches_tpm": True, "verified": ek.verdict.verified,
         "verification": ek.verdict.reason, "chain": list(ek.verdict.chain)}
        for ek in facts.endorsement
    ]
    # The EK the agent presents: the first verified one, else the preferred one.
    preferred = next((c for c in certs if c["verified"]), certs[0] if certs else None)
    section["ek_certificate"] = preferred
    section["ek_certificates"] = certs
    if facts.ek_error is not None:
        section["ek_error"] = facts.ek_error.to_dict()
    return section


def _identity_section(facts: TpmFacts) -> dict[str, Any]:
    if facts.identity is None:
        err = facts.identity_error
        return {"key_resident": False, "error": err.to_dict() if err else None}
    return {
        "key_resident": facts.identity.resident,
        "tpm_name": facts.identity.tpm_name,
        "public_key_sha256": facts.identity.public_key_sha256,
        "algorithm": "ECDSA P-256",
    }


def build_status(facts: TpmFacts, agent: dict[str, Any], roots_configured: bool,
                 enrollment: EnrollmentFacts, now: datetime.datetime | None = None,
                 rotation: RotationFacts | None = None, skew: float = 0.0,
                 service: ServiceFacts | None = None,
                 clock: ClockFacts | None = None) -> dict[str, Any]:
    when = now or datetime.datetime.now(datetime.UTC)
    judged = [check_tpm(facts), check_ek(facts, roots_configured), check_identity(facts),
              check_enrollment(enrollment, when, skew)]
    if service is not None:
        judged.insert(0, check_service(service, agent))
    if rotation is not None:
        judged.append(check_rotation(rotation, when, skew))
    if clock is not None:  # the root cause of whatever else looks wrong
        starts = certificate_starts(facts, enrollment.certificate,
                                    rotation.tls_certificate if rotation else None)
        judged.insert(0, check_clock(clock, starts, skew, judge_sync=False))
    judged = attribute_causes(judged)
    level = max(r.level for r in judged)
    certificate = certificate_section(enrollment)
    if certificate is not None and rotation is not None:
        certificate["renew_at"] = rotation_section(rotation)["renew_at"]
    return {
        "state": HEADLINE[level],
        "at": when.isoformat(timespec="seconds"),  # the time it was judged by
        # A check that did not run because of another adds nothing to that one's reason.
        "reasons": [r.summary for r in judged if r.level > Level.PASS and r.checked],
        "agent": {**agent, **service_section(service)} if service else agent,
        "tpm": _tpm_section(facts),
        "identity": _identity_section(facts),
        "enrollment": enrollment_section(enrollment),
        "certificate": certificate,
        "tls_certificate": tls_certificate_section(rotation) if rotation else None,
        "rotation": rotation_section(rotation) if rotation else None,
    }


def headline(doc: dict[str, Any]) -> str:
    """One line: the state and the first reason, or what an OK gateway is doing."""
    state, reasons = doc.get("state", "?"), doc.get("reasons") or []
    if reasons:
        more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
        return f"{state}: {reasons[0]}{more}"
    enrollment = doc.get("enrollment") or {}
    certificate = doc.get("certificate") or {}
    line = f"{state}: enrolled as {enrollment.get('device_id')}"
    if certificate.get("renew_at"):
        line += f", renewal at {certificate['renew_at']}"
    return line
