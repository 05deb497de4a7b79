"""An MQTT upstream: mqtts:// (MQTT 5 over TLS, paho-mqtt), under the gateway's identity.

Fleets already run MQTT brokers (AWS IoT Core, Azure IoT Hub, EMQX,
mosquitto). A sensor's allowed POST or PUT becomes a QoS 1 publish to the
rule's `upstream` template, used as the topic (under the URL's path, if it has
one). The sensor gets 2.04 only once the broker has acknowledged the publish
(PUBACK). The publish carries the authenticated sensor ID as the MQTT 5 user
property `sensor`, and the payload's format as its content type. The sensor
has no say in either.

paho's network loop runs on the broker's event loop (paho's "external loop":
its socket callbacks register the socket with asyncio), not in a thread of
its own. A thread cost a wake-up byte per publish and GIL hand-overs; here
publishes queued in one turn of the loop go out in one write. Only the
blocking TCP connect and TLS handshake run in a worker thread. As with every
upstream, a rotation moves new publishes to a new connection with the new
certificate, and the old one is closed after its last acknowledgement.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.broker.gatewaycreds import GatewayCredentials
from agent.broker.upstream import Forward, Reply
from agent.broker.upstream.generations import Generations
from agent.errors import ConfigError, UpstreamError

log = logging.getLogger(__name__)

MQTTS_PORT = 8883
CHANGED, METHOD_NOT_ALLOWED = 68, 133  # CoAP 2.04, 4.05
CONNECT_TIMEOUT = 10.0
# CoAP Content-Format numbers (RFC 7252, RFC 8428) as MQTT 5 content types.
CONTENT_TYPES = {0: "text/plain;charset=utf-8", 40: "application/link-format",
                 41: "application/xml", 42: "application/octet-stream",
                 50: "application/json", 60: "application/cbor",
                 110: "application/senml+json", 112: "application/senml+cbor"}


def parse_mqtt_url(url: str) -> tuple[str, int, str]:
    """(host, port, topic prefix) of an mqtts URL; ConfigError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "mqtts":
        raise ConfigError(f"{url!r}: expected an mqtts:// URL (MQTT over TLS only)")
    try:
        port = parts.port or MQTTS_PORT
    except ValueError:
        raise ConfigError(f"{url!r}: the port is not a number from 1 to 65535") from None
    if "#" in url:
        raise ConfigError(f"{url!r}: a topic prefix cannot hold the wildcards + or #")
    if not parts.hostname or parts.query or parts.username:
        raise ConfigError(f"{url!r}: expected mqtts://HOST[:PORT][/TOPIC/PREFIX]")
    prefix = parts.path.strip("/")
    if any(c in prefix for c in "+#"):
        raise ConfigError(f"{url!r}: a topic prefix cannot hold the wildcards + or #")
    return parts.hostname, port, prefix


