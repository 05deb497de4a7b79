"""A sensor speaking OSCORE to the broker, built on aiocoap's own client (the independent
peer): its security context is an aiocoap FilesystemSecurityContext made from the
credential `devidctl sensors add --json` printed, or, for an EDHOC credential, aiocoap's
EDHOC initiator (lakers) with the sensor's key and the gateway's credential, which runs
EDHOC on the first request and then uses the OSCORE context it derived. Also a UDP relay
that records the datagrams it passes, so that a test can replay a captured request."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiocoap
import cbor2
from aiocoap import Code, Message
from aiocoap.edhoc import EdhocCredentials
from aiocoap.oscore import (
    CanProtect,
    CanUnprotect,
    FilesystemSecurityContext,
    NotAProtectedMessage,
    ReplayWindow,
    SecurityContextUtils,
    algorithms,
    hashfunctions,
)
from aiocoap.util import hostportjoin

T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    code: str  # "2.04"
    payload: bytes
    protected: bool  # False: the broker answered without OSCORE (4.01 and the like)
    max_age: int | None = None
    location: tuple[str, ...] = ()  # Location-Path (LwM2M's registration)


def _code(code: Code) -> str:
    return f"{int(code) >> 5}.{int(code) & 31:02d}"


def write_oscore_secret(directory: Path, credential: dict[str, str]) -> None:
    """A minted OSCORE credential as aiocoap's FilesystemSecurityContext reads it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "secret.json").write_text(json.dumps({
        "sender-id_hex": credential["sender_id"],
        "recipient-id_hex": credential["recipient_id"],
        "secret_hex": credential["master_secret"],
        "salt_hex": credential["master_salt"]}))


class OscoreSensor:
    """Runs its own event loop in a thread; each call blocks until the answer."""

    def __init__(self, directory: Path, credential: dict[str, str], port: int,
                 host: str = "127.0.0.1") -> None:
        self.host = host
        if credential["transport"] == "oscore":
            write_oscore_secret(directory, credential)
        else:
            directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.port, self.credential = directory, port, credential
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._context: aiocoap.Context = self._run(self._open())

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    async def _open(self) -> aiocoap.Context:
        context = await aiocoap.Context.create_client_context()
        self._security: Any = edhoc_initiator(self.credential) \
            if self.credential["transport"] == "edhoc" else \
            FilesystemSecurityContext(str(self.directory))
        context.client_credentials[self._origin(self.port) + "/*"] = self._security
        return context

    def _origin(self, port: int) -> str:
        return f"coap://{hostportjoin(self.host, port)}"

    def retarget(self, port: int) -> None:
        """Send to another port (a relay) with the same security context."""
        self._context.client_credentials.pop(self._origin(self.port) + "/*")
        self.port = port
        self._context.client_credentials[self._origin(port) + "/*"] = self._security

    def request(self, method: str, path: str, payload: bytes = b"",
                content_format: int | None = None, query: tuple[str, ...] = ()) -> Answer:
        return self._run(self._request(method, path, payload, content_format, query))

    async def _request(self, method: str, path: str, payload: bytes,
                       content_format: int | None, query: tuple[str, ...]) -> Answer:
        message = Message(code=Code[method], payload=payload,
                          uri=self._origin(self.port) + path)
        if content_format is not None:
            message.opt.content_format = content_format
        message.opt.uri_query = query
        try:
            response = await self._context.request(message).response
        except NotAProtectedMessage as e:
            plain = e.plain_message
            return Answer(_code(plain.code), plain.payload, False, plain.opt.max_age)
        return Answer(_code(response.code), response.payload, True, response.opt.max_age,
                      tuple(response.opt.location_path))

    def forget_edhoc_session(self) -> None:
        """Run EDHOC again on the next request (what a sensor does after a 4.01)."""
        self._security.forget()

    def close(self) -> None:
        self._run(self._context.shutdown())
        if isinstance(self._security, FilesystemSecurityContext):
            self._security._destroy()  # its lock: the directory may be opened again
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class MemoryContext(CanProtect, CanUnprotect, SecurityContextUtils):  # type: ignore[misc]
    """A sensor's OSCORE context in memory only (AES-CCM-16-64-128, HKDF-SHA-256): for
    bench/broker.py's load generator (aiocoap's FilesystemSecurityContext fsyncs its
    sequence numbers from the event loop, stalls that would count as the broker's latency)
    and for unit tests of keys derived elsewhere (EDHOC's exporter)."""

    def __init__(self, secret: bytes, salt: bytes, sender_id: bytes, recipient_id: bytes
                 ) -> None:
        self.alg_aead = algorithms["AES-CCM-16-64-128"]
        self.hashfun = hashfunctions["sha256"]
        self.sender_id, self.recipient_id, self.id_context = sender_id, recipient_id, None
        self.derive_keys(salt, secret)
        self.sender_sequence_number = 0
        self.recipient_replay_window = ReplayWindow(32, lambda: None)
        self.recipient_replay_window.initialize_empty()

    @classmethod
    def of(cls, credential: dict[str, str]) -> MemoryContext:
        """The context of what `devidctl sensors add --json` printed for an OSCORE sensor."""
        return cls(bytes.fromhex(credential["master_secret"]),
                   bytes.fromhex(credential["master_salt"]),
                   bytes.fromhex(credential["sender_id"]),
                   bytes.fromhex(credential["recipient_id"]))

    def post_seqnoincrease(self) -> None:
        pass  # it lives as long as the run that made it


class SessionKeepingEdhoc(EdhocCredentials):  # type: ignore[misc]
    """aiocoap 0.4.17's client runs EDHOC again for every request: it stores the session on
    its transport but looks for it on the credentials. This keeps the first session, as a
    sensor would, until `forget()` (the sensor re-keys after a 4.01)."""

    _session: Any = None

    async def establish_context(self, *args: Any, **kwargs: Any) -> Any:
        if self._session is None:
            self._session = await super().establish_context(*args, **kwargs)
        return self._session

    def forget(self) -> None:
        self._session = None


def edhoc_initiator(credential: dict[str, Any]) -> SessionKeepingEdhoc:
    """aiocoap's EDHOC credentials for the sensor's side, from what `sensors add` printed:
    its own CCS and key (sent by key ID), the gateway's CCS to check message 2 against."""
    own = cbor2.loads(bytes.fromhex(credential["credential"]))
    return SessionKeepingEdhoc(
        suite=credential["cipher_suite"], method=credential["method"],
        own_cred_style="by-key-id", own_cred={14: own},
        private_key={1: 2, -1: 1, -4: bytes.fromhex(credential["private_key"])},
        peer_cred={14: cbor2.loads(bytes.fromhex(credential["gateway_credential"]))})


class UdpRelay:
    """Passes datagrams between one client and `target`, keeping those it relayed."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self.requests: list[bytes] = []
        self._client: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            if source == self.target:
                if self._client is not None:
                    self._sock.sendto(data, self._client)
            else:
                self._client = source
                self.requests.append(data)
                self._sock.sendto(data, self.target)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


def send_raw(datagram: bytes, target: tuple[str, int], new_message_id: int) -> Message:
    """Send a captured CoAP datagram again from a fresh socket, with another message ID (not
    protected by OSCORE, so an attacker can change it to get past deduplication); the
    answer as a parsed message."""
    data = bytearray(datagram)
    data[2:4] = new_message_id.to_bytes(2, "big")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(bytes(data), target)
        answer, _ = sock.recvfrom(65535)
    return Message.decode(answer)
