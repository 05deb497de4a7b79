"""The daemon's own health as status and check show it: running, and its last reload. Pure."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from agent.diagnostics.checks import CheckResult, Level
from agent.errors import DevidError


@dataclass(frozen=True)
class ServiceFacts:
    reload_error: DevidError | None = None
    reloaded_at: datetime.datetime | None = None


def service_section(facts: ServiceFacts) -> dict[str, Any]:
    return {
        "reloaded_at": facts.reloaded_at.isoformat(timespec="seconds")
        if facts.reloaded_at else None,
        "reload_error": facts.reload_error.to_dict() if facts.reload_error else None,
    }


def check_service(facts: ServiceFacts, agent: dict[str, Any]) -> CheckResult:
    running = (f"devid-agent {agent.get('version')} running (pid {agent.get('pid')}, "
               f"up {agent.get('uptime_s', 0):.0f}s)")
    if facts.reload_error is not None:
        return CheckResult("daemon", Level.WARN,
                           f"configuration reload failed, running with the previous one: "
                           f"{facts.reload_error.message}",
                           "fix the file and run `systemctl reload devid-agent`")
    return CheckResult("daemon", Level.PASS, running)
