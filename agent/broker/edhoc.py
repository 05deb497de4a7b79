"""EDHOC (RFC 9528) for sensors: fresh OSCORE contexts from each sensor's static key.

A sensor added with `--transport edhoc` holds a P-256 key of its own and the
gateway's public credential (both CCS, RFC 9528 3.5.2). It runs EDHOC method 3
(static Diffie-Hellman both sides, cipher suite 2) with the gateway at
/.well-known/edhoc over the OSCORE listener, and uses the OSCORE context the
handshake derives. The long-term key only authenticates; it never encrypts
traffic. lakers (lakers-python) does the protocol; aiocoap's
EdhocResponderContext takes message 3 either in a request of its own or
combined with the first OSCORE request (the EDHOC option, RFC 9668).

Sessions are the broker's alone: made in memory, never stored. After
`[listen] edhoc_lifetime` a session is dropped and the sensor's next request
is answered 4.01, upon which it runs EDHOC again (re-keying on a schedule).
A restart drops every session the same way, so no replay window or sequence
number needs to survive one. A sensor quarantined, revoked, rekeyed or
removed loses its sessions from its next message on.
"""

from __future__ import annotations

import io
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import cbor2
import lakers
from aiocoap import Code, Message
from aiocoap import error as coap_error
from aiocoap.edhoc import EdhocResponderContext
from aiocoap.oscore import ProtectionInvalid

from agent.broker.oscore import CountedUnprotect, follow_registry
from agent.broker.traffic import Traffic
from agent.ratelimit import KeyedBuckets, TokenBucket
from agent.sensors.credentials import EdhocCredential
from agent.sensors.model import Sensor
from agent.sensors.store import SensorStore

log = logging.getLogger(__name__)

CBOR_TRUE = b"\xf5"  # what a request carrying message 1 starts with (RFC 9528 A.2)
C_R_BYTES = 5  # the gateway's connection identifiers: its OSCORE Recipient IDs
MAX_PENDING, PENDING_FOR = 1024, 60.0  # handshakes awaiting message 3: at most, how long
# Each message 1 costs two P-256 operations (about 1 ms here, more on a gateway's CPU):
# a sender may start 10 at once, then one a second; all senders together 100, then 50/s.
PER_ADDRESS, ALL_SENDERS = (10, 1.0), (100, 0.02)


class EdhocRefused(Exception):
    """A handshake message refused; the text says why (answered 4.00). `counted`: the
    refusal was already counted as an authentication failure, not a malformed one."""

    def __init__(self, text: str, counted: bool = False) -> None:
        super().__init__(text)
        self.counted = counted


class SensorEdhocContext(CountedUnprotect, EdhocResponderContext):  # type: ignore[misc]
    """One EDHOC session: waiting for message 3, then the OSCORE context it derived.
    `sensor` is known once message 3 named and proved the sensor's credential."""

    def __init__(self, responder: Any, c_i: bytes, c_r: bytes, sessions: EdhocSessions,
                 started: float) -> None:
        super().__init__(responder, c_i, c_r, _CredentialFinder(sessions, self), log)
        self.sessions, self.started, self._traffic = sessions, started, sessions.traffic
        # Its window starts empty and known: a replay is a replay, with no Echo recovery
        # (aiocoap's responder context lacks the attribute; a replayed request then ended
        # in an AttributeError, found by tests/integration/test_broker_fuzz.py).
        self.echo_recovery = None
        self.sensor: Sensor | None = None
        self.fingerprint = b""

    def _offer_message_3(self, message_3: bytes) -> bytes:
        complete = not self._incomplete
        try:
            message_4: bytes = super()._offer_message_3(message_3)
        except coap_error.Error:
            raise
        except Exception as e:  # lakers: a malformed message 3, or its MAC does not verify
            self.sessions.failed(self)
            raise ProtectionInvalid(f"EDHOC message 3 refused: {e}") from None
        if not complete:
            self.sessions.established(self)
        return message_4


