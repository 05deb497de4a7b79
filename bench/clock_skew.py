#!/usr/bin/env python3
"""A gateway whose clock is wrong: how often it renews, and what refusing costs.

    .venv/bin/python bench/clock_skew.py [--requests N]

1. Planning, simulated (pure, no TPM): 24 hours of registrar time with 30-minute
   certificates and the gateway's clock 25 minutes ahead, stepping 5 s. Baseline:
   the previous rule, the renewal point read against the local clock with no floor
   (what issue 16 reported). Now: the daemon's RotationManager planning in the
   registrar's time (offset from the Date header), with the renewal floor, and the
   floor alone when no offset was ever measured.
2. The registrar's cost (swtpm + devid-registrar on loopback, real renewals made with
   the agent's own code): median server time (Server-Timing) of a full renewal
   (baseline) against a renewal refused as renewal-too-early, which is answered after
   the signature check and before the quote check and the two certificate signatures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from gateway import Gateway  # noqa: E402
from stack import RegistrarProcess, start_tpm  # noqa: E402

from agent.enroll.http import RegistrarClient, ThreadedRegistrar  # noqa: E402
from agent.errors import Problem  # noqa: E402
from agent.pki.devicecert import parse_chain, validity_of  # noqa: E402
from agent.rotation import schedule  # noqa: E402
from agent.rotation.client import renew  # noqa: E402

LIFETIME = datetime.timedelta(minutes=30)
AHEAD = datetime.timedelta(minutes=25)
SPAN = datetime.timedelta(hours=24)


# --- 1. planning -------------------------------------------------------------------------------

def _previous_rule(ca: Any) -> int:
    """Renewals when the renewal point is compared with the local clock (no floor)."""
    from tests.unit.test_rotation_pure import NOW, _stored  # the unit tests' factory

    t, renewals = NOW, 0
    stored, _ = _stored(ca, LIFETIME, t)
    while t < NOW + SPAN:
        cert = stored.tls.certificate
        if t + AHEAD >= schedule.renew_at(validity_of(cert), format(cert.serial_number, "x")):
            renewals += 1
            stored, _ = _stored(ca, LIFETIME, t)
        t += datetime.timedelta(seconds=5)
    return renewals


def planning(tmp: Path) -> dict[str, float]:
    from agent.registrar.ca import CertificateAuthority
    from tests.unit.test_clock_skew_pure import _simulate
    from tests.unit.test_rotation_pure import NOW

    ca = CertificateAuthority.create(tmp / "ca", NOW - datetime.timedelta(hours=1))
    windows = int(SPAN / LIFETIME)
    (tmp / "m").mkdir()
    (tmp / "f").mkdir()
    measured, _ = _simulate(tmp / "m", ca, AHEAD, measured=True, windows=windows)
    floor_only, _ = _simulate(tmp / "f", ca, AHEAD, measured=False, windows=windows)
    return {"previous": _previous_rule(ca), "measured": len(measured),
            "floor_only": len(floor_only)}


# --- 2. the registrar's cost ---------------------------------------------------------------

class _Timed(ThreadedRegistrar):
    """The agent's registrar transport, keeping the server time of each renewal POST."""

    def __init__(self, client: RegistrarClient) -> None:
        super().__init__(client)
        self.client = client
        self.server_ms: list[float] = []

    async def renew(self, challenge_id: str, request: Any) -> Any:
        try:
            return await super().renew(challenge_id, request)
        finally:
            if self.client.last_server_ms is not None:
                self.server_ms.append(self.client.last_server_ms)


def _renewals(gateway: Gateway, registrar: RegistrarProcess, device_id: str, n: int,
              expect: str | None) -> list[float]:
    pinned = parse_chain(registrar.ca.read_text(), "registrar CA")
    timed = _Timed(RegistrarClient(registrar.url, registrar.ca, 20))

    async def run() -> None:
        for _ in range(n):
            try:
                await renew(gateway.tpm, timed, device_id, pinned,
                            lambda: datetime.datetime.now(datetime.UTC), 300.0)
                outcome = None
            except Problem as p:
                outcome = p.code
            assert outcome == expect, (outcome, expect)

    asyncio.run(run())
    timed.client.close()
    return timed.server_ms


def registrar_cost(tmp: Path, n: int) -> dict[str, float]:
    tpm = start_tpm(tmp / "tpm")
    figures: dict[str, float] = {}
    try:
        for name, settings, expect in (
                ("full", {"renewal_window": '"0s"'}, None),
                ("too_early", {"renewal_window": '"1h"', "max_renewals_per_window": "1"},
                 "renewal-too-early")):
            registrar = RegistrarProcess(tmp / f"registrar-{name}", [tpm.vendor_ca], settings={
                "cert_lifetime": '"1h"', "require_token": "false", **settings}).start()
            gateway = Gateway(tpm.tcti, tmp / f"state-{name}", registrar.url, registrar.ca)
            try:
                device_id = gateway.enroll().device_id
                if expect is not None:  # use up the allowance first
                    _renewals(gateway, registrar, device_id, 1, None)
                figures[name] = statistics.median(
                    _renewals(gateway, registrar, device_id, n, expect))
            finally:
                gateway.close()
                registrar.stop()
    finally:
        tpm.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("agent").setLevel(logging.ERROR)  # the simulated agent's clock-skew events
    with tempfile.TemporaryDirectory(prefix="devid-bench-") as tmp:
        plan = planning(Path(tmp))
        cost = registrar_cost(Path(tmp), args.requests)
    per_window = int(SPAN / LIFETIME)
    print("devid-agent clock-skew benchmark")
    print(f"1. renewals in {SPAN.total_seconds() / 3600:.0f} h, 30 min certificates, gateway "
          f"clock {AHEAD.total_seconds() / 60:.0f} min ahead (simulated, {per_window} "
          "lifetimes)")
    print(f"  baseline: local-clock rule, no floor    {plan['previous']:6d} renewals  (one per "
          "5 s simulation step: the loop)")
    print(f"  now: registrar time + floor             {plan['measured']:6d} renewals  "
          f"({plan['previous'] / plan['measured']:.0f}x fewer)")
    print(f"  now, offset never measured (floor only) {plan['floor_only']:6d} renewals  "
          f"({plan['previous'] / plan['floor_only']:.0f}x fewer)")
    print(f"2. registrar server time per renewal request, median of {args.requests} "
          "(swtpm, loopback HTTPS)")
    print(f"  baseline: full renewal (quote check, 2 signatures) {cost['full']:7.2f} ms")
    print(f"  refused as renewal-too-early                       {cost['too_early']:7.2f} ms  "
          f"({cost['too_early'] / cost['full']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
