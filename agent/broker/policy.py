"""The policy as the broker holds it: loaded at start, reloaded on SIGHUP, explained.

A file that does not parse is refused whole and the policy in force stays
(none at start: nothing is granted). `policy-explain` answers "would this
sensor be allowed this?" with the rule that decides, without using up any
rate.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from pathlib import Path
from typing import Any

from agent import events
from agent.daemon.subsystem import Handler
from agent.errors import ConfigError, DevidError, SensorError
from agent.policy.decide import Message, decide
from agent.policy.model import METHODS, Policy, parse_policy
from agent.sensors.store import SensorStore
from agent.tomlconfig import read_config_text

log = logging.getLogger(__name__)


def load_policy_file(path: Path) -> Policy:
    """The policy in `path`; an empty one (nothing granted) if there is no file."""
    if not path.exists():
        return Policy().model_copy(update={"source": path})
    return parse_policy(read_config_text(path), path)


class PolicyHolder:
    name = "policy"

    def __init__(self, path: Path, store: SensorStore) -> None:
        self.path, self._store = path, store
        self.policy = Policy()
        self.loaded_at: datetime.datetime | None = None
        self.error: DevidError | None = None

    def load(self) -> bool:
        """Load or reload; on a refused file keep the policy in force. True if loaded."""
        try:
            policy = load_policy_file(self.path)
        except ConfigError as e:
            self.error = e
            events.emit(log, "policy-refused", "policy %s refused, keeping the one in force "
                        "(%d profiles): %s", self.path, len(self.policy.profiles), e.message)
            return False
        self.policy, self.error = policy, None
        self.loaded_at = datetime.datetime.now(datetime.UTC)
        profiles = ", ".join(f"{n} ({len(p.rules)} rules)" for n, p in policy.profiles.items())
        if not profiles:
            profiles = "no profiles (nothing is granted)" + (
                "" if self.path.exists() else "; the file does not exist")
        events.emit(log, "policy-loaded", "policy %s: %s", self.path, profiles)
        return True

    def status_section(self) -> dict[str, Any]:
        return {"file": str(self.path), "exists": self.path.exists(),
                "profiles": {n: len(p.rules) for n, p in self.policy.profiles.items()},
                "insecure_profiles": self.policy.insecure_profiles(),
                "loaded_at": self.loaded_at.isoformat() if self.loaded_at else None,
                "error": self.error.to_dict() if self.error else None}

    def handlers(self) -> dict[str, Handler]:
        return {"policy-explain": self.explain}

    async def explain(self, params: dict[str, Any]) -> dict[str, Any]:
        ref, method, path = (params.get(k) for k in ("sensor", "method", "path"))
        size, content_format = params.get("size", 0), params.get("format")
        if not all(isinstance(v, str) and v for v in (ref, method, path)):
            raise SensorError("policy explain: give SENSOR METHOD PATH")
        if method not in METHODS:
            raise SensorError(f"method {method!r}: expected one of {', '.join(METHODS)}")
        if not str(path).startswith("/"):
            raise SensorError(f"path {path!r}: a path starts with '/'")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise SensorError("size: expected a number of bytes")
        if content_format is not None and (isinstance(content_format, bool) or
                                           not isinstance(content_format, int)):
            raise SensorError("format: expected a CoAP Content-Format number")
        sensor = await asyncio.to_thread(self._store.get, str(ref))
        decision = decide(self.policy, sensor, Message(str(method), str(path), size,
                                                       content_format),
                          datetime.datetime.now(datetime.UTC), None)
        return {"sensor": sensor.name, "profile": sensor.profile, "method": method,
                "path": path, **decision.to_dict(),
                "note": "the rate is not checked by explain"}
