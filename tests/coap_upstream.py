"""A CoAP-over-TLS upstream for tests and the demo (RFC 8323, aiocoap's TLS server).

It requires a client certificate from the CA it is given (the registrar's),
answers every request, and records each as one JSON line: method, path,
payload (hex), Content-Format, the sensor ID the broker asserted (option 65000)
and the subject and serial of the client certificate that carried it.

    python tests/coap_upstream.py --port P --cert C --key K --client-ca CA --record FILE

Paths ending in /fail answer 5.00; the rest 2.04 (2.05 for GET) with "ok".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import Code, Message
from aiocoap import resource as coap_resource
from aiocoap.numbers.optionnumbers import OptionNumber
from processes import terminate

from agent.broker.collector import Collector
from agent.broker.upstream import SENSOR_OPTION

REPO = Path(__file__).resolve().parent.parent


def _client(remote: Any) -> dict[str, str] | None:
    """Subject and serial (lower-case hex) of the client certificate of the connection."""
    transport = getattr(remote, "_transport", None)
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    return {"subject": ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn),
            "serial": str(cert.get("serialNumber", "")).lower()}


class Recorder(coap_resource.Resource):
    def __init__(self, record: Path) -> None:
        super().__init__()
        self._record = record

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return True

    async def render(self, request: Message) -> Message:
        # An option number aiocoap does not know arrives as opaque bytes.
        asserted = [bytes(o.value).decode("utf-8", "replace")
                    for o in request.opt.get_option(OptionNumber(SENSOR_OPTION))]
        path = "/" + "/".join(request.opt.uri_path)
        entry = {"method": str(request.code), "path": path,
                 "payload": request.payload.hex(),
                 "content_format": None if request.opt.content_format is None
                 else int(request.opt.content_format),
                 "sensor": asserted, "client": _client(request.remote), "at": time.time()}
        with open(self._record, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if path.endswith("/fail"):
            return Message(code=Code.INTERNAL_SERVER_ERROR, payload=b"upstream failure")
        code = Code.CONTENT if request.code == Code.GET else Code.CHANGED
        return Message(code=code, payload=b"ok")


class _Root(coap_resource.Site):
    """Every path goes to the recorder."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self._recorder = recorder

    async def render_to_pipe(self, pipe: Any) -> None:
        await self._recorder.render_to_pipe(pipe)


async def serve(port: int, cert: Path, key: Path, client_ca: Path, record: Path,
                optional: bool = False) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
    # Optional only for the benchmark's baselines (a client straight to it, aiocoap's proxy).
    ctx.verify_mode = ssl.CERT_OPTIONAL if optional else ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["coap"])
    # aiocoap's TLS server binds the given port plus 1 (the coaps offset from coap).
    context = await aiocoap.Context.create_server_context(
        _Root(Recorder(record)), bind=("127.0.0.1", port - 1), transports=["tlsserver"],
        _ssl_context=ctx)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    # The broker's garbage-collector tuning (aiocoap's deduplication cache): without it this
    # recorder's collection pauses showed up in bench/broker.py as the broker's p99.
    collector = asyncio.create_task(Collector().run())
    print("serving", flush=True)
    await stop.wait()
    collector.cancel()
    await context.shutdown()


class CoapUpstreamProcess:
    """The upstream as a child process, for tests and the demo."""

    def __init__(self, directory: Path, port: int, cert: Path, key: Path,
                 client_ca: Path, optional_client_cert: bool = False) -> None:
        self.directory, self.port = directory, port
        self.record = directory / "received.jsonl"
        self.log = directory / "upstream.log"
        self._args = [sys.executable, str(Path(__file__)), "--port", str(port),
                      "--cert", str(cert), "--key", str(key), "--client-ca", str(client_ca),
                      "--record", str(self.record)] + \
            (["--optional-client-cert"] if optional_client_cert else [])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> CoapUpstreamProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.record.touch()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self._args, stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + timeout
        while b"serving" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the CoAP upstream did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        return self

    def received(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def stop(self) -> None:
        terminate(self.proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    for name in ("cert", "key", "client-ca", "record"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--optional-client-cert", action="store_true")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.cert, args.key, args.client_ca, args.record,
                      args.optional_client_cert))


if __name__ == "__main__":
    main()
