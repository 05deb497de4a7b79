"""Sensors' telemetry published to Debian's mosquitto, which requires a client certificate
from the registrar's CA: the gateway's own, from the agent. OSCORE (aiocoap's client) and
DTLS-PSK (libcoap's client) sensors both arrive as QoS 1 publishes on their own topics
with the sensor ID the broker asserted (an MQTT 5 user property); a sensor hears 2.04 only
after mosquitto's PUBACK, 5.02 while mosquitto is down, and the broker redials after."""

from __future__ import annotations

import cbor2
from dtls_sensor import coap_client, libcoap_psk
from mqtt_peer import Mosquitto
from oscore_sensor import OscoreSensor
from stack import DEMO_POLICY

MQTT_POLICY = DEMO_POLICY + 'to = "fleet"\n'  # the demo's rule, to mosquitto


def test_sensors_publish_to_mosquitto_under_the_gateways_certificate(
        broker_stack_factory, gateway_agent, tmp_path):
    _, registrar = gateway_agent
    tls = tmp_path / "upstream-tls"
    mosquitto = Mosquitto(tmp_path / "mosquitto", tls / "server.pem", tls / "server.key",
                          registrar.ca).start("sensors/#")
    try:
        stack = broker_stack_factory(
            f'[upstreams.fleet]\nurl = "mqtts://127.0.0.1:{mosquitto.tls_port}"\n'
            f'bundle = "{tmp_path / "upstream-ca.pem"}"\ntimeout = "5s"\n', MQTT_POLICY)
        broker = stack.broker
        t1 = stack.add("t-1")
        sensor = OscoreSensor(tmp_path / "t-1", t1["credential"], broker.oscore_port)
        stack.sensors.append(sensor)
        answer = sensor.request("POST", "/telemetry", cbor2.dumps({"t": 21.5}), 60)
        assert (answer.code, answer.protected) == ("2.04", True), answer
        [got] = mosquitto.wait_for(1)
        assert got.topic == f"sensors/{t1['id']}/telemetry" and got.qos == 1
        assert cbor2.loads(got.payload) == {"t": 21.5}
        assert got.properties == f"sensor:{t1['id']}" and got.content_type == "application/cbor"
        # mosquitto took the gateway's certificate as the client's identity.
        assert "u'devid-tls " in mosquitto.log.read_text()

        d1 = stack.add("d-1", "--transport", "dtls-psk")
        identity, key = libcoap_psk(broker, "d-1", d1["credential"])
        reply = coap_client("coap-client-gnutls", identity, key, broker.dtls_port,
                            "/telemetry", "22.0")
        assert reply.ok, reply
        got = mosquitto.wait_for(2)[-1]
        assert got.topic == f"sensors/{d1['id']}/telemetry" and got.payload == b"22.0"
        assert got.properties == f"sensor:{d1['id']}"
        assert got.content_type == "text/plain;charset=utf-8"

        # mosquitto down: 5.02 with the reason, nothing acknowledged that did not arrive.
        mosquitto.stop(subscriber=False)
        answer = sensor.request("POST", "/telemetry", cbor2.dumps({"t": 23.0}), 60)
        assert answer.code == "5.02" and b"fleet" in answer.payload, answer
        mosquitto.start("sensors/#")
        answer = sensor.request("POST", "/telemetry", cbor2.dumps({"t": 24.0}), 60)
        assert answer.code == "2.04", answer
        got = mosquitto.wait_for(3)
        assert [cbor2.loads(r.payload)["t"] for r in got if r.content_type.endswith("cbor")] \
            == [21.5, 24.0]
        status = stack.status()["upstreams"]["fleet"]
        assert status["published"] == 3 and status["connections_opened"] == 2
        assert stack.totals()["upstream_failed"] == 1
    finally:
        mosquitto.stop()
