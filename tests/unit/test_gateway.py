"""The Gateway resource without sockets: what an authenticated request becomes (the policy's
decision, the forward, the code the sensor gets back). Upstreams here are recorders that
implement the Upstream interface; the real one is exercised in the integration tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiocoap import Code, Message
from aiocoap.message import Direction

from agent.audit import AuditLog
from agent.broker.gateway import Gateway
from agent.broker.policy import PolicyHolder
from agent.broker.traffic import Traffic
from agent.broker.upstream import Forward, Reply
from agent.errors import UpstreamError
from agent.policy.decide import Rates
from agent.policy.model import parse_policy
from agent.sensors.model import Sensor
from agent.sensors.store import SensorStore
from tests.unit.test_sensors import _cipher

POLICY = """
[profiles.temperature]
[[profiles.temperature.rules]]
name = "telemetry"
methods = ["POST"]
path = "/telemetry"
upstream = "sensors/{sensor}/telemetry"
max_payload = 16
rate = 60
burst = 2
"""
SENSOR = Sensor(1, "urn:devid:sensor:01", "t-1", "temperature", "oscore", "active", b"\x01")


class Recorder:
    name, url = "cloud", "coaps+tcp://upstream.test"

    def __init__(self, behaviour: object = None, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.received: list[Forward] = []
        self.behaviour = behaviour

    async def forward(self, request: Forward) -> Reply:
        self.received.append(request)
        if isinstance(self.behaviour, Exception):
            raise self.behaviour
        if self.behaviour == "hang":
            await asyncio.sleep(3600)
        return Reply(int(Code.CHANGED), b"ok", None, 30)


class _Remote:
    def __init__(self, sensor: Sensor | None) -> None:
        self.sensor, self.hostinfo = sensor, "192.0.2.1:5683"


def _gateway(tmp_path: Path, upstream: Recorder) -> tuple[Gateway, Traffic]:
    store = SensorStore(tmp_path / "sensors.db", _cipher())
    holder = PolicyHolder(tmp_path / "policy.toml", store)
    holder.policy = parse_policy(POLICY, tmp_path / "policy.toml")
    traffic = Traffic(store, AuditLog(tmp_path / "audit.log"))
    gateway = Gateway([lambda remote: remote.sensor], holder, {"cloud": upstream}, traffic,
                      Rates(lambda: 0.0))
    return gateway, traffic


def _request(path: str = "/telemetry", payload: bytes = b"21.5", method: Code = Code.POST,
             sensor: Sensor | None = SENSOR, **options: object) -> Message:
    message = Message(code=method, payload=payload, uri_path=tuple(path.strip("/").split("/")),
                      **options)
    message.direction, message.remote = Direction.INCOMING, _Remote(sensor)
    return message


def _render(gateway: Gateway, request: Message) -> Message:
    return asyncio.run(gateway.render(request))


def test_an_allowed_request_is_forwarded_with_only_its_payload_and_format(tmp_path):
    upstream = Recorder()
    gateway, traffic = _gateway(tmp_path, upstream)
    answer = _render(gateway, _request(content_format=60, if_none_match=True))
    assert (answer.code, answer.payload, answer.opt.max_age) == (Code.CHANGED, b"ok", 30)
    [forward] = upstream.received
    assert forward.path == f"sensors/{SENSOR.id}/telemetry" and forward.sensor == SENSOR
    assert (forward.payload, forward.content_format) == (b"21.5", 60)
    assert traffic.totals["forwarded"] == 1 and traffic.totals["authenticated"] == 1


QUARANTINED = Sensor(2, "urn:devid:sensor:02", "t-2", "temperature", "dtls-psk", "quarantined",
                     b"devid-s2")


@pytest.mark.parametrize("request_, code, text", [
    (_request(sensor=None), Code.UNAUTHORIZED, "OSCORE or DTLS required"),
    (_request(sensor=QUARANTINED), Code.UNAUTHORIZED, "not authorized"),
    (_request(method=Code.GET), Code.FORBIDDEN, "allows POST"),
    (_request(payload=b"x" * 17), Code.FORBIDDEN, "at most 16"),
    (_request(path="/sensors/urn:devid:sensor:02/telemetry"), Code.FORBIDDEN, "no rule"),
    (_request(proxy_uri="coap://elsewhere/x"), Code.PROXYING_NOT_SUPPORTED, "forward proxy"),
])
def test_refusals_are_answered_and_nothing_is_forwarded(tmp_path, request_, code, text):
    upstream = Recorder()
    gateway, traffic = _gateway(tmp_path, upstream)
    answer = _render(gateway, request_)
    assert answer.code == code and text in answer.payload.decode()
    assert upstream.received == [] and traffic.totals["forwarded"] == 0


def test_the_rate_gives_4_29_with_max_age(tmp_path):
    upstream = Recorder()
    gateway, traffic = _gateway(tmp_path, upstream)
    codes = [_render(gateway, _request()).code for _ in range(3)]
    assert codes[:2] == [Code.CHANGED] * 2
    answer = _render(gateway, _request())
    assert int(answer.code) == 0x9D and answer.opt.max_age == 1  # 4.29, room again in 1 s
    assert len(upstream.received) == 2 and traffic.totals["refused.denied"] == 2


def test_upstream_failures_are_5_02_and_timeouts_5_04(tmp_path):
    gateway, traffic = _gateway(tmp_path, Recorder(UpstreamError("connection refused")))
    answer = _render(gateway, _request())
    assert answer.code == Code.BAD_GATEWAY and b"connection refused" in answer.payload
    (tmp_path / "t").mkdir()
    gateway, traffic = _gateway(tmp_path / "t", Recorder("hang", timeout=0.05))
    assert _render(gateway, _request()).code == Code.GATEWAY_TIMEOUT
    assert traffic.totals["upstream_failed"] == 1


class _Local:
    def __init__(self) -> None:
        self.asked = 0

    async def respond(self, sensor: Sensor, request: Message) -> Message:
        self.asked += 1
        return Message(code=Code.CHANGED)


def test_what_the_gateway_answers_itself_is_rate_limited_per_sensor(tmp_path: Path) -> None:
    store = SensorStore(tmp_path / "sensors.db", _cipher())
    holder = PolicyHolder(tmp_path / "policy.toml", store)
    traffic = Traffic(store, AuditLog(tmp_path / "audit.log"))
    now = [0.0]
    local = _Local()
    gateway = Gateway([lambda remote: remote.sensor], holder, {}, traffic, Rates(lambda: 0.0),
                      local={"rd": local}, monotonic=lambda: now[0])
    codes = [_render(gateway, _request("/rd/x")).code for _ in range(61)]
    assert codes[:60] == [Code.CHANGED] * 60 and local.asked == 60
    assert codes[60] == Code(0x9D) and traffic.totals["refused.denied"] == 1
    limited = _render(gateway, _request("/rd/x"))
    assert limited.opt.max_age == 1 and b"too many LwM2M requests" in limited.payload
    other = Sensor(2, "urn:devid:sensor:02", "t-2", "temperature", "oscore", "active", b"\x02")
    assert _render(gateway, _request("/rd/x", sensor=other)).code == Code.CHANGED
    now[0] += 1.0  # one more a second
    assert _render(gateway, _request("/rd/x")).code == Code.CHANGED
