#!/usr/bin/env python3
"""The agent's TPM budget: commands counted by command code, and custody latency.

    .venv/bin/python bench/tpm_ops.py [--rounds N] [--counts-only]

1. Commands per phase of a real devid-agent's life (first start, enrollment,
   first TLS certificate, renewal, status, stop, start when enrolled), counted
   by a proxy in front of swtpm (tests/tpmcount.py), without and with a
   persistent SRK (`[tpm] srk_handle`). Targets: at most 30 per enrollment and
   12 per renewal. From the counts, an estimate of the time on a real TPM:
   "heavy" commands (key generation, signing, decryption) at 25-190 ms each,
   the range published for P-256 signing on discrete TPMs, the rest at 1-20 ms
   (reads, loads, flushes, policy steps); an estimate, not a measurement.
2. Median latency over N rounds of each custody call (load key, command,
   flush) on swtpm; `raw sign` (TPM2_Sign on a loaded key) is the baseline
   measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from stack import start_tpm  # noqa: E402
from tpmcount import measure_phases  # noqa: E402

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


HEAVY = frozenset({"CreatePrimary", "Create", "Sign", "Quote", "Certify", "ActivateCredential",
                   "Unseal", "StartAuthSession", "EvictControl"})
HEAVY_MS, LIGHT_MS = (25, 190), (1, 20)


def estimate_ms(counts: collections.Counter[str]) -> tuple[int, int]:
    heavy = sum(n for name, n in counts.items() if name in HEAVY)
    light = sum(counts.values()) - heavy
    return (heavy * HEAVY_MS[0] + light * LIGHT_MS[0], heavy * HEAVY_MS[1] + light * LIGHT_MS[1])


def print_counts() -> None:
    for label, section in (("transient SRK (default)", ""),
                           ("[tpm] srk_handle = 0x81000002", "srk_handle = 0x81000002")):
        counts = measure_phases(Path(tempfile.mkdtemp(prefix="devid-bench-")), section)
        print(f"TPM commands per phase, {label}")
        print(f"{'phase':<26}{'commands':>9}{'heavy':>7}{'est. ms on hardware':>21}  by code")
        for phase, c in counts.items():
            low, high = estimate_ms(c)
            heavy = sum(n for name, n in c.items() if name in HEAVY)
            codes = ", ".join(f"{name} {n}" for name, n in sorted(c.items(),
                                                                  key=lambda x: (-x[1], x[0])))
            print(f"{phase:<26}{sum(c.values()):>9}{heavy:>7}{f'{low}-{high}':>21}  {codes}")
        print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--counts-only", action="store_true")
    args = parser.parse_args()
    print_counts()
    if args.counts_only:
        return 0
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
