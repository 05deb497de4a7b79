"""`devidctl decommission`: retire this gateway, on the registrar and locally.

Order matters for crash safety: the registrar is told first (signed by the
identity key, which is still here), then the decommissioned marker is
written, then the identity record and the key blobs are deleted. A crash
after the marker is finished at the next start (EnrollmentManager.load).
Without `force`, a registrar that cannot be told means nothing is wiped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agent import events
from agent.daemon.enrollment import EnrollmentManager
from agent.daemon.rotation import RETIRED_PROBLEMS, RotationManager
from agent.diagnostics.enrollment import DECOMMISSIONED
from agent.enroll.http import RegistrarClient, ThreadedRegistrar
from agent.enroll.state import Decommissioned
from agent.enroll.tpmport import CustodyTpm, Runner
from agent.errors import DevidError, Problem, StateError
from agent.rotation.client import decommission
from agent.tpm.custody import TpmCustody

log = logging.getLogger(__name__)


async def _tell_registrar(rotation: RotationManager, custody: TpmCustody, run_tpm: Runner,
                          device_id: str) -> list[str]:
    section = rotation.registrar
    if section is None:
        raise StateError("no registrar configured ([enrollment] url)")
    client = RegistrarClient(section.url, section.ca, section.timeout)
    try:
        done = await decommission(CustodyTpm(custody, run_tpm), ThreadedRegistrar(client),
                                  device_id)
    finally:
        client.close()
    return list(done.revoked_serials)


async def decommission_gateway(enrollment: EnrollmentManager, rotation: RotationManager,
                               custody: TpmCustody, run_tpm: Runner,
                               force: bool) -> dict[str, Any]:
    stored = enrollment.stored
    if stored is None:
        raise StateError("this gateway is not enrolled: there is nothing to decommission")
    async with rotation.lock:
        notified, note, revoked = False, None, []
        try:
            revoked = await _tell_registrar(rotation, custody, run_tpm, stored.device_id)
            notified = True
        except Problem as p:
            if p.code not in RETIRED_PROBLEMS and not force:
                raise
            notified = p.code in RETIRED_PROBLEMS  # it already knows: revoked or retired
            note = f"{p.code}: {p.message}"
        except DevidError as e:
            if not force:
                raise DevidError(f"the registrar could not be told: {e.message}; nothing was "
                                 "wiped", "retry when it is reachable, or add --force to "
                                          "wipe this gateway anyway") from None
            note = e.message
        rotation.holder.withdraw("the gateway was decommissioned")
        marker = Decommissioned(stored.device_id, enrollment.clock(), notified)
        await asyncio.to_thread(enrollment.decommission_store.save, marker)
        await asyncio.to_thread(enrollment.store.remove)
        await run_tpm(custody.forget_keys)
        enrollment.stored, enrollment.decommissioned = None, marker
        enrollment.state = DECOMMISSIONED
        rotation.cancel_waiters("the gateway was decommissioned")
    enrollment.audit.append("decommissioned", device_id=stored.device_id,
                            registrar_notified=notified, note=note, revoked=revoked,
                            keys="destroyed", tls_key="destroyed")
    events.emit(log, "decommissioned", "decommissioned %s: registrar %s; identity record, "
                "sealed TLS key, AK and identity key destroyed", stored.device_id,
                "notified" if notified else f"NOT notified ({note})",
                device_id=stored.device_id, registrar_notified=notified)
    return {"device_id": stored.device_id, "registrar_notified": notified, "note": note,
            "revoked_serials": revoked,
            "destroyed": ["identity record", "sealed TLS key", "identity key", "AK"]}
