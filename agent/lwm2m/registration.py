"""The LwM2M Registration interface's state (LwM2M 1.1/1.2 Transport, 6.2.1): pure.

    POST   /rd?ep=NAME&lt=300&lwm2m=1.1&b=U   </1/0>,</3/0>   -> 2.01, Location /rd/LOC
    POST   /rd/LOC?lt=600                     (objects)       -> 2.04
    DELETE /rd/LOC                                            -> 2.02

`parse_register` and `parse_update` turn a request's query and payload into
parameters or an Lwm2mError saying what was wrong (the edge answers 4.00),
before anything changes. `Registrations` holds who is registered; it is fed
authenticated sensors and the time, and says which registrations expired
(the sensor is offline) and which sensors stayed silent for so many
lifetimes that they are to be deprovisioned.

A registration belongs to the sensor whose credential made it: Update and
De-register from another sensor get 4.04, exactly as for a location that
does not exist, so one sensor cannot probe another's.
"""

from __future__ import annotations

import heapq
import math
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agent.errors import Lwm2mError, Lwm2mForbidden, Lwm2mNotFound
from agent.lwm2m.linkformat import parse_links

DEFAULT_LIFETIME = 86400  # seconds, when a Register names none (LwM2M 1.1, 6.2.1)
MAX_LIFETIME = 2**31 - 1
VERSIONS = ("1.0", "1.1", "1.2")
MAX_ID = 65534  # object and instance IDs; 65535 is reserved (MAX_ID in LwM2M)
MAX_ENDPOINT = 64
_ENDPOINT = re.compile(r"^[A-Za-z0-9._:~-]+$")
_NUMBER = re.compile(r"^(0|[1-9][0-9]{0,9})$")
_VERSION = re.compile(r"^[0-9]\.[0-9]$")
# Binding letters: U(DP), M (MQTT, 1.2), H(TTP, 1.2), T(CP), S(MS), N(on-IP); Q is 1.0's queue.
_BINDING = re.compile(r"^(?!.*(.).*\1)[UMHTSNQ]{1,7}$")
REGISTER_PARAMS = ("ep", "lt", "lwm2m", "b", "Q", "sms")
# "lwm2m" is not an Update parameter, but clients send it (lwm2m-node-lib does): taken
# when it names the registered version.
UPDATE_PARAMS = ("lt", "b", "Q", "sms", "lwm2m")
NOT_REGISTERED = (0, 21)  # Security and OSCORE objects: never in a registration (6.2.1)


@dataclass(frozen=True)
class Params:
    endpoint: str | None
    lifetime: int | None
    version: str | None
    binding: str | None
    queue: bool | None
    objects: dict[int, tuple[int, ...]] | None  # object ID -> instance IDs; None: unchanged
    versions: dict[int, str] = field(default_factory=dict)  # object ID -> its "ver"
    root: str = "/"


def parse_register(query: Sequence[str], payload: bytes) -> Params:
    params = _query(query, REGISTER_PARAMS, "Register")
    endpoint = _endpoint(params, "Register")
    version = params.get("lwm2m", "1.0")
    if version not in VERSIONS:
        raise Lwm2mError(f"Register: LwM2M version {version!r} is not one of "
                         f"{', '.join(VERSIONS)}")
    objects, versions, root = _objects(payload, "Register")
    binding = _binding(params.get("b", "U"), version)
    return Params(endpoint, _lifetime(params.get("lt"), "Register") or DEFAULT_LIFETIME,
                  version, binding, _queue(params, binding, version), objects or {},
                  versions, root)


def parse_bootstrap_request(query: Sequence[str]) -> str:
    """The endpoint name of a Bootstrap-Request (POST /bs?ep=NAME[&pct=FORMAT])."""
    return _endpoint(_query(query, ("ep", "pct"), "Bootstrap-Request"), "Bootstrap-Request")


def parse_update(query: Sequence[str], payload: bytes, registered: str = "1.1") -> Params:
    """An Update's parameters, read by the rules of the `registered` LwM2M version (1.0
    says queue mode in the binding, b=UQ; 1.1 on in the Q parameter)."""
    params = _query(query, UPDATE_PARAMS, "Update")
    binding = _binding(params["b"], registered) if "b" in params else None
    queue: bool | None = None
    if "Q" in params:
        queue = _queue(params, binding or "", registered)
    elif binding is not None and registered == "1.0":
        queue = "Q" in binding
    objects, versions, root = _objects(payload, "Update") if payload else (None, {}, "/")
    return Params(None, _lifetime(params.get("lt"), "Update"), params.get("lwm2m"), binding,
                  queue, objects, versions, root)


