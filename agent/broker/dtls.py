"""DTLS 1.2 with PSK (RFC 7925 profile) for sensors, as an aiocoap message transport.

aiocoap's own DTLS server (tinydtls) is marked experimental and offers only
TLS_PSK_WITH_AES_128_CCM_8. So the broker wires Mbed TLS (python-mbedtls,
which bundles Mbed TLS 2.28 LTS) to aiocoap itself, through in-memory
buffers; docs/broker.md ("DTLS-PSK: the choice") has the comparison and the
figures. aiocoap still does the CoAP part: CON/ACK, retransmission,
deduplication and block-wise. The Gateway resource sees each request with a
DtlsRemote, which names the sensor whose PSK identity the handshake used.

- Cipher suites: TLS_PSK_WITH_AES_128_CCM_8 (RFC 7925's mandatory one),
  TLS_PSK_WITH_AES_128_GCM_SHA256 and TLS_PSK_WITH_AES_128_CCM; DTLS 1.2 only.
- HelloVerifyRequest: a ClientHello without a valid cookie (an HMAC over the
  client's address) gets a 60-byte HelloVerifyRequest and leaves no state
  behind. The gateway never answers a spoofed address with more than it got.
- Keys: looked up in the registry by PSK identity during the handshake (never
  all loaded). A revoked or unknown identity fails the handshake. A
  quarantined sensor may still complete it, and then each of its requests is
  answered 4.01.
- Sessions follow the registry: rekeyed or removed sensors lose their
  sessions at once. Sessions are bounded in number and dropped after
  `idle_timeout` without traffic; unfinished handshakes after 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import aiocoap
from aiocoap import error as coap_error
from aiocoap import interfaces
from aiocoap.message import Message
from aiocoap.numbers import constants
from aiocoap.util import hostportjoin
from mbedtls import tls
from mbedtls.exceptions import TLSError

from agent.broker.coapserver import MakeTransport, deduplication, serve
from agent.broker.traffic import Traffic
from agent.sensors.credentials import PskCredential
from agent.sensors.model import Sensor
from agent.sensors.store import SensorStore

log = logging.getLogger(__name__)

CIPHER_SUITES = ("TLS-PSK-WITH-AES-128-CCM-8", "TLS-PSK-WITH-AES-128-GCM-SHA256",
                 "TLS-PSK-WITH-AES-128-CCM")
HANDSHAKE_TIMEOUT = 30.0
MAX_DATAGRAM = 1500  # a CoAP-over-DTLS datagram; anything longer is not a sensor's
_OVER = tls.HandshakeStep.HANDSHAKE_OVER


class _Keys(Mapping[str, bytes]):
    """The PSK store Mbed TLS asks during a handshake: one registry lookup by identity.
    It remembers which sensor it answered for, so the session knows who it talks to."""

    def __init__(self, store: SensorStore) -> None:
        self._store = store
        self.last: tuple[Sensor, bytes] | None = None

    def __getitem__(self, identity: str) -> bytes:
        self.last = None
        found = self._store.find("dtls-psk", identity.encode("utf-8", "surrogateescape"))
        if found is None or found[0].status == "revoked":
            raise KeyError(identity)
        credential = self._store.credential(found[0])
        if not isinstance(credential, PskCredential):
            raise KeyError(identity)
        self.last = found
        return credential.key.reveal()

    def __iter__(self) -> Iterator[str]:
        return iter(())  # never listed: keys are only looked up

    def __len__(self) -> int:
        return 0


class CoapsAddress(interfaces.EndpointAddress):
    """A unicast peer over DTLS, as aiocoap's message layer sees it: what the DTLS-PSK
    listener's sensors (DtlsRemote) and the LwM2M upstream server (dtlsclient.py) share.
    A subclass says its `hostinfo` and `hostinfo_local`."""

    scheme = "coaps"
    is_multicast = False
    is_multicast_locally = False
    maximum_block_size_exp = constants.MAX_REGULAR_BLOCK_SIZE_EXP

    @property
    def uri_base(self) -> str:
        return f"coaps://{self.hostinfo}"

    @property
    def uri_base_local(self) -> str:
        return f"coaps://{self.hostinfo_local}"


class DtlsRemote(CoapsAddress):
    """A peer of the DTLS listener: one session, one sensor."""

    def __init__(self, server: DtlsServer, address: tuple[Any, ...]) -> None:
        self._server, self.address = server, address
        self.sensor: Sensor | None = None
        self.fingerprint = b""

    @property
    def hostinfo(self) -> str:
        return hostportjoin(self.address[0], self.address[1])

    @property
    def hostinfo_local(self) -> str:
        return self._server.hostinfo_local

    @property
    def blockwise_key(self) -> tuple[Any, ...]:
        return (self.address, id(self))

    def __repr__(self) -> str:
        who = self.sensor.name if self.sensor else "?"
        return f"<DtlsRemote {self.hostinfo} sensor {who}>"


class _Session:
    def __init__(self, buffer: tls.TLSWrappedBuffer, remote: DtlsRemote, now: float) -> None:
        self.buffer, self.remote = buffer, remote
        self.active = now  # the last datagram; idle sessions end (expire)

    @property
    def established(self) -> bool:
        return bool(self.buffer._handshake_state is _OVER)


class DtlsServer(asyncio.DatagramProtocol, interfaces.MessageInterface):
    """The UDP socket, the DTLS sessions, and aiocoap's message manager above them."""

    def __init__(self, mman: interfaces.MessageManager, store: SensorStore, traffic: Traffic,
                 max_sessions: int, idle_timeout: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._mman: interfaces.MessageManager | None = mman
        self._traffic, self._monotonic = traffic, monotonic
        self._keys = _Keys(store)
        self._context = tls.ServerContext(tls.DTLSConfiguration(
            pre_shared_key_store=self._keys, ciphers=CIPHER_SUITES,
            lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
            highest_supported_version=tls.DTLSVersion.DTLSv1_2,
            validate_certificates=False, anti_replay=True))
        self._sessions: dict[tuple[Any, ...], _Session] = {}
        self.max_sessions, self.idle_timeout = max_sessions, idle_timeout
        self._transport: asyncio.DatagramTransport | None = None
        self.hostinfo_local = ""
        self.handshakes = 0

    # --- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        host, port = transport.get_extra_info("sockname")[:2]
        self.hostinfo_local = hostportjoin(host, port)

    def datagram_received(self, data: bytes, address: tuple[Any, ...]) -> None:
        self._traffic.received("dtls")
        if len(data) > MAX_DATAGRAM:
            self._traffic.malformed("dtls", hostportjoin(*address[:2]), f"{len(data)} bytes")
            return
        session = self._sessions.get(address)
        if session is None:
            if len(self._sessions) >= self.max_sessions:
                self._traffic.totals["dtls.sessions_full"] += 1
                return
            buffer = self._context.wrap_buffers()
            buffer.setcookieparam(repr(address[:2]).encode())  # the cookie binds the address
            session = _Session(buffer, DtlsRemote(self, address), self._monotonic())
            self._sessions[address] = session
        session.active = self._monotonic()
        try:
            session.buffer.receive_from_network(data)
            if not session.established:
                self._handshake(session)
            if session.established:
                self._read(session)
        except tls.HelloVerifyRequest:
            self._flush(session)  # the cookie challenge; nothing is kept for this address
            self._drop(session)
        except TLSError as e:
            self._flush(session)  # an alert, if Mbed TLS made one
            self._failed(session, e)

    def _handshake(self, session: _Session) -> None:
        self._keys.last = None
        while not session.established:
            try:
                session.buffer.do_handshake()
            except tls.WantWriteError:
                self._flush(session)
            except tls.WantReadError:
                break
            finally:
                if self._keys.last is not None:
                    session.remote.sensor, session.remote.fingerprint = self._keys.last
                    self._keys.last = None
        self._flush(session)
        if session.established:
            self.handshakes += 1
            self._traffic.totals[f"dtls.suite.{session.buffer.cipher()}"] += 1

    def _read(self, session: _Session) -> None:
        while True:
            try:
                plaintext = session.buffer.read(MAX_DATAGRAM)
            except tls.WantReadError:
                return
            if not plaintext:
                return
            try:
                message = Message.decode(plaintext, remote=session.remote)
            # aiocoap lets a string option that is not UTF-8 escape as UnicodeDecodeError.
            except (coap_error.UnparsableMessage, ValueError):
                self._traffic.malformed("dtls", session.remote.hostinfo, "not a CoAP message")
                continue
            if self._mman is not None:
                self._mman.dispatch_message(message)

    def _flush(self, session: _Session) -> None:
        while True:
            data = session.buffer.peek_outgoing(MAX_DATAGRAM * 4)
            if not data:
                return
            if self._transport is not None:
                self._transport.sendto(data, session.remote.address)
            session.buffer.consume_outgoing(len(data))

    def _failed(self, session: _Session, error: TLSError) -> None:
        text = str(error)
        if "close_notify" in text or "going to be closed" in text:
            self._drop(session)  # a polite goodbye
            return
        kind = "auth-failed" if not session.established else "malformed"
        if kind == "malformed":
            self._traffic.malformed("dtls", session.remote.hostinfo, text)
        else:
            self._traffic.refused("auth-failed", f"DTLS handshake failed: {text}",
                                  session.remote.hostinfo, session.remote.sensor,
                                  "DTLS handshake")
        self._drop(session)

    def _drop(self, session: _Session) -> None:
        if self._sessions.get(session.remote.address) is session:
            del self._sessions[session.remote.address]
        with contextlib.suppress(TLSError):
            session.buffer.shutdown()

    # --- aiocoap's MessageInterface ----------------------------------------------------

    def send(self, message: Message) -> None:
        remote = message.remote
        session = self._sessions.get(getattr(remote, "address", None))  # type: ignore[arg-type]
        if session is None or session.remote is not remote or not session.established:
            return  # the session is gone: the sensor will handshake again
        try:
            session.buffer.write(message.encode())
        except TLSError as e:
            self._failed(session, e)
            return
        self._flush(session)

    async def determine_remote(self, message: Message) -> None:
        return None  # it never starts a session: requests go into a sensor's own

    async def recognize_remote(self, remote: Any) -> bool:
        """A request to a sensor (LwM2M device management) goes into its session."""
        return isinstance(remote, DtlsRemote) and remote._server is self

    async def shutdown(self) -> None:
        self._mman = None
        for session in list(self._sessions.values()):
            with contextlib.suppress(TLSError):
                session.buffer.shutdown()
                self._flush(session)
        self._sessions.clear()
        if self._transport is not None:
            self._transport.close()

    # --- upkeep ----------------------------------------------------------------------------

    def expire(self) -> None:
        now = self._monotonic()
        for session in list(self._sessions.values()):
            limit = self.idle_timeout if session.established else HANDSHAKE_TIMEOUT
            if now - session.active > limit:
                self._drop(session)

    def refresh(self, follow: Callable[[list[tuple[Sensor, bytes]]], list[Sensor | None]]
                ) -> None:
        """Follow the registry: new status for each session's sensor; sessions of rekeyed,
        removed or revoked sensors end."""
        held = [s for s in self._sessions.values() if s.remote.sensor is not None]
        if not held:
            return
        now = follow([(s.remote.sensor, s.remote.fingerprint) for s in held])  # type: ignore[misc]
        for session, sensor in zip(held, now, strict=True):
            if sensor is None or sensor.status == "revoked":
                self._drop(session)
            else:
                session.remote.sensor = sensor

    def status_section(self) -> dict[str, Any]:
        established = sum(1 for s in self._sessions.values() if s.established)
        return {"sessions": established, "handshaking": len(self._sessions) - established,
                "handshakes": self.handshakes}


def identify(remote: Any) -> Sensor | None:
    """The sensor a DTLS session authenticated (for the Gateway)."""
    return remote.sensor if isinstance(remote, DtlsRemote) else None


class DtlsListener:
    name = "dtls"

    def __init__(self, address: str, store: SensorStore, traffic: Traffic,
                 site: interfaces.Resource, max_sessions: int, idle_timeout: float) -> None:
        self.address, self._store, self._traffic, self._site = address, store, traffic, site
        self._max_sessions, self._idle_timeout = max_sessions, idle_timeout
        self._context: aiocoap.Context | None = None
        self.server: DtlsServer | None = None

    async def start(self) -> None:
        def dtls(host: str, port: int) -> MakeTransport:
            async def create(mman: interfaces.MessageManager) -> DtlsServer:
                _, server = await asyncio.get_running_loop().create_datagram_endpoint(
                    lambda: DtlsServer(mman, self._store, self._traffic, self._max_sessions,
                                       self._idle_timeout), local_addr=(host, port))
                self.server = server
                return server
            return create

        self._context = await serve(self.name, self.address, self._site, dtls)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)
            if self.server is not None:
                self.server.expire()

    def refresh(self) -> None:
        if self.server is not None:
            self.server.refresh(self._store.follow)

    @property
    def context(self) -> aiocoap.Context | None:
        """The listener's aiocoap context: the gateway's requests to sensors go out by it."""
        return self._context

    async def close(self) -> None:
        if self._context is not None:
            await self._context.shutdown()
            self._context = None

    def status_section(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"address": self.address, "listening": self._context is not None,
                               "cipher_suites": list(CIPHER_SUITES),
                               "deduplication": deduplication(self._context)}
        if self.server is not None:
            doc.update(self.server.status_section())
        return doc
