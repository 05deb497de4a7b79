"""A gateway whose clock is wrong, without a TPM or a network: renewals planned in the
registrar's time, the renewal floor, the clock check, and the registrar's own limits
(renewal-too-early, registrar-busy). Clocks are injected everywhere."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from agent.audit import AuditLog
from agent.config import RotationSection, parse_config
from agent.daemon.enrollment import EnrollmentManager
from agent.daemon.rotation import HELD, RotationManager
from agent.diagnostics.checks import Level, check_clock, judge_registrar_offset
from agent.diagnostics.facts import ClockFacts
from agent.diagnostics.rotation import RotationFacts
from agent.diagnostics.status import build_status
from agent.enroll.evidence import device_request_message
from agent.enroll.messages import DeviceChallengeRequest, Evidence, RenewRequest
from agent.enroll.state import StoredEnrollment
from agent.errors import ConfigError, Problem, StateError
from agent.pki.devicecert import Validity
from agent.registrar.admission import InFlightLimit
from agent.registrar.ca import CertificateAuthority
from agent.registrar.config import RegistrarConfig
from agent.registrar.store import IssuedCertificate
from agent.rotation import schedule
from agent.rotation.credentials import CredentialHolder, TlsCredentials
from agent.rotation.registrarclock import RegistrarClock, describe_offset
from tests.unit.test_diagnostics import AGENT, AT, ENROLLED, LEAF, facts
from tests.unit.test_rotation_pure import NOW, _body, _lifecycle, _stored, _write_ca

DEVICE = "urn:devid:" + "ab" * 16  # as the registrar derives them

MINUTE = datetime.timedelta(minutes=1)
HALF_HOUR = datetime.timedelta(minutes=30)


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca") / "ca",
                                       NOW - datetime.timedelta(hours=1))


# --- the schedule's floor and retries -------------------------------------------------------

@pytest.mark.parametrize("lifetime, fraction, min_interval, floor", [
    (24 * 3600, 2 / 3, 30, 8 * 3600),  # half the planned interval
    (1800, 2 / 3, 30, 600),
    (600, 0.1, 60, 60),  # a tiny fraction: min_interval
    (20, 2 / 3, 30, 10),  # test lifetimes: never more than half the lifetime
])
def test_renewal_floor_is_half_the_interval_within_bounds(lifetime, fraction, min_interval,
                                                          floor):
    assert schedule.renewal_floor(lifetime, fraction, min_interval) == pytest.approx(floor)


def test_retry_honours_retry_after_even_near_expiry_and_makes_one_last_attempt():
    validity = Validity(NOW, NOW + datetime.timedelta(seconds=100))
    near_end = NOW + datetime.timedelta(seconds=90)
    # Retry-After wins over the last-attempt-before-expiry rule: asking sooner is refused.
    told = schedule.retry_at(near_end, 300, validity, not_before=60)
    assert told == near_end + datetime.timedelta(seconds=60)
    # The last attempt before expiry is made once; after it, backoff as usual, not every 1 s.
    last = schedule.retry_at(near_end, 300, validity)
    assert near_end < last < validity.not_after
    after_last = schedule.retry_at(last, 30, validity)
    assert after_last == last + datetime.timedelta(seconds=30)


def test_registrar_clock_estimates_from_the_measured_offset():
    clock = RegistrarClock()
    assert clock.stale and clock.now(NOW) == NOW  # never measured: the local time
    clock.observe(-1500.0, NOW)
    assert not clock.stale and clock.now(NOW) == NOW - datetime.timedelta(seconds=1500)
    clock.observe(None, NOW)  # a response without Date changes nothing
    assert clock.offset == -1500.0
    clock.local_clock_jumped()
    assert clock.stale and clock.offset == -1500.0  # kept until measured again
    assert describe_offset(-1500) == "the local clock is 25m 0s ahead of the registrar's"
    assert describe_offset(2 * 86400 + 30) == "the local clock is 2d 0h behind the registrar's"
    assert describe_offset(0.4) == "the local clock agrees with the registrar's"


# --- the daemon's planning, simulated ------------------------------------------------------

async def _no_probe() -> float | None:
    return None  # the registrar is unreachable


def _manager(tmp_path: Path, ca, local, mono, probe=_no_probe,
             section: RotationSection | None = None) -> RotationManager:
    audit = AuditLog(tmp_path / "audit.log")
    enrollment = EnrollmentManager(None, tmp_path, audit)
    holder = CredentialHolder(clock=local)
    registrar = parse_config('[enrollment]\nurl = "https://r"\nca = "ca.pem"\n',
                             _write_ca(tmp_path, ca)).enrollment
    return RotationManager(section or RotationSection(), registrar, enrollment, holder, audit,
                           clock=local, monotonic=lambda: mono[0], probe_offset=probe)


def _renew(manager: RotationManager, ca, lifetime: datetime.timedelta,
           at: datetime.datetime) -> StoredEnrollment:
    """What a renewal leaves behind: certificates issued at the registrar's time `at`."""
    stored, key = _stored(ca, lifetime, at)
    manager.enrollment.stored = stored
    manager.holder.publish(TlsCredentials(stored.device_id, stored.tls.chain, key))
    manager._last_renewal = manager._monotonic()
    return stored


