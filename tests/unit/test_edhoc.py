"""The broker's EDHOC responder without a network: lakers as the sensor's initiator,
EdhocSessions as the gateway, the derived OSCORE context checked against the sensor's,
and the session's end on schedule, on a wrong key and on garbage."""

from __future__ import annotations

import cbor2
import lakers
import pytest
from aiocoap import CON, Code, Message
from aiocoap.message import Direction
from aiocoap.oscore import ReplayError

from agent.audit import AuditLog
from agent.broker.edhoc import EdhocSessions
from agent.broker.traffic import Traffic
from agent.sensors.store import NewSensor, SensorStore
from tests.oscore_sensor import MemoryContext
from tests.unit.test_sensors import NOW, _cipher


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def gateway(tmp_path):
    store = SensorStore(tmp_path / "sensors.db", _cipher())
    added = store.add([NewSensor(f"e-{n}", "temperature", "edhoc") for n in (1, 2)], NOW)
    traffic = Traffic(store, AuditLog(tmp_path / "audit.log"))
    clock = Clock()
    return EdhocSessions(store, traffic, lifetime=60.0, clock=clock), traffic, clock, added


class _Remote:
    hostinfo = "192.0.2.7:5683"


def _post(payload: bytes) -> Message:
    return Message(code=Code.POST, payload=payload, uri_path=(".well-known", "edhoc"))


def _handshake(sessions: EdhocSessions, credential, private_key: bytes | None = None,
               address: str = "192.0.2.7") -> tuple[Message, lakers.EdhocInitiator]:
    """Messages 1 to 3 as a sensor sends them (message 3 in a request of its own)."""
    initiator = lakers.EdhocInitiator()
    message_1 = initiator.prepare_message_1(b"\x08", [])
    answer = sessions.answer(_post(b"\xf5" + bytes(message_1)), "192.0.2.7:5683", address)
    assert answer.code == Code.CHANGED, answer.payload
    c_r, id_cred_r, _ = initiator.parse_message_2(answer.payload)
    assert cbor2.loads(id_cred_r) == {4: b"\x00"}  # the gateway, by reference
    key = private_key or credential.private_key.reveal()
    initiator.verify_message_2(key, credential.credential, credential.gateway_credential)
    message_3, _ = initiator.prepare_message_3(lakers.CredentialTransfer.ByReference, None)
    final = sessions.answer(_post(cbor2.dumps(bytes(c_r)) + bytes(message_3)), "x", address)
    return final, initiator


def test_a_handshake_gives_the_sensor_and_the_gateway_the_same_fresh_context(gateway):
    sessions, traffic, clock, [(sensor, credential), _] = gateway
    final, initiator = _handshake(sessions, credential)
    assert final.code == Code.CHANGED
    initiator.process_message_4(final.payload)
    [(c_r, context)] = sessions._established.items()
    assert context.sensor == sensor and context.recipient_id == c_r
    assert context.sender_id == b"\x08"  # the sensor's C_I
    assert sessions.find(c_r) is context
    # The sensor's OSCORE context from its side of the handshake (RFC 9528 A.1): what it
    # protects, the gateway's context opens, as this sensor's.
    sensor_side = MemoryContext(bytes(initiator.edhoc_exporter(0, [], 16)),
                                bytes(initiator.edhoc_exporter(1, [], 8)), c_r, b"\x08")
    protected, _ = sensor_side.protect(Message(code=Code.POST, payload=b"21.5",
                                               uri_path=("telemetry",)))
    protected.mtype, protected.mid, protected.token = CON, 1, b"t"
    incoming = Message.decode(protected.encode(), _Remote())
    incoming.direction = Direction.INCOMING
    unprotected, _ = context.unprotect(incoming)
    assert unprotected.payload == b"21.5" and unprotected.opt.uri_path == ("telemetry",)
    # The same datagram again: a replay, refused and counted (aiocoap's responder context
    # alone ends this in an AttributeError).
    with pytest.raises(ReplayError):
        context.unprotect(incoming)
    assert traffic.totals["refused.replay"] == 1
    # On schedule: gone after the lifetime, so the sensor runs EDHOC again.
    clock.now += 61
    assert sessions.find(c_r) is None
    assert sessions.status_section()["edhoc_sessions"] == 0


def test_a_wrong_key_a_stranger_and_garbage_are_refused_and_counted(gateway):
    sessions, traffic, _clock, [(_, credential), (_, other)] = gateway
    final, _ = _handshake(sessions, credential, other.private_key.reveal())
    assert final.code == Code.BAD_REQUEST
    assert traffic.totals["refused.auth-failed"] == 1
    assert sessions.status_section()["edhoc_sessions"] == 0
    assert sessions.status_section()["edhoc_pending"] == 0  # no second try

    answer = sessions.answer(_post(b"\xf5\x01\x02garbage"), "192.0.2.7:5683", "192.0.2.7")
    assert answer.code == Code.BAD_REQUEST and b"EDHOC message 1" in answer.payload
    answer = sessions.answer(_post(cbor2.dumps(b"nope") + b"\x00"), "192.0.2.7:5683",
                             "192.0.2.7")
    assert answer.code == Code.BAD_REQUEST and b"no handshake waits" in answer.payload
    assert traffic.totals["malformed"] == 2


def test_a_flood_of_message_1_pushes_out_the_oldest_not_every_handshake(gateway,
                                                                        monkeypatch):
    import agent.broker.edhoc as edhoc

    sessions, _traffic, _clock, [(_, credential), _] = gateway
    monkeypatch.setattr(edhoc, "MAX_PENDING", 4)
    for n in range(10):
        message_1 = lakers.EdhocInitiator().prepare_message_1(b"\x09", [])
        answer = sessions.answer(_post(b"\xf5" + bytes(message_1)), "x", f"192.0.2.{n}")
        assert answer.code == Code.CHANGED
    assert sessions.status_section()["edhoc_pending"] == 4
    final, _ = _handshake(sessions, credential, address="192.0.2.99")  # still gets through
    assert final.code == Code.CHANGED


def test_handshakes_are_limited_per_sender_and_in_all(gateway):
    """Each message 1 costs P-256 operations: a flood gets 5.03 with Max-Age."""
    sessions, traffic, clock, _ = gateway

    def start(address: str) -> Message:
        message_1 = lakers.EdhocInitiator().prepare_message_1(b"\x0a", [])
        return sessions.answer(_post(b"\xf5" + bytes(message_1)), "x", address)

    assert [start("192.0.2.1").code for _ in range(10)] == [Code.CHANGED] * 10
    refused = start("192.0.2.1")
    assert refused.code == Code.SERVICE_UNAVAILABLE and refused.opt.max_age == 1
    assert start("192.0.2.2").code == Code.CHANGED  # another sender is not held back
    clock.now += 1.0
    assert start("192.0.2.1").code == Code.CHANGED  # one a second after the burst
    # All senders together: 100 at once, then one every 20 ms. The second waited above
    # refilled the 100; the last handshake took one of them.
    codes = [start(f"198.51.100.{n}").code for n in range(120)]
    assert codes.count(Code.SERVICE_UNAVAILABLE) == 120 - 99
    assert traffic.totals["refused.edhoc-rate"] == 1 + 21
