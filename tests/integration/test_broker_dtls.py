"""Sensors over DTLS 1.2 PSK through devid-broker, with libcoap's own clients (OpenSSL and
GnuTLS builds) as the sensors, to a CoAP-over-TLS upstream that requires the gateway's
certificate. Also: a stranger's ClientHello gets only a small HelloVerifyRequest and leaves
no state; wrong keys and unknown identities fail the handshake; quarantine gives 4.01 and
revocation ends the handshakes, from the next session on."""

from __future__ import annotations

import pytest
from dtls_sensor import CLIENTS, coap_client, first_client_hello, libcoap_psk, send_datagram


def _dtls_sensor(stack, name: str) -> tuple[str, bytes]:
    credential = stack.add(name, "--transport", "dtls-psk")["credential"]
    return libcoap_psk(stack.broker, name, credential)


@pytest.mark.parametrize("tool", CLIENTS)
def test_libcoap_sensors_reach_the_upstream_over_dtls_psk(broker_stack, tool):
    broker, upstream = broker_stack.broker, broker_stack.upstream
    identity, key = _dtls_sensor(broker_stack, "d-1")
    sensor_id = broker.ctl_json("show", "d-1")[1]["id"]

    reply = coap_client(tool, identity, key, broker.dtls_port, "/telemetry", "21.5")
    assert (reply.ok, reply.text) == (True, "ok"), reply
    [got] = upstream.received()
    assert got["path"] == f"/sensors/{sensor_id}/telemetry" and got["sensor"] == [sensor_id]
    assert bytes.fromhex(got["payload"]) == b"21.5" and got["content_format"] == 0

    denied = coap_client(tool, identity, key, broker.dtls_port, "/config")
    assert not denied.ok and denied.text.startswith("4.03") and "no rule" in denied.text
    wrong = coap_client(tool, identity, bytes(b ^ 0x5A or 1 for b in key), broker.dtls_port,
                        "/telemetry", wait=3)
    stranger = coap_client(tool, "devid-s-nobody", key, broker.dtls_port, "/telemetry", wait=3)
    assert not wrong.ok and not stranger.ok
    assert len(upstream.received()) == 1
    totals = broker_stack.totals()
    assert totals["refused.auth-failed"] >= 2 and totals["refused.denied"] == 1
    assert totals["forwarded"] == 1 and sum(v for k, v in totals.items()
                                            if k.startswith("dtls.suite.")) == 2

    # Quarantined: the handshake still works, the request gets 4.01; revoked: no session.
    assert broker.ctl("quarantine", "d-1", "--reason", "test").returncode == 0
    refused = coap_client(tool, identity, key, broker.dtls_port, "/telemetry")
    assert refused.text.startswith("4.01"), refused
    assert broker.ctl("release", "d-1").returncode == 0
    assert coap_client(tool, identity, key, broker.dtls_port, "/telemetry").ok
    assert broker.ctl("revoke", "d-1").returncode == 0
    assert not coap_client(tool, identity, key, broker.dtls_port, "/telemetry", wait=3).ok
    assert len(upstream.received()) == 2
    _, shown = broker.ctl_json("show", "d-1")
    assert shown["messages"] == 3 and shown["denials"] == 1 and shown["auth_failures"] >= 1


def test_a_strangers_client_hello_gets_a_small_hello_verify_request_and_no_state(
        broker_stack):
    broker = broker_stack.broker
    for _ in range(50):
        hello = first_client_hello()
        answer = send_datagram(hello, broker.dtls_port)
        assert answer is not None and len(answer) <= len(hello)  # no amplification
        # A handshake record carrying a HelloVerifyRequest (handshake type 3).
        assert answer[0] == 22 and answer[13] == 3
    status = broker_stack.status()["dtls"]
    assert status["handshaking"] == 0 and status["sessions"] == 0
    # Garbage is dropped without an answer and without state.
    assert send_datagram(b"\x17\xfe\xfd" + bytes(40), broker.dtls_port, 1.0) is None
    assert send_datagram(bytes(2000), broker.dtls_port, 1.0) is None
    assert broker_stack.status()["dtls"]["handshaking"] == 0
