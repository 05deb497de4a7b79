#!/usr/bin/env python3
"""What watching the sensors costs, against forwarding the same message, in one run.

    .venv/bin/python bench/watch.py [--seconds 5] [--concurrency 16] [--sensors 10000]

(forward) devid-broker forwards OSCORE requests of one sensor to the tests' CoAP-over-TLS
upstream for `--seconds` with `--concurrency` in flight: the broker's CPU per forwarded
request (the watch included, as it always runs).
(watch) in this process, the broker's watch (agent/broker/watching.py, the same code)
takes `--sensors` learned sensors' messages, round-robin, as the gateway hands them
over: the CPU per message. Printed: both, and the watch's share of forwarding (target:
under 5 %). Then the memory the watch holds per sensor (tracemalloc, learned baselines).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from broker import POLICY, closed_loop, raw_sender  # noqa: E402
from coap_loadgen import raw_client  # noqa: E402
from coap_upstream import CoapUpstreamProcess  # noqa: E402
from mtls import server_identity  # noqa: E402
from oscore_sensor import MemoryContext  # noqa: E402
from processes import cpu_seconds  # noqa: E402
from stack import BrokerProcess, enrolled_gateway, free_port  # noqa: E402

from agent.broker.watching import Watching  # noqa: E402
from agent.policy.model import parse_policy  # noqa: E402
from agent.sensors.model import Sensor  # noqa: E402


def forwarding_cpu_us(tmp: Path, seconds: float, concurrency: int) -> tuple[float, float]:
    """(broker CPU µs per forwarded request, requests/s)."""
    with enrolled_gateway(tmp) as (agent, registrar):
        cert, key, ca_pem = server_identity(tmp / "tls")
        (tmp / "upstream-ca.pem").write_text(ca_pem)
        upstream = CoapUpstreamProcess(tmp / "upstream", free_port(), cert, key, registrar.ca,
                                       optional_client_cert=True)
        broker = BrokerProcess(tmp / "broker", agent.config.parent / "run" / "identity.sock",
                               f'[upstreams.cloud]\nurl = "coaps+tcp://127.0.0.1:'
                               f'{upstream.port}"\nbundle = "{tmp / "upstream-ca.pem"}"\n')
        try:
            upstream.start()
            broker.policy.write_text(POLICY)
            broker.start().wait_serving()
            assert broker.proc is not None
            _, added = broker.ctl_json("add", "t-1", "--profile", "bench")
            credential = added["sensors"][0]["credential"]

            async def drive() -> tuple[float, float]:
                client = await raw_client(broker.oscore_port)
                try:
                    send = raw_sender(client, "telemetry", "oscore",
                                      MemoryContext.of(credential))
                    await closed_loop(send, 1.0, concurrency)  # warm up
                    cpu0 = cpu_seconds(broker.proc.pid)  # type: ignore[union-attr]
                    t0 = time.perf_counter()
                    rate, failed = await closed_loop(send, seconds, concurrency)
                    cpu = cpu_seconds(broker.proc.pid) - cpu0  # type: ignore[union-attr]
                    from broker import FIRST_FAILURE
                    assert failed == 0, (failed, FIRST_FAILURE)
                    count = rate * (time.perf_counter() - t0)
                    return cpu / count * 1e6, rate
                finally:
                    client.close()

            return asyncio.run(drive())
        finally:
            broker.stop()
            upstream.stop()


Fleet = tuple[list[Sensor], list[str]]


def _fleet(sensors: int) -> Fleet:
    """The registry's side: the sensors and the addresses they send from."""
    fleet = [Sensor(serial=i, id=f"urn:devid:sensor:{i}", name=f"s-{i}", profile="bench",
                    transport="oscore", status="active", kid=i.to_bytes(4, "big"))
             for i in range(1, sensors + 1)]
    return fleet, [f"[fd00::{sensor.serial:x}]:5683" for sensor in fleet]


def _watching(fleet: Fleet) -> tuple[Watching, list[float]]:
    """The broker's watch with the fleet, each sensor past its learning (a day of one
    message every 5 minutes, jittered), on a clock the bench moves."""
    sensors, addresses = fleet
    policy = SimpleNamespace(policy=parse_policy(POLICY, Path("policy.toml")))
    now = [1_700_000_000.0]
    watching = Watching(None, policy, None, clock=lambda: now[0])  # type: ignore[arg-type]
    learning = 25  # messages per sensor: past min_messages (20)
    for step in range(learning):
        for sensor, address in zip(sensors, addresses, strict=True):
            now[0] += 300.0 * (1 + (sensor.serial * 7919 + step) % 11 / 100) / len(sensors)
            watching.message(sensor, "POST coap", 11, address)
    now[0] += 86400.0  # the learning day has passed
    return watching, now


def watch_cpu_us(sensors: int, rounds: int) -> float:
    fleet = _fleet(sensors)
    watching, now = _watching(fleet)
    samples = []
    for _ in range(rounds):
        t0 = time.process_time()
        for sensor, address in zip(*fleet, strict=True):
            now[0] += 300.0 / sensors
            watching.message(sensor, "POST coap", 11, address)
        samples.append((time.process_time() - t0) / sensors * 1e6)
    assert watching.totals == {}, watching.totals  # steady sensors: no finding
    return statistics.median(samples)


def watch_bytes_per_sensor(sensors: int) -> float:
    fleet = _fleet(sensors)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    watching, _ = _watching(fleet)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert len(watching.detector) == sensors
    return grown / sensors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sensors", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="devid-bench-") as tmp_name:
        forward_us, rate = forwarding_cpu_us(Path(tmp_name), args.seconds, args.concurrency)
    watch_us = watch_cpu_us(args.sensors, rounds=5)
    per_sensor = watch_bytes_per_sensor(args.sensors)
    print(f"{'cost per message':52s} {'CPU us':>8s}")
    print(f"{'(forward) OSCORE through devid-broker, watch included':52s} {forward_us:8.1f}"
          f"   ({rate:.0f} req/s, {args.concurrency} in flight)")
    print(f"{'(watch) the watch alone, ' + str(args.sensors) + ' learned sensors':52s} "
          f"{watch_us:8.1f}")
    print(f"watch / forward: {watch_us / forward_us * 100:.2f} % (target: under 5 %)")
    print(f"memory the watch holds per sensor: {per_sensor:.0f} bytes "
          f"({args.sensors} learned sensors, tracemalloc)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
