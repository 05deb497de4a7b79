#!/usr/bin/env python3
"""What devid-broker costs a sensor's request, against baselines measured in the same run.

    .venv/bin/python bench/broker.py [--seconds 5] [--concurrency 16] [--rate 500]

One swtpm, a registrar and an enrolled agent give the gateway its identity; the
upstream is the tests' CoAP-over-TLS recorder (tests/coap_upstream.py), mosquitto the
MQTT broker. Each path is driven by this process:

  (a) an aiocoap client straight to the upstream (coaps+tcp)          baseline
  (b) plain CoAP through aiocoap's own proxy to the upstream          baseline
  (c) OSCORE (aiocoap's client) through devid-broker to the upstream
  (d) DTLS-PSK (Mbed TLS client, one session per worker) through devid-broker
  (e) OSCORE through devid-broker to mosquitto (MQTT 5, QoS 1)

For each: requests/s with `--concurrency` requests in flight for `--seconds`, and at a
fixed `--rate` the p50/p99 latency and what it adds to (a)'s at the same rate, and the
CPU the broker (or the proxy) spent per request. Then the broker's RSS with 0 and with
10,000 sensors registered.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import aiocoap  # noqa: E402
import cbor2  # noqa: E402
from aiocoap import Code, Message  # noqa: E402
from coap_loadgen import RawCoap, raw_client  # noqa: E402
from coap_upstream import CoapUpstreamProcess  # noqa: E402
from mqtt_peer import Mosquitto  # noqa: E402
from mtls import server_identity  # noqa: E402
from oscore_sensor import MemoryContext  # noqa: E402
from processes import cpu_seconds, rss_kib  # noqa: E402
from stack import (  # noqa: E402
    AgentProcess,
    BrokerProcess,
    RegistrarProcess,
    enrolled_gateway,
    free_port,
)

POLICY = """
[profiles.bench]
[[profiles.bench.rules]]
name = "coap"
methods = ["POST"]
path = "/telemetry"
upstream = "sensors/{sensor}/telemetry"
to = "cloud"
rate = 600000
burst = 100000
[[profiles.bench.rules]]
name = "mqtt"
methods = ["POST"]
path = "/mqtt"
upstream = "sensors/{sensor}/telemetry"
to = "fleet"
rate = 600000
burst = 100000
"""
PAYLOAD = cbor2.dumps({"t": 21.5, "h": 40})
Send = Callable[[], Awaitable[bool]]


# --- load -----------------------------------------------------------------------------


async def closed_loop(send: Send, seconds: float, concurrency: int) -> tuple[float, int]:
    """(requests/s, failures) with `concurrency` requests always in flight."""
    done = failed = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, failed
        while time.perf_counter() < end:
            ok = await send()
            done += 1
            failed += 0 if ok else 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start), failed


async def open_loop(send: Send, seconds: float, rate: int) -> tuple[list[float], int]:
    """Latencies (ms) of requests started at `rate` per second whatever the answers."""
    latencies: list[float] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        t0 = time.perf_counter()
        ok = await send()
        latencies.append((time.perf_counter() - t0) * 1000)
        failed += 0 if ok else 1

    tasks = []
    start = time.perf_counter()
    for i in range(int(seconds * rate)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return latencies, failed


FIRST_FAILURE: dict[str, str] = {}


def raw_sender(client: RawCoap, path: str, uri: str, secure: Any = None) -> Send:
    """POSTs of PAYLOAD to `path` by the lean client (tests/coap_loadgen.py), protected
    with `secure` (the sensor's OSCORE context, as a sensor does) when given."""
    async def send() -> bool:
        request = Message(code=Code.POST, payload=PAYLOAD, uri_path=(path,))
        request.opt.content_format = 60
        try:
            answer = await client.exchange(request, secure)
        except TimeoutError:
            FIRST_FAILURE.setdefault(uri, "no answer within 5 s")
            return False
        except Exception as e:
            FIRST_FAILURE.setdefault(uri, f"{e!r}")
            return False
        if not answer.code.is_successful():
            FIRST_FAILURE.setdefault(uri, f"{answer.code} {answer.payload[:80]!r}")
        return bool(answer.code.is_successful())
    return send


def _coap_sender(context: aiocoap.Context, uri: str) -> Send:
    async def send() -> bool:
        message = Message(code=Code.POST, payload=PAYLOAD, uri=uri)
        message.opt.content_format = 60
        try:
            response = await context.request(message).response
        except Exception as e:
            FIRST_FAILURE.setdefault(uri, repr(e))
            return False
        if not response.code.is_successful():
            FIRST_FAILURE.setdefault(uri, f"{response.code} {response.payload[:80]!r}")
        return bool(response.code.is_successful())
    return send


class _DtlsWorkers:
    """DTLS-PSK requests from threads, one Mbed TLS session each (python-mbedtls's client
    is blocking); `send` hands a request to a free session."""

    def __init__(self, port: int, identity: str, key: bytes, sessions: int) -> None:
        from mbedtls import tls

        conf = tls.DTLSConfiguration(pre_shared_key=(identity, key),
                                     ciphers=["TLS-PSK-WITH-AES-128-CCM-8"],
                                     lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
                                     validate_certificates=False)
        self._free: asyncio.Queue[tuple[object, int]] = asyncio.Queue()
        for n in range(sessions):
            sock = tls.ClientContext(conf).wrap_socket(
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM), server_hostname=None)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            sock.do_handshake()
            self._free.put_nowait((sock, n * 10000))

    @staticmethod
    def _exchange(sock: object, mid: int) -> bool:
        request = Message(code=Code.POST, payload=PAYLOAD, uri_path=("telemetry",))
        request.mtype, request.mid = aiocoap.CON, mid & 0xFFFF
        request.token = (mid & 0xFFFFFFFF).to_bytes(4, "big")
        request.opt.content_format = 60
        sock.send(request.encode())  # type: ignore[attr-defined]
        return Message.decode(sock.recv(2048)).code.is_successful()  # type: ignore[attr-defined]

    async def send(self) -> bool:
        sock, mid = await self._free.get()
        try:
            return await asyncio.to_thread(self._exchange, sock, mid)
        except Exception:
            return False
        finally:
            self._free.put_nowait((sock, mid + 1))


