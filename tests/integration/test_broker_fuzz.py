"""Hostile datagrams at both listeners, from a hypothesis fuzzer: random bytes and mutations
of real traffic (a captured OSCORE request, a captured EDHOC handshake, a DTLS ClientHello
and a captured DTLS session). The broker must not crash or stall, must forward nothing,
and the real sensors keep working; what is not CoAP at all is counted as malformed."""

from __future__ import annotations

import socket

import cbor2
from dtls_sensor import coap_client, first_client_hello, libcoap_psk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oscore_sensor import OscoreSensor, UdpRelay


def _mutations(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    def mutate(seed: bytes, flips: list[tuple[int, int]], cut: int, tail: bytes) -> bytes:
        data = bytearray(seed)
        for at, value in flips:
            if data:
                data[at % len(data)] = value
        return bytes(data[:max(1, len(data) - cut)]) + tail
    return st.builds(mutate, st.sampled_from(seeds),
                     st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                              max_size=6),
                     st.integers(0, 40), st.binary(max_size=40))


def test_fuzzed_datagrams_forward_nothing_and_real_sensors_keep_working(broker_stack,
                                                                        tmp_path):
    broker, upstream = broker_stack.broker, broker_stack.upstream
    t1 = broker_stack.add("t-1")
    relay = UdpRelay(("127.0.0.1", broker.oscore_port))
    sensor = OscoreSensor(tmp_path / "t-1", t1["credential"], relay.port)
    broker_stack.sensors.append(sensor)
    assert sensor.request("POST", "/telemetry", cbor2.dumps({"t": 1}), 60).code == "2.04"
    e1 = broker_stack.add("e-1", "--transport", "edhoc")
    edhoc = OscoreSensor(tmp_path / "e-1", e1["credential"], relay.port)
    broker_stack.sensors.append(edhoc)
    assert edhoc.request("POST", "/telemetry", cbor2.dumps({"t": 1}), 60).code == "2.04"
    d1 = broker_stack.add("d-1", "--transport", "dtls-psk")
    identity, key = libcoap_psk(broker, "d-1", d1["credential"])
    dtls_relay = UdpRelay(("127.0.0.1", broker.dtls_port))
    assert coap_client("coap-client-openssl", identity, key, dtls_relay.port, "/telemetry").ok
    seeds = relay.requests + dtls_relay.requests + [first_client_hello()]
    relay.close()
    dtls_relay.close()
    sensor.retarget(broker.oscore_port)
    edhoc.retarget(broker.oscore_port)
    forwarded = len(upstream.received())
    assert forwarded == 3
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ports = (broker.oscore_port, broker.dtls_port)

    @settings(max_examples=600, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=1600), _mutations(seeds)), st.sampled_from(ports))
    def hostile(datagram: bytes, port: int) -> None:
        out.sendto(datagram, ("127.0.0.1", port))

    hostile()
    out.close()
    # Still alive, still serving both kinds of sensor, and nothing forged went through.
    totals = broker_stack.totals()
    assert totals["malformed"] > 0
    assert sensor.request("POST", "/telemetry", cbor2.dumps({"t": 2}), 60).code == "2.04"
    edhoc.forget_edhoc_session()  # a fresh handshake still completes
    assert edhoc.request("POST", "/telemetry", cbor2.dumps({"t": 2}), 60).code == "2.04"
    assert coap_client("coap-client-gnutls", identity, key, broker.dtls_port, "/telemetry").ok
    received = upstream.received()
    assert len(received) == forwarded + 3
    assert {r["sensor"][0] for r in received} == {t1["id"], e1["id"], d1["id"]}
    assert broker.proc is not None and broker.proc.poll() is None
    assert "Traceback" not in broker.log.read_text()
