"""The gateway as an LwM2M Gateway (/25) of an upstream LwM2M server nobody here wrote:
lwm2m-node-lib's server, behind a DTLS front that requires the gateway's certificate
(tests/lwm2m_peer.py, DtlsCertRelay).

Checked: the gateway registers over DTLS with its own certificate, with /25 and one
instance per registered sensor; an Update follows when a sensor comes or goes; the
server reads and observes a sensor's resource through its prefix, as the sensor's
profile grants the upstream, and is refused (4.03) where it does not; the server reads
/25 itself; after a certificate rotation the gateway handshakes again with the new
certificate and the registration stays (no second Register); a server whose certificate
does not name the address is refused."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiocoap import Code, Message
from coap_loadgen import raw_client
from lwm2m_peer import (
    DtlsCertRelay,
    DtlsRelay,
    NodeLwm2mClient,
    NodeLwm2mServer,
    aiocoap_lwm2m_server,
)
from mtls import server_identity
from oscore_sensor import MemoryContext
from processes import wait_until
from stack import DEMO_POLICY, free_udp_port

from agent.lwm2m.content import decode

POLICY = DEMO_POLICY + """
[profiles.meter]
[profiles.meter.lwm2m]
min_lifetime = 1
max_lifetime = 3600
[[profiles.meter.lwm2m.grants]]
who = ["operator", "upstream"]
operations = ["read", "observe"]
paths = ["/3303/*/5700"]
"""


def _upstream_toml(port: int, bundle: str) -> str:
    return (f'[lwm2m_upstream]\nurl = "coaps://127.0.0.1:{port}"\nbundle = "{bundle}"\n'
            'endpoint = "gw-1"\nlifetime = 60\ntimeout = "5s"\n')


@pytest.mark.parametrize("registrar_settings",
                         [{"cert_lifetime": '"60s"', "renewal_window": '"0s"'}])
def test_the_lwm2m_server_manages_a_sensor_through_the_gateway_by_prefix(
        broker_stack_factory, gateway_agent, tmp_path):
    agent, registrar = gateway_agent
    cert, key, ca_pem = server_identity(tmp_path / "lwm2m-tls")
    (tmp_path / "lwm2m-ca.pem").write_text(ca_pem)
    server = NodeLwm2mServer(free_udp_port())
    relay = DtlsCertRelay(server.port, cert, key, registrar.ca.read_text())
    sensor_relay = client = None
    try:
        stack = broker_stack_factory(_upstream_toml(relay.port, tmp_path / "lwm2m-ca.pem"),
                                     policy=POLICY)
        broker = stack.broker
        registered = server.wait_for("registration")
        assert (registered["endpoint"], registered["version"], registered["binding"]) == \
            ("gw-1", "1.2", "U")
        assert "</25>;ver=2.0" in registered["payload"]
        assert "</25/" not in registered["payload"]  # no sensor yet
        [(_, first_serial, subject)] = relay.sessions
        _, status = agent.ctl_json("status")
        assert first_serial == int(status["tls_certificate"]["serial"], 16)

        # A sensor registers at the gateway: the gateway tells the server (an Update with
        # its /25 instance), and the server reads the sensor's resource by prefix.
        added = stack.add("n-1", "--profile", "meter", "--transport", "dtls-psk")
        credential = added["credential"]
        sensor_relay = DtlsRelay(broker.dtls_port, credential["psk_identity"],
                                 bytes.fromhex(credential["psk"]))
        client = NodeLwm2mClient(sensor_relay.port, "n-1", lifetime=120)
        assert client.next_event().get("error") is None
        gateway = broker.ctl_json("show", "n-1")[1]["lwm2m"]["gateway"]
        serial = gateway["instance"]
        assert gateway["prefix"] == "n-1"
        update = server.wait_for("update")
        assert f"</25/{serial}>" in update["payload"], update
        read = server.request("read gw-1 /n-1/3303/0/5700")
        assert (read["value"], read["error"]) == ("21.5", None), read
        # /25 itself, from the gateway: the sensor's device ID and prefix.
        prefix = server.request(f"read gw-1 /25/{serial}/1")
        assert prefix["value"] == "n-1", prefix
        device = server.request(f"read gw-1 /25/{serial}/0")
        assert device["value"] == added["id"], device
        # Not granted to the upstream: refused, and the sensor is not asked.
        refused = server.request("read gw-1 /n-1/3/0/0")
        assert refused["value"] is None and "4.03" in refused["error"], refused
        unknown = server.request("read gw-1 /nobody/3303/0/5700")
        assert (unknown["error"] or "").startswith("RESOURCE_NOT_FOUND"), unknown  # 4.04

        # Observe, relayed: the sensor's notification reaches the server.
        server.send("observe gw-1 /n-1/3303/0/5700")
        first = server.wait_for("observe")
        assert (first["value"], first["error"]) == ("21.5", None), first
        assert client.command("set /3303/0 5700 23.5")["error"] is None
        assert server.wait_for("notify")["value"] == "23.5"

        # A rotation: a new session with the new certificate, the same registration.
        renewed = agent.ctl("renew", "--wait")
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
        _, status = agent.ctl_json("status")
        new_serial = int(status["tls_certificate"]["serial"], 16)
        wait_until(lambda: any(s == new_serial for _, s, _ in relay.sessions),
              "a session with the new certificate")
        assert [s for _, _, s in relay.sessions] == [subject] * len(relay.sessions)
        read = server.request("read gw-1 /n-1/3303/0/5700")
        assert read["value"] == "23.5", read
        upstream = stack.status()["lwm2m_upstream"]
        assert upstream["state"] == "registered" and upstream["totals"]["registered"] == 1
        assert upstream["certificate_serial"] is not None
        assert int(upstream["certificate_serial"], 16) == new_serial
        assert upstream["totals"]["relayed.read"] >= 2

        # The sensor de-registers: an Update without its instance.
        assert client.command("deregister")["error"] is None
        update = wait_until(lambda: (lambda u: u if f"</25/{serial}>" not in u["payload"] else
                                None)(server.wait_for("update")), "an Update without it")
        assert "</25>;ver=2.0" in update["payload"]
        # What the server saw carries nothing of the sensor's credential.
        seen = "".join(server.seen)
        assert credential["psk"] not in seen and credential["psk"].upper() not in seen
        assert credential["psk_identity"] not in seen
        audit = [json.loads(line) for line in
                 (broker.directory / "state" / "audit.log").read_text().splitlines()]
        relayed = [(r["operation"], r["path"], r.get("answer"), r.get("refused", "")[:30])
                   for r in audit if r["event"] == "lwm2m-operation"
                   and r["caller"] == "upstream"]
        assert ("read", "/3303/0/5700", "2.05", "") in relayed, relayed
        assert ("read", "/3/0/0", None, "profile meter grants the upstr") in relayed
    finally:
        if client is not None:
            client.close()
        if sensor_relay is not None:
            sensor_relay.close()
        relay.close()
        server.close()


def test_a_server_whose_certificate_does_not_name_its_address_is_refused(
        broker_stack_factory, gateway_agent, tmp_path):
    # A certificate for 127.0.0.1, served on 127.0.0.2: the chain is good, the name not.
    _, registrar = gateway_agent
    cert, key, ca_pem = server_identity(tmp_path / "lwm2m-tls")
    (tmp_path / "lwm2m-ca.pem").write_text(ca_pem)
    relay = DtlsCertRelay(free_udp_port(), cert, key, registrar.ca.read_text(),
                          host="127.0.0.2")
    try:
        stack = broker_stack_factory(
            _upstream_toml(relay.port, tmp_path / "lwm2m-ca.pem").replace(
                "127.0.0.1", "127.0.0.2"), policy=POLICY)
        upstream = wait_until(lambda: (lambda u: u if u["error"] else None)(
            stack.status()["lwm2m_upstream"]), "the refusal")
        assert "does not name 127.0.0.2" in upstream["error"], upstream
        assert upstream["state"].startswith("retrying")
    finally:
        relay.close()


def test_many_sensors_go_up_block_wise_and_a_restarted_server_gets_a_new_register(
        broker_stack_factory, gateway_agent, tmp_path):
    """150 sensors: the Register's object list and a Read of /25 no longer fit one
    datagram (Block1 up, Block2 down, with aiocoap's server on the other side: the Node
    library's CoAP does not do Block1). Then the server goes down (close_notify) and
    comes back knowing nothing: the gateway makes a new session and registers again."""
    _, registrar = gateway_agent
    cert, key, ca_pem = server_identity(tmp_path / "lwm2m-tls")
    (tmp_path / "lwm2m-ca.pem").write_text(ca_pem)
    server_port = free_udp_port()
    relay = DtlsCertRelay(server_port, cert, key, registrar.ca.read_text())
    relay_port = relay.port
    stack = broker_stack_factory(_upstream_toml(relay_port, tmp_path / "lwm2m-ca.pem"),
                                 policy=POLICY)
    broker = stack.broker
    batch = tmp_path / "batch.json"
    code, added = broker.ctl_json("add", "--count", "150", "--prefix", "m-", "--profile",
                                  "meter", "--out", str(batch))
    assert code == 0, added
    sensors = json.loads(batch.read_text())
    sensors = sensors["sensors"] if isinstance(sensors, dict) else sensors

    async def scenario() -> None:
        server, rd = await aiocoap_lwm2m_server(server_port)
        try:
            await asyncio.wait_for(rd.registered.wait(), 30)
            client = await raw_client(broker.oscore_port)
            try:
                for sensor in sensors:
                    register = Message(code=Code.POST, uri_path=("rd",),
                                       payload=b"</3/0>,</3303/0>")
                    register.opt.content_format = 40
                    register.opt.uri_query = (f"ep={sensor['name']}", "lt=600")
                    answer = await client.exchange(
                        register, MemoryContext.of(sensor["credential"]), timeout=10)
                    assert answer.code == Code.CREATED, answer
            finally:
                client.close()
            for _ in range(100):  # the Update with all of them (at most one a second)
                if rd.payload.count(b"</25/") == 150:
                    break
                rd.changed.clear()
                await asyncio.wait_for(rd.changed.wait(), 10)
            assert len(rd.payload) > 1024 and rd.payload.startswith(b'</>;rt="oma.lwm2m"')
            request = Message(code=Code.GET, uri_path=("25",))
            request.remote = rd.remote
            answer = await asyncio.wait_for(server.request(request).response, 20)
            assert answer.code == Code.CONTENT and len(answer.payload) > 1024
            values = decode(int(answer.opt.content_format), answer.payload, (25,))
            prefixes = {v.value for v in values if v.path.endswith("/1")}
            assert prefixes == {s["name"] for s in sensors}
            assert rd.registers == 1
        finally:
            await server.shutdown()

    try:
        asyncio.run(scenario())
    finally:
        relay.close()  # the server goes down; the gateway hears close_notify
    wait_until(lambda: stack.status()["lwm2m_upstream"]["state"] != "registered",
          "the gateway noticed")
    relay = DtlsCertRelay(server_port, cert, key, registrar.ca.read_text(), port=relay_port)

    async def restarted() -> None:
        server, rd = await aiocoap_lwm2m_server(server_port)
        try:
            await asyncio.wait_for(rd.registered.wait(), 60)
            assert rd.payload.count(b"</25/") == 150
        finally:
            await server.shutdown()

    try:
        asyncio.run(restarted())
        upstream = wait_until(lambda: (lambda u: u if u["state"] == "registered" else None)(
            stack.status()["lwm2m_upstream"]), "registered again")
        assert upstream["totals"]["registered"] == 2 and upstream["handshakes"] == 2
    finally:
        relay.close()
