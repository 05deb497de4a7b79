import datetime
import errno
import os

import pytest

from agent.backoff import Backoff
from agent.cli.render import render_check, render_status
from agent.diagnostics.checks import Level, check_clock, check_ek, check_state_dir, worst
from agent.diagnostics.enrollment import EnrollmentFacts
from agent.diagnostics.facts import (
    ClockFacts,
    EkFacts,
    IdentityFacts,
    PathFacts,
    TpmFacts,
    collect_path_facts,
)
from agent.diagnostics.status import build_status
from agent.errors import EkMismatch, TpmUnreachable
from agent.fsutil import write_atomic
from agent.pki.ekchain import ChainVerdict
from agent.secret import SecretBytes
from agent.tpm.info import TpmInfo

INFO = TpmInfo("IBM", "IBM (software TPM)", "SW TPM", "1.2", "2.0 rev 1.64", 3)
CERT = {"subject": "CN=unknown", "issuer": "CN=ca", "not_before": "2026-01-01T00:00:00+00:00",
        "not_after": "9999-12-31T23:59:59+00:00", "serial": "3", "sha256": "ab",
        "valid_now": True}
IDENT = IdentityFacts("000b" + "00" * 32, "cd" * 32, True)


def facts(verified=True, **kw):
    ek = EkFacts("EK-ECC256", 0x01C0000A, CERT, ChainVerdict(verified, "why", ("a", "b")))
    base = {"tcti": "swtpm:port=1", "info": INFO, "endorsement": [ek], "identity": IDENT}
    return TpmFacts(**{**base, **kw})


AGENT = {"version": "0.1.0", "pid": 1, "uptime_s": 3723.0}
AT = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC)
LEAF = {**CERT, "subject": "CN=devid ab,2.5.4.5=ab", "not_before": "2026-11-21T00:00:00+00:00",
        "not_after": "2026-11-22T00:00:00+00:00"}
ENROLLED = EnrollmentFacts("enrolled", "https://r:8443", "urn:devid:ab", certificate=LEAF,
                           key_matches=True)


def test_status_ok():
    doc = build_status(facts(), AGENT, roots_configured=True, enrollment=ENROLLED, now=AT)
    assert doc["state"] == "OK" and doc["reasons"] == []
    assert doc["enrollment"]["device_id"] == "urn:devid:ab"
    assert doc["certificate"]["key_matches_tpm"] is True
    assert doc["tpm"]["ek_certificate"]["verified"] is True
    assert doc["identity"]["key_resident"] is True
    text = render_status(doc)
    assert "devid-agent: OK" in text and "1h 02m 03s" in text and "resident: yes" in text


def test_status_fail_when_tpm_unreachable():
    doc = build_status(TpmFacts("device:/dev/tpmrm0", error=TpmUnreachable("gone")), AGENT, True,
                       ENROLLED, AT)
    assert doc["state"] == "FAIL"
    assert doc["tpm"]["reachable"] is False and doc["tpm"]["error"]["type"] == "tpm-unreachable"
    assert doc["identity"]["key_resident"] is False
    assert "UNREACHABLE" in render_status(doc)


def test_status_warn_without_roots_and_fail_when_untrusted():
    untrusted = facts(verified=False)
    assert build_status(untrusted, AGENT, False, ENROLLED, AT)["state"] == "WARN"
    assert build_status(untrusted, AGENT, True, ENROLLED, AT)["state"] == "FAIL"


@pytest.mark.parametrize("enrollment, state, needle", [
    (EnrollmentFacts("not_configured"), "WARN", "enrollment not configured"),
    (EnrollmentFacts("pending", "https://r"), "WARN", "enrolling with https://r (attempt 1)"),
    (EnrollmentFacts("failed", "https://r", attempts=3,
                     last_error={"type": "token-used", "message": "token: already used",
                                 "hint": "create a new one"},
                     next_attempt=AT), "FAIL",
     "enrollment failed after 3 attempt(s): token-used: token: already used"),
    (EnrollmentFacts("enrolled", "https://r", "urn:devid:ab",
                     certificate={**LEAF, "not_after": "2026-11-21T11:00:00+00:00"}), "FAIL",
     "expired at 2026-11-21 11:00:00Z"),
    (EnrollmentFacts("enrolled", "https://r", "urn:devid:ab",
                     certificate={**LEAF, "not_before": "2026-11-21T13:00:00+00:00"}), "FAIL",
     "not valid until 2026-11-21 13:00:00Z by the local clock"),
    (EnrollmentFacts("enrolled", "https://r", "urn:devid:ab", certificate=LEAF,
                     key_matches=False), "FAIL", "not for this TPM's identity key"),
])
def test_enrollment_states_set_the_headline_with_a_reason(enrollment, state, needle):
    doc = build_status(facts(), AGENT, True, enrollment, AT)
    assert doc["state"] == state
    assert any(needle in r for r in doc["reasons"]), doc["reasons"]
    render_status(doc)  # renders every state without error


