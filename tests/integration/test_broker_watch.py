"""The watch end to end: a real sensor over OSCORE through devid-broker.

Checked: a sensor that learned its cadence and then sends at an unusual interval is
quarantined by its profile's watch, its next message gets 4.01, and `devidctl sensors
show` says why with the evidence; released, it is forwarded again. A sensor that goes
silent is journaled silent, then deprovisioned (revoked) after the grace period."""

from __future__ import annotations

import json
import time

import cbor2
from oscore_sensor import OscoreSensor
from stack import DEMO_POLICY

WATCHED = DEMO_POLICY + """
[profiles.temperature.watch]
learning = "2s"
min_messages = 6
on_anomaly = "quarantine"
max_silence = "3s"
deprovision_after = "2s"
"""


def _send(sensor: OscoreSensor, n: int) -> str:
    return sensor.request("POST", "/telemetry", cbor2.dumps({"t": 20 + n / 10}), 60).code


def test_an_unusual_interval_quarantines_a_sensor_end_to_end(broker_stack_factory, tmp_path):
    stack = broker_stack_factory(policy=WATCHED.replace('max_silence = "3s"\n', "")
                                 .replace('deprovision_after = "2s"\n', ""))
    broker = stack.broker
    added = stack.add("t-1")
    sensor = OscoreSensor(tmp_path / "t-1", added["credential"], broker.oscore_port)
    stack.sensors.append(sensor)
    for n in range(10):  # learning: one every 0.4 s
        assert _send(sensor, n) == "2.04"
        time.sleep(0.4)
    shown = broker.ctl_json("show", "t-1")[1]["watch"]
    assert shown["learned"] and 0.3 < shown["interval_s"] < 0.6, shown
    codes = []
    for n in range(30):  # then one every 0.1 s: four times the learned rate
        codes.append(_send(sensor, n))
        if codes[-1] == "4.01":
            break
        time.sleep(0.1)
    assert codes[-1] == "4.01" and len(codes) <= 6, codes
    shown = broker.ctl_json("show", "t-1")[1]
    assert shown["status"] == "quarantined", shown
    assert shown["status_reason"].startswith("watch: interval (score "), shown
    assert shown["watch"]["findings"][-1]["kind"] == "interval"
    assert "since the last message" in shown["watch"]["findings"][-1]["evidence"]
    text = broker.ctl("show", "t-1").stdout
    assert "watch: interval" in text, text
    audit = [json.loads(line) for line in
             (broker.directory / "state" / "audit.log").read_text().splitlines()]
    assert [r["kind"] for r in audit if r["event"] == "sensor-anomaly"] == ["interval"]
    assert stack.status()["watch"]["totals"]["quarantined"] == 1
    # Released: it is forwarded again and learns anew.
    assert broker.ctl("release", "t-1", "--reason", "checked on site").returncode == 0
    for _ in range(20):  # the listeners follow the registry within a second
        if _send(sensor, 0) == "2.04":
            break
        time.sleep(0.1)
    assert _send(sensor, 1) == "2.04"
    assert broker.ctl_json("show", "t-1")[1]["watch"]["learned"] is False


def test_a_silent_sensor_is_deprovisioned(broker_stack_factory, tmp_path):
    stack = broker_stack_factory(policy=WATCHED)
    broker = stack.broker
    added = stack.add("t-2")
    sensor = OscoreSensor(tmp_path / "t-2", added["credential"], broker.oscore_port)
    stack.sensors.append(sensor)
    for n in range(3):
        assert _send(sensor, n) == "2.04"
    # Silent from now: after max_silence (3 s) it is silent, 2 s later revoked (the watch
    # looks every 5 s).
    for _ in range(200):
        shown = broker.ctl_json("show", "t-2")[1]
        if shown["status"] == "revoked":
            break
        time.sleep(0.1)
    assert shown["status"] == "revoked" and shown["status_reason"].startswith(
        "watch: silent for "), shown
    assert _send(sensor, 9) == "4.01"
    totals = stack.status()["watch"]["totals"]
    assert totals["silent"] == 1 and totals["deprovisioned"] == 1


def test_devidctl_events_merges_the_agent_and_the_broker_and_follows(
        broker_stack_factory, gateway_agent, tmp_path):
    import subprocess

    agent, _ = gateway_agent
    stack = broker_stack_factory(policy=WATCHED)
    broker = stack.broker
    stack.add("t-3")
    shown = agent.ctl("events", "--broker-socket", str(broker.socket), "--json")
    assert shown.returncode == 0, shown.stderr
    docs = [json.loads(line) for line in shown.stdout.splitlines()]
    sources = {(d["source"], d["event"]) for d in docs}
    assert ("devid-agent", "enrolled") in sources and ("devid-broker", "sensor-added") in \
        sources, sources
    assert [d["time"] for d in docs] == sorted(d["time"] for d in docs)
    text = agent.ctl("events", "--broker-socket", str(broker.socket), "--limit", "1")
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 1
    assert "devid-broker INFO  sensor-added" in text.stdout, text.stdout
    # --follow prints what comes next.
    follow = subprocess.Popen(
        [*agent.ctl_command(), "events", "--follow", "--limit", "1", "--broker-socket",
         str(broker.socket)], stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        assert "sensor-added" in follow.stdout.readline()  # the last one so far
        assert broker.ctl("quarantine", "t-3", "--reason", "tests").returncode == 0
        line = follow.stdout.readline()
        assert "sensor-changed" in line and "change=quarantine" in line, line
    finally:
        follow.terminate()
        follow.wait(10)
    refused = agent.ctl("events", "--limit", "0", "--broker-socket", str(broker.socket))
    assert refused.returncode == 64 and "expected 1 to 1000" in refused.stderr
