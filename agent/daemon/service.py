"""The agent's long-running service: owns the TPM connection, answers the control socket.

The TPM connection is (re)established by a loop with capped backoff: a TPM
that is missing at boot or disappears later is reported (status FAIL with the
reason and a hint) and retried, never turned into a crash loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from agent import __version__, events, logsetup
from agent.aio import first_of
from agent.audit import AGENT_AUDIT_LOG, AuditLog
from agent.backoff import Backoff
from agent.config import AgentConfig
from agent.control.protocol import RENEW_WAIT_MAX
from agent.daemon.decommission import decommission_gateway
from agent.daemon.enrollment import EnrollmentManager, load_pinned_ca
from agent.daemon.reload import ReloadPlan, plan_reload
from agent.daemon.rotation import RotationManager
from agent.daemon.subsystem import Subsystem
from agent.daemon.tpmworker import TpmWorker
from agent.diagnostics.certificates import certificates_document
from agent.diagnostics.enrollment import (
    DECOMMISSIONED,
    FAILED,
    NOT_CONFIGURED,
    probe_registrar,
)
from agent.diagnostics.facts import (
    EndorsementResult,
    TpmFacts,
    collect_clock_facts,
    collect_path_facts,
    collect_tpm_facts,
    try_endorsement_facts,
)
from agent.diagnostics.rotation import RotationFacts
from agent.diagnostics.service import ServiceFacts
from agent.diagnostics.status import build_status, headline
from agent.diagnostics.suite import GatewayFacts, check_document
from agent.errors import ControlError, DevidError, StateError, TpmUnreachable
from agent.pki.certinfo import summarize
from agent.pki.ekchain import TrustStore, load_trust_store
from agent.rotation.credentials import CredentialHolder
from agent.tpm.custody import TpmCustody

log = logging.getLogger(__name__)
T = TypeVar("T")


class AgentService:
    def __init__(self, config: AgentConfig, trust: TrustStore,
                 backoff: Backoff | None = None) -> None:
        self.config = config
        self.trust = trust
        self.worker = TpmWorker()
        self.started = time.monotonic()
        self._log_file = logsetup.stderr_log_file()
        self._backoff = backoff or Backoff(initial=1.0, cap=60.0)
        self._custody: TpmCustody | None = None
        self._endorsement: EndorsementResult | None = None
        self._last_error: DevidError | None = None
        self._lost = asyncio.Event()
        self._tcti_changed = asyncio.Event()  # a reload: retry at once, new TCTI
        self._ready = asyncio.Event()
        self._reconfigured = asyncio.Event()
        self._facts: TpmFacts | None = None  # last collected, for the headline
        self.reload_error: DevidError | None = None
        self.reloaded_at: datetime.datetime | None = None
        state_dir = config.paths.state_dir
        self.audit = AuditLog(state_dir / AGENT_AUDIT_LOG)
        # Credentials are dated by the registrar: judged by its clock, not a wrong local one.
        self.holder = CredentialHolder(clock=lambda: self.rotation.registrar_now())
        self.enrollment = EnrollmentManager(config.enrollment, state_dir, self.audit,
                                            skew=config.rotation.clock_skew,
                                            platform=lambda: self.config.device.platform())
        self.rotation = RotationManager(config.rotation, config.enrollment, self.enrollment,
                                        self.holder, self.audit)
        # Parts wired in by the daemon (agent/daemon/subsystem.py): reloaded with the
        # rest, each with its own section in the status document.
        self.subsystems: list[Subsystem] = []

    # --- TPM connection -------------------------------------------------------

    async def maintain_tpm(self, stop: asyncio.Event) -> None:
        """Connect, and reconnect whenever the TPM is lost, until `stop` is set."""
        while not stop.is_set():
            try:
                await self._connect()
            except DevidError as e:
                if self._last_error is None or e.message != self._last_error.message:
                    events.emit(log, "tpm-unreachable", "TPM not usable: %s", e,
                                tcti=self.config.tpm.tcti, problem=e.code)
                self._last_error = e
                delay = self._backoff.next_delay()
                log.info("retrying the TPM in %.1fs (attempt %d)", delay,
                         self._backoff.attempts)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(first_of(stop, self._tcti_changed), delay)
                if self._tcti_changed.is_set():  # not the old TCTI's backoff, nor its error
                    self._tcti_changed.clear()
                    self._backoff.reset()
                    self._last_error = None
                continue
            self._backoff.reset()
            self._last_error = None
            self._tcti_changed.clear()
            await first_of(stop, self._lost)
            if self._lost.is_set() and not stop.is_set():
                events.emit(log, "tpm-lost", "TPM connection lost; reconnecting",
                            tcti=self.config.tpm.tcti)
                await self._disconnect()

    async def _connect(self) -> None:
        tcti, state_dir = self.config.tpm.tcti, self.config.paths.state_dir
        custody = await self.worker.call(TpmCustody.open, tcti, state_dir, False,
                                         self.enrollment.decommissioned is None,
                                         self.config.tpm.srk_handle)
        self._endorsement = await self.worker.call(try_endorsement_facts, custody, self.trust)
        facts = await self.worker.call(collect_tpm_facts, custody, self.trust,
                                       self._endorsement)
        if facts.info is None:
            await self.worker.call(custody.close)
            raise facts.error or TpmUnreachable("the TPM did not report its properties")
        info = facts.info
        self._facts, self._custody = facts, custody
        self._lost.clear()
        self._ready.set()
        events.emit(log, "tpm-ready", "TPM ready via %s: %s %s, firmware %s", tcti,
                    info.manufacturer, info.vendor_string, info.firmware_version, tcti=tcti)
        if isinstance(self._endorsement, DevidError):
            events.emit(log, "ek-untrusted", "EK certificate problem: %s", self._endorsement,
                        problem=self._endorsement.code)
        else:
            for ek in self._endorsement:
                log.info("%s certificate: %s", ek.kind, ek.verdict.reason)
            if self.trust.anchors and not any(ek.verdict.verified for ek in self._endorsement):
                events.emit(log, "ek-untrusted", "no EK certificate verifies against the "
                            "trusted vendor roots: %s",
                            "; ".join(f"{ek.kind}: {ek.verdict.reason}"
                                      for ek in self._endorsement) or "none found",
                            problem="ek-untrusted")

    async def _disconnect(self) -> None:
        self._ready.clear()
        self._facts = None
        custody, self._custody = self._custody, None
        if custody is not None:
            await self.worker.call(custody.close)

    async def with_custody(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(custody, *args)` on the TPM worker, for subsystems; TpmUnreachable at once
        when there is no TPM connection (a request is not held until there is one)."""
        custody = self._custody
        if custody is None:
            error = self._last_error or TpmUnreachable("not connected to the TPM yet")
            raise TpmUnreachable(f"the TPM is not available: {error.message}", error.hint)
        try:
            return await self.worker.call(fn, custody, *args)
        except TpmUnreachable:
            self._lost.set()
            raise

    async def custody_ready(self, stop: asyncio.Event) -> TpmCustody | None:
        """The TPM connection once there is one; None if the agent stops first."""
        while not stop.is_set():
            if self._custody is not None and self._ready.is_set():
                return self._custody
            await first_of(stop, self._ready)
        return None

    async def maintain_identity(self, stop: asyncio.Event) -> None:
        """Enroll if needed, then rotate until the agent stops.

        Without a registrar (not configured) both tasks return; a reload that
        configures one starts them again.
        """
        ready = lambda: self.custody_ready(stop)  # noqa: E731
        while not stop.is_set():
            self._reconfigured.clear()
            if not self.enrollment.enrolled.is_set():
                await self.enrollment.run(stop, ready, self.worker.call, self._lost.set)
            if self.enrollment.enrolled.is_set():
                await self.rotation.run(stop, ready, self.worker.call, self._lost.set)
            await first_of(stop, self._reconfigured)
        self.rotation.cancel_waiters("the agent is stopping")

    # --- what the supervisor (systemd) sees ----------------------------------------

    def is_ready(self) -> bool:
        """TPM reachable and the identity loaded: enrolled, or pending with a reason."""
        if self._custody is None:
            return False
        return self.enrollment.enrolled.is_set() or self.enrollment.state in (
            FAILED, NOT_CONFIGURED, DECOMMISSIONED)

    def headline(self) -> str:
        """The one line `devidctl status` leads with, from what is already known."""
        if self._custody is None and self._last_error is None:
            return f"starting: connecting to the TPM via {self.config.tpm.tcti}"
        return headline(self._status_document(self._cached_facts()))

    def hung(self) -> str | None:
        busy = self.worker.busy()
        limit = self.config.tpm.hang_timeout
        if busy is None or busy[1] < limit:
            return None
        return f"the TPM command {busy[0]} has not returned for {busy[1]:.0f}s (limit {limit:.0f}s)"

    # --- SIGHUP ----------------------------------------------------------------------

    async def reconfigure(self, loaded: AgentConfig) -> ReloadPlan:
        """Apply a reloaded configuration; a ConfigError leaves everything as it was."""
        plan = plan_reload(self.config, loaded)
        new = plan.config
        # Everything that can fail is read before anything changes.
        trust = load_trust_store(new.trust.ek_roots) if "[trust]" in plan.applied \
            else self.trust
        enrollment_changed = "[enrollment]" in plan.applied
        pinned = load_pinned_ca(new.enrollment.ca) \
            if enrollment_changed and new.enrollment is not None else []
        for subsystem in self.subsystems:
            subsystem.check(new)
        self.config = new
        logsetup.set_level(new.log.level)
        if "[trust]" in plan.applied:
            self.trust = trust
            custody = self._custody
            if custody is not None:
                self._endorsement = await self.worker.call(try_endorsement_facts, custody, trust)
                self._facts = await self.worker.call(collect_tpm_facts, custody, trust,
                                                     self._endorsement)
        if enrollment_changed:
            self.enrollment.reconfigure(new.enrollment, pinned)
            self.rotation.registrar = new.enrollment
        if "[rotation]" in plan.applied:
            self.enrollment.skew = new.rotation.clock_skew
            self.rotation.reconfigure(new.rotation)
        if "[tpm]" in plan.applied:
            self._lost.set()  # reconnect through the new TCTI
            self._tcti_changed.set()  # at once, if waiting to retry the old one
        for subsystem in self.subsystems:
            subsystem.apply(new)
        self._reconfigured.set()
        self.reload_error, self.reloaded_at = None, datetime.datetime.now(datetime.UTC)
        return plan

    async def close(self) -> None:
        await self._disconnect()
        self.worker.shutdown()

    def _cached_facts(self) -> TpmFacts:
        if self._custody is None or self._facts is None:
            err = self._last_error or TpmUnreachable("not connected to the TPM yet")
            return TpmFacts(tcti=self.config.tpm.tcti, error=err)
        self._facts.keys_destroyed = self.enrollment.decommissioned is not None
        return self._facts

    async def _tpm_facts(self, occupancy: bool = False, prove_keys: bool = False) -> TpmFacts:
        """Facts from the TPM now. Without `prove_keys` (status), the identity key's facts
        are those proven at connection: status costs one TPM command, not four."""
        custody = self._custody
        if custody is None:
            return self._cached_facts()
        known = None if prove_keys or self._facts is None else self._facts.identity
        facts = await self.worker.call(collect_tpm_facts, custody, self.trust,
                                       self._endorsement, occupancy, known)
        facts.keys_destroyed = self.enrollment.decommissioned is not None
        if isinstance(facts.error, TpmUnreachable):
            self._last_error = facts.error
            self._lost.set()
        else:
            self._facts = facts
        return facts

    # --- control socket handlers -----------------------------------------------

    def _agent_section(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "config": str(self.config.source) if self.config.source else None,
            "log_file": self._log_file,
        }

    def rotation_facts(self) -> RotationFacts:
        stored, rotation = self.enrollment.stored, self.rotation
        now = rotation.registrar_now()
        tls = stored.tls if stored else None
        return RotationFacts(
            state=rotation.state, enrolled=stored is not None, renew_at=rotation.renew_at(),
            next_attempt=rotation.next_attempt, failures=rotation.failures,
            last=rotation.last.to_dict() if rotation.last else None,
            generation=stored.generation if stored else 0,
            tls_certificate=summarize(tls.certificate, now) if tls else None,
            presented=self.holder.current(now) is not None,
            clock_offset=rotation.clock_offset,
            restore_error=rotation.restore_error.to_dict() if rotation.restore_error else None,
            held_until=rotation.held_until, hold_reason=rotation.hold_reason(),
            renewal_floor=rotation.renewal_floor(), step=rotation.step)

    def _status_document(self, facts: TpmFacts) -> dict[str, Any]:
        doc = build_status(facts, self._agent_section(), bool(self.config.trust.ek_roots),
                           self.enrollment.facts(), now=self.rotation.registrar_now(),
                           rotation=self.rotation_facts(),
                           skew=self.config.rotation.clock_skew, service=self.service_facts(),
                           clock=collect_clock_facts(remembered=self.rotation.clock_offset))
        for subsystem in self.subsystems:
            doc[subsystem.name] = subsystem.status_section()
        return doc

    def service_facts(self) -> ServiceFacts:
        return ServiceFacts(reload_error=self.reload_error, reloaded_at=self.reloaded_at)

    async def status(self, _params: dict[str, Any]) -> dict[str, Any]:
        return self._status_document(await self._tpm_facts())

    async def check(self, _params: dict[str, Any]) -> dict[str, Any]:
        facts = await self._tpm_facts(occupancy=True, prove_keys=True)
        probe = await asyncio.to_thread(probe_registrar, self.config.enrollment)
        self.rotation.observe_offset(probe.clock_offset)  # authenticated: plans renewals too
        clock = collect_clock_facts(probe.clock_offset, probe.unverified_offset,
                                    self.rotation.clock_offset)
        return check_document(GatewayFacts(
            tpm=facts, state_dir=collect_path_facts(self.config.paths.state_dir), clock=clock,
            registrar=probe, enrollment=self.enrollment.facts(),
            rotation=self.rotation_facts(), now=self.rotation.registrar_now(),
            skew=self.config.rotation.clock_skew,
            roots_configured=bool(self.config.trust.ek_roots), expected_uid=os.geteuid(),
            agent=self._agent_section(), service=self.service_facts()))

    async def renew(self, params: dict[str, Any]) -> dict[str, Any]:
        """Renew now; with `wait`, report the outcome of that attempt."""
        if self.enrollment.stored is None or not self.enrollment.enrolled.is_set():
            raise StateError("not enrolled yet: there is nothing to renew",
                             "see `devidctl status` for the enrollment state")
        if self.rotation.state in ("revoked", "not_configured", "stopped"):
            raise StateError(f"rotation is {self.rotation.state}: not renewing",
                             "see `devidctl status`")
        timeout = params.get("timeout", RENEW_WAIT_MAX)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or \
                not 0 < timeout <= RENEW_WAIT_MAX:
            raise ControlError(f"timeout: expected seconds between 1 and {RENEW_WAIT_MAX:.0f}, "
                               f"got {timeout!r}")
        if self._custody is None:  # say so now, not after the wait: a renewal needs the TPM
            error = self._last_error or TpmUnreachable("not connected to the TPM")
            raise TpmUnreachable(f"cannot renew: {error.message}", error.hint)
        outcome = self.rotation.kick()
        if not params.get("wait"):
            return {"requested": True}
        try:
            result = await asyncio.wait_for(asyncio.shield(outcome), timeout)
        except TimeoutError:
            raise StateError(f"no renewal outcome within {timeout:g}s (still trying)",
                             "the TPM or registrar may be slow; see `devidctl status`") from None
        return {"requested": True, "outcome": result.to_dict()}

    async def decommission(self, params: dict[str, Any]) -> dict[str, Any]:
        custody = self._custody
        if custody is None:
            raise TpmUnreachable("the TPM is not connected; the identity key is needed to "
                                 "sign the decommissioning request")
        return await decommission_gateway(self.enrollment, self.rotation, custody,
                                          self.worker.call, bool(params.get("force")))

    async def certificates(self, _params: dict[str, Any]) -> dict[str, Any]:
        return certificates_document(self.enrollment.stored, self.rotation.registrar_now())

    async def audit_log(self, params: dict[str, Any]) -> dict[str, Any]:
        limit = params.get("limit")
        return await asyncio.to_thread(self.audit.report,
                                       limit if isinstance(limit, int) else None)

