"""The shipped systemd units: hardened (systemd-analyze security <= 1.5) and valid.

`systemd-analyze verify` also checks that ExecStart= programs exist; before
the package is installed /usr/bin/devid-* do not, so only that complaint is
let through here. The package test (tests/package/run) runs verify on the
installed units, man pages included, and requires it to be silent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
NAMES = ["devid-agent.service", "devid-registrar.service", "devid-broker.service"]
MAX_EXPOSURE = 1.5

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="needs systemd-analyze")


def _exposure(name: str) -> float:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNITS / name)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


@pytest.mark.parametrize("name", NAMES)
def test_exposure_is_at_most_1_5(name):
    assert _exposure(name) <= MAX_EXPOSURE


def test_the_broker_has_no_device_and_no_more_exposure_than_the_agent():
    """The process that parses sensors' datagrams never gets the TPM (issue 12)."""
    unit = "\n".join(line for line in (UNITS / "devid-broker.service").read_text().splitlines()
                     if not line.startswith("#"))
    assert "DeviceAllow" not in unit and "tpm" not in unit.split("[Service]")[1].lower()
    assert "PrivateDevices=yes" in unit and "DevicePolicy=closed" in unit
    assert _exposure("devid-broker.service") <= _exposure("devid-agent.service")


@pytest.mark.parametrize("name", NAMES)
def test_verify_is_clean(name):
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(UNITS / name)],
                          capture_output=True, text=True, timeout=60)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    not_installed = re.compile(r"Command (/usr/bin/devid-\S+) is not executable")
    unexpected = [c for c in complaints
                  if not ((m := not_installed.search(c)) and not Path(m.group(1)).exists())]
    assert unexpected == [], complaints


@pytest.mark.parametrize("name", NAMES)
def test_units_are_notify_services_with_watchdog_and_restart_limits(name):
    text = (UNITS / name).read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartSec=",
                 "StartLimitBurst=", "RestartPreventExitStatus=78", "DevicePolicy=closed",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n",
                 "UMask=0077", "SystemCallFilter=@system-service", "StateDirectory="):
        assert line in text, f"{name}: {line.strip()} missing"
    if name == "devid-agent.service":
        assert "DeviceAllow=/dev/tpmrm0 rw" in text
        assert "ExecReload=/bin/kill -HUP $MAINPID" in text
