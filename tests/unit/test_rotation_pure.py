"""Rotation without a TPM or a network: schedule, health, stored record, registrar
lifecycle decisions, store migration, CRL, hooks, credentials holder, clock jumps."""

from __future__ import annotations

import asyncio
import datetime
import sqlite3
import statistics
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC

from agent.audit import AuditLog
from agent.config import RotationSection, parse_config
from agent.daemon.enrollment import EnrollmentManager
from agent.daemon.hooks import run_hooks
from agent.daemon.rotation import RotationManager
from agent.enroll.evidence import device_request_message, tpm_name
from agent.enroll.messages import (
    DecommissionRequest,
    DeviceChallengeRequest,
    Evidence,
    RenewRequest,
    encode,
)
from agent.enroll.state import StoredEnrollment, StoredTls
from agent.errors import ConfigError, Problem, StateError
from agent.pki.devicecert import Validity, verification_time
from agent.registrar.ca import CertificateAuthority
from agent.registrar.config import RegistrarConfig
from agent.registrar.lifecycle import LifecycleService
from agent.registrar.store import DeviceRow, IssuedCertificate, Store
from agent.rotation import schedule
from agent.rotation.credentials import CredentialHolder, TlsCredentials
from agent.rotation.tlskey import key_from_secret, key_to_secret, new_tls_key
from agent.secret import SecretBytes
from agent.tpm.blobs import KeyBlob
from tests.certprofile import PROFILE, PUBLICATION

DEVICE = "urn:devid:" + "ab" * 16  # as the registrar derives them
OTHER_DEVICE = "urn:devid:" + "cd" * 16

NOW = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
DAY = Validity(NOW, NOW + datetime.timedelta(hours=24))


# --- schedule ---------------------------------------------------------------------------

def test_renewal_point_is_two_thirds_within_ten_percent_and_stable_per_serial():
    points = [schedule.renew_at(DAY, f"{i:x}") for i in range(500)]
    offsets = [(p - NOW) / datetime.timedelta(hours=16) for p in points]
    assert all(0.9 <= o <= 1.1 for o in offsets)
    assert 0.98 < statistics.mean(offsets) < 1.02 and statistics.pstdev(offsets) > 0.04
    assert schedule.renew_at(DAY, "abc") == schedule.renew_at(DAY, "abc")  # restart-stable


def test_retry_never_waits_past_expiry():
    validity = Validity(NOW, NOW + datetime.timedelta(seconds=100))
    near_end = NOW + datetime.timedelta(seconds=90)
    retry = schedule.retry_at(near_end, 300, validity)
    assert near_end < retry < validity.not_after
    assert schedule.retry_at(NOW, 10, validity) == NOW + datetime.timedelta(seconds=10)
    expired = NOW + datetime.timedelta(seconds=200)
    assert schedule.retry_at(expired, 30, validity) == expired + datetime.timedelta(seconds=30)


@pytest.mark.parametrize("at, skew, expected", [
    (NOW + HOUR, 0, schedule.Health.OK),
    (NOW + datetime.timedelta(hours=21), 0, schedule.Health.EXPIRING),  # 3h < 24h/6 left
    (NOW + datetime.timedelta(hours=25), 0, schedule.Health.EXPIRED),
    (NOW - datetime.timedelta(minutes=10), 300, schedule.Health.NOT_YET_VALID),
    (NOW - datetime.timedelta(minutes=4), 300, schedule.Health.OK),  # within the skew
])
def test_health(at, skew, expected):
    assert schedule.health(DAY, at, skew) is expected


def test_clock_jump_is_the_disagreement_of_wall_and_monotonic_time():
    assert schedule.clock_jump(NOW, 100.0, NOW + datetime.timedelta(seconds=10), 110.0) is None
    assert schedule.clock_jump(NOW, 100.0, NOW + HOUR, 110.0) == pytest.approx(3590)
    assert schedule.clock_jump(NOW, 100.0, NOW - HOUR, 110.0) == pytest.approx(-3610)


