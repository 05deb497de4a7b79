"""The daemon's rotation task: keep short-lived certificates fresh, forever.

After enrollment it restores the TLS key (unsealing it from the TPM) and
then loops: wait until the renewal point (agent.rotation.schedule), renew
(agent.rotation.client), save the identity record atomically, swap the
credentials in memory, write an audit record, run the reload hooks.

- A failed renewal keeps the current credentials in use and retries with
  capped backoff; the status shows the error and the next attempt.
- A revoked or decommissioned device (the registrar says so at renewal)
  stops presenting its identity, destroys the sealed TLS key and stops.
- Everything is planned in the registrar's time (agent.rotation.registrarclock):
  the local clock plus the offset measured from the registrar's Date header. A
  gateway whose clock is wrong renews once per renewal window, not in a loop
  (clock ahead) nor after expiry (clock behind). The offset is measured again
  (GET /v1/health) at start and after the local clock jumps; beyond
  [rotation] clock_skew the journal gets a clock-skew event.
- The wait is re-planned every few seconds, so a clock jump neither skips a
  renewal nor renews early, and is logged.
- Two automatic renewals are never closer than the renewal floor
  (schedule.renewal_floor); a renewal held back by it shows as "held" in status.
- `devidctl renew` kicks the loop (the floor does not apply); `--wait` gets the
  outcome of the attempt.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent import events, faults
from agent.audit import AuditLog
from agent.backoff import Backoff
from agent.clock import Clock, utcnow
from agent.config import EnrollmentSection, RotationSection
from agent.daemon.enrollment import EnrollmentManager
from agent.daemon.hooks import HookResult, run_hooks
from agent.enroll.http import RegistrarClient, ThreadedRegistrar
from agent.enroll.state import ACTIVE, StoredEnrollment, StoredTls
from agent.enroll.tpmport import CustodyTpm, Runner
from agent.errors import DevidError, Problem, StateError, TpmUnreachable
from agent.pki.certinfo import spki_der
from agent.pki.devicecert import validity_of
from agent.rotation import schedule
from agent.rotation.client import renew
from agent.rotation.credentials import CredentialHolder, TlsCredentials
from agent.rotation.registrarclock import RegistrarClock, beyond_skew, describe_offset
from agent.rotation.tlskey import key_from_secret
from agent.tpm.custody import TpmCustody

log = logging.getLogger(__name__)

RETIRED_PROBLEMS = ("device-revoked", "device-decommissioned")

# Rotation states, as status shows them.
WAITING = "waiting"  # for the TPM or enrollment
SCHEDULED = "scheduled"
RENEWING = "renewing"
RETRYING = "retrying"
HELD = "held"  # due by the plan, but the last renewal is more recent than the floor
REVOKED = "revoked"
NOT_CONFIGURED = "not_configured"
STOPPED = "stopped"

PROBE_RETRY = 60.0  # seconds between attempts to measure a stale offset
RETRY_AFTER_SPREAD = 0.2  # up to +20 % on the registrar's Retry-After, so a fleet spreads
OffsetProbe = Callable[[], Awaitable[float | None]]


@dataclass(frozen=True)
class RotationOutcome:
    time: datetime.datetime
    result: str  # renewed | failed | revoked
    error: dict[str, str] | None = None
    duration_ms: float | None = None
    tls_serial: str | None = None
    hooks: tuple[HookResult, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time.isoformat(timespec="seconds"), "result": self.result,
                "error": self.error, "duration_ms": self.duration_ms,
                "tls_serial": self.tls_serial, "hooks": [h.to_dict() for h in self.hooks]}


@dataclass
class _Kick:
    """`devidctl renew`: renew now; waiters get the outcome of that attempt."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: list[asyncio.Future[RotationOutcome]] = field(default_factory=list)