class _CredentialFinder:
    """What aiocoap's responder context asks for message 3's ID_CRED_I: the sensor's
    credential (CRED_I), found by key ID among the registry's EDHOC sensors."""

    def __init__(self, sessions: EdhocSessions, context: SensorEdhocContext) -> None:
        self._sessions, self._context = sessions, context

    def find_edhoc_by_id_cred_peer(self, id_cred: bytes) -> tuple[bytes, list[str]]:
        sensor, fingerprint, credential = self._sessions.credential_for(id_cred)
        self._context.sensor, self._context.fingerprint = sensor, fingerprint
        return credential.credential, [sensor.id]


def _identifier(value: Any) -> bytes | None:
    """A connection identifier or key ID as decoded from CBOR, as its bytes: one whose
    single byte is itself a CBOR integer travels as that integer (RFC 9528 3.3.2)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return cbor2.dumps(value)
    return value if isinstance(value, bytes) else None


def _key_id(id_cred: bytes) -> bytes | None:
    """The kid of ID_CRED_x = {4: kid} (RFC 9528 3.5.3), or None."""
    try:
        value = cbor2.loads(id_cred)
    except (cbor2.CBORDecodeError, ValueError, TypeError):
        return None
    if isinstance(value, dict) and set(value) == {4}:
        return _identifier(value[4])
    return None


class EdhocSessions:
    """The responder side: message 1 and message 3 handled, sessions kept and found."""

    def __init__(self, store: SensorStore, traffic: Traffic, lifetime: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store, self.traffic, self.lifetime, self._clock = store, traffic, lifetime, clock
        key, self._credential = store.gateway_edhoc_key()
        self._key = key.reveal()
        self._pending: dict[bytes, SensorEdhocContext] = {}
        self._established: dict[bytes, SensorEdhocContext] = {}
        self.handshakes = 0
        self._per_address = KeyedBuckets(*PER_ADDRESS, clock)
        self._all_senders = TokenBucket(*ALL_SENDERS, clock)

    # --- the handshake ------------------------------------------------------------------

    def answer(self, request: Message, remote: str, address: object) -> Message:
        """The answer to a POST to /.well-known/edhoc from `address` (the sender's IP
        address): message 2 or message 4, or 5.03 with Max-Age when handshakes arrive
        faster than this gateway wants to spend P-256 operations on them."""
        payload = request.payload
        try:
            if request.code != Code.POST:
                raise coap_error.MethodNotAllowed()
            if payload[:1] == CBOR_TRUE:
                wait = self._admit(address)
                if wait is not None:
                    self.traffic.totals["refused.edhoc-rate"] += 1
                    return Message(code=Code.SERVICE_UNAVAILABLE, max_age=math.ceil(wait),
                                   payload=b"too many EDHOC handshakes; try again later")
                return Message(code=Code.CHANGED, payload=self._message_1(payload[1:]))
            return Message(code=Code.CHANGED, payload=self._message_3(payload))
        except EdhocRefused as e:
            if not e.counted:
                self.traffic.malformed("oscore", remote, str(e))
            return Message(code=Code.BAD_REQUEST, payload=str(e).encode()[:200])

    def _message_1(self, message_1: bytes) -> bytes:
        self._expire()
        while len(self._pending) >= MAX_PENDING:  # a flood pushes out the oldest, not all
            del self._pending[next(iter(self._pending))]
        responder = lakers.EdhocResponder(r=self._key, cred_r=self._credential)
        try:
            c_i, ead_1 = responder.process_message_1(message_1)
        except Exception as e:
            raise EdhocRefused(f"EDHOC message 1: {e}") from None
        if any(item.is_critical() for item in ead_1):
            raise EdhocRefused("EDHOC message 1: a critical EAD item this gateway does not "
                               "know")
        c_r = self._new_c_r(bytes(c_i))
        message_2 = responder.prepare_message_2(lakers.CredentialTransfer.ByReference, c_r,
                                                None)
        self._pending[c_r] = SensorEdhocContext(responder, bytes(c_i), c_r, self,
                                                self._clock())
        return bytes(message_2)

    def _message_3(self, payload: bytes) -> bytes:
        """Message 3 in a request of its own: C_R (CBOR) then message 3."""
        stream = io.BytesIO(payload)
        try:
            c_r = cbor2.load(stream)
        except (cbor2.CBORDecodeError, ValueError, EOFError):
            raise EdhocRefused("EDHOC message 3: does not start with C_R") from None
        c_r = _identifier(c_r)
        context = self._pending.get(c_r) if c_r is not None else None
        if context is None:
            raise EdhocRefused("EDHOC message 3: no handshake waits under this C_R")
        try:
            return context._offer_message_3(stream.read())
        except ProtectionInvalid as e:
            self.traffic.refused("auth-failed", str(e), "", context.sensor)
            raise EdhocRefused(str(e), counted=True) from None
        except coap_error.Error:  # no sensor has this credential: counted when looked up
            raise EdhocRefused("EDHOC message 3: no sensor has this credential",
                               counted=True) from None

    def _admit(self, address: object) -> float | None:
        """None if a handshake from `address` may start now, else seconds to wait."""
        if not self._per_address.take(address):
            return PER_ADDRESS[1]
        return self._all_senders.take()

    def _new_c_r(self, c_i: bytes) -> bytes:
        """A connection identifier no sensor's static OSCORE context uses, no session
        uses, and not the sensor's own C_I."""
        while True:
            c_r = secrets.token_bytes(C_R_BYTES)
            if c_r != c_i and c_r not in self._pending and c_r not in self._established \
                    and self._store.find("oscore", c_r) is None:
                return c_r

    # --- called by the contexts ---------------------------------------------------------

    def credential_for(self, id_cred: bytes) -> tuple[Sensor, bytes, EdhocCredential]:
        kid = _key_id(id_cred)
        found = self._store.find("edhoc", kid) if kid is not None else None
        if found is None:
            self.traffic.refused("unknown-credential", "EDHOC: no sensor has this key ID "
                                  f"({id_cred.hex()})", "")
            raise KeyError(id_cred)
        sensor, fingerprint = found
        if sensor.status != "active":
            self.traffic.refused("disabled", f"sensor is {sensor.status}", "", sensor)
            raise KeyError(id_cred)
        credential = self._store.credential(sensor)
        if not isinstance(credential, EdhocCredential):
            raise KeyError(id_cred)
        return sensor, fingerprint, credential

    def established(self, context: SensorEdhocContext) -> None:
        self._pending.pop(context.recipient_id, None)
        context.started = self._clock()
        self._established[context.recipient_id] = context
        self.handshakes += 1
        assert context.sensor is not None
        log.info("sensor %s: EDHOC session established", context.sensor.name)

    def failed(self, context: SensorEdhocContext) -> None:
        """A handshake that cannot complete: no second try under the same C_R."""
        self._pending.pop(context.recipient_id, None)

    # --- finding and following ----------------------------------------------------------

    def find(self, kid: bytes) -> SensorEdhocContext | None:
        """The session whose OSCORE Recipient ID is `kid`; None once expired."""
        context = self._established.get(kid)
        if context is not None:
            if self._clock() - context.started < self.lifetime:
                return context
            del self._established[kid]  # re-keying: the sensor runs EDHOC again
            return None
        return self._pending.get(kid)  # message 3 combined with the first request

    def _expire(self) -> None:
        now = self._clock()
        for c_r in [c for c, ctx in self._pending.items() if now - ctx.started > PENDING_FOR]:
            del self._pending[c_r]

    def refresh(self) -> None:
        """Follow the registry: sessions of a rekeyed or removed sensor end; the others
        see its status and attributes as they are now. (Established sessions all know
        their sensor; waiting ones know none yet.)"""
        follow_registry(self._store, self._established)

    def status_section(self) -> dict[str, Any]:
        return {"edhoc_sessions": len(self._established), "edhoc_pending": len(self._pending),
                "edhoc_handshakes": self.handshakes, "edhoc_lifetime": self.lifetime}
