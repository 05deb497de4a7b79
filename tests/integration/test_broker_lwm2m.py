"""LwM2M registration at the gateway, end to end: aiocoap's OSCORE client as the sensor,
devid-broker as its LwM2M server (the Registration interface at /rd).

Checked: Register, Update and De-register by the sensor's own credential, what it
registered shown by `devidctl sensors show`; refusals with a 4.xx saying why and the
registry unchanged (another sensor's endpoint name, a profile without LwM2M, bad link
format, a lifetime outside the profile's range, another sensor's registration); a
registration kept across a restart; a sensor that misses its lifetime goes offline and,
after the profile's number of missed lifetimes, is deprovisioned (revoked, refused)."""

from __future__ import annotations

import json
import time

from lwm2m_peer import DtlsRelay, NodeLwm2mClient
from lwm2m_sensor import Lwm2mOscoreClient
from oscore_sensor import OscoreSensor
from stack import DEMO_POLICY

LINKS = b'</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>,</3303/0>;ver=1.1,</3303/1>'
LINK_FORMAT = 40
POLICY = DEMO_POLICY + """
[profiles.meter]
[profiles.meter.lwm2m]
min_lifetime = 1
max_lifetime = 3600
deprovision_after = 2
"""


MANAGED_POLICY = POLICY + """
[[profiles.meter.lwm2m.grants]]
operations = ["read", "discover"]
paths = ["/3/0", "/3303/*/**"]
[[profiles.meter.lwm2m.grants]]
operations = ["write"]
paths = ["/3303/*/5750"]
[[profiles.meter.lwm2m.grants]]
operations = ["execute"]
paths = ["/3/0/4"]
"""


def _register(sensor: OscoreSensor, endpoint: str, lifetime: int = 300,
              links: bytes = LINKS) -> tuple[str, tuple[str, ...]]:
    answer = sensor.request("POST", "/rd", links, LINK_FORMAT,
                            (f"ep={endpoint}", f"lt={lifetime}", "lwm2m=1.1", "b=U"))
    return answer.code, answer.location


def test_sensors_register_update_and_deregister_by_their_own_credential(
        broker_stack_factory, tmp_path):
    stack = broker_stack_factory(policy=POLICY)
    broker = stack.broker
    m1 = stack.add("m-1", "--profile", "meter")  # the later --profile wins
    m2 = stack.add("m-2", "--profile", "meter", "--attr", "endpoint=urn:dev:m2")
    t1 = stack.add("t-1")
    meter = OscoreSensor(tmp_path / "m-1", m1["credential"], broker.oscore_port)
    other = OscoreSensor(tmp_path / "m-2", m2["credential"], broker.oscore_port)
    temperature = OscoreSensor(tmp_path / "t-1", t1["credential"], broker.oscore_port)
    stack.sensors += [meter, other, temperature]

    code, location = _register(meter, "m-1")
    assert code == "2.01" and location[0] == "rd" and len(location) == 2
    _, shown = broker.ctl_json("show", "m-1")
    registration = shown["lwm2m"]
    assert registration["state"] == "registered" and registration["endpoint"] == "m-1"
    assert registration["objects"] == {"1": [0], "3": [0], "3303": [0, 1]}
    assert registration["object_versions"] == {"3303": "1.1"}
    assert (registration["lifetime"], registration["lwm2m"], registration["binding"]) == \
        (300, "1.1", "U")

    # Refused, each with a 4.xx saying why; nothing registered.
    refusals = [
        (_register(other, "m-1")[0], "4.03"),  # another sensor's endpoint name
        (_register(temperature, "t-1")[0], "4.03"),  # a profile without LwM2M
        (_register(other, "urn:dev:m2", links=b"</3/0>,</3/0")[0], "4.00"),
        (_register(other, "urn:dev:m2", lifetime=7200)[0], "4.00"),
    ]
    assert [got for got, _ in refusals] == [want for _, want in refusals]
    answer = other.request("POST", "/rd", b"</3/0>,</3/0", LINK_FORMAT, ("ep=urn:dev:m2",))
    assert answer.code == "4.00" and b"link format, byte 12" in answer.payload
    answer = other.request("POST", "/rd", LINKS, LINK_FORMAT, ("ep=urn:dev:m2", "lt=7200"))
    assert b"allows 1 to 3600 s" in answer.payload
    for name in ("m-2", "t-1"):
        assert "lwm2m" not in broker.ctl_json("show", name)[1]
    totals = stack.status()["lwm2m"]["totals"]
    assert totals["registered"] == 1 and totals["refused"] >= 4

    # m-2 registers under the endpoint name bound to it; it cannot touch m-1's.
    code, other_location = _register(other, "urn:dev:m2")
    assert code == "2.01" and other_location != location
    assert other.request("POST", "/" + "/".join(location), b"", None, ("lt=60",)).code \
        == "4.04"
    assert other.request("DELETE", "/" + "/".join(location)).code == "4.04"
    assert broker.ctl_json("show", "m-1")[1]["lwm2m"]["state"] == "registered"

    # Update: a new lifetime and objects.
    answer = meter.request("POST", "/" + "/".join(location), b"</3/0>,</4/0>", LINK_FORMAT,
                           ("lt=600",))
    assert answer.code == "2.04"
    registration = broker.ctl_json("show", "m-1")[1]["lwm2m"]
    assert registration["lifetime"] == 600 and registration["objects"] == {"3": [0], "4": [0]}

    # Kept across a restart: the Update after it finds the registration.
    broker.stop()
    stack.sensors.remove(meter)
    meter.close()
    broker.start().wait_serving()
    meter = OscoreSensor(tmp_path / "m-1", m1["credential"], broker.oscore_port)
    stack.sensors.append(meter)
    assert meter.request("POST", "/" + "/".join(location)).code == "2.04"

    assert meter.request("DELETE", "/" + "/".join(location)).code == "2.02"
    assert "lwm2m" not in broker.ctl_json("show", "m-1")[1]
    assert meter.request("POST", "/" + "/".join(location)).code == "4.04"


