"""The daemon's enrollment task: enroll once when not enrolled, retry with backoff, remember.

It waits for the TPM, checks any stored certificate against the TPM's identity
key (so state copied from another device is noticed), and otherwise runs the
two-round-trip enrollment until it succeeds or the agent stops. Failed
attempts back off exponentially with jitter, never sooner than a registrar's
Retry-After. The result is stored atomically; a restart does not re-enroll.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509

from agent import events, logsetup
from agent.aio import first_of
from agent.audit import AuditLog
from agent.backoff import Backoff
from agent.clock import Clock, utcnow
from agent.config import EnrollmentSection
from agent.diagnostics.enrollment import (
    DECOMMISSIONED,
    ENROLLED,
    FAILED,
    NOT_CONFIGURED,
    PENDING,
    REVOKED,
    EnrollmentFacts,
)
from agent.enroll.client import enroll
from agent.enroll.http import RegistrarClient, ThreadedRegistrar
from agent.enroll.messages import Platform
from agent.enroll.state import (
    ACTIVE,
    Decommissioned,
    DecommissionStore,
    EnrollmentStore,
    StoredEnrollment,
)
from agent.enroll.tpmport import CustodyTpm, Runner
from agent.errors import ConfigError, DevidError, Problem, StateError, TpmUnreachable
from agent.pki.certinfo import spki_der, summarize
from agent.tpm.custody import TpmCustody

log = logging.getLogger(__name__)

def load_pinned_ca(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"[enrollment] ca: {path}: cannot read: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"[enrollment] ca: {path}: no PEM certificate in file") from None


class EnrollmentManager:
    def __init__(self, section: EnrollmentSection | None, state_dir: Path, audit: AuditLog,
                 clock: Clock = utcnow, skew: float = 0.0,
                 platform: Callable[[], Platform | None] = lambda: None) -> None:
        self.section = section
        # What the gateway says about itself, read at each attempt (a reload may change it).
        self.platform = platform
        self.store = EnrollmentStore(state_dir)
        self.decommission_store = DecommissionStore(state_dir)
        self.audit = audit
        self.skew = skew
        self.clock = clock
        self.pinned = load_pinned_ca(section.ca) if section else []
        self.backoff = Backoff(initial=section.retry_initial if section else 5.0,
                               cap=section.retry_max if section else 600.0)
        self.stored: StoredEnrollment | None = None
        self.decommissioned: Decommissioned | None = None
        self.state = NOT_CONFIGURED if section is None else PENDING
        self.attempts = 0
        self.last_error: DevidError | None = None
        self.next_attempt: datetime.datetime | None = None
        self.key_matches: bool | None = None
        self.enrolled = asyncio.Event()
        self._retry_now = asyncio.Event()

    def reconfigure(self, section: EnrollmentSection | None,
                    pinned: list[x509.Certificate]) -> None:
        """A reload changed [enrollment]: the next attempt, made at once, uses it."""
        self.section, self.pinned = section, pinned
        self.backoff = Backoff(initial=section.retry_initial if section else 5.0,
                               cap=section.retry_max if section else 600.0)
        if section is not None and self.state == NOT_CONFIGURED:
            self.state = PENDING
        self._retry_now.set()

    def load(self) -> None:
        """Read the stored enrollment; a damaged file is set aside, not trusted."""
        self.decommissioned = self.decommission_store.load()
        if self.decommissioned is not None:
            self.state = DECOMMISSIONED
            self.store.remove()  # finishes a decommissioning interrupted by a crash
            return
        try:
            self.stored = self.store.load()
        except StateError as e:
            damaged = self.store.path.with_suffix(".json.damaged")
            events.emit(log, "state-damaged", "%s; moved to %s, will enroll again", e.message,
                        damaged, path=self.store.path)
            self.store.path.replace(damaged)
            self.stored = None
        if self.stored is not None:
            self.state = ENROLLED if self.stored.lifecycle == ACTIVE else REVOKED
            logsetup.set_device_id(self.stored.device_id)

    # --- the task ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event,
                  custody_ready: Callable[[], Awaitable[TpmCustody | None]],
                  run_tpm: Runner, tpm_lost: Callable[[], None]) -> None:
        while not stop.is_set() and self.decommissioned is None:
            custody = await custody_ready()
            if custody is None:
                return
            try:
                if await self._stored_is_ours(custody, run_tpm):
                    self.enrolled.set()
                    return
                if self.section is None:
                    return
                await self._attempt(custody, run_tpm)
                self.enrolled.set()
                return
            except DevidError as e:
                if isinstance(e, TpmUnreachable):
                    tpm_lost()
                delay = self._failed(e)
                self._retry_now.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(first_of(stop, self._retry_now), delay)

    async def _stored_is_ours(self, custody: TpmCustody, run_tpm: Runner) -> bool:
        if self.stored is None:
            return False
        identity = await run_tpm(custody.identity_key)
        ours = spki_der(self.stored.certificate) == identity.public_key_der  # type: ignore[attr-defined]
        self.key_matches = ours
        if ours:
            log.info("enrolled as %s (certificate serial %s, valid until %s)",
                     self.stored.device_id, self.stored.serial,
                     self.stored.certificate.not_valid_after_utc.isoformat())
            return True
        events.emit(log, "identity-mismatch", "the stored certificate is not for this TPM's "
                    "identity key (state copied from another device?); enrolling again",
                    device_id=self.stored.device_id)
        logsetup.set_device_id(None)
        self.stored, self.state = None, PENDING
        return False

    async def _attempt(self, custody: TpmCustody, run_tpm: Runner) -> None:
        assert self.section is not None
        log.info("enrolling with %s (attempt %d)", self.section.url, self.attempts + 1)
        token = self.section.read_token()
        client = RegistrarClient(self.section.url, self.section.ca, self.section.timeout)
        try:
            result = await enroll(CustodyTpm(custody, run_tpm), ThreadedRegistrar(client),
                                  token, self.pinned, self.skew,
                                  lambda: self.clock() + datetime.timedelta(
                                      seconds=client.clock_offset or 0.0),
                                  await asyncio.to_thread(self.platform))
        finally:
            client.close()
        stored = StoredEnrollment.from_result(result, self.section.url, self.clock(),
                                              client.clock_offset)
        await asyncio.to_thread(self.store.save, stored)
        self.stored, self.state, self.key_matches = stored, ENROLLED, True
        self.last_error, self.next_attempt = None, None
        self.backoff.reset()
        logsetup.set_device_id(result.device_id)
        events.emit(log, "enrolled", "enrolled as %s: certificate serial %s valid until %s",
                    result.device_id, result.serial, result.not_after.isoformat(),
                    device_id=result.device_id, identity_serial=result.serial,
                    not_after=result.not_after.isoformat(timespec="seconds"),
                    registrar=self.section.url)
        try:
            self.audit.append("enrolled", device_id=result.device_id, registrar=self.section.url,
                              identity_serial=result.serial,
                              not_after=result.not_after.isoformat(timespec="seconds"))
        except OSError as e:
            log.error("cannot write the audit log %s: %s", self.audit.path, e.strerror)

    def _failed(self, e: DevidError) -> float:
        self.attempts += 1
        self.last_error = e
        self.state = FAILED
        delay = self.backoff.next_delay()
        if isinstance(e, Problem) and e.retry_after is not None:
            delay = max(delay, e.retry_after)
        self.next_attempt = self.clock() + datetime.timedelta(seconds=delay)
        events.emit(log, "enrollment-failed", "enrollment attempt %d failed: %s; retrying in "
                    "%.0fs", self.attempts, e, delay, problem=e.code, attempts=self.attempts)
        return delay

    # --- status -------------------------------------------------------------------

    def facts(self) -> EnrollmentFacts:
        stored = self.stored
        if self.decommissioned is not None:
            return EnrollmentFacts(state=DECOMMISSIONED, device_id=self.decommissioned.device_id,
                                   decommissioned_at=self.decommissioned.at)
        state = self.state
        if stored is not None and stored.lifecycle != ACTIVE:
            state = REVOKED
        return EnrollmentFacts(
            state=state,
            registrar=self.section.url if self.section else (stored.registrar if stored
                                                               else None),
            device_id=stored.device_id if stored else None,
            last_error=self.last_error.to_dict() if self.last_error else None,
            attempts=self.attempts,
            next_attempt=self.next_attempt if self.state == FAILED else None,
            certificate=summarize(stored.certificate, self.clock()) if stored else None,
            key_matches=self.key_matches,
            revoked_reason=stored.revoked_reason if stored else None,
        )
