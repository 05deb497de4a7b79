#!/usr/bin/env python3
"""Median latency of the custody layer's TPM operations on a fresh swtpm.

    .venv/bin/python bench/tpm_ops.py [--rounds N]

Each figure is the median over N rounds of the whole custody call (load key,
command, flush), the way the agent pays for it. `raw sign` is TPM2_Sign on an
already-loaded key, the baseline measured in the same run, to show what key
loading and session setup add.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from stack import start_tpm  # noqa: E402

from agent.secret import SecretBytes  # noqa: E402
from agent.tpm import templates  # noqa: E402
from agent.tpm.custody import IDENTITY_BLOB, TpmCustody  # noqa: E402


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="devid-bench-"))
    tpm = start_tpm(work / "tpm")
    try:
        with TpmCustody.open(tpm.tcti, work / "state") as c:
            blob = c.seal(SecretBytes(b"k" * 32), [16])
            digest = b"\x01" * 32
            from tpm2_pytss.constants import TPM2_RH, TPM2_ST
            from tpm2_pytss.types import TPMT_TK_HASHCHECK
            ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
            with c._loaded(c._blob(IDENTITY_BLOB), "identity key") as key:
                raw = median_ms(lambda: c._esapi.sign(key, digest, templates.ECDSA_SHA256,
                                                      ticket), args.rounds)
            rows = [
                ("raw sign (baseline)", raw),
                ("sign", median_ms(lambda: c.sign(b"payload"), args.rounds)),
                ("quote (PCR 0,16)", median_ms(lambda: c.quote(b"n" * 32, [0, 16]), args.rounds)),
                ("certify", median_ms(lambda: c.certify_identity(b"n" * 32), args.rounds)),
                ("seal (32 B)", median_ms(lambda: c.seal(SecretBytes(b"k" * 32), [16]),
                                          args.rounds)),
                ("unseal (32 B)", median_ms(lambda: c.unseal(blob), args.rounds)),
            ]
    finally:
        tpm.stop()
    print(f"TPM operation latency on swtpm, median of {args.rounds} rounds")
    print(f"{'operation':<22}{'median ms':>10}{'x baseline':>12}")
    for name, ms in rows:
        print(f"{name:<22}{ms:>10.2f}{ms / raw:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
