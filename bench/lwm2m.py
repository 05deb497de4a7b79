#!/usr/bin/env python3
"""What LwM2M registration costs devid-broker: registrations per second, the time to
register 10,000 sensors, and the memory they take, measured in one run.

    .venv/bin/python bench/lwm2m.py [--sensors 10000] [--concurrency 32] [--reads 300]

One swtpm, a registrar and an enrolled agent give the gateway its identity. The broker
gets a batch of OSCORE sensors (`devidctl sensors add --count`); then each registers
once (POST /rd, OSCORE-protected with its own context, as a sensor does) from a lean
load generator with `--concurrency` registrations in flight. Printed: the time for
all, registrations per second, the median and p99 time of one, the broker's RSS idle
with the sensors onboarded and after all registered, and its CPU per registration.
Baseline in the same run: the same load of plain OSCORE telemetry requests answered
4.03 by the policy (authenticated, refused, nothing forwarded), i.e. what any
authenticated request costs before LwM2M does anything.

Then, with a second broker registered as an LwM2M Gateway with an upstream server
(this script, behind the tests' DTLS front that checks the gateway's certificate),
`--reads` Reads one after the other of an OSCORE sensor's /3303/0/5700, three ways:
(direct) the server reads the sensor itself, over OSCORE with the sensor's key, as it
could without a gateway; (gateway's own) the server reads /25/N/1, which the gateway
answers itself: the server-gateway leg alone; (through) the server reads
/PREFIX/3303/0/5700 and the gateway relays it to the sensor. Printed: median and p99
of each, and what the gateway adds over the direct Read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from aiocoap import Code, Message  # noqa: E402
from coap_loadgen import RawCoap, raw_client  # noqa: E402
from oscore_sensor import MemoryContext  # noqa: E402
from processes import cpu_seconds, rss_kib  # noqa: E402
from stack import BrokerProcess, enrolled_gateway, free_udp_port  # noqa: E402

POLICY = """
[profiles.meter]
[profiles.meter.lwm2m]
max_lifetime = 86400
"""
LINKS = b'</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>,</3303/0>,</3303/1>'


def _rss_mib(pid: int) -> float:
    return rss_kib(pid) / 1024


async def _load(client: RawCoap, sensors: list[dict[str, Any]], concurrency: int,
                request: Any) -> tuple[float, list[float], dict[str, int]]:
    """Each sensor sends `request(sensor)` once; (seconds, latencies in ms, answer codes)."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for sensor in sensors:
        queue.put_nowait(sensor)
    latencies: list[float] = []
    codes: dict[str, int] = {}

    async def worker() -> None:
        while not queue.empty():
            sensor = queue.get_nowait()
            security = sensor["_context"]
            t0 = time.perf_counter()
            try:
                answer = await client.exchange(request(sensor), security, timeout=10.0)
                code = str(answer.code)
            except TimeoutError:
                code = "timeout"
            latencies.append((time.perf_counter() - t0) * 1000)
            codes[code] = codes.get(code, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies, codes


def _register(sensor: dict[str, Any]) -> Message:
    message = Message(code=Code.POST, uri_path=("rd",), payload=LINKS)
    message.opt.content_format = 40
    message.opt.uri_query = (f"ep={sensor['name']}", "lt=3600", "lwm2m=1.1", "b=U")
    return message


def _telemetry(sensor: dict[str, Any]) -> Message:
    message = Message(code=Code.POST, uri_path=("telemetry",), payload=b"\xa1\x61t\xf9\x4d\x60")
    message.opt.content_format = 60
    return message


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--reads", type=int, default=300,
                        help="Reads of each kind for the upstream latency (0: skip)")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to wait after the load for CoAP's deduplication "
                             "memory (247 s) to expire before the last RSS (0: skip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="devid-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with enrolled_gateway(tmp) as (agent, registrar):
            socket = agent.config.parent / "run" / "identity.sock"
            if args.sensors:
                broker = BrokerProcess(tmp / "broker", socket)
                broker.policy.write_text(POLICY)
                broker.start().wait_serving()
                try:
                    _run(tmp, broker, args)
                finally:
                    broker.stop()
            if args.reads:
                _upstream_reads(tmp, socket, registrar.ca.read_text(), args.reads)
            return 0


