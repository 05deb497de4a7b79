"""The broker's policy: parsing with messages naming the key, and decisions. Pure."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.policy.decide import Message, Rates, decide
from agent.policy.model import parse_policy
from agent.sensors.model import Sensor

POLICY = """
[profiles.temperature]
description = "outdoor temperature sensors"

[[profiles.temperature.rules]]
name = "telemetry"
methods = ["POST", "PUT"]
path = "/telemetry"
upstream = "sensors/{sensor}/telemetry"
max_payload = 64
content_formats = [60, 112]
rate = 6
burst = 2
when = { site = ["plant-7", "plant-8"] }
spool = true

[[profiles.temperature.rules]]
name = "logs"
methods = ["POST"]
path = "/logs/**"
upstream = "sites/{attr.site}/{sensor}/logs/{rest}"
hours = ["22:00-06:00"]

[profiles.pump]
"""
NOON = datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.UTC)
NIGHT = datetime.datetime(2026, 11, 23, 23, 30, tzinfo=datetime.UTC)


def _sensor(**change: object) -> Sensor:
    base = dict(serial=1, id="urn:devid:sensor:ab", name="t-1", profile="temperature",
                transport="oscore", status="active", kid=b"\x01",
                attributes={"site": "plant-7"})
    return Sensor(**{**base, **change})  # type: ignore[arg-type]


@pytest.fixture
def policy(tmp_path):
    return parse_policy(POLICY, tmp_path / "policy.toml")


def test_a_granted_message_goes_to_its_own_namespace(policy):
    d = decide(policy, _sensor(), Message("POST", "/telemetry", 20, 60), NOON, None)
    assert d.allowed and d.rule == "telemetry" and d.spool
    assert d.upstream == "sensors/urn:devid:sensor:ab/telemetry"
    d = decide(policy, _sensor(), Message("POST", "/logs/boot/1", 10), NIGHT, None)
    assert d.allowed and d.upstream == "sites/plant-7/urn:devid:sensor:ab/logs/boot/1"


@pytest.mark.parametrize("sensor, message, when, reason", [
    ({}, Message("GET", "/telemetry"), NOON,
     "rule telemetry allows POST, PUT on /telemetry, not GET"),
    ({}, Message("POST", "/other"), NOON, "no rule of profile temperature grants POST /other"),
    ({"attributes": {"site": "plant-9"}}, Message("POST", "/telemetry", 1, 60), NOON,
     "rule telemetry: attribute site=plant-9 is not plant-7 or plant-8"),
    ({}, Message("POST", "/telemetry", 65, 60), NOON,
     "rule telemetry: payload of 65 bytes, at most 64"),
    ({}, Message("POST", "/telemetry", 1, 50), NOON,
     "rule telemetry: Content-Format 50 is not one of 60, 112"),
    ({}, Message("POST", "/telemetry", 1, None), NOON,
     "rule telemetry: Content-Format None is not one of 60, 112"),
    ({}, Message("POST", "/logs/x"), NOON, "rule logs: outside its hours 22:00-06:00 UTC"),
    ({}, Message("POST", "/logs/../../other-sensor"), NIGHT,
     "no rule of profile temperature grants POST /logs/../../other-sensor"),
    ({}, Message("POST", "/logs"), NIGHT, "no rule of profile temperature grants POST /logs"),
    ({"attributes": {"site": "a/b"}}, Message("POST", "/logs/x"), NIGHT,
     "rule logs: a value in 'sites/{attr.site}/{sensor}/logs/{rest}' is unset or has"),
    ({"attributes": {}}, Message("POST", "/logs/x"), NIGHT, "is unset"),
    ({"status": "quarantined"}, Message("POST", "/telemetry", 1, 60), NOON,
     "sensor t-1 is quarantined"),
    ({"profile": "valve"}, Message("POST", "/telemetry", 1, 60), NOON,
     "profile 'valve' is not in the policy: nothing is granted"),
    ({"profile": "pump"}, Message("POST", "/telemetry", 1, 60), NOON,
     "no rule of profile pump grants POST /telemetry"),
])
def test_denied_by_default_with_the_reason(policy, sensor, message, when, reason):
    decision = decide(policy, _sensor(**sensor), message, when, None)
    assert not decision.allowed and reason in decision.reason, decision


def test_the_rate_is_per_sensor_and_rule_and_used_only_by_allowed_messages(policy):
    now = [0.0]
    rates = Rates(lambda: now[0])
    ok = Message("POST", "/telemetry", 1, 60)
    assert not decide(policy, _sensor(), Message("POST", "/telemetry", 99, 60), NOON,
                      rates).allowed  # too big: no token used
    assert [decide(policy, _sensor(), ok, NOON, rates).allowed for _ in range(3)] == \
        [True, True, False]
    denied = decide(policy, _sensor(), ok, NOON, rates)
    assert "rate of 6/min (burst 2) reached; room again in 10.0s" in denied.reason
    assert decide(policy, _sensor(id="urn:devid:sensor:cd"), ok, NOON, rates).allowed
    now[0] = 10.0
    assert decide(policy, _sensor(), ok, NOON, rates).allowed


@pytest.mark.parametrize("rule, message", [
    ('upstream = "telemetry/all"', "must contain {sensor}"),
    ('upstream = "t/{sensor}/{user}"', "unknown variable {user}"),
    ('upstream = "t/{sensor}/{rest}"', "the path must end with '/**'"),
    ('upstream = "t/{sensor}/../x"', "'..' is not a path segment here"),
    ('upstream = "t/{sensor}"\npath = "/a/**/b"', "'**' only as the last segment"),
    ('upstream = "t/{sensor}"\npath = "telemetry"', "a path starts with '/'"),
    ('upstream = "t/{sensor}"\nhours = ["6-22"]', "expected HH:MM-HH:MM (UTC)"),
    ('upstream = "t/{sensor}"\nmax_payload = -1', "max_payload"),
    ('upstream = "t/{sensor}"\nmethods = ["BREW"]', "methods[0]"),
    ('upstream = "t/{sensor}"\nfrobnicate = 1', "frobnicate: unknown key"),
])
def test_a_bad_rule_is_refused_naming_profile_rule_and_key(tmp_path, rule, message):
    text = "[profiles.t]\n[[profiles.t.rules]]\nname = \"r\"\n"
    if "methods =" not in rule:
        text += 'methods = ["POST"]\n'
    if "path =" not in rule:
        text += 'path = "/x"\n'
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_policy(text + rule + "\n", tmp_path / "policy.toml")


def test_an_empty_policy_grants_nothing(tmp_path):
    empty = parse_policy("", Path(tmp_path / "policy.toml"))
    assert not decide(empty, _sensor(), Message("POST", "/telemetry", 1, 60), NOON,
                      None).allowed
