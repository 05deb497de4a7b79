"""A `bundle` key of a configuration file: PEM CAs a connection's peer is verified
against (an upstream, the LwM2M server, the SIEM collector)."""

from __future__ import annotations

from pathlib import Path

from agent.errors import ConfigError


def read_trust(path: Path | None, section: str) -> str | None:
    """The PEM text of a `bundle` key, checked; ConfigError naming `section`."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"[{section}] bundle: {path}: {e.strerror or e}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigError(f"[{section}] bundle: {path}: no PEM certificate in it")
    return text