def _simulate(tmp_path: Path, ca, ahead: datetime.timedelta, measured: bool,
              lifetime: datetime.timedelta = HALF_HOUR, windows: int = 3
              ) -> tuple[list[datetime.datetime], list[StoredEnrollment]]:
    """Run the manager's plan over a few lifetimes of registrar time in 5 s steps, renewing
    whenever it says so; returns the registrar times of the renewals and what they issued."""
    registrar_time, mono = [NOW], [1000.0]
    manager = _manager(tmp_path, ca, lambda: registrar_time[0] + ahead, mono)
    issued = [_renew(manager, ca, lifetime, NOW)]
    renewals = []
    step = datetime.timedelta(seconds=5)
    while registrar_time[0] < NOW + windows * lifetime:
        if measured:  # every response's Date header says how far off the local clock is
            manager.observe_offset(-ahead.total_seconds())
        now = manager.registrar_now()
        if now >= manager._target(now):
            renewals.append(registrar_time[0])
            issued.append(_renew(manager, ca, lifetime, registrar_time[0]))
        registrar_time[0] += step
        mono[0] += step.total_seconds()
    return renewals, issued


@pytest.mark.parametrize("ahead", [25 * MINUTE, 3 * 86400 * datetime.timedelta(seconds=1),
                                   -25 * MINUTE, -HALF_HOUR * 0.9])
def test_a_wrong_clock_renews_once_per_window_and_before_expiry(tmp_path, ca, ahead):
    renewals, issued = _simulate(tmp_path, ca, ahead, measured=True)
    # 30 min certificates renewed at 2/3 +-10 % of the lifetime from notBefore (backdated
    # 3 min): 15-19 min apart, whatever the local clock says.
    gaps = [b - a for a, b in itertools.pairwise([NOW, *renewals])]
    assert 4 <= len(renewals) <= 6, renewals
    assert min(gaps) >= 15 * MINUTE - datetime.timedelta(seconds=5), gaps
    for renewal, previous in zip(renewals, issued, strict=False):
        assert renewal < previous.tls.certificate.not_valid_after_utc  # never a gap


def test_without_any_measurement_the_floor_still_bounds_renewals(tmp_path, ca):
    # The worst case: a clock 25 min ahead and no Date header ever read. By the local
    # clock every certificate is due at once; the floor (11 min here) holds them back.
    renewals, _ = _simulate(tmp_path, ca, 25 * MINUTE, measured=False)
    gaps = [b - a for a, b in itertools.pairwise(renewals)]
    assert len(renewals) <= 10 and min(gaps) >= 10 * MINUTE, gaps


