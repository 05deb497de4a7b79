"""50 rotations of the gateway's 5-second certificates while a sensor sends steadily through
devid-broker to the CoAP-over-TLS upstream: not one request fails. Each new certificate
reaches the broker over the identity API's watch and is shown to the upstream on the next
connection, while requests in flight finish on the old one."""

from __future__ import annotations

import threading
import time

import cbor2
import pytest
from oscore_sensor import OscoreSensor
from stack import DEMO_POLICY

ROTATIONS = 50


@pytest.mark.parametrize("registrar_settings",
                         [{"cert_lifetime": '"5s"', "renewal_window": '"0s"'}])
def test_fifty_rotations_during_steady_traffic_fail_no_forward(broker_stack_factory,
                                                               gateway_agent, tmp_path):
    agent, _ = gateway_agent
    # The demo's rule, with room for 20 requests a second.
    broker_stack = broker_stack_factory(policy=DEMO_POLICY + "rate = 6000\nburst = 100\n")
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
            answers.append(sensor.request("POST", "/telemetry", cbor2.dumps({"n": n}), 60).code)
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
