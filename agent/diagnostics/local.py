"""Gathering the check facts from outside the daemon (`devidctl check` while it is down).

The daemon holds the TPM while it runs; when it does not, devidctl opens the TPM
read-only, reads the state directory and probes the registrar itself, then hands
the facts to the same suite the daemon uses (suite.py).
"""

from __future__ import annotations

import datetime
import os

from agent.access import access_denied, explain
from agent.config import AgentConfig
from agent.diagnostics.enrollment import (
    DECOMMISSIONED,
    ENROLLED,
    NOT_CONFIGURED,
    PENDING,
    REVOKED,
    UNKNOWN,
    EnrollmentFacts,
    probe_registrar,
)
from agent.diagnostics.facts import (
    TpmFacts,
    collect_clock_facts,
    collect_path_facts,
    collect_tpm_facts,
)
from agent.diagnostics.rotation import NOT_RUNNING, RotationFacts
from agent.diagnostics.suite import GatewayFacts
from agent.enroll.state import ACTIVE, DecommissionStore, EnrollmentStore
from agent.errors import DevidError
from agent.pki.certinfo import summarize
from agent.pki.ekchain import load_trust_store
from agent.tpm.custody import TpmCustody


def local_tpm_facts(config: AgentConfig, command: str) -> TpmFacts:
    try:
        trust = load_trust_store(config.trust.ek_roots)
        with TpmCustody.open(config.tpm.tcti, config.paths.state_dir, readonly=True,
                             srk_handle=config.tpm.srk_handle) as custody:
            return collect_tpm_facts(custody, trust, occupancy=True)
    except DevidError as e:
        return TpmFacts(tcti=config.tpm.tcti, error=e)
    except PermissionError as e:  # the agent's state (key blobs) is not ours to read
        return TpmFacts(tcti=config.tpm.tcti, error=explain(e, "the agent's TPM state",
                                                             command))


def stored_facts(config: AgentConfig, now: datetime.datetime, command: str
                 ) -> tuple[EnrollmentFacts, RotationFacts]:
    """What the state directory says about enrollment and rotation."""
    section, state_dir = config.enrollment, config.paths.state_dir
    url = section.url if section else None
    nothing = RotationFacts(NOT_RUNNING, enrolled=False)
    if state_dir.is_dir() and not os.access(state_dir, os.R_OK | os.X_OK):
        # Name the directory that stops us, not a file inside it that may not even exist.
        denied = access_denied(state_dir, "[paths] state_dir", command)
        return (EnrollmentFacts(UNKNOWN, url, last_error=denied.to_dict()),
                RotationFacts(UNKNOWN, enrolled=False))
    try:
        marker = DecommissionStore(state_dir).load()
        stored = EnrollmentStore(state_dir).load() if marker is None else None
    except DevidError as e:
        return EnrollmentFacts(UNKNOWN, url, last_error=e.to_dict()), nothing
    if marker is not None:
        return EnrollmentFacts(DECOMMISSIONED, device_id=marker.device_id,
                               decommissioned_at=marker.at), nothing
    if stored is None:
        return EnrollmentFacts(NOT_CONFIGURED if section is None else PENDING, url,
                               local=True), nothing
    active = stored.lifecycle == ACTIVE
    enrollment = EnrollmentFacts(ENROLLED if active else REVOKED, stored.registrar,
                                 stored.device_id, certificate=summarize(stored.certificate, now),
                                 revoked_reason=stored.revoked_reason, local=True)
    tls = stored.tls
    rotation = RotationFacts(NOT_RUNNING if active else "revoked", enrolled=True,
                             generation=stored.generation,
                             tls_certificate=summarize(tls.certificate, now) if tls else None)
    return enrollment, rotation


def local_gateway_facts(config: AgentConfig, command: str, daemon_down: str) -> GatewayFacts:
    probe = probe_registrar(config.enrollment)
    offset = probe.clock_offset
    # Certificates are dated by the registrar: judge them by its clock when it vouched for it.
    now = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset or 0.0)
    enrollment, rotation = stored_facts(config, now, command)
    clock = collect_clock_facts(offset, probe.unverified_offset)
    return GatewayFacts(
        tpm=local_tpm_facts(config, command),
        state_dir=collect_path_facts(config.paths.state_dir), clock=clock, registrar=probe,
        enrollment=enrollment, rotation=rotation, now=now, skew=config.rotation.clock_skew,
        roots_configured=bool(config.trust.ek_roots), expected_uid=None,
        daemon_down=daemon_down)
