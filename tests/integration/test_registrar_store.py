"""The registrar's store on both backends: the embedded SQLite file and a real
PostgreSQL server (tests/postgres.py). Each test runs on each; the race tests
drive one store from many threads and, on PostgreSQL, two stores (two replicas'
connections) at once."""

from __future__ import annotations

import concurrent.futures

import pytest

from agent.errors import Problem
from agent.registrar.sql import PostgresConnection
from agent.registrar.store import ChallengeRow, DeviceRow, IssuedCertificate, Store


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path, postgres):
    """A function opening another connection to one fresh database (a replica's)."""
    if request.param == "sqlite":
        return lambda: Store(tmp_path / "r.db")
    name = postgres.database()
    return lambda: Store(PostgresConnection(postgres.conninfo(name), name))


@pytest.fixture
def store(backend):
    opened = backend()
    yield opened
    opened.close()


def _challenge(store, cid="c" * 32, now=1000.0, ttl=60.0, token_hash=None):
    row = ChallengeRow(cid, "urn:devid:x", b"ek", b"ak", b"s" * 32, cid.encode(), token_hash,
                       now, now + ttl)
    store.add_challenge(row)
    return row


def test_a_challenge_is_claimed_once_even_under_concurrency(store):
    _challenge(store)

    def claim(_):
        try:
            store.claim_challenge("c" * 32, 1001.0)
            return "claimed"
        except Problem as p:
            return p.code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(claim, range(16)))
    assert outcomes.count("claimed") == 1
    assert set(outcomes) == {"claimed", "challenge-used"}


def test_expired_and_unknown_challenges_are_refused(store):
    _challenge(store, ttl=10)
    with pytest.raises(Problem, match="expired"):
        store.claim_challenge("c" * 32, 1011.0)
    with pytest.raises(Problem) as exc:
        store.claim_challenge("d" * 32, 1001.0)
    assert exc.value.code == "challenge-unknown"


def test_tokens_are_checked_for_existence_expiry_and_use(store):
    store.add_token("h1", "gw-1", 1000.0, 2000.0)
    store.check_token("h1", 1500.0)
    for token, now, code in (("nope", 1500.0, "token-invalid"), ("h1", 2001.0, "token-invalid")):
        with pytest.raises(Problem) as exc:
            store.check_token(token, now)
        assert exc.value.code == code



def test_a_device_keeps_two_open_enrollment_challenges_the_newest_win(store):
    for i in range(5):
        _challenge(store, cid=f"{i:032x}", now=1000.0 + i)
    assert store.pending_challenges(1001.0) == 2
    with pytest.raises(Problem) as exc:  # replaced: no longer claimable
        store.claim_challenge(f"{0:032x}", 1005.0)
    assert exc.value.code == "challenge-used"
    store.claim_challenge(f"{4:032x}", 1005.0)


def test_enrolling_again_supersedes_the_earlier_certificates(store):

    def enroll(serial: str, now: float) -> list[str]:
        row = _challenge(store, cid=f"{int(now):032x}", now=now)
        store.claim_challenge(row.id, now)
        device = DeviceRow("urn:devid:x", b"ek", b"ak", b"id", "active", None, "t", "t", 1,
                           serial, "t")
        cert = IssuedCertificate(serial, "urn:devid:x", "identity", now, now + 3600)
        enrolled = store.complete_enrollment(row, device, cert, now)
        return enrolled.superseded

    assert enroll("aa", 1000.0) == []
    assert enroll("bb", 2000.0) == ["aa"]
    [revoked] = store.revoked_certificates(2001.0)
    assert (revoked.serial, revoked.reason) == ("aa", "superseded")
    assert enroll("cc", 6000.0) == []  # bb has expired by now: nothing left to revoke


def test_two_replicas_claim_a_challenge_and_spend_a_token_once(backend):
    """Two stores on one database (as two registrar replicas hold), racing from many
    threads: one claim wins, one token consumption wins."""
    first, second = backend(), backend()
    try:
        _challenge(first, token_hash="t1")
        first.add_token("t1", "gw", 900.0, 5000.0)

        def claim(i):
            try:
                (first if i % 2 else second).claim_challenge("c" * 32, 1001.0)
                return "claimed"
            except Problem as p:
                return p.code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(claim, range(16)))
        assert outcomes.count("claimed") == 1, outcomes

        rows = [_challenge(first, cid=f"{i:032x}", now=1000.0 + i, token_hash="t1")
                for i in range(2)]

        def complete(i):
            store = first if i % 2 else second
            row = rows[i]
            store.claim_challenge(row.id, 1003.0)
            device = DeviceRow(f"urn:devid:{i}", b"ek", b"ak", b"id", "active", None, "t",
                               "t", 1, f"s{i}", "t")
            cert = IssuedCertificate(f"s{i}", f"urn:devid:{i}", "identity", 1003.0, 9000.0)
            try:
                store.complete_enrollment(row, device, cert, 1003.0)
                return "enrolled"
            except Problem as p:
                return p.code

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = sorted(pool.map(complete, range(2)))
        assert results == ["enrolled", "token-used"]
        assert len(second.devices()) == 1
    finally:
        first.close()
        second.close()


def test_replicas_extend_one_audit_chain_and_an_edit_breaks_it(postgres):
    """Two DatabaseAuditLogs (two replicas) appending from many threads: one chain, in one
    order; an edited row is found, with its position."""
    import psycopg

    from agent.registrar.dbaudit import DatabaseAuditLog

    name = postgres.database()
    logs = [DatabaseAuditLog(PostgresConnection(postgres.conninfo(name), name))
            for _ in range(2)]
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: logs[i % 2].append("token-created", n=i), range(40)))
        verdict = logs[0].verify()
        assert verdict.ok and verdict.records == 40
        assert sorted(r["n"] for r in logs[1].records()) == list(range(40))
        with psycopg.connect(postgres.conninfo(name), autocommit=True) as conn:
            conn.execute("UPDATE registrar_audit SET record = replace(record, '\"n\":7', "
                         "'\"n\":8') WHERE record LIKE '%\"n\":7,%'")
        broken = logs[1].verify()
        assert not broken.ok and "hash mismatch (row edited)" in broken.problem
    finally:
        for log in logs:
            log.close()
