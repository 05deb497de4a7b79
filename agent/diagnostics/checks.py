"""Field-engineer diagnostics: judge gathered facts, each result with a hint. Pure."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from agent.clock import human_duration
from agent.diagnostics.facts import ClockFacts, PathFacts, TpmFacts
from agent.rotation.registrarclock import describe_offset
from agent.tpm.tcti import behind_resource_manager


class Level(IntEnum):
    """Ordered so that max() is the worst; values are devidctl's exit codes."""

    PASS = 0
    WARN = 1
    FAIL = 2

    def label(self) -> str:
        return self.name.lower()


HEADLINE = {Level.PASS: "OK", Level.WARN: "WARN", Level.FAIL: "FAIL"}  # status and check


# The summary of a check that did not run because another failed (that one says why).
NOT_CHECKED = "not checked: "

# Each check has a section in docs/operations.md, under "When `devidctl check` fails".
OPERATIONS_DOC = "operations.md"


@dataclass(frozen=True)
class CheckResult:
    """One line of `devidctl check`. `because`: the check whose failure would explain this
    one's (clock, tpm, daemon, state-dir); `cause`: how this check, failing, is quoted by
    the checks it explains ("the local clock is 2d 0h behind the registrar's")."""

    name: str
    level: Level
    summary: str
    hint: str = ""
    because: str = ""
    cause: str = ""
    detail: str = ""  # what a not-checked line found, for --verbose and --json

    @property
    def checked(self) -> bool:
        return not self.summary.startswith(NOT_CHECKED)

    @property
    def docs(self) -> str:
        return f"{OPERATIONS_DOC}#{self.name}"

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"name": self.name, "level": self.level.label(),
                                "summary": self.summary, "hint": self.hint,
                                "checked": self.checked}
        if self.level > Level.PASS:
            d["docs"] = self.docs
        if self.detail:
            d["detail"] = self.detail
        if not self.checked and self.because:
            d["because"] = self.because
        return d

# The clock cannot be earlier than the day this release was cut.
RELEASE_FLOOR = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)


def check_tpm(facts: TpmFacts) -> CheckResult:
    if facts.error is not None or facts.info is None:
        err = facts.error
        return CheckResult("tpm", Level.FAIL,
                           f"TPM not usable via {facts.tcti}: {err.message if err else 'unknown'}",
                           err.hint if err else "", cause=f"the TPM is not usable via "
                                                          f"{facts.tcti}")
    info = facts.info
    summary = (f"TPM reachable via {facts.tcti}: {info.manufacturer} {info.vendor_string!r}, "
               f"firmware {info.firmware_version}")
    occupancy = facts.occupancy
    if occupancy is None:
        return CheckResult("tpm", Level.PASS, summary)
    summary += f"; in use: {occupancy.describe()}"
    shortages = occupancy.shortages()
    if not shortages:
        return CheckResult("tpm", Level.PASS, summary)
    if behind_resource_manager(facts.tcti):
        hint = ("another program holds TPM sessions or objects through the resource manager; "
                "find it (`lsof /dev/tpmrm0`) and stop it")
    else:
        hint = ("without a resource manager the TPM keeps what a killed process left: restart "
                "devid-agent (it flushes them at start) or use /dev/tpmrm0")
    return CheckResult("tpm", Level.WARN, f"{summary}; {'; '.join(shortages)}", hint)