def test_a_silent_sensor_goes_offline_then_is_deprovisioned(broker_stack_factory, tmp_path):
    stack = broker_stack_factory(policy=POLICY)
    broker = stack.broker
    m1 = stack.add("m-1", "--profile", "meter")
    meter = OscoreSensor(tmp_path / "m-1", m1["credential"], broker.oscore_port)
    stack.sensors.append(meter)
    assert _register(meter, "m-1", lifetime=1)[0] == "2.01"

    states = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        shown = broker.ctl_json("show", "m-1")[1]
        states.append(shown.get("lwm2m", {}).get("state"))
        if shown["status"] == "revoked":
            break
        time.sleep(0.2)
    assert shown["status"] == "revoked", shown
    assert "offline" in states  # after one lifetime, before the second
    assert shown["status_reason"] == "LwM2M: no Update for 2 lifetimes of 1 s"
    totals = stack.status()["lwm2m"]["totals"]
    assert totals["expired"] == 1 and totals["deprovisioned"] == 1
    assert meter.request("POST", "/rd", LINKS, LINK_FORMAT, ("ep=m-1",)).code == "4.01"
    records = [json.loads(line) for line in
               (broker.directory / "state" / "audit.log").read_text().splitlines()]
    assert [(r["change"], r["reason"]) for r in records if r["event"] == "sensor-changed"] \
        == [("revoke", "LwM2M: no Update for 2 lifetimes of 1 s")]


def test_lwm2m_node_lib_client_registers_over_dtls_psk(broker_stack_factory):
    """An LwM2M client nobody here wrote (lwm2m-node-lib) registers, is read, updates
    and de-registers through the gateway with a DTLS-PSK credential of its own."""
    stack = broker_stack_factory(policy=MANAGED_POLICY)
    broker = stack.broker
    added = stack.add("n-1", "--profile", "meter", "--transport", "dtls-psk")
    credential = added["credential"]
    relay = DtlsRelay(broker.dtls_port, credential["psk_identity"],
                      bytes.fromhex(credential["psk"]))
    client = NodeLwm2mClient(relay.port, "n-1", lifetime=120)
    try:
        registered = client.next_event()
        assert registered.get("error") is None, registered
        location = registered["location"]
        assert location.startswith("rd/") or location.startswith("/rd/"), registered
        shown = broker.ctl_json("show", "n-1")[1]["lwm2m"]
        assert shown["state"] == "registered" and shown["endpoint"] == "n-1"
        assert (shown["lifetime"], shown["lwm2m"], shown["binding"]) == (120, "1.0", "U")
        assert shown["objects"] == {"3": [0], "3303": [0]}
        # Read by the operator: into the sensor's DTLS session, answered in text.
        code, read = broker.ctl_json("read", "n-1", "/3303/0/5700")
        assert code == 0, read
        assert read["values"] == [{"path": "/3303/0/5700", "value": "21.5", "as": "string"}]
        code, refused = broker.ctl_json("write", "n-1", "/3303/0/5700", "30")
        assert code == 2 and "grants the operator no write" in refused["error"]["message"]
        updated = client.command("update")
        assert updated.get("error") is None, updated
        assert broker.ctl_json("show", "n-1")[1]["lwm2m"]["updated_at"] > \
            shown["updated_at"]
        assert client.command("deregister")["error"] is None
        assert "lwm2m" not in broker.ctl_json("show", "n-1")[1]
        assert stack.status()["lwm2m"]["totals"] == {
            "deregistered": 1, "operation.read": 1, "registered": 1, "updated": 1}
    finally:
        client.close()
        relay.close()


