"""Field-engineer diagnostics: judge gathered facts, each result with a hint. Pure."""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class CheckResult:
    name: str
    level: Level
    summary: str
    hint: str = ""

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["level"] = self.level.label()
        return d


# The summary of a check that did not run because another failed (that one says why).
NOT_CHECKED = "not checked: "

# The clock cannot be earlier than the day this release was cut.
RELEASE_FLOOR = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)


def check_tpm(facts: TpmFacts) -> CheckResult:
    if facts.error is not None or facts.info is None:
        err = facts.error
        return CheckResult("tpm", Level.FAIL,
                           f"TPM not usable via {facts.tcti}: {err.message if err else 'unknown'}",
                           err.hint if err else "")
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
        return CheckResult("ek-certificate", Level.FAIL, f"{NOT_CHECKED}TPM not reachable",
                           "fix the TPM check first")
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
    reason = facts.endorsement[0].verdict.reason
    return CheckResult("ek-certificate", Level.FAIL,
                       f"{kinds} present and matching this TPM, but not trusted: {reason}",
                       "add the vendor's root CA (and any intermediate) to [trust] ek_roots; "
                       "if the issuer is unexpected, this TPM may not be genuine")


def check_identity(facts: TpmFacts) -> CheckResult:
    if facts.keys_destroyed:
        return CheckResult("identity-key", Level.WARN, "identity key and AK destroyed: the "
                           "gateway was decommissioned", "enroll it again to get new keys")
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


def judge_registrar_offset(offset: float | None, skew: float) -> CheckResult | None:
    """The local clock against the registrar's, as measured from its Date header: FAIL
    beyond `skew`, WARN beyond half of it; None when never measured."""
    if offset is None:
        return None
    summary = (f"{describe_offset(offset)} (registrar minus local {offset:+.0f}s, tolerated "
               f"{human_duration(skew)})")
    if abs(offset) > skew:
        return CheckResult("clock", Level.FAIL, summary, CLOCK_HINT)
    if abs(offset) > skew / 2:
        return CheckResult("clock", Level.WARN, summary + ", close to the tolerance", CLOCK_HINT)
    return CheckResult("clock", Level.PASS, summary)


def check_clock(clock: ClockFacts, not_before: list[datetime.datetime],
                skew: float = 300.0) -> CheckResult:
    now = datetime.datetime.fromtimestamp(clock.now, datetime.UTC)
    stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    if now < RELEASE_FLOOR:
        return CheckResult("clock", Level.FAIL, f"clock reads {stamp}, before this agent's "
                           f"release ({RELEASE_FLOOR:%Y-%m-%d})",
                           "set the time (NTP, or an RTC with a working battery); certificates "
                           "cannot be checked with a clock this wrong")
    against_registrar = judge_registrar_offset(clock.registrar_offset, skew)
    if against_registrar is not None and against_registrar.level > Level.PASS:
        return CheckResult("clock", against_registrar.level,
                           f"clock reads {stamp}: {against_registrar.summary}",
                           against_registrar.hint)
    for nb in not_before:
        if now < nb:
            return CheckResult("clock", Level.FAIL, f"clock reads {stamp}, before the EK "
                               f"certificate's start of validity {nb:%Y-%m-%d}",
                               "the clock is behind: enable NTP (timedatectl set-ntp true)")
    agrees = f"; {against_registrar.summary}" if against_registrar is not None else ""
    if clock.synchronized is False:
        return CheckResult("clock", Level.WARN, f"clock reads {stamp} but is not "
                           f"NTP-synchronized{agrees}",
                           "enable time sync (timedatectl set-ntp true); short-lived "
                           "certificates need a clock within minutes of real time")
    sync = "NTP-synchronized" if clock.synchronized else "sync status unknown"
    return CheckResult("clock", Level.PASS, f"clock reads {stamp} ({sync}){agrees}")


def check_daemon_down(detail: str) -> CheckResult:
    return CheckResult("daemon", Level.FAIL, detail,
                       "start it with `systemctl start devid-agent`; checks below ran locally")


def run_checks(tpm: TpmFacts, path: PathFacts, clock: ClockFacts, expected_uid: int | None,
               roots_configured: bool, skew: float = 300.0) -> list[CheckResult]:
    not_before = [
        datetime.datetime.fromisoformat(str(ek.certificate["not_before"]))
        for ek in tpm.endorsement
    ]
    return [
        check_tpm(tpm),
        check_ek(tpm, roots_configured),
        check_identity(tpm),
        check_state_dir(path, expected_uid),
        check_clock(clock, not_before, skew),
    ]


def worst(results: list[CheckResult]) -> Level:
    return max((r.level for r in results), default=Level.PASS)
