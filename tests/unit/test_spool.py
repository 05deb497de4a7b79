"""The spool's store without a network: limits, order, and what a reopened file knows."""

from __future__ import annotations

import asyncio

import pytest

from agent.broker.spool import Spool, SpoolFull, SpoolStore
from agent.broker.upstream import Forward, Reply
from agent.errors import UpstreamError
from agent.sensors.model import Sensor

T1 = Sensor(1, "urn:devid:sensor:01", "t-1", "temperature", "oscore", "active", b"\x01")
T2 = Sensor(2, "urn:devid:sensor:02", "t-2", "temperature", "oscore", "active", b"\x02")


def _forward(sensor: Sensor, n: int, size: int = 4) -> Forward:
    return Forward(sensor, "POST", f"sensors/{sensor.id}/telemetry", bytes([n]) * size, 60)


def test_limits_order_and_a_reopened_spool(tmp_path):
    store = SpoolStore(tmp_path / "spool.db", max_messages=3, max_bytes=10)
    store.append("cloud", _forward(T1, 1), 1.0)
    store.append("cloud", _forward(T2, 2), 2.0)
    with pytest.raises(SpoolFull):
        store.append("cloud", _forward(T1, 3, size=5), 3.0)  # 13 bytes > 10
    store.append("cloud", _forward(T1, 4, size=2), 4.0)
    with pytest.raises(SpoolFull):
        store.append("cloud", _forward(T1, 5, size=1), 5.0)  # 4 messages > 3
    store.close()

    again = SpoolStore(tmp_path / "spool.db", max_messages=3, max_bytes=10)
    assert (again.count, again.bytes) == (3, 10)
    assert again.waiting == {("cloud", 1): 2, ("cloud", 2): 1}
    oldest = again.oldest("cloud", 10)
    assert [i.forward.payload[0] for i in oldest] == [1, 2, 4]
    assert oldest[0].forward.sensor.id == T1.id and oldest[0].forward.content_format == 60
    for item in oldest:
        again.delivered(item)
    assert (again.count, again.bytes, again.waiting) == (0, 0, {})


class _Flaky:
    name, url, timeout = "cloud", "coaps+tcp://x", 1.0

    def __init__(self) -> None:
        self.up, self.got = False, []

    async def forward(self, request: Forward) -> Reply:
        if not self.up:
            raise UpstreamError("connection refused")
        self.got.append(request.payload[0])
        return Reply(68)


def test_delivery_waits_for_the_upstream_and_keeps_the_order(tmp_path):
    async def scenario() -> list[int]:
        upstream = _Flaky()
        spool = Spool(SpoolStore(tmp_path / "spool.db", 100, 1 << 20), {"cloud": upstream})
        for n in range(5):
            assert (await spool.accept("cloud", _forward(T1, n))).code == 68
        assert spool.behind("cloud", T1) and not spool.behind("cloud", T2)
        stop = asyncio.Event()
        task = asyncio.create_task(spool.run(stop))
        await asyncio.sleep(0.1)
        assert upstream.got == [] and spool.last_error["cloud"] == "connection refused"
        upstream.up = True
        for _ in range(100):
            if spool.store.count == 0:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await task
        return upstream.got

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]
