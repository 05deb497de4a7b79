"""Unit tests of the service-manager side, no TPM: supervisor ticks, watchdog settings,
reload plans, the status headline, the event catalogue and failpoint parsing."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from agent import events, faults
from agent.config import parse_config
from agent.daemon.reload import plan_reload
from agent.diagnostics.status import headline
from agent.supervision.notify import one_line, watchdog_interval
from agent.supervision.supervisor import START_EXTENSION, Supervisor

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    def __init__(self) -> None:
        self.sent: list[dict[str, str]] = []

    def send(self, fields) -> None:
        if fields:
            self.sent.append(dict(fields))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _supervisor(interval: float | None, ready: list[bool], status: list[str],
                hung: list[str | None] | None = None):
    async def make():
        return Supervisor(rec, interval, lambda: ready[0], lambda: status[0],
                          lambda: (hung or [None])[0], clock)
    rec, clock = Recorder(), FakeClock()
    return asyncio.run(make()), rec, clock


def test_ready_once_with_status_and_start_up_extended_until_then():
    ready, status = [False], ["starting: connecting to the TPM via device:/dev/tpmrm0"]
    sup, rec, clock = _supervisor(10.0, ready, status)
    first = sup.tick()
    assert first["STATUS"].startswith("starting")
    assert int(first["EXTEND_TIMEOUT_USEC"]) == int(max(START_EXTENSION, 20) * 1e6)
    assert first["WATCHDOG"] == "1"  # the loop is alive before READY too
    clock.now += 1
    assert sup.tick() == {"EXTEND_TIMEOUT_USEC": first["EXTEND_TIMEOUT_USEC"]}
    ready[0], status[0] = True, "OK: enrolled as urn:devid:x"
    clock.now += 1
    second = sup.tick()
    assert second["READY"] == "1" and second["STATUS"] == "OK: enrolled as urn:devid:x"
    assert "EXTEND_TIMEOUT_USEC" not in second
    clock.now += 1
    assert sup.tick() == {}  # nothing changed, no ping due
    assert [m for m in rec.sent if "READY" in m] == [second]


def test_pings_every_interval_and_withheld_while_tpm_hung(caplog):
    hung: list[str | None] = [None]
    sup, _, clock = _supervisor(5.0, [True], ["OK"], hung)
    pings = []
    for step in range(40):  # 40 ticks of 1 s
        if step == 12:
            hung[0] = "the TPM command sign has not returned for 130s"
        if step == 25:
            hung[0] = None
        if sup.tick().get("WATCHDOG"):
            pings.append(clock.now)
        clock.now += 1
    assert pings[:3] == [100, 105, 110]
    assert not [p for p in pings if 112 <= p < 125]
    assert [p for p in pings if p >= 125]
    hung_records = [r for r in caplog.records if getattr(r, "DEVID_EVENT", "") == "tpm-hung"]
    assert len(hung_records) == 1  # reported once, not every tick


def test_no_watchdog_without_watchdog_usec():
    sup, _, _ = _supervisor(None, [True], ["OK"])
    assert sup.period == 0.1  # until READY=1, readiness is looked for often
    assert "WATCHDOG" not in sup.tick()
    assert sup.period == 1.0


def test_reload_messages():
    sup, rec, _ = _supervisor(None, [True], ["OK: enrolled as x"])
    sup.tick()
    sup.reloading()
    sup.reloaded()
    reloading, done = rec.sent[-2:]
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert done == {"STATUS": "OK: enrolled as x", "READY": "1"}


@pytest.mark.parametrize(("env", "pid", "expected"), [
    ({}, 7, None),
    ({"WATCHDOG_USEC": "0"}, 7, None),
    ({"WATCHDOG_USEC": "junk"}, 7, None),
    ({"WATCHDOG_USEC": "60000000"}, 7, 30.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "7"}, 7, 30.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "8"}, 7, None),  # meant for another
])
def test_watchdog_interval(env, pid, expected):
    assert watchdog_interval(env, pid) == expected


def test_status_is_one_short_line():
    assert one_line("a\nb   c") == "a b c"
    assert len(one_line("x" * 500)) == 200


def _config(tmp_path: Path, body: str):
    path = tmp_path / "agent.toml"
    path.write_text(body)
    return parse_config(body, path)


def test_reload_plan_applies_in_place_and_keeps_restart_only_sections(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    enroll = f'[enrollment]\nurl = "https://r.example"\nca = "{ca}"\n'
    running = _config(tmp_path, '[paths]\nstate_dir = "/var/lib/a"\n' + enroll)
    loaded = _config(tmp_path, '[paths]\nstate_dir = "/var/lib/b"\n[log]\nlevel = "debug"\n'
                     '[rotation]\nrenew_fraction = 0.5\n')
    plan = plan_reload(running, loaded)
    assert plan.applied == ("[log]", "[rotation]")
    assert plan.needs_restart == ("[paths]", "[enrollment] (removed)")
    assert plan.config.paths.state_dir == Path("/var/lib/a")
    assert plan.config.enrollment == running.enrollment
    assert plan.config.log.level == "debug" and plan.config.rotation.renew_fraction == 0.5
    assert "needs a restart to apply: [paths]" in plan.describe()
    same = plan_reload(running, running)
    assert same.applied == () and same.describe() == "applied: no changes"


def test_headline():
    assert headline({"state": "FAIL", "reasons": ["TPM not usable", "no EK"]}) == \
        "FAIL: TPM not usable (+1 more)"
    assert headline({"state": "OK", "reasons": [], "enrollment": {"device_id": "urn:devid:1"},
                     "certificate": {"renew_at": "2026-11-22T10:00:00+00:00"}}) == \
        "OK: enrolled as urn:devid:1, renewal at 2026-11-22T10:00:00+00:00"


def test_event_ids_are_unique_journal_ids_and_documented():
    ids = [e.message_id for e in events.EVENTS.values()]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    for name in ("enrolled", "renewed", "renewal-failed", "revoked", "decommissioned",
                 "tpm-unreachable"):
        assert name in events.EVENTS
    # The committed docs and catalog are made from the table; regenerate when it changes.
    assert events.markdown_table() in (ROOT / "docs" / "journal.md").read_text()
    assert (ROOT / "debian" / "devid-agent.catalog").read_text() == events.catalog()


def test_emit_sets_message_id_fields_and_level(caplog):
    caplog.set_level(logging.DEBUG)
    events.emit(logging.getLogger("t"), "renewal-failed", "renewal failed: %s", "boom",
                device_id="urn:devid:1", problem="registrar-unreachable", skipped=None)
    record = caplog.records[-1]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "renewal failed: boom"
    fields = vars(record)
    assert fields["MESSAGE_ID"] == events.EVENTS["renewal-failed"].message_id
    assert fields["DEVICE_ID"] == "urn:devid:1"
    assert fields["DEVID_PROBLEM"] == "registrar-unreachable"
    assert not hasattr(record, "DEVID_SKIPPED")


def test_failpoint_parsing():
    assert faults._parse("a, b=stall:2.5,,c=kill") == {"a": "kill", "b": "stall:2.5",
                                                       "c": "kill"}
