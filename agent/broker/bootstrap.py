"""LwM2M Bootstrap (LwM2M 1.1 Core 5.2, Transport 6.1) for zero-touch onboarding.

A sensor arrives with a factory-unique bootstrap credential (imported with
`devidctl sensors import`, or minted by `sensors add`) in a profile whose
`[profiles.NAME.lwm2m]` says `bootstrap = true`. Authenticated by it, over
DTLS-PSK or OSCORE, it sends Bootstrap-Request (POST /bs?ep=NAME). The
gateway answers 2.04, then, over the same channel:

1. Bootstrap-Delete /0 and /1 (every account but the bootstrap one);
2. Bootstrap-Write /0/1: a Security instance for the gateway's LwM2M server
   with a freshly minted operational credential (a new PSK under the same
   identity, or a new OSCORE master secret and salt in /21/1), and /1/0: the
   Server instance (short server ID 1, lifetime, binding U);
3. Bootstrap-Finish (POST /bs).

Only when the sensor has acknowledged Bootstrap-Finish does the new
credential replace the old in the registry: the bootstrap credential is then
spent, and a second use of it fails authentication (counted, journaled and
audited like any wrong key). If anything fails before, nothing changes and
the sensor may try again. The run is audited and journaled either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiocoap import Code, Message

from agent import events
from agent.audit import AuditLog
from agent.broker.downlink import Downlink
from agent.broker.gateway import answer
from agent.broker.lwm2m import endpoint_of, lwm2m_section
from agent.broker.policy import PolicyHolder
from agent.broker.registry import SensorRegistry
from agent.broker.traffic import Traffic
from agent.clock import isoformat_utc
from agent.errors import Lwm2mError, Lwm2mForbidden
from agent.lwm2m.content import TLV, encode_tlv
from agent.lwm2m.registration import parse_bootstrap_request
from agent.sensors.credentials import Credential, OscoreCredential, PskCredential
from agent.sensors.model import Sensor

log = logging.getLogger(__name__)
SERVER_SHORT_ID = 1
SERVER_INSTANCE, SECURITY_INSTANCE, OSCORE_INSTANCE = 0, 1, 1
# Security object (/0) resources; Security Mode 0 is PSK, 3 NoSec (OSCORE protects).
URI, IS_BOOTSTRAP, MODE, IDENTITY, SECRET, SHORT_ID, OSCORE_LINK = 0, 1, 2, 3, 5, 10, 17
PSK_MODE, NOSEC_MODE = 0, 3
AES_CCM_16_64_128, HKDF_SHA_256 = 10, -10  # COSE algorithms (RFC 8613's defaults)


def security_instance(uri: str, credential: Credential) -> dict[int, Any]:
    """The Security instance that points a sensor at the gateway's LwM2M server."""
    common: dict[int, Any] = {URI: uri, IS_BOOTSTRAP: False, SHORT_ID: SERVER_SHORT_ID}
    if isinstance(credential, PskCredential):
        return {**common, MODE: PSK_MODE, IDENTITY: credential.identity,
                SECRET: credential.key.reveal()}
    # OSCORE: NoSec at the DTLS level, the keys in an OSCORE instance it links to.
    return {**common, MODE: NOSEC_MODE, OSCORE_LINK: (21 << 16) | OSCORE_INSTANCE}


def oscore_instance(credential: OscoreCredential) -> dict[int, Any]:
    """/21/1, the sensor's side: it sends with its own ID, receives with the gateway's."""
    return {0: credential.master_secret.reveal(), 1: credential.sender_id,
            2: credential.recipient_id, 3: AES_CCM_16_64_128, 4: HKDF_SHA_256,
            5: credential.master_salt}


