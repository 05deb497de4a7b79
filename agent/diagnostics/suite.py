"""The one check suite: every `devidctl check` line, from the daemon or from devidctl itself.

The daemon (running) and devidctl (daemon down) gather `GatewayFacts` their own way;
`run_checks` judges them with the same code, the same tolerated skew and the same
checks, so the two cannot disagree. Pure.

Root cause first: the clock, the daemon and the TPM are judged first, and a later
check whose failure they explain (a certificate "not yet valid" with a clock two
days behind, an EK not readable with the TPM gone) says "not checked: <cause>"
instead of blaming the registrar or the TPM vendor; what it saw stays in `detail`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, replace
from typing import Any

from agent.clock import human_duration
from agent.diagnostics.broker import BROKER_CHECKS
from agent.diagnostics.checks import (
    HEADLINE,
    NOT_CHECKED,
    CheckResult,
    Level,
    check_clock,
    check_daemon_down,
    check_ek,
    check_identity,
    check_state_dir,
    check_tpm,
    worst,
)
from agent.diagnostics.enrollment import EnrollmentFacts, RegistrarProbe, check_enrollment
from agent.diagnostics.facts import ClockFacts, PathFacts, TpmFacts
from agent.diagnostics.rotation import RotationFacts, check_rotation
from agent.diagnostics.service import ServiceFacts, check_service

# Every check, in the order run_checks gives them: root causes first.
CHECK_NAMES = ("clock", "daemon", "tpm", "ek-certificate", "identity-key", "state-dir",
               "registrar", "enrollment", "rotation", *BROKER_CHECKS)


@dataclass(frozen=True)
class GatewayFacts:
    tpm: TpmFacts
    state_dir: PathFacts
    clock: ClockFacts
    registrar: RegistrarProbe
    enrollment: EnrollmentFacts
    rotation: RotationFacts
    now: datetime.datetime  # the registrar's time when known: certificates are dated by it
    skew: float  # [rotation] clock_skew
    roots_configured: bool
    expected_uid: int | None  # the agent's uid; None when checked from outside the daemon
    agent: dict[str, Any] | None = None  # the daemon's own section; None when it is down
    service: ServiceFacts | None = None
    daemon_down: str | None = None  # why the daemon could not be reached


def _daemon(facts: GatewayFacts) -> CheckResult:
    if facts.daemon_down is not None or facts.agent is None:
        return check_daemon_down(facts.daemon_down or "devid-agent is not running")
    return check_service(facts.service or ServiceFacts(), facts.agent)


def _registrar(probe: RegistrarProbe, enrollment: CheckResult) -> CheckResult:
    """An unreachable registrar is a warning while the identity certificate is good: the
    gateway works and the agent retries; it fails when that is no longer true."""
    result = probe.result
    if probe.unreachable and enrollment.level is Level.PASS:
        return replace(result, level=Level.WARN, summary=f"{result.summary}; the gateway keeps "
                       "working on its current certificates and the agent retries")
    return result


def attribute_causes(results: list[CheckResult]) -> list[CheckResult]:
    """Replace each result whose failure a failed earlier check explains by a not-checked
    line quoting that check's cause."""
    failed = {r.name: r for r in results if r.level is Level.FAIL and r.checked}
    out = []
    for r in results:
        cause = failed.get(r.because)
        if cause is None or r.level is Level.PASS or r.name == cause.name:
            out.append(r)
            continue
        why = cause.cause or f"the {cause.name} check failed"
        detail = r.detail or (r.summary if r.checked else "")
        out.append(CheckResult(r.name, Level.WARN, f"{NOT_CHECKED}{why}",
                               f"fix the {cause.name} check first", because=cause.name,
                               detail=detail))
    return out


def certificate_starts(tpm: TpmFacts, identity: dict[str, Any] | None,
                       tls: dict[str, Any] | None) -> list[tuple[str, datetime.datetime]]:
    """(what, notBefore) of every certificate the gateway holds, for the clock check."""
    held = [(f"the {ek.kind} certificate", ek.certificate) for ek in tpm.endorsement]
    held += [(what, cert) for what, cert in (("the identity certificate", identity),
                                             ("the TLS certificate", tls)) if cert]
    return [(what, datetime.datetime.fromisoformat(str(cert["not_before"])))
            for what, cert in held]


