"""The sensor registry's cores: minting, sealing at rest, weak keys, imports, and the
SQLite store (a temporary file; no broker, no TPM)."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3

import pytest

from agent.errors import ImportRefused, SensorError, SensorNotFound, StateError
from agent.secret import SecretBytes
from agent.sensors import credentials as creds
from agent.sensors.atrest import RecordCipher
from agent.sensors.importing import parse_import
from agent.sensors.keycheck import weak_key_reason
from agent.sensors.model import ID_PREFIX, sensor_id
from agent.sensors.store import NewSensor, SensorStore

NOW = "2026-11-23T12:00:00+00:00"


def _cipher(key: bytes | None = None) -> RecordCipher:
    return RecordCipher(SecretBytes(key or bytes(range(32))))


@pytest.fixture
def store(tmp_path) -> SensorStore:
    return SensorStore(tmp_path / "sensors.db", _cipher())


# --- minting and the records -------------------------------------------------------------

def test_minted_credentials_are_fresh_and_well_formed():
    a, b = creds.mint("oscore", b"\x01"), creds.mint("oscore", b"\x02")
    assert isinstance(a, creds.OscoreCredential)
    assert len(a.master_secret) == 16 and len(a.master_salt) == 8
    assert a.master_secret != b.master_secret and a.sender_id != a.recipient_id
    psk = creds.mint("dtls-psk", creds.psk_identity(26))
    assert psk.kid == b"devid-s1a" and len(psk.secret) == 16
    assert "<secret" in repr(a) and a.master_secret.reveal().hex() not in repr(a)
    for credential in (a, psk):
        assert creds.decode(creds.encode(credential), "x") == credential
    with pytest.raises(StateError, match="sensor x: the stored credential is damaged"):
        creds.decode(b'{"transport": "oscore"}', "sensor x")
    with pytest.raises(ValueError, match="unknown transport"):
        creds.mint("plain", b"\x01")


@pytest.mark.parametrize("serial, kid", [(1, b"\x01"), (255, b"\xff"), (256, b"\x01\x00")])
def test_sender_ids_are_the_shortest_form_of_the_serial(serial, kid):
    assert creds.sensor_sender_id(serial) == kid


def test_sensor_ids_are_derived_and_distinct_per_registry():
    one = sensor_id("registry-a", 1)
    assert one.startswith(ID_PREFIX) and len(one) == len(ID_PREFIX) + 32
    assert one == sensor_id("registry-a", 1)
    assert len({one, sensor_id("registry-a", 2), sensor_id("registry-b", 1)}) == 3


def test_sealed_records_open_only_for_their_sensor_and_key():
    cipher = _cipher()
    sealed = cipher.seal("urn:devid:sensor:a", "credential", b"keys")
    assert cipher.open("urn:devid:sensor:a", "credential", sealed) == b"keys"
    assert sealed != cipher.seal("urn:devid:sensor:a", "credential", b"keys")  # fresh nonce
    with pytest.raises(StateError, match="moved from another row"):
        cipher.open("urn:devid:sensor:b", "credential", sealed)
    with pytest.raises(StateError, match="does not open with this data key"):
        _cipher(bytes(32)).open("urn:devid:sensor:a", "credential", sealed)
    with pytest.raises(StateError, match="truncated"):
        cipher.open("urn:devid:sensor:a", "credential", sealed[:20])
    secret = SecretBytes(b"k" * 16)
    assert cipher.fingerprint(secret) == _cipher().fingerprint(secret)
    assert cipher.fingerprint(secret) != _cipher(bytes(32)).fingerprint(secret)


@pytest.mark.parametrize("key, reason", [
    (bytes(12), "12 bytes, at least 16 required"),
    (bytes(16), "only 1 distinct byte values"),
    (bytes(range(16)), "an arithmetic sequence"),
    (b"\x01\x02\x03\x04" * 4, "only 4 distinct byte values"),
    (b"correct horse ba", "printable text"),
])
def test_weak_factory_keys_are_refused_with_the_reason(key, reason):
    assert reason in (weak_key_reason(key, 16) or "")


def test_random_keys_pass():
    assert all(weak_key_reason(os.urandom(16), 16) is None for _ in range(200))


# --- imports ---------------------------------------------------------------------------

def _hex() -> str:
    return secrets.token_hex(16)


def test_a_csv_import_with_attributes():
    text = ("name,profile,transport,master_secret,master_salt,sender_id,psk_identity,psk,"
            "attr.site\n"
            f"t-1,temperature,oscore,{_hex()},0102030405060708,a1,,,plant-7\n"
            f"t-2,temperature,dtls-psk,,,,factory-22,{_hex()},plant-7\n")
    sensors = parse_import(text, "batch.csv")
    assert [s.name for s in sensors] == ["t-1", "t-2"]
    assert sensors[0].credential.kid == b"\xa1" and sensors[0].attributes == {"site": "plant-7"}
    assert sensors[1].credential.kid == b"factory-22"


def test_an_import_names_every_problem_and_imports_nothing():
    key = _hex()
    text = ("name,profile,transport,master_secret,sender_id,psk_identity,psk\n"
            f"a,temp,oscore,{'00' * 16},01,,\n"
            f"b,temp,oscore,{key},02,,\n"
            f"c,temp,oscore,{key},03,,\n"
            f"b,temp,dtls-psk,,,devid-s5,{_hex()}\n"
            f"d,temp,carrier-pigeon,,,,\n"
            f"e,temp,oscore,{_hex()[:20]},04,,\n"
            f"f,temp,oscore,{_hex()},02,,\n"
            f"g,temp,oscore,zz,05,,\n")
    with pytest.raises(ImportRefused) as refused:
        parse_import(text, "batch.csv")
    problems = refused.value.problems
    assert "line 2: master_secret: only 1 distinct byte values in 16" in problems[0]
    assert "line 5: psk_identity: devid-s… is reserved for minted identities" in problems
    assert ("line 6: transport: 'carrier-pigeon', expected one of oscore, dtls-psk "
            "(EDHOC sensors are added with `sensors add`)") in problems
    assert "line 7: master_secret: 10 bytes, at least 16 required" in problems
    assert "line 9: master_secret: not hex" in problems
    assert "line 4: the same key as line 3" in problems
    assert "line 8: sender_id/psk_identity: the same as line 3" in problems
    assert "nothing was imported" in refused.value.summary
    assert "\n  line 7: master_secret: 10 bytes, at least 16 required" in refused.value.message


def test_json_imports_and_garbage_files():
    doc = [{"name": "h-1", "profile": "humidity", "transport": "dtls-psk",
            "psk_identity": "hum-1", "psk": _hex(), "attributes": {"zone": "north"}}]
    assert parse_import(json.dumps(doc), "f.json")[0].attributes == {"zone": "north"}
    for text, message in (("{", "not valid JSON"), ('{"a": 1}', "expected a JSON list"),
                          ("", "expected a CSV header row"),
                          ("name,profile\nx,y,z\n", "more fields than the header")):
        with pytest.raises(ImportRefused) as refused:
            parse_import(text, "f.json" if text.startswith("{") else "f.csv")
        assert message in refused.value.message + " ".join(refused.value.problems)


# --- the store ---------------------------------------------------------------------------

def test_added_sensors_get_derived_ids_unique_kids_and_sealed_keys(store, tmp_path):
    (sensor, credential), = store.add([NewSensor("t-1", "temperature", "oscore",
                                                 {"site": "plant-7"})], NOW)
    assert sensor.id == sensor_id(store.registry_id, 1) and sensor.kid == b"\x01"
    assert store.get("t-1") == store.get(sensor.id) == sensor
    assert store.credential(sensor) == credential
    assert (tmp_path / "sensors.db").stat().st_mode & 0o777 == 0o600
    raw = (tmp_path / "sensors.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("sensors.db-*"))
    assert credential.secret.reveal() not in raw  # sealed at rest
    with pytest.raises(SensorError, match="'t-1': its name is already in the registry"):
        store.add([NewSensor("t-1", "temperature")], NOW)
    with pytest.raises(SensorError, match="profile: 'Bad Profile'"):
        store.add([NewSensor("t-2", "Bad Profile")], NOW)


def test_a_batch_of_ten_thousand_in_one_call(store):
    added = store.add([NewSensor(f"batch-{i:05d}", "temperature", "dtls-psk")
                       for i in range(10_000)], NOW)
    assert len({s.id for s, _ in added}) == len({c.kid for _, c in added}) == 10_000
    assert store.counts() == {"active": 10_000, "quarantined": 0, "revoked": 0}


def test_status_rekey_and_remove_and_serials_are_never_reused(store):
    (sensor, first), = store.add([NewSensor("t-1", "temperature")], NOW)
    assert store.set_status("t-1", "quarantined", "odd intervals", NOW).status == "quarantined"
    assert store.set_status("t-1", "active", None, NOW).status == "active"
    store.set_status("t-1", "revoked", "stolen", NOW)
    with pytest.raises(SensorError, match="is revoked; a revoked credential is not used again"):
        store.set_status("t-1", "active", None, NOW)
    rekeyed, second = store.rekey("t-1", NOW)
    assert rekeyed.status == "active" and second.kid == first.kid
    assert second.secret != first.secret and store.credential(rekeyed) == second
    store.remove("t-1")
    with pytest.raises(SensorNotFound, match="no sensor named 't-1'"):
        store.get("t-1")
    (again, _), = store.add([NewSensor("t-1", "temperature")], NOW)
    assert again.serial == 2 and again.id != sensor.id


def test_imports_collide_with_the_registry_by_name_kid_and_key(store):
    (_, credential), = store.add([NewSensor("t-1", "temperature")], NOW)
    text = ("name,profile,transport,master_secret,sender_id\n"
            f"t-1,temp,oscore,{_hex()},0a\n"
            f"t-2,temp,oscore,{_hex()},01\n"
            f"t-3,temp,oscore,{credential.secret.reveal().hex()},0b\n")
    with pytest.raises(ImportRefused) as refused:
        store.import_sensors(parse_import(text, "f.csv"), NOW)
    assert refused.value.problems == [
        "line 2: name: already used by sensor t-1",
        "line 3: sender_id/psk_identity: already used by sensor t-1",
        "line 4: key: already used by sensor t-1"]
    assert [s.name for s in store.list()] == ["t-1"]
    # A minted Sender ID never lands on an imported one: serial 3's form is taken here.
    store.import_sensors(parse_import("name,profile,transport,master_secret,sender_id\n"
                                      f"f-2,temp,oscore,{_hex()},03\n", "f.csv"), NOW)
    (third, _), = store.add([NewSensor("t-3", "temperature")], NOW)
    assert third.serial == 3 and third.kid != b"\x03" and len(third.kid) == 7


def test_a_registry_opened_with_another_data_key_is_refused(tmp_path):
    SensorStore(tmp_path / "sensors.db", _cipher()).add([NewSensor("t-1", "temp")], NOW)
    with pytest.raises(StateError, match="sealed under another data key"):
        SensorStore(tmp_path / "sensors.db", _cipher(bytes(32)))


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "sensors.db"
    SensorStore(path, _cipher()).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 9")
    with pytest.raises(StateError, match="schema version 9 is newer than this devid-broker"):
        SensorStore(path, _cipher())


def test_a_version_1_registry_is_upgraded_in_place(tmp_path):
    import sqlite3

    path = tmp_path / "sensors.db"
    cipher = _cipher()
    store = SensorStore(path, cipher)
    [(sensor, _)] = store.add([NewSensor("t-1", "temperature")], NOW)
    store.close()
    # What the first broker release wrote: no auth_failures, no OSCORE replay state.
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE sensors DROP COLUMN auth_failures")
    db.execute("DROP TABLE oscore_state")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    upgraded = SensorStore(path, cipher)
    assert upgraded.get("t-1").auth_failures == 0
    upgraded.save_oscore_state([(sensor.serial, 16, None)])
    assert upgraded.oscore_state(sensor.serial) == (16, None)


def test_a_version_2_registry_takes_edhoc_sensors_and_never_reuses_a_serial(tmp_path):
    import sqlite3

    path = tmp_path / "sensors.db"
    cipher = _cipher()
    store = SensorStore(path, cipher)
    store.add([NewSensor("t-1", "temperature"), NewSensor("t-2", "temperature")], NOW)
    store.remove("t-2")
    key = store.credential(store.get("t-1")).secret.reveal()
    store.close()
    # What version 2 wrote: the same table, with transports oscore and dtls-psk only.
    db = sqlite3.connect(path)
    create = db.execute("SELECT sql FROM sqlite_master WHERE name = 'sensors'").fetchone()[0]
    db.execute("PRAGMA writable_schema = ON")
    db.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'sensors'",
               (create.replace(", 'edhoc'", ""),))
    db.execute("PRAGMA writable_schema = OFF")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    with sqlite3.connect(path) as check:
        assert "'edhoc'" not in check.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'sensors'").fetchone()[0]
    upgraded = SensorStore(path, cipher)
    assert upgraded.credential(upgraded.get("t-1")).secret.reveal() == key
    [(edhoc, credential)] = upgraded.add([NewSensor("e-1", "temperature", "edhoc")], NOW)
    assert edhoc.serial == 3  # not t-2's
    assert credential.transport == "edhoc"
    assert upgraded.find("edhoc", edhoc.kid) is not None


def test_edhoc_credentials_name_the_gateways_key_and_survive_sealing(tmp_path):
    import cbor2

    store = SensorStore(tmp_path / "sensors.db", _cipher())
    added = store.add([NewSensor(f"e-{n}", "temperature", "edhoc") for n in range(2)], NOW)
    key, gateway = store.gateway_edhoc_key()
    assert store.gateway_edhoc_key() == (key, gateway)  # made once, then kept
    for sensor, credential in added:
        assert credential.gateway_credential == gateway
        assert store.credential(sensor) == credential
        ccs = cbor2.loads(credential.credential)
        assert ccs[8][1][2] == sensor.kid and len(ccs[8][1][-2]) == 32
    assert added[0][1].private_key.reveal() != added[1][1].private_key.reveal()
    # Rekeyed: a new key, the same key ID.
    sensor, credential = added[0]
    _, fresh = store.rekey(sensor.name, NOW)
    assert fresh.kid == sensor.kid and fresh.private_key.reveal() != \
        credential.private_key.reveal()
