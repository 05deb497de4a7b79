"""Events as the SIEM gets them (agent/siem/): RFC 5424 with structured data, RFC 5425
octet counting, JSON lines; the tap that numbers them and the bounded queue that counts
what it drops. Pure; rsyslog reads them for real in test_broker_siem.py."""

from __future__ import annotations

import json
import logging

import pytest

from agent import events
from agent.errors import ConfigError
from agent.siem.format import Event, json_line, octet_counted, syslog_message
from agent.siem.forwarder import EventTap, SiemSender, event_of
from agent.siem.settings import parse_siem_url

EVENT = Event("sensor-anomaly", "0123456789abcdef0123456789abcdef", logging.WARNING,
              1_700_000_000.25, "sensor t-1: interval (score 12.0)",
              {"sensor": "urn:devid:sensor:1", "evidence": 'a "quoted" \\ and ] here'})


def test_an_event_is_an_rfc5424_message_with_structured_data() -> None:
    message = syslog_message(EVENT, "gw 7", "devid-broker", 812)
    header, rest = message.split(b" [", 1)
    assert header == b"<84>1 2023-11-14T22:13:20.250000Z gw_7 devid-broker 812 " \
        b"sensor-anomaly"
    sd, msg = rest.split(b"] \xef\xbb\xbf", 1)
    assert sd.decode() == ('devid@32473 event="sensor-anomaly" message_id="0123456789abcdef'
                           '0123456789abcdef" sensor="urn:devid:sensor:1" evidence="a '
                           '\\"quoted\\" \\\\ and \\] here"')
    assert msg == b"sensor t-1: interval (score 12.0)"
    assert octet_counted(message) == str(len(message)).encode() + b" " + message
    doc = json.loads(json_line(EVENT, "gw-7", "devid-broker"))
    assert doc["event"] == "sensor-anomaly" and doc["severity"] == 4
    assert doc["evidence"] == 'a "quoted" \\ and ] here' and doc["time"].endswith("Z")


def test_only_events_are_taken_numbered_and_kept() -> None:
    tap = EventTap(recent=3)
    logger = logging.getLogger("agent.test_siem")
    tap.attach(logger)
    try:
        logger.warning("a plain line")
        for n in range(4):
            events.emit(logger, "sensor-silent", "sensor s-%d is silent", n, sensor=f"s-{n}")
    finally:
        tap.detach(logger)
    assert tap.sequence == 4
    recent = tap.since(0)
    assert [e["seq"] for e in recent] == [2, 3, 4]  # the last 3 kept
    assert recent[-1]["fields"] == {"sensor": "s-3"} and recent[-1]["event"] == \
        "sensor-silent"
    assert tap.since(3) == recent[-1:]
    record = logging.LogRecord("x", logging.INFO, "", 0, "plain", (), None)
    assert event_of(record) is None


def test_a_full_queue_drops_the_oldest_and_counts() -> None:
    sender = SiemSender("tls://127.0.0.1:6514", "syslog", 10, "devid-broker",
                        lambda: None, "devid@32473", hostname="gw")
    for n in range(15):
        sender.put(Event("e", "0" * 32, logging.INFO, float(n), f"m{n}"))
    status = sender.status_section()
    assert (status["queued"], status["dropped"], status["sent"]) == (10, 5, 0)
    frame = sender.frame(Event("e", "0" * 32, logging.INFO, 0.0, "m"))
    length, message = frame.split(b" ", 1)
    assert int(length) == len(message) and message.startswith(b"<86>1 ")  # authpriv.info


@pytest.mark.parametrize(("url", "what"), [
    ("udp://siem:514", "expected tls://"), ("tls://", "expected tls://"),
    ("tls://siem:6514/x", "only a host and a port"), ("tls://siem:70000", "not a number")])
def test_a_bad_siem_url_is_refused_saying_why(url: str, what: str) -> None:
    with pytest.raises(ConfigError, match=what):
        parse_siem_url(url)


def test_status_shows_the_siem_sender_of_the_agent_and_of_the_broker() -> None:
    from agent.cli.render import render_status

    siem = {"url": "tls://siem:6514", "connected": False, "error": "ConnectionRefusedError",
            "sent": 7, "queued": 3, "dropped": 1}
    text = render_status({"state": "OK", "siem": siem,
                          "devid_broker": {"state": "OK", "headline": "1 sensors active",
                                           "siem": {**siem, "connected": True}}})
    assert "siem       tls://siem:6514: NOT CONNECTED (ConnectionRefusedError); 7 sent, " \
        "3 queued, 1 dropped" in text
    assert "siem    tls://siem:6514: connected; 7 sent" in text


@pytest.mark.parametrize("params", [{"after": -1}, {"after": "x"}, {"limit": True},
                                    {"limit": 2.5}])
def test_bad_events_requests_are_refused_and_change_nothing(params: dict[str, object]) -> None:
    import asyncio

    from agent.errors import ControlError

    tap = EventTap()
    logger = logging.getLogger("agent.test_siem_control")
    tap.attach(logger)
    try:
        events.emit(logger, "sensor-silent", "sensor s is silent", sensor="s")
    finally:
        tap.detach(logger)
    with pytest.raises(ControlError, match=r"events: (after|limit): expected a whole number"):
        asyncio.run(tap.control(params))
    assert tap.sequence == 1 and len(tap.since(0)) == 1
