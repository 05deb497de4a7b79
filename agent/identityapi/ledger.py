"""Who got what, and who was refused: per-consumer state and its audit trail.

Both halves of the identity API write here: requests (api.py) and pushed
updates (distribution.py). Every delivery and refusal is audited with the
consumer's name; refusals are also journaled, at most a few per uid and
minute so that a local flood cannot fill the audit log.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent import events
from agent.audit import AuditLog
from agent.config import ConsumerSection
from agent.control.peer import PeerCredentials
from agent.identityapi.consumers import Refusal
from agent.ratelimit import KeyedBuckets, TokenBucket

log = logging.getLogger(__name__)

_REFUSAL_AUDIT_BURST, _REFUSAL_AUDIT_INTERVAL = 10, 6.0  # per uid: 10 a minute


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
class ConsumerState:
    bucket: TokenBucket  # `sign` rate limit
    last: Delivery | None = None
    watchers: int = 0
    sink_error: str | None = None
    refused: int = 0


class Ledger:
    def __init__(self, audit: AuditLog, monotonic: Callable[[], float]) -> None:
        self._audit, self._monotonic = audit, monotonic
        self.states: dict[str, ConsumerState] = {}
        self._refusal_audit = KeyedBuckets(_REFUSAL_AUDIT_BURST, _REFUSAL_AUDIT_INTERVAL,
                                           monotonic)

    def apply(self, consumers: Sequence[ConsumerSection]) -> None:
        """Follow the declared consumers: new ones get a state, reloaded limits apply
        without a fresh burst, removed ones are forgotten."""
        for consumer in consumers:
            state = self.states.get(consumer.name)
            if state is None:
                self.states[consumer.name] = ConsumerState(
                    TokenBucket(consumer.sign_burst, consumer.sign_interval, self._monotonic))
            else:
                state.bucket.reshape(consumer.sign_burst, consumer.sign_interval)
        for name in set(self.states) - {c.name for c in consumers}:
            del self.states[name]

    async def delivered(self, name: str, what: str, via: str, detail: str) -> None:
        state = self.states.get(name)
        if state is not None:
            state.last = Delivery(what, via, datetime.datetime.now(datetime.UTC), detail)
        await asyncio.to_thread(self._audit.append, f"consumer-{what}", consumer=name, via=via,
                                detail=detail)

    async def refused(self, peer: PeerCredentials, method: str, refusal: Refusal,
                      consumer: str | None = None) -> None:
        state = self.states.get(consumer) if consumer else None
        if state is not None:
            state.refused += 1
        if not self._refusal_audit.take(peer.uid):
            return  # this uid is flooding: it was audited and journaled already
        events.emit(log, "consumer-refused", "identity API: refused %s: %s", method,
                    refusal.reason, uid=peer.uid, pid=peer.pid, reason=refusal.reason)
        await asyncio.to_thread(self._audit.append, "consumer-refused", uid=peer.uid,
                                gid=peer.gid, pid=peer.pid, method=method,
                                reason=refusal.reason)
