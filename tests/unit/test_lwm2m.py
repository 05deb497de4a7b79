"""LwM2M pure cores: link format (RFC 6690) and the Registration interface's state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import struct
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.broker.firmware import FirmwareUpdates
from agent.broker.lwm2m import Lwm2mServer
from agent.broker.lwm2mstore import Lwm2mStore
from agent.errors import ConfigError, Lwm2mError, Lwm2mForbidden, Lwm2mNotFound
from agent.lwm2m.content import (
    SENML_CBOR,
    SENML_JSON,
    TEXT,
    TLV,
    ContentError,
    decode,
    encode_tlv,
    parse_path,
)
from agent.lwm2m.gateway import (
    GatewayObject,
    discover_objects,
    operation_of,
    read_objects,
    reprefix_senml,
)
from agent.lwm2m.linkformat import MAX_LINKS, LinkFormatError, parse_links
from agent.lwm2m.registration import (
    DEFAULT_LIFETIME,
    Deprovision,
    Expired,
    Registrations,
    parse_bootstrap_request,
    parse_register,
    parse_update,
)
from agent.policy.model import parse_policy

LESHAN_STYLE = b'</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>,</3303/0>;ver=1.1,</3303/1>,</5>'


def test_links_with_parameters_in_order() -> None:
    links = parse_links(LESHAN_STYLE)
    assert [link.target for link in links] == ["/", "/1/0", "/3/0", "/3303/0", "/3303/1", "/5"]
    assert links[0].params == {"rt": "oma.lwm2m", "ct": "11543"}
    assert links[3].params == {"ver": "1.1"}
    assert parse_links(b"") == []
    assert parse_links(b'</a>;title="x\\"y";obs').pop().params == {"title": 'x"y', "obs": None}


@pytest.mark.parametrize(("data", "offset", "what"), [
    (b"</1/0", 5, "expected '>'"),
    (b"</1/0>;", 7, "expected a parameter name"),
    (b"</1>,", 5, "expected '<'"),
    (b"</1>;ct=1;ct=2", 10, "'ct' twice"),
    (b'</1>;rt="abc', 8, "does not end"),
    (b"</1> ,</2>", 4, "expected ',' or the end"),
    (b"</1>;ct=", 8, "expected a value"),
    (b"</1\x00>", 3, "in a link target"),
    (b"</\xff>", 2, "not ASCII"),
])
def test_bad_link_format_says_what_and_where(data: bytes, offset: int, what: str) -> None:
    with pytest.raises(LinkFormatError) as caught:
        parse_links(data)
    assert caught.value.offset == offset and what in caught.value.message
    assert f"byte {offset}" in caught.value.message


def test_link_format_limits() -> None:
    with pytest.raises(LinkFormatError, match="more than 1024 links"):
        parse_links(b",".join(b"</%d>" % i for i in range(MAX_LINKS + 1)))
    with pytest.raises(LinkFormatError, match="more than the 8192"):
        parse_links(b"</1>" + b";a" * 5000)
    with pytest.raises(LinkFormatError, match="more than 16 parameters"):
        parse_links(b"</1>" + b"".join(b";p%d" % i for i in range(17)))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300) | st.text(alphabet='</>;=",0123abrt\\ ', max_size=80)
       .map(str.encode))
def test_link_format_fuzz_only_ever_refuses_cleanly(data: bytes) -> None:
    try:
        parse_links(data)
    except LinkFormatError as e:
        assert 0 <= e.offset <= len(data)
    with contextlib.suppress(Lwm2mError):
        parse_register(["ep=s-1"], data)


def test_register_parameters_and_objects() -> None:
    params = parse_register(["ep=meter-7", "lt=300", "lwm2m=1.1", "b=U", "Q"], LESHAN_STYLE)
    assert (params.endpoint, params.lifetime, params.version, params.binding, params.queue) \
        == ("meter-7", 300, "1.1", "U", True)
    assert params.objects == {1: (0,), 3: (0,), 3303: (0, 1), 5: ()}
    assert params.versions == {3303: "1.1"}
    defaults = parse_register(["ep=meter-7"], b"</1/0>,</0/0>,</21/0>")
    assert (defaults.lifetime, defaults.version, defaults.binding, defaults.queue) == \
        (DEFAULT_LIFETIME, "1.0", "U", False)
    assert defaults.objects == {1: (0,)}  # Security and OSCORE are never registered
    assert parse_register(["ep=x", "b=UQ"], b"").queue is True  # 1.0's queue mode
    rooted = parse_register(["ep=x"], b'</lwm2m>;rt="oma.lwm2m",</lwm2m/3/0>')
    assert rooted.root == "/lwm2m" and rooted.objects == {3: (0,)}


@pytest.mark.parametrize(("query", "payload", "what"), [
    ([], b"", "endpoint name (ep) is missing"),
    (["ep=a b"], b"", "is not 1 to 64"),
    (["ep=" + "x" * 65], b"", "is not 1 to 64"),
    (["ep=x", "lt=0"], b"", "lifetime (lt) '0'"),
    (["ep=x", "lt=-5"], b"", "lifetime (lt) '-5'"),
    (["ep=x", "lt=007"], b"", "lifetime (lt) '007'"),
    (["ep=x", "lwm2m=2.0"], b"", "version '2.0'"),
    (["ep=x", "b=UU"], b"", "binding (b) 'UU'"),
    (["ep=x", "b=UQ", "lwm2m=1.1"], b"", "queue mode is the Q parameter"),
    (["ep=x", "Q"], b"", "LwM2M 1.0 says queue mode"),
    (["ep=x", "ep=y"], b"", "given twice"),
    (["ep=x", "evil=1"], b"", "unknown parameter 'evil'"),
    (["ep=x"], b"</3/0/1>", "deeper than /object/instance"),
    (["ep=x"], b"</3/00>", "is not an ID"),
    (["ep=x"], b"</65535>", "is not an ID"),
    (["ep=x"], b"</3/0>,</3/0>", "listed twice"),
    (["ep=x"], b'</a>;rt="oma.lwm2m",</3/0>', "outside the alternate path"),
    (["ep=x"], b"</3>;ver=one", "is not MAJOR.MINOR"),
    (["ep=x"], b"</3", "link format, byte 3"),
])
def test_bad_register_is_refused_naming_what(query: list[str], payload: bytes,
                                             what: str) -> None:
    with pytest.raises(Lwm2mError) as caught:
        parse_register(query, payload)
    assert what in caught.value.message, caught.value.message
    assert caught.value.coap_code == 0x80


def test_update_changes_only_what_it_names() -> None:
    assert parse_update([], b"").objects is None
    assert parse_update(["lt=60"], b"").lifetime == 60
    with pytest.raises(Lwm2mError, match="unknown parameter 'ep'"):
        parse_update(["ep=x"], b"")
    table = Registrations()
    reg = table.register(1, "s", "e", parse_register(["ep=e", "lwm2m=1.1"], b""), now=0.0)
    assert table.update(1, reg.location, parse_update(["lwm2m=1.1"], b""), 1.0).version \
        == "1.1"  # named again (lwm2m-node-lib does): taken
    with pytest.raises(Lwm2mError, match=r"not the registered 1\.1"):
        table.update(1, reg.location, parse_update(["lwm2m=1.0"], b""), 2.0)


def test_an_update_is_read_by_the_rules_of_the_registered_version() -> None:
    # 1.0: queue mode is in the binding; 1.1 on: in the Q parameter.
    assert parse_update(["b=UQ"], b"", "1.0").queue is True
    assert parse_update(["b=U"], b"", "1.0").queue is False
    with pytest.raises(Lwm2mError, match=r"Q parameter: LwM2M 1\.0"):
        parse_update(["Q"], b"", "1.0")
    with pytest.raises(Lwm2mError, match="binding \\(b\\) with Q"):
        parse_update(["b=UQ"], b"", "1.1")
    assert parse_update(["Q"], b"", "1.1").queue is True
    assert parse_update(["b=U"], b"", "1.1").queue is None  # unchanged


def _locations() -> object:
    counter = iter(range(1000))
    return lambda: f"l{next(counter)}"


def test_register_update_deregister() -> None:
    table = Registrations(_locations())  # type: ignore[arg-type]
    reg = table.register(1, "urn:s:1", "m-1", parse_register(["ep=m-1", "lt=60"], b"</3/0>"),
                         now=1000.0)
    assert reg.location == "l0" and reg.expires_at == 1060.0 and len(table) == 1
    assert table.changed == {1}
    updated = table.update(1, "l0", parse_update(["lt=120"], b"</3/0>,</4/0>"), now=1050.0)
    assert updated.lifetime == 120 and updated.objects == {3: (0,), 4: (0,)}
    assert updated.registered_at == 1000.0 and updated.updated_at == 1050.0
    again = table.register(1, "urn:s:1", "m-1", parse_register(["ep=m-1"], b""), now=1100.0)
    assert again.location == "l1" and len(table) == 1  # replaces the old one
    with pytest.raises(Lwm2mNotFound):
        table.update(1, "l0", parse_update([], b""), now=1101.0)
    table.deregister(1, "l1")
    assert len(table) == 0 and table.of(1) is None


def test_a_sensor_cannot_touch_another_sensors_registration() -> None:
    table = Registrations(_locations())  # type: ignore[arg-type]
    with pytest.raises(Lwm2mForbidden, match="'m-2' is not this sensor's"):
        table.register(1, "urn:s:1", "m-1", parse_register(["ep=m-2"], b""), now=0.0)
    assert len(table) == 0 and not table.changed
    table.register(2, "urn:s:2", "m-2", parse_register(["ep=m-2"], b""), now=0.0)
    for operation in (lambda: table.update(1, "l0", parse_update([], b""), now=1.0),
                      lambda: table.deregister(1, "l0")):
        with pytest.raises(Lwm2mNotFound):
            operation()
    assert table.of(2) is not None and table.of(2).updated_at == 0.0  # type: ignore[union-attr]
    # One endpoint name, one sensor: another sensor bound to the same name is refused.
    with pytest.raises(Lwm2mForbidden, match="registered by another sensor"):
        table.register(3, "urn:s:3", "m-2", parse_register(["ep=m-2"], b""), now=1.0)
    table.deregister(2, table.of(2).location)  # type: ignore[union-attr]
    assert table.register(3, "urn:s:3", "m-2", parse_register(["ep=m-2"], b""), 2.0).serial == 3


def test_lifetime_expiry_then_deprovisioning_after_missed_lifetimes() -> None:
    table = Registrations(_locations())  # type: ignore[arg-type]
    table.register(1, "urn:s:1", "a", parse_register(["ep=a", "lt=100"], b""), now=0.0)
    table.register(2, "urn:s:2", "b", parse_register(["ep=b", "lt=100"], b""), now=0.0)
    table.update(2, "l1", parse_update([], b""), now=90.0)  # b stays in time
    assert table.expire(100.0, lambda _s: 3) == []  # exactly at the deadline: still in time
    changes = table.expire(101.0, lambda _s: 3)
    assert [type(c) for c in changes] == [Expired] and changes[0].registration.serial == 1
    assert table.of(1) is None and 1 in table.silent and table.of(2) is not None
    # a has missed 2 lifetimes: not yet; b's lifetime ran out at 190.
    assert [(type(c), c.registration.serial) for c in table.expire(299.0, lambda _s: 3)
            if isinstance(c, Expired)] == [(Expired, 2)]
    later = table.expire(300.0, lambda s: 3 if s == 1 else 0)
    deprovisions = [c for c in later if isinstance(c, Deprovision)]
    assert [(d.silent.serial, d.missed) for d in deprovisions] == [(1, 3)]
    assert 1 not in table.silent and 2 in table.silent  # 0: b is never deprovisioned
    # A silent sensor that registers again is no longer silent.
    table.register(2, "urn:s:2", "b", parse_register(["ep=b"], b""), now=400.0)
    assert 2 not in table.silent


# --- content formats ------------------------------------------------------------------

DEVICE_TLV = (bytes([0xC4, 0]) + b"Acme" + bytes([0xC1, 9, 87])
              + bytes([0x88, 7, 6, 0x41, 0, 0x0E, 0x41, 1, 0x10]))


def test_tlv_of_an_instance_and_of_an_object() -> None:
    values = [v.to_dict() for v in decode(TLV, DEVICE_TLV, (3, 0))]
    assert values == [{"path": "/3/0/0", "value": "Acme", "as": "string"},
                      {"path": "/3/0/9", "value": 87, "as": "integer"},
                      {"path": "/3/0/7/0", "value": 14, "as": "integer"},
                      {"path": "/3/0/7/1", "value": 16, "as": "integer"}]
    whole = bytes([0x08, 0, len(DEVICE_TLV)]) + DEVICE_TLV
    assert [v.path for v in decode(TLV, whole, (3,))][:2] == ["/3/0/0", "/3/0/9"]
    temperature = bytes([0xE4, 0x16, 0x44]) + struct.pack(">f", 21.5)
    assert decode(TLV, temperature, (3303, 0))[0].to_dict() == \
        {"path": "/3303/0/5700", "value": 21.5, "as": "float"}
    assert decode(TLV, bytes([0xC3, 1]) + b"\x00\xff\x10", (9, 0))[0].kind == "hex"


@pytest.mark.parametrize(("payload", "path", "what"), [
    (bytes([0xC4, 0]) + b"Ac", (3, 0), "byte 0: a value of 4 bytes runs past the end"),
    (bytes([0x08, 0, 3, 0xC1, 9, 87]), (3, 0), "object instance at /3/0/0 is not where"),
    (bytes([0xC1, 9, 87, 0x20]), (3, 0), "byte 3: the header runs past the end"),
    (bytes([0x41, 0, 1]), (3, 0), "resource instance at /3/0/0 is not where"),
])
def test_bad_tlv_says_what_and_where(payload: bytes, path: tuple[int, ...], what: str) -> None:
    with pytest.raises(ContentError) as caught:
        decode(TLV, payload, path)
    assert what in caught.value.message, caught.value.message


def test_senml_json_and_cbor() -> None:
    records = [{"bn": "/3303/0/", "n": "5700", "v": 21.5}, {"n": "5701", "vs": "Cel"},
               {"n": "5850", "vb": True}]
    as_json = decode(SENML_JSON, json.dumps(records).encode(), (3303, 0))
    as_cbor = decode(SENML_CBOR, cbor2.dumps([{-2: "/3303/0/", 0: "5700", 2: 21.5},
                                              {0: "5701", 3: "Cel"}, {0: "5850", 4: True}]),
                     (3303, 0))
    assert as_json == as_cbor
    assert [(v.path, v.value, v.kind) for v in as_json] == [
        ("/3303/0/5700", 21.5, "float"), ("/3303/0/5701", "Cel", "string"),
        ("/3303/0/5850", True, "boolean")]
    for bad, what in ((b"{}", "expected an array"), (b'[{"n": "/x", "v": 1}]', "not an LwM2M"),
                      (b'[{"n": "/3/0/1", "v": 1, "vs": "a"}]', "found 2"),
                      (b'[{"n": "/3/0/1", "v": "1"}]', "not a finite number"),
                      (b"[", "not JSON")):
        with pytest.raises(ContentError, match=what):
            decode(SENML_JSON, bad, (3, 0))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([TLV, SENML_JSON, SENML_CBOR, TEXT, 60, 42]))
def test_content_fuzz_only_ever_refuses_cleanly(payload: bytes, fmt: int) -> None:
    with contextlib.suppress(Lwm2mError):
        for value in decode(fmt, payload, (3, 0, 1)):
            assert value.path.startswith("/")


# --- the Gateway object (/25) -----------------------------------------------------------


def test_gateway_object_shows_each_registered_sensor_under_its_prefix() -> None:
    table = Registrations(_locations())  # type: ignore[arg-type]
    table.register(7, "urn:devid:sensor:x:7", "m-7",
                   parse_register(["ep=m-7"], b"</3/0>,</3303/0>,</3303/1>,</5>"), 0.0)
    table.register(9, "urn:devid:sensor:x:9", "urn:dev:9",
                   parse_register(["ep=urn:dev:9"], b"</3/0>"), 0.0)
    gateway = GatewayObject(table.all())
    assert [(g.instance, g.prefix) for g in gateway.instances] == [(7, "m-7"), (9, "_9")]
    assert gateway.instances[0].resources() == {
        0: "urn:devid:sensor:x:7", 1: "m-7",
        3: "</m-7/3/0>,</m-7/5>,</m-7/3303/0>,</m-7/3303/1>"}
    payload = gateway.registration_payload([(1, 0), (3, 0)])
    assert payload == (b'</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>,</25>;ver=2.0,'
                       b"</25/7>,</25/9>")
    assert [link.target for link in parse_links(payload)][-2:] == ["/25/7", "/25/9"]
    assert gateway.route(("m-7", "3303", "1", "5700")) == (7, (3303, 1, 5700))
    assert gateway.route(("_9", "3")) == (9, (3,))
    for path in (("m-8", "3"), ("m-7",), ("m-7", "03"), ("m-7", "x"),
                 ("m-7", "1", "2", "3", "4", "5"), ("m-7", "70000")):
        assert gateway.route(path) is None, path


def test_the_gateway_object_moves_only_when_who_is_registered_or_their_objects_change(
        ) -> None:
    table = Registrations(lambda: "loc")
    start = table.generation
    table.register(7, "urn:s:7", "m-7", parse_register(["ep=m-7"], b"</3/0>"), 0.0)
    assert table.generation == start + 1
    table.update(7, "loc", parse_update(["lt=600"], b""), 1.0)
    assert table.generation == start + 1  # a lifetime is not what /25 shows
    table.update(7, "loc", parse_update([], b"</3/0>"), 2.0)
    assert table.generation == start + 1  # the same objects again
    table.update(7, "loc", parse_update([], b"</3/0>,</3303/0>"), 3.0)
    assert table.generation == start + 2
    table.deregister(7, "loc")
    assert table.generation == start + 3


GATEWAY_OBJECTS = {1: {0: {0: 1, 1: 300, 6: False, 7: "U"}},
                   25: {7: {0: "urn:s:7", 1: "m-7", 3: "</m-7/3/0>"}}}


def test_the_gateway_answers_reads_of_its_own_objects_in_the_format_asked() -> None:
    assert read_objects(GATEWAY_OBJECTS, (25, 7, 1), None) == (0, b"m-7")
    assert read_objects(GATEWAY_OBJECTS, (1, 0, 6), None) == (0, b"false")
    fmt, tlv = read_objects(GATEWAY_OBJECTS, (25,), None)
    assert fmt == 11542
    values = {v.path: v.value for v in decode(fmt, tlv, (25,))}
    assert values == {"/25/7/0": "urn:s:7", "/25/7/1": "m-7", "/25/7/3": "</m-7/3/0>"}
    fmt, senml = read_objects(GATEWAY_OBJECTS, (25, 7), 110)
    assert {v.path: v.value for v in decode(fmt, senml, (25, 7))} == {
        "/25/7/0": "urn:s:7", "/25/7/1": "m-7", "/25/7/3": "</m-7/3/0>"}
    fmt, one = read_objects(GATEWAY_OBJECTS, (1, 0, 1), 11542)
    assert [v.value for v in decode(fmt, one, (1, 0, 1))] == [300]
    assert discover_objects(GATEWAY_OBJECTS, (25,)) == \
        b"</25>;ver=2.0,</25/7>,</25/7/0>,</25/7/1>,</25/7/3>"
    assert discover_objects(GATEWAY_OBJECTS, (1, 0)) == b"</1/0>,</1/0/0>,</1/0/1>," \
        b"</1/0/6>,</1/0/7>"


@pytest.mark.parametrize(("path", "accept", "error"), [
    ((25, 8), None, Lwm2mNotFound), ((25, 7, 2), None, Lwm2mNotFound),
    ((3,), None, Lwm2mNotFound), ((25, 7, 0, 0), None, Lwm2mNotFound),
    ((25,), 112, Lwm2mError)])
def test_reads_of_what_the_gateway_does_not_have_are_refused(path, accept, error) -> None:
    with pytest.raises(error) as raised:
        read_objects(GATEWAY_OBJECTS, path, accept)
    assert raised.value.coap_code in (0x84, 0x86)


@pytest.mark.parametrize(("method", "path", "accept", "observe", "operation"), [
    (1, (3303, 0, 5700), None, None, "read"), (1, (3303, 0), 40, None, "discover"),
    (1, (3303, 0, 5700), None, 0, "observe"), (1, (3303, 0, 5700), None, 1, "read"),
    (3, (3303, 0, 5750), None, None, "write"), (2, (3, 0, 4), None, None, "execute"),
    (2, (3303, 0), None, None, "write"), (2, (3303,), None, None, None),
    (4, (3303, 0), None, None, None), (5, (3303, 0), None, None, None)])
def test_an_upstream_request_needs_the_grant_of_its_lwm2m_operation(
        method, path, accept, observe, operation) -> None:
    assert operation_of(method, path, accept, observe) == operation


def test_senml_names_get_the_prefix_outward_and_lose_it_inward() -> None:
    answer = json.dumps([{"bn": "/3303/0/", "n": "5700", "v": 21.5},
                         {"n": "5701", "vs": "Cel"}]).encode()
    outward = reprefix_senml(110, answer, "m-7", outward=True)
    assert json.loads(outward)[0]["bn"] == "/m-7/3303/0/"
    assert reprefix_senml(110, outward, "m-7", outward=False) == \
        json.dumps(json.loads(answer), separators=(",", ":")).encode()
    names = cbor2.dumps([{0: "/3303/0/5700", 2: 21.5}])
    assert cbor2.loads(reprefix_senml(112, names, "m-7", outward=True))[0][0] == \
        "/m-7/3303/0/5700"
    assert reprefix_senml(0, b"21.5", "m-7", outward=True) == b"21.5"
    with pytest.raises(Lwm2mError, match="not under /m-7/"):
        reprefix_senml(110, answer, "m-7", outward=False)  # a Write naming another path
    for garbage in (b"{", b'{"bn": 1}', b"[1]"):
        with pytest.raises(Lwm2mError, match="SenML"):
            reprefix_senml(110, garbage, "m-7", outward=True)


# --- garbage at the other new inputs: paths, grants, bootstrap, firmware, observe -------


@pytest.mark.parametrize("text", ["", "/", "3/0", "/3/x", "/03", "/3//0", "/65535",
                                  "/1/2/3/4/5", "/3/0/", "/-1"])
def test_a_bad_lwm2m_path_is_refused_naming_it(text: str) -> None:
    with pytest.raises(Lwm2mError, match="expected /OBJECT"):
        parse_path(text)


@pytest.mark.parametrize(("toml", "what"), [
    ('[[profiles.m.lwm2m.grants]]\noperations = ["read"]\npaths = ["/3/x"]\n', "'/3/x'"),
    ('[[profiles.m.lwm2m.grants]]\noperations = ["steal"]\npaths = ["/3"]\n', "operations"),
    ('[[profiles.m.lwm2m.grants]]\noperations = ["read"]\npaths = []\n', "paths"),
    ('[[profiles.m.lwm2m.grants]]\nwho = ["anyone"]\noperations = ["read"]\n'
     'paths = ["/3"]\n', "who"),
    ("[profiles.m.lwm2m]\nmin_lifetime = 100\nmax_lifetime = 10\n", "above max_lifetime"),
    ("[profiles.m.lwm2m]\nqueue_awake = 0\n", "queue_awake"),
    ("[profiles.m.lwm2m]\nbootstrap = 1\n", "bootstrap"),
])
def test_bad_lwm2m_policy_is_refused_naming_the_key(toml: str, what: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy(toml, Path("policy.toml"))
    assert what in caught.value.message and "m.lwm2m" in caught.value.message


@pytest.mark.parametrize(("query", "what"), [
    ([], "endpoint name (ep) is missing"), (["ep=a b"], "is not 1 to 64"),
    (["ep=x", "ep=y"], "given twice"), (["ep=x", "lt=60"], "unknown parameter 'lt'")])
def test_a_bad_bootstrap_request_is_refused(query: list[str], what: str) -> None:
    with pytest.raises(Lwm2mError) as caught:
        parse_bootstrap_request(query)
    assert what in caught.value.message and "Bootstrap-Request" in caught.value.message


@pytest.mark.parametrize(("params", "what"), [
    ({}, "either a package or a URI"),
    ({"sensor": "m-1"}, "either a package or a URI"),
    ({"sensor": "m-1", "uri": "coap://x", "package": "AA=="}, "either a package or a URI"),
    ({"sensor": "m-1", "uri": ""}, "1 to 255 characters"),
    ({"sensor": "m-1", "uri": 7}, "1 to 255 characters"),
    ({"sensor": "m-1", "package": "not base64!"}, "not base64"),
    ({"sensor": "m-1", "package": ""}, "a package of 1 byte"),
])
def test_a_bad_firmware_request_is_refused_before_anything_happens(
        params: dict[str, object], what: str) -> None:
    class Untouched:  # the checks come first: nothing of the LwM2M server is used
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"used {name}")

    updates = FirmwareUpdates(Untouched(), Untouched())  # type: ignore[arg-type]
    with pytest.raises(Lwm2mError, match=re.escape(what)):
        asyncio.run(updates.start(params))
    assert updates.totals == {"started": 0, "updated": 0, "failed": 0}


@pytest.mark.parametrize(("params", "what"), [
    ({"path": "/3/0"}, "a sensor and a path"),
    ({"sensor": "m-1", "path": "/3/0", "count": 0}, "count from 1 to 1000"),
    ({"sensor": "m-1", "path": "/3/0", "count": True}, "count from 1 to 1000"),
    ({"sensor": "m-1", "path": "/3/0", "seconds": 1e9}, "seconds from 1 to 110"),
    ({"sensor": "m-1", "path": "/3/0", "seconds": "soon"}, "seconds from 1 to 110"),
    ({"sensor": "m-1", "operation": "steal", "path": "/3/0"}, "one of read, write"),
])
def test_bad_device_management_requests_are_refused_before_anything_happens(
        tmp_path: Path, params: dict[str, object], what: str) -> None:
    class Untouched:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"used {name}")

    server = Lwm2mServer(Lwm2mStore(tmp_path / "lwm2m.db"), Untouched(), Untouched(),  # type: ignore[arg-type]
                         Untouched(), Untouched())  # type: ignore[arg-type]
    handler = server.operate if "operation" in params else server.observe
    with pytest.raises(Lwm2mError, match=re.escape(what)):
        asyncio.run(handler(params))
    assert server.totals == {}


def test_a_tlv_answer_to_a_resource_read_carries_that_resource_and_no_other() -> None:
    float_tlv = encode_tlv({5700: struct.pack(">d", 21.5)})
    assert [(v.path, v.value) for v in decode(11542, float_tlv, (3303, 0, 5700))] == \
        [("/3303/0/5700", 21.5)]
    with pytest.raises(Lwm2mError, match="TLV: /3303/0/5701 in the answer to a Read of "
                                         "/3303/0/5700"):
        decode(11542, encode_tlv({5701: "Cel"}), (3303, 0, 5700))