def check_ek(facts: TpmFacts, roots_configured: bool) -> CheckResult:
    if not facts.reachable:
        return _not_checked("ek-certificate", "tpm", "the TPM is not usable")
    if facts.ek_error is not None:
        return CheckResult("ek-certificate", Level.FAIL, facts.ek_error.message,
                           facts.ek_error.hint)
    if not facts.endorsement:
        return CheckResult("ek-certificate", Level.FAIL, "no EK certificate found")
    verified = [ek for ek in facts.endorsement if ek.verdict.verified]
    kinds = ", ".join(ek.kind for ek in facts.endorsement)
    if verified:
        ek = verified[0]
        return CheckResult("ek-certificate", Level.PASS,
                           f"{kinds} present and matching this TPM; {ek.kind} chains to a "
                           f"trusted vendor root ({' <- '.join(ek.verdict.chain)})")
    if not roots_configured:
        return CheckResult("ek-certificate", Level.WARN,
                           f"{kinds} present and matching this TPM, but no vendor root is "
                           "configured to verify them",
                           "add the TPM vendor's root CA certificate to [trust] ek_roots")
    verdict = facts.endorsement[0].verdict
    return CheckResult("ek-certificate", Level.FAIL,
                       f"{kinds} present and matching this TPM, but not trusted: "
                       f"{verdict.reason}",
                       "add the vendor's root CA (and any intermediate) to [trust] ek_roots; "
                       "if the issuer is unexpected, this TPM may not be genuine",
                       because="clock" if verdict.dated else "")


def _not_checked(name: str, because: str, why: str) -> CheckResult:
    """A check that cannot run at all until `because` passes."""
    return CheckResult(name, Level.WARN, f"{NOT_CHECKED}{why}", f"fix the {because} check "
                       "first", because=because)


def check_identity(facts: TpmFacts) -> CheckResult:
    if facts.keys_destroyed:
        return CheckResult("identity-key", Level.WARN, "identity key and AK destroyed: the "
                           "gateway was decommissioned", "enroll it again to get new keys")
    if not facts.reachable:  # the key blob may be fine: only the TPM can load it
        return _not_checked("identity-key", "tpm", "the TPM is not usable")
    if facts.identity is None:
        err = facts.identity_error
        return CheckResult("identity-key", Level.FAIL,
                           f"identity key unusable: {err.message if err else 'not created yet'}",
                           err.hint if err else "start the agent once to create it")
    if not facts.identity.resident:
        return CheckResult("identity-key", Level.FAIL,
                           "identity key lacks fixedTPM/fixedParent/sensitiveDataOrigin",
                           "the key blob was replaced; re-provision the device")
    return CheckResult("identity-key", Level.PASS,
                       f"identity key resident in the TPM (public key SHA-256 "
                       f"{facts.identity.public_key_sha256[:16]}...)")


def check_state_dir(path: PathFacts, expected_uid: int | None) -> CheckResult:
    """`expected_uid` None: the agent's user is unknown (checked from outside the daemon)."""
    name = "state-dir"
    if not path.exists:
        return CheckResult(name, Level.WARN, f"{path.path} does not exist yet",
                           "the agent creates it on first start; check [paths] state_dir")
    if not path.is_dir:
        return CheckResult(name, Level.FAIL, f"{path.path} is not a directory",
                           "move the file away or point [paths] state_dir elsewhere")
    mode = f"{path.mode:04o}"
    if path.mode & 0o700 != 0o700:  # root gets in anyway; the agent's user does not
        return CheckResult(name, Level.FAIL, f"{path.path} is not usable by its owner "
                           f"(mode {mode}): the agent cannot read or write its state",
                           f"chmod 0700 {path.path}")
    if path.mode & 0o022:
        return CheckResult(name, Level.FAIL, f"{path.path} is writable by group or others "
                           f"(mode {mode})", f"chmod 0700 {path.path}")
    if expected_uid is not None and path.uid != expected_uid:
        return CheckResult(name, Level.FAIL, f"{path.path} is owned by uid {path.uid}, not the "
                           f"agent's uid {expected_uid}", f"chown -R {expected_uid} {path.path}")
    if path.loose_files:
        return CheckResult(name, Level.WARN,
                           f"files readable by group or others: {', '.join(path.loose_files)}",
                           "chmod 0600 the listed files (state files are written 0600)")
    if path.mode & 0o077:
        return CheckResult(name, Level.WARN, f"{path.path} is accessible by group or others "
                           f"(mode {mode})", f"chmod 0700 {path.path}")
    return CheckResult(name, Level.PASS, f"{path.path} private (mode {mode}, owner uid "
                       f"{path.uid})")


