"""SIGHUP: what a new configuration changes in the running daemon. Pure.

Most sections apply in place. `[paths]`, `[control]`, `[identity_api]` and `[siem]` do
not: the state directory, the sockets and the SIEM connection are open for the daemon's
lifetime, so a
change there is reported as needing a restart and the running values are
kept. Removing `[enrollment]` from an enrolled gateway would leave rotation
with no registrar mid-flight, so it too waits for a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import AgentConfig

RESTART_ONLY = ("paths", "control", "identity_api", "siem")
SECTIONS = ("tpm", "paths", "trust", "control", "log", "device", "enrollment", "rotation",
            "identity_api", "consumers", "siem")


@dataclass(frozen=True)
class ReloadPlan:
    config: AgentConfig  # what the daemon runs with from now on
    applied: tuple[str, ...]  # sections whose new values take effect now
    needs_restart: tuple[str, ...]  # sections whose new values wait for a restart

    def describe(self) -> str:
        parts = [f"applied: {', '.join(self.applied) or 'no changes'}"]
        if self.needs_restart:
            parts.append(f"needs a restart to apply: {', '.join(self.needs_restart)}")
        return "; ".join(parts)


def _label(section: str) -> str:
    return "[[consumers]]" if section == "consumers" else f"[{section}]"


def plan_reload(running: AgentConfig, loaded: AgentConfig) -> ReloadPlan:
    changed = [s for s in SECTIONS if getattr(running, s) != getattr(loaded, s)]
    keep = {s: getattr(running, s) for s in RESTART_ONLY if s in changed}
    needs_restart = [_label(s) for s in keep]
    if "enrollment" in changed and loaded.enrollment is None:
        keep["enrollment"] = running.enrollment
        needs_restart.append("[enrollment] (removed)")
    applied = tuple(_label(s) for s in changed if s not in keep)
    return ReloadPlan(loaded.model_copy(update=keep), applied, tuple(needs_restart))