def test_verification_time_tolerates_a_lagging_clock_up_to_the_skew():
    fresh = Validity(NOW, NOW + HOUR)
    lag = NOW - datetime.timedelta(seconds=60)
    assert verification_time(fresh, lag, 300) == NOW
    assert verification_time(fresh, lag, 30) is None
    assert verification_time(fresh, NOW + HOUR / 2, 0) == NOW + HOUR / 2


# --- the stored record --------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca") / "ca", NOW - HOUR)


def _identity_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.USERWITHAUTH)
    return bytes(TPM2B_PUBLIC.from_pem(pem, objectAttributes=attrs).marshal())


def _stored(ca: CertificateAuthority, lifetime: datetime.timedelta = HOUR,
            now: datetime.datetime = NOW) -> tuple[StoredEnrollment, ec.EllipticCurvePrivateKey]:
    identity = ec.generate_private_key(ec.SECP256R1())
    tls_key = new_tls_key()
    cert = ca.issue_device(DEVICE, identity.public_key(), lifetime, now, "identity", PROFILE,
                           PUBLICATION)
    tls = ca.issue_device(DEVICE, tls_key.public_key(), lifetime, now, "tls", PROFILE,
                          PUBLICATION)
    blob = KeyBlob.sealed(_identity_public(identity), bytes(TPM2B_PRIVATE(b"wrapped").marshal()),
                          [7], [b"\x11" * 32])
    stored = StoredEnrollment(DEVICE, "https://r", now, format(cert.serial_number, "x"),
                              (cert, ca.issuing))
    return stored.renewed((cert, ca.issuing), format(cert.serial_number, "x"),
                          StoredTls((tls, ca.issuing), format(tls.serial_number, "x"), blob),
                          now), tls_key


def test_stored_record_round_trips_and_revocation_drops_the_sealed_key(ca):
    stored, _ = _stored(ca)
    again = StoredEnrollment.from_json(stored.to_json(), "enrollment.json")
    assert again.generation == 1 and again.tls is not None
    assert again.tls.sealed_key == stored.tls.sealed_key and again.tls.serial == stored.tls.serial
    revoked = StoredEnrollment.from_json(stored.revoked("device-revoked: x").to_json(), "e")
    assert revoked.lifecycle == "revoked" and revoked.tls is None
    assert b"sealed_key" not in stored.revoked("r").to_json()


@pytest.mark.parametrize("change, needle", [
    (('"generation": 1', '"generation": -1'), "generation: expected a non-negative integer"),
    (('"lifecycle": "active"', '"lifecycle": "gone"'), "lifecycle: expected"),
    (('"sealed_key": {', '"sealed_key": 3, "x": {'), "tls: sealed_key: expected an object"),
    (('"renewed_at": "', '"renewed_at": "not '), "renewed_at: not an ISO 8601 time"),
])
def test_damaged_v2_records_are_refused_by_field(ca, change, needle):
    text = _stored(ca)[0].to_json().decode().replace(*change)
    with pytest.raises(StateError) as exc:
        StoredEnrollment.from_json(text.encode(), "enrollment.json")
    assert needle in exc.value.message


def test_tls_key_survives_sealing_as_a_scalar():
    key = new_tls_key()
    assert key_from_secret(key_to_secret(key)).private_numbers() == key.private_numbers()
    assert repr(key_to_secret(key)) == "<secret: 32 bytes>"
    with pytest.raises(StateError, match="expected 32"):
        key_from_secret(SecretBytes(b"short"))


# --- credentials --------------------------------------------------------------------------

def test_holder_never_hands_out_expired_or_withdrawn_credentials(ca):
    stored, key = _stored(ca)
    holder = CredentialHolder(clock=lambda: NOW)
    seen = []
    holder.subscribe(lambda creds, reason: seen.append((creds, reason)))
    creds = TlsCredentials(stored.device_id, stored.tls.chain, key)
    holder.publish(creds)
    assert holder.current() is creds
    assert holder.current(NOW + 2 * HOUR) is None  # expired: never presented
    context = creds.ssl_context("client", ca.root.public_bytes(serialization.Encoding.PEM)
                                .decode())
    assert context is creds.ssl_context("client", ca.root.public_bytes(
        serialization.Encoding.PEM).decode())  # made once per trust
    holder.withdraw("revoked")
    assert holder.current() is None and seen == [(creds, None), (None, "revoked")]


