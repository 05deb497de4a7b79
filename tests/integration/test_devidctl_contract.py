"""devidctl's contract with scripts: every verb speaks JSON, and exit codes mean
0 OK, 1 WARN, 2 FAIL (or: the action failed), 3 cannot reach the daemon, 64 usage.
Also the support bundle: what it holds, and what it must never hold."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import tarfile

import pytest
from stack import AgentProcess, enrollment_toml, rotation_toml, write_agent_config

from agent.cli.main import build_parser

TOKEN_MARK = "tok-"


def _verbs() -> dict[str, object]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices  # type: ignore[attr-defined,no-any-return]


def test_every_verb_has_json():
    for name, verb in _verbs().items():
        options = {o for action in verb._actions for o in action.option_strings}
        assert "--json" in options, name


@pytest.mark.parametrize(("argv", "code", "state"), [
    (["status"], 3, "FAIL"),
    (["renew"], 3, "FAIL"),
    (["decommission", "--yes"], 3, "FAIL"),
    (["check"], 2, "FAIL"),  # runs locally: the TPM is fine, but no daemon
    (["audit"], 0, None),  # reads the file
])
def test_daemon_down_exit_codes_with_json(tpm, tmp_path, argv, code, state):
    config = write_agent_config(tmp_path / "agent.toml", tpm.tcti, [tpm.vendor_ca])
    got, doc = AgentProcess(config).ctl_json(*argv)
    assert got == code, doc
    if state:
        assert doc["state"] == state
    if code == 3:
        assert doc["error"]["type"] == "daemon-not-running" and doc["error"]["hint"]


def test_exit_codes_against_a_running_daemon(tpm, agent_factory):
    agent = agent_factory(tpm)  # not configured to enroll: WARN
    for argv, expected in ((["status"], 1), (["check"], 1), (["audit"], 0),
                           (["renew"], 2), (["decommission"], 64), (["bogus"], 64),
                           (["audit", "--limit", "0"], 64), (["status", "--nope"], 64),
                           (["check", "--only", "nope"], 64), (["cert"], 64),
                           (["cert", "delete"], 64), (["cert", "show"], 1),
                           (["cert", "show", "--pem"], 2)):
        proc = agent.ctl(*argv)
        assert proc.returncode == expected, (argv, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
    code, doc = agent.ctl_json("renew")
    assert code == 2 and doc["error"]["type"] == "state-invalid"


def test_support_bundle_holds_the_diagnosis_and_no_secret(tpm, registrar_factory,
                                                          agent_factory, tmp_path):
    registrar = registrar_factory([tpm.vendor_ca])
    token = registrar.token()
    assert token
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, token) + rotation_toml())
    agent.wait_enrollment("enrolled")
    out = tmp_path / "bundle.tar.gz"
    code, doc = agent.ctl_json("support-bundle", "-o", str(out))
    assert code == 0, doc
    assert doc["path"] == str(out)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    raw = out.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}
    for name in ("status.json", "check.json", "audit.json", "agent.toml",
                 "config.effective.json", "versions.json", "manifest.json"):
        assert name in files, sorted(files)
    status = json.loads(files["status.json"])
    assert status["enrollment"]["state"] == "enrolled"
    assert {r["name"] for r in json.loads(files["check.json"])["results"]} >= {"tpm", "daemon"}
    assert [r["event"] for r in json.loads(files["audit.json"])["records"]][:1] == ["enrolled"]
    versions = json.loads(files["versions.json"])
    assert versions["devid-agent"] and versions["kernel"] and "tpm2-tss" in versions
    assert "tss2" in versions["tpm2-tss"]
    assert versions["python_packages"]["tpm2-pytss"]
    manifest = json.loads(files["manifest.json"])
    assert set(manifest["files"]) | set(manifest["not_collected"]) >= {"journal.txt"}
    # The token was inline in the config: redacted there, masked in the effective config.
    assert b'token = "<redacted>"' in files["agent.toml"]
    assert token.encode() not in gzip.decompress(raw)
    # No state file or key blob is ever included.
    assert not [n for n in files if n.endswith((".blob", ".tpmkey")) or "enrollment" in n]


def test_support_bundle_with_a_broken_config_still_written(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[enrollment]\ntoken = "s3cret-value"\nurl = 5\n')
    out = tmp_path / "b.tar.gz"
    proc = AgentProcess(config).ctl("support-bundle", "-o", str(out))
    # Written, but incomplete (no daemon to ask for its status): exit 1, with the list.
    assert proc.returncode == 1, proc.stderr
    assert "not collected: status.json" in proc.stdout and "Traceback" not in proc.stdout
    with tarfile.open(out) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers()}
        text = b"".join(tar.extractfile(m).read() for m in tar.getmembers())
    assert "config-error.json" in names and "agent.toml" in names
    assert b"s3cret-value" not in text


def test_support_bundle_unwritable_place_is_a_clear_failure(tmp_path):
    config = write_agent_config(tmp_path / "agent.toml", "device:/dev/tpmrm0", [])
    proc = AgentProcess(config).ctl("support-bundle", "-o", str(tmp_path / "no" / "b.tgz"))
    assert proc.returncode == 2
    assert "cannot write" in proc.stderr and "Traceback" not in proc.stderr


def test_a_broken_config_file_does_not_hide_the_running_daemon(tpm, agent_factory):
    import signal
    import subprocess

    from stack import BIN

    agent = agent_factory(tpm)
    text = agent.config.read_text()
    agent.config.write_text(text.replace("tcti =", "tcit ="))  # a typo, then SIGHUP
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_status("reload refused", lambda d: "reload" in " ".join(d.get("reasons", [])))
    proc = agent.ctl("status")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)  # at least WARN
    assert "devid-agent" in proc.stdout and "Traceback" not in proc.stderr
    assert "runs on the configuration it loaded earlier" in proc.stderr
    assert "tcit" in proc.stderr
    code, doc = agent.ctl_json("check")
    assert code >= 1 and doc["results"], doc
    # Not even TOML any more: the socket line is still found.
    agent.config.write_text(text.replace("[tpm]", "[tpm"))
    assert agent.ctl("status").returncode == 1
    # --config after the verb, and DEVIDCTL_CONFIG, name the file too.
    agent.config.write_text(text)
    after = subprocess.run([str(BIN / "devidctl"), "status", "--config", str(agent.config)],
                           capture_output=True, text=True, timeout=60)
    by_env = subprocess.run([str(BIN / "devidctl"), "status"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "DEVIDCTL_CONFIG": str(agent.config)})
    for proc in (after, by_env):
        assert proc.returncode in (0, 1) and "devid-agent" in proc.stdout, proc.stderr


def test_renew_wait_fails_at_once_when_the_tpm_is_gone(tpm, registrar_factory, agent_factory):
    registrar = registrar_factory([tpm.vendor_ca])
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml())
    generation = agent.wait_generation(1)["rotation"]["generation"]
    # A bad timeout over the socket is refused before anything starts.
    from agent.control import client
    from agent.errors import ControlError

    for bad in ("soon", 0, 301, True):
        with pytest.raises(ControlError, match="timeout: expected seconds between 1 and 300"):
            client.call(agent.socket, "renew", {"wait": True, "timeout": bad})
    assert agent.status()["rotation"]["generation"] == generation
    tpm.stop()
    agent.wait_status("TPM lost", lambda d: d["tpm"]["reachable"] is False)
    code, doc = agent.ctl_json("renew", "--wait", "--timeout", "120")
    assert code == 2 and doc["error"]["type"] == "tpm-unreachable", doc
    assert "swtpm is running" in doc["error"]["hint"], doc
    proc = agent.ctl("renew", "--wait", "--timeout", "0")
    assert proc.returncode == 64 and "expected 1 to 300 seconds" in proc.stderr


def test_renew_wait_shows_each_step_while_the_registrar_is_slow(tpm, registrar_factory,
                                                               agent_factory):
    # Each request the registrar verifies takes 2 s: long enough to watch the steps go by.
    registrar = registrar_factory([tpm.vendor_ca], start=False)
    registrar.start(env={"DEVID_FAILPOINTS": "registrar.verify=stall:2"})
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml())
    agent.wait_enrollment("enrolled", timeout=60)
    proc = agent.ctl("renew", "--wait", "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    steps = [line.strip().removeprefix("... ") for line in proc.stderr.splitlines()
             if line.strip().startswith("...")]
    assert steps and set(steps) <= {"starting", "challenged", "quoted", "signed", "sealed",
                                    "issued", "checked"}, proc.stderr
    assert "renewed in" in proc.stdout
    assert agent.status()["rotation"]["step"] is None  # cleared once done