def _run(tmp: Path, broker: BrokerProcess, args: argparse.Namespace) -> None:
    assert broker.proc is not None
    pid = broker.proc.pid
    time.sleep(1.0)
    rss_idle = _rss_mib(pid)
    batch = tmp / "batch.json"
    code, added = broker.ctl_json("add", "--count", str(args.sensors), "--prefix", "m-",
                                  "--profile", "meter", "--out", str(batch))
    assert code == 0, added
    sensors = json.loads(batch.read_text())
    sensors = sensors["sensors"] if isinstance(sensors, dict) else sensors
    half = len(sensors) // 2
    time.sleep(1.0)
    rss_onboarded = _rss_mib(pid)

    async def drive() -> dict[str, Any]:
        client = await raw_client(broker.oscore_port)
        try:
            for sensor in sensors:
                sensor["_context"] = MemoryContext.of(sensor["credential"])
            figures: dict[str, Any] = {}
            # Baseline: half the sensors send one telemetry request each (their first
            # message: the broker opens their OSCORE context), refused 4.03 by the policy.
            cpu0 = cpu_seconds(pid)
            figures["base"] = await _load(client, sensors[:half], args.concurrency, _telemetry)
            figures["base_cpu"] = cpu_seconds(pid) - cpu0
            # Registrations: the other half, first message too, so the same context work.
            cpu0 = cpu_seconds(pid)
            figures["register"] = await _load(client, sensors[half:], args.concurrency,
                                              _register)
            figures["register_cpu"] = cpu_seconds(pid) - cpu0
            # Then the first half registers as well: all are registered.
            cpu0 = cpu_seconds(pid)
            figures["register_warm"] = await _load(client, sensors[:half], args.concurrency,
                                                   _register)
            figures["register_warm_cpu"] = cpu_seconds(pid) - cpu0
            return figures
        finally:
            client.close()

    figures = asyncio.run(drive())
    time.sleep(1.5)  # one flush of lwm2m.db
    rss_registered = _rss_mib(pid)
    from agent.control import client as control

    status = control.call(broker.socket, "status")
    remembered = status["oscore"].get("deduplication", {}).get("remembered", 0)
    settled = None
    if args.settle > 0:
        deadline = time.monotonic() + args.settle
        while time.monotonic() < deadline and remembered:
            time.sleep(5)
            remembered = control.call(broker.socket, "status")["oscore"][
                "deduplication"]["remembered"]
        settled = _rss_mib(pid)
    _report(args, figures, half, len(sensors) - half, rss_idle, rss_onboarded,
            rss_registered, settled, status)


def _line(name: str, n: int, result: tuple[float, list[float], dict[str, int]],
          cpu: float) -> str:
    seconds, latencies, codes = result
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    answered = ", ".join(f"{c} x{k}" for c, k in sorted(codes.items()))
    return (f"{name:44s} {n:6d} {seconds:7.2f} {n / seconds:8.0f} "
            f"{statistics.median(latencies):7.2f} {p99:7.2f} {cpu / n * 1e6:8.0f}  {answered}")


def _report(args: argparse.Namespace, f: dict[str, Any], half: int, rest: int,
            rss_idle: float, rss_onboarded: float, rss_registered: float,
            settled: float | None, status: dict[str, Any]) -> None:
    lwm2m = status["lwm2m"]
    remembered = status["oscore"].get("deduplication", {}).get("remembered", 0)
    print(f"{args.concurrency} in flight, each sensor once; same run, this machine "
          f"({os.cpu_count()} cores)")
    print(f"{'load':44s} {'n':>6s} {'s':>7s} {'per s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
          f"{'CPU us':>8s}  answers")
    print(_line("(base) first message, refused by the policy", half, f["base"],
                f["base_cpu"]))
    print(_line("Register, first message of the sensor", rest, f["register"],
                f["register_cpu"]))
    print(_line("Register, context already open", half, f["register_warm"],
                f["register_warm_cpu"]))
    total = f["register"][0] + f["register_warm"][0]
    base_us = f["base_cpu"] / half * 1e6
    reg_us = f["register_cpu"] / rest * 1e6
    print(f"ratio Register/base CPU per request: {reg_us / base_us:.2f}")
    print(f"{half + rest} sensors registered in {total:.1f} s of registering "
          f"(target: 10,000 in under 30 s); broker says {lwm2m['registered']} registered")
    print(f"broker RSS: {rss_idle:.1f} MiB idle, {rss_onboarded:.1f} MiB idle with "
          f"{half + rest} sensors onboarded, {rss_registered:.1f} MiB with all registered")
    print(f"  +{rss_registered - rss_onboarded:.1f} MiB over the idle broker with the sensors "
          f"onboarded, +{rss_registered - rss_idle:.1f} MiB over the empty one (target: under "
          f"40); included: each sensor's OSCORE context, opened by its first message, and "
          f"{remembered} answers kept for CoAP deduplication (247 s)")
    if settled is not None:
        print(f"broker RSS once deduplication expired: {settled:.1f} MiB: "
              f"+{settled - rss_idle:.1f} MiB over the idle broker for {half + rest} "
              "registered sensors (target: under 40)")


