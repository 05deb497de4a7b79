"""DTLS 1.2 with certificates, as a client, under aiocoap: the gateway's session to its
upstream LwM2M server (LwM2M Gateway, issue 13).

The gateway presents its current TLS certificate and key (from the agent's
identity API, in memory only) and verifies the server against a trust bundle
and by name: a DNS name in the URL is checked by Mbed TLS against the
certificate's names, an IP address against its iPAddress SANs (Mbed TLS 2.28
checks DNS names only, so that check is made here after the handshake).

Both ends talk CoAP over one session: the gateway's requests (Register,
Update) and the server's (Read, Write, Observe on /25 and /PREFIX/...). After
a certificate rotation, `connect` opens a second session with the new
certificate from a new port; requests go out on it as soon as it is
established, while the old one still delivers answers to what was sent on it
for a grace period, then closes. The registration stays (the next Update
tells the server the new address).

Mbed TLS retransmits a handshake flight only when asked after its timer ran
out, so a lost datagram is covered by asking again every quarter second until
the handshake completes or `timeout` passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any

from aiocoap import error as coap_error
from aiocoap import interfaces
from aiocoap.message import Message
from aiocoap.util import hostportjoin
from cryptography import x509 as cx509
from cryptography.hazmat.primitives.serialization import Encoding
from mbedtls import pk, tls
from mbedtls import x509 as mx509
from mbedtls.exceptions import TLSError

from agent.broker.dtls import CoapsAddress
from agent.errors import UpstreamError
from agent.identityapi.credentialset import CredentialSet

log = logging.getLogger(__name__)

# RFC 7925 4.4.1 makes TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 the certificate mode's suite;
# servers outside constrained networks often prefer GCM.
CIPHER_SUITES = ("TLS-ECDHE-ECDSA-WITH-AES-128-CCM-8",
                 "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256",
                 "TLS-ECDHE-ECDSA-WITH-AES-128-CCM",
                 "TLS-ECDHE-RSA-WITH-AES-128-GCM-SHA256")
MAX_DATAGRAM = 1500
POKE = 0.25  # seconds between handshake retries (Mbed TLS retransmits when due)
GRACE = 10.0  # an old session still delivers answers this long after a new one took over
_OVER = tls.HandshakeStep.HANDSHAKE_OVER


def configuration(credentials: CredentialSet, trust: str | None) -> tls.DTLSConfiguration:
    """Mbed TLS's client configuration presenting `credentials` and verifying the server
    against `trust` (PEM), else against the agent's trust bundle."""
    files = credentials.files()
    chain = [mx509.CRT.from_DER(der) for der in _ders(files["fullchain.pem"])]
    anchors = [mx509.CRT.from_DER(der) for der in
               _ders(trust.encode() if trust is not None else files["bundle.pem"])]
    key = pk.ECC.from_PEM(files["key.pem"].decode())
    return tls.DTLSConfiguration(
        certificate_chain=(tuple(chain), key), trust_store=tls.TrustStore(anchors),
        validate_certificates=True, ciphers=CIPHER_SUITES,
        lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
        highest_supported_version=tls.DTLSVersion.DTLSv1_2)


def _ders(pem: bytes) -> list[bytes]:
    return [c.public_bytes(Encoding.DER) for c in cx509.load_pem_x509_certificates(pem)]


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class ServerRemote(CoapsAddress):
    """The upstream server, whichever session currently carries the traffic."""

    def __init__(self, client: DtlsClient) -> None:
        self._client = client

    @property
    def hostinfo(self) -> str:
        return hostportjoin(self._client.host, self._client.port)

    @property
    def hostinfo_local(self) -> str:
        session = self._client.session
        return session.local if session is not None else ""

    @property
    def blockwise_key(self) -> tuple[Any, ...]:
        return ("dtls-client", id(self))

    def __repr__(self) -> str:
        return f"<ServerRemote {self.hostinfo}>"


class Session(asyncio.DatagramProtocol):
    """One DTLS session from one local port."""

    def __init__(self, client: DtlsClient, buffer: tls.TLSWrappedBuffer, serial: str) -> None:
        self._client, self.buffer, self.serial = client, buffer, serial
        self.transport: asyncio.DatagramTransport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.local = ""
        self.closed = False

    @property
    def established(self) -> bool:
        return bool(self.buffer._handshake_state is _OVER)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        host, port = transport.get_extra_info("sockname")[:2]
        self.local = hostportjoin(host, port)

    def datagram_received(self, data: bytes, address: tuple[Any, ...]) -> None:
        if len(data) > MAX_DATAGRAM * 4 or self.closed:
            return
        try:
            self.buffer.receive_from_network(data)
            if not self.established:
                self.step()
            else:
                self._read()
        except TLSError as e:
            self.fail(f"DTLS: {e}")

    def error_received(self, exc: Exception) -> None:
        if not self.established:
            self.fail(f"DTLS: {exc}")  # e.g. ICMP port unreachable: nobody listens there

    def step(self) -> None:
        """Drive the handshake as far as it goes now (also a retransmission when due)."""
        while not self.established:
            try:
                self.buffer.do_handshake()
            except tls.WantWriteError:
                self.flush()  # one flight written; the handshake goes on
            except tls.WantReadError:
                break  # the server's turn
            except TLSError as e:
                self.flush()
                self.fail(f"DTLS handshake: {e}")
                return
        self.flush()
        if self.established and not self.done.done():
            self.done.set_result(None)

    def _read(self) -> None:
        while True:
            try:
                plaintext = self.buffer.read(MAX_DATAGRAM * 4)
            except tls.WantReadError:
                return
            if not plaintext:
                return
            self._client.deliver(plaintext)

    def write(self, data: bytes) -> None:
        try:
            self.buffer.write(data)
        except TLSError as e:
            self.fail(f"DTLS: {e}")
            return
        self.flush()

    def flush(self) -> None:
        while True:
            data = self.buffer.peek_outgoing(MAX_DATAGRAM * 4)
            if not data:
                return
            if self.transport is not None and not self.transport.is_closing():
                self.transport.sendto(data)
            self.buffer.consume_outgoing(len(data))

    def fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(UpstreamError(why))
        elif not self.closed:
            log.warning("LwM2M upstream: session from %s ended: %s", self.local, why)
            self._client.lost(self, why)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.established:
            with contextlib.suppress(TLSError):
                self.buffer.shutdown()  # close_notify
                self.flush()
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_exception(UpstreamError("DTLS: the session was closed"))
        with contextlib.suppress(asyncio.CancelledError, Exception):
            self.done.exception()  # retrieved: no "never retrieved" warning


