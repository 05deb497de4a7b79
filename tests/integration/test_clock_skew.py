"""A gateway whose clock is wrong, and a registrar that protects itself.

The agent runs under libfaketime (Debian's libfaketime) with only its wall
clock moved, monotonic time untouched, as with a bad RTC or a wrong NTP
server; the registrar keeps the true time. Certificates live 20 seconds so
that several renewal windows pass in one test.
"""

from __future__ import annotations

import datetime
import itertools
import json
import threading
import time

import pytest
import requests
from stack import (
    LIBFAKETIME,
    AgentProcess,
    RegistrarProcess,
    enrollment_toml,
    faked_clock,
    rotation_toml,
)

LIFETIME = 20.0  # seconds; the registrar backdates notBefore by a tenth of it
OBSERVE = 32.0  # seconds of renewals watched: three windows of this lifetime

pytestmark = pytest.mark.skipif(not LIBFAKETIME.exists(),
                                reason="libfaketime is installed by `make deps`")


def _skewed_agent(tpm, registrar_factory, agent_factory, offset: str
                  ) -> tuple[RegistrarProcess, AgentProcess]:
    registrar = registrar_factory([tpm.vendor_ca],
                                  settings={"cert_lifetime": json.dumps(f"{LIFETIME:g}s")})
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml() + 'clock_skew = "5s"\n', env=faked_clock(offset))
    agent.wait_enrollment("enrolled")
    return registrar, agent


def _renewals(registrar: RegistrarProcess) -> list[dict]:
    return [r for r in registrar.audit() if r["event"] == "certificate-renewed"]


def _at(record: dict, key: str = "time") -> datetime.datetime:
    return datetime.datetime.fromisoformat(str(record[key]))


def _watch_renewals(registrar: RegistrarProcess) -> list[dict]:
    """The renewals the registrar saw while OBSERVE seconds pass (bounded loop)."""
    before = len(_renewals(registrar))
    time.sleep(OBSERVE)
    return _renewals(registrar)[before - 1:]  # with the one before, for the first gap


def test_a_clock_ahead_renews_once_per_window_not_in_a_loop(tpm, registrar_factory,
                                                            agent_factory):
    # 16 s of a 20 s lifetime ahead: by its own clock, every new certificate is past
    # its renewal point the moment it arrives.
    registrar, agent = _skewed_agent(tpm, registrar_factory, agent_factory, "+16s")
    renewals = _watch_renewals(registrar)

    # Each renewal window (about 10-13 s here) holds one renewal, and the renewals go on.
    gaps = [(_at(b) - _at(a)).total_seconds() for a, b in itertools.pairwise(renewals)]
    assert 2 <= len(gaps) <= 4, gaps
    assert min(gaps) >= 9, gaps  # 1 s audit resolution around a 10 s floor
    # Never so early that the registrar had to refuse it.
    assert not [r for r in registrar.audit() if r["event"] == "renewal-refused"]

    doc = agent.status()
    offset = doc["rotation"]["registrar_clock_offset_s"]
    assert -18 <= offset <= -14, offset
    assert doc["tls_certificate"]["presented"] is True
    # Status leads with the root cause, in words, and so does the clock check.
    assert doc["state"] == "FAIL" and "ahead of the registrar's" in doc["reasons"][0]
    code, check = agent.ctl_json("check")
    clock = next(r for r in check["results"] if r["name"] == "clock")
    assert clock["level"] == "fail" and "ahead of the registrar's" in clock["summary"]
    assert "timedatectl set-ntp true" in clock["hint"] and code == 2
    text = agent.ctl("status").stdout
    assert "clock" in text and "ahead of the registrar's" in text
    # The journal event, once.
    log = agent.log_path.read_text()
    assert log.count("renewals are planned in the registrar's time; fix time") == 1
    assert "Traceback" not in log


def test_a_clock_behind_renews_before_expiry(tpm, registrar_factory, agent_factory):
    # 12 s behind: planned by its own clock, each renewal would come after expiry.
    registrar, agent = _skewed_agent(tpm, registrar_factory, agent_factory, "-12s")
    renewals = _watch_renewals(registrar)
    assert len(renewals) >= 3, renewals
    for previous, renewal in itertools.pairwise(renewals):
        left = (_at(previous, "not_after") - _at(renewal)).total_seconds()
        assert left >= LIFETIME / 4, (previous, renewal)  # renewed well before expiry

    doc = agent.status()
    assert 10 <= doc["rotation"]["registrar_clock_offset_s"] <= 14
    assert doc["tls_certificate"]["presented"] is True
    assert "behind the registrar's" in doc["reasons"][0]


