"""OSCORE (RFC 8613) for sensors: one security context per sensor, with aiocoap's OSCORE.

The gateway is the OSCORE server. aiocoap's OscoreSiteWrapper unprotects a
request with the context that `SensorContexts.find_oscore` picks by the
request's kid (the sensor's Sender ID); the Gateway resource then sees the
plain request, with the context, and so the sensor, in `request.remote`.

Contexts are made on a sensor's first message (the registry is the truth;
10,000 sensors cost nothing until they speak) and follow the registry: a
quarantined or revoked sensor is refused from the next message on, a
rekeyed or removed one loses its context.

Replay state, as in RFC 8613 Appendix B.1 and aiocoap's filesystem contexts,
without a disk write per message:
- the gateway's own sequence numbers (used for notifications and Echo
  challenges) are reserved ahead in growing chunks (B.1.1), so a crash skips
  numbers instead of reusing a nonce;
- a context's replay window lives in memory while the broker runs; the
  registry marks it unknown at a context's first use and gets the exact
  window back at a clean stop. After a crash, the sensor's next request is
  answered 4.01 with an Echo (B.1.2), and only its retry carrying that Echo
  (which a replayed capture cannot have) opens a fresh window.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import aiocoap
from aiocoap import Code, Message
from aiocoap import error as coap_error
from aiocoap.interfaces import Resource
from aiocoap.message import Direction
from aiocoap.oscore import (
    COSE_KID,
    COSE_KID_CONTEXT,
    DEFAULT_ALGORITHM,
    DEFAULT_HASHFUNCTION,
    DEFAULT_WINDOWSIZE,
    CanProtect,
    CanUnprotect,
    DecodeError,
    NotAProtectedMessage,
    ProtectionInvalid,
    ReplayError,
    ReplayErrorWithEcho,
    ReplayWindow,
    SecurityContextUtils,
    algorithms,
    hashfunctions,
    verify_start,
)
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper
from aiocoap.transports.oscore import OSCOREAddress
from aiocoap.transports.udp6 import MessageInterfaceUDP6, UDP6EndpointAddress

from agent.broker.coapserver import deduplication, serve, udp
from agent.broker.gateway import remote_text
from agent.broker.traffic import Traffic
from agent.errors import StateError
from agent.sensors.credentials import OscoreCredential
from agent.sensors.model import Sensor
from agent.sensors.store import SensorStore

if TYPE_CHECKING:
    from agent.broker.edhoc import EdhocSessions, SensorEdhocContext

log = logging.getLogger(__name__)

CHUNK_START, CHUNK_LIMIT = 16, 4096  # sequence numbers reserved per registry write
UNKNOWN_KIDS = 4096  # unknown kids remembered (the oldest forgotten first)
SavedState = tuple[int, int, str | None]  # (serial, next_to_send, window JSON or None)


class CountedUnprotect:
    """Every refused request counted against its sensor (replay, wrong key); the 4.01
    with an Echo that recovers a window after a crash (B.1.2) is counted apart. Mixed
    into the static contexts here and the EDHOC ones (edhoc.py)."""

    sensor: Sensor | None
    _traffic: Traffic

    def unprotect(self, protected_message: Any, request_id: Any = None) -> Any:
        try:
            return super().unprotect(protected_message, request_id)  # type: ignore[misc]
        except ReplayErrorWithEcho:
            self._traffic.totals["echo_challenges"] += 1
            raise
        except ReplayError as e:
            self._traffic.refused("replay", str(e), remote_text(protected_message.remote),
                                  self.sensor, _describe(protected_message))
            raise
        except ProtectionInvalid as e:
            self._traffic.refused("auth-failed", str(e), remote_text(protected_message.remote),
                                  self.sensor, _describe(protected_message))
            raise


def _not_one_by_one() -> None:
    """A replay window's strike-out callback: windows are saved in batches (module doc);
    one function for all contexts, not one closure each."""


class SensorContext(CountedUnprotect, CanProtect, CanUnprotect, SecurityContextUtils):
    """One sensor's OSCORE context: the gateway sends with its ID (b"\\x00"), receives
    with the sensor's. Persisting goes through `save` (the registry)."""

    def __init__(self, sensor: Sensor, fingerprint: bytes, credential: OscoreCredential,
                 state: tuple[int, str | None] | None,
                 save: Callable[[list[SavedState]], None], traffic: Traffic) -> None:
        self.sensor, self.fingerprint = sensor, fingerprint
        self._save, self._traffic = save, traffic
        self.alg_aead = algorithms[DEFAULT_ALGORITHM]
        self.hashfun = hashfunctions[DEFAULT_HASHFUNCTION]
        self.sender_id, self.recipient_id = credential.recipient_id, credential.sender_id
        self.id_context = None
        self.derive_keys(credential.master_salt, credential.master_secret.reveal())
        # Strike-outs are not persisted one by one (see the module's docstring).
        self.recipient_replay_window = ReplayWindow(DEFAULT_WINDOWSIZE, _not_one_by_one)
        self.echo_recovery = secrets.token_bytes(8)
        if state is None:  # never used: a fresh context
            self.sender_sequence_number = 0
            self.recipient_replay_window.initialize_empty()
        else:
            self.sender_sequence_number, window = state
            if window is not None:
                try:
                    self.recipient_replay_window.initialize_from_persisted(json.loads(window))
                except (ValueError, TypeError, KeyError):
                    # Left uninitialized: the sensor's next request goes through Echo.
                    log.warning("sensor %s: the saved OSCORE replay window is damaged; "
                                "its next request is checked by Echo", sensor.name)
        self._chunk = CHUNK_START
        self.reserved_until = self.sender_sequence_number + self._chunk
        # In use from now on: after a crash the window is unknown, and our numbers up to
        # reserved_until may have been used.
        save([(sensor.serial, self.reserved_until, None)])

    def post_seqnoincrease(self) -> None:
        if self.sender_sequence_number > self.reserved_until:
            self._chunk = min(self._chunk * 2, CHUNK_LIMIT)
            self.reserved_until += self._chunk
            self._save([(self.sensor.serial, self.reserved_until, None)])

    def saved_state(self) -> SavedState:
        """What a clean stop keeps: the exact next number and the window."""
        window = self.recipient_replay_window
        return (self.sensor.serial, self.sender_sequence_number,
                json.dumps(window.persist()) if window.is_initialized() else None)


