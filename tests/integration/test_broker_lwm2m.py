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
import re
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lwm2m_peer import DtlsRelay, NodeLwm2mClient
from lwm2m_sensor import Lwm2mClient, oscore_client
from mbedtls.exceptions import TLSError
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
queue_awake = 3
"""


MANAGED_POLICY = POLICY + """
[[profiles.meter.lwm2m.grants]]
operations = ["read", "discover", "observe"]
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

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        shown = broker.ctl_json("show", "m-1")[1]
        if shown["status"] == "revoked":
            break
        time.sleep(0.2)
    assert shown["status"] == "revoked", shown
    # Offline after one lifetime, deprovisioned at the first one-second tick after the
    # second (journaled in order; the reason counts the lifetimes missed by then: 2, or 3
    # when the tick comes late on a loaded machine).
    log = broker.log.read_text()
    offline = log.index("sensor m-1 is offline: no LwM2M Update within its lifetime of 1 s")
    deprovisioned = re.search(r"sensor m-1 deprovisioned: LwM2M: no Update for ([23]) "
                              r"lifetimes", log)
    assert deprovisioned is not None and offline < deprovisioned.start(), log
    assert shown["status_reason"] == \
        f"LwM2M: no Update for {deprovisioned.group(1)} lifetimes of 1 s"
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
        # Observe: lwm2m-node-lib notifies when the value is set anew.
        results: list[tuple[int, dict]] = []
        observing = threading.Thread(target=lambda: results.append(broker.ctl_json(
            "observe", "n-1", "/3303/0/5700", "--count", "2", "--seconds", "20")))
        observing.start()
        time.sleep(3.0)  # the observation is made
        assert client.command("set /3303/0 5700 22.5")["error"] is None
        observing.join(30)
        [(code, observed)] = results
        assert code == 0 and [n["values"][0]["value"] for n in observed["notifications"]] \
            == ["21.5", "22.5"], observed
        code, refused = broker.ctl_json("write", "n-1", "/3303/0/5700", "30")
        assert code == 2 and "grants the operator no write" in refused["error"]["message"]
        updated = client.command("update")
        assert updated.get("error") is None, updated
        assert broker.ctl_json("show", "n-1")[1]["lwm2m"]["updated_at"] > \
            shown["updated_at"]
        assert client.command("deregister")["error"] is None
        assert "lwm2m" not in broker.ctl_json("show", "n-1")[1]
        assert stack.status()["lwm2m"]["totals"] == {
            "deregistered": 1, "operation.observe": 1, "operation.read": 1, "registered": 1,
            "updated": 1}
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
    sensor = oscore_client(tmp_path / "m-1", m1["credential"], broker.oscore_port)
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
    # Observe: the first answer and notifications as the value changes, then cancelled.
    code, observed = broker.ctl_json("observe", "m-1", "/3303/0/5700", "--count", "3",
                                     "--seconds", "20")
    assert code == 0, observed
    values = [n["values"][0]["value"] for n in observed["notifications"]]
    assert len(values) == 3 and values == sorted(values) and len(set(values)) == 3, values
    code, refused = broker.ctl_json("observe", "m-1", "/3/0/9")
    assert code == 2 and "grants the operator no observe" in refused["error"]["message"]
    text = broker.ctl("read", "m-1", "/3303/0/5750")
    assert text.returncode == 0 and "kitchen" in text.stdout and "(string)" in text.stdout

    # Refused by the profile's grants, before anything reaches the sensor.
    for args in (("read", "m-1", "/1/0"), ("write", "m-1", "/3/0/0", "x"),
                 ("execute", "m-1", "/3/0/5")):
        code, refused = broker.ctl_json(*args)
        assert code == 2 and "grants the operator no" in refused["error"]["message"], refused
    assert sensor.executed == [""] and sensor.application_type.value == "kitchen"
    # Quarantined: the gateway does not talk to it; released: it does again.
    assert broker.ctl("quarantine", "m-1").returncode == 0
    code, refused = broker.ctl_json("read", "m-1", "/3/0")
    assert code == 2 and "is quarantined" in refused["error"]["message"], refused
    assert broker.ctl("release", "m-1").returncode == 0
    assert broker.ctl_json("read", "m-1", "/3/0")[0] == 0
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
    # Revoked: its registration ends with it.
    assert broker.ctl("revoke", "m-1").returncode == 0
    deadline = time.monotonic() + 5
    while "lwm2m" in broker.ctl_json("show", "m-1")[1] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "lwm2m" not in broker.ctl_json("show", "m-1")[1]
    assert stack.status()["lwm2m"]["registered"] == 0


