"""The broker's garbage-collector tuning: survivors frozen, cycles still reclaimed."""

from __future__ import annotations

import asyncio
import gc

from agent.broker.collector import Collector


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_survivors_are_frozen_and_a_full_collection_reclaims_frozen_cycles() -> None:
    now = [0.0]
    collector = Collector(freeze_every=0.01, full_every=100.0, clock=lambda: now[0])

    async def scenario() -> dict[str, object]:
        task = asyncio.create_task(collector.run())
        Cycle()  # garbage only the collector can free
        await asyncio.sleep(0.05)
        frozen = gc.get_freeze_count()
        now[0] = 200.0  # past full_every
        while collector.full_collections == 0:
            await asyncio.sleep(0.01)
        status = collector.status_section()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return {"frozen": frozen, "status": status}

    try:
        seen = asyncio.run(scenario())
    finally:
        gc.unfreeze()
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 0
    status = seen["status"]
    assert isinstance(status, dict)
    assert status["full_collections"] == 1
    assert status["last_freed"] >= 1  # the frozen cycle, among others
    assert gc.get_freeze_count() == 0  # a stopped collector leaves nothing frozen

