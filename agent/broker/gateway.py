"""What an authenticated sensor's request becomes: a policy decision, then a forward.

The Gateway is the one aiocoap resource behind every listener. A listener
has already authenticated the request and tells, through `request.remote`,
which sensor sent it (`identify`). The Gateway then asks the policy, and
forwards what a rule allows to that rule's upstream. The upstream gets only
the payload and its format, never the sensor's own options. The response
goes back with its code: a denial is 4.03 (4.29 when the rate is reached),
an upstream failure 5.02, a timeout 5.04. For a rule with `spool = true` an
upstream failure or timeout instead puts the message in the spool (2.04 once it
is on disk; 5.03 with Max-Age when the spool is full), and a sensor with
messages waiting queues behind them. Nothing is forwarded for a request that
is not authenticated or not allowed.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiocoap import Code, Message
from aiocoap import resource as coap_resource

from agent.broker.policy import PolicyHolder
from agent.broker.spool import Spool
from agent.broker.traffic import Traffic
from agent.broker.upstream import Forward, Reply, Upstream
from agent.errors import UpstreamError, UpstreamTimeout
from agent.policy.decide import Message as PolicyMessage
from agent.policy.decide import Rates, decide
from agent.ratelimit import KeyedBuckets
from agent.sensors.model import Sensor

log = logging.getLogger(__name__)

Identify = Callable[[Any], Sensor | None]  # request.remote -> the authenticated sensor


class LocalService(Protocol):
    """What the gateway itself answers instead of forwarding (LwM2M's /rd): it gets the
    authenticated, active sensor; the policy it applies is its own."""

    async def respond(self, sensor: Sensor, request: Message) -> Message: ...
TOO_MANY_REQUESTS = Code(0x9D)  # 4.29, RFC 8516
LOCAL_BURST, LOCAL_INTERVAL = 60, 1.0  # LwM2M requests per sensor: 60 at once, then 1/s


def remote_text(remote: Any) -> str:
    try:
        return str(remote.hostinfo)
    except Exception:  # some remotes cannot tell (no underlying address)
        return "?"


def answer(code: Code, text: str, max_age: int | None = None) -> Message:
    message = Message(code=code, payload=text.encode()[:200])
    if max_age is not None:
        message.opt.max_age = max_age
    return message


class Gateway(coap_resource.Resource):
    def __init__(self, identify: list[Identify], policy: PolicyHolder,
                 upstreams: Mapping[str, Upstream], traffic: Traffic, rates: Rates,
                 spool: Spool | None = None,
                 now: Callable[[], datetime.datetime] =
                 lambda: datetime.datetime.now(datetime.UTC),
                 local: Mapping[str, LocalService] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._identify, self._policy, self._upstreams = identify, policy, upstreams
        self._traffic, self._rates, self._spool, self._now = traffic, rates, spool, now
        self._local = dict(local or {})  # first path segment -> the service answering it
        # What a sensor asks of the gateway itself (LwM2M Register/Update, Bootstrap) is
        # not under a policy rule's rate: this keeps a sensor in a loop from costing much.
        self._local_rate = KeyedBuckets(LOCAL_BURST, LOCAL_INTERVAL, monotonic,
                                        max_keys=65536)

    def _sensor(self, request: Message) -> Sensor | None:
        for identify in self._identify:
            sensor = identify(request.remote)
            if sensor is not None:
                return sensor
        return None

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return True

    async def render_to_pipe(self, pipe: Any) -> None:
        pipe.add_response(await self.respond(pipe.request), is_last=True)

    async def respond(self, request: Message) -> Message:
        """The answer to a request, with aiocoap's block-wise assembly (its Block1 spool
        and Block2 cache, RFC 7959) but without a pipe: the OSCORE listener calls this
        directly. A sensor's request is one message and its answer small, so the common
        case skips the block-wise bookkeeping altogether. Observe is not offered: the
        answer is a single response, as aiocoap gives for a resource that is not
        observable."""
        if request.opt.block1 is None and request.opt.block2 is None:
            response = await self.render(request)
            if len(response.payload) <= request.remote.maximum_payload_size:
                return response
            return await self._block2.extract_or_insert(request, _ready(response))
        request = self._block1.feed_and_take(request)  # Continue or Incomplete: raised
        response = await self._block2.extract_or_insert(request,
                                                        lambda: self.render(request))
        response.opt.block1 = request.opt.block1
        return response

    async def render(self, request: Message) -> Message:
        sensor = self._sensor(request)
        method = str(request.code)
        path = "/" + "/".join(request.opt.uri_path)
        if sensor is None:
            self._traffic.refused("unknown-credential", "a request without OSCORE or DTLS",
                                  remote_text(request.remote), request=f"{method} {path}")
            return answer(Code.UNAUTHORIZED, "OSCORE or DTLS required")
        if sensor.status != "active":  # a DTLS session outlives a quarantine
            self._traffic.refused("disabled", f"sensor is {sensor.status}",
                                  remote_text(request.remote), sensor, f"{method} {path}")
            return answer(Code.UNAUTHORIZED, "not authorized")
        self._traffic.accepted(sensor)
        if request.opt.proxy_uri is not None or request.opt.proxy_scheme is not None:
            return answer(Code.PROXYING_NOT_SUPPORTED, "the gateway is not a forward proxy")
        local = self._local.get(request.opt.uri_path[0]) if request.opt.uri_path else None
        if local is not None:
            delay = self._local_rate.wait(sensor.serial)
            if delay is not None:
                self._traffic.refused("denied", "too many LwM2M requests",
                                      remote_text(request.remote), sensor, f"{method} {path}")
                return answer(TOO_MANY_REQUESTS, "too many LwM2M requests; try again later",
                              math.ceil(delay))
            self._traffic.behaved(sensor, f"{method} /{request.opt.uri_path[0]}",
                                  len(request.payload), remote_text(request.remote))
            return await local.respond(sensor, request)
        content_format = _number(request.opt.content_format)
        decision = decide(self._policy.policy, sensor,
                          PolicyMessage(method, path, len(request.payload), content_format),
                          self._now(), self._rates)
        if not decision.allowed:
            self._traffic.refused("denied", decision.reason, remote_text(request.remote),
                                  sensor, f"{method} {path}")
            if decision.retry_after is not None:
                return answer(TOO_MANY_REQUESTS, decision.reason,
                               math.ceil(decision.retry_after))
            return answer(Code.FORBIDDEN, decision.reason)
        self._traffic.behaved(sensor, f"{method} {decision.rule}", len(request.payload),
                              remote_text(request.remote))
        upstream = self._upstream(decision.to)
        if upstream is None:
            reason = f"rule {decision.rule}: upstream {decision.to or '(default)'} is not " \
                     "configured"
            self._traffic.upstream_failed(sensor, decision.to or "-", reason)
            return answer(Code.BAD_GATEWAY, reason)
        assert decision.upstream is not None
        forward = Forward(sensor, method, decision.upstream, request.payload, content_format,
                          _number(request.opt.accept))
        spool = self._spool if decision.spool else None
        if spool is not None and spool.behind(upstream.name, sensor):
            return self._spooled(await spool.accept(upstream.name, forward))
        try:
            reply = await asyncio.wait_for(upstream.forward(forward), upstream.timeout)
        except (TimeoutError, UpstreamTimeout):
            self._traffic.upstream_failed(sensor, upstream.name, "timed out")
            if spool is not None:  # at least once: it may have arrived; send it again later
                return self._spooled(await spool.accept(upstream.name, forward))
            return answer(Code.GATEWAY_TIMEOUT, f"upstream {upstream.name} did not answer")
        except UpstreamError as e:
            self._traffic.upstream_failed(sensor, upstream.name, e.message)
            if spool is not None:
                return self._spooled(await spool.accept(upstream.name, forward))
            return answer(Code.BAD_GATEWAY, f"upstream {upstream.name}: {e.message}")
        self._traffic.forwarded(sensor, upstream.name)
        return _response(reply)

    def _spooled(self, reply: Reply) -> Message:
        self._traffic.totals["spooled" if reply.code < 0xA0 else "refused.spool-full"] += 1
        return _response(reply)

    def _upstream(self, name: str | None) -> Upstream | None:
        if name is None:
            return next(iter(self._upstreams.values())) if len(self._upstreams) == 1 else None
        return self._upstreams.get(name)


def _ready(message: Message) -> Callable[[], Awaitable[Message]]:
    async def rendered() -> Message:
        return message
    return rendered


def _number(option: Any) -> int | None:
    """A Content-Format or Accept as its number (aiocoap gives an enum member)."""
    return None if option is None else int(option)


def _response(reply: Reply) -> Message:
    message = Message(code=Code(reply.code), payload=reply.payload)
    if reply.content_format is not None:
        message.opt.content_format = reply.content_format
    if reply.max_age is not None:
        message.opt.max_age = reply.max_age
    return message