# --- aiocoap's own proxy, in a process of its own (as the broker is) ------------------


def _run_proxy(port: int, target: str, ca_pem: str, ready: Any) -> None:
    from aiocoap.message import UndecidedRemote
    from aiocoap.proxy.server import Proxy, Redirector

    class ToUpstream(Redirector):
        """Everything to the coaps+tcp upstream (aiocoap's UnconditionalRedirector keeps
        the incoming scheme, coap, which cannot reach it)."""

        def apply_redirection(self, request: Message) -> Message:
            request.remote = UndecidedRemote("coaps+tcp", target)
            return request

    async def serve() -> None:
        outgoing = await aiocoap.Context.create_client_context(transports=["tlsclient"])
        tls = ssl.create_default_context(cadata=ca_pem)
        outgoing.client_credentials.ssl_client_context = lambda _scheme, _host: tls
        proxy = Proxy(outgoing)
        proxy.add_redirector(ToUpstream())
        await aiocoap.Context.create_server_context(proxy, bind=("127.0.0.1", port),
                                                    transports=["udp6"])
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(serve())


# --- the run ----------------------------------------------------------------------------


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(paths: dict[str, Send], seconds: float, concurrency: int, rate: int,
                  server_pids: dict[str, int], upstream_pids: dict[str, int]
                  ) -> dict[str, dict[str, float]]:
    """Each path's figures, with the CPU its server process (the broker, aiocoap's proxy)
    spent per request in the closed loop: near 100 % there, the server is the limit;
    well below, the load generator is. The upstream's and the load generator's CPU in
    the same interval show what was left of the machine's cores."""
    results: dict[str, dict[str, float]] = {}
    for name, send in paths.items():
        for _ in range(20):  # warm up: connections, contexts, handshakes
            await send()
        pid = server_pids.get(name)
        watched = {"server": pid, "upstream": upstream_pids[name], "loadgen": os.getpid()}
        cpu0 = {k: cpu_seconds(p) if p else 0.0 for k, p in watched.items()}
        wall0 = time.perf_counter()
        throughput, failed = await closed_loop(send, seconds, concurrency)
        wall = time.perf_counter() - wall0
        busy = {k: ((cpu_seconds(p) - cpu0[k]) / wall if p else 0.0)
                for k, p in watched.items()}
        latencies, late_failed = await open_loop(send, min(seconds, 4.0), rate)
        results[name] = {"rps": throughput, "failed": failed + late_failed,
                         "p50": statistics.median(latencies),
                         "p99": _percentile(latencies, 0.99), "busy": busy["server"],
                         "cpu_us": busy["server"] * wall / max(1, throughput * seconds) * 1e6,
                         "upstream_busy": busy["upstream"], "loadgen_busy": busy["loadgen"]}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--only", metavar="LETTERS", default="abcde",
                        help="the paths to run besides (a), e.g. --only bc (for profiling)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="devid-bench-") as tmp_name:
        return run(Path(tmp_name), args)


