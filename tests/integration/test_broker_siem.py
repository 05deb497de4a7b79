"""Events out to a SIEM: rsyslog from Debian as the collector, over TLS with the
gateway's certificate (RFC 5425).

Checked: the broker's events (started, a sensor added, a denial, a quarantine) reach
rsyslog in order, which parses each as RFC 5424 with the event as MSGID and its fields
as structured data; the same as JSON lines; while rsyslog is down the broker goes on
forwarding sensors' traffic, the events wait in the bounded queue, the ones past it are
dropped and counted, and the rest arrive when rsyslog is back."""

from __future__ import annotations

import json

import cbor2
import pytest
from mtls import server_identity
from oscore_sensor import OscoreSensor
from processes import wait_until
from siem_peer import Rsyslog


def _siem_toml(port: int, bundle, framing: str = "syslog", queue: int = 10000) -> str:
    return (f'[siem]\nurl = "tls://127.0.0.1:{port}"\nbundle = "{bundle}"\n'
            f'framing = "{framing}"\nqueue = {queue}\n')


@pytest.fixture
def rsyslog(gateway_agent, tmp_path):
    _, registrar = gateway_agent
    cert, key, ca_pem = server_identity(tmp_path / "siem-tls")
    (tmp_path / "siem-ca.pem").write_text(ca_pem)
    collector = Rsyslog(tmp_path / "rsyslog", cert, key, registrar.ca).start()
    yield collector
    collector.stop()


@pytest.mark.parametrize("framing", ["syslog", "json"])
def test_events_reach_rsyslog_over_tls_in_order_with_their_fields(
        broker_stack_factory, rsyslog, tmp_path, framing):
    stack = broker_stack_factory(_siem_toml(rsyslog.port, tmp_path / "siem-ca.pem", framing))
    broker = stack.broker
    added = stack.add("t-1")
    sensor = OscoreSensor(tmp_path / "t-1", added["credential"], broker.oscore_port)
    stack.sensors.append(sensor)
    assert sensor.request("POST", "/config", cbor2.dumps({"x": 1}), 60).code == "4.03"
    assert broker.ctl("quarantine", "t-1", "--reason", "tests").returncode == 0
    wanted = ["broker-started", "sensor-added", "policy-denied", "sensor-changed"]
    if framing == "syslog":
        lines = wait_until(lambda: (lambda p: p if len(p) >= 4 else None)(rsyslog.parsed()),
                      "four events at rsyslog")
        assert [line[2] for line in lines] == wanted, lines
        pri, app, _, sd, msg = lines[3]
        assert (pri, app) == (str(10 * 8 + 4), "devid-broker")  # authpriv.warning
        assert sd.startswith('[devid@32473 event="sensor-changed" message_id="')
        assert f'sensor="{added["id"]}"' in sd and 'change="quarantine"' in sd, sd
        assert "t-1" in msg and "quarantine" in msg
        denied = lines[2][3]
        assert 'refusal="denied"' in denied and 'reason="' in denied
    else:
        lines = wait_until(lambda: (lambda r: r if len(r) >= 4 else None)(rsyslog.raw()),
                      "four events at rsyslog")
        docs = [json.loads(line[line.index("{"):]) for line in lines]
        assert [d["event"] for d in docs] == wanted
        assert docs[3]["sensor"] == added["id"] and docs[3]["change"] == "quarantine"
        assert docs[3]["severity"] == 4 and docs[3]["app"] == "devid-broker"
    status = stack.status()["siem"]
    assert status["connected"] and status["sent"] >= 4 and status["dropped"] == 0


def test_a_collector_outage_blocks_nothing_and_the_drops_are_counted(
        broker_stack_factory, rsyslog, tmp_path):
    stack = broker_stack_factory(_siem_toml(rsyslog.port, tmp_path / "siem-ca.pem",
                                            queue=10))
    broker = stack.broker
    wait_until(lambda: stack.status()["siem"]["sent"] >= 1, "broker-started sent")
    from agent.control import client

    rsyslog.stop()
    wait_until(lambda: not stack.status()["siem"]["connected"], "the outage noticed", 60)
    before = client.call(broker.socket, "events", {})["last"]
    added = stack.add("t-1")
    sensor = OscoreSensor(tmp_path / "t-1", added["credential"], broker.oscore_port)
    stack.sensors.append(sensor)
    # While it is away: sensor-added, 15 denials of which 10 are journaled (at most 10 a
    # minute per sensor), and the watch's finding about the denials.
    for n in range(15):
        assert sensor.request("POST", "/config", cbor2.dumps({"n": n}), 60).code == "4.03"
    # Forwarding goes on while the collector is away.
    assert sensor.request("POST", "/telemetry", cbor2.dumps({"t": 20}), 60).code == "2.04"
    away = [e["event"] for e in client.call(broker.socket, "events",
                                            {"after": before})["events"]]
    assert away.count("policy-denied") == 10 and "sensor-anomaly" in away, away
    status = stack.status()["siem"]
    assert status["queued"] == 10 and status["dropped"] == len(away) - 10, status
    rsyslog.start()  # back, on the same port and files
    wait_until(lambda: stack.status()["siem"]["queued"] == 0, "the queue sent", 90)
    names = wait_until(lambda: (lambda n: n if len(n) >= 11 else None)(
        [line[2] for line in rsyslog.parsed()]), "the queued events at rsyslog")
    # The oldest waiting made room for the newest: what arrived is the last 10, in order.
    assert names == ["broker-started", *away[-10:]], names
    assert stack.status()["siem"]["dropped"] == len(away) - 10


def test_the_agents_enrollment_events_reach_rsyslog_too(
        tpm, registrar_factory, agent_factory, tmp_path):
    from stack import enrollment_toml, rotation_toml

    registrar = registrar_factory([tpm.vendor_ca])
    cert, key, ca_pem = server_identity(tmp_path / "siem-tls")
    (tmp_path / "siem-ca.pem").write_text(ca_pem)
    collector = Rsyslog(tmp_path / "rsyslog", cert, key, registrar.ca).start()
    try:
        agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                              + rotation_toml()
                              + _siem_toml(collector.port, tmp_path / "siem-ca.pem"))
        agent.wait_enrollment("enrolled")
        lines = wait_until(lambda: (lambda p: p if any(line[2] == "enrolled" for line in p)
                               else None)(collector.parsed()), "enrolled at rsyslog", 30)
        names = [line[2] for line in lines]
        # Queued from the start, sent once enrolled: the certificate is what it presents.
        assert names[0] == "started" and "enrolled" in names, names
        enrolled = next(line for line in lines if line[2] == "enrolled")
        assert enrolled[1] == "devid-agent" and 'device_id="urn:' in enrolled[3], enrolled
        status = agent.ctl_json("status")[1]
        assert status["siem"]["connected"] and status["siem"]["dropped"] == 0, status
    finally:
        collector.stop()
