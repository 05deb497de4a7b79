"""Pushing the credentials out: watches and file sinks follow every change.

The credential holder calls `on_change` at every rotation and withdrawal;
`run` then gives each watcher the latest state (a slow watcher skips to the
newest, never gets a stale one), rewrites each consumer's file sink and runs
its reload command, and removes the sinks of withdrawn credentials and of
consumers no longer declared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509

from agent import events
from agent.aio import first_of
from agent.config import AgentConfig, ConsumerSection
from agent.daemon.hooks import run_hook
from agent.errors import DevidError, PermissionDenied, StateError
from agent.identityapi import protocol
from agent.identityapi.credentialset import CredentialSet, credential_document
from agent.identityapi.ledger import Ledger
from agent.identityapi.sinks import FileSink
from agent.rotation.credentials import CredentialHolder, TlsCredentials

log = logging.getLogger(__name__)


class Peer(Protocol):
    """A watch connection as the API sees it: it is sent lines until it goes away."""
    async def send(self, line: bytes) -> None: ...


@dataclass(eq=False)  # kept in a set: identity, not value
class _Watch:
    consumer: str
    latest: tuple[bytes, str] | None = None  # the line to send, and what it delivers
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Distribution:
    def __init__(self, holder: CredentialHolder, ledger: Ledger,
                 trust_bundle: Callable[[], Sequence[x509.Certificate]],
                 generation: Callable[[], int], config: AgentConfig) -> None:
        self._holder, self._ledger = holder, ledger
        self._trust_bundle, self._generation = trust_bundle, generation
        self._config = config
        self._watches: set[_Watch] = set()
        self._changed = asyncio.Event()
        self._withdrawn_reason: str | None = None
        holder.subscribe(self._on_change)

    def apply(self, config: AgentConfig) -> None:
        self._config = config
        self._changed.set()  # sinks follow the new declarations

    def sink(self, consumer: ConsumerSection) -> FileSink:
        return FileSink(self._config.identity_api.sink_root, consumer.name, consumer.uid,
                        consumer.gid, consumer.sink_mode == "0640")

    # --- the current state ---------------------------------------------------------------

    def _on_change(self, credentials: TlsCredentials | None, reason: str | None = None) -> None:
        self._withdrawn_reason = None if credentials is not None else (reason or "withdrawn")
        self._changed.set()

    def current(self) -> TlsCredentials:
        """The credentials to hand out now; StateError saying why there are none."""
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

    def document(self, creds: TlsCredentials) -> dict[str, Any]:
        return credential_document(creds, self._trust_bundle(), self._generation())

    def _event_line(self) -> tuple[bytes, str]:
        """The line a watcher gets for the current state, and which event it is."""
        try:
            creds = self.current()
        except StateError as e:
            return protocol.encode_event("withdrawn", {"reason": e.message}), "withdrawn"
        return protocol.encode_event("credentials", self.document(creds)), "credentials"

    # --- watches -------------------------------------------------------------------------

    async def watch(self, consumer: ConsumerSection, peer: Peer,
                    closed: asyncio.Event) -> None:
        """Stream the current state, then every change, until the peer goes or the
        consumer is undeclared or loses its grant (then with a final error)."""
        watch = _Watch(consumer.name, latest=self._event_line())
        watch.changed.set()
        self._watches.add(watch)
        state = self._ledger.states.get(consumer.name)
        if state is not None:
            state.watchers += 1
        try:
            while not closed.is_set():
                if watch.changed.is_set():
                    watch.changed.clear()
                    ended = self._watch_ended(consumer.name)
                    if ended is not None:
                        await peer.send(protocol.encode_error(ended))
                        return
                    latest, watch.latest = watch.latest, None
                    if latest is not None:
                        line, what = latest
                        await peer.send(line)
                        await self._ledger.delivered(consumer.name, what, "watch", "")
                await first_of(watch.changed, closed)
        finally:
            self._watches.discard(watch)
            state = self._ledger.states.get(consumer.name)
            if state is not None:
                state.watchers -= 1

    def _watch_ended(self, name: str) -> DevidError | None:
        current = next((c for c in self._config.consumers if c.name == name), None)
        if current is None:
            return PermissionDenied(f"consumer {name!r} is no longer declared")
        if "credentials" not in current.grants:
            return PermissionDenied(f"consumer {name!r} is no longer granted 'credentials'")
        return None

    # --- the distribution task -----------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Distribute every change to watchers and sinks until `stop`."""
        self._changed.set()  # the sinks' first state: written, or removed
        while not stop.is_set():
            await first_of(self._changed, stop)
            if stop.is_set():
                return
            self._changed.clear()
            await self._distribute()

    async def _distribute(self) -> None:
        latest = self._event_line()
        for watch in list(self._watches):
            watch.latest = latest  # the latest state wins
            watch.changed.set()
        # Sinks follow withdrawal, not expiry: files of a certificate that expired offline
        # stay until the renewal replaces them (a consumer restarting meanwhile finds its
        # files, and the TLS peer judges the dates).
        creds = None if self._withdrawn_reason is not None else self._holder.held
        for consumer in self._config.consumers:
            if consumer.sink:
                await self._update_sink(consumer, creds)
        await self._remove_undeclared_sinks()

    async def _update_sink(self, consumer: ConsumerSection,
                           creds: TlsCredentials | None) -> None:
        sink, state = self.sink(consumer), self._ledger.states[consumer.name]
        try:
            if creds is None:
                if not await asyncio.to_thread(sink.remove):
                    return
                what, detail = "withdrawn", "files removed"
            else:
                detail = f"serial {creds.serial}"
                if state.last is not None and state.last.via == "sink" and \
                        state.last.detail == detail:
                    return  # already written
                current = CredentialSet.from_document(self.document(creds))
                await asyncio.to_thread(sink.write, current.files(), creds.serial)
                what = "credentials"
        except DevidError as e:
            state.sink_error = e.message
            events.emit(log, "sink-failed", "file sink of %s: %s", consumer.name, e.message,
                        consumer=consumer.name)
            return
        state.sink_error = None
        await self._ledger.delivered(consumer.name, what, "sink", detail)
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
        declared = {c.name for c in self._config.consumers if c.sink}
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in root.iterdir():
                if entry.name not in declared and entry.is_dir() and not entry.is_symlink():
                    await asyncio.to_thread(FileSink(root, entry.name, 0, None, False).remove)