def run(tmp: Path, args: argparse.Namespace) -> int:
    with enrolled_gateway(tmp) as (agent, registrar):
        return _run(tmp, args, agent, registrar)


def _run(tmp: Path, args: argparse.Namespace, agent: AgentProcess,
         registrar: RegistrarProcess) -> int:
    cert, key, ca_pem = server_identity(tmp / "tls")
    (tmp / "upstream-ca.pem").write_text(ca_pem)
    upstream = CoapUpstreamProcess(tmp / "upstream", free_port(), cert, key, registrar.ca,
                                   optional_client_cert=True)
    mosquitto = Mosquitto(tmp / "mosquitto", cert, key, registrar.ca)
    broker: BrokerProcess | None = None
    proxy: multiprocessing.Process | None = None
    try:
        upstream.start()
        mosquitto.start("nothing/#")
        broker = BrokerProcess(
            tmp / "broker", agent.config.parent / "run" / "identity.sock",
            f'[upstreams.cloud]\nurl = "coaps+tcp://127.0.0.1:{upstream.port}"\n'
            f'bundle = "{tmp / "upstream-ca.pem"}"\n'
            f'[upstreams.fleet]\nurl = "mqtts://127.0.0.1:{mosquitto.tls_port}"\n'
            f'bundle = "{tmp / "upstream-ca.pem"}"\n')
        broker.policy.write_text(POLICY)
        broker.start().wait_serving()
        assert broker.proc is not None
        time.sleep(1.0)
        rss_empty = rss_kib(broker.proc.pid)
        _, added = broker.ctl_json("add", "t-1", "--profile", "bench")
        oscore = added["sensors"][0]["credential"]
        _, added = broker.ctl_json("add", "d-1", "--profile", "bench", "--transport",
                                   "dtls-psk")
        psk = added["sensors"][0]["credential"]

        proxy_port = free_port()
        spawn = multiprocessing.get_context("spawn")
        ready = spawn.Event()
        proxy = spawn.Process(
            target=_run_proxy, args=(proxy_port, f"127.0.0.1:{upstream.port}",
                                     ca_pem, ready), daemon=True)
        proxy.start()
        ready.wait(30)
        assert upstream.proc is not None and mosquitto.proc is not None
        results = asyncio.run(_drive(args, upstream.port, ca_pem, proxy_port, broker,
                                     oscore, psk, proxy.pid or 0,
                                     (upstream.proc.pid, mosquitto.proc.pid)))

        rss_used = rss_kib(broker.proc.pid)
        from agent.control import client
        totals = client.call(broker.socket, "status")["traffic"]["totals"]
        code, batch = broker.ctl_json("add", "--count", "10000", "--prefix", "b-",
                                      "--profile", "bench", "--out", str(tmp / "batch.json"))
        assert code == 0, batch
        time.sleep(1.0)
        rss_10k = rss_kib(broker.proc.pid)
    finally:
        if proxy is not None:
            proxy.kill()
        if broker is not None:
            broker.stop()
        mosquitto.stop()
        upstream.stop()
    _report(results, args, rss_empty, rss_used, rss_10k)
    print("broker totals:", ", ".join(f"{k} {v}" for k, v in sorted(totals.items()) if v))
    return 0


