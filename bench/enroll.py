#!/usr/bin/env python3
"""End-to-end enrollment time against a local registrar, and where it goes.

    .venv/bin/python bench/enroll.py [--rounds N]

One swtpm and one devid-registrar (HTTPS on loopback, no token) are started;
the same gateway then enrolls N times (the registrar re-enrolls a known EK).
Each round runs the agent's own `enroll()` with its TPM and registrar ports
wrapped in timers:

- TPM: time inside TPM port calls (EK recreation, activation, quote, certify, CSR);
- registrar: the registrar's own processing (its Server-Timing header:
  parsing, chain and evidence verification, MakeCredential, signing, SQLite,
  audit fsync);
- network: registrar port time minus registrar processing (TLS, HTTP, JSON);
- agent crypto: the rest (proof HMAC, checking the issued chain).

Baseline, measured in the same run: one HTTPS GET /v1/health round trip on
a kept-alive connection.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from cryptography import x509  # noqa: E402
from stack import RegistrarProcess, start_tpm  # noqa: E402

from agent.enroll.client import enroll  # noqa: E402
from agent.enroll.http import RegistrarClient  # noqa: E402
from agent.enroll.tpmport import CustodyTpm  # noqa: E402
from agent.tpm.custody import TpmCustody  # noqa: E402


class Timed:
    """Wraps a port; every awaited method call adds its duration to `spent`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.spent = 0.0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        async def timed(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await method(*args)
            finally:
                self.spent += time.perf_counter() - t0
        return timed


class SyncRegistrar:
    """Registrar port calling the blocking client inline, summing Server-Timing."""

    def __init__(self, client: RegistrarClient) -> None:
        self.client = client
        self.server_ms = 0.0

    async def start(self, request: Any) -> Any:
        result = self.client.start(request)
        self.server_ms += self.client.last_server_ms or 0.0
        return result

    async def complete(self, challenge_id: str, request: Any) -> Any:
        result = self.client.complete(challenge_id, request)
        self.server_ms += self.client.last_server_ms or 0.0
        return result


async def _direct(fn: Any, *args: Any) -> Any:
    return fn(*args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="devid-bench-"))
    tpm = start_tpm(work / "tpm")
    registrar = RegistrarProcess(work / "registrar", [tpm.vendor_ca],
                                 settings={"require_token": "false"}).start()
    rows: dict[str, list[float]] = {k: [] for k in
                                     ("total", "tpm", "registrar", "network", "agent")}
    health: list[float] = []
    try:
        anchors = x509.load_pem_x509_certificates(
            registrar.ca.read_bytes())
        with TpmCustody.open(tpm.tcti, work / "state") as custody:
            client = RegistrarClient(registrar.url, registrar.ca)
            client.health()  # warm the TLS connection
            for _ in range(args.rounds + 1):
                t0 = time.perf_counter()
                client.health()
                health.append((time.perf_counter() - t0) * 1000)
                port_tpm = Timed(CustodyTpm(custody, _direct))
                sync = SyncRegistrar(client)
                port_reg = Timed(sync)
                t0 = time.perf_counter()
                asyncio.run(enroll(port_tpm, port_reg, None, anchors))
                total = (time.perf_counter() - t0) * 1000
                rows["total"].append(total)
                rows["tpm"].append(port_tpm.spent * 1000)
                rows["registrar"].append(sync.server_ms)
                rows["network"].append(port_reg.spent * 1000 - sync.server_ms)
                rows["agent"].append(total - (port_tpm.spent + port_reg.spent) * 1000)
            client.close()
    finally:
        registrar.stop()
        tpm.stop()
    for series in (*rows.values(), health):
        del series[0]  # the first round warms caches and connections
    baseline = statistics.median(health)
    total = statistics.median(rows["total"])
    print(f"enrollment on swtpm + loopback HTTPS registrar, median of {args.rounds} rounds")
    print(f"{'part':<34}{'median ms':>10}{'share':>8}{'x baseline':>12}")
    labels = {"total": "end to end", "tpm": "  TPM (ESAPI over swtpm socket)",
              "registrar": "  registrar processing", "network": "  network + HTTP + JSON",
              "agent": "  agent crypto and glue"}
    for key, label in labels.items():
        ms = statistics.median(rows[key])
        print(f"{label:<34}{ms:>10.2f}{ms / total:>8.0%}{ms / baseline:>12.1f}")
    print(f"{'HTTPS GET /v1/health (baseline)':<34}{baseline:>10.2f}{'':>8}{1.0:>12.1f}")
    print("(parts are medians of their own series, so they need not add up exactly)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
