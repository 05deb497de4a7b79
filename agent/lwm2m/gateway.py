"""The LwM2M Gateway object (/25, OMA registry 25.xml, version 2.0) as the gateway shows
its sensors to an upstream LwM2M server: pure.

Each registered sensor is one instance of /25:
- 0 Device ID: the sensor's ID (urn:devid:sensor:...);
- 1 Prefix: the path segment under which the upstream server reaches the
  sensor's objects (/PREFIX/3303/0/5700);
- 3 IoT Device Objects: the sensor's objects as link format under that
  prefix (`</m-7/3/0>,</m-7/3303/0>`).

The instance ID is the sensor's serial (stable across restarts and never
reused, as serials are not); the prefix is its endpoint name where that is a
plain path segment, else `_` and its serial. `route` maps an upstream path
back to the sensor and the path on it; `operation_of` says which grant an
upstream request needs, `read_objects` answers Reads of the gateway's own
objects (/1, /3 and /25), and `reprefix_senml` moves SenML names between the
sensor's paths and the upstream's (/PREFIX/...). The edge that registers with
the upstream server and relays operations is agent/broker/lwm2mupstream.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

import cbor2

from agent.errors import Lwm2mError, Lwm2mNotAcceptable, Lwm2mNotFound
from agent.lwm2m.content import (
    SENML_CBOR,
    SENML_JSON,
    TEXT,
    TLV,
    TLV_10,
    Resource,
    encode_senml_json,
    encode_tlv,
    encode_tlv_instances,
)
from agent.lwm2m.registration import MAX_ID, Registration

OBJECT = 25
VERSION = "2.0"
DEVICE_ID, PREFIX, IOT_DEVICE_OBJECTS = 0, 1, 3
_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class GatewayInstance:
    instance: int
    device_id: str
    prefix: str
    objects: str  # link format, under the prefix

    def resources(self) -> dict[int, str]:
        return {DEVICE_ID: self.device_id, PREFIX: self.prefix,
                IOT_DEVICE_OBJECTS: self.objects}


def prefix_of(registration: Registration) -> str:
    """A plain endpoint name (a letter, then letters, digits, - and _) is the prefix;
    anything else would need escaping in a path, so `_` and the serial, which no plain
    name can be (endpoint names are unique per sensor: so are prefixes)."""
    endpoint = registration.endpoint
    return endpoint if _PLAIN.match(endpoint) else f"_{registration.serial}"


class GatewayObject:
    """/25 for the registrations of a moment: its instances, what the gateway registers
    upstream, and the way from an upstream path to a sensor (by prefix, in a dict)."""

    def __init__(self, registrations: Iterable[Registration]) -> None:
        self.instances: list[GatewayInstance] = []
        for registration in sorted(registrations, key=lambda r: r.serial):
            if registration.serial > MAX_ID:
                continue  # no instance ID for it (a registry past 65,534 sensors)
            prefix = prefix_of(registration)
            links = []
            for obj, ids in registration.objects.items():
                links += [f"</{prefix}/{obj}/{i}>" for i in ids] if ids else \
                    [f"</{prefix}/{obj}>"]
            self.instances.append(GatewayInstance(registration.serial,
                                                  registration.sensor_id, prefix,
                                                  ",".join(links)))
        self._by_prefix = {g.prefix: g for g in self.instances}

    def objects(self) -> dict[int, dict[int, Resource]]:
        """/25's instances and their resources, for a Read."""
        return {g.instance: dict(g.resources()) for g in self.instances}

    def registration_payload(self, own: Iterable[tuple[int, int]]) -> bytes:
        """What the gateway registers upstream: its own object instances, then /25 and one
        instance per sensor (LwM2M 1.2: the sensors' objects are read from /25/N/3, not
        listed here)."""
        links = ['</>;rt="oma.lwm2m";ct=11543']
        links += [f"</{obj}/{inst}>" for obj, inst in own]
        links.append(f"</{OBJECT}>;ver={VERSION}")
        links += [f"</{OBJECT}/{g.instance}>" for g in self.instances]
        return ",".join(links).encode("ascii")

    def route(self, path: tuple[str, ...]) -> tuple[int, tuple[int, ...]] | None:
        """(sensor serial, path on the sensor) for an upstream request to /PREFIX/...; None
        when the first segment is no sensor's prefix or the rest is not an LwM2M path."""
        if not 2 <= len(path) <= 5:
            return None
        instance = self._by_prefix.get(path[0])
        rest = path[1:]
        if instance is None or not all(
                s.isdigit() and (s == "0" or not s.startswith("0")) and int(s) <= MAX_ID
                for s in rest):
            return None
        return instance.instance, tuple(int(s) for s in rest)


Objects = dict[int, dict[int, dict[int, Resource]]]  # object -> instance -> resource -> value
LINK_FORMAT = 40
_GET, _POST, _PUT = 1, 2, 3


