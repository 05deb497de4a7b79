"""Store and forward: a sensor's telemetry accepted while the upstream is down is on disk
before the sensor hears 2.04, survives a SIGKILL of the broker, and arrives upstream in
order once the upstream is back; a full spool answers 5.03 with Max-Age."""

from __future__ import annotations

import signal
import time

import cbor2
from oscore_sensor import OscoreSensor
from stack import DEMO_POLICY

SPOOL_POLICY = DEMO_POLICY + "spool = true\n"  # the demo's rule, store and forward


def test_spooled_telemetry_survives_a_sigkill_and_arrives_in_order(broker_stack_factory,
                                                                   tmp_path):
    stack = broker_stack_factory("[spool]\nmax_messages = 7\nretry_after = 12\n",
                                 SPOOL_POLICY)
    broker, upstream = stack.broker, stack.upstream
    t1 = stack.add("t-1")
    sensor = OscoreSensor(tmp_path / "t-1", t1["credential"], broker.oscore_port)
    stack.sensors.append(sensor)
    assert sensor.request("POST", "/telemetry", cbor2.dumps({"n": 0}), 60).code == "2.04"
    assert len(upstream.received()) == 1

    upstream.stop()
    for n in range(1, 6):
        answer = sensor.request("POST", "/telemetry", cbor2.dumps({"n": n}), 60)
        assert (answer.code, answer.payload) == ("2.04", b"spooled"), answer
    assert stack.status()["spool"]["messages"] == 5

    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGKILL)
    broker.proc.wait()
    broker.start().wait_serving()
    assert stack.status()["spool"]["messages"] == 5  # acknowledged, so kept
    for n in (6, 7):
        assert sensor.request("POST", "/telemetry", cbor2.dumps({"n": n}), 60).code == "2.04"
    full = sensor.request("POST", "/telemetry", cbor2.dumps({"n": 8}), 60)
    assert (full.code, full.max_age) == ("5.03", 12) and b"try again later" in full.payload

    upstream.start()
    deadline = time.monotonic() + 30
    while len(upstream.received()) < 8 and time.monotonic() < deadline:
        time.sleep(0.2)
    received = upstream.received()
    assert [cbor2.loads(bytes.fromhex(r["payload"]))["n"] for r in received] == list(range(8))
    assert all(r["sensor"] == [t1["id"]] for r in received)
    # The upstream records a message before the broker has its answer and drops it from
    # the spool: wait for that too.
    while stack.status()["spool"]["messages"] and time.monotonic() < deadline:
        time.sleep(0.1)
    status = stack.status()["spool"]
    assert status["messages"] == 0 and status["delivered"] == 7  # all, by the new broker
    # Delivered: the sensor is no longer queued behind its spool.
    assert sensor.request("POST", "/telemetry", cbor2.dumps({"n": 9}), 60).payload == b"ok"