def test_hostile_registrations_get_4xx_and_change_nothing(broker_stack_factory, tmp_path):
    """A fuzzer's Register and Update payloads and queries (random, and mutations of a
    valid one): always a 4.xx or a 2.xx that the registry then shows, never a 5.xx, and
    the registration made before stays as it was unless a valid Update changed it."""
    stack = broker_stack_factory(policy=POLICY)
    broker = stack.broker
    m1 = stack.add("m-1", "--profile", "meter")
    sensor = OscoreSensor(tmp_path / "m-1", m1["credential"], broker.oscore_port)
    stack.sensors.append(sensor)
    code, location = _register(sensor, "m-1")
    assert code == "2.01"
    before = broker.ctl_json("show", "m-1")[1]["lwm2m"]
    seen: dict[str, int] = {}

    mutated = st.builds(lambda cut, junk: LINKS[:cut] + junk + LINKS[cut:],
                        st.integers(0, len(LINKS)), st.binary(max_size=8))
    payloads = st.binary(max_size=120) | mutated | st.text(
        alphabet='</>;=",0123456789rt.\\', max_size=60).map(str.encode)
    queries = st.lists(st.sampled_from(["ep=m-1", "ep=x", "lt=60", "lt=0", "lt=99999999999",
                                        "lwm2m=1.1", "lwm2m=9", "b=U", "b=UQ", "Q", "Q=1",
                                        "zz=1", "ep=", "lt=abc"]), max_size=4)

    @settings(max_examples=40, deadline=None, database=None)
    @given(payloads, queries)
    def probe(payload: bytes, query: list[str]) -> None:
        answer = sensor.request("POST", "/" + "/".join(location), payload, LINK_FORMAT,
                                tuple(q for q in query if not q.startswith("ep=")))
        seen[answer.code] = seen.get(answer.code, 0) + 1
        assert answer.code[0] in "24", (payload, query, answer)

    probe()
    after = broker.ctl_json("show", "m-1")[1]["lwm2m"]
    assert after["location"] == before["location"]  # never replaced by a bad Update
    assert "4.00" in seen, seen
    # Hostile Registers: refused, or a fresh registration of m-1 itself; nothing else.
    for payload in (b"</3/0>" * 2000, b"<" * 5000, b"</3/0>;" + b"a;" * 40):
        answer = sensor.request("POST", "/rd", payload, LINK_FORMAT, ("ep=m-1",))
        assert answer.code == "4.00", (payload[:20], answer)
    assert broker.ctl_json("show", "m-1")[1]["lwm2m"]["location"] == before["location"]
    assert stack.status()["lwm2m"]["registered"] == 1


BOOTSTRAP_POLICY = POLICY + """
[profiles.field]
[profiles.field.lwm2m]
bootstrap = true
"""


def _audit(broker) -> list[dict]:
    return [json.loads(line) for line in
            (broker.directory / "state" / "audit.log").read_text().splitlines()]


