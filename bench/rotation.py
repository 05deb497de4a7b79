#!/usr/bin/env python3
"""Renewal time, and requests served while certificates rotate.

    .venv/bin/python bench/rotation.py [--rotations N] [--seconds S]

One swtpm, one devid-registrar (HTTPS on loopback) and the agent's own
AgentService in this process (its TLS key lives only in its memory), plus a
loopback relying party that requires client certificates from the registrar
CA (tests/mtls.py). Client threads hit it continuously with the agent's
current credentials, a few requests per connection.

1. baseline: S seconds of client load, no rotation;
2. rotations: N renewals back to back (`devidctl renew` path) under the
   same load; then the same N renewals without load.

Printed: median renewal time (each one re-attests: nonce, quote, identity-key
signature, sealing, registrar verification and issuing, atomic save), and
requests served per second during rotations against the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from inprocess import agent_in_process  # noqa: E402
from mtls import ClientLoad, MtlsServer  # noqa: E402
from stack import (  # noqa: E402
    RegistrarProcess,
    enrollment_toml,
    rotation_toml,
    start_tpm,
    write_agent_config,
)

from agent.config import AgentConfig, load_config  # noqa: E402


async def _measure(config: AgentConfig, server: MtlsServer, rotations: int,
                   seconds: float) -> dict[str, float]:
    async with agent_in_process(config) as service:
        with ClientLoad(service.holder, server) as load:
            t0 = time.perf_counter()
            await asyncio.sleep(seconds)
            base_ok, base_s = load.ok, time.perf_counter() - t0
            t1 = time.perf_counter()
            loaded = [(await service.rotation.kick()) for _ in range(rotations)]
            rot_ok, rot_s = load.ok - base_ok, time.perf_counter() - t1
        failures = len(load.failures)
        quiet = [(await service.rotation.kick()) for _ in range(rotations)]
    assert all(o.result == "renewed" for o in loaded + quiet)
    return {
        "renew_ms_quiet": statistics.median(o.duration_ms or 0 for o in quiet),
        "renew_ms_loaded": statistics.median(o.duration_ms or 0 for o in loaded),
        "base_rps": base_ok / base_s, "rot_rps": rot_ok / rot_s, "rot_requests": rot_ok,
        "rot_seconds": rot_s, "failures": failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rotations", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="devid-bench-") as tmp:
        root = Path(tmp)
        tpm = start_tpm(root / "tpm")
        registrar = RegistrarProcess(root / "registrar", [tpm.vendor_ca],
                                     settings={"cert_lifetime": '"1h"',
                                               "require_token": "false",
                                               # renewals back to back, on purpose
                                               "renewal_window": '"0s"'}).start()
        try:
            path = write_agent_config(root / "agent" / "agent.toml", tpm.tcti, [tpm.vendor_ca],
                                      enrollment_toml(registrar, None) + rotation_toml())
            with MtlsServer(root / "relying-party", registrar.ca) as server:
                r = asyncio.run(_measure(load_config(path), server, args.rotations,
                                         args.seconds))
        finally:
            registrar.stop()
            tpm.stop()
    print(f"devid-agent rotation benchmark: {args.rotations} renewals each, swtpm + loopback "
          "HTTPS registrar + mTLS relying party")
    print(f"  median renewal, no load           {r['renew_ms_quiet']:8.1f} ms")
    print(f"  median renewal, under client load {r['renew_ms_loaded']:8.1f} ms")
    print(f"  baseline (no rotation)            {r['base_rps']:8.1f} requests/s")
    print(f"  during {args.rotations} rotations ({r['rot_seconds']:.1f} s)  "
          f"{r['rot_rps']:8.1f} requests/s  ({r['rot_requests']} served, "
          f"{r['rot_rps'] / r['base_rps']:.2f}x baseline)")
    print(f"  failed requests                   {r['failures']:8d}")
    return 0 if r["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