def _query(query: Sequence[str], known: tuple[str, ...], operation: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in query:
        name, has_value, value = item.partition("=")
        if name not in known:
            raise Lwm2mError(f"{operation}: unknown parameter {name[:32]!r} (known: "
                             f"{', '.join(known)})")
        if name in out:
            raise Lwm2mError(f"{operation}: parameter {name!r} given twice")
        if name == "Q":
            if has_value:
                raise Lwm2mError(f"{operation}: Q takes no value")
        elif not value:
            raise Lwm2mError(f"{operation}: parameter {name!r} has no value")
        out[name] = value
    return out


def _endpoint(params: dict[str, str], operation: str) -> str:
    endpoint = params.get("ep")
    if endpoint is None:
        raise Lwm2mError(f"{operation}: the endpoint name (ep) is missing")
    if len(endpoint) > MAX_ENDPOINT or not _ENDPOINT.match(endpoint):
        raise Lwm2mError(f"{operation}: endpoint name {endpoint[:MAX_ENDPOINT]!r} is not 1 "
                         f"to {MAX_ENDPOINT} letters, digits or ._:~-")
    return endpoint


def _lifetime(text: str | None, operation: str) -> int | None:
    if text is None:
        return None
    if not _NUMBER.match(text) or not 1 <= int(text) <= MAX_LIFETIME:
        raise Lwm2mError(f"{operation}: lifetime (lt) {text[:16]!r} is not a number of "
                         f"seconds from 1 to {MAX_LIFETIME}")
    return int(text)


def _binding(text: str, version: str) -> str:
    if not _BINDING.match(text):
        raise Lwm2mError(f"binding (b) {text[:16]!r} is not a set of the letters UMHTSN"
                         "(Q), each once")
    if "Q" in text and version != "1.0":
        raise Lwm2mError("binding (b) with Q: from LwM2M 1.1 on, queue mode is the Q "
                         "parameter")
    return text


def _queue(params: dict[str, str], binding: str, version: str) -> bool:
    if "Q" in params and version == "1.0":
        raise Lwm2mError("Q parameter: LwM2M 1.0 says queue mode in the binding (b=UQ)")
    return "Q" in params or "Q" in binding


def _objects(payload: bytes, operation: str
             ) -> tuple[dict[int, tuple[int, ...]], dict[int, str], str]:
    """Objects and instances from the payload's links, under the alternate root path a
    link with rt="oma.lwm2m" may name."""
    links = parse_links(payload)
    roots = [link for link in links if link.params.get("rt") == "oma.lwm2m"]
    if len(roots) > 1:
        raise Lwm2mError(f"{operation}: more than one link with rt=\"oma.lwm2m\"")
    root = roots[0].target.rstrip("/") if roots else ""
    if root and not re.fullmatch(r"/[A-Za-z0-9._~-]{1,64}", root):
        raise Lwm2mError(f"{operation}: alternate path {roots[0].target[:64]!r} is not one "
                         "segment")
    objects: dict[int, set[int]] = {}
    versions: dict[int, str] = {}
    for link in links:
        if roots and link is roots[0]:
            continue
        target = link.target
        if not target.startswith(root + "/"):
            raise Lwm2mError(f"{operation}: link <{target[:64]}> is outside the alternate "
                             f"path {root or '/'}")
        segments = target[len(root) + 1:].split("/")
        if len(segments) > 2:
            raise Lwm2mError(f"{operation}: link <{target[:64]}> is deeper than "
                             "/object/instance")
        ids = []
        for segment in segments:
            if not _NUMBER.match(segment) or int(segment) > MAX_ID:
                raise Lwm2mError(f"{operation}: link <{target[:64]}>: {segment[:12]!r} is "
                                 f"not an ID from 0 to {MAX_ID}")
            ids.append(int(segment))
        obj = ids[0]
        if obj in NOT_REGISTERED:
            continue  # LwM2M 1.1 forbids them here; 1.0 clients send them: left out
        instances = objects.setdefault(obj, set())
        if len(ids) == 2:
            if ids[1] in instances:
                raise Lwm2mError(f"{operation}: link <{target[:64]}> is listed twice")
            instances.add(ids[1])
        ver = link.params.get("ver")
        if ver is not None:
            if not _VERSION.match(ver):
                raise Lwm2mError(f"{operation}: link <{target[:64]}>: ver={ver[:12]!r} is not "
                                 "MAJOR.MINOR")
            versions[obj] = ver
    return {obj: tuple(sorted(ids)) for obj, ids in sorted(objects.items())}, versions, \
        root or "/"


_SHARED: dict[object, object] = {}  # equal object lists and versions: one copy for all
_SHARED_MAX = 4096


def shared(value: Any) -> Any:
    """One copy of equal values (a fleet of one model registers the same objects): 10,000
    registrations of one model keep one object list, not 10,000."""
    key = repr(value)
    found = _SHARED.get(key)
    if found is not None:
        return found
    if len(_SHARED) >= _SHARED_MAX:
        _SHARED.clear()  # many models: copies again, until the next ones are shared
    _SHARED[key] = value
    return value


@dataclass(frozen=True, slots=True)
class Registration:
    serial: int  # the sensor's
    sensor_id: str
    endpoint: str
    location: str  # the last Location-Path segment: /rd/LOCATION
    lifetime: int
    version: str
    binding: str
    queue: bool
    objects: dict[int, tuple[int, ...]]
    versions: dict[int, str]
    root: str
    registered_at: float
    updated_at: float

    @property
    def expires_at(self) -> float:
        return self.updated_at + self.lifetime

    def to_dict(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "location": f"/rd/{self.location}",
                "lifetime": self.lifetime, "lwm2m": self.version, "binding": self.binding,
                "queue": self.queue, "root": self.root,
                "objects": {str(o): list(i) for o, i in self.objects.items()},
                "object_versions": {str(o): v for o, v in self.versions.items()},
                "registered_at": self.registered_at, "updated_at": self.updated_at}


@dataclass(frozen=True, slots=True)
class Silent:
    """A sensor whose registration expired: since when, for how long each lifetime."""

    serial: int
    sensor_id: str
    endpoint: str
    last_update: float
    lifetime: int

    def missed(self, now: float) -> int:
        return max(0, math.floor((now - self.last_update) / self.lifetime))


@dataclass(frozen=True)
class Expired:
    registration: Registration  # removed; its sensor is offline


@dataclass(frozen=True)
class Deprovision:
    silent: Silent
    missed: int


class Registrations:
    """Who is registered. Every change is also queued in `changed` (serials) for the
    edge to persist; `load` puts back what was persisted."""

    def __init__(self, new_location: Callable[[], str] = lambda: secrets.token_hex(4)) -> None:
        self._new_location = new_location
        self._by_serial: dict[int, Registration] = {}
        self._by_location: dict[str, Registration] = {}
        self._by_endpoint: dict[str, int] = {}  # endpoint name -> the serial registered
        self.silent: dict[int, Silent] = {}
        self._deadlines: list[tuple[float, int, str]] = []  # (when, serial, location)
        self.changed: set[int] = set()
        # Counts changes to who is registered and with which objects (not lifetimes):
        # what the gateway shows upstream (/25) is rebuilt when it moves.
        self.generation = 0

    def __len__(self) -> int:
        return len(self._by_serial)

    def of(self, serial: int) -> Registration | None:
        return self._by_serial.get(serial)

    def at(self, location: str) -> Registration | None:
        """The registration at /rd/LOCATION, whoever's it is."""
        return self._by_location.get(location)

    def all(self) -> Iterable[Registration]:
        return self._by_serial.values()

    def load(self, registrations: Iterable[Registration], silent: Iterable[Silent]) -> None:
        for registration in registrations:
            self._put(registration)
        for entry in silent:
            self.silent[entry.serial] = entry
        self.changed.clear()

    def register(self, serial: int, sensor_id: str, bound_endpoint: str, params: Params,
                 now: float) -> Registration:
        """A new registration; it replaces the sensor's current one (a client that
        restarts registers again). Lwm2mForbidden for another endpoint name."""
        assert params.endpoint is not None
        if params.endpoint != bound_endpoint:
            raise Lwm2mForbidden(f"Register: endpoint name {params.endpoint!r} is not this "
                                 f"sensor's ({bound_endpoint!r})")
        holder = self._by_endpoint.get(params.endpoint)
        if holder is not None and holder != serial:
            raise Lwm2mForbidden(f"Register: endpoint name {params.endpoint!r} is registered "
                                 "by another sensor (two sensors bound to one name: give "
                                 "one an endpoint attribute of its own)")
        old = self._by_serial.get(serial)
        if old is not None:
            del self._by_location[old.location]
            self._by_endpoint.pop(old.endpoint, None)
        location = self._new_location()
        while location in self._by_location:
            location = self._new_location()
        assert params.lifetime is not None and params.version is not None
        assert params.binding is not None and params.objects is not None
        registration = Registration(serial, sensor_id, params.endpoint, location,
                                    params.lifetime, params.version, params.binding,
                                    bool(params.queue), shared(params.objects),
                                    shared(params.versions), params.root, now, now)
        self._put(registration)
        self.silent.pop(serial, None)
        self.changed.add(serial)
        self.generation += 1
        return registration

    def update(self, serial: int, location: str, params: Params, now: float) -> Registration:
        current = self._mine(serial, location, "Update")
        if params.version is not None and params.version != current.version:
            raise Lwm2mError(f"Update: LwM2M version {params.version[:8]!r} is not the "
                             f"registered {current.version}; register again to change it")
        changes: dict[str, Any] = {"updated_at": now}
        if params.lifetime is not None:
            changes["lifetime"] = params.lifetime
        if params.binding is not None:
            changes["binding"] = params.binding
        if params.queue is not None:
            changes["queue"] = params.queue
        if params.objects is not None:
            changes.update(objects=shared(params.objects), versions=shared(params.versions),
                           root=params.root)
            self.generation += params.objects != current.objects
        registration = replace(current, **changes)
        self._put(registration)
        self.changed.add(serial)
        return registration

    def deregister(self, serial: int, location: str) -> Registration:
        current = self._mine(serial, location, "De-register")
        del self._by_serial[serial], self._by_location[location]
        self._by_endpoint.pop(current.endpoint, None)
        self.changed.add(serial)
        self.generation += 1
        return current

    def forget(self, serial: int) -> None:
        """The sensor is gone (removed, revoked, deprovisioned): nothing of it is kept."""
        current = self._by_serial.pop(serial, None)
        if current is not None:
            del self._by_location[current.location]
            self._by_endpoint.pop(current.endpoint, None)
            self.generation += 1
        if current is not None or self.silent.pop(serial, None) is not None:
            self.changed.add(serial)

    def _mine(self, serial: int, location: str, operation: str) -> Registration:
        current = self._by_location.get(location)
        if current is None or current.serial != serial:
            raise Lwm2mNotFound(f"{operation}: no registration /rd/{location[:32]} of this "
                                "sensor (it expired or was never made): register again")
        return current

    def _put(self, registration: Registration) -> None:
        self._by_serial[registration.serial] = registration
        self._by_location[registration.location] = registration
        self._by_endpoint[registration.endpoint] = registration.serial
        heapq.heappush(self._deadlines, (registration.expires_at, registration.serial,
                                         registration.location))

    def expire(self, now: float, deprovision_after: Callable[[int], int]
               ) -> list[Expired | Deprovision]:
        """What the passing of time did: registrations whose lifetime ran out (removed;
        the sensor is silent from then on), and silent sensors that have now missed
        `deprovision_after(serial)` lifetimes (0: never). Work is proportional to what
        expired, plus one look at each silent sensor."""
        out: list[Expired | Deprovision] = []
        while self._deadlines and self._deadlines[0][0] < now:
            _, serial, location = heapq.heappop(self._deadlines)
            current = self._by_serial.get(serial)
            if current is None or current.location != location or current.expires_at >= now:
                continue  # superseded by an Update or a new registration
            del self._by_serial[serial], self._by_location[location]
            self._by_endpoint.pop(current.endpoint, None)
            self.silent[serial] = Silent(serial, current.sensor_id, current.endpoint,
                                         current.updated_at, current.lifetime)
            self.changed.add(serial)
            self.generation += 1
            out.append(Expired(current))
        for serial, entry in list(self.silent.items()):
            limit = deprovision_after(serial)
            missed = entry.missed(now)
            if limit > 0 and missed >= limit:
                del self.silent[serial]
                self.changed.add(serial)
                out.append(Deprovision(entry, missed))
        return out
