"""devid-broker's listeners on "[::]": sensors reach them over IPv6 and over IPv4 (as
IPv4-mapped addresses), each kind of sensor with its independent peer: aiocoap's OSCORE
client, its EDHOC initiator, and libcoap's DTLS clients."""

from __future__ import annotations

import cbor2
from dtls_sensor import CLIENTS, coap_client, libcoap_psk
from oscore_sensor import OscoreSensor


def test_sensors_reach_a_dual_stack_broker_over_ipv6_and_ipv4(broker_stack_factory,
                                                              tmp_path):
    stack = broker_stack_factory(host="::")
    broker, upstream = stack.broker, stack.upstream
    t1, e1 = stack.add("t-1"), stack.add("e-1", "--transport", "edhoc")
    d1 = stack.add("d-1", "--transport", "dtls-psk")
    expected = []
    for host in ("::1", "127.0.0.1"):
        for added in (t1, e1):
            # One directory per sensor: t-1's sequence numbers go on where they stopped
            # (a fresh start at 0 would be refused as a replay, rightly).
            sensor = OscoreSensor(tmp_path / added["name"], added["credential"],
                                  broker.oscore_port, host)
            stack.sensors.append(sensor)
            answer = sensor.request("POST", "/telemetry", cbor2.dumps({"t": 1}), 60)
            assert (answer.code, answer.protected) == ("2.04", True), (host, answer)
            expected.append(added["id"])
            sensor.close()
            stack.sensors.remove(sensor)
    identity, key = libcoap_psk(broker, "d-1", d1["credential"])
    for tool, host in zip(CLIENTS, ("::1", "127.0.0.1"), strict=False):
        reply = coap_client(tool, identity, key, broker.dtls_port, "/telemetry", host=host)
        assert reply.ok, (tool, host, reply.text)
        expected.append(d1["id"])
    assert [r["sensor"][0] for r in upstream.received()] == expected
    # Nothing about the address family confused the refusals: none.
    totals = stack.totals()
    assert not any(k.startswith("refused.") for k in totals), totals
