"""EDHOC (RFC 9528) through devid-broker with aiocoap's EDHOC initiator (lakers) as the
sensor: the handshake authenticated by the sensor's own key and the gateway's, the OSCORE
context it derives used for the telemetry, and the session ended on schedule, on
quarantine and for a key that is not the sensor's."""

from __future__ import annotations

import time

import cbor2
from oscore_sensor import OscoreSensor

CBOR = 60


def test_edhoc_sensors_get_fresh_contexts_and_lose_them_on_schedule(broker_stack_factory,
                                                                    tmp_path):
    broker_stack = broker_stack_factory(listen='edhoc_lifetime = "10s"\n')
    broker, upstream, sensors = broker_stack.broker, broker_stack.upstream, broker_stack.sensors
    e1 = broker_stack.add("e-1", "--transport", "edhoc")
    credential = e1["credential"]
    assert credential["transport"] == "edhoc" and len(credential["private_key"]) == 64

    sensor = OscoreSensor(tmp_path / "e-1", credential, broker.oscore_port)
    sensors.append(sensor)
    for n in range(3):
        answer = sensor.request("POST", "/telemetry", cbor2.dumps({"t": n}), CBOR)
        assert (answer.code, answer.protected) == ("2.04", True), answer
    received = upstream.received()
    assert [r["sensor"] for r in received] == [[e1["id"]]] * 3
    oscore = broker_stack.status()["oscore"]
    assert oscore["edhoc_sessions"] == 1 and oscore["edhoc_handshakes"] == 1
    assert oscore["contexts"] == 0  # no static context: the long-term key never encrypts

    # A second run of EDHOC (a sensor restarting) gets a session of its own.
    again = OscoreSensor(tmp_path / "e-1b", credential, broker.oscore_port)
    sensors.append(again)
    assert again.request("POST", "/telemetry", cbor2.dumps({"t": 9}), CBOR).code == "2.04"
    assert broker_stack.status()["oscore"]["edhoc_handshakes"] == 2

    # Quarantined: the sessions are refused from the next message on.
    assert broker.ctl("quarantine", "e-1", "--reason", "test").returncode == 0
    answer = sensor.request("POST", "/telemetry", cbor2.dumps({"t": 10}), CBOR)
    assert answer.code == "4.01" and not answer.protected
    assert broker.ctl("release", "e-1").returncode == 0

    # After the lifetime the session is gone: 4.01, and a new handshake works.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = sensor.request("POST", "/telemetry", cbor2.dumps({"t": 11}), CBOR)
        if answer.code == "4.01":
            break
        time.sleep(1)
    assert answer.code == "4.01" and not answer.protected
    sensor.forget_edhoc_session()
    assert sensor.request("POST", "/telemetry", cbor2.dumps({"t": 12}), CBOR).code == "2.04"
    last = upstream.received()[-1]
    assert cbor2.loads(bytes.fromhex(last["payload"])) == {"t": 12}
    assert last["sensor"] == [e1["id"]]
    assert broker_stack.status()["oscore"]["edhoc_handshakes"] == 3


def test_edhoc_with_a_key_that_is_not_the_sensors_is_refused(broker_stack, tmp_path):
    broker, upstream, sensors = broker_stack.broker, broker_stack.upstream, broker_stack.sensors
    e1, e2 = (broker_stack.add(name, "--transport", "edhoc") for name in ("e-1", "e-2"))
    # e-2's key under e-1's key ID: message 3 does not verify against e-1's credential.
    forged = dict(e1["credential"], private_key=e2["credential"]["private_key"])
    intruder = OscoreSensor(tmp_path / "forged", forged, broker.oscore_port)
    sensors.append(intruder)
    answer = intruder.request("POST", "/telemetry", cbor2.dumps({"t": 1}), CBOR)
    assert answer.code == "4.00" and not answer.protected, answer
    # A key ID no sensor has.
    ccs = cbor2.loads(bytes.fromhex(e1["credential"]["credential"]))
    ccs[8][1][2] = b"\x7f\x7f\x7f"
    stranger = OscoreSensor(tmp_path / "stranger", dict(
        e1["credential"], credential=cbor2.dumps(ccs, canonical=True).hex()),
        broker.oscore_port)
    sensors.append(stranger)
    answer = stranger.request("POST", "/telemetry", cbor2.dumps({"t": 2}), CBOR)
    assert answer.code == "4.00" and not answer.protected, answer
    assert upstream.received() == []
    totals = broker_stack.totals()
    assert totals.get("forwarded", 0) == 0
    assert totals["refused.auth-failed"] == 1 and totals["refused.unknown-credential"] == 1
    assert broker_stack.status()["oscore"]["edhoc_sessions"] == 0