class DtlsClient(interfaces.MessageInterface):
    """aiocoap's message interface over the current session to the server."""

    def __init__(self, mman: interfaces.MessageManager, host: str, port: int,
                 timeout: float) -> None:
        self._mman: interfaces.MessageManager | None = mman
        self.host, self.port, self.timeout = host, port, timeout
        self.remote = ServerRemote(self)
        self.session: Session | None = None
        self._old: set[Session] = set()
        self.handshakes = 0
        self.lost_reason: str | None = None

    async def connect(self, credentials: CredentialSet, trust: str | None) -> Session:
        """A new session presenting `credentials`; it carries the traffic from now on.
        UpstreamError when the handshake fails or the server is not the one named."""
        server_name = None if _ip(self.host) else self.host
        buffer = tls.ClientContext(configuration(credentials, trust)).wrap_buffers(server_name)
        loop = asyncio.get_running_loop()
        try:
            _, session = await loop.create_datagram_endpoint(
                lambda: Session(self, buffer, credentials.serial),
                remote_addr=(self.host, self.port))
        except OSError as e:
            raise UpstreamError(f"LwM2M upstream {self.remote.hostinfo}: "
                                f"{e.strerror or e}") from None
        try:
            async with asyncio.timeout(self.timeout):
                while not session.done.done():
                    session.step()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(session.done), POKE)
                await session.done
            self._check_address(session)
        except TimeoutError:
            session.close()
            raise UpstreamError(f"LwM2M upstream {self.remote.hostinfo}: no DTLS handshake "
                                f"within {self.timeout:g} s") from None
        except UpstreamError as e:
            session.close()
            raise UpstreamError(f"LwM2M upstream {self.remote.hostinfo}: {e.message}",
                                "check the server's address, its certificate against the "
                                "bundle, and that it trusts the gateway's CA") from None
        previous, self.session = self.session, session
        self.handshakes += 1
        self.lost_reason = None
        if previous is not None and not previous.closed:
            self._old.add(previous)  # still answers what was sent on it, for GRACE
            loop.call_later(GRACE, self._retire, previous)
        return session

    def _check_address(self, session: Session) -> None:
        address = _ip(self.host)
        if address is None:
            return  # Mbed TLS checked the DNS name
        der = session.buffer.getpeercert(binary_form=True)
        try:
            names = cx509.load_der_x509_certificate(der).extensions.get_extension_for_class(
                cx509.SubjectAlternativeName).value.get_values_for_type(cx509.IPAddress)
        except (ValueError, cx509.ExtensionNotFound):
            names = []
        if address not in names:
            raise UpstreamError(f"the server's certificate does not name {address} (no such "
                                "iPAddress in its subjectAltName)")

    def _retire(self, session: Session) -> None:
        self._old.discard(session)
        session.close()

    def lost(self, session: Session, why: str) -> None:
        if session is self.session:
            self.session = None
            self.lost_reason = why

    def deliver(self, plaintext: bytes) -> None:
        try:
            message = Message.decode(plaintext, remote=self.remote)
        except (coap_error.UnparsableMessage, ValueError):
            log.warning("LwM2M upstream: a datagram that is not CoAP (%d bytes), dropped",
                        len(plaintext))
            return
        if self._mman is not None:
            self._mman.dispatch_message(message)

    # --- aiocoap's MessageInterface ------------------------------------------------------

    def send(self, message: Message) -> None:
        session = self.session
        if session is not None and not session.closed:
            session.write(message.encode())
        # else: no session now; aiocoap retransmits, and the LwM2M client reconnects

    async def determine_remote(self, message: Message) -> ServerRemote | None:
        return None  # requests name the server by `remote`

    async def recognize_remote(self, remote: Any) -> bool:
        return remote is self.remote

    async def shutdown(self) -> None:
        self._mman = None
        for session in [*self._old, *([self.session] if self.session else [])]:
            session.close()
        self._old.clear()
        self.session = None
