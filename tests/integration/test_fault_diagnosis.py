"""Faults as a field engineer meets them, one at a time, on a running gateway: the first
failing check names the root cause, the checks it explains say "not checked", the daemon's
checks and devidctl's own (daemon down) agree, and no message carries a repr or traceback.

The agent (or devidctl) runs under libfaketime for a wrong clock; the registrar keeps the
true time. swtpm is stopped for a lost TPM.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import pytest
from stack import BIN, LIBFAKETIME, AgentProcess, enrollment_toml, faked_clock, rotation_toml

ROOT_CAUSES = ("clock", "daemon", "tpm", "state-dir")


def _renewals(registrar) -> list[dict[str, Any]]:
    return [r for r in registrar.audit() if r["event"] == "certificate-renewed"]


def _results(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in doc["results"]}


def _first_failure(doc: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in doc["results"] if r["level"] == "fail")


def _clean(doc: dict[str, Any]) -> None:
    text = json.dumps(doc)
    for bad in ("<Certificate", "Name(", "Traceback", "[Errno"):
        assert bad not in text, (bad, doc)


def _skipped_because(result: dict[str, Any], cause: str) -> None:
    assert result["level"] != "fail" and result["checked"] is False, result
    assert result["because"] == cause and result["summary"].startswith("not checked: "), result


def _local_check(agent: AgentProcess, env: dict[str, str] | None = None
                 ) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([str(BIN / "devidctl"), "--config", str(agent.config), "check",
                           "--json"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture
def enrolled(tpm, registrar_factory, agent_factory):
    registrar = registrar_factory([tpm.vendor_ca])
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml())
    agent.wait_enrollment("enrolled")
    return registrar, agent


def test_daemon_and_local_checks_are_one_path(enrolled):
    registrar, agent = enrolled
    code, running = agent.ctl_json("check")
    _clean(running)
    assert code in (0, 1), running  # 1: this machine's clock may not be NTP-synchronized
    assert running["summary"].startswith(f"{sum(r['level'] == 'pass' for r in running['results'])}"
                                         " passed"), running
    agent.stop()
    code, local = _local_check(agent)
    _clean(local)
    # The same checks in the same order, the clock first; the same verdicts where both sides
    # can see the same thing.
    assert [r["name"] for r in local["results"]] == [r["name"] for r in running["results"]]
    assert local["results"][0]["name"] == "clock"
    by_name, was = _results(local), _results(running)
    for name in ("clock", "tpm", "ek-certificate", "identity-key", "state-dir", "registrar",
                 "enrollment"):
        assert by_name[name]["level"] == was[name]["level"], (name, by_name[name], was[name])
    assert code == 2 and _first_failure(local)["name"] == "daemon"
    _skipped_because(by_name["rotation"], "daemon")
    assert "TLS certificate" in by_name["rotation"]["detail"], by_name["rotation"]
    # The same skew on both sides: the local clock line measured the registrar's clock.
    assert local["clock"]["registrar_offset_s"] is not None, local["clock"]

    # Text: a summary line, SKIP for what was not checked, a docs anchor for the failure.
    text = agent.ctl("check", "--verbose").stdout
    assert "\x1b[" not in text  # not a terminal: no colour
    assert "1 failed" in text and "1 not checked" in text, text
    assert "SKIP  rotation" in text and "found: TLS certificate" in text, text
    assert "operations.md#daemon" in text, text
    only = agent.ctl("check", "--only", "tpm", "--json")
    assert only.returncode == 0 and [r["name"] for r in json.loads(only.stdout)["results"]] \
        == ["tpm"], only.stdout

    # The registrar down with a good certificate: a warning in check, not a failure, and
    # status agrees that the gateway still works.
    agent.start()
    registrar.stop()
    code, doc = agent.ctl_json("check")
    line = _results(doc)["registrar"]
    assert line["level"] == "warn" and "keeps working" in line["summary"], line
    assert _results(doc)["enrollment"]["level"] == "pass"
    assert agent.status()["state"] != "FAIL"


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="libfaketime is installed by `make deps`")
def test_a_clock_two_days_behind_is_the_first_failure_on_both_paths(enrolled):
    _, agent = enrolled
    agent.stop()
    agent.env = faked_clock("-2d")  # a dead RTC battery
    agent.start()
    for code, doc in (agent.ctl_json("check"), ):
        _clean(doc)
        first = _first_failure(doc)
        assert code == 2 and first["name"] == "clock", doc
        assert "behind the registrar's" in first["summary"], first
        assert "read without TLS verification" in first["summary"], first
        by_name = _results(doc)
        # The registrar's certificate and the device's are not accused: the clock is.
        for name in ("registrar", "enrollment"):
            _skipped_because(by_name[name], "clock")
            assert "behind the registrar's" in by_name[name]["summary"], by_name[name]
        assert by_name["ek-certificate"]["level"] != "fail", by_name["ek-certificate"]
        assert [r for r in doc["results"] if r["level"] == "fail"] == [first], doc
    agent.stop()
    # devidctl on the same wrong clock, daemon down: the same diagnosis.
    code, local = _local_check(agent, faked_clock("-2d"))
    _clean(local)
    assert code == 2 and _first_failure(local)["name"] == "clock", local
    for name in ("registrar", "enrollment"):
        _skipped_because(_results(local)[name], "clock")


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="libfaketime is installed by `make deps`")
def test_a_clock_three_days_ahead_renews_normally_and_blames_only_the_clock(
        tpm, registrar_factory, agent_factory):
    registrar = registrar_factory([tpm.vendor_ca])
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml(), env=faked_clock("+3d"))
    agent.wait_enrollment("enrolled")
    before = len(_renewals(registrar))
    time.sleep(8)  # the old agent retried every 5 s here
    doc = agent.status()
    assert doc["rotation"]["failures"] == 0 and doc["rotation"]["last"]["result"] == "renewed"
    assert len(_renewals(registrar)) == before, _renewals(registrar)
    assert doc["tls_certificate"]["presented"] is True
    code, check = agent.ctl_json("check")
    _clean(check)
    first = _first_failure(check)
    assert code == 2 and first["name"] == "clock" and "3d 0h ahead" in first["summary"], check
    by_name = _results(check)
    for name in ("registrar", "enrollment", "rotation", "ek-certificate"):
        assert by_name[name]["level"] == "pass", by_name[name]
    assert "timedatectl" in first["hint"] and first["docs"] == "operations.md#clock"


def test_a_stopped_tpm_is_the_root_cause_not_a_missing_key(enrolled, tpm):
    _, agent = enrolled
    tpm.stop()
    agent.wait_status("TPM lost", lambda d: d["tpm"]["reachable"] is False)
    code, doc = agent.ctl_json("check")
    _clean(doc)
    first = _first_failure(doc)
    assert code == 2 and first["name"] == "tpm", doc
    assert "swtpm" in first["hint"] and "/dev/tpmrm0" not in first["hint"], first
    for name in ("ek-certificate", "identity-key"):
        _skipped_because(_results(doc)[name], "tpm")
        assert "not created" not in _results(doc)[name]["summary"]
    status = agent.status()
    assert status["state"] == "FAIL" and status["reasons"][0].startswith("TPM not usable"), \
        status["reasons"]
    assert not [r for r in status["reasons"] if "not created" in r], status["reasons"]
