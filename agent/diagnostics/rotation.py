"""Rotation facts, their judgement, and the status sections built from them. Pure."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from agent.diagnostics.checks import NOT_CHECKED, CheckResult, Level
from agent.diagnostics.enrollment import judge_certificate

# The state devidctl gives rotation when it reads the state directory, the daemon down.
NOT_RUNNING = "not_running"


@dataclass(frozen=True)
class RotationFacts:
    state: str  # see agent.daemon.rotation: scheduled, renewing, retrying, revoked, ...
    enrolled: bool
    renew_at: datetime.datetime | None = None
    next_attempt: datetime.datetime | None = None
    failures: int = 0
    last: dict[str, Any] | None = None
    generation: int = 0
    tls_certificate: dict[str, Any] | None = None  # certinfo.summarize() of the TLS leaf
    presented: bool = False  # the TLS credentials are in memory and unexpired
    clock_offset: float | None = None  # registrar minus local clock, seconds
    restore_error: dict[str, str] | None = None
    held_until: datetime.datetime | None = None  # a due renewal held back by the floor
    hold_reason: str | None = None
    renewal_floor: float | None = None  # seconds between automatic renewals, at least
    step: str | None = None  # while renewing: the last step done (challenged, quoted, ...)


def _iso(when: datetime.datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when else None


def rotation_section(facts: RotationFacts) -> dict[str, Any]:
    return {
        "state": facts.state,
        "renew_at": _iso(facts.renew_at),
        "next_attempt": _iso(facts.next_attempt),
        "failures": facts.failures,
        "last": facts.last,
        "generation": facts.generation,
        "registrar_clock_offset_s": round(facts.clock_offset, 1)
        if facts.clock_offset is not None else None,
        "restore_error": facts.restore_error,
        "held_until": _iso(facts.held_until),
        "hold_reason": facts.hold_reason,
        "renewal_floor_s": round(facts.renewal_floor, 1)
        if facts.renewal_floor is not None else None,
        "step": facts.step,
    }


def tls_certificate_section(facts: RotationFacts) -> dict[str, Any] | None:
    if facts.tls_certificate is None:
        return None
    return {**facts.tls_certificate, "presented": facts.presented}


def check_rotation(facts: RotationFacts, now: datetime.datetime, skew: float) -> CheckResult:
    name = "rotation"
    if facts.state == "unknown":
        return CheckResult(name, Level.WARN, f"{NOT_CHECKED}the stored state cannot be read",
                           "see the enrollment check", because="enrollment")
    if not facts.enrolled or facts.state == "revoked":
        # Not a pass: nothing was checked. The enrollment line says why.
        return CheckResult(name, Level.WARN if not facts.enrolled else Level.FAIL,
                           f"{NOT_CHECKED}not enrolled" if not facts.enrolled
                           else f"{NOT_CHECKED}revoked", "see the enrollment check")
    if facts.state == "not_configured":
        return CheckResult(name, Level.WARN, "no registrar configured: certificates will not "
                           "be renewed", "configure [enrollment] url and ca")
    if facts.state == NOT_RUNNING:
        if facts.tls_certificate is None:
            return CheckResult(name, Level.WARN, "no TLS certificate stored; the agent renews "
                               "for one when it runs", because="daemon")
        found = judge_certificate(name, "TLS certificate", facts.tls_certificate, now, skew)
        return CheckResult(name, max(found.level, Level.WARN), f"{found.summary}; nobody "
                           "renews it while devid-agent is stopped", "start devid-agent",
                           because="daemon")
    last = facts.last or {}
    error = last.get("error") if last.get("result") == "failed" else None
    why = f"; last renewal failed: {error.get('type')}: {error.get('message')}" if error \
        else ""
    retry = f", retrying at {facts.next_attempt:%H:%M:%S}Z" if facts.next_attempt else ""
    if facts.tls_certificate is None:
        return CheckResult(name, Level.WARN, f"no TLS certificate yet{why}{retry}",
                           str(error.get("hint", "")) if error else "the first renewal is "
                                                                      "in progress")
    result = judge_certificate(name, "TLS certificate", facts.tls_certificate, now, skew)
    if not facts.presented and result.level is Level.PASS:
        restore = facts.restore_error or {}
        reason = restore.get("message", "not restored yet")
        result = CheckResult(name, Level.WARN, f"TLS certificate not presented: {reason}",
                             "the agent renews to get a new TLS key; see the rotation error")
    if error:  # still valid, but renewals fail: attention before it is too late
        hint = result.hint or str(error.get("hint", ""))
        return CheckResult(name, max(result.level, Level.WARN), f"{result.summary}{why}{retry}",
                           hint, because=result.because)
    renew = f", renewal at {facts.renew_at:%Y-%m-%d %H:%M:%S}Z" if facts.renew_at else ""
    return CheckResult(name, result.level, f"{result.summary}{renew}", result.hint,
                       because=result.because)
