#!/usr/bin/env python3
"""What a consumer's request to the identity API costs, and what touches the TPM.

    .venv/bin/python bench/identity_api.py [--requests N]

One swtpm, one devid-registrar (HTTPS on loopback), a devid-agent process
enrolled there, and this process as a declared consumer. Each request is a
new connection, as `IdentityClient` makes them:

- hello (baseline: peer credentials, matching, one JSON line each way);
- credentials (the full set, PEM; no TPM);
- sign (the identity key in the TPM; the per-consumer limit set high here);
- secret (unsealing a 32-byte secret in the TPM).

Printed: the median and 90th percentile of each, and each median against
hello's. swtpm answers in about a millisecond; a real TPM takes 25-190 ms per
signature, which is why sign is rate limited and credentials never touch it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from stack import (  # noqa: E402
    AgentProcess,
    RegistrarProcess,
    enrollment_toml,
    rotation_toml,
    start_tpm,
    write_agent_config,
)

from agent.consumer import IdentityClient  # noqa: E402


def _timed(call: Callable[[], object], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="devid-bench-") as tmp:
        work = Path(tmp)
        tpm = start_tpm(work / "tpm")
        registrar = RegistrarProcess(work / "registrar", [tpm.vendor_ca]).start()
        consumer = (f'\n[[consumers]]\nname = "bench"\nuser = {os.getuid()}\n'
                    'grants = ["credentials", "sign", "secrets"]\n'
                    'sign_burst = 100\nsign_interval = 0.001\n')
        config = write_agent_config(work / "agent" / "agent.toml", tpm.tcti, [tpm.vendor_ca],
                                    enrollment_toml(registrar, registrar.token())
                                    + rotation_toml() + consumer)
        agent = AgentProcess(config)
        try:
            agent.start()
            agent.wait_enrollment("enrolled", timeout=60)
            client = IdentityClient(config.parent / "run" / "identity.sock")
            client.secret("bench")  # created once; the runs below unseal it
            runs = {"hello": _timed(client.hello, args.requests),
                    "credentials": _timed(client.credentials, args.requests),
                    "sign": _timed(lambda: client.sign(b"a JWS signing input"),
                                   args.requests),
                    "secret": _timed(lambda: client.secret("bench"), args.requests)}
        finally:
            agent.stop()
            registrar.stop()
            tpm.stop()
    base = statistics.median(runs["hello"])
    print(f"identity API, {args.requests} requests each, one connection per request "
          "(swtpm; medians in ms)")
    result = {}
    for name, samples in runs.items():
        median = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1]
        touches = "TPM" if name in ("sign", "secret") else "no TPM"
        print(f"  {name:<12} median {median:7.2f}  p90 {p90:7.2f}  x{median / base:5.1f} "
              f"hello  ({touches})")
        result[name] = {"median_ms": round(median, 3), "p90_ms": round(p90, 3),
                        "ratio_to_hello": round(median / base, 2)}
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
