"""Under systemd the agent logs to journald with a MESSAGE_ID per event and the device ID.

A real devid-agent (swtpm, a real registrar) runs with a journald socket of the
test's own (tests/journalcapture.py: a private /run in a new mount namespace)
and the JOURNAL_STREAM systemd would set; the test reads the structured
records libsystemd sent, as `journalctl -o json` would show them.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stack import BIN, AgentProcess, enrollment_toml, rotation_toml, write_agent_config

from agent.events import EVENTS

HERE = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")


def _records(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _wait(path: Path, what: str, predicate, timeout: float = 40.0) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = _records(path)
        if predicate(records):
            return records
        time.sleep(0.2)
    raise TimeoutError(f"no {what} in the journal after {timeout}s: "
                       f"{[r.get('MESSAGE') for r in _records(path)]}")


def _of(records: list[dict[str, str]], event: str) -> list[dict[str, str]]:
    return [r for r in records if r.get("MESSAGE_ID") == EVENTS[event].message_id]


def test_events_reach_the_journal_with_ids_priorities_and_device(tpm, registrar_factory,
                                                                   tmp_path):
    registrar = registrar_factory([tpm.vendor_ca], settings={"cert_lifetime": '"6s"'})
    token = registrar.token()
    config = write_agent_config(tmp_path / "agent" / "agent.toml", tpm.tcti, [tpm.vendor_ca],
                                enrollment_toml(registrar, token) + rotation_toml())
    journal, stderr = tmp_path / "journal.jsonl", tmp_path / "stderr.log"
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
         str(HERE / "journalcapture.py"), str(journal), str(stderr), "--",
         str(BIN / "devid-agent"), "--config", str(config)])
    try:
        records = _wait(journal, "renewal", lambda rs: _of(rs, "renewed"))
        registrar.stop()
        records = _wait(journal, "renewal failure", lambda rs: _of(rs, "renewal-failed"))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0
    records = _records(journal)

    started, ready = _of(records, "started")[0], _of(records, "tpm-ready")[0]
    enrolled, renewed = _of(records, "enrolled")[0], _of(records, "renewed")[0]
    failed = _of(records, "renewal-failed")[0]
    device = enrolled["DEVICE_ID"]
    assert device.startswith("urn:devid:")
    assert started["SYSLOG_IDENTIFIER"] == "devid-agent"
    assert started["PRIORITY"] == "6" and ready["PRIORITY"] == "6"
    assert enrolled["PRIORITY"] == "6" and renewed["PRIORITY"] == "6"
    assert failed["PRIORITY"] == "4"
    assert enrolled["DEVID_EVENT"] == "enrolled" and enrolled["DEVID_IDENTITY_SERIAL"]
    assert renewed["DEVICE_ID"] == device and renewed["DEVID_TLS_SERIAL"]
    assert failed["DEVICE_ID"] == device and failed["DEVID_PROBLEM"]
    assert _of(records, "stopped")
    # Once the identity is known every record carries it, not only the events.
    after = records[records.index(enrolled):]
    assert all(r.get("DEVICE_ID") == device for r in after), \
        [r["MESSAGE"] for r in after if r.get("DEVICE_ID") != device]
    # The enrollment token never reaches the journal, in any field.
    assert token not in journal.read_text()
    # Everything went to the journal; nothing was written as plain lines on stderr.
    assert stderr.read_text() == ""


def test_plain_lines_on_stderr_outside_systemd(tpm, tmp_path):
    config = write_agent_config(tmp_path / "agent.toml", tpm.tcti, [tpm.vendor_ca])
    agent = AgentProcess(config).start()
    agent.stop()
    text = agent.log_path.read_text()
    assert "INFO agent.daemon: devid-agent" in text and "started (config" in text
    assert "TPM ready via" in text
