"""The broker's CoAP message layer: deduplication kept compact (agent/broker/coapserver.py)."""

from __future__ import annotations

import logging

from aiocoap import ACK, CON, Code, Message

from agent.broker import coapserver
from agent.broker.coapserver import CompactMessageManager

EXCHANGE_LIFETIME = Message().transport_tuning.EXCHANGE_LIFETIME  # 247 s


def _message(mtype: object, mid: int, code: Code, **fields: object) -> Message:
    message = Message(code=code, **fields)
    message.mtype, message.mid = mtype, mid
    return message


class _TokenManager:
    log = logging.getLogger("test")
    loop = None


class _Sent:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, message: Message) -> None:
        self.sent.append(message)


def test_compact_deduplication_answers_a_duplicate_again_until_the_lifetime_ends() -> None:
    now = [1000.0]
    manager = CompactMessageManager(_TokenManager(), clock=lambda: now[0])
    transport = _Sent()
    manager.message_interface = transport
    remote = ("sensor", 5683)

    request = _message(CON, 7, Code.POST, uri_path=("telemetry",))
    request.remote = remote
    assert manager._deduplicate_message(request) is False  # new
    answer = _message(ACK, 7, Code.CHANGED, payload=b"ok", token=b"\x01")
    answer.remote = remote
    manager._store_response_for_duplicates(answer)
    assert manager.remembered == 1

    now[0] += 100
    assert manager._deduplicate_message(request) is True  # a retransmission
    [again] = transport.sent
    assert (again.mid, again.code, again.payload, again.token, again.remote) == \
        (7, Code.CHANGED, b"ok", b"\x01", remote)

    other = _message(CON, 8, Code.POST)
    other.remote = remote
    assert manager._deduplicate_message(other) is False
    now[0] += EXCHANGE_LIFETIME - 50  # past mid 7's lifetime, not yet mid 8's
    third = _message(CON, 9, Code.POST)
    third.remote = remote
    manager._deduplicate_message(third)  # arrivals sweep what expired
    assert manager.remembered == 2
    assert manager._deduplicate_message(request) is False  # mid 7 is new again


def test_a_flood_is_remembered_only_up_to_the_bound(monkeypatch) -> None:
    monkeypatch.setattr(coapserver, "MAX_REMEMBERED", 100)
    manager = CompactMessageManager(_TokenManager(), clock=lambda: 0.0)
    manager.message_interface = _Sent()
    for mid in range(250):
        message = _message(CON, mid, Code.POST)
        message.remote = ("flood", 1)
        assert manager._deduplicate_message(message) is False
    assert manager.remembered == 100 and manager.forgotten_early == 150
    newest = _message(CON, 249, Code.POST)
    newest.remote = ("flood", 1)
    assert manager._deduplicate_message(newest) is True  # the newest are still known
