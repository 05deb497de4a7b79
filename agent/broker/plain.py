"""Plain CoAP (no OSCORE, no DTLS), only for sensors of a profile marked `insecure = true`.

Off unless `[listen] plain` is set. Such a sensor proves nothing: the broker
knows it by its source address alone (its attribute `address`), which anyone
on the sensors' network can forge. So this exists only for legacy devices,
the profile must say `insecure = true`, and `devidctl check` warns while
such a profile exists. A request from an address that no sensor has, or
from a sensor whose profile is not insecure, gets 4.01 and nothing is
forwarded.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

import aiocoap
from aiocoap.interfaces import Resource

from agent.broker.coapserver import deduplication, serve, udp
from agent.policy.model import Policy
from agent.sensors.model import Sensor
from agent.sensors.store import SensorStore

log = logging.getLogger(__name__)


class PlainIdentities:
    """Source address -> sensor, for the plain listener's requests only."""

    def __init__(self, store: SensorStore, policy: Callable[[], Policy]) -> None:
        self._store, self._policy = store, policy
        self._cache: dict[str, list[Sensor]] = {}
        self.listener: Any = None  # the transport whose requests this identifies

    def refresh(self) -> None:
        self._cache.clear()  # the registry changed: look addresses up again

    def identify(self, remote: Any) -> Sensor | None:
        if self.listener is None or getattr(remote, "interface", None) is not self.listener:
            return None  # not a plain-CoAP request: another listener's to identify
        host = str(remote.sockaddr[0])
        address = str(ipaddress.ip_address(host.removeprefix("::ffff:")))
        sensors = self._cache.get(address)
        if sensors is None:
            sensors = self._cache[address] = self._store.by_address(address)
        insecure = set(self._policy().insecure_profiles())
        allowed = [s for s in sensors if s.profile in insecure]
        if len(allowed) == 1:
            return allowed[0]
        # Refused (and counted) by the Gateway like any request without a credential.
        why = "no sensor has this address" if not sensors else \
            "two sensors of insecure profiles share this address" if allowed else \
            "its profile does not allow plain CoAP (insecure = true)"
        log.debug("plain CoAP from %s refused: %s", address, why)
        return None


class PlainListener:
    name = "plain"

    def __init__(self, address: str, identities: PlainIdentities, site: Resource) -> None:
        self.address, self._identities, self._site = address, identities, site
        self._context: aiocoap.Context | None = None

    async def start(self) -> None:
        self._context = await serve(self.name, self.address, self._site, udp())
        # The one udp6 transport of this context: its remotes name it as their interface.
        transport = self._context.request_interfaces[0].token_interface.message_interface
        self._identities.listener = transport
        log.warning("plain CoAP listener on %s: sensors of insecure profiles are known by "
                    "their address only", self.address)

    def refresh(self) -> None:
        self._identities.refresh()

    @property
    def context(self) -> aiocoap.Context | None:
        """The listener's aiocoap context: the gateway's requests to sensors go out by it."""
        return self._context

    async def close(self) -> None:
        if self._context is not None:
            await self._context.shutdown()
            self._context = None

    def status_section(self) -> dict[str, Any]:
        return {"address": self.address, "listening": self._context is not None,
                "insecure": True, "deduplication": deduplication(self._context)}
