"""Enrollment facts, their judgement, and the status sections built from them. Pure
(except `probe_registrar`, which makes one HTTPS request)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from agent.clock import human_duration
from agent.config import EnrollmentSection
from agent.diagnostics.checks import NOT_CHECKED, CheckResult, Level
from agent.errors import DevidError, RegistrarNotValidNow, RegistrarUnreachable
from agent.pki.devicecert import Validity
from agent.rotation.schedule import Health, health

NOT_CONFIGURED = "not_configured"
PENDING = "pending"
FAILED = "failed"
ENROLLED = "enrolled"
REVOKED = "revoked"
DECOMMISSIONED = "decommissioned"
UNKNOWN = "unknown"  # the daemon is down and its state cannot be read from here


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
    revoked_reason: str | None = None
    decommissioned_at: datetime.datetime | None = None
    local: bool = False  # read from the state directory while the daemon is down


def enrollment_section(facts: EnrollmentFacts) -> dict[str, Any]:
    return {
        "state": facts.state,
        "registrar": facts.registrar,
        "device_id": facts.device_id,
        "last_error": facts.last_error,
        "attempts": facts.attempts,
        "next_attempt": facts.next_attempt.isoformat(timespec="seconds")
        if facts.next_attempt else None,
        "revoked_reason": facts.revoked_reason,
        "decommissioned_at": facts.decommissioned_at.isoformat(timespec="seconds")
        if facts.decommissioned_at else None,
    }


def certificate_section(facts: EnrollmentFacts) -> dict[str, Any] | None:
    if facts.certificate is None:
        return None
    return {**facts.certificate, "key_matches_tpm": facts.key_matches}


def _stamp(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%SZ")


def check_enrollment(facts: EnrollmentFacts, now: datetime.datetime,
                     skew: float = 0.0) -> CheckResult:
    name = "enrollment"
    err = facts.last_error or {}
    why = f"{err.get('type')}: {err.get('message')}" if err else ""
    if facts.state == NOT_CONFIGURED:
        return CheckResult(name, Level.WARN, "enrollment not configured: this gateway has no "
                           "identity certificate",
                           "set [enrollment] url, ca and token (see docs/protocol.md)")
    if facts.state == PENDING:
        if facts.local:  # read from the state directory: nobody is enrolling right now
            return CheckResult(name, Level.WARN, f"not enrolled yet with {facts.registrar}; "
                               "the agent enrolls when it runs", "start devid-agent")
        return CheckResult(name, Level.WARN, f"enrolling with {facts.registrar} "
                           f"(attempt {facts.attempts + 1})" + (f"; last error {why}" if why
                                                                 else ""),
                           str(err.get("hint", "")))
    if facts.state == UNKNOWN and err.get("type") == "access-denied":  # not ours to read
        return CheckResult(name, Level.WARN, f"{NOT_CHECKED}{err.get('message')}",
                           str(err.get("hint", "")))
    if facts.state == UNKNOWN:
        return CheckResult(name, Level.FAIL, "cannot read the stored enrollment: "
                           f"{err.get('message')}", str(err.get("hint", "")),
                           because="state-dir")
    if facts.state == FAILED:
        when = f"; next attempt {facts.next_attempt:%H:%M:%S}Z" if facts.next_attempt else ""
        return CheckResult(name, Level.FAIL, f"enrollment failed after {facts.attempts} "
                           f"attempt(s): {why}{when}", str(err.get("hint", "")))
    if facts.state == REVOKED:
        return CheckResult(name, Level.FAIL, f"revoked by the registrar ({facts.revoked_reason})"
                           "; the identity is no longer presented and the TLS key is destroyed",
                           "ask the fleet operator; the device cannot renew or re-enroll")
    if facts.state == DECOMMISSIONED:
        at = f" at {_stamp(facts.decommissioned_at)}" if facts.decommissioned_at else ""
        return CheckResult(name, Level.WARN, f"decommissioned{at}: this gateway has no "
                           "identity on purpose",
                           "to enroll it again, stop the agent, delete decommissioned.json in "
                           "the state directory and configure a new token")
    if facts.key_matches is False:
        return CheckResult(name, Level.FAIL, "the stored certificate is not for this TPM's "
                           "identity key", "state copied from another device; the agent "
                                          "re-enrolls")
    cert = facts.certificate or {}
    return judge_certificate(name, "identity certificate", cert, now, skew,
                             f"enrolled as {facts.device_id}, ")


def judge_certificate(name: str, what: str, cert: dict[str, Any], now: datetime.datetime,
                      skew: float, prefix: str = "") -> CheckResult:
    """PASS while fresh, WARN with under 1/6 of its lifetime left, FAIL when expired or
    (beyond the tolerated skew) not yet valid by the local clock."""
    validity = Validity(datetime.datetime.fromisoformat(str(cert.get("not_before"))),
                        datetime.datetime.fromisoformat(str(cert.get("not_after"))))
    state = health(validity, now, skew)
    serial = cert.get("serial")
    if state is Health.EXPIRED:
        return CheckResult(name, Level.FAIL, f"{prefix}{what} {serial} expired at "
                           f"{_stamp(validity.not_after)}",
                           "renewal has not succeeded; check the registrar, the network and "
                           "the rotation error in `devidctl status`", because="clock")
    if state is Health.NOT_YET_VALID:
        return CheckResult(name, Level.FAIL, f"{prefix}{what} {serial} is not valid until "
                           f"{_stamp(validity.not_before)} by the local clock: the clock is "
                           f"behind by more than the tolerated {skew:.0f}s",
                           "fix the gateway's time synchronization (NTP)", because="clock")
    left = human_duration(validity.remaining(now).total_seconds())
    if state is Health.EXPIRING:
        return CheckResult(name, Level.WARN, f"{prefix}{what} {serial} expires in {left} "
                           f"({_stamp(validity.not_after)}) and has not been renewed",
                           "renewal keeps failing; see the rotation error in `devidctl status`")
    return CheckResult(name, Level.PASS, f"{prefix}{what} {serial} valid until "
                       f"{_stamp(validity.not_after)} ({left} left)")


@dataclass(frozen=True)
class RegistrarProbe:
    result: CheckResult
    clock_offset: float | None = None  # the registrar's clock minus ours, from its Date
    unverified_offset: float | None = None  # the same, read when TLS failed on a date
    unreachable: bool = False  # no answer at all (the network or the registrar is down)


def probe_registrar(section: EnrollmentSection | None) -> RegistrarProbe:
    """Reach the registrar over TLS with its CA pinned (GET /v1/health), and read its
    clock on the way."""
    name = "registrar"
    if section is None:
        return RegistrarProbe(CheckResult(name, Level.WARN, "no registrar configured "
                                          "([enrollment] url)",
                                          "configure [enrollment] to enroll this gateway"))
    from agent.enroll.http import RegistrarClient  # requests only when probing

    client = RegistrarClient(section.url, section.ca, timeout=min(section.timeout, 10.0))
    try:
        health = client.health()
    except RegistrarNotValidNow as e:  # a wrong clock fails TLS: measure it anyway
        return RegistrarProbe(CheckResult(name, Level.FAIL, e.message, e.hint, because="clock"),
                              unverified_offset=client.unverified_clock_offset())
    except DevidError as e:
        return RegistrarProbe(CheckResult(name, Level.FAIL, e.message, e.hint),
                              client.clock_offset,
                              unreachable=isinstance(e, RegistrarUnreachable))
    finally:
        client.close()
    return RegistrarProbe(CheckResult(name, Level.PASS, f"{section.url} reachable, TLS "
                                      f"certificate chains to the pinned CA {section.ca} "
                                      f"(registrar {health.get('version', '?')})"),
                          client.clock_offset)