def test_the_registrar_refuses_an_early_renewal_and_the_agent_honours_retry_after(
        tpm, registrar_factory, agent_factory):
    # One renewal per ten minutes: the one after enrollment uses it up.
    registrar = registrar_factory([tpm.vendor_ca], settings={
        "cert_lifetime": '"1h"', "renewal_window": '"10m"', "max_renewals_per_window": "1"})
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml())
    agent.wait_enrollment("enrolled")  # and its first renewal, for the TLS certificate

    code, renewed = agent.ctl_json("renew", "--wait")
    assert code == 2, renewed
    error = renewed["outcome"]["error"]
    assert error["type"] == "renewal-too-early"
    assert "this registrar allows 1 renewal per 600s" in error["message"]
    assert "clock" in error["hint"]

    refused = [r for r in registrar.audit() if r["event"] == "renewal-refused"]
    assert [r["problem"] for r in refused] == ["renewal-too-early"]
    assert len(_renewals(registrar)) == 1  # nothing issued for the early request

    # The agent waits as told (Retry-After, about ten minutes), not its 1-2 s backoff.
    doc = agent.status()
    retry_at = datetime.datetime.fromisoformat(doc["rotation"]["next_attempt"])
    wait = (retry_at - datetime.datetime.now(datetime.UTC)).total_seconds()
    assert 500 <= wait <= 600 * 1.2 + 5, wait
    assert doc["tls_certificate"]["presented"] is True  # the current certificates stay


def test_the_registrar_answers_busy_beyond_max_in_flight(tpm, registrar_factory):
    registrar = registrar_factory([tpm.vendor_ca], start=False,
                                  settings={"max_in_flight": "1"})
    # Each verification stalls 3 s inside its slot, so one request holds the only slot.
    registrar.start(env={"DEVID_FAILPOINTS": "registrar.verify=stall:3"})
    url = f"{registrar.url}/v1/enrollments"

    def post() -> requests.Response:
        return requests.post(url, data=b"{}", headers={"Content-Type": "application/json"},
                             verify=str(registrar.ca), timeout=20)

    first: list[requests.Response] = []
    holder = threading.Thread(target=lambda: first.append(post()))
    holder.start()
    deadline = time.monotonic() + 10
    while "failpoint registrar.verify" not in registrar.log_path.read_text():
        assert time.monotonic() < deadline, registrar.log_path.read_text()
        time.sleep(0.05)

    busy = post()
    assert busy.status_code == 503
    assert busy.json()["type"] == "urn:devid:problem:registrar-busy"
    assert 2 <= int(busy.headers["Retry-After"]) <= 4
    health = requests.get(f"{registrar.url}/v1/health", verify=str(registrar.ca), timeout=5)
    assert health.status_code == 200  # not counted: probes keep working

    holder.join(20)
    assert first[0].status_code == 400  # the held request was verified (and refused: "{}")
    assert post().status_code == 400  # the slot is free again
    log = registrar.log_path.read_text()
    assert log.count("requests in flight (max_in_flight 1)") == 1 and "Traceback" not in log


def test_a_clock_days_behind_is_named_as_the_cause_without_reprs(tpm, registrar_factory,
                                                                 agent_factory):
    registrar = registrar_factory([tpm.vendor_ca])
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml())
    agent.wait_generation(1)
    agent.stop()
    agent.env = faked_clock("-2d")  # a dead RTC battery: two days behind
    agent.start()
    code, renewed = agent.ctl_json("renew", "--wait", "--timeout", "60")
    text = json.dumps(renewed)
    assert code == 2, renewed
    assert "clock" in text, renewed
    assert "<Certificate" not in text and "Name(" not in text, renewed
    code, check = agent.ctl_json("check")
    text = json.dumps(check)
    assert "<Certificate" not in text and "Name(" not in text, check
    registrar_line = next(r for r in check["results"] if r["name"] == "registrar")
    assert "clock" in registrar_line["summary"] + registrar_line["hint"], registrar_line