class _Connection:
    """One MQTT session: the paho client and the publishes waiting for their PUBACK."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.client: mqtt.Client | None = None
        self.connected: asyncio.Future[ReasonCode] = loop.create_future()
        self._lock = threading.Lock()
        self._waiting: dict[int, asyncio.Future[ReasonCode | None]] = {}
        self._early: dict[int, ReasonCode | None] = {}
        self.broken: str | None = None

    # paho's network thread ---------------------------------------------------------------

    def on_connect(self, _client: Any, _userdata: Any, _flags: Any, reason: ReasonCode,
                   _properties: Any) -> None:
        self.loop.call_soon_threadsafe(self._settle, self.connected, reason)

    def on_publish(self, _client: Any, _userdata: Any, mid: int, reason: ReasonCode | None,
                   _properties: Any) -> None:
        with self._lock:
            future = self._waiting.pop(mid, None)
            if future is None:
                self._early[mid] = reason  # acknowledged before publish() returned its mid
                return
        self.loop.call_soon_threadsafe(self._settle, future, reason)

    def on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: ReasonCode,
                      _properties: Any) -> None:
        self.loop.call_soon_threadsafe(self._lost, f"disconnected: {reason}")

    # the event loop -----------------------------------------------------------------------

    @staticmethod
    def _settle(future: asyncio.Future[Any], value: Any) -> None:
        if not future.done():
            future.set_result(value)

    def _lost(self, why: str) -> None:
        self.broken = why
        if not self.connected.done():
            self.connected.set_exception(UpstreamError(why))
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(UpstreamError(f"{why}; the publish was not acknowledged"))

    def expect(self, mid: int) -> asyncio.Future[ReasonCode | None]:
        future: asyncio.Future[ReasonCode | None] = self.loop.create_future()
        with self._lock:
            if mid in self._early:
                future.set_result(self._early.pop(mid))
            else:
                self._waiting[mid] = future
        return future


class _OnEventLoop:
    """paho's external-loop callbacks: its socket read, written and kept alive by the
    event loop. paho may call them from the thread that connects; they then hop over."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: mqtt.Client) -> None:
        self._loop, self._client = loop, client
        self._misc: asyncio.Task[None] | None = None
        client.on_socket_open = self._later(self._opened)
        client.on_socket_close = self._later(self._closed)
        client.on_socket_register_write = self._later(self._want_write)
        client.on_socket_unregister_write = self._later(self._wrote)

    def _later(self, action: Any) -> Any:
        def callback(_client: Any, _userdata: Any, sock: Any) -> None:
            if self._in_loop():
                action(sock)
            else:
                self._loop.call_soon_threadsafe(action, sock)
        return callback

    def _in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _opened(self, sock: Any) -> None:
        self._loop.add_reader(sock, self._read, sock)
        self._misc = self._loop.create_task(self._keepalive())

    def _read(self, sock: Any) -> None:
        self._client.loop_read()
        # TLS may hold decrypted bytes the socket no longer signals.
        if getattr(sock, "pending", lambda: 0)() > 0:
            self._loop.call_soon(self._read, sock)

    def _closed(self, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        if self._misc is not None:
            self._misc.cancel()

    def _want_write(self, sock: Any) -> None:
        self._loop.add_writer(sock, self._client.loop_write)

    def _wrote(self, sock: Any) -> None:
        self._loop.remove_writer(sock)

    async def _keepalive(self) -> None:
        while self._client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
            await asyncio.sleep(1.0)


class MqttUpstream:
    def __init__(self, name: str, url: str, trust: str | None,
                 credentials: GatewayCredentials, timeout: float = 10.0,
                 client_id: str = "devid-broker") -> None:
        self.name, self.url, self.timeout = name, url, timeout
        self._host, self._port, self._prefix = parse_mqtt_url(url)
        self._client_id = client_id
        self._connections: Generations[_Connection] = Generations(
            trust, credentials, self._open, self._close)
        self.published = 0
        self.last_error: str | None = None

    async def start(self) -> None:
        self._connections.start()

    async def _open(self, tls: ssl.SSLContext) -> _Connection:
        connection = _Connection(asyncio.get_running_loop())
        # A client ID per connection: the next generation's session must not take over
        # this one's while its last publishes are acknowledged.
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"{self._client_id}-{self._connections.opened + 1}",
                             protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        client.tls_set_context(tls)
        client.on_connect, client.on_publish = connection.on_connect, connection.on_publish
        client.on_disconnect = connection.on_disconnect
        connection.client = client
        _OnEventLoop(connection.loop, client)
        try:
            await asyncio.to_thread(client.connect, self._host, self._port, 30)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise UpstreamError(f"{self.url}: cannot connect: {e}") from None
        try:
            reason = await asyncio.wait_for(connection.connected, CONNECT_TIMEOUT)
        except TimeoutError:
            await self._close(connection)
            raise UpstreamError(f"{self.url}: no CONNACK in {CONNECT_TIMEOUT:g}s") from None
        except UpstreamError:
            await self._close(connection)
            raise
        if reason.is_failure:
            await self._close(connection)
            raise UpstreamError(f"{self.url}: the broker refused the connection: {reason}")
        return connection

    @staticmethod
    async def _close(connection: _Connection) -> None:
        client = connection.client
        if client is not None:
            client.disconnect()  # queues DISCONNECT; the event loop writes it and closes

    def topic(self, request: Forward) -> str:
        path = request.path.strip("/")
        return f"{self._prefix}/{path}" if self._prefix else path

    async def forward(self, request: Forward) -> Reply:
        if request.method not in ("POST", "PUT"):
            return Reply(METHOD_NOT_ALLOWED, b"an MQTT upstream takes POST and PUT only")
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [("sensor", request.sensor.id)]
        if request.content_format is not None:
            properties.ContentType = CONTENT_TYPES.get(
                request.content_format, f"application/coap;cf={request.content_format}")
        async with self._connections.use() as generation:
            connection = generation.connection
            if connection.broken is not None:  # lost since its last publish: redial once
                self._connections.retire(generation)
        if connection.broken is not None:
            log.info("upstream %s: %s; connecting again", self.name, connection.broken)
        async with self._connections.use() as generation:
            connection = generation.connection
            try:
                if connection.broken is not None or connection.client is None:
                    raise UpstreamError(f"{self.url}: {connection.broken or 'not connected'}")
                info = connection.client.publish(self.topic(request), request.payload, qos=1,
                                                 properties=properties)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise UpstreamError(f"{self.url}: publish failed: "
                                        f"{mqtt.error_string(info.rc)}")
                reason = await connection.expect(info.mid)
            except UpstreamError as e:
                self.last_error = e.message
                self._connections.retire(generation)  # the next publish redials
                raise
        if reason is not None and reason.is_failure:
            self.last_error = f"the broker refused the publish: {reason}"
            raise UpstreamError(f"{self.url}: {self.last_error}")
        self.published += 1
        self.last_error = None
        return Reply(CHANGED)

    async def close(self) -> None:
        await self._connections.close()

    def status_section(self) -> dict[str, Any]:
        return {"url": self.url, "kind": "mqtts", "published": self.published,
                **self._connections.status_section(), "last_error": self.last_error}