def read_objects(objects: Objects, path: tuple[int, ...], accept: int | None
                 ) -> tuple[int, bytes]:
    """(Content-Format, payload) answering a Read of `path` on the gateway's own objects:
    a resource as text (or TLV, or SenML JSON, when asked), an instance or an object as
    TLV (or SenML JSON). Lwm2mNotFound for what is not there, Lwm2mError (4.06) for a
    format it does not speak."""
    if accept is not None and accept not in (TEXT, TLV, TLV_10, SENML_JSON):
        raise Lwm2mNotAcceptable(f"Accept {accept}: the gateway's objects answer in text "
                                 "(0), TLV (11542) or SenML JSON (110)")
    where = "/" + "/".join(map(str, path))
    instances = objects.get(path[0]) if path else None
    if instances is None or len(path) > 3:
        raise Lwm2mNotFound(f"{where}: no such object on the gateway")
    if len(path) == 1:
        if accept == SENML_JSON:
            return SENML_JSON, encode_senml_json(f"/{path[0]}/", {
                f"{i}/{r}": v for i, rs in instances.items() for r, v in rs.items()})
        return TLV, encode_tlv_instances(instances)
    resources = instances.get(path[1])
    if resources is None:
        raise Lwm2mNotFound(f"{where}: no such instance on the gateway")
    if len(path) == 2:
        if accept == SENML_JSON:
            return SENML_JSON, encode_senml_json(f"{where}/", {
                str(r): v for r, v in resources.items()})
        return TLV, encode_tlv(resources)
    if path[2] not in resources:
        raise Lwm2mNotFound(f"{where}: no such resource on the gateway")
    value = resources[path[2]]
    if accept in (TLV, TLV_10):
        return TLV, encode_tlv({path[2]: value})
    if accept == SENML_JSON:
        return SENML_JSON, encode_senml_json(where, {"": value})
    text = value.hex() if isinstance(value, bytes) else \
        str(value).lower() if isinstance(value, bool) else str(value)
    return TEXT, text.encode("utf-8")


def discover_objects(objects: Objects, path: tuple[int, ...]) -> bytes:
    """Discover (link format) of an object or an instance of the gateway's own."""
    where = "/" + "/".join(map(str, path))
    instances = objects.get(path[0]) if path else None
    if instances is None or len(path) > 2 or (len(path) == 2 and path[1] not in instances):
        raise Lwm2mNotFound(f"{where}: no such object or instance on the gateway")
    links = [f"</{path[0]}>" + (f";ver={VERSION}" if path[0] == OBJECT else "")] \
        if len(path) == 1 else []
    for inst, resources in instances.items():
        if len(path) == 2 and inst != path[1]:
            continue
        links.append(f"</{path[0]}/{inst}>")
        links += [f"</{path[0]}/{inst}/{r}>" for r in resources]
    return ",".join(links).encode("ascii")


def operation_of(method: int, path: tuple[int, ...], accept: int | None,
                 observe: int | None) -> str | None:
    """The grant an upstream request on a sensor's `path` needs (LwM2M 1.2, 6.3-6.4):
    read, discover, observe, write or execute; None for what the gateway does not relay
    (Create, Delete, composite operations)."""
    if method == _GET:
        if accept == LINK_FORMAT:
            return "discover"
        return "observe" if observe == 0 else "read"
    if method == _PUT:
        return "write"
    if method == _POST:
        return "execute" if len(path) == 3 else "write" if len(path) == 2 else None
    return None


def reprefix_senml(content_format: int | None, payload: bytes, prefix: str,
                   outward: bool) -> bytes:
    """SenML names carry paths: a sensor's answer names /3303/0/5700, the upstream knows
    it as /PREFIX/3303/0/5700. `outward` adds the prefix (to an answer or notification);
    otherwise it is taken off (from a Write). Other formats carry no paths and pass as
    they are. Lwm2mError when the SenML is not what it says."""
    if content_format not in (SENML_JSON, SENML_CBOR) or not payload:
        return payload
    try:
        records = json.loads(payload) if content_format == SENML_JSON else \
            cbor2.loads(payload)
    except (ValueError, cbor2.CBORDecodeError):
        raise Lwm2mError(f"SenML ({content_format}): not decodable") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise Lwm2mError(f"SenML ({content_format}): expected an array of records")
    base_key: str | int = "bn" if content_format == SENML_JSON else -2
    name_key: str | int = "n" if content_format == SENML_JSON else 0
    mark = f"/{prefix}"
    for index, record in enumerate(records):
        for key in (base_key, name_key):
            value = record.get(key)
            if not isinstance(value, str) or not value.startswith("/"):
                continue
            if outward:
                record[key] = mark + value
            elif value.startswith(mark + "/"):
                record[key] = value[len(mark):]
            else:
                raise Lwm2mError(f"SenML record {index}: {value[:40]!r} is not under "
                                 f"{mark}/")
            break  # a base name carries the path: the name below it is relative
    return json.dumps(records, separators=(",", ":")).encode() \
        if content_format == SENML_JSON else cbor2.dumps(records)
