"""The gateway's TLS credentials, as the broker holds them: the identity API's `watch`.

The agent pushes the current set at once and every rotation after it. The
upstreams subscribe and build their TLS contexts from each new set, in
memory only. The watch runs in a thread of its own, because the identity
client is synchronous; it reconnects while the agent restarts. A withdrawal
(revoked or decommissioned gateway) leaves no current set: the upstreams then
refuse to forward, and say why.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from agent.consumer import IdentityClient
from agent.consumer.client import Withdrawn
from agent.errors import DevidError
from agent.identityapi.credentialset import CredentialSet

log = logging.getLogger(__name__)

Listener = Callable[[CredentialSet | None], None]


class GatewayCredentials:
    name = "gateway_credentials"

    def __init__(self, client: IdentityClient, retry: float) -> None:
        self._client, self._retry = client, retry
        self.current: CredentialSet | None = None
        self.withdrawn: str | None = None
        self.error: str | None = None
        self.updates = 0
        self._listeners: list[Listener] = []
        self.answered = False  # the agent answered (with a set or a withdrawal)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
        if self.answered:
            listener(self.current)

    def _apply(self, item: CredentialSet | Withdrawn | DevidError | OSError) -> None:
        if isinstance(item, CredentialSet):
            self.current, self.withdrawn, self.error = item, None, None
            self.updates += 1
            log.info("gateway credentials: serial %s, valid until %s", item.serial,
                     item.not_after.isoformat())
        elif isinstance(item, Withdrawn):
            self.current, self.withdrawn = None, item.reason
            log.warning("gateway credentials withdrawn by the agent: %s", item.reason)
        else:
            text = item.message if isinstance(item, DevidError) else str(item)
            if text != self.error:
                log.warning("gateway credentials: the identity API watch ended: %s", text)
            self.error = text
            return  # the last set stays valid until it expires or is withdrawn
        self.answered = True
        for listener in self._listeners:
            listener(self.current)

    def _watch(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        def hand_over(item: CredentialSet | Withdrawn | DevidError | OSError) -> bool:
            if stop.is_set():
                return False
            try:
                loop.call_soon_threadsafe(self._apply, item)
            except RuntimeError:  # the loop closed while we were blocked in a read
                return False
            return True

        while not stop.is_set():
            try:
                for item in self._client.watch():
                    if not hand_over(item):
                        return
            except (DevidError, OSError) as e:
                if not hand_over(e):
                    return
            stop.wait(self._retry)

    async def run(self, stop: asyncio.Event) -> None:
        halt = threading.Event()
        # A daemon thread: blocked in a read, it must not hold up the broker's exit.
        thread = threading.Thread(target=self._watch, args=(asyncio.get_running_loop(), halt),
                                  name="identity-watch", daemon=True)
        thread.start()
        await stop.wait()
        halt.set()

    def status_section(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"updates": self.updates, "withdrawn": self.withdrawn,
                               "error": self.error}
        if self.current is not None:
            doc.update(serial=self.current.serial,
                       not_after=self.current.not_after.isoformat())
        return doc
