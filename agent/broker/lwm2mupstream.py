"""The gateway as an LwM2M 1.2 client of an upstream LwM2M server: the LwM2M Gateway
object (/25), so that a fleet's server manages every sensor through the gateway.

- Session: DTLS 1.2 with the gateway's own certificate (dtlsclient.py), the
  current one from the agent's identity API. After a rotation a new session
  is opened with the new certificate and an Update sent over it: the
  registration is kept, the server learns the new address.
- Registration: `POST /rd?ep=...&lt=...&lwm2m=1.2&b=U` with the gateway's own
  objects (/1/0, /3/0) and one /25 instance per registered sensor
  (agent/lwm2m/gateway.py). An Update goes out before the lifetime runs out,
  and, with the new object list, when sensors come or go (at most one a
  second: a thousand sensors registering at once make a few Updates, not a
  thousand). A 4.04 to an Update (the server forgot the gateway) means a
  Register again; a lost session, a new session and the same.
- The server's requests: Reads and Discovers of /1, /3 and /25 are answered by
  the gateway. A request on /PREFIX/OBJECT/... goes to that sensor over its
  own secure channel, if the sensor's profile grants the upstream that
  operation on that path (`who = ["upstream"]`), and the answer comes back
  with its code, Content-Format and payload only (SenML names get the prefix).
  Observations are relayed notification by notification, and cancelled on the
  sensor when the server loses interest. Every relayed operation is audited
  (written beside the answer, not before it).
  The server never sees a sensor's credential: only what the sensor answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiocoap import CON, NON, Code, Message, interfaces
from aiocoap import resource as coap_resource

from agent import __version__, events
from agent.audit import AuditLog
from agent.backoff import Backoff
from agent.broker.coapserver import ServerContext
from agent.broker.config import BrokerConfig, parse_lwm2m_url
from agent.broker.dtlsclient import DtlsClient
from agent.broker.gateway import answer
from agent.broker.gatewaycreds import GatewayCredentials
from agent.broker.lwm2m import Lwm2mServer, code_text
from agent.errors import (
    DevidError,
    Lwm2mError,
    Lwm2mNotAllowed,
    Lwm2mNotFound,
    UpstreamError,
)
from agent.identityapi.credentialset import CredentialSet
from agent.lwm2m.gateway import (
    LINK_FORMAT,
    GatewayObject,
    Objects,
    discover_objects,
    operation_of,
    read_objects,
    reprefix_senml,
)
from agent.pki.bundle import read_trust
from agent.sensors.model import Sensor

log = logging.getLogger(__name__)
SERVER_ID = 1  # the short server ID of the one server (/1/0/0)
OWN = ((1, 0), (3, 0))  # the gateway's own object instances besides /25
UPDATE_EVERY = 1.0  # at most one Update a second for sensors coming and going
RENEW_AT = 0.75  # an Update when this share of the lifetime has passed
DEREGISTER_TIMEOUT = 2.0  # at a stop (the broker gives its parts 3 s)
CONFIRM_EVERY = 60.0  # seconds between confirmable notifications of a relayed observation


class Lwm2mUpstream:
    """Registers the gateway with the upstream LwM2M server and serves its requests."""

    name = "lwm2m_upstream"

    def __init__(self, url: str, endpoint: str, lifetime: int, timeout: float,
                 trust: str | None, credentials: GatewayCredentials, lwm2m: Lwm2mServer,
                 audit: AuditLog, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.host, self.port = parse_lwm2m_url(url)
        self._endpoint, self.lifetime, self.timeout = endpoint, lifetime, timeout
        self._trust, self._credentials, self._lwm2m = trust, credentials, lwm2m
        self._audit, self._monotonic = audit, monotonic
        self._client: DtlsClient | None = None
        self._context: ServerContext | None = None
        self.state = "waiting for the gateway's credentials"
        self.location: str | None = None
        self.session_serial: str | None = None
        self._presented: CredentialSet | None = None  # the set the session presents
        self._rotated = asyncio.Event()
        self._gateway = GatewayObject([])
        self._generation = -1
        self._sent_payload: bytes | None = None
        self._sent_instances: list[Any] = []
        self._updated_at = 0.0
        self.observations = 0
        self._auditing: set[asyncio.Future[Any]] = set()
        self.totals: Counter[str] = Counter()
        self.error: str | None = None

    @property
    def endpoint(self) -> str:
        """The configured endpoint name, else the gateway's device ID."""
        if self._endpoint:
            return self._endpoint
        current = self._credentials.current
        return current.device_id if current is not None else ""

    # --- the task --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._credentials.subscribe(lambda _: self._rotated.set())
        context = ServerContext(loop=asyncio.get_running_loop(), serversite=_Site(self),
                                loggername="coap-lwm2m-upstream")

        async def make(mman: interfaces.MessageManager) -> DtlsClient:
            self._client = DtlsClient(mman, self.host, self.port, self.timeout)
            return self._client

        await context._append_tokenmanaged_messagemanaged_transport(make)
        self._context = context
        backoff = Backoff(initial=1.0, cap=60.0)
        try:
            while not stop.is_set():
                try:
                    await self._serve(stop)
                    backoff.reset()
                except (UpstreamError, Lwm2mError) as e:
                    self._failed(e.message)
                    self.state = f"retrying: {e.message}"
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff.next_delay())
        finally:
            await self._deregister()
            await context.shutdown()
            if self._auditing:
                await asyncio.wait(list(self._auditing))
            self._context = self._client = None

    async def _serve(self, stop: asyncio.Event) -> None:
        """One session: connect, register (or update), keep it so until it fails."""
        credentials = await self._wait_for_credentials(stop)
        if credentials is None:
            return
        await self._connect(credentials)
        if self.location is None or not await self._update(with_objects=True):
            await self._register()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake(stop), UPDATE_EVERY)
            if stop.is_set():
                return
            assert self._client is not None
            if self._client.session is None:
                raise UpstreamError(f"the DTLS session ended ({self._client.lost_reason})")
            current = self._credentials.current
            if current is None:
                raise UpstreamError("the gateway's credentials were withdrawn by the agent")
            if current is not self._presented:
                await self._connect(current)  # a rotation: the new certificate
                if not await self._update(with_objects=False):
                    await self._register()
                continue
            due = self._monotonic() - self._updated_at >= self.lifetime * RENEW_AT
            if (due or self._sensors_changed()) and \
                    not await self._update(with_objects=True):
                await self._register()

    async def _wake(self, stop: asyncio.Event) -> None:
        stopping = asyncio.ensure_future(stop.wait())
        rotated = asyncio.ensure_future(self._rotated.wait())
        try:
            await asyncio.wait([stopping, rotated], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            rotated.cancel()
        self._rotated.clear()

    async def _wait_for_credentials(self, stop: asyncio.Event) -> CredentialSet | None:
        while self._credentials.current is None:
            self.state = "waiting for the gateway's credentials: " + (
                self._credentials.withdrawn or self._credentials.error or "from the agent")
            await self._wake(stop)
            if stop.is_set():
                return None
        return self._credentials.current

    async def _connect(self, credentials: CredentialSet) -> None:
        assert self._client is not None
        self.state = "connecting"
        await self._client.connect(credentials, self._trust)
        self._presented, self.session_serial = credentials, credentials.serial
        self.totals["handshakes"] += 1

    # --- the gateway's requests ----------------------------------------------------------

    def _sensors_changed(self) -> bool:
        """Whether /25 differs from what the server was last told (sensors came or went,
        or registered other objects)."""
        if self._lwm2m.table.generation == self._generation:
            return False
        self._payload()
        return self._gateway.instances != self._sent_instances

    def _payload(self) -> bytes:
        table = self._lwm2m.table
        if table.generation != self._generation:
            self._gateway = GatewayObject(table.all())
            self._generation = table.generation
        return self._gateway.registration_payload(OWN)

    async def _request(self, message: Message, timeout: float | None = None) -> Message:
        assert self._context is not None and self._client is not None
        message.remote = self._client.remote
        limit = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(self._context.request(message).response, limit)
        except TimeoutError:
            raise UpstreamError(f"the LwM2M server {self.url} did not answer within "
                                f"{limit:g} s") from None
        except Exception as e:  # aiocoap's errors: the session is gone, a reset
            raise UpstreamError(f"the LwM2M server {self.url}: {type(e).__name__}: {e}"
                                ) from None

    async def _register(self) -> None:
        payload = self._payload()
        query = (f"ep={self.endpoint}", f"lt={self.lifetime}", "lwm2m=1.2", "b=U")
        message = Message(code=Code.POST, uri_path=("rd",), uri_query=query, payload=payload)
        message.opt.content_format = LINK_FORMAT
        response = await self._request(message)
        if response.code != Code.CREATED or not response.opt.location_path:
            raise UpstreamError(f"the LwM2M server {self.url} refused the gateway's Register: "
                                f"{response.code} {_text(response)}")
        self.location = "/".join(response.opt.location_path)
        self._registered(payload)
        self.totals["registered"] += 1
        events.emit(log, "lwm2m-upstream-registered", "registered with the LwM2M server %s "
                    "as %s at /%s (%d sensors under /25)", self.url, self.endpoint,
                    self.location, len(self._gateway.instances), location=self.location)

    async def _update(self, with_objects: bool) -> bool:
        """An Update (with the object list when it changed); False when the server no
        longer knows the registration (4.04: register again)."""
        assert self.location is not None
        payload = self._payload() if with_objects else self._sent_payload or b""
        message = Message(code=Code.POST, uri_path=tuple(self.location.split("/")))
        if payload != self._sent_payload:
            message.payload = payload
            message.opt.content_format = LINK_FORMAT
        response = await self._request(message)
        if response.code in (Code.NOT_FOUND, Code.BAD_REQUEST):
            self.location = None
            return False
        if response.code != Code.CHANGED:
            raise UpstreamError(f"the LwM2M server {self.url} refused the gateway's Update: "
                                f"{response.code} {_text(response)}")
        self._registered(payload)
        self.totals["updated"] += 1
        return True

    def _registered(self, payload: bytes) -> None:
        self._sent_payload, self._updated_at = payload, self._monotonic()
        self._sent_instances = self._gateway.instances
        self.state, self.error = "registered", None

    async def _deregister(self) -> None:
        if self.location is None or self._client is None or self._client.session is None:
            return
        with contextlib.suppress(UpstreamError):  # a stop does not wait long for it
            await self._request(Message(code=Code.DELETE,
                                        uri_path=tuple(self.location.split("/"))),
                                timeout=min(self.timeout, DEREGISTER_TIMEOUT))
        self.location = None

    def _failed(self, why: str) -> None:
        if why != self.error:
            events.emit(log, "lwm2m-upstream-failed", "the LwM2M server %s: %s; retrying",
                        self.url, why, reason=why)
        self.error = why
        self.totals["failures"] += 1

    # --- the server's requests -----------------------------------------------------------

    def own_objects(self) -> Objects:
        current = self._presented
        return {
            1: {0: {0: SERVER_ID, 1: self.lifetime, 6: False, 7: "U"}},
            3: {0: {0: "devid-agent", 1: "devid-broker LwM2M gateway",
                    2: current.device_id if current else "", 3: __version__, 16: "U"}},
            25: self._gateway.objects(),
        }

    async def respond(self, request: Message, notify: Notifications | None = None
                      ) -> Message:
        """The answer to a request of the server. With `notify`, an Observe on a sensor's
        resource keeps relaying its notifications there until `notify` is closed."""
        segments = request.opt.uri_path
        try:
            if segments and not segments[0].isdigit():
                return await self._relay(request, notify)
            return self._own(request)
        except Lwm2mError as e:
            self.totals["refused"] += 1
            return answer(Code(e.coap_code), e.message)

    def _own(self, request: Message) -> Message:
        path = _numeric(request.opt.uri_path)
        self._payload()  # /25 as of now
        if request.code != Code.GET:
            raise Lwm2mNotAllowed(f"{request.code} on the gateway's own objects: only Read "
                                  "and Discover")
        accept = None if request.opt.accept is None else int(request.opt.accept)
        if accept == LINK_FORMAT:
            fmt, payload = LINK_FORMAT, discover_objects(self.own_objects(), path)
        else:
            fmt, payload = read_objects(self.own_objects(), path, accept)
        self.totals["own_reads"] += 1
        response = Message(code=Code.CONTENT, payload=payload)
        response.opt.content_format = fmt
        return response

    async def _relay(self, request: Message, notify: Notifications | None) -> Message:
        self._payload()
        found = self._gateway.route(tuple(request.opt.uri_path))
        if found is None:
            raise Lwm2mNotFound(f"/{'/'.join(request.opt.uri_path)[:60]}: no sensor has this "
                                "prefix, or the rest is not an LwM2M path")
        serial, path = found
        prefix = request.opt.uri_path[0]
        accept = None if request.opt.accept is None else int(request.opt.accept)
        observe = request.opt.observe
        operation = operation_of(int(request.code), path, accept, observe)
        if operation is None:
            raise Lwm2mNotAllowed(f"{request.code} on /{prefix}/...: the gateway relays Read, "
                                  "Discover, Observe, Write and Execute")
        sensor = await self._sensor(serial)
        record = {"sensor": sensor.id, "name": sensor.name, "operation": operation,
                  "path": "/" + "/".join(map(str, path)), "caller": "upstream"}
        try:
            self._lwm2m.permit(sensor, operation, path, "upstream")
            inner = Message(code=request.code, uri_path=tuple(map(str, path)),
                            payload=reprefix_senml(_format(request), request.payload,
                                                   prefix, outward=False))
            for option in ("content_format", "accept"):
                value = getattr(request.opt, option)
                if value is not None:
                    setattr(inner.opt, option, value)
            if operation == "observe" and notify is not None:
                response = await self._observe(sensor, inner, prefix, notify)
            else:
                response = _outward(await self._lwm2m.downlink.request(sensor, inner), prefix)
        except Lwm2mError as e:
            self._record(record, refused=e.message)
            raise
        self.totals[f"relayed.{operation}"] += 1
        self._record(record, answer=code_text(response.code))
        return response

    def _record(self, record: dict[str, Any], **outcome: str) -> None:
        """Audits a relayed operation beside the answer, not before it: the audit log's
        fsync (about a millisecond) would otherwise be a third of a relayed Read's time
        (bench/lwm2m.py). Pending records are written before the broker stops."""
        task = asyncio.ensure_future(asyncio.to_thread(
            self._audit.append, "lwm2m-operation", **record, **outcome))
        self._auditing.add(task)
        task.add_done_callback(self._audited)

    def _audited(self, task: asyncio.Future[Any]) -> None:
        self._auditing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cannot audit an upstream LwM2M operation: %s", task.exception())

    async def _observe(self, sensor: Sensor, inner: Message, prefix: str,
                       notify: Notifications) -> Message:
        """The first answer; the notifications after it go to `notify`, from a task that
        follows the sensor until `notify` is closed (the server lost interest)."""
        first: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

        def take(message: Message) -> bool:
            outward = _outward(message, prefix, keep_observe=True)
            if not first.done():
                first.set_result(outward)
            else:
                notify.put(outward)
            return True

        follower = asyncio.ensure_future(self._lwm2m.downlink.follow(sensor, inner, take))
        notify.follower = follower
        self.observations += 1

        def ended(_: object) -> None:
            self.observations -= 1
            if not follower.cancelled() and follower.exception() is None and first.done():
                notify.put(answer(Code.SERVICE_UNAVAILABLE, "the sensor ended the "
                                  "observation"))

        follower.add_done_callback(ended)
        await asyncio.wait([first, follower], return_when=asyncio.FIRST_COMPLETED)
        if first.done():
            if first.result().opt.observe is None:
                notify.close()  # not observable: the one answer
            return first.result()
        follower.result()  # raises the Lwm2mError: the sensor did not answer
        raise Lwm2mError(f"sensor {sensor.name}: the observation ended unanswered")

    async def _sensor(self, serial: int) -> Sensor:
        found = (await asyncio.to_thread(self._lwm2m.registry.store.current, [serial])
                 ).get(serial)
        if found is None:
            raise Lwm2mNotFound("that sensor is no longer in the registry")
        return found[0]

    def status_section(self) -> dict[str, Any]:
        client = self._client
        return {"url": self.url, "endpoint": self.endpoint, "state": self.state,
                "location": f"/{self.location}" if self.location else None,
                "certificate_serial": self.session_serial,
                "handshakes": client.handshakes if client else 0,
                "sensors": len(self._gateway.instances), "observations": self.observations,
                "error": self.error, "totals": dict(sorted(self.totals.items()))}


class Notifications:
    """A relayed observation: where its notifications wait to go to the server, and the
    task that follows the sensor (cancelled by `close`, when the server lost interest)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.follower: asyncio.Future[None] | None = None

    def put(self, message: Message) -> None:
        self.queue.put_nowait(message)

    def close(self) -> None:
        if self.follower is not None:
            self.follower.cancel()


class _Site(coap_resource.Resource):
    """Everything the server asks the gateway, to Lwm2mUpstream.respond; an Observe on a
    sensor's resource is answered with its notifications as they come. Block-wise both
    ways is aiocoap's (a Write of many blocks, a Read of /25 with many sensors)."""

    def __init__(self, upstream: Lwm2mUpstream) -> None:
        super().__init__()
        self._upstream = upstream

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return True

    async def render(self, request: Message) -> Message:
        return await self._upstream.respond(request)

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        if request.opt.observe != 0 or request.code != Code.GET or \
                request.opt.block2 is not None:
            await self._render_to_pipe(pipe)  # one answer, block-wise as it needs
            return
        notifications = Notifications()
        try:
            first = await self._upstream.respond(request, notifications)
            if first.opt.observe is None or not first.code.is_successful():
                pipe.add_response(first, is_last=True)
                return
            # The gateway numbers the notifications it relays itself (the sensor's numbers
            # restart with each of its observations). From 1: RFC 7641 allows any start,
            # and node-coap (under lwm2m-node-lib) drops a first answer numbered 0.
            sequence = 1
            first.opt.observe = sequence
            pipe.add_response(first, is_last=False)
            confirmed = time.monotonic()
            # Until the server cancels (this task is cancelled with its interest: a new
            # request on the token, Observe=1 included, or a confirmable notification
            # rejected or not acknowledged), or the sensor ends the observation (an
            # error answer, the last).
            while True:
                notification = await notifications.queue.get()
                sequence = (sequence + 1) % (1 << 24)
                last = not notification.code.is_successful()
                if not last:
                    notification.opt.observe = sequence
                    # Non-confirmable (RFC 7641 4.5 allows it): a confirmable one not yet
                    # acknowledged would hold the gateway's next Update back (NSTART = 1
                    # toward the server). One a minute is confirmable, so that a server
                    # that lost interest (and says so with a Reset) ends the relay.
                    if time.monotonic() - confirmed >= CONFIRM_EVERY:
                        notification.mtype, confirmed = CON, time.monotonic()
                    else:
                        notification.mtype = NON
                pipe.add_response(notification, is_last=last)
                if last:
                    return
        finally:
            notifications.close()


def _numeric(segments: tuple[str, ...]) -> tuple[int, ...]:
    if not segments or len(segments) > 4 or not all(
            s.isdigit() and (s == "0" or not s.startswith("0")) and int(s) <= 65535
            for s in segments):
        raise Lwm2mNotFound(f"/{'/'.join(segments)[:60]}: not an LwM2M path on the gateway")
    return tuple(int(s) for s in segments)


def _format(message: Message) -> int | None:
    return None if message.opt.content_format is None else int(message.opt.content_format)


def _outward(response: Message, prefix: str, keep_observe: bool = False) -> Message:
    """What goes back to the server of a sensor's answer: code, Content-Format, Max-Age
    and payload (SenML names under the prefix); no option of the sensor's channel."""
    try:
        payload = reprefix_senml(_format(response), response.payload, prefix, outward=True)
    except DevidError as e:
        return answer(Code.BAD_GATEWAY, f"the sensor's answer: {e.message}")
    out = Message(code=response.code, payload=payload)
    for option in ("content_format", "max_age", "etag"):
        value = getattr(response.opt, option)
        if value is not None:
            setattr(out.opt, option, value)
    if keep_observe and response.opt.observe is not None:
        out.opt.observe = response.opt.observe
    return out


def _text(response: Message) -> str:
    return response.payload.decode("utf-8", "replace")[:120]


def make_lwm2m_upstream(config: BrokerConfig, credentials: GatewayCredentials | None,
                        lwm2m: Lwm2mServer, audit: AuditLog) -> Lwm2mUpstream | None:
    """The LwM2M upstream `[lwm2m_upstream]` configures, if it does."""
    section = config.lwm2m_upstream
    if section is None:
        return None
    assert credentials is not None  # make_upstreams watches them for this section too
    return Lwm2mUpstream(section.url, section.endpoint, section.lifetime, section.timeout,
                         read_trust(section.bundle, "lwm2m_upstream"), credentials, lwm2m,
                         audit)