class RotationManager:
    def __init__(self, section: RotationSection, enrollment_section: EnrollmentSection | None,
                 enrollment: EnrollmentManager, holder: CredentialHolder, audit: AuditLog,
                 clock: Clock = utcnow,
                 monotonic: Callable[[], float] = time.monotonic,
                 probe_offset: OffsetProbe | None = None) -> None:
        self.section = section
        self.registrar = enrollment_section
        self.enrollment = enrollment
        self.holder = holder
        self.audit = audit
        self._clock = clock
        self._monotonic = monotonic
        self.backoff = Backoff(initial=section.retry_initial, cap=section.retry_max)
        self.state = WAITING
        self.step: str | None = None  # the current renewal's last step, while renewing
        self.last: RotationOutcome | None = None
        self.next_attempt: datetime.datetime | None = None  # after a failure
        self.failures = 0
        self.registrar_clock = RegistrarClock()
        self._probe_offset = probe_offset or self._probe_registrar_offset
        self._next_probe = 0.0  # monotonic time of the next offset measurement, when stale
        self._skewed = False  # the last measured offset was beyond clock_skew
        self._last_renewal: float | None = None  # monotonic time of the last renewal
        self.held_until: datetime.datetime | None = None
        self.restore_error: DevidError | None = None
        self._kick = _Kick()
        # Held while renewing; decommissioning takes it too, so the two never interleave.
        self.lock = asyncio.Lock()
        self._last_wall = clock()
        self._last_mono = monotonic()

    def reconfigure(self, section: RotationSection) -> None:
        """A reload changed [rotation]: the wait re-plans with it within one tick."""
        if (section.retry_initial, section.retry_max) != (self.section.retry_initial,
                                                          self.section.retry_max):
            self.backoff = Backoff(initial=section.retry_initial, cap=section.retry_max)
        self.section = section

    # --- the registrar's time ----------------------------------------------------

    @property
    def clock_offset(self) -> float | None:
        """The registrar's clock minus ours, seconds, as last measured."""
        return self.registrar_clock.offset

    def registrar_now(self) -> datetime.datetime:
        return self.registrar_clock.now(self._clock())

    def observe_offset(self, offset: float | None) -> None:
        """A registrar response's Date header was read; log when the skew state changes."""
        self.registrar_clock.observe(offset, self._clock())
        if offset is None:
            return
        skew = self.section.clock_skew
        skewed = beyond_skew(offset, skew)
        if skewed and not self._skewed:
            events.emit(log, "clock-skew", "%s (registrar minus local %+.0fs, tolerated %.0fs): "
                        "renewals are planned in the registrar's time; fix time "
                        "synchronisation", describe_offset(offset), offset, skew,
                        device_id=self._device_id(), offset_s=round(offset, 1))
            self._audit("clock-skew", offset_s=round(offset, 1), tolerated_s=skew)
        elif self._skewed and not skewed:
            events.emit(log, "clock-skew-resolved", "%s (within %.0fs) again",
                        describe_offset(offset), skew, device_id=self._device_id(),
                        offset_s=round(offset, 1))
        self._skewed = skewed

    async def _probe_registrar_offset(self) -> float | None:
        """Measure the offset with a GET /v1/health (no cryptography on either side)."""
        if self.registrar is None:
            return None
        client = RegistrarClient(self.registrar.url, self.registrar.ca,
                                 min(self.registrar.timeout, 10.0))
        try:
            await asyncio.to_thread(client.health)
        except DevidError as e:
            log.info("cannot measure the registrar's clock offset: %s", e)
        finally:
            client.close()
        return client.clock_offset

    async def _measure_if_stale(self) -> None:
        if not self.registrar_clock.stale or self._monotonic() < self._next_probe:
            return
        self._next_probe = self._monotonic() + PROBE_RETRY
        self.observe_offset(await self._probe_offset())

    def _resume_from(self, stored: StoredEnrollment) -> None:
        """After a start: the offset and the last renewal time as the record has them."""
        if self.registrar_clock.offset is None:
            self.registrar_clock.offset = stored.registrar_offset_s
        if self._last_renewal is None and stored.renewed_at is not None:
            elapsed = max(0.0, (self._clock() - stored.renewed_at).total_seconds())
            self._last_renewal = self._monotonic() - elapsed

    # --- what status needs ------------------------------------------------------

    def renew_at(self) -> datetime.datetime | None:
        """The planned renewal; None when there is nothing to plan (not enrolled, revoked)
        or no usable TLS credentials, which means: renew at once."""
        stored = self.enrollment.stored
        if stored is None or stored.lifecycle != ACTIVE:
            return None
        if stored.tls is None or self.holder.held is None:
            return None
        points = [schedule.renew_at(validity_of(c), format(c.serial_number, "x"),
                                    self.section.renew_fraction, self.section.jitter)
                  for c in (stored.certificate, stored.tls.certificate)]
        return min(points)

    def renewal_floor(self) -> float | None:
        """Seconds two automatic renewals must be apart, for the current TLS certificate."""
        stored = self.enrollment.stored
        if stored is None or stored.tls is None:
            return None
        lifetime = validity_of(stored.tls.certificate).lifetime.total_seconds()
        return schedule.renewal_floor(lifetime, self.section.renew_fraction,
                                      self.section.min_interval)

    def _floor_until(self, now: datetime.datetime) -> datetime.datetime | None:
        """While the credentials in use are younger than the floor: when it passes."""
        floor = self.renewal_floor()
        if floor is None or self._last_renewal is None or self.holder.held is None:
            return None
        remaining = floor - (self._monotonic() - self._last_renewal)
        return now + datetime.timedelta(seconds=remaining) if remaining > 0 else None

    def _planned(self, now: datetime.datetime) -> datetime.datetime:
        if self.next_attempt is not None:
            return self.next_attempt
        return self.renew_at() or now

    def _target(self, now: datetime.datetime) -> datetime.datetime:
        planned = self._planned(now)
        floor = self._floor_until(now)
        return max(planned, floor) if floor is not None else planned

    # --- the task ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event,
                  custody_ready: Callable[[], Awaitable[TpmCustody | None]],
                  run_tpm: Runner, tpm_lost: Callable[[], None]) -> None:
        if self.registrar is None:
            self.state = NOT_CONFIGURED
            log.warning("no [enrollment] registrar configured: certificates will not be "
                        "renewed")
            return
        restored = False
        while not stop.is_set():
            stored = self.enrollment.stored
            if stored is None or stored.lifecycle != ACTIVE:
                self.state = REVOKED if stored is not None else STOPPED
                return
            custody = await custody_ready()
            if custody is None:
                return
            if not restored:
                self._resume_from(stored)
                await self._restore(custody, run_tpm, stored)
                restored = True
            self.state = RETRYING if self.next_attempt else SCHEDULED
            if not await self._wait(stop):
                return
            custody = await custody_ready()
            if custody is None:
                return
            async with self.lock:
                stored = self.enrollment.stored
                if stored is None or stored.lifecycle != ACTIVE:
                    continue  # decommissioned while we waited
                self.state = RENEWING
                try:
                    outcome = await self._rotate(custody, run_tpm, tpm_lost)
                finally:
                    self.step = None
            self._settle_kick(outcome)
        self.state = STOPPED

    async def _wait(self, stop: asyncio.Event) -> bool:
        """Sleep until the renewal point (re-planned each tick); False if stopping."""
        while not stop.is_set():
            self._note_clock_jump(self._clock())
            await self._measure_if_stale()
            now = self.registrar_now()
            stored = self.enrollment.stored
            target = self._target(now)
            if stored is None or stored.lifecycle != ACTIVE or self._kick.event.is_set() \
                    or now >= target:
                self.held_until = None
                return True
            self._note_hold(now, target)
            delay = schedule.wait_seconds(now, target)
            stopper = asyncio.ensure_future(stop.wait())
            kicker = asyncio.ensure_future(self._kick.event.wait())
            _, pending = await asyncio.wait([stopper, kicker], timeout=delay,
                                            return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        return False

    def _note_hold(self, now: datetime.datetime, target: datetime.datetime) -> None:
        """Say once when the plan says renew but the floor holds the renewal back."""
        planned = self._planned(now)
        if planned > now:
            if self.state == HELD:
                self.state = RETRYING if self.next_attempt else SCHEDULED
            self.held_until = None
            return
        if self.held_until is None:
            floor = self.renewal_floor() or 0.0
            events.emit(log, "renewal-held", "renewal due at %s, held back until %s: the "
                        "last one was less than %.0fs ago (%s)",
                        f"{planned:%Y-%m-%d %H:%M:%SZ}", f"{target:%Y-%m-%d %H:%M:%SZ}", floor,
                        self.hold_reason() or "", device_id=self._device_id(),
                        floor_s=round(floor, 1))
            self._audit("renewal-held", until=target.isoformat(timespec="seconds"),
                        floor_s=round(floor, 1))
        self.held_until = target
        self.state = HELD

    def hold_reason(self) -> str | None:
        """Why a due renewal waits, for status; None when none is held back."""
        if self.held_until is None:
            return None
        floor = self.renewal_floor() or 0.0
        why = (f"renewals are at least {floor:.0f}s apart ([rotation] min_interval, at least "
               "half the planned interval)")
        offset = self.registrar_clock.offset
        if beyond_skew(offset, self.section.clock_skew):
            assert offset is not None
            why += f"; {describe_offset(offset)}"
        return why

    def _note_clock_jump(self, wall: datetime.datetime) -> None:
        mono = self._monotonic()
        jump = schedule.clock_jump(self._last_wall, self._last_mono, wall, mono)
        self._last_wall, self._last_mono = wall, mono
        if jump is not None:
            # A correction, or time that passed while the process was frozen? Measure
            # again; until then the old offset stands, so time is taken to have passed
            # (renewing early is safe, renewing late is not).
            self.registrar_clock.local_clock_jumped()
            self._next_probe = 0.0
            wall = self.registrar_clock.now(wall)
            target = self._target(wall)
            events.emit(log, "clock-jump", "the wall clock jumped %+.0fs; re-planned: renewal %s",
                        jump, "now" if target <= wall else f"at {target:%Y-%m-%d %H:%M:%SZ}",
                        device_id=self._device_id(), seconds=round(jump, 1))
            self._audit("clock-jump", seconds=round(jump, 1),
                        renew_at=target.isoformat(timespec="seconds"))

    async def _restore(self, custody: TpmCustody, run_tpm: Runner,
                       stored: StoredEnrollment) -> None:
        """Unseal the TLS key and present it again, or leave it to a renewal."""
        if stored.tls is None:
            log.info("no TLS credentials yet; renewing now to get them")
            return
        try:
            secret = await CustodyTpm(custody, run_tpm).unseal(stored.tls.sealed_key)
            key = key_from_secret(secret)
            if spki_der(key.public_key()) != spki_der(stored.tls.certificate):
                raise StateError("the unsealed TLS key does not match the TLS certificate")
        except DevidError as e:
            self.restore_error = e
            events.emit(log, "key-restore-failed",
                        "cannot restore the TLS key: %s; renewing now for a new one", e,
                        device_id=stored.device_id, problem=e.code)
            return
        self.restore_error = None
        self.holder.publish(TlsCredentials(stored.device_id, stored.tls.chain, key))
        if self.registrar_now() > stored.tls.certificate.not_valid_after_utc:
            events.emit(log, "credentials-expired",
                        "the TLS certificate expired at %s (offline too long?); it is not "
                        "presented; renewing now", stored.tls.certificate.not_valid_after_utc,
                        device_id=stored.device_id, tls_serial=stored.tls.serial)
        else:
            log.info("TLS certificate %s restored, valid until %s", stored.tls.serial,
                     stored.tls.certificate.not_valid_after_utc.isoformat())

    async def _rotate(self, custody: TpmCustody, run_tpm: Runner,
                      tpm_lost: Callable[[], None]) -> RotationOutcome:
        stored = self.enrollment.stored
        assert stored is not None and self.registrar is not None
        began = self._monotonic()
        self.step = "starting"
        client = RegistrarClient(self.registrar.url, self.registrar.ca, self.registrar.timeout)

        def registrar_now() -> datetime.datetime:  # by this exchange's own Date header
            offset = client.clock_offset
            return self._clock() + datetime.timedelta(seconds=offset) if offset is not None \
                else self.registrar_now()

        try:
            result = await renew(
                CustodyTpm(custody, run_tpm, self.section.seal_pcrs), ThreadedRegistrar(client),
                stored.device_id, self.enrollment.pinned, registrar_now,
                self.section.clock_skew, self._progress,
                await asyncio.to_thread(self.enrollment.platform))
            now = self._clock()
            renewed = stored.renewed(result.identity_chain, result.identity_serial,
                                     StoredTls(result.tls_chain, result.tls_serial,
                                               result.sealed_tls_key), now, client.clock_offset)
            await self._save(renewed)
            faults.point("rotation.saved")
            self._last_renewal = self._monotonic()
            self.enrollment.stored = renewed
            self.holder.publish(TlsCredentials(stored.device_id, result.tls_chain,
                                               result.tls_key))
            faults.point("rotation.published")
        except Problem as p:
            if p.code in RETIRED_PROBLEMS:
                return await self._retired(p)
            return self._failed(p, began)
        except DevidError as e:
            if isinstance(e, TpmUnreachable):
                tpm_lost()
            return self._failed(e, began)
        finally:
            self.observe_offset(client.clock_offset)
            client.close()
        elapsed = round((self._monotonic() - began) * 1000, 1)
        not_after = result.tls_chain[0].not_valid_after_utc
        self._audit("rotated", generation=renewed.generation,
                    identity_serial=result.identity_serial, tls_serial=result.tls_serial,
                    not_after=not_after.isoformat(timespec="seconds"), duration_ms=elapsed)
        events.emit(log, "renewed", "renewed: TLS certificate %s and identity certificate %s "
                    "valid until %s (%.0f ms)", result.tls_serial, result.identity_serial,
                    not_after.isoformat(), elapsed, device_id=stored.device_id,
                    tls_serial=result.tls_serial, identity_serial=result.identity_serial,
                    not_after=not_after.isoformat(timespec="seconds"),
                    generation=renewed.generation)
        self.backoff.reset()
        self.failures, self.next_attempt, self.restore_error = 0, None, None
        hooks = await run_hooks(self.section.hook_argvs(), {
            "DEVID_DEVICE_ID": stored.device_id, "DEVID_TLS_SERIAL": result.tls_serial,
            "DEVID_IDENTITY_SERIAL": result.identity_serial,
            "DEVID_NOT_AFTER": not_after.isoformat(timespec="seconds"),
            "DEVID_GENERATION": str(renewed.generation)}, self.section.hook_timeout)
        faults.point("rotation.done")
        self.last = RotationOutcome(self.registrar_now(), "renewed", duration_ms=elapsed,
                                    tls_serial=result.tls_serial, hooks=tuple(hooks))
        return self.last

    def _progress(self, step: str) -> None:
        log.debug("renewal: %s", step)
        self.step = step  # status shows it while renewing: `renew --wait` follows it
        faults.point(f"rotation.{step}")

    async def _save(self, stored: StoredEnrollment) -> None:
        try:
            await asyncio.to_thread(self.enrollment.store.save, stored)
        except OSError as e:
            raise StateError(f"cannot save {self.enrollment.store.path}: {e.strerror}; the "
                             "previous certificates stay in use",
                             "free space in the state directory") from None

    def _failed(self, e: DevidError, began: float) -> RotationOutcome:
        self.failures += 1
        now = self.registrar_now()
        delay = self.backoff.next_delay()
        not_before = 0.0
        if isinstance(e, Problem) and e.retry_after is not None:
            # The registrar refuses anything sooner; spread a fleet told the same time.
            not_before = e.retry_after * (1 + self.backoff.rng.uniform(0, RETRY_AFTER_SPREAD))
        stored = self.enrollment.stored
        tls = stored.tls if stored else None
        self.next_attempt = schedule.retry_at(
            now, delay, validity_of(tls.certificate) if tls else None, not_before=not_before)
        wait = (self.next_attempt - now).total_seconds()
        events.emit(log, "renewal-failed", "renewal failed (%d in a row): %s; retrying in "
                    "%.0fs, the current certificates stay in use", self.failures, e, wait,
                    device_id=self._device_id(), problem=e.code, failures=self.failures)
        self._audit("rotation-failed", error=e.code, detail=e.message[:300],
                    failures=self.failures, retry_in_s=round(wait, 1))
        self.last = RotationOutcome(now, "failed", error=e.to_dict(),
                                    duration_ms=round((self._monotonic() - began) * 1000, 1))
        return self.last

    async def _retired(self, p: Problem) -> RotationOutcome:
        """The registrar revoked (or decommissioned) us: stop presenting, destroy the key."""
        stored = self.enrollment.stored
        assert stored is not None
        self.holder.withdraw(f"the registrar retired this gateway ({p.code}: {p.message})")
        revoked = stored.revoked(f"{p.code}: {p.message}")
        try:
            await self._save(revoked)
        except StateError as e:
            log.error("%s", e)  # in memory we are revoked regardless; retried at restart
        self.enrollment.stored = revoked
        self.state, self.next_attempt = REVOKED, None
        events.emit(log, "revoked", "the registrar refused renewal: %s. This gateway no "
                    "longer presents its identity; the sealed TLS key is destroyed", p.message,
                    device_id=stored.device_id, problem=p.code)
        self._audit("revoked", problem=p.code, detail=p.message[:300],
                    tls_key="destroyed")
        self.last = RotationOutcome(self.registrar_now(), "revoked", error=p.to_dict())
        return self.last

    def _device_id(self) -> str | None:
        return self.enrollment.stored.device_id if self.enrollment.stored else None

    def _audit(self, event: str, **fields: Any) -> None:
        try:
            self.audit.append(event, device_id=self._device_id(), **fields)
        except OSError as e:
            log.error("cannot write the audit log %s: %s", self.audit.path, e.strerror)

    # --- devidctl renew ------------------------------------------------------------

    def kick(self) -> asyncio.Future[RotationOutcome]:
        """Renew now; the future resolves with the outcome of that attempt."""
        future: asyncio.Future[RotationOutcome] = asyncio.get_running_loop().create_future()
        self._kick.waiters.append(future)
        self._kick.event.set()
        return future

    def _settle_kick(self, outcome: RotationOutcome) -> None:
        kick, self._kick = self._kick, _Kick()
        for future in kick.waiters:
            if not future.done():
                future.set_result(outcome)

    def cancel_waiters(self, reason: str) -> None:
        for future in self._kick.waiters:
            if not future.done():
                future.set_exception(StateError(reason))
        self._kick.waiters.clear()
