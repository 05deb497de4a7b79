"""The one check suite: root causes first, the checks they explain not accused. Pure."""

from __future__ import annotations

import dataclasses
import datetime

from agent.cli.render import Style, render_check, render_status
from agent.diagnostics.checks import CheckResult, Level
from agent.diagnostics.enrollment import RegistrarProbe
from agent.diagnostics.facts import ClockFacts, PathFacts
from agent.diagnostics.rotation import NOT_RUNNING, RotationFacts
from agent.diagnostics.service import ServiceFacts
from agent.diagnostics.status import build_status
from agent.diagnostics.suite import (
    GatewayFacts,
    attribute_causes,
    check_document,
    only,
    tally,
)
from agent.errors import TpmUnreachable
from tests.unit.test_diagnostics import AGENT, AT, CERT, ENROLLED, LEAF, facts

REACHED = RegistrarProbe(CheckResult("registrar", Level.PASS, "https://r reachable"), 0.0)
ROTATING = RotationFacts("scheduled", True, tls_certificate=LEAF, presented=True)


def gateway(**kw) -> GatewayFacts:
    base = dict(tpm=facts(), state_dir=PathFacts("/s", True, True, 0o700, 0),
                clock=ClockFacts(AT.timestamp(), True, 0.0), registrar=REACHED,
                enrollment=ENROLLED, rotation=ROTATING, now=AT, skew=300.0,
                roots_configured=True, expected_uid=0, agent=AGENT, service=ServiceFacts())
    return GatewayFacts(**{**base, **kw})


def _by_name(doc):
    return {r["name"]: r for r in doc["results"]}


def test_a_healthy_gateway_passes_every_check_clock_first():
    doc = check_document(gateway())
    assert doc["state"] == "OK" and doc["summary"] == "9 passed", doc
    assert [r["name"] for r in doc["results"]] == [
        "clock", "daemon", "tpm", "ek-certificate", "identity-key", "state-dir", "registrar",
        "enrollment", "rotation"]
    assert doc["clock"]["registrar_offset_s"] == 0.0


def test_a_clock_days_behind_is_blamed_instead_of_the_registrar_and_the_certificates():
    behind = AT - datetime.timedelta(days=2)
    dated = RegistrarProbe(CheckResult("registrar", Level.FAIL, "TLS failed: not valid",
                                       because="clock"), unverified_offset=172800.0)
    doc = check_document(gateway(clock=ClockFacts(behind.timestamp(), True, 172800.0, False),
                                 registrar=dated, now=behind))
    results = _by_name(doc)
    assert results["clock"]["level"] == "fail" and "2d 0h behind" in results["clock"]["summary"]
    assert "read without TLS verification" in results["clock"]["summary"]
    for name in ("registrar", "enrollment", "rotation"):
        assert results[name]["checked"] is False and results[name]["because"] == "clock"
        assert results[name]["summary"] == ("not checked: the local clock is 2d 0h behind the "
                                            "registrar's"), results[name]
        assert results[name]["detail"]  # what it found is kept for --verbose
    assert doc["summary"] == "5 passed, 1 failed, 3 not checked", doc["summary"]
    text = render_check(doc, verbose=True)
    assert "SKIP  registrar" in text and "found: TLS failed" in text
    assert "docs: docs/operations.md#clock" in text


def test_a_lost_tpm_skips_the_key_checks_and_names_the_tpm():
    doc = check_document(gateway(tpm=facts(info=None, error=TpmUnreachable("gone", "start it"))))
    results = _by_name(doc)
    assert results["tpm"]["level"] == "fail"
    for name in ("ek-certificate", "identity-key"):
        assert results[name]["checked"] is False and "the TPM is not usable" in \
            results[name]["summary"], results[name]
    assert "not created" not in str(results["identity-key"])


def test_daemon_down_skips_rotation_but_keeps_what_it_found():
    doc = check_document(gateway(agent=None, service=None, daemon_down="no control socket",
                                 rotation=RotationFacts(NOT_RUNNING, True,
                                                        tls_certificate=LEAF)))
    results = _by_name(doc)
    assert results["daemon"]["level"] == "fail"
    assert results["rotation"]["summary"] == "not checked: devid-agent is not running"
    assert "nobody renews it" in results["rotation"]["detail"]


def test_an_unreachable_registrar_warns_while_the_certificate_is_good_and_fails_after():
    down = RegistrarProbe(CheckResult("registrar", Level.FAIL, "https://r: refused"),
                          unreachable=True)
    good = _by_name(check_document(gateway(registrar=down)))["registrar"]
    assert good["level"] == "warn" and "keeps working" in good["summary"]
    expired = dataclasses.replace(ENROLLED, certificate={
        **LEAF, "not_after": "2026-11-21T11:00:00+00:00"})
    late = _by_name(check_document(gateway(registrar=down, enrollment=expired)))
    assert late["registrar"]["level"] == "fail" and late["enrollment"]["level"] == "fail"


def test_a_failed_renewal_is_a_warning_in_status_and_check_while_still_valid():
    failing = RotationFacts("retrying", True, tls_certificate=LEAF, presented=True, failures=2,
                            next_attempt=AT, last={"result": "failed", "error": {
                                "type": "registrar-unreachable", "message": "refused",
                                "hint": "check"}})
    doc = build_status(facts(), AGENT, True, ENROLLED, AT, failing, 300.0)
    assert doc["state"] == "WARN" and "last renewal failed" in doc["reasons"][0]
    assert _by_name(check_document(gateway(rotation=failing)))["rotation"]["level"] == "warn"


def test_attribution_only_follows_failed_causes():
    cause = CheckResult("clock", Level.WARN, "not synced")
    effect = CheckResult("registrar", Level.FAIL, "refused", because="clock")
    assert attribute_causes([cause, effect]) == [cause, effect]


def test_tally_counts_each_kind():
    results = [CheckResult("a", Level.PASS, "x"), CheckResult("b", Level.WARN, "y"),
               CheckResult("c", Level.WARN, "z"), CheckResult("d", Level.FAIL, "w"),
               CheckResult("e", Level.WARN, "not checked: v")]
    assert tally(results) == "1 passed, 2 warnings, 1 failed, 1 not checked"


def test_colour_only_when_asked_and_times_are_relative_with_utc():
    doc = check_document(gateway())
    assert "\x1b[" not in render_check(doc)
    assert "\x1b[32mPASS" in render_check(doc, Style(colour=True))
    status = build_status(facts(), AGENT, True, ENROLLED, AT, ROTATING, 300.0)
    text = render_status(status)
    assert "until    in 12h 0m, 2026-11-22 00:00Z" in text, text
    assert "from     12h 0m ago, 2026-11-21 00:00Z" in text, text
    assert CERT["subject"] in text


def test_only_keeps_the_named_checks_in_the_order_asked():
    doc = check_document(gateway(registrar=RegistrarProbe(
        CheckResult("registrar", Level.FAIL, "refused"))))
    cut = only(doc, ["registrar", "tpm", "registrar"])
    assert [r["name"] for r in cut["results"]] == ["registrar", "tpm"]
    assert cut["state"] == "FAIL" and cut["summary"] == "registrar fail, tpm pass"
    assert only(doc, ["tpm"])["state"] == "OK"
