"""The events the agent logs for operators, each with a fixed journald MESSAGE_ID.

An operator finds every renewal failure of a fleet's gateway with
`journalctl MESSAGE_ID=1dfb0f475d4a4f1c8593d261cc402447`, whatever the
wording of the message. The IDs never change once released; docs/journal.md
lists them and the systemd catalog (`journalctl -x`) explains them, both made
from this table (`python -m agent.events catalog|markdown`).

`emit()` logs through the standard logging module, so outside systemd the same
event is a plain line on stderr. Fields are explicit and never carry secrets.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

# Journal field names: upper-case letters, digits and underscores, not starting with _.
EVENT_FIELD = "DEVID_EVENT"
DEVICE_FIELD = "DEVICE_ID"
FIELD_PREFIX = "DEVID_"


@dataclass(frozen=True)
class EventType:
    name: str
    message_id: str  # 32 hex digits, as journalctl MESSAGE_ID= takes them
    level: int
    summary: str
    action: str


_EVENTS = (
    EventType("started", "b0522473b53e4c14b70f56098a6ea078", logging.INFO,
           "devid-agent started",
           "None; the version and configuration file are in the message."),
    EventType("stopped", "42c6b62de2344985becbd166debe9f1a", logging.INFO,
           "devid-agent stopped",
           "None."),
    EventType("tpm-ready", "8925afd39c814b4f9949fdca5ca82252", logging.INFO,
           "the TPM is connected",
           "None; the TCTI, manufacturer and firmware are in the message."),
    EventType("tpm-unreachable", "822c5eae58224f83ada910323e55aac6", logging.ERROR,
           "the TPM cannot be used; the agent retries with backoff",
           "Check that /dev/tpmrm0 exists and that the service user is in group tss "
           "(docs/operations.md, 'tpm')."),
    EventType("tpm-lost", "2f5c866a01a84981b59f9355d95237e1", logging.WARNING,
           "the TPM stopped answering; the agent reconnects",
           "If it repeats, look for TPM driver errors in the kernel log."),
    EventType("tpm-hung", "00ca268bac3a48429dc5690db05934c9", logging.CRITICAL,
           "a TPM command has not returned; watchdog pings are withheld so systemd restarts "
           "the agent",
           "Look for TPM driver errors in the kernel log; a firmware update may be needed."),
    EventType("ek-untrusted", "a97a3e1d06b24364a32373fd05a69c32", logging.ERROR,
           "the TPM's EK certificate is missing or does not verify against the trusted "
           "vendor roots",
           "Install the TPM vendor's root in [trust] ek_roots (docs/operations.md, 'ek')."),
    EventType("enrolled", "d0427f14a8e54db7b40cf8b9b2c921c1", logging.INFO,
           "the registrar issued this gateway's identity after attestation",
           "None; the device ID and certificate serial are in the fields."),
    EventType("enrollment-failed", "350cc9421abd492f9b06309cc12fd087", logging.WARNING,
           "an enrollment attempt failed; the agent retries with backoff",
           "Read the problem type in DEVID_PROBLEM and its hint "
           "(docs/operations.md, 'enrollment')."),
    EventType("identity-mismatch", "c6a83c8cf75d4994897404e679a9f56a", logging.ERROR,
           "the stored certificate is not for this TPM's identity key; enrolling again",
           "State was copied from another device or the TPM was cleared; make sure the "
           "registrar expects this device to enroll again."),
    EventType("state-damaged", "ce5dce66912f473ea201aacb7c17794d", logging.ERROR,
           "a state file could not be read and was moved aside",
           "Keep the .damaged file for diagnosis; the agent enrolls again."),
    EventType("renewed", "61e1609334ef4b23b395e1747db5486f", logging.INFO,
           "the certificates were renewed after a fresh attestation",
           "None; the new serials and expiry are in the fields."),
    EventType("renewal-failed", "1dfb0f475d4a4f1c8593d261cc402447", logging.WARNING,
           "a renewal attempt failed; the current certificates stay in use and the agent "
           "retries with backoff",
           "Read DEVID_PROBLEM and the hint (docs/operations.md, 'rotation')."),
    EventType("credentials-expired", "ee066de68be74e7ebb3ec77407eb3c3e", logging.ERROR,
           "the TLS certificate expired before it could be renewed; it is not presented",
           "Restore the connection to the registrar; the agent renews as soon as it can."),
    EventType("key-restore-failed", "83405131d6fc4ca1af9f092e1caed7ec", logging.WARNING,
           "the sealed TLS key could not be unsealed (PCRs changed?); renewing for a new one",
           "If the boot chain changed on purpose nothing is needed; otherwise investigate "
           "the changed PCRs named in the message."),
    EventType("clock-jump", "6061dd433f09447a919d707227893538", logging.WARNING,
           "the wall clock jumped; the renewal was re-planned",
           "Check time synchronisation (NTP)."),
    EventType("clock-skew", "f4343aaf99914b9aaef0d3d95a492479", logging.WARNING,
           "the local clock differs from the registrar's by more than [rotation] clock_skew; "
           "renewals are planned in the registrar's time meanwhile",
           "Fix time synchronisation: timedatectl set-ntp true, or the NTP server it uses "
           "(docs/operations.md, 'clock'). DEVID_OFFSET_S is the registrar's clock minus "
           "ours."),
    EventType("clock-skew-resolved", "7351a312a3684c828a6d0cf7a3c2c4b9", logging.INFO,
           "the local clock agrees with the registrar's again, within [rotation] clock_skew",
           "None."),
    EventType("renewal-held", "1000616eee7249768d5acb21d58c1432", logging.WARNING,
           "a renewal looked due but the last one was too recent; it is held back until "
           "the renewal floor has passed",
           "Usually a wrong clock: see the clock check in `devidctl check`. The floor is "
           "[rotation] min_interval, at least half the planned interval."),
    EventType("hook-failed", "ca36a660f8a543c092d6006ebef73bce", logging.WARNING,
           "a reload hook failed after a rotation",
           "Fix the command in [rotation] reload_hooks; the rotation itself succeeded."),
    EventType("revoked", "bb04bfbb9dd34cb7b3f824bbaa317755", logging.CRITICAL,
           "the registrar revoked this gateway; it no longer presents an identity",
           "Ask the registrar operator why (devid-registrar devices show ID)."),
    EventType("decommissioned", "64cb1d2c250645d6936c842ee5c6b946", logging.WARNING,
           "this gateway was decommissioned; its identity keys were destroyed",
           "None, if intended."),
    EventType("reloaded", "7ab7033109024311890640c7f18b9ac8", logging.INFO,
           "the configuration was reloaded (SIGHUP)",
           "None; changes that need a restart are named in the message."),
    EventType("reload-failed", "1530945e761d4568a57cd8c9a2262eb3", logging.ERROR,
           "the new configuration was refused; the agent keeps running with the old one",
           "Fix the file named in the message and reload again."),
    EventType("consumer-refused", "95da9c3ecd0a4295ab76ae90c7bbbf23", logging.WARNING,
           "the identity API refused a local peer: it matches no declared consumer, or "
           "asked for something it is not granted",
           "DEVID_REASON says which; declare the program under [[consumers]] in agent.toml "
           "if it should have access (docs/identity-api.md)."),
    EventType("sink-failed", "9d163402f6394509bade19b2b3aefb9a", logging.ERROR,
           "a consumer's file sink could not be written or its reload command failed",
           "Read the message; the sink root must be a writable tmpfs with POSIX ACLs."),
    EventType("consumer-purged", "413b5ac2c39b491c9934b83efbcded98", logging.WARNING,
           "a removed consumer's sealed secrets were destroyed (devidctl consumers purge)",
           "None, if intended: data encrypted under those secrets is now unreadable."),
    EventType("broker-started", "acb5bee4398e4016b1f1dfc60e3c6776", logging.INFO,
           "devid-broker started and opened its sensor registry",
           "None; the number of sensors by status is in the message."),
    EventType("broker-stopped", "892e119a30504dde9d464b53f63b7b9a", logging.INFO,
           "devid-broker stopped",
           "None."),
    EventType("broker-data-key-refused", "e3bce6df44134008bc43a8ef5b3e66d9", logging.ERROR,
           "the agent refused devid-broker its data key; the broker cannot open its registry",
           "Declare the broker under [[consumers]] in agent.toml with the grant \"secrets\" "
           "(docs/broker.md); after a PCR change the key is lost: onboard the sensors again."),
    EventType("sensor-added", "78edd80c60ad4f82866b8ced7368ca7b", logging.INFO,
           "a sensor was onboarded with a credential of its own",
           "None; DEVID_SENSOR names it."),
    EventType("sensor-changed", "f6b54bde0c69464180a2e74fe0c1a33b", logging.WARNING,
           "a sensor was quarantined, released, revoked, rekeyed or removed",
           "None, if intended; DEVID_SENSOR and DEVID_CHANGE say which and how."),
    EventType("policy-loaded", "1f7dd7988cf34b7586f58bd84d8c88fc", logging.INFO,
           "devid-broker loaded its policy file (at start or on SIGHUP)",
           "None; the profiles are named in the message."),
    EventType("policy-refused", "1ee9892de8ca43468378c145657ac319", logging.ERROR,
           "a policy file was refused; the broker keeps the policy it had (none at start: "
           "nothing is granted)",
           "Fix the file (`devidctl policy check FILE` names the line and key), then "
           "`systemctl reload devid-broker`."),
    EventType("sensor-auth-failed", "eb633913136640f985f68d8e0862244a", logging.WARNING,
           "a message to a broker listener did not authenticate: unknown or disabled "
           "credential, wrong key, or a replay; nothing was forwarded",
           "DEVID_REFUSAL says which, DEVID_SENSOR whose credential was named. Many from "
           "one sensor: a wrong key on the device, or someone replaying its traffic."),
    EventType("policy-denied", "fff215a13e3b467d92875947b3a8159c", logging.WARNING,
           "an authenticated sensor asked for something its profile does not grant; nothing "
           "was forwarded",
           "DEVID_REASON names the rule or why none applied; `devidctl policy explain` "
           "shows the decision. Unexpected from a known device: look at it."),
    EventType("upstream-failed", "44b7efa1707945f085ded05bbf1c4778", logging.ERROR,
           "an allowed sensor request could not be forwarded upstream (the sensor got 5.02 "
           "or 5.04)",
           "DEVID_UPSTREAM names it, DEVID_REASON says why; check the upstream, the network "
           "and `devidctl status`."),
    EventType("lwm2m-registered", "e61c07a42baf4aa89c92422240b5b425", logging.INFO,
           "a sensor registered with the gateway's LwM2M server",
           "None; `devidctl sensors show NAME` shows its objects and lifetime."),
    EventType("lwm2m-deregistered", "ad2d5399ecab4fb4832160f07879ebfe", logging.INFO,
           "a sensor de-registered from the gateway's LwM2M server",
           "None, if the device was switched off on purpose."),
    EventType("lwm2m-offline", "6f30bf4469ab4b67ad4cdd8c7af15a39", logging.WARNING,
           "a sensor sent no LwM2M Update within its lifetime; its registration was removed",
           "Look at the device (power, radio). After the profile's deprovision_after "
           "lifetimes its credential is revoked."),
    EventType("sensor-deprovisioned", "b8ea0384e71b49b4838e9f11211f592d", logging.WARNING,
           "a silent sensor was deprovisioned: its credential is revoked",
           "DEVID_REASON says how long it was silent. To use the device again, onboard it "
           "again (devidctl sensors rekey, then provision the new key)."),
    EventType("lwm2m-bootstrapped", "939592f4997f4cb0b8b939cb9e4bd492", logging.INFO,
           "a sensor was bootstrapped: it holds a fresh operational credential, and its "
           "bootstrap credential is spent",
           "None; a second use of the bootstrap credential is refused."),
    EventType("lwm2m-bootstrap-failed", "1eab9c0745c4481592cf2fe631cd8457", logging.WARNING,
           "an LwM2M bootstrap did not finish; the sensor's credential is unchanged and it "
           "may try again",
           "DEVID_REASON says at which step; look at the device if it keeps failing."),
    EventType("lwm2m-firmware-updated", "97f9c1bd15da4aee95b1c2ecceb2c130", logging.INFO,
           "a sensor's firmware update finished; it reports the version in the message",
           "None; `devidctl sensors list --json` shows each sensor's firmware version."),
    EventType("lwm2m-firmware-failed", "d1c0d05b953c4ebb90140419ef0480d9", logging.WARNING,
           "a sensor's firmware update failed or did not finish in time",
           "DEVID_REASON says at which step and what the sensor reported (its Update "
           "Result); the sensor keeps the firmware it ran."),
    EventType("sensor-anomaly", "394a2ac6ba7743f0826bd949c8a304a6", logging.WARNING,
           "a sensor's behaviour broke its learned baseline (a finding of the watch)",
           "DEVID_FINDING says which kind, DEVID_EVIDENCE what was seen and DEVID_BASELINE "
           "what was expected; DEVID_ACTION whether it was quarantined. Look at the device; "
           "`devidctl sensors release NAME --reason ...` if it is fine."),
    EventType("sensor-silent", "17c84a5c2eff4f39a8c41beba817ebf5", logging.WARNING,
           "a sensor sent nothing for many of its learned intervals",
           "Look at the device (power, radio). With [profiles.NAME.watch] deprovision_after, "
           "its credential is revoked if it stays silent that much longer."),
    EventType("lwm2m-upstream-registered", "a9018e9431814392941eb164b1a40212", logging.INFO,
           "the gateway registered with its upstream LwM2M server as an LwM2M Gateway "
           "(/25)",
           "None; the server manages the gateway's sensors by their prefixes from now on."),
    EventType("lwm2m-upstream-failed", "1c57cedb33144cdab459ca7950c57390", logging.WARNING,
           "the gateway lost or could not make its session or registration with the "
           "upstream LwM2M server; it retries with backoff",
           "DEVID_REASON says why: the server's address, its certificate against "
           "[lwm2m_upstream] bundle, or the server refusing the gateway's certificate. "
           "`devidctl broker status` shows the state."),
)

EVENTS: dict[str, EventType] = {e.name: e for e in _EVENTS}


def field_name(key: str) -> str:
    return FIELD_PREFIX + key.upper()


def emit(logger: logging.Logger, event: str, message: str, *args: object,
         device_id: str | None = None, **fields: object) -> None:
    """Log `message % args` as `event`, with its MESSAGE_ID and `fields` as DEVID_* fields."""
    kind = EVENTS[event]
    extra: dict[str, object] = {"MESSAGE_ID": kind.message_id, EVENT_FIELD: kind.name}
    if device_id is not None:
        extra[DEVICE_FIELD] = device_id
    for key, value in fields.items():
        if value is not None:
            extra[field_name(key)] = str(value)
    logger.log(kind.level, message, *args, extra=extra)


# --- documentation made from the table -----------------------------------------------

_PRIORITY = {logging.CRITICAL: "crit", logging.ERROR: "err", logging.WARNING: "warning",
             logging.INFO: "info", logging.DEBUG: "debug"}


def catalog() -> str:
    """The systemd message catalog (journalctl -x, /usr/lib/systemd/catalog/)."""
    parts = []
    for e in _EVENTS:
        parts.append(f"-- {e.message_id}\nSubject: devid-agent: {e.summary}\n"
                     "Defined-By: devid-agent\nSupport: file:///usr/share/doc/devid-agent/"
                     f"operations.md\n\n{e.action}\n")
    return "\n".join(parts)


def markdown_table() -> str:
    rows = ["| event | MESSAGE_ID | priority | meaning | what to do |",
            "|---|---|---|---|---|"]
    rows += [f"| `{e.name}` | `{e.message_id}` | {_PRIORITY[e.level]} | {e.summary} | "
             f"{e.action} |" for e in _EVENTS]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("catalog", "markdown"):
        print("usage: python -m agent.events catalog|markdown", file=sys.stderr)
        sys.exit(64)
    sys.stdout.write(catalog() if what == "catalog" else markdown_table())