def test_ek_mismatch_fails_with_hint():
    r = check_ek(facts(endorsement=[], ek_error=EkMismatch("differs")), True)
    assert r.level is Level.FAIL and "do not enroll" in r.hint


NOW = datetime.datetime(2026, 11, 21, 12, tzinfo=datetime.UTC).timestamp()


@pytest.mark.parametrize("now, synced, not_before, level, needle", [
    (NOW, True, [], Level.PASS, "NTP-synchronized"),
    (NOW, None, [], Level.PASS, "unknown"),
    (NOW, False, [], Level.WARN, "not NTP-synchronized"),
    (0.0, True, [], Level.FAIL, "before this agent's release"),
    (NOW, True, [("the EK certificate", datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC))],
     Level.FAIL, "before the EK certificate starts to be valid"),
])
def test_clock(now, synced, not_before, level, needle):
    r = check_clock(ClockFacts(now, synced), not_before)
    assert r.level is level and needle in r.summary


def test_state_dir_checks(tmp_path):
    d = tmp_path / "state"
    assert check_state_dir(collect_path_facts(d), 0).level is Level.WARN  # missing
    d.mkdir(mode=0o700)
    uid = os.geteuid()
    assert check_state_dir(collect_path_facts(d), uid).level is Level.PASS
    assert check_state_dir(collect_path_facts(d), uid + 1).level is Level.FAIL
    (d / "blob.json").write_text("{}")
    os.chmod(d / "blob.json", 0o644)
    r = check_state_dir(collect_path_facts(d), uid)
    assert r.level is Level.WARN and "blob.json" in r.summary
    os.chmod(d, 0o777)
    assert check_state_dir(collect_path_facts(d), uid).level is Level.FAIL
    assert check_state_dir(PathFacts(str(d), True, False), uid).level is Level.FAIL
    locked = check_state_dir(PathFacts(str(d), True, True, 0o000, uid), uid)
    assert locked.level is Level.FAIL and "not usable by its owner (mode 0000)" in \
        locked.summary and locked.hint == f"chmod 0700 {d}"


def test_worst_and_render_check():
    from agent.diagnostics.checks import CheckResult
    results = [CheckResult("a", Level.PASS, "fine"), CheckResult("b", Level.WARN, "hm", "do x")]
    assert worst(results) is Level.WARN and worst([]) is Level.PASS
    text = render_check({"state": "WARN", "results": [r.to_dict() for r in results]})
    assert "WARN  b" in text and "hint: do x" in text


def test_write_atomic_is_private_and_keeps_old_content_on_enospc(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_atomic(path, b"old")
    assert path.read_bytes() == b"old" and path.stat().st_mode & 0o777 == 0o600

    def no_space(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


def test_backoff_grows_caps_and_resets():
    import random
    b = Backoff(initial=1, cap=8, jitter=0.1, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(6)]
    assert 0.9 <= delays[0] <= 1.1 and 1.8 <= delays[1] <= 2.2
    assert all(d <= 8.8 for d in delays) and delays[-1] >= 7.2
    b.reset()
    assert b.next_delay() <= 1.1


def test_secret_bytes_never_prints():
    s = SecretBytes(b"hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in f"{s}" and len(s) == 7
    assert s == SecretBytes(b"hunter2") and s.reveal() == b"hunter2"
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(s)


def test_checks_that_did_not_run_do_not_pass():
    from agent.diagnostics.enrollment import EnrollmentFacts, check_enrollment
    from agent.diagnostics.rotation import RotationFacts, check_rotation

    skipped = check_rotation(RotationFacts("not_configured", enrolled=False), AT, 300.0)
    assert skipped.level is Level.WARN and skipped.summary == "not checked: not enrolled"
    # Read from the state directory while the daemon is down: nobody is enrolling.
    local = check_enrollment(EnrollmentFacts("pending", "https://r", local=True), AT)
    assert "not enrolled yet with https://r" in local.summary and "attempt" not in \
        local.summary
    live = check_enrollment(EnrollmentFacts("pending", "https://r", attempts=2), AT)
    assert "(attempt 3)" in live.summary