def test_the_operator_manages_an_oscore_sensor_as_its_profile_grants(broker_stack_factory,
                                                                      tmp_path):
    """devidctl sensors read|write|execute|discover: requests from the gateway to the
    sensor, protected with the sensor's own OSCORE context, answers decoded (TLV, SenML
    CBOR, text, link format); what no grant allows is refused before anything is sent."""
    stack = broker_stack_factory(policy=MANAGED_POLICY)
    broker = stack.broker
    m1 = stack.add("m-1", "--profile", "meter")
    sensor = Lwm2mOscoreClient(tmp_path / "m-1", m1["credential"], broker.oscore_port)
    stack.sensors.append(sensor)
    # Not registered yet: nothing to reach.
    code, refused = broker.ctl_json("read", "m-1", "/3/0")
    assert code == 2 and "not registered" in refused["error"]["message"]
    assert sensor.register("m-1") == "2.01 Created"

    code, device = broker.ctl_json("read", "m-1", "/3/0")
    assert code == 0 and device["code"] == "2.05" and device["content_format"] == 11542
    assert device["values"] == [
        {"path": "/3/0/0", "value": "devid-agent tests", "as": "string"},
        {"path": "/3/0/9", "value": 87, "as": "integer"}]
    code, temperature = broker.ctl_json("read", "m-1", "/3303/0/5700")
    assert code == 0 and temperature["values"] == [
        {"path": "/3303/0/5700", "value": 21.5, "as": "float"}]
    code, written = broker.ctl_json("write", "m-1", "/3303/0/5750", "kitchen")
    assert code == 0 and written["code"] == "2.04"
    assert sensor.application_type.value == "kitchen"
    code, executed = broker.ctl_json("execute", "m-1", "/3/0/4")
    assert code == 0 and executed["code"] == "2.04" and sensor.executed == [""]
    code, discovered = broker.ctl_json("discover", "m-1", "/3/0")
    assert code == 0 and [link["target"] for link in discovered["links"]] == \
        ["/3/0", "/3/0/0", "/3/0/4", "/3/0/9"]
    text = broker.ctl("read", "m-1", "/3303/0/5750")
    assert text.returncode == 0 and "kitchen" in text.stdout and "(string)" in text.stdout

    # Refused by the profile's grants, before anything reaches the sensor.
    for args in (("read", "m-1", "/1/0"), ("write", "m-1", "/3/0/0", "x"),
                 ("execute", "m-1", "/3/0/5")):
        code, refused = broker.ctl_json(*args)
        assert code == 2 and "grants the operator no" in refused["error"]["message"], refused
    assert sensor.executed == [""] and sensor.application_type.value == "kitchen"
    # The sensor's own refusal comes back with its code.
    code, missing = broker.ctl_json("read", "m-1", "/3303/0/5701")
    assert code == 2 and missing["code"] == "4.04"
    records = [json.loads(line) for line in
               (broker.directory / "state" / "audit.log").read_text().splitlines()]
    operations = [(r["operation"], r["path"], r.get("answer"), "refused" in r)
                  for r in records if r["event"] == "lwm2m-operation"]
    assert ("write", "/3303/0/5750", "2.04", False) in operations
    assert ("read", "/1/0", None, True) in operations
    assert stack.status()["lwm2m"]["totals"]["operation.read"] >= 3