def test_a_held_renewal_is_said_once_and_shown_in_status(tmp_path, ca):
    local, mono = [NOW + 25 * MINUTE], [1000.0]
    manager = _manager(tmp_path, ca, lambda: local[0], mono)
    _renew(manager, ca, HALF_HOUR, NOW)
    now = manager.registrar_now()
    target = manager._target(now)
    # The floor is a third of the validity (33 min with the 3 min backdate), all ahead.
    assert manager.renewal_floor() == 660.0
    assert target == now + datetime.timedelta(seconds=660)
    manager._note_hold(now, target)
    manager._note_hold(now, target)
    assert manager.state == HELD and manager.held_until == target
    assert "at least 660s apart" in manager.hold_reason()
    held = [r for r in manager.audit.records() if r["event"] == "renewal-held"]
    assert len(held) == 1 and held[0]["floor_s"] == 660.0


def test_a_clock_jump_that_was_a_correction_does_not_renew(tmp_path, ca):
    """The wall clock jumps 19 h forward; measuring again shows the registrar's time did not
    move (NTP corrected a clock that was behind), so nothing is renewed."""
    wall, mono = [NOW + datetime.timedelta(hours=1)], [1000.0]
    probes = []

    async def probe() -> float | None:
        probes.append(wall[0])
        return (NOW + datetime.timedelta(hours=1) - wall[0]).total_seconds()

    manager = _manager(tmp_path, ca, lambda: wall[0], mono, probe)
    stored, key = _stored(ca, datetime.timedelta(hours=24))
    manager.enrollment.stored = stored
    manager.holder.publish(TlsCredentials(stored.device_id, stored.tls.chain, key))

    async def scenario() -> bool:
        stop = asyncio.Event()
        waiting = asyncio.create_task(manager._wait(stop))
        await asyncio.sleep(0.05)
        wall[0] = NOW + datetime.timedelta(hours=20)
        mono[0] += 0.05
        manager._kick.event.set()  # wake the tick now
        manager._kick.event.clear()
        await asyncio.sleep(0.05)
        done = waiting.done()
        stop.set()
        await waiting
        return done

    assert asyncio.run(scenario()) is False  # still waiting: renewal in 15 h
    assert len(probes) == 2  # at the start (stale) and after the jump
    assert manager.clock_offset == pytest.approx(-19 * 3600)
    assert manager.registrar_now() == NOW + datetime.timedelta(hours=1)


def test_skew_events_fire_once_per_crossing(tmp_path, ca, caplog):
    manager = _manager(tmp_path, ca, lambda: NOW, [0.0])
    with caplog.at_level(logging.INFO, logger="agent.daemon.rotation"):
        for offset in (-1500.0, -1490.0, 2.0, 3.0, 400.0):
            manager.observe_offset(offset)
    events = [getattr(r, "DEVID_EVENT", None) for r in caplog.records]
    assert events == ["clock-skew", "clock-skew-resolved", "clock-skew"]
    assert [r["event"] for r in manager.audit.records()] == ["clock-skew", "clock-skew"]


# --- the clock check and status ------------------------------------------------------------

@pytest.mark.parametrize("offset, level, words", [
    (None, None, None),
    (0.4, Level.PASS, "agrees"),
    (-200.0, Level.WARN, "3m 20s ahead"),
    (-1500.0, Level.FAIL, "25m 0s ahead"),
    (2 * 86400.0, Level.FAIL, "2d 0h behind"),
])
def test_the_clock_is_judged_against_the_registrar(offset, level, words):
    result = judge_registrar_offset(offset, skew=300)
    if level is None:
        assert result is None
        return
    assert result.level is level and words in result.summary
    if level > Level.PASS:
        assert "timedatectl set-ntp true" in result.hint
    # It outranks the NTP flag: a synchronised clock can still follow a wrong server.
    checked = check_clock(ClockFacts(NOW.timestamp(), True, offset), [], skew=300)
    assert checked.level is level and words in checked.summary
    # Without NTP the clock warns, and says whether it agrees with the registrar anyway.
    unsynced = check_clock(ClockFacts(NOW.timestamp(), False, offset), [], skew=300)
    assert unsynced.level is max(level, Level.WARN) and words in unsynced.summary