# --- an upstream Read through the gateway against a direct one ---------------------------


def _upstream_reads(tmp: Path, identity: Path, client_ca: str, reads: int) -> None:
    from lwm2m_peer import DtlsCertRelay
    from lwm2m_sensor import oscore_client
    from mtls import server_identity

    cert, key, ca_pem = server_identity(tmp / "lwm2m-tls")
    (tmp / "lwm2m-ca.pem").write_text(ca_pem)
    server_port = free_udp_port()
    relay = DtlsCertRelay(server_port, cert, key, client_ca)
    broker = BrokerProcess(tmp / "gateway", identity,
                           f'[lwm2m_upstream]\nurl = "coaps://127.0.0.1:{relay.port}"\n'
                           f'bundle = "{tmp / "lwm2m-ca.pem"}"\nendpoint = "gw"\n')
    broker.policy.write_text(POLICY + '[[profiles.meter.lwm2m.grants]]\nwho = ["upstream"]\n'
                             'operations = ["read"]\npaths = ["/3303/0/5700"]\n')
    broker.start().wait_serving()
    sensor = None
    try:
        code, added = broker.ctl_json("add", "s-1", "--profile", "meter")
        assert code == 0, added
        credential = added["sensors"][0]["credential"]
        sensor = oscore_client(tmp / "s-1", credential, broker.oscore_port)
        assert sensor.register("s-1") == "2.01 Created"
        instance = broker.ctl_json("show", "s-1")[1]["lwm2m"]["gateway"]["instance"]
        figures = asyncio.run(_read_three_ways(server_port, sensor.port, credential, instance,
                                               reads))
    finally:
        if sensor is not None:
            sensor.close()
        broker.stop()
        relay.close()
    print()
    print(f"upstream Reads of /3303/0/5700, {reads} of each, one after the other")
    print(f"{'read':58s} {'p50 ms':>7s} {'p99 ms':>7s}")
    for name, latencies in figures.items():
        ordered = sorted(latencies)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        print(f"{name:58s} {statistics.median(latencies):7.2f} {p99:7.2f}")
    direct, through = (statistics.median(figures[k]) for k in (_DIRECT, _THROUGH))
    own = statistics.median(figures[_OWN])
    print(f"added by the gateway over a direct Read: {through - direct:+.2f} ms (median; "
          f"ratio {through / direct:.2f}); of it the server-gateway leg (DTLS and the "
          f"tests' relay): {own:.2f} ms")


_DIRECT = "(direct) the server reads the sensor over OSCORE"
_OWN = "(gateway's own) the server reads /25/N/1 over DTLS"
_THROUGH = "(through) the server reads /s-1/3303/0/5700 via the gateway"


async def _read_three_ways(server_port: int, sensor_port: int, credential: dict[str, str],
                           instance: int, reads: int) -> dict[str, list[float]]:
    from lwm2m_peer import aiocoap_lwm2m_server

    server, rd = await aiocoap_lwm2m_server(server_port)
    try:
        await asyncio.wait_for(rd.registered.wait(), 30)
        figures: dict[str, list[float]] = {}
        for name, path in ((_OWN, f"25/{instance}/1"), (_THROUGH, "s-1/3303/0/5700")):
            figures[name] = []
            for _ in range(reads):
                request = Message(code=Code.GET, uri_path=tuple(path.split("/")))
                request.remote = rd.remote
                t0 = time.perf_counter()
                answer = await asyncio.wait_for(server.request(request).response, 10)
                figures[name].append((time.perf_counter() - t0) * 1000)
                assert answer.code == Code.CONTENT, (answer, answer.payload)
    finally:
        await server.shutdown()
    # Last: the server's own context with the sensor, its sequence numbers well above the
    # gateway's (the sensor's replay window then refuses the gateway's lower ones).
    security = MemoryContext(bytes.fromhex(credential["master_secret"]),
                             bytes.fromhex(credential["master_salt"]),
                             bytes.fromhex(credential["recipient_id"]),
                             bytes.fromhex(credential["sender_id"]))
    security.sender_sequence_number = 1 << 20
    client = await raw_client(sensor_port)
    try:
        figures[_DIRECT] = []
        for _ in range(reads):
            t0 = time.perf_counter()
            answer = await client.exchange(Message(code=Code.GET,
                                                   uri_path=("3303", "0", "5700")),
                                           security, timeout=10.0)
            figures[_DIRECT].append((time.perf_counter() - t0) * 1000)
            assert answer.code == Code.CONTENT, answer
    finally:
        client.close()
    return {k: figures[k] for k in (_DIRECT, _OWN, _THROUGH)}


if __name__ == "__main__":
    sys.exit(main())
