#!/usr/bin/env python3
"""How fast the service is ready for systemd, and how fast it reloads.

    .venv/bin/python bench/service.py [--rounds N]

One swtpm, one devid-registrar and one enrolled devid-agent. Then N times:
restart the agent with a NOTIFY_SOCKET of our own and time process start to
READY=1 (TPM connect, EK chain, identity check against the TPM, TLS key
unsealed), and send SIGHUP and time RELOADING=1 to READY=1. Baseline in the
same run: process start to `devid-agent --version` exiting (interpreter and
imports, no work).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from notifysock import NotifyListener  # noqa: E402
from stack import (  # noqa: E402
    BIN,
    AgentProcess,
    RegistrarProcess,
    enrollment_toml,
    rotation_toml,
    start_tpm,
    write_agent_config,
)


def _ready_after(listener: NotifyListener, since: float, key: str = "READY") -> float:
    message = listener.wait_for(key, lambda m: m.fields.get(key) == "1", timeout=60,
                                after=since)
    return message.at - since


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tpm = start_tpm(root / "swtpm")
        registrar = RegistrarProcess(root / "registrar", [tpm.vendor_ca]).start()
        config = write_agent_config(root / "agent" / "agent.toml", tpm.tcti, [tpm.vendor_ca],
                                    enrollment_toml(registrar, registrar.token())
                                    + rotation_toml())
        first = AgentProcess(config).start()
        first.wait_enrollment("enrolled")
        first.stop()
        try:
            baseline, ready, reload = [], [], []
            for _ in range(args.rounds):
                began = time.monotonic()
                subprocess.run([str(BIN / "devid-agent"), "--version"], check=True,
                               capture_output=True)
                baseline.append(time.monotonic() - began)
            for _ in range(args.rounds):
                listener = NotifyListener()
                agent = AgentProcess(config, env=listener.env(watchdog_usec=10_000_000))
                began = time.monotonic()
                agent.start(wait=False)
                ready.append(_ready_after(listener, began))
                mark = time.monotonic()
                agent.proc.send_signal(signal.SIGHUP)
                reloading = _ready_after(listener, mark, "RELOADING")
                reload.append(_ready_after(listener, mark) - reloading)
                agent.stop()
                listener.close()
        finally:
            registrar.stop()
            tpm.stop()
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    print(f"rounds: {args.rounds}")
    print(f"baseline: start to --version exit      median {ms(baseline):7.1f} ms")
    print(f"start to READY=1 (enrolled, swtpm)      median {ms(ready):7.1f} ms "
          f"({statistics.median(ready) / statistics.median(baseline):.1f}x baseline)")
    print(f"reload: RELOADING=1 to READY=1          median {ms(reload):7.1f} ms")


if __name__ == "__main__":
    main()