# --- registrar lifecycle ------------------------------------------------------------------

def _lifecycle(tmp_path: Path, ca: CertificateAuthority,
               identity: ec.EllipticCurvePrivateKey) -> LifecycleService:
    store = Store(tmp_path / "r.db")
    config = RegistrarConfig(ek_roots=[Path("/dev/null")], cert_lifetime=3600.0)
    cert = ca.issue_device(DEVICE, identity.public_key(), HOUR, NOW, "identity", PROFILE,
                           PUBLICATION)
    record = IssuedCertificate(format(cert.serial_number, "x"), DEVICE, "identity",
                               NOW.timestamp(), (NOW + HOUR).timestamp())
    from agent.registrar.store import ChallengeRow

    challenge = ChallengeRow("c" * 32, DEVICE, b"ek", b"ak", b"s", b"n" * 32, None,
                             NOW.timestamp(), NOW.timestamp() + 60)
    store.add_challenge(challenge)
    store.claim_challenge(challenge.id, NOW.timestamp())
    store.complete_enrollment(challenge, DeviceRow(
        DEVICE, b"ek", b"\x00\x0bak-name", _identity_public(identity), "active", None,
        NOW.isoformat(), NOW.isoformat(), 1, record.serial, cert.not_valid_after_utc.isoformat()),
        record, NOW.timestamp())
    counter = iter(range(1000))
    return LifecycleService(config, ca, store, AuditLog(tmp_path / "audit.log"),
                            clock=lambda: NOW,
                            random_bytes=lambda n: next(counter).to_bytes(n, "big"))


def _body(message) -> bytes:
    import json

    return json.dumps(encode(message)).encode()


