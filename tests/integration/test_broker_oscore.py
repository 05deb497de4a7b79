"""Sensors over OSCORE through devid-broker, end to end with independent peers: aiocoap's
own OSCORE client as the sensor, a real agent (swtpm, registrar) holding the gateway's
identity, and a CoAP-over-TLS upstream that requires the gateway's client certificate.

Checked: what is allowed arrives upstream, under the gateway's certificate and with the
sensor ID the broker asserted; everything else is refused, counted and never
forwarded: a wrong key, an unknown kid, another sensor's path, a method or size the
profile forbids, a quarantined or revoked sensor (from the next message on), and a
captured request sent again, during the run, after a restart and after a SIGKILL."""

from __future__ import annotations

import secrets
import signal

import cbor2
from oscore_sensor import OscoreSensor, UdpRelay, send_raw

CBOR = 60


def _reading(value: float) -> bytes:
    return cbor2.dumps({"t": value})


def test_oscore_sensors_reach_the_upstream_only_as_the_policy_allows(broker_stack, tmp_path):
    broker, upstream, sensors = broker_stack.broker, broker_stack.upstream, broker_stack.sensors
    t1, t2 = broker_stack.add("t-1"), broker_stack.add("t-2")
    relay = UdpRelay(("127.0.0.1", broker.oscore_port))
    sensor = OscoreSensor(tmp_path / "t-1", t1["credential"], relay.port)
    sensors.append(sensor)

    answer = sensor.request("POST", "/telemetry", _reading(21.5), CBOR)
    assert (answer.code, answer.payload, answer.protected) == ("2.04", b"ok", True)
    [got] = upstream.received()
    assert got["path"] == f"/sensors/{t1['id']}/telemetry" and got["sensor"] == [t1["id"]]
    assert cbor2.loads(bytes.fromhex(got["payload"])) == {"t": 21.5}
    assert got["content_format"] == CBOR and got["method"] == "POST"
    gateway = broker_stack.status()["gateway_credentials"]
    assert int(got["client"]["serial"], 16) == int(gateway["serial"], 16)  # its certificate

    # Denied by the policy: answered inside OSCORE, never forwarded.
    for method, path, payload, fmt, why in (
            ("GET", "/telemetry", b"", None, "allows POST"),
            ("POST", "/telemetry", b"x" * 65, CBOR, "at most 64"),
            ("POST", "/telemetry", b"{}", 50, "Content-Format 50"),
            ("POST", f"/sensors/{t2['id']}/telemetry", _reading(1), CBOR, "no rule")):
        answer = sensor.request(method, path, payload, fmt)
        assert answer.code == "4.03" and answer.protected, (method, path, answer)
        assert why in answer.payload.decode(), answer
    assert len(upstream.received()) == 1

    # A captured request sent again, with a new message ID to get past deduplication.
    captured = relay.requests[0]
    replayed = send_raw(captured, ("127.0.0.1", broker.oscore_port), 0x1234)
    assert str(replayed.code) == "4.01 Unauthorized" and b"Replay" in replayed.payload

    # The right Sender ID with a wrong key; an unknown Sender ID.
    forged = dict(t1["credential"], master_secret=secrets.token_hex(16))
    intruder = OscoreSensor(tmp_path / "forged", forged, broker.oscore_port)
    sensors.append(intruder)
    assert not intruder.request("POST", "/telemetry", _reading(99), CBOR).code.startswith("2")
    stranger = OscoreSensor(tmp_path / "stranger", dict(t1["credential"], sender_id="7f7f7f"),
                            broker.oscore_port)
    sensors.append(stranger)
    answer = stranger.request("POST", "/telemetry", _reading(99), CBOR)
    assert answer.code == "4.01" and not answer.protected
    assert len(upstream.received()) == 1

    # Quarantined: refused from the next message on; released: accepted again.
    assert broker.ctl("quarantine", "t-1", "--reason", "test").returncode == 0
    answer = sensor.request("POST", "/telemetry", _reading(22), CBOR)
    assert answer.code == "4.01" and not answer.protected
    assert broker.ctl("release", "t-1").returncode == 0
    assert sensor.request("POST", "/telemetry", _reading(23), CBOR).code == "2.04"
    assert len(upstream.received()) == 2

    totals = broker_stack.totals()
    assert totals["forwarded"] == 2
    assert totals["refused.denied"] == 4 and totals["refused.replay"] == 1
    assert totals["refused.auth-failed"] >= 1 and totals["refused.unknown-credential"] >= 1
    assert totals["refused.disabled"] == 1

    # Counters and last-seen reach the registry (flushed every few seconds).
    broker.stop()
    audit = (broker.directory / "state" / "audit.log").read_text()
    assert '"policy-denied"' in audit and '"sensor-auth-failed"' in audit

    # After a clean restart: the replay window was saved, the old capture is refused and
    # the sensor goes on without an Echo round trip.
    broker.start().wait_serving()
    replayed = send_raw(captured, ("127.0.0.1", broker.oscore_port), 0x2345)
    assert str(replayed.code) == "4.01 Unauthorized" and replayed.opt.echo is None
    _code, shown = broker.ctl_json("show", "t-1")
    # auth failures: the wrong key, the replay during the run and the one just now
    assert (shown["messages"], shown["denials"], shown["auth_failures"]) == (6, 4, 3)
    assert shown["last_seen"]
    assert sensor.request("POST", "/telemetry", _reading(24), CBOR).code == "2.04"
    capture_2 = relay.requests[-1]

    # After a SIGKILL the window is unknown: the capture gets a 4.01 with an Echo, which a
    # replay cannot answer; the real sensor answers it (aiocoap does) and goes on.
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGKILL)
    broker.proc.wait()
    broker.start().wait_serving()
    for datagram, mid in ((captured, 0x3456), (capture_2, 0x4567)):
        replayed = send_raw(datagram, ("127.0.0.1", broker.oscore_port), mid)
        assert replayed.opt.oscore is not None  # a protected 4.01 carrying an Echo
    totals = broker_stack.totals()
    assert totals["echo_challenges"] == 2 and "forwarded" not in totals
    assert sensor.request("POST", "/telemetry", _reading(25), CBOR).code == "2.04"
    totals = broker_stack.totals()
    assert totals["echo_challenges"] == 3 and totals["forwarded"] == 1
    received = upstream.received()
    assert len(received) == 4
    assert [r["sensor"] for r in received] == [[t1["id"]]] * 4

    # Revoked while sending: refused from the next message on.
    assert broker.ctl("revoke", "t-1").returncode == 0
    assert sensor.request("POST", "/telemetry", _reading(26), CBOR).code == "4.01"
    assert len(upstream.received()) == 4
    relay.close()
