"""`[siem]`, in agent.toml and in broker.toml alike: where a daemon sends its events."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from agent.tomlconfig import StrictSection, checked_by, host_port_url


def parse_siem_url(url: str) -> tuple[str, int]:
    """(host, port) of the collector's `tls://HOST[:PORT]`; ConfigError if not."""
    return host_port_url(url, "tls", 6514, "RFC 5425: syslog over TLS, port 6514 by "
                                           "default")


class SiemSection(StrictSection):
    # Every journaled event also to a SIEM collector over TLS, with the gateway's
    # certificate: RFC 5424 syslog framed as RFC 5425 says, or JSON lines.
    url: Annotated[str, AfterValidator(checked_by(parse_siem_url))]
    framing: Literal["syslog", "json"] = "syslog"
    bundle: Path | None = None  # PEM CAs the collector is verified against
    # Events kept while the collector is away; past this the oldest are dropped (counted).
    queue: Annotated[int, Field(ge=10, le=10_000_000)] = 10000
    # The structured data's SD-ID: a private enterprise number of your own, if you have one.
    sd_id: Annotated[str, Field(pattern=r"^[!#-<>-\\^-~]{1,32}$")] = "devid@32473"