def test_status_leads_with_the_clock_when_it_is_off():
    rotation = RotationFacts("scheduled", True, tls_certificate=LEAF, presented=True)

    def clock(offset: float, synchronized: bool = True) -> ClockFacts:
        return ClockFacts(AT.timestamp(), synchronized, offset)

    doc = build_status(facts(), AGENT, True, ENROLLED, AT, rotation, skew=300,
                       clock=clock(-1500.0))
    assert doc["state"] == "FAIL" and doc["reasons"] == [
        "clock reads 2026-11-21 12:00:00Z: the local clock is 25m 0s ahead of the registrar's "
        "(registrar minus local -1500s, tolerated 5m 0s)"]
    # Status leaves NTP to `check`: an unsynchronised clock that agrees is no reason.
    assert build_status(facts(), AGENT, True, ENROLLED, AT, rotation, skew=300,
                        clock=clock(-10.0, synchronized=False))["state"] == "OK"


def test_status_names_a_clock_behind_the_certificates_and_skips_what_it_explains():
    # Two days behind, the offset unknown (TLS to the registrar fails on the dates):
    # the certificates themselves say the clock is behind.
    behind = AT - datetime.timedelta(days=2)
    doc = build_status(facts(), AGENT, True, ENROLLED, behind,
                       RotationFacts("scheduled", True, tls_certificate=LEAF, presented=True),
                       skew=300, clock=ClockFacts(behind.timestamp(), True, None))
    assert doc["state"] == "FAIL" and len(doc["reasons"]) == 1, doc["reasons"]
    assert "before the identity certificate starts to be valid" in doc["reasons"][0]


# --- the stored offset -----------------------------------------------------------------------

def test_the_offset_is_kept_with_the_identity_record(ca):
    stored, _ = _stored(ca)
    renewed = stored.renewed(stored.chain, stored.serial, stored.tls, NOW, -1500.0)
    again = StoredEnrollment.from_json(renewed.to_json(), "enrollment.json")
    assert again.registrar_offset_s == -1500.0
    # A renewal whose response had no Date keeps the offset it had.
    assert again.renewed(stored.chain, stored.serial, stored.tls, NOW).registrar_offset_s \
        == -1500.0
    damaged = renewed.to_json().replace(b'"registrar_offset_s": -1500.0',
                                        b'"registrar_offset_s": "soon"')
    with pytest.raises(StateError, match="registrar_offset_s: expected seconds or null"):
        StoredEnrollment.from_json(damaged, "enrollment.json")
    older = renewed.to_json().replace(b'"registrar_offset_s": -1500.0,', b"")
    assert StoredEnrollment.from_json(older, "enrollment.json").registrar_offset_s is None


# --- the registrar's limits --------------------------------------------------------------------

def _csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "tls")])).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.DER)


def _renew_request(service, identity: ec.EllipticCurvePrivateKey) -> tuple[str, bytes]:
    """A renewal signed by the identity key whose quote is rubbish: what comes back says
    how far the registrar got."""
    challenge = service.challenge(_body(DeviceChallengeRequest(device_id=DEVICE,
                                                               purpose="renew")), "test")
    attest, csr = b"not a quote", _csr()
    signature = identity.sign(device_request_message(
        "renew", DEVICE, challenge.challenge_id, challenge.nonce, attest, csr),
        ec.ECDSA(hashes.SHA256()))
    return challenge.challenge_id, _body(RenewRequest(
        ak_public=b"ak", quote=Evidence(attest=attest, signature=b"sig"), pcr_values=[],
        tls_csr=csr, signature=signature))


def _renewed(service, at: datetime.datetime, n: int) -> None:
    """Record `n` renewals of the device at registrar time `at`."""
    for i in range(n):
        stamp = at.timestamp()
        service.store.record_renewal("x", DEVICE, [
            IssuedCertificate(f"{at:%H%M}{i}a", DEVICE, "identity", stamp, stamp + 3600),
            IssuedCertificate(f"{at:%H%M}{i}b", DEVICE, "tls", stamp, stamp + 3600)],
            at.isoformat())