async def _drive(args: argparse.Namespace, upstream_port: int, ca_pem: str, proxy_port: int,
                 broker: BrokerProcess, oscore: dict[str, str],
                 psk: dict[str, str], proxy_pid: int, upstream_pids: tuple[int, int]
                 ) -> dict[str, dict[str, float]]:
    direct = await aiocoap.Context.create_client_context(transports=["tlsclient"])
    tls = ssl.create_default_context(cadata=ca_pem)
    direct.client_credentials.ssl_client_context = lambda _scheme, _host: tls
    security = MemoryContext.of(oscore)
    plain = await raw_client(proxy_port)
    protected = await raw_client(broker.oscore_port)
    dtls = await asyncio.to_thread(_DtlsWorkers, broker.dtls_port, psk["psk_identity"],
                                   bytes.fromhex(psk["psk"]), args.concurrency)
    paths = {
        "(a) direct to upstream": _coap_sender(
            direct, f"coaps+tcp://127.0.0.1:{upstream_port}/sensors/x/telemetry"),
        "(b) aiocoap proxy": raw_sender(plain, "telemetry", "coap://proxy/telemetry"),
        "(c) broker, OSCORE": raw_sender(protected, "telemetry", "coap://broker/telemetry",
                                         security),
        "(d) broker, DTLS-PSK": dtls.send,
        "(e) broker, OSCORE to MQTT": raw_sender(protected, "mqtt", "coap://broker/mqtt",
                                                 security),
    }
    paths = {name: send for name, send in paths.items()
             if name[1] == "a" or name[1] in args.only}
    try:
        assert broker.proc is not None
        servers = {name: broker.proc.pid for name in paths if "broker" in name}
        servers["(b) aiocoap proxy"] = proxy_pid
        coap, mqtt = upstream_pids
        upstreams = {name: mqtt if "MQTT" in name else coap for name in paths}
        return await measure(paths, args.seconds, args.concurrency, args.rate, servers,
                             upstreams)
    finally:
        await direct.shutdown()
        for client in (plain, protected):
            client.close()


def _report(results: dict[str, dict[str, float]], args: argparse.Namespace, rss_empty: int,
            rss_used: int, rss_10k: int) -> None:
    base = results["(a) direct to upstream"]
    print(f"{args.concurrency} in flight for {args.seconds:g}s (requests/s), then "
          f"{args.rate}/s for {min(args.seconds, 4.0):g}s (latency); same run, this machine")
    print(f"{'path':30s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'+p50':>7s} "
          f"{'+p99':>7s} {'failed':>6s} {'server':>7s} {'us/req':>7s} {'upstr.':>7s} "
          f"{'loadgen':>7s}")
    for name, r in results.items():
        server = f"{r['busy'] * 100:6.0f}% {r['cpu_us']:7.0f}" if r["busy"] else \
            f"{'-':>7s} {'-':>7s}"
        print(f"{name:30s} {r['rps']:8.0f} {r['p50']:8.2f} {r['p99']:8.2f} "
              f"{r['p50'] - base['p50']:7.2f} {r['p99'] - base['p99']:7.2f} "
              f"{int(r['failed']):6d} {server} {r['upstream_busy'] * 100:6.0f}% "
              f"{r['loadgen_busy'] * 100:6.0f}%")
    print(f"server: the CPU of the broker (or aiocoap's proxy) while {args.concurrency} were "
          "in flight, and its CPU time per request; upstr., loadgen: the CPU of the upstream "
          f"and of this load generator meanwhile ({os.cpu_count()} cores in all)")
    for uri, first in FIRST_FAILURE.items():
        print(f"first failure at {uri}: {first}")
    proxy, oscore = results.get("(b) aiocoap proxy"), results.get("(c) broker, OSCORE")
    if proxy and oscore:
        print(f"ratio (c)/(b) requests/s: {oscore['rps'] / proxy['rps']:.2f} "
              "(target >= 1.5)")
    print(f"broker RSS: {rss_empty / 1024:.1f} MiB with 0 sensors, {rss_used / 1024:.1f} MiB "
          f"after the runs, {rss_10k / 1024:.1f} MiB with 10,000 more registered "
          f"(+{(rss_10k - rss_used) / 1024:.1f} MiB; target <= 10)")


if __name__ == "__main__":
    sys.exit(main())
