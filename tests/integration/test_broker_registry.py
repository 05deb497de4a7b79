"""devid-broker's start and its sensor registry, end to end: a real agent (swtpm,
registrar) keeps the broker's data key sealed; the broker, in its own process, gets it
over the identity API and serves `devidctl sensors` on its own control socket."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from stack import DEMO_POLICY, AgentProcess, BrokerProcess, enrollment_toml, rotation_toml

from agent.control import client
from agent.errors import DevidError

BROKER = '\n[[consumers]]\nname = "broker"\nuser = {uid}\ngrants = ["secrets"]\n'


@pytest.fixture
def broker_factory(tmp_path):
    made: list[BrokerProcess] = []

    def make(agent: AgentProcess) -> BrokerProcess:
        broker = BrokerProcess(tmp_path / f"broker{len(made)}", agent.config.parent / "run" /
                        "identity.sock")
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.stop()


def _agent(tpm, registrar_factory, agent_factory, consumers: str) -> AgentProcess:
    registrar = registrar_factory([tpm.vendor_ca])
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml() + consumers)
    agent.wait_enrollment("enrolled")
    return agent


def test_the_broker_keeps_its_registry_under_the_agents_sealed_key(
        tpm, registrar_factory, agent_factory, broker_factory, tmp_path):
    agent = _agent(tpm, registrar_factory, agent_factory, BROKER.format(uid=os.getuid()))
    broker = broker_factory(agent).start()
    broker.wait_serving()

    code, added = broker.ctl_json("add", "t-1", "--profile", "temperature",
                                  "--attr", "site=plant-7")
    assert code == 0, added
    sensor = added["sensors"][0]
    assert sensor["id"].startswith("urn:devid:sensor:") and sensor["status"] == "active"
    assert len(bytes.fromhex(sensor["credential"]["master_secret"])) == 16
    qr = tmp_path / "p-1.png"
    text = broker.ctl("add", "p-1", "--profile", "pump", "--transport", "dtls-psk",
                      "--qr", str(qr)).stdout
    assert "shown once" in text and "psk_identity" in text
    # The installer's QR code, read back by an independent decoder (zbar).
    assert qr.stat().st_mode & 0o777 == 0o600
    scanned = json.loads(subprocess.run(["zbarimg", "--raw", "-q", str(qr)], check=True,
                                        capture_output=True, text=True).stdout)
    assert scanned["v"] == 1 and scanned["name"] == "p-1" and scanned["psk"] in text
    assert scanned["psk_identity"].startswith("devid-s")
    wrong = broker.ctl("list", "--qr", str(tmp_path / "x.png"))
    assert wrong.returncode == 2 and "--qr goes with" in wrong.stderr

    batch = tmp_path / "batch.json"
    code, done = broker.ctl_json("add", "--count", "300", "--prefix", "b-", "--profile",
                                 "temperature", "--out", str(batch))
    assert code == 0 and done["added"] == 300 and batch.stat().st_mode & 0o777 == 0o600
    keys = {s["credential"]["master_secret"] for s in json.loads(batch.read_text())}
    assert len(keys) == 300

    assert broker.ctl("quarantine", "t-1", "--reason", "odd intervals").returncode == 0
    code, shown = broker.ctl_json("show", "t-1")
    assert shown["status"] == "quarantined" and shown["status_reason"] == "odd intervals"
    assert broker.ctl("revoke", "t-1").returncode == 0
    refused = broker.ctl("release", "t-1")
    assert refused.returncode == 2 and "a revoked credential is not used again" in \
        refused.stderr
    code, rekeyed = broker.ctl_json("rekey", "t-1")
    assert rekeyed["status"] == "active" and rekeyed["credential"]["master_secret"] != \
        sensor["credential"]["master_secret"]
    factory = tmp_path / "factory.csv"
    factory.write_text("name,profile,transport,psk_identity,psk\n"
                       f"f-1,pump,dtls-psk,fab-0001,{os.urandom(16).hex()}\n"
                       f"f-2,pump,dtls-psk,fab-0002,{'ab' * 16}\n")
    refused = broker.ctl("import", str(factory))
    assert refused.returncode == 2
    assert "line 3: psk: only 1 distinct byte values in 16" in refused.stderr
    factory.write_text(factory.read_text().splitlines()[0] + "\n"
                       + factory.read_text().splitlines()[1] + "\n")
    code, imported = broker.ctl_json("import", str(factory))
    assert code == 0 and imported["sensors"][0]["kid"] == "fab-0001"
    # A production file larger than the agent's 1 MiB control lines (5,600 sensors with
    # long attributes): the broker's control socket takes it.
    big = tmp_path / "factory-big.csv"
    note = "n" * 128
    big.write_text("name,profile,transport,psk_identity,psk,attr.note\n" + "".join(
        f"fab-{i:05d},pump,dtls-psk,fab-id-{i:05d},{os.urandom(16).hex()},{note}\n"
        for i in range(2, 5602)))
    assert big.stat().st_size > 1 << 20
    code, imported = broker.ctl_json("import", str(big))
    assert code == 0 and len(imported["sensors"]) == 5600, imported
    missing = broker.ctl("show", "nope")
    assert missing.returncode == 2 and "no sensor named 'nope'" in missing.stderr

    # The registry survives a restart of both; no key material in it in the clear.
    registry = broker.directory / "state" / "sensors.db"
    assert rekeyed["credential"]["master_secret"].encode() not in registry.read_bytes()
    assert bytes.fromhex(rekeyed["credential"]["master_secret"]) not in registry.read_bytes()
    broker.stop()
    agent.stop()
    agent.start()
    broker.start().wait_serving()
    code, listed = broker.ctl_json("list")
    assert code == 0 and listed["counts"] == {"active": 5903, "quarantined": 0,
                                              "revoked": 0}
    records = [json.loads(line) for line in
               (broker.directory / "state" / "audit.log").read_text().splitlines()]
    assert [r["event"] for r in records][:2] == ["sensors-added", "sensors-added"]
    assert [r["count"] for r in records if r["event"] == "sensors-imported"] == [1, 5600]
    assert any(r.get("change") == "revoke" for r in records)
    assert not any("master_secret" in json.dumps(r) for r in records)


def test_the_broker_waits_for_the_agent_and_stops_on_a_refusal(
        tpm, registrar_factory, agent_factory, broker_factory):
    # Declared as a consumer without the grant: the agent refuses, the broker says why.
    agent = _agent(tpm, registrar_factory, agent_factory,
                   BROKER.format(uid=os.getuid()).replace('["secrets"]', '["credentials"]'))
    broker = broker_factory(agent).start()
    assert broker.proc is not None and broker.proc.wait(20) == 1
    log = broker.log.read_text()
    assert "refused the data key 'sensor-db'" in log and "not granted 'secrets'" in log

    # Started before the agent answers: it waits, then serves.
    agent.stop()
    text = agent.config.read_text().replace('["credentials"]', '["secrets"]')
    agent.config.write_text(text)
    waiting = broker_factory(agent).start()
    time.sleep(2)
    assert waiting.proc is not None and waiting.proc.poll() is None
    assert "waiting for devid-agent's identity API" in waiting.log.read_text()
    agent.start()
    waiting.wait_serving()
    assert waiting.ctl("list").returncode == 0




def test_policy_explain_check_and_a_refused_reload(tpm, registrar_factory, agent_factory,
                                                   broker_factory, tmp_path):
    agent = _agent(tpm, registrar_factory, agent_factory, BROKER.format(uid=os.getuid()))
    broker = broker_factory(agent)
    broker.policy.write_text(DEMO_POLICY)  # the demo's: one place says it
    broker.start().wait_serving()
    assert broker.ctl("add", "t-1", "--profile", "temperature").returncode == 0

    allow = broker.ctl("explain", "t-1", "POST", "/telemetry", "--size", "20", "--format",
                       "60", verb="policy")
    assert allow.returncode == 0 and allow.stdout.startswith("ALLOW  t-1 (temperature)")
    assert "upstream sensors/urn:devid:sensor:" in allow.stdout
    deny = broker.ctl("explain", "t-1", "GET", "/telemetry", verb="policy")
    assert deny.returncode == 1 and "rule telemetry allows POST on /telemetry, not GET" in \
        deny.stdout

    # A broken file: `check` names the key, SIGHUP keeps the policy in force.
    broker.policy.write_text(DEMO_POLICY.replace("{sensor}", "all"))
    check = broker.ctl("check", str(broker.policy), verb="policy")
    assert check.returncode == 2 and "upstream" in check.stderr and "{sensor}" in check.stderr
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    status: dict = {}
    while time.monotonic() < deadline:
        status = client.call(broker.socket, "status")
        if status["policy"]["error"]:
            break
        time.sleep(0.1)
    assert status["state"] == "WARN" and "must contain {sensor}" in \
        status["policy"]["error"]["message"]
    assert status["policy"]["profiles"] == {"temperature": 1}  # the old one, still in force
    again = broker.ctl("explain", "t-1", "POST", "/telemetry", "--size", "1", "--format", "60",
                       verb="policy")
    assert again.returncode == 0
    assert "refused, keeping the one in force (1 profiles)" in broker.log.read_text()


@pytest.mark.parametrize("method, params, message", [
    ("sensors-add", {"name": "x", "profile": "p", "transport": "oscore", "count": 0},
     "count: expected 1 to 10000"),
    ("sensors-add", {"name": "x", "profile": "p", "transport": "oscore", "count": True},
     "count: expected 1 to 10000"),
    ("sensors-add", {"name": "x", "profile": "p", "transport": "oscore", "attributes": []},
     "attributes: expected an object"),
    ("sensors-add", {"name": "x", "profile": "p", "transport": "smoke-signals"},
     "transport: 'smoke-signals'"),
    ("sensors-add", {"name": "../x", "profile": "p", "transport": "oscore"}, "name:"),
    ("sensors-add", {"profile": "p", "transport": "oscore"}, "name: expected a non-empty"),
    ("sensors-change", {"sensor": "t-1", "change": "promote"}, "change: expected one of"),
    ("sensors-import", {"text": "{", "filename": "x.json"}, "not valid JSON"),
    ("sensors-show", {"sensor": 7}, "sensor: expected a non-empty string"),
    ("policy-explain", {"sensor": "t-1", "method": "BREW", "path": "/x"}, "method 'BREW'"),
    ("policy-explain", {"sensor": "t-1", "method": "GET", "path": "x"}, "starts with '/'"),
    ("policy-explain", {"sensor": "t-1", "method": "GET", "path": "/x", "size": -1},
     "size: expected a number of bytes"),
    ("sensors-steal", {}, "unknown method 'sensors-steal'"),
])
def test_bad_requests_to_the_broker_are_refused_and_change_nothing(
        tpm, registrar_factory, agent_factory, broker_factory, method, params, message):
    agent = _agent(tpm, registrar_factory, agent_factory, BROKER.format(uid=os.getuid()))
    broker = broker_factory(agent).start()
    broker.wait_serving()
    assert broker.ctl("add", "t-1", "--profile", "temperature").returncode == 0
    with pytest.raises(DevidError, match=re.escape(message)):
        client.call(broker.socket, method, params)
    listed = client.call(broker.socket, "sensors-list")
    assert [s["name"] for s in listed["sensors"]] == ["t-1"]
    assert listed["sensors"][0]["status"] == "active"