def _describe(message: Any) -> str:
    return f"{message.code} (OSCORE)"


class SensorContexts:
    """The server credentials aiocoap's OscoreSiteWrapper asks: a context by kid."""

    def __init__(self, store: SensorStore, traffic: Traffic,
                 edhoc: EdhocSessions | None = None) -> None:
        self._store, self._traffic, self.edhoc = store, traffic, edhoc
        self._contexts: dict[bytes, SensorContext] = {}
        self._unknown: dict[bytes, None] = {}  # kids the registry lacked; reset on a change

    def __len__(self) -> int:
        return len(self._contexts)

    def _save(self, states: list[SavedState]) -> None:
        self._store.save_oscore_state(states)

    def find_oscore(self, unprotected: dict[Any, Any]) -> SensorContext | SensorEdhocContext:
        kid = unprotected.get(COSE_KID)
        context = self._contexts.get(kid) if isinstance(kid, bytes) else None
        if context is None and self.edhoc is not None and isinstance(kid, bytes):
            session = self.edhoc.find(kid)  # established, or awaiting a combined message 3
            if session is not None:
                if session.sensor is not None and session.sensor.status != "active":
                    self._refuse_disabled(session.sensor)
                return session
        if context is None:
            found = None
            if isinstance(kid, bytes) and unprotected.get(COSE_KID_CONTEXT) is None \
                    and kid not in self._unknown:
                found = self._store.find("oscore", kid)
            if found is None:
                self._remember_unknown(kid)
                self._traffic.refused("unknown-credential", "no sensor has this OSCORE kid "
                                      f"({kid.hex() if isinstance(kid, bytes) else 'none'})",
                                      "")
                raise KeyError(kid)
            sensor, fingerprint = found
            if sensor.status != "active":
                self._refuse_disabled(sensor)
            context = self._open(sensor, fingerprint)
        if context.sensor.status != "active":
            self._refuse_disabled(context.sensor)
        return context

    def _remember_unknown(self, kid: Any) -> None:
        """A flood of made-up kids is answered from memory, not by a registry query each."""
        if isinstance(kid, bytes):
            if len(self._unknown) >= UNKNOWN_KIDS:
                del self._unknown[next(iter(self._unknown))]
            self._unknown[kid] = None

    def _refuse_disabled(self, sensor: Sensor) -> None:
        self._traffic.refused("disabled", f"sensor is {sensor.status}", "", sensor)
        # The same answer as for an unknown kid: an outsider learns nothing from it.
        raise coap_error.Unauthorized("Security context not found")

    def _open(self, sensor: Sensor, fingerprint: bytes) -> SensorContext:
        credential = self._store.credential(sensor)
        if not isinstance(credential, OscoreCredential):
            raise StateError(f"sensor {sensor.name}: its credential is not an OSCORE one")
        context = SensorContext(sensor, fingerprint, credential,
                                self._store.oscore_state(sensor.serial), self._save,
                                self._traffic)
        self._contexts[sensor.kid] = context
        return context

    def refresh(self) -> None:
        """Follow the registry after a change: new status and attributes; a rekeyed or
        removed sensor's context is dropped (its replay state belonged to the old key)."""
        self._unknown.clear()  # a sensor may have been added
        if self.edhoc is not None:
            self.edhoc.refresh()
        follow_registry(self._store, self._contexts)

    def save_all(self) -> None:
        """At a clean stop: every context's exact state, so no Echo round trip is needed."""
        if self._contexts:
            self._save([c.saved_state() for c in self._contexts.values()])

    def status_section(self) -> dict[str, Any]:
        return {"contexts": len(self._contexts),
                **(self.edhoc.status_section() if self.edhoc is not None else {})}


