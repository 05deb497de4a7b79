"""What the upstream LwM2M server asks the gateway, fed anything (hypothesis): always an
answer (2.xx, or a 4.xx saying why), never an exception, and the sensor asked only
for what its profile grants. The DTLS session and the sensor are edges, faked here; the
integration tests (test_broker_lwm2m_gateway.py) drive them for real."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiocoap import Code, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.broker.config import parse_lwm2m_url
from agent.broker.lwm2mupstream import Lwm2mUpstream
from agent.errors import ConfigError, Lwm2mForbidden
from agent.lwm2m.registration import Registrations, parse_register
from agent.sensors.model import Sensor

SENSOR = Sensor(serial=7, id="urn:devid:sensor:t:7", name="m-7", profile="meter",
                transport="oscore", status="active", kid=b"\x07")


class FakeLwm2m:
    """The gateway's LwM2M server as the upstream part uses it: its table, the registry,
    the grants (read of /3303/0/5700 only) and the way down (a canned answer)."""

    def __init__(self) -> None:
        self.table = Registrations(lambda: "loc")
        self.table.register(7, SENSOR.id, "m-7",
                            parse_register(["ep=m-7"], b"</3/0>,</3303/0>"), 0.0)
        self.asked: list[Message] = []
        self.registry = SimpleNamespace(store=SimpleNamespace(
            current=lambda serials: {7: (SENSOR, b"")} if 7 in serials else {}))
        self.downlink = SimpleNamespace(request=self._request)

    def permit(self, sensor: Sensor, operation: str, path: tuple[int, ...], who: str) -> None:
        if (operation, path, who) != ("read", (3303, 0, 5700), "upstream"):
            raise Lwm2mForbidden(f"profile meter grants the {who} no {operation}")

    async def _request(self, sensor: Sensor, message: Message) -> Message:
        self.asked.append(message)
        answer = Message(code=Code.CONTENT, payload=b"21.5")
        answer.opt.content_format = 0
        return answer


class Audit:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def append(self, event: str, **fields: Any) -> None:
        self.records.append({"event": event, **fields})


def _upstream(lwm2m: FakeLwm2m, audit: Audit) -> Lwm2mUpstream:
    credentials = SimpleNamespace(current=None, withdrawn=None, error=None)
    return Lwm2mUpstream("coaps://127.0.0.1:5684", "gw", 300, 5.0, None,
                         credentials, lwm2m, audit)  # type: ignore[arg-type]


def _ask(upstream: Lwm2mUpstream, request: Message) -> Message:
    async def run() -> Message:
        answer = await upstream.respond(request)
        await asyncio.gather(*upstream._auditing)
        return answer
    return asyncio.run(run())


def test_the_server_reads_what_is_granted_and_is_refused_the_rest() -> None:
    lwm2m, audit = FakeLwm2m(), Audit()
    upstream = _upstream(lwm2m, audit)
    answer = _ask(upstream, Message(code=Code.GET, uri_path=("m-7", "3303", "0", "5700")))
    assert (answer.code, answer.payload) == (Code.CONTENT, b"21.5")
    assert [m.opt.uri_path for m in lwm2m.asked] == [("3303", "0", "5700")]
    refused = _ask(upstream, Message(code=Code.PUT, uri_path=("m-7", "3303", "0", "5700"),
                                     payload=b"30"))
    assert refused.code == Code.FORBIDDEN and b"grants the upstream no write" in \
        refused.payload
    assert len(lwm2m.asked) == 1  # the sensor was not asked
    assert [(r["operation"], r["caller"], r.get("answer"), "refused" in r)
            for r in audit.records] == [("read", "upstream", "2.05", False),
                                        ("write", "upstream", None, True)]
    own = _ask(upstream, Message(code=Code.GET, uri_path=("25", "7", "1")))
    assert (own.code, own.payload) == (Code.CONTENT, b"m-7")
    assert _ask(upstream, Message(code=Code.DELETE, uri_path=("25",))).code == \
        Code.METHOD_NOT_ALLOWED


@settings(max_examples=300, deadline=None)
@given(path=st.lists(st.one_of(st.sampled_from(["m-7", "25", "3303", "0", "5700", "1",
                                                "3", "_7", "00", "65536"]),
                               st.text(max_size=12)), max_size=6),
       code=st.integers(min_value=1, max_value=31),
       accept=st.one_of(st.none(), st.integers(min_value=0, max_value=65535)),
       content_format=st.one_of(st.none(), st.sampled_from([0, 40, 110, 112, 11542]),
                                st.integers(min_value=0, max_value=65535)),
       observe=st.one_of(st.none(), st.integers(min_value=0, max_value=1)),
       payload=st.binary(max_size=64))
def test_anything_the_server_sends_gets_an_answer_and_only_grants_reach_the_sensor(
        path: list[str], code: int, accept: int | None, content_format: int | None,
        observe: int | None, payload: bytes) -> None:
    lwm2m, audit = FakeLwm2m(), Audit()
    request = Message(code=Code(code), uri_path=tuple(path), payload=payload)
    if accept is not None:
        request.opt.accept = accept
    if content_format is not None:
        request.opt.content_format = content_format
    if observe is not None:
        request.opt.observe = observe
    answer = _ask(_upstream(lwm2m, audit), request)
    assert answer.code.is_successful() or answer.code.class_ == 4, (answer, answer.payload)
    for asked in lwm2m.asked:
        assert asked.opt.uri_path == ("3303", "0", "5700") and asked.code == Code.GET


@pytest.mark.parametrize(("url", "what"), [
    ("coap://lwm2m:5683", "expected coaps://"), ("coaps://", "expected coaps://"),
    ("coaps://lwm2m:5684/rd", "only a host and a port"),
    ("coaps://lwm2m:99999", "port is not a number")])
def test_a_bad_lwm2m_upstream_url_is_refused_saying_why(url: str, what: str) -> None:
    with pytest.raises(ConfigError, match=what):
        parse_lwm2m_url(url)


def test_garbage_from_the_upstream_server_is_dropped() -> None:
    """A datagram that is not a DTLS record is discarded, as RFC 6347 4.1.2.7 says,
    and the handshake goes on waiting (no traceback, no failed session); after it,
    plaintext that is not CoAP is dropped and the next CoAP message still goes through."""
    from mbedtls import tls

    from agent.broker.dtlsclient import DtlsClient, Session

    class Layer:
        def __init__(self) -> None:
            self.got: list[Message] = []

        def dispatch_message(self, message: Message) -> None:
            self.got.append(message)

    async def run() -> None:
        layer = Layer()
        client = DtlsClient(layer, "127.0.0.1", 5684, 1.0)  # type: ignore[arg-type]
        buffer = tls.ClientContext(tls.DTLSConfiguration(
            pre_shared_key=("x", b"k" * 16), validate_certificates=False)).wrap_buffers(None)
        session = Session(client, buffer, "01")
        for garbage in (b"\x16\xfe\xfd" + b"\x00" * 40, b"\xff" * 5, b"", b"\x17" * 70000):
            session.datagram_received(garbage, ("127.0.0.1", 5684))
        assert not session.done.done() and not session.closed and not session.established
        session.close()
        client.deliver(b"\xff\x00 not coap")
        client.deliver(b"\x40")
        assert layer.got == []
        client.deliver(b"\x40\x01\x00\x01\xb225")  # CON GET /25, MID 1
        assert [m.opt.uri_path for m in layer.got] == [("25",)]

    asyncio.run(run())