CLOCK_HINT = ("fix time synchronisation: `timedatectl set-ntp true`, and check the NTP "
              "server it uses (`timedatectl timesync-status`); meanwhile the agent plans "
              "renewals in the registrar's time, but relying parties judge this gateway's "
              "certificates by theirs")


def judge_registrar_offset(offset: float | None, skew: float,
                           authenticated: bool = True) -> CheckResult | None:
    """The local clock against the registrar's, as measured from its Date header: FAIL
    beyond `skew`, WARN beyond half of it; None when never measured. Unauthenticated: read
    over a TLS connection that failed verification (with a clock this wrong, it does)."""
    if offset is None:
        return None
    how = "" if authenticated else "; read without TLS verification, which this clock fails"
    summary = (f"{describe_offset(offset)} (registrar minus local {round(offset):+d}s, tolerated "
               f"{human_duration(skew)}{how})")
    if abs(offset) > skew:
        return CheckResult("clock", Level.FAIL, summary, CLOCK_HINT,
                           cause=describe_offset(offset))
    if abs(offset) > skew / 2:
        return CheckResult("clock", Level.WARN, summary + ", close to the tolerance", CLOCK_HINT)
    return CheckResult("clock", Level.PASS, summary)


def check_clock(clock: ClockFacts, starts: Sequence[tuple[str, datetime.datetime]] = (),
                skew: float = 300.0, judge_sync: bool = True) -> CheckResult:
    """The clock against this release, the registrar's clock, and the start of validity of
    the certificates the gateway holds (`starts`: what, notBefore): a certificate cannot
    start in the future of a right clock. `judge_sync`: warn when not NTP-synchronized."""
    now = datetime.datetime.fromtimestamp(clock.now, datetime.UTC)
    stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    if now < RELEASE_FLOOR:
        return CheckResult("clock", Level.FAIL, f"clock reads {stamp}, before this agent's "
                           f"release ({RELEASE_FLOOR:%Y-%m-%d})",
                           "set the time (NTP, or an RTC with a working battery); certificates "
                           "cannot be checked with a clock this wrong",
                           cause=f"the clock reads {stamp}, before this agent's release")
    against_registrar = judge_registrar_offset(clock.registrar_offset, skew,
                                               clock.offset_authenticated)
    if against_registrar is not None and against_registrar.level > Level.PASS:
        return CheckResult("clock", against_registrar.level,
                           f"clock reads {stamp}: {against_registrar.summary}",
                           against_registrar.hint, cause=against_registrar.cause)
    tolerated = datetime.timedelta(seconds=skew)
    for what, not_before in starts:
        if now + tolerated < not_before:
            behind = human_duration((not_before - now).total_seconds())
            return CheckResult("clock", Level.FAIL, f"clock reads {stamp}, {behind} before "
                               f"{what} starts to be valid ({not_before:%Y-%m-%d %H:%M}Z): the "
                               "clock is behind", "set the time: enable NTP (`timedatectl "
                               "set-ntp true`), or an RTC with a working battery",
                               cause=f"the clock is at least {behind} behind ({what} starts "
                                     "later)")
    agrees = f"; {against_registrar.summary}" if against_registrar is not None else ""
    if clock.synchronized is False and judge_sync:
        return CheckResult("clock", Level.WARN, f"clock reads {stamp} but is not "
                           f"NTP-synchronized{agrees}",
                           "enable time sync (timedatectl set-ntp true); short-lived "
                           "certificates need a clock within minutes of real time")
    sync = "NTP-synchronized" if clock.synchronized else "sync status unknown"
    return CheckResult("clock", Level.PASS, f"clock reads {stamp} ({sync}){agrees}")


def check_daemon_down(detail: str) -> CheckResult:
    return CheckResult("daemon", Level.FAIL, detail,
                       "start it with `systemctl start devid-agent`; checks below ran locally",
                       cause="devid-agent is not running")


def worst(results: list[CheckResult]) -> Level:
    return max((r.level for r in results), default=Level.PASS)
