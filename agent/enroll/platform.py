"""What the gateway says about itself: make, model, serial and firmware version.

In the spirit of a UDI pair: DI (device identifier) = manufacturer and model,
PI (production identifier) = serial number and firmware version. Read from
the firmware's DMI tables (/sys/class/dmi/id), with agent.toml's [device]
taking precedence field by field. The registrar records them as
device-asserted and puts them in the certificate (docs/protocol.md,
"Certificate profile"); nothing here is a secret.

Pure except for reading the injected DMI directory.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from agent.enroll.messages import Platform

log = logging.getLogger("agent.enroll")

DMI_DIR = Path("/sys/class/dmi/id")
# field -> DMI file; product_serial is readable by root only on most kernels, so an
# agent running as its own user usually takes the serial from agent.toml.
DMI_FILES = {"manufacturer": "sys_vendor", "model": "product_name",
             "serial": "product_serial", "version": "bios_version"}
MAX_TEXT = 64
# What firmware vendors leave in fields they never filled in: not information.
PLACEHOLDERS = frozenset({
    "", "0", "none", "n/a", "na", "unknown", "not specified", "not applicable", "default string",
    "to be filled by o.e.m.", "to be filled by oem", "system manufacturer",
    "system product name", "system serial number", "system version", "0123456789",
    "123456789", "oem", "o.e.m.", "xxxxxxxx",
})
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


def clean(raw: str) -> str | None:
    """DMI text as the certificate can carry it: printable ASCII, at most 64 characters,
    None for an empty or placeholder value."""
    text = " ".join(_UNPRINTABLE.sub(" ", raw).split())[:MAX_TEXT].strip()
    return None if text.lower() in PLACEHOLDERS else text


def read_dmi(directory: Path = DMI_DIR) -> dict[str, str]:
    found: dict[str, str] = {}
    for field, name in DMI_FILES.items():
        try:
            raw = (directory / name).read_bytes()[:1024].decode("ascii", "replace")
        except OSError:
            continue  # absent (no DMI on most ARM boards) or root-only
        value = clean(raw)
        if value is not None:
            found[field] = value
    return found


def platform_of(configured: dict[str, str | None], use_dmi: bool,
                dmi_dir: Path = DMI_DIR) -> Platform | None:
    """agent.toml's values where given, DMI's for the rest; None when nothing is known."""
    values: dict[str, str] = read_dmi(dmi_dir) if use_dmi else {}
    values.update({k: v for k, v in configured.items() if v is not None})
    if not values:
        return None
    return Platform(**values)