def _wait_bootstrap(broker, sensor_id: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done = [r for r in _audit(broker) if r["event"] == "lwm2m-bootstrap"
                and r["sensor"] == sensor_id]
        if done:
            return done[-1]
        time.sleep(0.1)
    raise AssertionError("no lwm2m-bootstrap record")


def test_a_sensor_bootstraps_over_dtls_psk_then_its_bootstrap_key_is_spent(
        broker_stack_factory):
    """Zero-touch onboarding: the factory credential gets the sensor a fresh operational
    PSK written into its Security object; with it the sensor registers; the factory
    credential is refused from then on."""
    stack = broker_stack_factory(policy=BOOTSTRAP_POLICY)
    broker = stack.broker
    added = stack.add("f-1", "--profile", "field", "--transport", "dtls-psk")
    identity, factory_key = added["credential"]["psk_identity"], \
        bytes.fromhex(added["credential"]["psk"])
    relay = DtlsRelay(broker.dtls_port, identity, factory_key)
    client = Lwm2mClient(relay.port)
    try:
        assert client.bootstrap("f-1") == "2.04 Changed"
        security = client.security_objects.instances[1]
        assert security[0] == f"coaps://127.0.0.1:{broker.dtls_port}".encode()
        assert (security[1], security[2], security[10]) == (b"\x00", b"\x00", b"\x01")
        assert security[3] == identity.encode()
        operational_key = security[5]
        assert len(operational_key) == 16 and operational_key != factory_key
        assert client.server_objects.instances[0][7] == b"U"
        assert _wait_bootstrap(broker, added["id"])["outcome"] == "finished"
    finally:
        client.close()
        relay.close()

    relay = DtlsRelay(broker.dtls_port, identity, operational_key)
    client = Lwm2mClient(relay.port)
    try:
        assert client.register("f-1") == "2.01 Created"
    finally:
        client.close()
        relay.close()
    refused_before = stack.totals().get("refused.auth-failed", 0)
    with pytest.raises(TLSError):  # the handshake fails: the factory key is spent
        DtlsRelay(broker.dtls_port, identity, factory_key)
    assert stack.totals().get("refused.auth-failed", 0) == refused_before + 1
    assert stack.status()["lwm2m_bootstrap"] == {"requested": 1, "finished": 1, "failed": 0,
                                                 "running": 0}


def test_an_oscore_sensor_bootstraps_into_a_fresh_context(broker_stack_factory, tmp_path):
    stack = broker_stack_factory(policy=BOOTSTRAP_POLICY)
    broker = stack.broker
    added = stack.add("f-2", "--profile", "field")
    meter = stack.add("m-9", "--profile", "meter")
    client = oscore_client(tmp_path / "f-2", added["credential"], broker.oscore_port)
    stack.sensors.append(client)
    other = oscore_client(tmp_path / "m-9", meter["credential"], broker.oscore_port)
    stack.sensors.append(other)
    # Refused: another endpoint name; a profile that does not bootstrap.
    assert client.bootstrap("m-9", timeout=1).startswith("4.03")
    assert other.bootstrap("m-9", timeout=1).startswith("4.03")
    assert client.bootstrap("f-2") == "2.04 Changed"
    assert _wait_bootstrap(broker, added["id"])["outcome"] == "finished"
    security = client.security_objects.instances[1]
    assert security[2] == b"\x03" and security[17] == bytes([0, 21, 0, 1])  # NoSec + /21/1
    written = client.oscore_objects.instances[1]
    fresh = {"transport": "oscore", "master_secret": written[0].hex(),
             "sender_id": written[1].hex(), "recipient_id": written[2].hex(),
             "master_salt": written[5].hex()}
    assert fresh["sender_id"] == added["credential"]["sender_id"]  # the same identifier
    assert fresh["master_secret"] != added["credential"]["master_secret"]
    renewed = oscore_client(tmp_path / "f-2b", fresh, broker.oscore_port)
    stack.sensors.append(renewed)
    assert renewed.register("f-2") == "2.01 Created"
    old = OscoreSensor(tmp_path / "f-2c", added["credential"], broker.oscore_port)
    stack.sensors.append(old)
    refused = stack.totals().get("refused.auth-failed", 0)
    # The spent key no longer decrypts: 4.00, as RFC 8613 (8.2) answers that; counted.
    assert old.request("POST", "/rd", LINKS, LINK_FORMAT, ("ep=f-2",)).code == "4.00"
    assert stack.totals().get("refused.auth-failed", 0) == refused + 1


def test_a_sleeping_sensor_is_reached_at_its_next_update(broker_stack_factory, tmp_path):
    """LwM2M queue mode: after `queue_awake` without an Update the sensor is taken to
    sleep; an operation says so, or with --wait goes out at the sensor's next Update."""
    stack = broker_stack_factory(policy=MANAGED_POLICY)
    broker = stack.broker
    m1 = stack.add("m-1", "--profile", "meter")
    sensor = oscore_client(tmp_path / "m-1", m1["credential"], broker.oscore_port)
    stack.sensors.append(sensor)
    assert sensor.register("m-1", queue=True) == "2.01 Created"
    assert broker.ctl_json("show", "m-1")[1]["lwm2m"]["queue"] is True
    assert broker.ctl_json("read", "m-1", "/3/0")[0] == 0  # just heard: it listens
    time.sleep(3.5)
    code, refused = broker.ctl_json("read", "m-1", "/3/0")
    assert code == 2 and "sleeps (queue mode)" in refused["error"]["message"], refused

    results: list[tuple[int, dict]] = []
    waiting = threading.Thread(target=lambda: results.append(
        broker.ctl_json("read", "m-1", "/3303/0/5700", "--wait", "30")))
    waiting.start()
    time.sleep(1.0)
    assert not results  # still waiting for the sensor
    assert sensor.update() == "2.04 Changed"
    waiting.join(30)
    [(code, read)] = results
    assert code == 0 and read["values"][0]["value"] == 21.5


FIRMWARE_POLICY = POLICY + """
[[profiles.meter.lwm2m.grants]]
operations = ["write"]
paths = ["/5/0/0", "/5/0/1"]
[[profiles.meter.lwm2m.grants]]
operations = ["execute"]
paths = ["/5/0/2"]
[[profiles.meter.lwm2m.grants]]
operations = ["read"]
paths = ["/5/0/3", "/5/0/5", "/3/0/3"]
"""


def _firmware_job(broker, name: str) -> dict:
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        job = broker.ctl_json("show", name)[1].get("lwm2m", {}).get("firmware", {})
        if job.get("state") in ("updated", "failed"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"firmware job of {name} did not end: {job}")


def test_firmware_update_pushed_block_wise_and_followed_to_the_new_version(
        broker_stack_factory, tmp_path):
    stack = broker_stack_factory(policy=FIRMWARE_POLICY)
    broker = stack.broker
    m1 = stack.add("m-1", "--profile", "meter")
    stack.add("t-1")
    sensor = oscore_client(tmp_path / "m-1", m1["credential"], broker.oscore_port)
    stack.sensors.append(sensor)
    assert sensor.register("m-1") == "2.01 Created"
    package = tmp_path / "fw.bin"
    package.write_bytes(b"FW:2.1.7\n" + bytes(range(256)) * 12)  # 3 kB: 7 blocks of 512

    code, started = broker.ctl_json("firmware", "m-1", str(package))
    assert code == 0 and started["state"] == "starting", started
    job = _firmware_job(broker, "m-1")
    assert job["state"] == "updated" and job["version"] == "2.1.7", job
    assert sensor.firmware.package == package.read_bytes()  # every block arrived
    listed = {s["name"]: s for s in broker.ctl_json("list")[1]["sensors"]}
    assert listed["m-1"]["firmware_version"] == "2.1.7"
    assert "firmware_version" not in listed["t-1"]

    # A package the sensor cannot apply: the job fails with its Update Result; the
    # version it still runs is kept.
    package.write_bytes(b"not firmware")
    assert broker.ctl_json("firmware", "m-1", str(package))[0] == 0
    job = _firmware_job(broker, "m-1")
    assert job["state"] == "failed" and "Update Result is 8" in job["reason"], job
    assert broker.ctl_json("list")[1]["sensors"][0]["firmware_version"] == "2.1.7"
    shown = broker.ctl("show", "m-1").stdout
    assert "update FAILED while updating" in shown

    # Pull: the sensor fetches it by URI.
    code, _ = broker.ctl_json("firmware", "m-1", "--uri", "coaps://fw.example/2.2.0")
    assert code == 0 and _firmware_job(broker, "m-1")["version"] == "2.2.0"
    assert sensor.firmware.uri == "coaps://fw.example/2.2.0"

    # Refused before anything is sent: a profile without the grants; not registered.
    code, refused = broker.ctl_json("firmware", "t-1", str(package))
    assert code == 2 and "does not allow LwM2M" in refused["error"]["message"]
    records = [r for r in _audit(broker) if r["event"] == "lwm2m-firmware"]
    assert [r["outcome"] for r in records] == ["started", "updated", "started", "failed",
                                               "started", "updated"]
