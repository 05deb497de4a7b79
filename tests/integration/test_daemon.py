"""devid-agent and devidctl as processes, against real swtpm instances."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stack import BIN, AgentProcess, write_agent_config


def test_status_json_has_the_documented_fields(tpm, agent_factory):
    agent = agent_factory(tpm)
    code, doc = agent.ctl_json("status")
    # Without [enrollment] the gateway has no identity certificate: WARN, and it says why.
    assert code == 1, doc
    assert doc["state"] == "WARN"
    assert doc["reasons"] == ["enrollment not configured: this gateway has no identity "
                              "certificate"]
    assert doc["enrollment"]["state"] == "not_configured"
    assert doc["certificate"] is None
    assert doc["tpm"]["manufacturer"] == "IBM (software TPM)"
    assert doc["tpm"]["firmware_version"]
    ek = doc["tpm"]["ek_certificate"]
    assert ek["subject"] == "CN=unknown" and ek["issuer"] == "CN=swtpm-localca"
    assert ek["verified"] is True
    assert doc["identity"]["key_resident"] is True
    assert len(doc["identity"]["public_key_sha256"]) == 64
    assert doc["agent"]["version"] and doc["agent"]["uptime_s"] >= 0


def test_status_text_shows_headline_and_parts(tpm, agent_factory):
    proc = agent_factory(tpm).ctl("status")
    assert proc.returncode == 1
    for needle in ("devid-agent: WARN", "EK cert", "verified", "resident: yes", "SHA-256",
                   "enrollment not configured"):
        assert needle in proc.stdout


def test_untrusted_vendor_makes_status_fail_with_reason(tpm_factory, agent_factory):
    ours, other = tpm_factory(), tpm_factory()
    agent = agent_factory(ours, ek_roots=[other.vendor_ca])
    code, doc = agent.ctl_json("status")
    assert code == 2
    assert doc["state"] == "FAIL"
    assert doc["tpm"]["ek_certificate"]["verified"] is False
    assert any("not trusted" in r for r in doc["reasons"])


def test_check_reports_each_diagnostic_and_worst_exit_code(tpm, agent_factory):
    code, doc = agent_factory(tpm).ctl_json("check")
    names = {r["name"]: r for r in doc["results"]}
    assert set(names) >= {"daemon", "tpm", "ek-certificate", "identity-key", "state-dir", "clock"}
    for name in ("daemon", "tpm", "ek-certificate", "identity-key", "state-dir"):
        assert names[name]["level"] == "pass", names[name]
    worst = max({"pass": 0, "warn": 1, "fail": 2}[r["level"]] for r in doc["results"])
    assert code == worst


def test_cli_says_daemon_not_running_and_exits_3(tpm, tmp_path):
    config = write_agent_config(tmp_path / "agent.toml", tpm.tcti, [tpm.vendor_ca])
    proc = AgentProcess(config).ctl("status")
    assert proc.returncode == 3
    assert "not running" in proc.stderr and "systemctl start devid-agent" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_runs_locally_when_daemon_is_down(tpm, tmp_path):
    config = write_agent_config(tmp_path / "agent.toml", tpm.tcti, [tpm.vendor_ca])
    code, doc = AgentProcess(config).ctl_json("check")
    names = {r["name"]: r for r in doc["results"]}
    assert names["daemon"]["level"] == "fail"
    assert names["tpm"]["level"] == "pass"
    assert names["ek-certificate"]["level"] == "pass"
    assert code == 2
    assert not (tmp_path / "state").exists()  # read-only: nothing created


def test_sigterm_shuts_down_cleanly_and_removes_socket(tpm, agent_factory):
    agent = agent_factory(tpm)
    assert agent.socket.exists()
    assert agent.stop() == 0
    assert not agent.socket.exists()
    assert "stopped" in agent.log_path.read_text()


def test_restart_keeps_identity(tpm, agent_factory):
    agent = agent_factory(tpm)
    first = agent.ctl_json("status")[1]["identity"]["public_key_sha256"]
    agent.stop()
    agent.start()
    assert agent.ctl_json("status")[1]["identity"]["public_key_sha256"] == first


def test_socket_is_0660(tpm, agent_factory):
    agent = agent_factory(tpm)
    assert agent.socket.stat().st_mode & 0o777 == 0o660


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_socket_refuses_unauthorised_peer(tpm, agent_factory):
    import shutil
    import tempfile

    public_dir = Path(tempfile.mkdtemp(prefix="devid-sock-", dir="/tmp"))
    try:
        _refuses_unauthorised_peer(tpm, agent_factory, public_dir)
    finally:
        shutil.rmtree(public_dir, ignore_errors=True)


def _refuses_unauthorised_peer(tpm, agent_factory, public_dir):
    agent = agent_factory(tpm, control_socket=public_dir / "control.sock")
    # Open the file-mode fences so that only the peer-credential check stands.
    os.chmod(public_dir, 0o755)
    os.chmod(agent.socket, 0o666)
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setgroups([]); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(b'{\"v\":1,\"method\":\"status\",\"params\":{}}\\n')\n"
        "print(s.recv(65536).decode())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(agent.socket)],
                          capture_output=True, text=True, timeout=30)
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False
    assert reply["error"]["type"] == "permission-denied"
    assert "uid 65534" in reply["error"]["message"]
    assert "refused" in agent.log_path.read_text()


def test_garbage_on_socket_gets_clear_error_and_daemon_survives(tpm, agent_factory):
    agent = agent_factory(tpm)
    for payload in (b"not json\n", b"[1,2]\n", b'{"v":1,"method":"rm -rf"}\n', b"\xff\xfe\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(agent.socket))
            s.sendall(payload)
            reply = json.loads(s.recv(65536))
        assert reply["ok"] is False and reply["error"]["message"]
    code, doc = agent.ctl_json("status")
    assert code == 1 and doc["reasons"][0].startswith("enrollment not configured"), (
        doc, agent.log_path.read_text())


@pytest.mark.parametrize("body, needle", [
    ("[tpm]\ntcit = 'x'\n", "[tpm] tcit: unknown key"),
    ("[tpm]\ntcti = 7\n", "[tpm] tcti: Input should be a valid string"),
    ("[tpm]\ntcti = 'swtpm:host=127.0.0.1,prot=49122'\n",
     "[tpm] tcti: swtpm: unknown option 'prot' in 'host=127.0.0.1,prot=49122' "
     "(known: host, port)"),
    ("[tpm]\ntcti = 'swtpm:port=99999'\n", "[tpm] tcti: swtpm: port '99999' is not a TCP port"),
    ("[paths]\nstate_dir = 1\n", "[paths] state_dir"),
    ("[trust]\nek_roots = ['/nonexistent.pem']\n", "[trust] ek_roots[0]: /nonexistent.pem"),
    ("[wat]\n", "[wat]: unknown section"),
])
def test_bad_config_is_refused_at_start_naming_the_key(tmp_path, body, needle):
    config = tmp_path / "agent.toml"
    config.write_text(body)
    proc = subprocess.run([str(BIN / "devid-agent"), "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_daemon_waits_for_missing_tpm_then_recovers(tpm, agent_factory):
    import harness

    state_dir, tcti = tpm.state_dir, tpm.tcti
    tpm.stop()
    agent = agent_factory(tpm, wait=False)
    deadline = time.monotonic() + 20
    doc: dict = {}
    while time.monotonic() < deadline:
        if agent.socket.exists():
            _code, doc = agent.ctl_json("status")
            if doc:
                break
        time.sleep(0.1)
    assert doc["state"] == "FAIL"
    assert doc["tpm"]["reachable"] is False
    assert doc["tpm"]["error"]["type"] == "tpm-unreachable"
    assert doc["tpm"]["error"]["hint"]
    # Bring the same TPM back on the same port; the agent reconnects by itself.
    port = int(tcti.rsplit("=", 1)[1])
    assert harness.start(state_dir, port=port) == tcti
    agent.wait_ready(timeout=30)
    doc = agent.ctl_json("status")[1]
    assert doc["tpm"]["reachable"] is True
    assert doc["state"] == "WARN"  # only because enrollment is not configured here


def test_a_reload_with_a_fixed_tcti_reconnects_at_once(tpm, agent_factory, tmp_path):
    from stack import free_port

    good = tpm.tcti
    wrong = f"swtpm:host=127.0.0.1,port={free_port()}"
    agent = agent_factory(tpm, wait=False)
    config = agent.config
    config.write_text(config.read_text().replace(good, wrong))
    agent.stop()
    agent.start(wait=False)
    # Let the retries back off past 16 s, as after a while in the field.
    deadline = time.monotonic() + 60
    while "(attempt 5)" not in agent.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    doc = agent.ctl_json("status")[1]
    error = doc["tpm"]["error"]
    assert wrong.rsplit("=", 1)[1] in error["hint"] and "swtpm is running" in error["hint"]
    assert "tss" not in error["hint"] and "/dev/tpmrm0" not in error["hint"]
    # Fixed and reloaded: connected well before the backoff would have retried.
    config.write_text(config.read_text().replace(wrong, good))
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_ready(timeout=8)
    doc = agent.ctl_json("status")[1]
    assert doc["tpm"]["reachable"] is True and doc["tpm"].get("error") is None, doc["tpm"]
