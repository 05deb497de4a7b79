"""The one exception hierarchy of devid-agent.

Every error a user can meet is a DevidError with a stable `code` (used in JSON
output and, later, problem+json types), a message saying what went wrong and a
`hint` saying what to do. Edges map them: the CLI to exit codes and text, the
control socket to error objects.
"""

from __future__ import annotations


class DevidError(Exception):
    """Base of all expected failures. Never carries secrets in its text."""

    code = "error"
    default_hint = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def to_dict(self) -> dict[str, str]:
        return {"type": self.code, "message": self.message, "hint": self.hint}

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ConfigError(DevidError):
    code = "config-invalid"
    default_hint = "fix the configuration file and start again"


class StateError(DevidError):
    """Local state (state_dir, key blobs) is missing, unreadable or inconsistent."""

    code = "state-invalid"


class ProtocolError(DevidError):
    """A peer sent something that is not valid for the protocol spoken."""

    code = "protocol-error"


class ControlError(DevidError):
    """The control socket could not be reached or refused the request."""

    code = "control-error"


class DaemonNotRunning(ControlError):
    code = "daemon-not-running"
    default_hint = "start it with `systemctl start devid-agent` (or `devid-agent --config FILE`)"


class PermissionDenied(ControlError):
    code = "permission-denied"
    default_hint = "run devidctl as root or as a member of the agent's control group"


class AccessDenied(DevidError):
    """A file or directory this user may not read (agent.access says who may)."""

    code = "access-denied"


# --- TPM -------------------------------------------------------------------


class TpmError(DevidError):
    code = "tpm-error"
    default_hint = "see `devidctl check` for a diagnosis"

    def __init__(self, message: str, hint: str | None = None, rc: int | None = None) -> None:
        super().__init__(message, hint)
        self.rc = rc

    def to_dict(self) -> dict[str, str]:
        d = super().to_dict()
        if self.rc is not None:
            d["tpm_rc"] = f"0x{self.rc:08x}"
        return d


class TpmUnreachable(TpmError):
    code = "tpm-unreachable"
    default_hint = (
        "check that the TPM is present (/dev/tpmrm0 exists and is readable by the agent's "
        "user, usually via group 'tss'), or for swtpm that it is running on the configured port"
    )


class TpmLockout(TpmError):
    code = "tpm-lockout"
    default_hint = (
        "the TPM is in dictionary-attack lockout; wait for the lockout recovery time or have "
        "the owner run `tpm2_dictionarylockout --clear-lockout`"
    )


class TpmBusy(TpmError):
    code = "tpm-busy"
    default_hint = "the TPM asked to retry later (self-test or another client); it will be retried"


class PcrPolicyMismatch(TpmError):
    code = "pcr-policy-mismatch"
    default_hint = (
        "the platform state (PCR values) changed since the secret was sealed, e.g. after a "
        "firmware or boot-chain change; the secret must be re-provisioned from a trusted state"
    )


class EkCertificateMissing(TpmError):
    code = "ek-certificate-missing"
    default_hint = (
        "this TPM has no EK certificate in NV; ask the vendor for it or provision one "
        "(tpm2_nvdefine/tpm2_nvwrite at the TCG index) before enrolling"
    )


class EkMismatch(TpmError):
    code = "ek-mismatch"
    default_hint = (
        "the EK the TPM derives does not match its certificate: the certificate belongs to a "
        "different TPM or was replaced; do not enroll this device"
    )


class KeyBlobMismatch(TpmError):
    code = "key-blob-mismatch"
    default_hint = (
        "the stored key blobs do not load under this TPM's storage key (TPM cleared or "
        "replaced, or state copied from another device); the device must be re-provisioned"
    )


# --- enrollment --------------------------------------------------------------


class Problem(DevidError):
    """A refusal that crosses the registrar's HTTP API as application/problem+json (RFC 9457).

    `code` is one of the stable problem types in agent.enroll.problems; the
    registrar raises it, the agent rebuilds it from the response, so both sides
    name a failure the same way.
    """

    def __init__(self, code: str, message: str, status: int = 400, hint: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, hint)
        self.code = code
        self.status = status
        self.retry_after = retry_after


class RegistrarUnreachable(DevidError):
    code = "registrar-unreachable"
    default_hint = ("check [enrollment] url, that devid-registrar is running, and the network "
                    "path to it; the agent keeps retrying")


class RegistrarNotTrusted(DevidError):
    code = "registrar-not-trusted"
    default_hint = ("the registrar's TLS certificate does not chain to [enrollment] ca; pin the "
                    "CA file `devid-registrar serve` printed")


class RegistrarNotValidNow(RegistrarNotTrusted):
    """The registrar's TLS certificate is not valid at this gateway's time: the chain may be
    fine and the local clock wrong."""


def from_dict(err: dict[str, str]) -> DevidError:
    """Rebuild an error sent across a local socket as `to_dict()`: the class with that
    code (PcrPolicyMismatch for "pcr-policy-mismatch"), else a DevidError keeping it."""
    code = err.get("type", DevidError.code)
    classes: list[type[DevidError]] = [DevidError]
    for cls in classes:
        classes.extend(cls.__subclasses__())
    found = next((c for c in classes if c.__dict__.get("code") == code and c is not Problem),
                 DevidError)
    error = found(err.get("message", "unknown error"), err.get("hint") or None)
    error.code = code
    return error


class SensorError(DevidError):
    """A sensor request the broker refuses (unknown sensor, bad name, bad import)."""

    code = "sensor-error"


class SensorNotFound(SensorError):
    code = "sensor-not-found"


class ImportRefused(SensorError):
    """A sensor import file with problems; `problems` has one line each, naming the line."""

    code = "import-refused"

    SHOWN = 50  # problems spelled out in the message (it crosses sockets and terminals)

    def __init__(self, message: str, problems: list[str], hint: str | None = None) -> None:
        lines = [f"  {p}" for p in problems[:self.SHOWN]]
        if len(problems) > self.SHOWN:
            lines.append(f"  ... and {len(problems) - self.SHOWN} more")
        super().__init__("\n".join([message, *lines]), hint)
        self.summary = message
        self.problems = problems


class UpstreamError(DevidError):
    """An upstream refused, failed or could not be reached; the sensor gets 5.02."""

    code = "upstream-error"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time; the sensor gets 5.04."""

    code = "upstream-timeout"


class ListenerError(DevidError):
    """A broker listener cannot start (address in use, not on this host)."""

    code = "listener-error"


class Lwm2mError(ProtocolError):
    """A sensor's LwM2M request the broker refuses; the edge answers `coap_code`."""

    code = "lwm2m-refused"
    coap_code = 0x80  # 4.00 Bad Request


class Lwm2mForbidden(Lwm2mError):
    """Not this sensor's to do: another endpoint name, or a profile without LwM2M."""

    code = "lwm2m-forbidden"
    coap_code = 0x83  # 4.03


class Lwm2mNotFound(Lwm2mError):
    """No such registration (expired, deregistered, or another sensor's)."""

    code = "lwm2m-not-found"
    coap_code = 0x84  # 4.04


class Lwm2mNotAllowed(Lwm2mError):
    """An operation the gateway does not relay (Create, Delete, composite) or serve."""

    code = "lwm2m-not-allowed"
    coap_code = 0x85  # 4.05


class Lwm2mNotAcceptable(Lwm2mError):
    """A Content-Format asked for that the gateway's own objects do not speak."""

    code = "lwm2m-not-acceptable"
    coap_code = 0x86  # 4.06
