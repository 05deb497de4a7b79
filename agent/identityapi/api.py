"""The identity API's decisions: who a peer is, what it gets, who got what.

`IdentityApi` is the subsystem the daemon wires: it answers requests for a
peer (the server shell in server.py feeds it), follows the credential holder
to push every rotation or withdrawal to watchers and file sinks, and keeps a
status section (`devidctl consumers list`). The TPM, the audit log and the
clock are injected; nothing here opens a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from agent import events
from agent.audit import AuditLog
from agent.codec import b64encode
from agent.config import AgentConfig, ConsumerSection
from agent.control.peer import PeerCredentials
from agent.daemon.hooks import run_hook
from agent.enroll.evidence import REQUEST_LABEL
from agent.errors import ControlError, DevidError, PermissionDenied, StateError
from agent.identityapi import protocol
from agent.identityapi.consumers import Refusal, UnitReader, grant_refusal, identify
from agent.identityapi.credentialset import CredentialSet, credential_document
from agent.identityapi.ratelimit import TokenBucket
from agent.identityapi.secretstore import SecretStore
from agent.identityapi.sinks import FileSink, check_volatile
from agent.pki.certinfo import public_key_sha256
from agent.rotation.credentials import CredentialHolder, TlsCredentials
from agent.secret import SecretBytes
from agent.tpm.blobs import KeyBlob
from agent.tpm.custody import Signature, TpmCustody

log = logging.getLogger(__name__)
T = TypeVar("T")

# What the identity key signs for the agent itself, which no consumer may have it sign:
# device requests (renewal, decommissioning: agent.enroll.evidence) and DER structures
# (certificate requests, certificates).
_RESERVED_PREFIXES = (len(REQUEST_LABEL).to_bytes(4, "big") + REQUEST_LABEL, b"\x30")
_REFUSAL_AUDIT_BURST, _REFUSAL_AUDIT_INTERVAL = 10, 6.0  # per uid: a local flood stays small


class CustodyCall(Protocol):
    """Runs `fn(custody, *args)` on the TPM worker; TpmUnreachable if there is no TPM."""
    def __call__(self, fn: Callable[..., T], *args: object) -> Awaitable[T]: ...


class Peer(Protocol):
    """A watch connection as the API sees it: it is sent lines until it goes away."""
    async def send(self, line: bytes) -> None: ...


@dataclass
class Delivery:
    what: str  # credentials | withdrawn | signature | secret
    via: str  # socket | watch | sink
    at: datetime.datetime
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"what": self.what, "via": self.via, "at": self.at.isoformat(),
                "detail": self.detail}


@dataclass
class _ConsumerState:
    bucket: TokenBucket
    last: Delivery | None = None
    watchers: int = 0
    sink_error: str | None = None
    refused: int = 0


@dataclass(eq=False)  # kept in a set: identity, not value
class _Watch:
    consumer: str
    latest: bytes | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class IdentityApi:
    def __init__(self, config: AgentConfig, holder: CredentialHolder, custody: CustodyCall,
                 audit: AuditLog, trust_bundle: Callable[[], Sequence[x509.Certificate]],
                 identity_chain: Callable[[], Sequence[x509.Certificate]],
                 generation: Callable[[], int], read_unit: UnitReader,
                 monotonic: Callable[[], float] = time.monotonic,
                 mountinfo: Callable[[], str] | None = None) -> None:
        self._holder, self._custody, self._audit = holder, custody, audit
        self._trust_bundle, self._identity_chain = trust_bundle, identity_chain
        self._generation, self._read_unit = generation, read_unit
        self._monotonic = monotonic
        self._mountinfo = mountinfo
        self.secrets = SecretStore(config.paths.state_dir)
        self._states: dict[str, _ConsumerState] = {}
        self._watches: set[_Watch] = set()
        self._refusal_audit: dict[int, TokenBucket] = {}
        self._secret_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._changed = asyncio.Event()
        self._withdrawn_reason: str | None = None
        self._config = config
        self.check(config)
        self.apply(config)
        holder.subscribe(self._on_change)

    # --- configuration ---------------------------------------------------------------

    @property
    def consumers(self) -> list[ConsumerSection]:
        return self._config.consumers

    def check(self, config: AgentConfig) -> None:
        """ConfigError if `config` cannot be served: sinks off tmpfs."""
        if any(c.sink for c in config.consumers):
            check_volatile(config.identity_api.sink_root,
                           self._mountinfo() if self._mountinfo else None)

    def apply(self, config: AgentConfig) -> None:
        """(Re)load the consumers; sinks of removed ones go at the next distribution."""
        old = {c.name: c for c in self._config.consumers}
        self._config = config
        for consumer in config.consumers:
            state = self._states.get(consumer.name)
            if state is None:
                self._states[consumer.name] = _ConsumerState(
                    TokenBucket(consumer.sign_burst, consumer.sign_interval, self._monotonic))
            else:
                state.bucket.reshape(consumer.sign_burst, consumer.sign_interval)
        for name in set(old) - {c.name for c in config.consumers}:
            self._states.pop(name, None)
        self._changed.set()  # sinks follow the new declarations

    def _sink(self, consumer: ConsumerSection) -> FileSink:
        return FileSink(self._config.identity_api.sink_root, consumer.name, consumer.uid,
                        consumer.gid, consumer.sink_mode == "0640")

    # --- who is asking -----------------------------------------------------------------

    async def identify(self, peer: PeerCredentials) -> ConsumerSection:
        """The consumer `peer` is; else PermissionDenied (audited)."""
        found = identify(peer, self.consumers, self._read_unit)
        if isinstance(found, ConsumerSection):
            return found
        await self._refused(peer, "connect", found)
        raise PermissionDenied(f"permission denied: {found.reason}", found.hint)

    async def check_grant(self, peer: PeerCredentials, consumer: ConsumerSection,
                          method: str) -> None:
        """PermissionDenied (audited) unless `consumer` is granted what `method` needs."""
        refusal = grant_refusal(consumer, protocol.GRANT_FOR[method], method)
        if refusal is None:
            return
        state = self._states.get(consumer.name)
        if state is not None:
            state.refused += 1
        await self._refused(peer, method, refusal)
        raise PermissionDenied(f"permission denied: {refusal.reason}", refusal.hint)

    async def _refused(self, peer: PeerCredentials, method: str, refusal: Refusal) -> None:
        bucket = self._refusal_audit.setdefault(peer.uid, TokenBucket(
            _REFUSAL_AUDIT_BURST, _REFUSAL_AUDIT_INTERVAL, self._monotonic))
        if bucket.take() is not None:
            return  # this uid is flooding: it was audited and journaled already
        events.emit(log, "consumer-refused", "identity API: refused %s: %s", method,
                    refusal.reason, uid=peer.uid, pid=peer.pid, reason=refusal.reason)
        await asyncio.to_thread(self._audit.append, "consumer-refused", uid=peer.uid,
                                gid=peer.gid, pid=peer.pid, method=method,
                                reason=refusal.reason)

    # --- requests ----------------------------------------------------------------------

    async def handle(self, consumer: ConsumerSection, request: protocol.Request
                     ) -> dict[str, Any]:
        if request.method == "hello":
            return {"consumer": consumer.name, "grants": list(consumer.grants),
                    "api_version": protocol.VERSION, "sink": consumer.sink,
                    # x5c (RFC 7515): what a JWS signed by `sign` carries to be verified
                    "identity_x5c": [b64encode(c.public_bytes(Encoding.DER))
                                     for c in self._identity_chain()]}
        if request.method == "credentials":
            return await self._credentials(consumer, "socket")
        if request.method == "sign":
            return await self._sign(consumer, protocol.sign_data(request.params))
        if request.method == "secret":
            return await self._secret(consumer, protocol.secret_name(request.params))
        raise ControlError(f"{request.method} is not a one-shot request")

    def _current(self) -> TlsCredentials:
        creds = self._holder.current()
        if creds is not None:
            return creds
        held = self._holder.held
        if self._withdrawn_reason is not None:
            why = f"they were withdrawn: {self._withdrawn_reason}"
        elif held is not None:
            expired = held.certificate.not_valid_after_utc
            why = f"the certificate expired at {expired:%Y-%m-%d %H:%M}Z and is not renewed yet"
        else:
            why = "the gateway is not enrolled yet"
        raise StateError(f"no credentials to hand out: {why}", "see `devidctl status`")

    def _document(self, creds: TlsCredentials) -> dict[str, Any]:
        return credential_document(creds, self._trust_bundle(), self._generation())

    async def _credentials(self, consumer: ConsumerSection, via: str) -> dict[str, Any]:
        creds = self._current()
        await self._delivered(consumer.name, "credentials", via, f"serial {creds.serial}")
        return self._document(creds)

    async def _delivered(self, name: str, what: str, via: str, detail: str) -> None:
        state = self._states.get(name)
        if state is not None:
            state.last = Delivery(what, via, datetime.datetime.now(datetime.UTC), detail)
        await asyncio.to_thread(self._audit.append, f"consumer-{what}", consumer=name, via=via,
                                detail=detail)

    async def _sign(self, consumer: ConsumerSection, data: bytes) -> dict[str, Any]:
        if data.startswith(_RESERVED_PREFIXES):
            raise PermissionDenied(
                "permission denied: the data has the form of the agent's own signed requests "
                "(a device request or a DER structure such as a certificate request)",
                "sign application data such as a JWS signing input (docs/identity-api.md)")
        state = self._states.get(consumer.name)
        if state is None:  # removed by a reload while this request was on its way
            raise PermissionDenied(f"consumer {consumer.name!r} is no longer declared")
        wait = state.bucket.take()
        if wait is not None:
            raise StateError(f"sign: rate limit of consumer {consumer.name!r} reached "
                             f"({consumer.sign_burst} at once, then one per "
                             f"{consumer.sign_interval:g}s); retry in {wait:.1f}s",
                             "sign once and reuse the result (e.g. cache the token the "
                             "assertion buys); the TPM is slow and shared")
        signature: Signature = await self._custody(TpmCustody.sign, data)
        r, s = decode_dss_signature(signature.der)
        chain = self._identity_chain()
        digest = hashlib.sha256(data).hexdigest()
        await self._delivered(consumer.name, "signature", "socket", f"sha256 {digest}")
        return {"algorithm": "ES256", "signature": b64encode(signature.der),
                "jws_signature": protocol.b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big")),
                "certificate_chain": "".join(
                    c.public_bytes(Encoding.PEM).decode() for c in chain),
                "key_sha256": public_key_sha256(chain[0]) if chain else None}

    async def _secret(self, consumer: ConsumerSection, name: str) -> dict[str, Any]:
        lock = self._secret_locks.setdefault((consumer.name, name), asyncio.Lock())
        async with lock:  # two first requests must not make two secrets
            blob = await asyncio.to_thread(self.secrets.load, consumer.name, name)
            created = blob is None
            if blob is None:
                held = await asyncio.to_thread(self.secrets.names, consumer.name)
                if len(held) >= protocol.MAX_SECRETS:
                    raise StateError(
                        f"consumer {consumer.name!r} already has {len(held)} secrets, the "
                        f"most one may have; not creating {name!r}",
                        "reuse a secret (derive more keys from it with HKDF), or purge the "
                        "consumer's secrets")
                secret = SecretBytes(secrets.token_bytes(protocol.SECRET_BYTES))
                sealed: KeyBlob = await self._custody(
                    TpmCustody.seal, secret, self._config.identity_api.secret_pcrs)
                await asyncio.to_thread(self.secrets.save, consumer.name, name, sealed)
            else:
                secret = await self._custody(TpmCustody.unseal, blob)
                if len(secret) != protocol.SECRET_BYTES:
                    raise StateError(f"secret {consumer.name}/{name}: unsealed {len(secret)} "
                                     f"bytes, expected {protocol.SECRET_BYTES}")
        await self._delivered(consumer.name, "secret", "socket",
                              f"{name} ({'created' if created else 'unsealed'})")
        return {"name": name, "secret": b64encode(secret.reveal()), "created": created}

    # --- watches and sinks ---------------------------------------------------------------

    def _on_change(self, credentials: TlsCredentials | None, reason: str | None = None) -> None:
        self._withdrawn_reason = None if credentials is not None else (reason or "withdrawn")
        self._changed.set()

    def _event_line(self) -> tuple[bytes, str]:
        """The line a watcher gets for the current state, and what it is."""
        try:
            creds = self._current()
        except StateError as e:
            return protocol.encode_event("withdrawn", {"reason": e.message}), "withdrawn"
        return protocol.encode_event("credentials", self._document(creds)), "credentials"

    async def watch(self, consumer: ConsumerSection, peer: Peer,
                    closed: asyncio.Event) -> None:
        """Stream the current state, then every change, until the peer goes or the
        consumer is undeclared (then with a final error)."""
        watch = _Watch(consumer.name)
        watch.latest, _ = self._event_line()
        watch.changed.set()
        self._watches.add(watch)
        if consumer.name in self._states:
            self._states[consumer.name].watchers += 1
        try:
            while not closed.is_set():
                if watch.changed.is_set():
                    watch.changed.clear()
                    ended = self._watch_ended(consumer.name)
                    if ended is not None:  # undeclared, or its grant taken away
                        await peer.send(protocol.encode_error(ended))
                        return
                    line, watch.latest = watch.latest, None
                    if line is not None:
                        await peer.send(line)
                        what = "credentials" if b'"event":"credentials"' in line else \
                            "withdrawn"
                        await self._delivered(consumer.name, what, "watch", "")
                waiter = asyncio.ensure_future(watch.changed.wait())
                closer = asyncio.ensure_future(closed.wait())
                try:
                    await asyncio.wait({waiter, closer}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    closer.cancel()
        finally:
            self._watches.discard(watch)
            if consumer.name in self._states:
                self._states[consumer.name].watchers -= 1

    def _watch_ended(self, name: str) -> DevidError | None:
        current = next((c for c in self.consumers if c.name == name), None)
        if current is None:
            return PermissionDenied(f"consumer {name!r} is no longer declared")
        if "credentials" not in current.grants:
            return PermissionDenied(f"consumer {name!r} is no longer granted 'credentials'")
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """Distribute every change to watchers and sinks until `stop`."""
        self._changed.set()  # the sinks' first state: written, or removed
        while not stop.is_set():
            waiter = asyncio.ensure_future(self._changed.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
            if stop.is_set():
                return
            self._changed.clear()
            await self._distribute()

    async def _distribute(self) -> None:
        line, _ = self._event_line()
        for watch in list(self._watches):
            watch.latest = line  # the latest state wins; a slow watcher skips none it needs
            watch.changed.set()
        # Sinks follow withdrawal, not expiry: files of a certificate that expired offline
        # stay until the renewal replaces them (a consumer restarting meanwhile finds its
        # files, and the TLS peer judges the dates).
        creds = None if self._withdrawn_reason is not None else self._holder.held
        for consumer in self.consumers:
            if consumer.sink:
                await self._update_sink(consumer, creds)
        await self._remove_undeclared_sinks()

    async def _update_sink(self, consumer: ConsumerSection,
                           creds: TlsCredentials | None) -> None:
        sink, state = self._sink(consumer), self._states[consumer.name]
        try:
            if creds is None:
                if not await asyncio.to_thread(sink.remove):
                    return
                what, detail = "withdrawn", "files removed"
            else:
                current = CredentialSet.from_document(self._document(creds))
                if state.last is not None and state.last.via == "sink" and \
                        state.last.detail == f"serial {creds.serial}":
                    return  # already written
                await asyncio.to_thread(sink.write, current.files(), creds.serial)
                what, detail = "credentials", f"serial {creds.serial}"
        except DevidError as e:
            state.sink_error = e.message
            events.emit(log, "sink-failed", "file sink of %s: %s", consumer.name, e.message,
                        consumer=consumer.name)
            return
        state.sink_error = None
        await self._delivered(consumer.name, what, "sink", detail)
        argv = consumer.reload_argv()
        if argv:
            result = await run_hook(argv, {"DEVID_CONSUMER": consumer.name,
                                           "DEVID_SINK": str(sink.directory)},
                                    self._config.rotation.hook_timeout)
            if not result.ok:
                state.sink_error = f"reload {result.command}: {result.detail}"
                events.emit(log, "sink-failed", "reload command of %s: %s", consumer.name,
                            result.detail, consumer=consumer.name)

    async def _remove_undeclared_sinks(self) -> None:
        root = self._config.identity_api.sink_root
        declared = {c.name for c in self.consumers if c.sink}
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in root.iterdir():
                if entry.name not in declared and entry.is_dir() and not entry.is_symlink():
                    await asyncio.to_thread(FileSink(root, entry.name, 0, None, False).remove)

    # --- operators (control socket) ----------------------------------------------------

    def status_section(self) -> dict[str, Any]:
        """`devidctl consumers list` and the status document's `identity_api`."""
        consumers = []
        for consumer in self.consumers:
            state = self._states[consumer.name]
            consumers.append({
                "name": consumer.name, "user": consumer.user, "uid": consumer.uid,
                "group": consumer.group, "unit": consumer.unit,
                "grants": list(consumer.grants),
                "sink": str(self._sink(consumer).directory) if consumer.sink else None,
                "watchers": state.watchers, "refused": state.refused,
                "last": state.last.to_dict() if state.last else None,
                "sink_error": state.sink_error,
                "secrets": self.secrets.names(consumer.name)})
        declared = {c.name for c in self.consumers}
        orphans = [name for name in self.secrets.owners() if name not in declared]
        return {"socket": str(self._config.identity_api.socket), "consumers": consumers,
                "undeclared_with_secrets": orphans}

    async def purge(self, name: str) -> dict[str, Any]:
        if any(c.name == name for c in self.consumers):
            raise StateError(f"consumer {name!r} is still declared in the configuration",
                             "remove its [[consumers]] entry from agent.toml, reload the "
                             "agent (systemctl reload devid-agent), then purge")
        if not protocol.SECRET_NAME.match(name):
            raise ControlError(f"{name!r} is not a consumer name")
        destroyed = await asyncio.to_thread(self.secrets.purge, name)
        if destroyed:
            events.emit(log, "consumer-purged", "destroyed %d sealed secret(s) of removed "
                        "consumer %s", len(destroyed), name, consumer=name)
            await asyncio.to_thread(self._audit.append, "consumer-purged", consumer=name,
                                    secrets=destroyed)
        return {"consumer": name, "destroyed": destroyed}
