"""The gateway's LwM2M server for its sensors: the Registration interface at /rd.

A sensor speaks LwM2M to the gateway over its own OSCORE or DTLS credential;
the Gateway hands requests under /rd to this part, with the sensor the
listener authenticated. The sensor's profile must have an `lwm2m` section;
its endpoint name must be the one bound to its credential (its `endpoint`
attribute, else its name). What it registers (lifetime, binding, objects) is
in `devidctl sensors show`.

Once a second the task lets time pass over the registrations: a sensor that
missed its lifetime is offline (its registration is removed, as LwM2M says,
and journaled); one silent for `deprovision_after` lifetimes is
deprovisioned, i.e. its credential is revoked through the registry (audited
and journaled), and it must be onboarded again. The parsing and the state are
pure (agent/lwm2m/); this module is the edge: CoAP, clock, disk, journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiocoap import Code, Message
from aiocoap.numbers import ContentFormat

from agent import events
from agent.audit import AuditLog
from agent.broker.downlink import Downlink
from agent.broker.gateway import answer
from agent.broker.lwm2mstore import Lwm2mStore
from agent.broker.policy import PolicyHolder
from agent.broker.registry import SensorRegistry
from agent.broker.traffic import Traffic
from agent.errors import DevidError, Lwm2mError, Lwm2mForbidden, Lwm2mNotFound
from agent.lwm2m.content import OPAQUE, decode, encode_text, parse_path
from agent.lwm2m.gateway import prefix_of
from agent.lwm2m.linkformat import parse_links
from agent.lwm2m.registration import (
    Deprovision,
    Expired,
    Params,
    Registrations,
    parse_register,
    parse_update,
)
from agent.policy.model import Lwm2mSection
from agent.ratelimit import KeyedBuckets
from agent.sensors.model import Sensor

log = logging.getLogger(__name__)
TICK = 1.0
LINK_FORMAT = 40
OPERATIONS = ("read", "write", "execute", "discover")
BLOCKWISE_FROM = 512  # payloads above this go in Block1 pieces (a firmware package)
MAX_WAIT = 110  # seconds an operation may wait for a sleeping sensor (devidctl waits 120)


def endpoint_of(sensor: Sensor) -> str:
    """The LwM2M endpoint name bound to a sensor's credential."""
    return sensor.attributes.get("endpoint") or sensor.name