class Lwm2mBootstrap:
    name = "lwm2m_bootstrap"

    def __init__(self, registry: SensorRegistry, policy: PolicyHolder, downlink: Downlink,
                 traffic: Traffic, audit: AuditLog,
                 clock: Callable[[], float] = time.time) -> None:
        self._registry, self._policy, self._downlink = registry, policy, downlink
        self._traffic, self._audit, self._clock = traffic, audit, clock
        self._running: dict[int, asyncio.Task[None]] = {}
        self.totals = {"requested": 0, "finished": 0, "failed": 0}

    async def respond(self, sensor: Sensor, request: Message) -> Message:
        """Bootstrap-Request: 2.04 at once, the bootstrap itself runs after."""
        try:
            if request.code != Code.POST or len(request.opt.uri_path) != 1:
                return answer(Code.METHOD_NOT_ALLOWED, "LwM2M bootstrap: POST /bs?ep=NAME")
            endpoint = parse_bootstrap_request(request.opt.uri_query)
            section = lwm2m_section(self._policy, sensor)
            if not section.bootstrap:
                raise Lwm2mForbidden(f"profile {sensor.profile} does not bootstrap sensors "
                                     "(bootstrap = true in [profiles.NAME.lwm2m])")
            if endpoint != endpoint_of(sensor):
                raise Lwm2mForbidden(f"Bootstrap-Request: endpoint name {endpoint!r} is not "
                                     f"this sensor's ({endpoint_of(sensor)!r})")
            if sensor.transport not in ("dtls-psk", "oscore"):
                raise Lwm2mForbidden(f"bootstrap writes DTLS-PSK or OSCORE credentials; "
                                     f"sensor {sensor.name} uses {sensor.transport}")
        except Lwm2mError as e:
            self._traffic.refused("denied", e.message, "", sensor, "POST /bs")
            return answer(Code(e.coap_code), e.message)
        self.totals["requested"] += 1
        self._downlink.remember(sensor, request.remote)
        if sensor.serial not in self._running:
            uri = f"{'coaps' if sensor.transport == 'dtls-psk' else 'coap'}://" \
                  f"{request.remote.hostinfo_local}"
            task = asyncio.create_task(self._bootstrap(sensor, uri))
            self._running[sensor.serial] = task
            task.add_done_callback(lambda _t: self._running.pop(sensor.serial, None))
        return Message(code=Code.CHANGED)

    async def _bootstrap(self, sensor: Sensor, uri: str) -> None:
        store = self._registry.store
        step = "minting"
        try:
            credential = await asyncio.to_thread(store.fresh_credential, sensor)
            for name, message in self._steps(uri, credential):
                step = name  # named in the failure, if this one fails
                response = await self._downlink.request(sensor, message)
                if not response.code.is_successful():
                    raise Lwm2mError(f"the sensor answered {response.code}")
            step = "storing"
            now = isoformat_utc(self._clock())
            await asyncio.to_thread(store.replace_credential, sensor, credential, now)
        except Exception as e:  # the sensor may try again; nothing changed
            self.totals["failed"] += 1
            reason = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            events.emit(log, "lwm2m-bootstrap-failed", "sensor %s: LwM2M bootstrap failed "
                        "at %s: %s; its credential is unchanged", sensor.name, step, reason,
                        sensor=sensor.id, reason=reason)
            await asyncio.to_thread(self._audit.append, "lwm2m-bootstrap", sensor=sensor.id,
                                    name=sensor.name, outcome="failed", step=step,
                                    reason=reason)
            return
        self.totals["finished"] += 1
        self._registry.changed.set()  # the old key is refused from now on
        events.emit(log, "lwm2m-bootstrapped", "sensor %s bootstrapped: its bootstrap "
                    "credential is spent, its operational credential written to it",
                    sensor.name, sensor=sensor.id)
        await asyncio.to_thread(self._audit.append, "lwm2m-bootstrap", sensor=sensor.id,
                                name=sensor.name, outcome="finished", server=uri)

    @staticmethod
    def _steps(uri: str, credential: Credential) -> list[tuple[str, Message]]:
        def write(path: tuple[int, int], resources: dict[int, Any]) -> Message:
            message = Message(code=Code.PUT, uri_path=tuple(map(str, path)),
                              payload=encode_tlv(resources))
            message.opt.content_format = TLV
            return message

        steps = [("Bootstrap-Delete /0", Message(code=Code.DELETE, uri_path=("0",))),
                 ("Bootstrap-Delete /1", Message(code=Code.DELETE, uri_path=("1",))),
                 ("Bootstrap-Write /0/1", write((0, SECURITY_INSTANCE),
                                               security_instance(uri, credential)))]
        if isinstance(credential, OscoreCredential):
            steps.append(("Bootstrap-Write /21/1", write((21, OSCORE_INSTANCE),
                                                         oscore_instance(credential))))
        steps += [("Bootstrap-Write /1/0", write((1, SERVER_INSTANCE),
                                                 {0: SERVER_SHORT_ID, 1: 300, 6: True,
                                                  7: "U"})),
                  ("Bootstrap-Finish", Message(code=Code.POST, uri_path=("bs",)))]
        return steps

    def status_section(self) -> dict[str, Any]:
        return {**self.totals, "running": len(self._running)}
