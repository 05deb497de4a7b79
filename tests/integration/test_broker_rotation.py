"""50 rotations of the gateway's 5-second certificates while a sensor sends steadily through
devid-broker to the CoAP-over-TLS upstream and to mosquitto: not one request fails. Each
new certificate reaches the broker over the identity API's watch and is shown to each
upstream on its next connection, while requests in flight finish on the old one."""

from __future__ import annotations

import re
import threading
import time

import cbor2
import pytest
from mqtt_peer import Mosquitto
from oscore_sensor import OscoreSensor
from stack import DEMO_POLICY

ROTATIONS = 50
# The demo's rule to the CoAP upstream, and one to mosquitto, each with room for 20
# requests a second.
POLICY = DEMO_POLICY + """to = "cloud"
rate = 6000
burst = 100
[[profiles.temperature.rules]]
name = "mqtt"
methods = ["POST"]
path = "/mqtt"
upstream = "sensors/{sensor}/telemetry"
to = "fleet"
rate = 6000
burst = 100
"""


@pytest.mark.parametrize("registrar_settings",
                         [{"cert_lifetime": '"5s"', "renewal_window": '"0s"'}])
def test_fifty_rotations_during_steady_traffic_fail_no_forward(broker_stack_factory,
                                                               gateway_agent, tmp_path):
    agent, registrar = gateway_agent
    tls = tmp_path / "upstream-tls"
    mosquitto = Mosquitto(tmp_path / "mosquitto", tls / "server.pem", tls / "server.key",
                          registrar.ca).start("sensors/#")
    try:
        _rotate_during_traffic(agent, broker_stack_factory(
            f'[upstreams.fleet]\nurl = "mqtts://127.0.0.1:{mosquitto.tls_port}"\n'
            f'bundle = "{tmp_path / "upstream-ca.pem"}"\n', POLICY), mosquitto, tmp_path)
    finally:
        mosquitto.stop()


def _rotate_during_traffic(agent, broker_stack, mosquitto, tmp_path) -> None:
    broker, upstream = broker_stack.broker, broker_stack.upstream
    t1 = broker_stack.add("t-1")
    sensor = OscoreSensor(tmp_path / "t-1", t1["credential"], broker.oscore_port)
    broker_stack.sensors.append(sensor)
    answers: list[str] = []
    stop = threading.Event()

    def steady() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            path = "/mqtt" if n % 2 else "/telemetry"
            answers.append(sensor.request("POST", path, cbor2.dumps({"n": n}), 60).code)
            time.sleep(0.05)

    sender = threading.Thread(target=steady)
    sender.start()
    try:
        for _ in range(ROTATIONS):
            renewed = agent.ctl("renew", "--wait")
            assert renewed.returncode == 0, renewed.stdout + renewed.stderr
            # Bounded: the next rotation once the upstream was shown the agent's current
            # certificate (it renews 5-second certificates on its own too: re-read it).
            for _ in range(200):
                _, status = agent.ctl_json("status")
                current = int(status["tls_certificate"]["serial"], 16)
                if current in {int(r["client"]["serial"], 16) for r in upstream.received()}:
                    break
                time.sleep(0.05)
    finally:
        stop.set()
        sender.join(30)
    assert len(answers) > ROTATIONS
    assert [a for a in answers if a != "2.04"] == []
    certificates = {r["client"]["serial"] for r in upstream.received()}
    assert len(certificates) >= ROTATIONS  # new connections did pick up each rotation
    status = broker_stack.status()
    assert status["traffic"]["totals"].get("upstream_failed", 0) == 0
    assert status["upstreams"]["cloud"]["connections_opened"] >= ROTATIONS
    # mosquitto got every publish acknowledged to the sensor, each over a connection made
    # with the certificate current when it was opened.
    published = status["upstreams"]["fleet"]["published"]
    assert published == (len(answers) + 1) // 2
    assert len(mosquitto.wait_for(published)) == published
    opened = status["upstreams"]["fleet"]["connections_opened"]
    assert opened >= ROTATIONS
    # Each old connection said DISCONNECT once its last publish was acknowledged (the
    # newest old one perhaps a moment after the traffic stopped).
    deadline = time.monotonic() + 10
    while True:
        said_goodbye = re.findall(r"Client devid-broker-\d+ disconnected\.",
                                  mosquitto.log.read_text())
        if len(said_goodbye) >= opened - 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(said_goodbye) == opened - 1
