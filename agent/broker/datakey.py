"""The broker's data key: a 32-byte secret the agent keeps sealed to the TPM.

Fetched once at start from the identity API (grant `secrets`); the sensor
registry is sealed under it, and the TPM is never on the per-message path.
Until the agent answers, the broker waits and says why; a refusal (not
declared, not granted, PCRs changed) is not something waiting fixes, so it
stops the start with the agent's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from agent.consumer import IdentityClient
from agent.errors import ControlError, DaemonNotRunning, DevidError, TpmUnreachable
from agent.secret import SecretBytes

log = logging.getLogger(__name__)


def _passing(error: DevidError) -> bool:
    """Will waiting fix it? The agent not up yet, busy, or its TPM not connected yet;
    not a refusal (PermissionDenied is a ControlError too, hence the exact type)."""
    return isinstance(error, DaemonNotRunning | TpmUnreachable) or type(error) is ControlError


async def fetch_data_key(client: IdentityClient, name: str, retry: float,
                         stop: asyncio.Event, waiting: Callable[[str], None]
                         ) -> SecretBytes | None:
    """The data key; None if `stop` is set first. A refusal propagates."""
    while not stop.is_set():
        try:
            return await asyncio.to_thread(client.secret, name)
        except DevidError as e:
            if not _passing(e):
                raise
            waiting(f"waiting for devid-agent's identity API: {e.message}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), retry)
    return None
