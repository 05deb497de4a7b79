"""What systemd would hear from devid-agent: sd_notify on a NOTIFY_SOCKET of the test's own.

This machine has no systemd as PID 1, so each test binds the datagram socket
systemd would and reads what the real daemon (with swtpm, and a real
registrar where needed) sends: READY=1 only when the TPM is reachable and the
identity is loaded, STATUS= equal to `devidctl status`'s headline,
WATCHDOG=1 pings at half WATCHDOG_USEC that stop when the event loop blocks
or a TPM command hangs, RELOADING=1 ... READY=1 around a SIGHUP reload.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time

import harness
import pytest
from notifysock import NotifyListener
from stack import AgentProcess, enrollment_toml, rotation_toml, write_agent_config

from agent.diagnostics.status import headline


@pytest.fixture
def notify():
    listener = NotifyListener()
    yield listener
    listener.close()


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_ready_only_once_enrolled_and_status_is_the_headline(tpm, registrar_factory,
                                                             agent_factory, notify):
    registrar = registrar_factory([tpm.vendor_ca])
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml(), env=notify.env(watchdog_usec=3_000_000), wait=False)
    ready = notify.wait_for("READY=1", lambda m: m.fields.get("READY") == "1")
    # READY carries the status it was sent with: the identity was loaded by then.
    assert "STATUS" in ready.fields
    assert not ready.fields["STATUS"].startswith("starting")
    before = [m for m in notify.snapshot() if m.at < ready.at]
    assert before, "expected start-up messages before READY=1"
    assert all("EXTEND_TIMEOUT_USEC" in m.fields for m in before if "STATUS" in m.fields)
    assert len(notify.with_field("READY")) == 1
    # Once settled, STATUS= is the headline of `devidctl status`.
    doc = agent.wait_enrollment("enrolled")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and notify.last_status() != headline(doc):
        time.sleep(0.2)
        doc = agent.status()
    assert notify.last_status() == headline(doc)
    assert notify.last_status().startswith("OK: enrolled as ")
    assert "\n" not in notify.last_status()
    # Watchdog: pings at half of WATCHDOG_USEC (3 s), each well within the deadline.
    since = time.monotonic()
    time.sleep(5)
    pings = notify.pings(since)
    assert len(pings) >= 2
    assert max(_gaps(pings) or [0]) < 3.0
    # After READY no more start-up timeout extensions.
    assert not [m for m in notify.with_field("EXTEND_TIMEOUT_USEC") if m.at > ready.at]


def test_missing_tpm_keeps_start_up_alive_and_says_why(tpm, agent_factory, notify):
    state_dir, tcti = tpm.state_dir, tpm.tcti
    tpm.stop()
    agent_factory(tpm, env=notify.env(watchdog_usec=2_000_000), wait=False)
    waiting = notify.wait_for("STATUS about the TPM",
                              lambda m: "TPM not usable" in m.fields.get("STATUS", ""))
    assert waiting.fields["STATUS"].startswith("FAIL: TPM not usable via swtpm:")
    time.sleep(3)
    assert not notify.with_field("READY")
    # The loop is alive: it keeps extending the start-up timeout instead of crashing.
    extensions = [m for m in notify.with_field("EXTEND_TIMEOUT_USEC") if m.at >= waiting.at]
    assert len(extensions) >= 2
    assert all(int(m.fields["EXTEND_TIMEOUT_USEC"]) >= 4_000_000 for m in extensions)
    # The TPM comes back: READY=1 follows without a restart.
    assert harness.start(state_dir, port=int(tcti.rsplit("=", 1)[1])) == tcti
    ready = notify.wait_for("READY=1", lambda m: m.fields.get("READY") == "1")
    assert ready.fields["STATUS"].startswith("WARN: enrollment not configured")


def test_watchdog_pings_stop_while_the_event_loop_is_blocked(tpm, agent_factory, notify):
    # A control request that blocks the event loop for 4 s (a failpoint); pings every 0.5 s.
    agent = agent_factory(tpm, env={**notify.env(watchdog_usec=1_000_000),
                                    "DEVID_FAILPOINTS": "control.status=stall:4"}, wait=False)
    notify.wait_for("READY=1", lambda m: m.fields.get("READY") == "1")
    time.sleep(1.5)
    blocked_at = time.monotonic()
    caller = threading.Thread(target=agent.status)
    caller.start()
    caller.join(timeout=30)
    time.sleep(1.5)
    pings = notify.pings(blocked_at - 1.5)
    gaps = _gaps(pings)
    # Before and after the block the pings come at 0.5 s; during it none for ~4 s,
    # longer than WATCHDOG_USEC, so systemd would have restarted the agent.
    assert max(gaps) > 3.0, gaps
    assert sorted(gaps)[len(gaps) // 2] < 1.0, gaps
    assert pings[-1] > blocked_at + 4.0  # and they resumed


def test_watchdog_pings_withheld_while_a_tpm_command_hangs(tpm, tmp_path, notify, request):
    # Every facts collection (start-up, status) takes 5 s in the TPM thread; the loop is
    # free, but a TPM call older than hang_timeout (1 s) withholds the pings.
    config = write_agent_config(tmp_path / "agent.toml", tpm.tcti, [tpm.vendor_ca])
    config.write_text(config.read_text().replace("[tpm]\n", '[tpm]\nhang_timeout = "1s"\n'))
    agent = AgentProcess(config, env={**notify.env(watchdog_usec=1_000_000),
                                      "DEVID_FAILPOINTS": "tpm.collect_tpm_facts=stall:5"})
    agent.start(wait=False)
    request.addfinalizer(agent.stop)
    ready = notify.wait_for("READY=1", lambda m: m.fields.get("READY") == "1", timeout=60)
    # Once the stalled call returned, the pings resume.
    notify.wait_for("a ping after READY", lambda m: m.fields.get("WATCHDOG") == "1",
                    after=ready.at)
    pings = notify.pings()
    assert max(_gaps(pings)) > 3.0, pings
    log = agent.log_path.read_text()
    assert "has not returned for" in log and "withholding watchdog pings" in log


def test_sighup_reloads_in_place_and_reports_to_systemd(tpm, registrar_factory,
                                                        agent_factory, notify):
    # Start unconfigured: READY with a WARN; a reload that adds [enrollment] enrolls the
    # gateway without a restart (same pid), and RELOADING=1 ... READY=1 frame it.
    registrar = registrar_factory([tpm.vendor_ca])
    agent = agent_factory(tpm, env=notify.env(watchdog_usec=2_000_000))
    notify.wait_for("READY=1", lambda m: m.fields.get("READY") == "1")
    pid = agent.proc.pid
    original = agent.config.read_text()

    agent.config.write_text(original + enrollment_toml(registrar, registrar.token())
                            + rotation_toml() + '\n[log]\nlevel = "debug"\n')
    agent.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1", lambda m: m.fields.get("RELOADING") == "1")
    assert int(reloading.fields["MONOTONIC_USEC"]) > 0
    done = notify.wait_for("READY=1 after reload", lambda m: m.fields.get("READY") == "1",
                           after=reloading.at)
    assert done.at >= reloading.at
    doc = agent.wait_enrollment("enrolled")
    assert agent.proc.pid == pid and agent.proc.poll() is None
    assert doc["agent"]["reloaded_at"] is not None and doc["agent"]["reload_error"] is None
    generation = doc["rotation"]["generation"]
    device = doc["enrollment"]["device_id"]

    # A broken file is refused: the daemon keeps its state and says so (WARN).
    agent.config.write_text(original.replace("[trust]", "[trust]\nbogus = 1"))
    mark = time.monotonic()
    agent.proc.send_signal(signal.SIGHUP)
    notify.wait_for("READY=1 after failed reload", lambda m: m.fields.get("READY") == "1",
                    after=mark)
    doc = agent.wait_status("reload error shown", lambda d: d["agent"]["reload_error"])
    assert "bogus" in doc["agent"]["reload_error"]["message"]
    assert doc["state"] == "WARN"
    assert any("configuration reload failed" in r for r in doc["reasons"])
    assert doc["enrollment"]["device_id"] == device
    assert doc["rotation"]["generation"] >= generation
    assert doc["tls_certificate"]["presented"] is True

    # [paths] cannot change in place: applied after a restart, said so in the log.
    agent.config.write_text(original.replace('state_dir = "state"', 'state_dir = "elsewhere"')
                            + enrollment_toml(registrar, None) + rotation_toml())
    mark = time.monotonic()
    agent.proc.send_signal(signal.SIGHUP)
    notify.wait_for("READY=1 after reload", lambda m: m.fields.get("READY") == "1", after=mark)
    doc = agent.wait_status("reload ok", lambda d: d["agent"]["reload_error"] is None)
    assert doc["enrollment"]["state"] == "enrolled"
    assert "needs a restart to apply: [paths]" in agent.log_path.read_text()
    assert not (agent.config.parent / "elsewhere").exists()


def test_registrar_is_a_notify_service_too(tpm, registrar_factory, notify):
    registrar = registrar_factory([tpm.vendor_ca], start=False)
    registrar.start(env=notify.env(watchdog_usec=1_000_000))
    ready = notify.wait_for("READY=1", lambda m: m.fields.get("READY") == "1")
    assert ready.fields["STATUS"] == f"serving {registrar.url}"
    time.sleep(2)
    pings = notify.pings(ready.at)
    assert len(pings) >= 2 and max(_gaps(pings)) < 1.0
    registrar.stop()
    notify.wait_for("STOPPING=1", lambda m: m.fields.get("STOPPING") == "1")