class Lwm2mServer:
    name = "lwm2m"

    def __init__(self, store: Lwm2mStore, policy: PolicyHolder, registry: SensorRegistry,
                 traffic: Traffic, audit: AuditLog, downlink: Downlink | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self._policy, self.registry = store, policy, registry
        self._audit, self.downlink = audit, downlink or Downlink()
        self._traffic, self._clock = traffic, clock
        self.table = Registrations()
        self.table.load(*store.load())
        self.firmware = store.firmware()  # serial -> its last firmware update
        self.totals: Counter[str] = Counter()
        # Register and De-register are journaled, at most 10 a minute per sensor: a sensor
        # registering in a loop must not flood the journal.
        self._journal = KeyedBuckets(10, 6.0, time.monotonic)
        self._woken: dict[int, asyncio.Event] = {}  # queue-mode sensors waited for
        self._profiles: dict[int, str] = {}  # serial -> profile, of sensors seen or looked up

    # --- requests ------------------------------------------------------------------------

    async def respond(self, sensor: Sensor, request: Message) -> Message:
        """The answer to a Register, Update or De-register of `sensor` (authenticated)."""
        path = request.opt.uri_path
        method = request.code
        try:
            section = self._section(sensor)
            if method == Code.POST and len(path) == 1:
                return self._register(sensor, section, request)
            if len(path) == 2 and method == Code.POST:
                return self._update(sensor, section, path[1], request)
            if len(path) == 2 and method == Code.DELETE:
                self.table.deregister(sensor.serial, path[1])
                self.totals["deregistered"] += 1
                if self._journal.take(sensor.serial):
                    events.emit(log, "lwm2m-deregistered", "sensor %s de-registered (LwM2M)",
                                sensor.name, sensor=sensor.id)
                return Message(code=Code.DELETED)
            return answer(Code.METHOD_NOT_ALLOWED, "LwM2M registration: POST /rd, POST or "
                          "DELETE /rd/LOCATION")
        except Lwm2mError as e:
            self.totals["refused"] += 1
            if isinstance(e, Lwm2mForbidden):
                self._traffic.refused("denied", e.message, "", sensor,
                                      f"{method} /{'/'.join(path)}")
            else:
                self._traffic.malformed("lwm2m", sensor.name, e.message)
            return answer(Code(e.coap_code), e.message)

    def _section(self, sensor: Sensor) -> Lwm2mSection:
        return lwm2m_section(self._policy, sensor)

    def _register(self, sensor: Sensor, section: Lwm2mSection, request: Message) -> Message:
        _link_format(request)
        params = parse_register(request.opt.uri_query, request.payload)
        _lifetime_allowed(params, section)
        registration = self.table.register(sensor.serial, sensor.id, endpoint_of(sensor),
                                           params, self._clock())
        self._profiles[sensor.serial] = sensor.profile
        self.totals["registered"] += 1
        if self._journal.take(sensor.serial):
            events.emit(log, "lwm2m-registered", "sensor %s registered (LwM2M %s, lifetime %d "
                        "s, %d objects)", sensor.name, registration.version,
                        registration.lifetime, len(registration.objects), sensor=sensor.id)
        self.downlink.remember(sensor, request.remote)
        self._heard(sensor)
        response = Message(code=Code.CREATED)
        response.opt.location_path = ("rd", registration.location)
        return response

    def _update(self, sensor: Sensor, section: Lwm2mSection, location: str,
                request: Message) -> Message:
        if request.payload:
            _link_format(request)
        current = self.table.at(location)
        params = parse_update(request.opt.uri_query, request.payload,
                              current.version if current is not None else "1.1")
        _lifetime_allowed(params, section)
        self.table.update(sensor.serial, location, params, self._clock())
        self.downlink.remember(sensor, request.remote)
        self._heard(sensor)
        self.totals["updated"] += 1
        return Message(code=Code.CHANGED)

    # --- device management: the gateway's requests to a sensor ---------------------------

    def handlers(self) -> dict[str, Any]:
        return {"lwm2m-operate": self.operate, "lwm2m-observe": self.observe}

    async def operate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Read, Write, Execute or Discover on a registered sensor, for the operator, as
        the sensor's profile grants; audited whether allowed or not."""
        ref, operation = params.get("sensor"), params.get("operation")
        if not isinstance(ref, str) or operation not in OPERATIONS:
            raise Lwm2mError(f"expected a sensor and one of {', '.join(OPERATIONS)}")
        path_text = params.get("path")
        sensor = await asyncio.to_thread(self.registry.store.get, ref)
        audit = {"sensor": sensor.id, "name": sensor.name, "operation": operation,
                 "path": path_text, "caller": "operator"}
        value = params.get("value")
        if value is not None and not isinstance(value, str):
            raise Lwm2mError("value: expected text")
        try:
            doc = await self.ask(sensor, str(operation), str(path_text or ""), value,
                                 params.get("wait", 0))
        except Lwm2mError as e:
            await asyncio.to_thread(self._audit.append, "lwm2m-operation", **audit,
                                    refused=e.message)
            raise
        await asyncio.to_thread(self._audit.append, "lwm2m-operation", **audit,
                                answer=doc["code"])
        return doc

    async def ask(self, sensor: Sensor, operation: str, path_text: str,
                  value: str | bytes | None = None, wait: object = 0) -> dict[str, Any]:
        """One operation on `sensor` as the operator, under its profile's grants: the
        sensor's answer, decoded. Lwm2mError when it is not allowed or not answered."""
        path = parse_path(path_text)
        message = self._downlink_message(sensor, operation, path, value)
        await self._awake(sensor, wait)
        if len(message.payload) > BLOCKWISE_FROM:
            response = await self.downlink.request_blockwise(sensor, message)
        else:
            response = await self.downlink.request(sensor, message)
        self.totals[f"operation.{operation}"] += 1
        return {"sensor": sensor.name, "operation": operation, "path": path_text,
                **_answer_doc(operation, path, response)}

    async def observe(self, params: dict[str, Any]) -> dict[str, Any]:
        """Observe a resource of a registered sensor for the operator, as its profile
        grants: the notifications until `count` or `seconds`, decoded; audited."""
        ref, path_text = params.get("sensor"), params.get("path")
        count, seconds = params.get("count", 5), params.get("seconds", 30)
        if not isinstance(ref, str) or not isinstance(path_text, str):
            raise Lwm2mError("observe: expected a sensor and a path")
        for name, value, most in (("count", count, 1000), ("seconds", seconds, MAX_WAIT)):
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not 0 < value <= most:
                raise Lwm2mError(f"observe: {name} from 1 to {most}")
        sensor = await asyncio.to_thread(self.registry.store.get, ref)
        audit = {"sensor": sensor.id, "name": sensor.name, "operation": "observe",
                 "path": path_text, "caller": "operator"}
        try:
            path = parse_path(path_text)
            message = self._downlink_message(sensor, "observe", path, None)
            await self._awake(sensor, params.get("wait", 0))
            answers = await self.downlink.observe(sensor, message, int(count), float(seconds))
        except Lwm2mError as e:
            await asyncio.to_thread(self._audit.append, "lwm2m-operation", **audit,
                                    refused=e.message)
            raise
        self.totals["operation.observe"] += 1
        notifications = [_answer_doc("read", path, answer) for answer in answers]
        await asyncio.to_thread(self._audit.append, "lwm2m-operation", **audit,
                                answer=notifications[0]["code"],
                                notifications=len(notifications))
        return {"sensor": sensor.name, "operation": "observe", "path": path_text,
                "code": notifications[0]["code"], "notifications": notifications}

    async def _awake(self, sensor: Sensor, wait: object) -> None:
        """Returns when the sensor listens: always, unless it registered in queue mode and
        its last Register or Update is older than its profile's `queue_awake`; then at its
        next Update, if that comes within `wait` seconds (LwM2M queue mode)."""
        if isinstance(wait, bool) or not isinstance(wait, int | float) or \
                not 0 <= wait <= MAX_WAIT:
            raise Lwm2mError(f"wait: expected 0 to {MAX_WAIT} seconds")
        registration = self.table.of(sensor.serial)
        section = self._section(sensor)
        if registration is None or not registration.queue:
            return
        quiet = self._clock() - registration.updated_at
        if quiet <= section.queue_awake:
            return
        if not wait:
            raise Lwm2mError(f"sensor {sensor.name} sleeps (queue mode): last heard "
                             f"{quiet:.0f} s ago, it listens {section.queue_awake} s after "
                             "each Update", "wait for its next Update with --wait SECONDS")
        woke = self._woken.setdefault(sensor.serial, asyncio.Event())
        woke.clear()
        try:
            await asyncio.wait_for(woke.wait(), float(wait))
        except TimeoutError:
            raise Lwm2mError(f"sensor {sensor.name} sleeps (queue mode) and sent no Update "
                             f"within {wait} s") from None

    def _heard(self, sensor: Sensor) -> None:
        """A Register or Update: a queue-mode sensor listens now."""
        woke = self._woken.pop(sensor.serial, None)
        if woke is not None:
            woke.set()

    def refresh(self) -> None:
        """Follow the registry after a change: the registrations (and the ways to them) of
        sensors removed or revoked end; such a sensor must be onboarded again."""
        serials = [registration.serial for registration in self.table.all()]
        if not serials:
            return
        now = self.registry.store.current(serials)
        for serial in serials:
            found = now.get(serial)
            if found is None or found[0].status == "revoked":
                self.table.forget(serial)
                self.downlink.forget(serial)

    def check_grant(self, sensor: Sensor, operation: str, path: tuple[int, ...],
                    who: str = "operator") -> None:
        """Lwm2mForbidden unless the sensor's profile grants `who` (the operator or the
        upstream server) `operation` on `path` (deny by default)."""
        if self._section(sensor).grant(who, operation, path) is None:
            where = "/" + "/".join(map(str, path))
            raise Lwm2mForbidden(f"profile {sensor.profile} grants the {who} no "
                                 f"{operation} on {where} ([[profiles.NAME.lwm2m.grants]])")

    def permit(self, sensor: Sensor, operation: str, path: tuple[int, ...], who: str) -> None:
        """Lwm2mError unless the gateway may now ask `sensor` for `operation` on `path` on
        `who`'s behalf: it is registered, active, and its profile grants it."""
        if self.table.of(sensor.serial) is None:
            self._section(sensor)  # a profile without LwM2M says so first
            raise Lwm2mNotFound(f"sensor {sensor.name} is not registered (LwM2M)")
        if sensor.status != "active":
            raise Lwm2mForbidden(f"sensor {sensor.name} is {sensor.status}: the gateway does "
                                 "not talk to it", "release it first (devidctl sensors "
                                 "release) if it is to be managed")
        self.check_grant(sensor, operation, path, who)

    def _downlink_message(self, sensor: Sensor, operation: str, path: tuple[int, ...],
                          value: str | bytes | None) -> Message:
        self.permit(sensor, operation, path, "operator")
        uri_path = tuple(map(str, path))
        if operation in ("read", "observe"):
            return Message(code=Code.GET, uri_path=uri_path)
        if operation == "discover":
            message = Message(code=Code.GET, uri_path=uri_path)
            message.opt.accept = LINK_FORMAT
            return message
        if len(path) != 3:
            raise Lwm2mError(f"{operation} takes a resource: /OBJECT/INSTANCE/RESOURCE")
        if operation == "write":
            if value is None or value == "":
                raise Lwm2mError("write: the value is required")
            fmt, payload = (OPAQUE, value) if isinstance(value, bytes) else encode_text(value)
            message = Message(code=Code.PUT, uri_path=uri_path, payload=payload)
            message.opt.content_format = fmt
            return message
        arguments = value.encode("utf-8") if isinstance(value, str) else value or b""
        return Message(code=Code.POST, uri_path=uri_path, payload=arguments)

    # --- time ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK)
            await self.tick()
        await self.flush()

    async def tick(self) -> None:
        for change in self.table.expire(self._clock(), self._deprovision_after):
            if isinstance(change, Expired):
                r = change.registration
                self.totals["expired"] += 1
                events.emit(log, "lwm2m-offline", "sensor %s is offline: no LwM2M Update "
                            "within its lifetime of %d s", r.endpoint, r.lifetime,
                            sensor=r.sensor_id)
            else:
                await self._deprovision(change)
        await self.flush()

    def _deprovision_after(self, serial: int) -> int:
        """The silent sensor's profile's `deprovision_after`. Asked for each silent sensor
        every tick: its profile is looked up in the registry once, then remembered."""
        profile_name = self._profiles.get(serial)
        if profile_name is None:
            silent = self.table.silent.get(serial)
            try:
                sensor = self.registry.store.get(silent.sensor_id) if silent else None
            except DevidError:
                return 1  # removed meanwhile: nothing left to keep
            if sensor is None:
                return 1
            profile_name = self._profiles[serial] = sensor.profile
        profile = self._policy.policy.profiles.get(profile_name)
        return profile.lwm2m.deprovision_after if profile and profile.lwm2m else 0

    async def _deprovision(self, change: Deprovision) -> None:
        silent = change.silent
        self._profiles.pop(silent.serial, None)
        reason = f"LwM2M: no Update for {change.missed} lifetimes of {silent.lifetime} s"
        try:
            sensor = await asyncio.to_thread(self.registry.store.get, silent.sensor_id)
        except DevidError:
            return  # removed meanwhile
        if sensor.status != "active":
            return  # quarantined or revoked by hand: an operator decides
        await self.registry.change({"sensor": sensor.id, "change": "revoke",
                                     "reason": reason})
        self.totals["deprovisioned"] += 1
        events.emit(log, "sensor-deprovisioned", "sensor %s deprovisioned: %s; onboard it "
                    "again to use it", sensor.name, reason, sensor=sensor.id, reason=reason)

    async def flush(self) -> None:
        changed, self.table.changed = self.table.changed, set()
        if changed:
            try:
                await asyncio.to_thread(self.store.save, self.table, sorted(changed))
            except Exception as e:  # a full disk must not stop the listeners
                self.table.changed |= changed
                log.error("cannot save LwM2M registrations (kept for the next try): %s", e)

    # --- what others see -----------------------------------------------------------------

    def registration_of(self, sensor: Sensor) -> dict[str, Any] | None:
        registration = self.table.of(sensor.serial)
        firmware = self.firmware.get(sensor.serial)
        extra = {"firmware": firmware} if firmware is not None else {}
        if registration is not None:
            # How the upstream LwM2M server knows it: /25/INSTANCE, /PREFIX/...
            gateway = {"instance": registration.serial, "prefix": prefix_of(registration)}
            return {"state": "registered", **registration.to_dict(), "gateway": gateway,
                    **extra}
        silent = self.table.silent.get(sensor.serial)
        if silent is not None:
            return {"state": "offline", "endpoint": silent.endpoint,
                    "last_update": silent.last_update, "lifetime": silent.lifetime,
                    "missed_lifetimes": silent.missed(self._clock()), **extra}
        return {"state": "not registered", **extra} if extra else None

    def firmware_version(self, sensor: Sensor) -> str | None:
        """The firmware version the sensor reported after its last successful update (a
        failed one keeps the version it still runs)."""
        job = self.firmware.get(sensor.serial)
        return str(job["version"]) if job and job.get("version") is not None else None

    def firmware_started(self, sensor: Sensor, job: dict[str, Any]) -> None:
        """A firmware job (firmware.py) began: shown as it goes, with the version the
        sensor runs until it reports a new one."""
        previous = self.firmware.get(sensor.serial)
        if previous is not None and previous.get("version") is not None:
            job["version"] = previous["version"]
        self.firmware[sensor.serial] = job

    def firmware_done(self, sensor: Sensor, job: dict[str, Any]) -> None:
        """A firmware job ended: kept in lwm2m.db, and shown from now on."""
        self.firmware[sensor.serial] = job
        try:
            self.store.save_firmware(sensor.serial, job)
        except Exception as e:  # shown in memory still; the journal says why not kept
            log.error("cannot save sensor %s's firmware record: %s", sensor.name, e)

    def status_section(self) -> dict[str, Any]:
        return {"registered": len(self.table), "offline": len(self.table.silent),
                "totals": dict(sorted(self.totals.items()))}


def code_text(code: Code) -> str:
    """A CoAP code as devidctl and the audit log show it: "2.05"."""
    return f"{int(code) >> 5}.{int(code) & 31:02d}"


def _answer_doc(operation: str, path: tuple[int, ...], response: Message) -> dict[str, Any]:
    """A sensor's answer as devidctl shows it: its code, and decoded what it carries."""
    doc: dict[str, Any] = {"code": code_text(response.code)}
    fmt = response.opt.content_format
    if fmt is not None:
        doc["content_format"] = int(fmt)
    if not response.code.is_successful():
        doc["error"] = response.payload.decode("utf-8", "replace")[:200]
    elif operation == "read":
        doc["values"] = [v.to_dict() for v in decode(
            None if fmt is None else int(fmt), response.payload, path)]
    elif operation == "discover":
        doc["links"] = [{"target": link.target, "params": link.params}
                        for link in parse_links(response.payload)]
    return doc


def lwm2m_section(policy: PolicyHolder, sensor: Sensor) -> Lwm2mSection:
    """The sensor's profile's LwM2M section; Lwm2mForbidden when it has none."""
    profile = policy.policy.profiles.get(sensor.profile)
    if profile is None or profile.lwm2m is None:
        raise Lwm2mForbidden(f"profile {sensor.profile} does not allow LwM2M (no "
                             "[profiles.NAME.lwm2m] section)")
    return profile.lwm2m


def _link_format(request: Message) -> None:
    fmt = request.opt.content_format
    if fmt is not None and int(fmt) != LINK_FORMAT and fmt != ContentFormat.LINKFORMAT:
        raise Lwm2mError(f"Content-Format {int(fmt)}: a registration's payload is link "
                         f"format ({LINK_FORMAT})")


def _lifetime_allowed(params: Params, section: Lwm2mSection) -> None:
    lifetime = params.lifetime
    if lifetime is not None and not section.min_lifetime <= lifetime <= section.max_lifetime:
        raise Lwm2mError(f"lifetime {lifetime} s: this sensor's profile allows "
                         f"{section.min_lifetime} to {section.max_lifetime} s")