def run_checks(facts: GatewayFacts) -> list[CheckResult]:
    """Every check, root causes first, each failure attributed to the first cause."""
    starts = certificate_starts(facts.tpm, facts.enrollment.certificate,
                                facts.rotation.tls_certificate)
    enrollment = check_enrollment(facts.enrollment, facts.now, facts.skew)
    return attribute_causes([
        check_clock(facts.clock, starts, facts.skew),
        _daemon(facts),
        check_tpm(facts.tpm),
        check_ek(facts.tpm, facts.roots_configured),
        check_identity(facts.tpm),
        check_state_dir(facts.state_dir, facts.expected_uid),
        _registrar(facts.registrar, enrollment),
        enrollment,
        check_rotation(facts.rotation, facts.now, facts.skew),
    ])


def only(doc: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A check document (as JSON, from either side) cut down to the named checks, in the
    order asked; its state follows the checks kept."""
    by_name = {r.get("name"): r for r in doc.get("results", [])}
    kept = [by_name[name] for name in dict.fromkeys(names) if name in by_name]
    level = max((Level.__members__.get(str(r.get("level")).upper(), Level.FAIL) for r in kept),
                default=Level.PASS)
    return {**doc, "state": HEADLINE[level], "results": kept,
            "summary": ", ".join(f"{r['name']} {r['level']}" for r in kept)}


def tally(results: list[CheckResult]) -> str:
    """'7 passed, 1 warning, 1 failed, 2 not checked'."""
    return _tally([(r.level, r.checked) for r in results])


def _tally(results: list[tuple[Level, bool]]) -> str:
    counts = {"passed": 0, "warning": 0, "failed": 0, "not checked": 0}
    for level, checked in results:
        if not checked:
            counts["not checked"] += 1
        else:
            counts[{Level.PASS: "passed", Level.WARN: "warning",
                    Level.FAIL: "failed"}[level]] += 1
    parts = []
    for label, n in counts.items():
        if n or label == "passed":
            parts.append(f"{n} {label}s" if label == "warning" and n != 1 else f"{n} {label}")
    return ", ".join(parts)


def with_results(doc: dict[str, Any], extra: list[CheckResult]) -> dict[str, Any]:
    """A check document (as JSON) with more results after its own (the broker's); its
    state and summary follow all of them."""
    results = [*doc.get("results", []), *(r.to_dict() for r in extra)]
    pairs = [(Level.__members__.get(str(r.get("level")).upper(), Level.FAIL),
              bool(r.get("checked", True))) for r in results]
    level = max((lv for lv, _ in pairs), default=Level.PASS)
    return {**doc, "state": HEADLINE[level], "summary": _tally(pairs), "results": results}


def check_document(facts: GatewayFacts) -> dict[str, Any]:
    results = run_checks(facts)
    doc: dict[str, Any] = {"state": HEADLINE[worst(results)], "summary": tally(results),
                           "at": facts.now.isoformat(timespec="seconds"),
                           "results": [r.to_dict() for r in results],
                           "clock": clock_section(facts.clock)}
    if facts.tpm.occupancy is not None:  # for scripts and the support bundle
        doc["tpm_resources"] = facts.tpm.occupancy.to_dict()
    return doc


def clock_section(clock: ClockFacts) -> dict[str, Any]:
    offset = clock.registrar_offset
    return {
        "local": datetime.datetime.fromtimestamp(clock.now, datetime.UTC)
        .isoformat(timespec="seconds"),
        "ntp_synchronized": clock.synchronized,
        "registrar_offset_s": round(offset, 1) if offset is not None else None,
        "registrar_offset": human_duration(abs(offset)) if offset is not None else None,
        "offset_authenticated": clock.offset_authenticated,
    }
