"""The TLS credentials in use, swapped atomically at each rotation.

`CredentialHolder` is what consumers (the registrar client, the broker, a
relying-party probe) ask for the current certificate and key. A rotation
publishes a new immutable `TlsCredentials`; connections already open keep
the SSLContext they were made with, new ones get the new one: nothing in
flight is dropped. `current()` never returns an expired certificate, and
after revocation or decommissioning it returns nothing at all.

ssl.SSLContext.load_cert_chain only reads files, so the key is handed over
through an anonymous memfd (memory only, close-on-exec, gone when closed),
never a file on disk.
"""

from __future__ import annotations

import datetime
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.clock import Clock, utcnow
from agent.pki.devicecert import Validity, validity_of
from agent.rotation.tlskey import private_pem

# Called with the new credentials, or None and the reason when they are withdrawn.
Listener = Callable[["TlsCredentials | None", "str | None"], None]


def load_chain_from_memory(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    fd = os.memfd_create("devid-tls", os.MFD_CLOEXEC)
    try:
        data = memoryview(chain_pem + key_pem)
        while data:
            data = data[os.write(fd, data):]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


@dataclass(frozen=True, eq=False)
class TlsCredentials:
    device_id: str
    chain: tuple[x509.Certificate, ...]  # leaf first
    key: ec.EllipticCurvePrivateKey
    _contexts: dict[tuple[str, str], ssl.SSLContext] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> str:
        return format(self.certificate.serial_number, "x")

    @property
    def validity(self) -> Validity:
        return validity_of(self.certificate)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def ssl_context(self, purpose: str, trust_pem: str) -> ssl.SSLContext:
        """A TLS ≥1.2 context presenting these credentials and trusting `trust_pem`:
        purpose "client" verifies the server, "server" requires a client certificate."""
        key = (purpose, trust_pem)
        with self._lock:
            ctx = self._contexts.get(key)
            if ctx is None:
                if purpose == "client":
                    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=trust_pem)
                else:
                    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=trust_pem)
                    ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                load_chain_from_memory(ctx, self.chain_pem(), private_pem(self.key))
                self._contexts[key] = ctx
        return ctx


class CredentialHolder:
    """The one place the agent's current TLS credentials live."""

    def __init__(self, clock: Clock = utcnow) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._current: TlsCredentials | None = None
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Called after every change: (credentials, None), or (None, reason) on withdrawal."""
        self._listeners.append(listener)

    def publish(self, credentials: TlsCredentials) -> None:
        with self._lock:
            self._current = credentials
        self._notify(credentials, None)

    def withdraw(self, reason: str) -> None:
        """No credentials any more (revoked, decommissioned): `reason` says why."""
        with self._lock:
            self._current = None
        self._notify(None, reason)

    def _notify(self, credentials: TlsCredentials | None, reason: str | None) -> None:
        for listener in self._listeners:
            listener(credentials, reason)

    def current(self, now: datetime.datetime | None = None) -> TlsCredentials | None:
        """The credentials to present now; None if there are none or they expired."""
        with self._lock:
            creds = self._current
        if creds is None:
            return None
        when = now or self._clock()
        if when > creds.certificate.not_valid_after_utc:
            return None
        return creds

    @property
    def held(self) -> TlsCredentials | None:
        """What is held, expired or not (for status)."""
        with self._lock:
            return self._current