def test_renewals_beyond_the_window_allowance_are_refused_after_authentication(tmp_path, ca):
    identity = ec.generate_private_key(ec.SECP256R1())
    service = _lifecycle(tmp_path, ca, identity)  # cert_lifetime 1 h: 3 per 6 min
    # Enrollment does not count, nor do two renewals (a retry after a fault): not early.
    # The request fails later on, at the AK that follows the rate check.
    _renewed(service, NOW, 1)
    _renewed(service, NOW + MINUTE, 1)
    service._clock = lambda: NOW + 2 * MINUTE
    with pytest.raises(Problem) as exc:
        service.renew(*_renew_request(service, identity), "test")
    assert exc.value.message == "ak_public: not a valid TPM2B_PUBLIC"

    _renewed(service, NOW + 2 * MINUTE, 1)  # the third in six minutes: a loop
    service._clock = lambda: NOW + 3 * MINUTE
    with pytest.raises(Problem) as exc:
        service.renew(*_renew_request(service, identity), "test")
    assert exc.value.code == "renewal-too-early" and exc.value.status == 429
    # Allowed again when the oldest of the three leaves the window: at NOW + 6 min.
    assert exc.value.retry_after == pytest.approx(180)
    assert exc.value.message.endswith("renewed 3 times in the last 360s, the last 60s ago; "
                                      "this registrar allows 3 renewals per 360s")
    refused = [r for r in service.audit.records() if r["event"] == "renewal-refused"]
    assert refused[-1]["problem"] == "renewal-too-early"

    # Not authenticated: the signature is checked first, so a stranger learns nothing.
    challenge_id, body = _renew_request(service, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(Problem) as exc:
        service.renew(challenge_id, body, "test")
    assert exc.value.code == "request-signature-invalid"

    service._clock = lambda: NOW + 6 * MINUTE + datetime.timedelta(seconds=1)  # one left
    with pytest.raises(Problem) as exc:
        service.renew(*_renew_request(service, identity), "test")
    assert exc.value.message == "ak_public: not a valid TPM2B_PUBLIC"


@pytest.mark.parametrize("settings, window", [
    ({}, 600.0),  # 24 h certificates: a tenth, capped at 10 min
    ({"cert_lifetime": "30m"}, 180.0),
    ({"renewal_window": "1h"}, 3600.0),
    ({"renewal_window": "0s"}, 0.0),  # off
])
def test_renewal_window_defaults_to_a_tenth_of_the_lifetime(settings, window):
    assert RegistrarConfig.model_validate(settings).effective_renewal_window() == window


@pytest.mark.parametrize("text, needle", [
    ('renewal_window = "-5m"', "renewal_window"),
    ('renewal_window = "31d"', "between 0s and 30d"),
    ("max_renewals_per_window = 0", "max_renewals_per_window"),
    ("max_in_flight = 0", "max_in_flight"),
    ("max_connections = 2", "max_connections"),
    ('max_connections = "many"', "max_connections"),
    ('request_timeout = "soon"', "request_timeout"),
    ("handshake_timeout = -1", "handshake_timeout"),
])
def test_registrar_limits_are_validated_by_key(tmp_path, text, needle):
    from agent.tomlconfig import parse_toml_model

    with pytest.raises(ConfigError) as exc:
        parse_toml_model(RegistrarConfig, text, tmp_path / "registrar.toml", ())
    assert needle in exc.value.message


def test_agent_min_interval_must_be_positive(tmp_path):
    with pytest.raises(ConfigError) as exc:
        parse_config('[rotation]\nmin_interval = "0s"\n', tmp_path / "agent.toml")
    assert "min_interval" in exc.value.message


def test_in_flight_limit_refuses_beyond_the_limit_with_a_spread_retry_after(caplog):
    draws = iter([0.0, 0.99, 0.5])
    limit = InFlightLimit(2, rng=lambda: next(draws), monotonic=lambda: 0.0)
    limit.enter()
    limit.enter()
    with caplog.at_level(logging.WARNING, logger="agent.registrar.admission"):
        retry = []
        for _ in range(2):
            with pytest.raises(Problem) as exc:
                limit.enter()
            assert exc.value.code == "registrar-busy" and exc.value.status == 503
            retry.append(exc.value.retry_after)
    assert retry == [2.0, pytest.approx(3.98)]
    assert len(caplog.records) == 1  # one warning a minute, not one per refusal
    limit.leave()
    limit.enter()  # a slot came free
    assert limit.in_flight == 2
