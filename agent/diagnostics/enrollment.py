"""Enrollment facts, their judgement, and the status sections built from them. Pure
(except `probe_registrar`, which makes one HTTPS request)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import EnrollmentSection
from agent.diagnostics.checks import CheckResult, Level
from agent.enroll.state import EnrollmentStore
from agent.errors import DevidError
from agent.pki.certinfo import summarize

NOT_CONFIGURED = "not_configured"
PENDING = "pending"
FAILED = "failed"
ENROLLED = "enrolled"


@dataclass(frozen=True)
class EnrollmentFacts:
    state: str
    registrar: str | None = None
    device_id: str | None = None
    last_error: dict[str, Any] | None = None
    attempts: int = 0
    next_attempt: datetime.datetime | None = None
    certificate: dict[str, Any] | None = None  # certinfo.summarize() of the leaf
    key_matches: bool | None = None  # the certificate's key is this TPM's identity key


def enrollment_section(facts: EnrollmentFacts) -> dict[str, Any]:
    return {
        "state": facts.state,
        "registrar": facts.registrar,
        "device_id": facts.device_id,
        "last_error": facts.last_error,
        "attempts": facts.attempts,
        "next_attempt": facts.next_attempt.isoformat(timespec="seconds")
        if facts.next_attempt else None,
    }


def certificate_section(facts: EnrollmentFacts) -> dict[str, Any] | None:
    if facts.certificate is None:
        return None
    return {**facts.certificate, "key_matches_tpm": facts.key_matches}


def _stamp(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%SZ")


def check_enrollment(facts: EnrollmentFacts, now: datetime.datetime) -> CheckResult:
    name = "enrollment"
    err = facts.last_error or {}
    why = f"{err.get('type')}: {err.get('message')}" if err else ""
    if facts.state == NOT_CONFIGURED:
        return CheckResult(name, Level.WARN, "enrollment not configured: this gateway has no "
                           "identity certificate",
                           "set [enrollment] url, ca and token (see docs/protocol.md)")
    if facts.state == PENDING:
        return CheckResult(name, Level.WARN, f"enrolling with {facts.registrar} "
                           f"(attempt {facts.attempts + 1})" + (f"; last error {why}" if why
                                                                 else ""),
                           str(err.get("hint", "")))
    if facts.state == FAILED:
        when = f"; next attempt {facts.next_attempt:%H:%M:%S}Z" if facts.next_attempt else ""
        return CheckResult(name, Level.FAIL, f"enrollment failed after {facts.attempts} "
                           f"attempt(s): {why}{when}", str(err.get("hint", "")))
    cert = facts.certificate or {}
    if facts.key_matches is False:
        return CheckResult(name, Level.FAIL, "the stored certificate is not for this TPM's "
                           "identity key", "state copied from another device; the agent "
                                          "re-enrolls")
    not_after = datetime.datetime.fromisoformat(str(cert.get("not_after")))
    not_before = datetime.datetime.fromisoformat(str(cert.get("not_before")))
    if now > not_after:
        return CheckResult(name, Level.FAIL, f"certificate expired at {_stamp(not_after)}",
                           "it must be renewed; check the registrar and clock")
    if now < not_before:
        return CheckResult(name, Level.FAIL, f"certificate not valid until "
                           f"{_stamp(not_before)} by the local clock",
                           "the local clock is behind; fix NTP")
    return CheckResult(name, Level.PASS, f"enrolled as {facts.device_id}, certificate serial "
                       f"{cert.get('serial')} valid until {_stamp(not_after)}")


def stored_enrollment_facts(section: EnrollmentSection | None, state_dir: Path,
                            now: datetime.datetime) -> EnrollmentFacts:
    """What the state directory says, for checks run while the daemon is down."""
    try:
        stored = EnrollmentStore(state_dir).load()
    except DevidError as e:
        return EnrollmentFacts(FAILED, section.url if section else None, last_error=e.to_dict())
    if stored is None:
        return EnrollmentFacts(NOT_CONFIGURED if section is None else PENDING,
                               section.url if section else None)
    return EnrollmentFacts(ENROLLED, stored.registrar, stored.device_id,
                           certificate=summarize(stored.certificate, now))


def probe_registrar(section: EnrollmentSection | None) -> CheckResult:
    """Reach the registrar over TLS with its CA pinned (GET /v1/health)."""
    name = "registrar"
    if section is None:
        return CheckResult(name, Level.WARN, "no registrar configured ([enrollment] url)",
                           "configure [enrollment] to enroll this gateway")
    from agent.enroll.http import RegistrarClient  # requests only when probing

    client = RegistrarClient(section.url, section.ca, timeout=min(section.timeout, 10.0))
    try:
        health = client.health()
    except DevidError as e:
        return CheckResult(name, Level.FAIL, e.message, e.hint)
    finally:
        client.close()
    return CheckResult(name, Level.PASS, f"{section.url} reachable, TLS certificate chains to "
                       f"the pinned CA {section.ca} (registrar {health.get('version', '?')})")