def follow_registry(store: SensorStore, contexts: dict[bytes, Any]) -> None:
    """Contexts by kid, each with its sensor and key fingerprint, as the registry has them
    now: the sensor's status and attributes updated; the context of a rekeyed or removed
    sensor dropped (its keys, and its replay state, belonged to the old credential)."""
    held = list(contexts.items())
    if not held:
        return
    now = store.follow([(context.sensor, context.fingerprint) for _, context in held])
    for (kid, context), sensor in zip(held, now, strict=True):
        if sensor is None:
            del contexts[kid]
        else:
            context.sensor = sensor


def identify(remote: Any) -> Sensor | None:
    """The sensor an OSCORE-unprotected request came from (for the Gateway): a static
    context's, or the one an EDHOC session authenticated."""
    if isinstance(remote, OSCOREAddress) and isinstance(remote.security_context,
                                                        CountedUnprotect):
        return remote.security_context.sensor
    return None


class Responder(Protocol):
    """What answers an unprotected request: the Gateway."""

    async def respond(self, request: Message) -> Message: ...


class _SiteWrapper(OscoreSiteWrapper):  # type: ignore[misc]
    """aiocoap's OSCORE server side, with two changes:
    - a malformed OSCORE option is answered 4.02 Bad Option (RFC 8613, 8.2); aiocoap lets
      its DecodeError end as a logged traceback and a 5.00;
    - the unprotected request goes straight to the Gateway, whose answer is protected
      and sent. aiocoap's wrapper runs it through an inner pipe and a task per request,
      named after the request: together a third of the broker's CPU under load.
    EDHOC's own requests (/.well-known/edhoc) go to the EDHOC sessions (edhoc.py)."""

    def __init__(self, gateway: Resource, contexts: SensorContexts, traffic: Traffic) -> None:
        super().__init__(gateway, contexts)
        self._gateway: Responder = gateway  # type: ignore[assignment]
        self._contexts, self._traffic = contexts, traffic

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        if request.opt.uri_path == (".well-known", "edhoc"):
            edhoc = self._contexts.edhoc
            address = getattr(request.remote, "sockaddr", ("?",))[0]
            pipe.add_response(edhoc.answer(request, remote_text(request.remote), address)
                              if edhoc else Message(code=Code.NOT_FOUND), is_last=True)
            return
        confirmable = request.mtype == aiocoap.CON
        try:
            header = verify_start(request)
        except NotAProtectedMessage:
            await self._inner_site.render_to_pipe(pipe)  # the Gateway refuses it (4.01)
            return
        except DecodeError as e:
            self._traffic.malformed("oscore", remote_text(request.remote),
                                    f"OSCORE option: {e}")
            if confirmable:
                raise coap_error.BadOption("malformed OSCORE option") from None
            return
        if request.code not in (Code.FETCH, Code.POST):  # RFC 8613 4.2: outer code
            raise coap_error.MethodNotAllowed()
        try:
            context = self._contexts.find_oscore(header)
        except KeyError:
            if confirmable:
                raise coap_error.Unauthorized("Security context not found") from None
            return
        try:
            unprotected, request_id = context.unprotect(request)
        except coap_error.RenderableError:
            raise  # the 4.01 with an Echo (B.1.2), protected by the context itself
        except ReplayError:
            if confirmable:
                pipe.add_response(Message(code=Code.UNAUTHORIZED, max_age=0,
                                          payload=b"Replay detected"), is_last=True)
            return
        except DecodeError:
            if confirmable:
                raise coap_error.BadOption("Failed to decode COSE") from None
            return
        except ProtectionInvalid:
            if confirmable:
                raise coap_error.BadRequest("Decryption failed") from None
            return
        except Exception as e:  # a gap in aiocoap or here: answered, logged, never fatal
            log.error("OSCORE listener: a request from %s could not be unprotected: %s: %s",
                      remote_text(request.remote), type(e).__name__, e)
            self._traffic.malformed("oscore", remote_text(request.remote), "unprotect failed")
            if confirmable:
                raise coap_error.BadRequest("Decryption failed") from None
            return
        unprotected.remote = OSCOREAddress(context, request.remote)
        try:
            response = await self._gateway.respond(unprotected)
        except coap_error.RenderableError as e:
            response = e.to_message()
        except Exception:
            # Rendered inside the protection: a bare 5.00 tells an onlooker nothing.
            log.exception("OSCORE request from sensor %s could not be answered",
                          context.sensor.name)
            response = Message(code=Code.INTERNAL_SERVER_ERROR)
        protected, _ = context.context_for_response().protect(response, request_id)
        pipe.add_response(protected, is_last=True)