def test_decommissioning_needs_the_identity_key_and_revokes_everything(tmp_path, ca):
    identity = ec.generate_private_key(ec.SECP256R1())
    service = _lifecycle(tmp_path, ca, identity)
    request = _body(DeviceChallengeRequest(device_id=DEVICE, purpose="decommission"))
    first = service.challenge(request, "test")
    # Signed by another key: refused, and nothing is spent: a stranger cannot burn the
    # device's own challenge.
    forged = ec.generate_private_key(ec.SECP256R1()).sign(
        device_request_message("decommission", DEVICE, first.challenge_id, first.nonce),
        ec.ECDSA(hashes.SHA256()))
    for _ in range(2):
        with pytest.raises(Problem) as exc:
            service.decommission(first.challenge_id, _body(DecommissionRequest(
                signature=forged)), "test")
        assert exc.value.code == "request-signature-invalid"
    # A renewal signature does not decommission either: the purpose is signed.
    challenge = service.challenge(request, "test")
    renew_sig = identity.sign(device_request_message(
        "renew", DEVICE, challenge.challenge_id, challenge.nonce),
        ec.ECDSA(hashes.SHA256()))
    with pytest.raises(Problem) as exc:
        service.decommission(challenge.challenge_id, _body(DecommissionRequest(
            signature=renew_sig)), "test")
    assert exc.value.code == "request-signature-invalid"

    good = identity.sign(device_request_message(
        "decommission", DEVICE, first.challenge_id, first.nonce), ec.ECDSA(hashes.SHA256()))
    done = service.decommission(first.challenge_id, _body(DecommissionRequest(
        signature=good)), "test")
    assert done.status == "decommissioned" and len(done.revoked_serials) == 1
    crl = service.crl()
    assert crl.is_signature_valid(ca.issuing.public_key())
    assert {format(r.serial_number, "x") for r in crl} == set(done.revoked_serials)
    with pytest.raises(Problem) as exc:  # single use
        service.decommission(first.challenge_id, _body(DecommissionRequest(
            signature=good)), "test")
    assert exc.value.code == "challenge-used"
    # A challenge is still issued (that costs nothing and says nothing); the device
    # learns it is decommissioned once it has signed.
    late = service.challenge(request, "test")
    signed = identity.sign(device_request_message(
        "decommission", DEVICE, late.challenge_id, late.nonce), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(Problem) as exc:
        service.decommission(late.challenge_id, _body(DecommissionRequest(signature=signed)),
                             "test")
    assert exc.value.code == "device-decommissioned"
    events = [r["event"] for r in AuditLog(tmp_path / "audit.log").records()]
    assert events.count("decommission-refused") == 5 and "device-decommissioned" in events


def test_retired_and_unknown_devices_learn_it_only_after_signing(tmp_path, ca):
    identity = ec.generate_private_key(ec.SECP256R1())
    service = _lifecycle(tmp_path, ca, identity)
    issued = service.challenge(_body(DeviceChallengeRequest(device_id=DEVICE,
                                                            purpose="decommission")), "test")
    assert len(service.revoke(DEVICE, "stolen from site 7", "test")) == 1
    # Anyone gets a challenge for a revoked device: the answer says nothing of it.
    anonymous = service.challenge(_body(DeviceChallengeRequest(device_id=DEVICE,
                                                               purpose="renew")), "test")
    assert anonymous.device_id == DEVICE and "stolen" not in str(encode(anonymous))
    # Answered by the device: the revocation, without the operator's words; spent.
    signature = identity.sign(device_request_message(
        "decommission", DEVICE, issued.challenge_id, issued.nonce),
        ec.ECDSA(hashes.SHA256()))
    with pytest.raises(Problem) as exc:
        service.decommission(issued.challenge_id, _body(DecommissionRequest(
            signature=signature)), "test")
    assert exc.value.code == "device-revoked" and "stolen" not in exc.value.message
    state = sqlite3.connect(tmp_path / "r.db").execute(
        "SELECT state FROM device_challenges WHERE id = ?", (issued.challenge_id,)).fetchone()
    assert state == ("failed",)
    refused = [r for r in AuditLog(tmp_path / "audit.log").records()
               if r["event"] == "decommission-refused"]
    assert refused[-1]["device_id"] == DEVICE
    # An unknown device: a challenge, then device-unknown at the answer.
    other = service.challenge(_body(DeviceChallengeRequest(device_id=OTHER_DEVICE,
                                                           purpose="renew")), "test")
    with pytest.raises(Problem) as exc:
        service.renew(other.challenge_id, _body(RenewRequest(
            ak_public=b"ak", quote=Evidence(attest=b"q", signature=b"s"), pcr_values=[],
            tls_csr=b"csr", signature=b"sig")), "test")
    assert exc.value.code == "device-unknown"
    # Not a device ID this registrar makes: refused at once.
    with pytest.raises(Problem) as exc:
        service.challenge(_body(DeviceChallengeRequest(device_id="urn:devid:zz",
                                                       purpose="renew")), "test")
    assert exc.value.code == "device-unknown"
    with pytest.raises(Problem) as exc:
        service.revoke("urn:devid:zz", "typo", "test")
    assert exc.value.code == "device-unknown"


def test_crl_leaves_out_expired_certificates(tmp_path, ca):
    service = _lifecycle(tmp_path, ca, ec.generate_private_key(ec.SECP256R1()))
    service.revoke(DEVICE, "stolen", "test")
    assert len(service.crl()) == 1
    service._clock = lambda: NOW + 2 * HOUR  # the certificate expired meanwhile
    assert len(service.crl()) == 0


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE devices (device_id TEXT PRIMARY KEY, ek_certificate BLOB NOT NULL,
            ak_name BLOB NOT NULL, identity_public BLOB NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
            tpm_manufacturer TEXT, enrolled_at TEXT NOT NULL, updated_at TEXT NOT NULL,
            enrollments INTEGER NOT NULL DEFAULT 1, cert_serial TEXT NOT NULL,
            cert_not_after TEXT NOT NULL);
        INSERT INTO devices VALUES ('urn:devid:abababababababababababababababab',
            x'00', x'00', x'00', 'active', NULL,
            '2026-11-20T00:00:00+00:00', '2026-11-20T00:00:00+00:00', 1, 'beef',
            '2026-11-22T00:00:00+00:00');
    """)
    db.commit()
    db.close()
    store = Store(path)
    [device] = store.devices()
    assert device.status == "active" and device.renewals == 0
    assert [c.serial for c in store.certificates_of(DEVICE)] == ["beef"]
    assert store.retire_device(DEVICE, "decommissioned", "test", NOW.timestamp()) \
        == ["beef"]
    store.close()
    assert Store(path).device(DEVICE).status == "decommissioned"  # reopen: no-op


# --- hooks and config ---------------------------------------------------------------------

def test_hooks_report_failures_and_timeouts_without_raising(tmp_path):
    script = tmp_path / "hook.sh"
    script.write_text("#!/bin/sh\necho \"bad $DEVID_TLS_SERIAL\" >&2\nexit 3\n")
    script.chmod(0o755)
    results = asyncio.run(run_hooks([[str(script)], ["/bin/sleep", "5"], ["/nonexistent"]],
                                    {"DEVID_TLS_SERIAL": "abc"}, timeout=0.5))
    assert [r.ok for r in results] == [False, False, False]
    assert results[0].detail == "exit 3: bad abc"
    assert results[1].detail.startswith("timed out after")
    assert results[2].detail.startswith("cannot run")


@pytest.mark.parametrize("line, needle", [
    ('reload_hooks = ["systemctl reload x"]', "start with an absolute path"),
    ('reload_hooks = ["/bin/x \'unclosed"]', "No closing quotation"),
    ("renew_fraction = 1.5", "renew_fraction"),
    ("seal_pcrs = [24]", "seal_pcrs"),
])
def test_rotation_config_errors_name_the_key(tmp_path, line, needle):
    with pytest.raises(ConfigError) as exc:
        parse_config(f"[rotation]\n{line}\n", tmp_path / "agent.toml")
    assert needle in exc.value.message and "[rotation]" in exc.value.message


# --- a wall-clock jump re-plans the wait --------------------------------------------------

def test_a_clock_jump_forward_renews_at_once_instead_of_skipping(tmp_path, ca):
    stored, key = _stored(ca, lifetime=datetime.timedelta(hours=24))
    wall = [NOW + HOUR]
    mono = [1000.0]
    audit = AuditLog(tmp_path / "audit.log")
    enrollment = EnrollmentManager(None, tmp_path, audit)
    enrollment.stored = stored
    holder = CredentialHolder(clock=lambda: wall[0])
    holder.publish(TlsCredentials(stored.device_id, stored.tls.chain, key))
    section = parse_config('[enrollment]\nurl = "https://r"\nca = "ca.pem"\n',
                           _write_ca(tmp_path, ca)).enrollment

    async def unreachable() -> float | None:
        return None  # the jump cannot be measured: time is taken to have passed

    manager = RotationManager(RotationSection(), section, enrollment, holder, audit,
                              clock=lambda: wall[0], monotonic=lambda: mono[0],
                              probe_offset=unreachable)

    async def scenario() -> bool:
        stop = asyncio.Event()
        waiting = asyncio.create_task(manager._wait(stop))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # 15 hours to go
        wall[0] = NOW + datetime.timedelta(hours=20)  # the wall clock jumps past renew_at
        mono[0] += 0.05
        manager._kick.event.set()  # wake the tick now instead of within 10 s
        manager._kick.event.clear()
        return await asyncio.wait_for(waiting, 15)

    assert asyncio.run(scenario()) is True
    jumps = [r for r in audit.records() if r["event"] == "clock-jump"]
    assert jumps and jumps[0]["seconds"] > 3600


def _write_ca(tmp_path: Path, ca: CertificateAuthority) -> Path:
    (tmp_path / "ca.pem").write_bytes(ca.root.public_bytes(serialization.Encoding.PEM))
    return tmp_path / "agent.toml"


def test_device_request_messages_cannot_be_confused():
    a = device_request_message("renew", "urn:devid:a", "c1", b"n", b"xy", b"z")
    b = device_request_message("renew", "urn:devid:a", "c1", b"n", b"x", b"yz")
    assert a != b  # length prefixes
    assert device_request_message("renew", "d", "c", b"n") != \
        device_request_message("decommission", "d", "c", b"n")
    assert tpm_name  # imported for the lifecycle tests' AK names
