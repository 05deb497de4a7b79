"""Plain CoAP for legacy sensors, only where a profile says `insecure = true`: libcoap's
client (no DTLS) reaches the upstream as the sensor whose `address` attribute matches;
any other sender, a sensor of a secure profile and a quarantined one get 4.01, and
`devidctl check` warns while the insecure profile exists."""

from __future__ import annotations

import subprocess

from stack import DEMO_POLICY

LEGACY = DEMO_POLICY + """
[profiles.legacy]
insecure = true
[[profiles.legacy.rules]]
name = "telemetry"
methods = ["POST"]
path = "/telemetry"
upstream = "legacy/{sensor}"
"""


def _post(port: int, payload: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["coap-client-openssl", "-B", "5", "-m", "post", "-e", payload,
                           f"coap://127.0.0.1:{port}/telemetry"], capture_output=True,
                          text=True, timeout=20)


def test_plain_coap_only_for_a_sensor_of_an_insecure_profile(broker_stack_factory,
                                                            gateway_agent):
    agent, _ = gateway_agent
    stack = broker_stack_factory(policy=LEGACY, plain=True)
    broker, upstream = stack.broker, stack.upstream
    assert broker.plain_port is not None
    refused = _post(broker.plain_port, "1")  # no sensor has 127.0.0.1 yet
    assert refused.stderr.startswith("4.01"), refused

    secure = stack.add("t-1", "--attr", "address=127.0.0.1")  # profile temperature
    assert _post(broker.plain_port, "2").stderr.startswith("4.01")
    _, added = broker.ctl_json("add", "old-1", "--profile", "legacy", "--attr",
                               "address=127.0.0.1")
    legacy = added["sensors"][0]
    answer = _post(broker.plain_port, "21.5")
    assert answer.stdout.strip() == "ok" and not answer.stderr, answer
    [got] = upstream.received()
    assert got["path"] == f"/legacy/{legacy['id']}" and got["sensor"] == [legacy["id"]]
    assert got["sensor"] != [secure["id"]]

    assert broker.ctl("quarantine", "old-1").returncode == 0
    assert _post(broker.plain_port, "3").stderr.startswith("4.01")
    assert len(upstream.received()) == 1

    check = agent.ctl("check", "--broker-socket", str(broker.socket), "--only",
                      "broker-policy")
    assert check.returncode == 1 and "legacy accept plain CoAP" in check.stdout
    status = agent.ctl("status", "--broker-socket", str(broker.socket)).stdout
    assert "INSECURE" in status
