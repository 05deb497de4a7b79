"""DTLS-PSK servers for sensors, compared in one run: aiocoap's own tinydtls server
(experimental; needs `pip install DTLSSocket`) against devid-broker's listener
(Mbed TLS through python-mbedtls, agent/broker/dtls.py), both under aiocoap.

For each: which of the RFC 7925 / issue suites a client can get (CCM-8, AES-128-GCM),
the median time of a fresh session plus one request made by libcoap's
coap-client-openssl (a new process each time, as a sleeping sensor would), and the
median round trip of requests on one established session (python-mbedtls client).

    .venv/bin/python bench/dtls_stacks.py [--sessions 30] [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiocoap
from aiocoap import Code, Message
from aiocoap import resource as coap_resource

IDENTITY, KEY = "devid-s1", b"bench-psk-0123456"[:16]


class Ok(coap_resource.Resource):
    async def render_post(self, request: Message) -> Message:
        return Message(code=Code.CHANGED, payload=b"ok")


def _site() -> coap_resource.Site:
    site = coap_resource.Site()
    site.add_resource(["telemetry"], Ok())
    return site


async def _serve_tinydtls(port: int, ready: threading.Event, stop: asyncio.Event) -> None:
    from aiocoap.credentials import CredentialsMap

    credentials = CredentialsMap()
    credentials.load_from_dict({":client": {"dtls": {"psk": {"hex": KEY.hex()},
                                                     "client-identity": {"ascii": IDENTITY}}}})
    context = await aiocoap.Context.create_server_context(
        # aiocoap adds the coaps offset (+1) to the port it is given.
        _site(), bind=("127.0.0.1", port - 1), transports=["tinydtls_server"],
        server_credentials=credentials)
    ready.set()
    await stop.wait()
    await context.shutdown()


async def _serve_devid(port: int, ready: threading.Event, stop: asyncio.Event) -> None:
    from agent.audit import AuditLog
    from agent.broker.dtls import DtlsListener
    from agent.broker.traffic import Traffic
    from agent.secret import SecretBytes
    from agent.sensors.atrest import RecordCipher
    from agent.sensors.credentials import PskCredential
    from agent.sensors.importing import ImportedSensor
    from agent.sensors.store import SensorStore

    scratch = Path(tempfile.mkdtemp())
    store = SensorStore(scratch / "sensors.db", RecordCipher(SecretBytes(bytes(32))))
    store.import_sensors([ImportedSensor("bench", "bench", "temperature", {},
                                         PskCredential(IDENTITY.encode(), SecretBytes(KEY)))],
                         "2026-01-01T00:00:00+00:00")
    listener = DtlsListener(f"127.0.0.1:{port}", store,
                            Traffic(store, AuditLog(scratch / "audit.log")), _site(), 1000, 600)
    await listener.start()
    ready.set()
    await stop.wait()
    await listener.close()


def _run_server(kind: str, port: int) -> tuple[threading.Thread, asyncio.AbstractEventLoop,
                                                asyncio.Event]:
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    serve = _serve_tinydtls if kind == "tinydtls" else _serve_devid
    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve(port, ready, stop))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(20):
        raise RuntimeError(f"{kind} server did not start")
    return thread, loop, stop


def _fresh_sessions(port: int, count: int) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        proc = subprocess.run(["coap-client-openssl", "-B", "5", "-m", "post", "-u", IDENTITY,
                               "-k", KEY, "-e", "1", f"coaps://127.0.0.1:{port}/telemetry"],
                              capture_output=True, timeout=20)
        if proc.stdout.strip() != b"ok":
            raise RuntimeError(f"coap-client-openssl: {proc.stdout!r} {proc.stderr!r}")
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _session(port: int, suite: str, requests: int) -> float | None:
    """Median round trip (ms) on one session with `suite` only; None if refused."""
    from mbedtls import tls

    conf = tls.DTLSConfiguration(pre_shared_key=(IDENTITY, KEY), ciphers=[suite],
                                 lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
                                 validate_certificates=False)
    sock = tls.ClientContext(conf).wrap_socket(
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM), server_hostname=None)
    sock.settimeout(5)
    try:
        sock.connect(("127.0.0.1", port))
        sock.do_handshake()
    except Exception:
        sock.close()
        return None
    times = []
    for mid in range(requests):
        request = Message(code=Code.POST, payload=b"1", uri_path=("telemetry",))
        request.mtype, request.mid, request.token = aiocoap.CON, mid, mid.to_bytes(2, "big")
        start = time.perf_counter()
        sock.send(request.encode())
        answer = Message.decode(sock.recv(2048))
        times.append(time.perf_counter() - start)
        if answer.code != Code.CHANGED:
            raise RuntimeError(f"unexpected answer {answer}")
    sock.close()
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    kinds = ["devid"]
    try:
        import DTLSSocket  # noqa: F401
        kinds.insert(0, "tinydtls")
    except ImportError:
        print("aiocoap's tinydtls server: not measured (pip install DTLSSocket)")
    results = {}
    for kind in kinds:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        thread, loop, stop = _run_server(kind, port)
        try:
            fresh = _fresh_sessions(port, args.sessions)
            suites = {suite: _session(port, suite, args.requests) for suite in
                      ("TLS-PSK-WITH-AES-128-CCM-8", "TLS-PSK-WITH-AES-128-GCM-SHA256")}
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
        results[kind] = (fresh, suites)
    for kind, (fresh, suites) in results.items():
        print(f"{kind:9s} fresh session + 1 request (coap-client-openssl, median of "
              f"{args.sessions}): {fresh:.1f} ms")
        for suite, rtt in suites.items():
            shown = "refused" if rtt is None else f"{rtt:.3f} ms per request (median of " \
                                                  f"{args.requests} on one session)"
            print(f"{'':9s} {suite}: {shown}")
    if len(results) == 2:
        base = results["tinydtls"][1]["TLS-PSK-WITH-AES-128-CCM-8"]
        ours = results["devid"][1]["TLS-PSK-WITH-AES-128-CCM-8"]
        if base and ours:
            print(f"ratio devid/tinydtls, CCM-8 request round trip: {ours / base:.2f}; "
                  f"fresh session: {results['devid'][0] / results['tinydtls'][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
