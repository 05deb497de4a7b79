"""`devidctl check`'s broker lines, judged from status documents like the broker's."""

from __future__ import annotations

import copy

from agent.cli.render import render_check, render_status
from agent.diagnostics.broker import check_broker
from agent.diagnostics.checks import Level
from agent.diagnostics.suite import with_results

HEALTHY = {
    "state": "OK", "headline": "2 sensors active, 0 quarantined, 0 revoked",
    "broker": {"version": "0.1.0"},
    "sensors": {"counts": {"active": 2, "quarantined": 0, "revoked": 0}},
    "oscore": {"address": "[::]:5683", "listening": True, "contexts": 1},
    "dtls": {"address": "[::]:5684", "listening": True, "sessions": 0},
    "policy": {"file": "/etc/devid-broker/policy.toml", "exists": True,
               "profiles": {"temperature": 1}, "insecure_profiles": [], "error": None},
    "upstreams": {"cloud": {"url": "coaps+tcp://up:5684", "last_error": None}},
    "gateway_credentials": {"serial": "abc", "withdrawn": None, "error": None},
    "spool": {"messages": 0},
    "traffic": {"totals": {"forwarded": 4, "refused.denied": 1}},
    "lwm2m": {"registered": 2, "offline": 0, "totals": {}},
    "lwm2m_bootstrap": {"requested": 1, "finished": 1, "failed": 0, "running": 0},
    "firmware": {"started": 0, "updated": 0, "failed": 0, "running": 0},
}


def _levels(doc):
    return {r.name: r.level for r in check_broker(doc)}


def _with(**changes):
    doc = copy.deepcopy(HEALTHY)
    for path, value in changes.items():
        section, key = path.split("__")
        doc[section][key] = value
    return doc


def test_a_healthy_broker_passes_its_four_checks():
    assert _levels(HEALTHY) == {"broker": Level.PASS, "broker-policy": Level.PASS,
                                "broker-upstreams": Level.PASS, "broker-lwm2m": Level.PASS}


def test_lwm2m_trouble_is_a_warning_that_says_what():
    for changes, said in (({"lwm2m__offline": 3}, "3 offline"),
                          ({"lwm2m_bootstrap__failed": 1}, "1 bootstrap(s) failed"),
                          ({"firmware__failed": 2}, "2 firmware update(s) failed")):
        [result] = [r for r in check_broker(_with(**changes)) if r.name == "broker-lwm2m"]
        assert result.level is Level.WARN and said in result.summary, result


def test_each_problem_names_its_check():
    assert _levels(_with(oscore__listening=False, dtls__listening=False))["broker"] \
        is Level.WARN
    refused = _with(policy__error={"message": "line 3: bad"})
    assert _levels(refused)["broker-policy"] is Level.FAIL
    assert _levels(_with(policy__insecure_profiles=["legacy"]))["broker-policy"] is Level.WARN
    assert _levels(_with(policy__profiles={}))["broker-policy"] is Level.WARN
    withdrawn = _with(gateway_credentials__withdrawn="revoked", gateway_credentials__serial=None)
    [result] = [r for r in check_broker(withdrawn) if r.name == "broker-upstreams"]
    assert result.level is Level.FAIL and "revoked" in result.summary
    failing = _with(spool__messages=3)
    failing["upstreams"]["cloud"]["last_error"] = "connection refused"
    [result] = [r for r in check_broker(failing) if r.name == "broker-upstreams"]
    assert result.level is Level.WARN and "connection refused" in result.summary \
        and "3 message(s)" in result.summary
    [down] = check_broker(None, "connection refused")
    assert (down.name, down.level) == ("broker", Level.FAIL)


def test_merged_into_the_agents_check_document_and_rendered():
    agent_doc = {"state": "OK", "summary": "1 passed",
                 "results": [{"name": "clock", "level": "pass", "summary": "ok",
                              "checked": True}]}
    merged = with_results(agent_doc, check_broker(_with(policy__insecure_profiles=["x"])))
    assert merged["state"] == "WARN" and merged["summary"] == "4 passed, 1 warning"
    text = render_check(merged)
    assert "WARN  broker-policy    profile(s) x accept plain CoAP" in text
    status = render_status({"state": "OK", "devid_broker": HEALTHY})
    assert "broker     OK: 2 sensors active" in status and "cloud   coaps+tcp://up:5684: ok" \
        in status


def test_the_lwm2m_upstream_registration_is_checked_and_shown():
    registered = copy.deepcopy(HEALTHY)
    registered["lwm2m_upstream"] = {"url": "coaps://lwm2m:5684", "endpoint": "gw-1",
                                    "state": "registered", "sensors": 2}
    [result] = [r for r in check_broker(registered) if r.name == "broker-lwm2m"]
    assert result.level is Level.PASS and "registered upstream at coaps://lwm2m:5684 as " \
        "gw-1" in result.summary
    status = render_status({"state": "OK", "devid_broker": registered})
    assert "lwm2m-up coaps://lwm2m:5684: registered as gw-1, 2 sensors under /25" in status
    failing = copy.deepcopy(registered)
    failing["lwm2m_upstream"]["state"] = "retrying: no DTLS handshake within 10 s"
    [result] = [r for r in check_broker(failing) if r.name == "broker-lwm2m"]
    assert result.level is Level.WARN and "not registered with the LwM2M server " \
        "coaps://lwm2m:5684 (retrying: no DTLS handshake" in result.summary
