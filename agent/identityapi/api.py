"""The identity API's decisions: who a peer is and what it may have.

`IdentityApi` answers requests for a peer (the socket shell in server.py
feeds it): it identifies the consumer, checks its grants, and serves
`credentials`, `sign` and `secret`. Pushed updates (watches, file sinks) are
distribution.py's; who got what is the ledger's. The TPM, the audit log and
the clock are injected; nothing here opens a socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from agent import events
from agent.audit import AuditLog
from agent.codec import b64encode
from agent.config import AgentConfig, ConsumerSection
from agent.control.peer import PeerCredentials
from agent.enroll.evidence import REQUEST_LABEL
from agent.errors import ControlError, PermissionDenied, StateError
from agent.identityapi import protocol
from agent.identityapi.consumers import UnitReader, grant_refusal, identify
from agent.identityapi.distribution import Distribution, Peer
from agent.identityapi.ledger import Ledger
from agent.identityapi.secretstore import SecretStore
from agent.identityapi.sinks import check_volatile
from agent.pki.certinfo import public_key_sha256
from agent.rotation.credentials import CredentialHolder
from agent.secret import SecretBytes
from agent.tpm.blobs import KeyBlob
from agent.tpm.custody import Signature, TpmCustody

log = logging.getLogger(__name__)
T = TypeVar("T")

# What the identity key signs for the agent itself, which no consumer may have it sign:
# device requests (renewal, decommissioning: agent.enroll.evidence) and DER structures
# (certificate requests, certificates).
_RESERVED_PREFIXES = (len(REQUEST_LABEL).to_bytes(4, "big") + REQUEST_LABEL, b"\x30")


class CustodyCall(Protocol):
    """Runs `fn(custody, *args)` on the TPM worker; TpmUnreachable if there is no TPM."""
    def __call__(self, fn: Callable[..., T], *args: object) -> Awaitable[T]: ...


class IdentityApi:
    def __init__(self, config: AgentConfig, holder: CredentialHolder, custody: CustodyCall,
                 audit: AuditLog, trust_bundle: Callable[[], Sequence[x509.Certificate]],
                 identity_chain: Callable[[], Sequence[x509.Certificate]],
                 generation: Callable[[], int], read_unit: UnitReader,
                 monotonic: Callable[[], float] = time.monotonic,
                 mountinfo: Callable[[], str] | None = None) -> None:
        self._custody, self._audit = custody, audit
        self._identity_chain, self._read_unit = identity_chain, read_unit
        self._mountinfo = mountinfo
        self.secrets = SecretStore(config.paths.state_dir)
        self.ledger = Ledger(audit, monotonic)
        self.distribution = Distribution(holder, self.ledger, trust_bundle, generation, config)
        self._secret_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._config = config
        self.check(config)
        self.apply(config)

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
        self._config = config
        self.ledger.apply(config.consumers)
        self.distribution.apply(config)

    async def run(self, stop: asyncio.Event) -> None:
        await self.distribution.run(stop)

    async def watch(self, consumer: ConsumerSection, peer: Peer,
                    closed: asyncio.Event) -> None:
        await self.distribution.watch(consumer, peer, closed)

    # --- who is asking -----------------------------------------------------------------

    async def identify(self, peer: PeerCredentials) -> ConsumerSection:
        """The consumer `peer` is; else PermissionDenied (audited)."""
        found = identify(peer, self.consumers, self._read_unit)
        if isinstance(found, ConsumerSection):
            return found
        await self.ledger.refused(peer, "connect", found)
        raise PermissionDenied(f"permission denied: {found.reason}", found.hint)

    async def check_grant(self, peer: PeerCredentials, consumer: ConsumerSection,
                          method: str) -> None:
        """PermissionDenied (audited) unless `consumer` is granted what `method` needs."""
        refusal = grant_refusal(consumer, protocol.GRANT_FOR[method], method)
        if refusal is None:
            return
        await self.ledger.refused(peer, method, refusal, consumer.name)
        raise PermissionDenied(f"permission denied: {refusal.reason}", refusal.hint)

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

    async def _credentials(self, consumer: ConsumerSection, via: str) -> dict[str, Any]:
        creds = self.distribution.current()
        await self.ledger.delivered(consumer.name, "credentials", via, f"serial {creds.serial}")
        return self.distribution.document(creds)

    async def _sign(self, consumer: ConsumerSection, data: bytes) -> dict[str, Any]:
        if data.startswith(_RESERVED_PREFIXES):
            raise PermissionDenied(
                "permission denied: the data has the form of the agent's own signed requests "
                "(a device request or a DER structure such as a certificate request)",
                "sign application data such as a JWS signing input (docs/identity-api.md)")
        state = self.ledger.states.get(consumer.name)
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
        await self.ledger.delivered(consumer.name, "signature", "socket", f"sha256 {digest}")
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
        await self.ledger.delivered(consumer.name, "secret", "socket",
                              f"{name} ({'created' if created else 'unsealed'})")
        return {"name": name, "secret": b64encode(secret.reveal()), "created": created}

    # --- operators (control socket) ----------------------------------------------------

    def status_section(self) -> dict[str, Any]:
        """`devidctl consumers list` and the status document's `identity_api`."""
        consumers = []
        for consumer in self.consumers:
            state = self.ledger.states[consumer.name]
            consumers.append({
                "name": consumer.name, "user": consumer.user, "uid": consumer.uid,
                "group": consumer.group, "unit": consumer.unit,
                "grants": list(consumer.grants),
                "sink": str(self.distribution.sink(consumer).directory) if consumer.sink
                else None,
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
