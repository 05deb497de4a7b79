"""Watches follow the credential holder: pure asyncio with a fake peer, no sockets,
no TPM. (Sinks are exercised on tmpfs in tests/integration/test_identity_api.py.)"""

from __future__ import annotations

import asyncio
import datetime
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from agent.audit import AuditLog
from agent.config import parse_config
from agent.identityapi.distribution import Distribution
from agent.identityapi.ledger import Ledger
from agent.rotation.credentials import CredentialHolder, TlsCredentials
from tests.unit.test_identity_api_pure import _cert

CONSUMER = '[[consumers]]\nname = "watcher"\nuser = 0\ngrants = ["credentials"]\n'


class _Peer:
    def __init__(self) -> None:
        self.lines: list[dict] = []
        self.arrived = asyncio.Event()

    async def send(self, line: bytes) -> None:
        self.lines.append(json.loads(line))
        self.arrived.set()


def _credentials(serial_hint: str) -> TlsCredentials:
    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    root = _cert(root_key, root_key, "root", "root")
    return TlsCredentials("urn:devid:x", (_cert(key, root_key, serial_hint, "root"), root), key)


def _setup(tmp_path: Path, text: str = CONSUMER, clock=None):
    config = parse_config(text, tmp_path / "agent.toml")
    holder = CredentialHolder(clock) if clock else CredentialHolder()
    ledger = Ledger(AuditLog(tmp_path / "audit.jsonl"), lambda: 0.0)
    ledger.apply(config.consumers)
    return config, holder, ledger, Distribution(holder, ledger, lambda: [], lambda: 1, config)


async def _next(peer: _Peer, count: int) -> None:
    while len(peer.lines) < count:
        peer.arrived.clear()
        await asyncio.wait_for(peer.arrived.wait(), 5)


def test_a_watcher_gets_the_state_then_the_latest_change_and_withdrawal(tmp_path):
    async def scenario() -> list[dict]:
        config, holder, ledger, dist = _setup(tmp_path)
        stop, closed, peer = asyncio.Event(), asyncio.Event(), _Peer()
        runner = asyncio.create_task(dist.run(stop))
        watcher = asyncio.create_task(dist.watch(config.consumers[0], peer, closed))
        await _next(peer, 1)  # not enrolled yet: withdrawn, with the reason
        first, second = _credentials("one"), _credentials("two")
        holder.publish(first)
        holder.publish(second)  # before the watcher ran: it gets only the newest
        await _next(peer, 2)
        holder.withdraw("revoked by the operator")
        await _next(peer, 3)
        assert ledger.states["watcher"].watchers == 1
        closed.set()
        await watcher
        stop.set()
        await runner
        assert ledger.states["watcher"].watchers == 0
        assert ledger.states["watcher"].last.via == "watch"
        return peer.lines

    lines = asyncio.run(scenario())
    assert [line["event"] for line in lines] == ["withdrawn", "credentials", "withdrawn"]
    assert "not enrolled yet" in lines[0]["result"]["reason"]
    assert lines[1]["result"]["certificate"] and lines[1]["result"]["generation"] == 1
    assert lines[2]["result"]["reason"].endswith("withdrawn: revoked by the operator")
    records = [json.loads(r) for r in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["consumer-withdrawn", "consumer-credentials",
                                             "consumer-withdrawn"]


def test_an_expired_certificate_is_not_handed_out_and_says_why(tmp_path):
    _, holder, _, dist = _setup(tmp_path)
    creds = _credentials("old")
    holder._clock = lambda: creds.certificate.not_valid_after_utc + datetime.timedelta(1)
    holder.publish(creds)
    try:
        dist.current()
    except Exception as e:
        assert "expired at" in str(e) and "not renewed yet" in str(e)
    else:
        raise AssertionError("an expired certificate was handed out")


def test_a_watch_ends_when_its_consumer_is_undeclared(tmp_path):
    async def scenario() -> list[dict]:
        config, holder, ledger, dist = _setup(tmp_path)
        holder.publish(_credentials("one"))
        stop, closed, peer = asyncio.Event(), asyncio.Event(), _Peer()
        runner = asyncio.create_task(dist.run(stop))
        watcher = asyncio.create_task(dist.watch(config.consumers[0], peer, closed))
        await _next(peer, 1)
        emptied = parse_config("", tmp_path / "agent.toml")
        ledger.apply(emptied.consumers)
        dist.apply(emptied)
        await asyncio.wait_for(watcher, 5)
        stop.set()
        await runner
        return peer.lines

    lines = asyncio.run(scenario())
    assert lines[0]["event"] == "credentials"
    assert lines[-1]["ok"] is False and "no longer declared" in lines[-1]["error"]["message"]