def _counting_udp6(traffic: Traffic) -> type[MessageInterfaceUDP6]:
    """aiocoap's UDP transport, counting what arrives and what is not CoAP at all (aiocoap
    would log a warning for each of those: a flood of garbage would flood the journal)."""

    class CountingUDP6(MessageInterfaceUDP6):  # type: ignore[misc]
        def datagram_msg_received(self, data: bytes, ancdata: list[Any], flags: int,
                                  address: tuple[Any, ...]) -> None:
            traffic.received("oscore")
            pktinfo = next((value for level, kind, value in ancdata
                            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO),
                           None)
            remote = UDP6EndpointAddress(address, self, pktinfo=pktinfo)
            try:
                message = Message.decode(data, remote)
            # aiocoap lets a string option that is not UTF-8 escape as UnicodeDecodeError.
            except (coap_error.UnparsableMessage, ValueError):
                traffic.malformed("oscore", remote_text(remote), "not a CoAP message")
                return
            message.direction = Direction.INCOMING
            try:
                self._ctx.dispatch_message(message)
            except Exception as e:  # never let one datagram take the listener down
                log.error("OSCORE listener: a message from %s could not be handled: %s",
                          remote_text(remote), e)

    return CountingUDP6


class OscoreListener:
    """CoAP over UDP where every request must be OSCORE-protected by a sensor's context."""

    name = "oscore"

    def __init__(self, address: str, contexts: SensorContexts, site: Resource,
                 traffic: Traffic) -> None:
        self.address, self._contexts, self._site = address, contexts, site
        self._traffic = traffic
        self._context: aiocoap.Context | None = None

    async def start(self) -> None:
        site = _SiteWrapper(self._site, self._contexts, self._traffic)
        self._context = await serve(self.name, self.address, site,
                                    udp(_counting_udp6(self._traffic)))

    @property
    def context(self) -> aiocoap.Context | None:
        """The listener's aiocoap context: the gateway's requests to sensors go out by it."""
        return self._context

    async def close(self) -> None:
        if self._context is not None:
            await self._context.shutdown()
            self._context = None
        self._contexts.save_all()

    def status_section(self) -> dict[str, Any]:
        return {"address": self.address, "listening": self._context is not None,
                **self._contexts.status_section(),
                "deduplication": deduplication(self._context)}
