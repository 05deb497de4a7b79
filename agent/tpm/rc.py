"""Translate TSS return codes into typed, actionable errors.

Raw codes like 0x0000099d mean nothing to a field engineer; each class of
failure becomes a DevidError subclass with a hint saying what to do. The
decoded TSS text (e.g. "tpm:session(1):a policy check failed") is kept in the
message for the expert, and the code in `rc`.
"""

from __future__ import annotations

from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_RC

from agent.errors import PcrPolicyMismatch, TpmBusy, TpmError, TpmLockout, TpmUnreachable

_LAYER_MASK = 0xFF << 16
_TPM_LAYER = 0
_TCTI_LAYER = 10 << 16
_RESMGR_LAYER = 11 << 16  # tpm2-abrmd's own failures (e.g. its socket)
_RESMGR_TPM_LAYER = 12 << 16  # TPM errors relayed by tpm2-abrmd

_BUSY = {TPM2_RC.RETRY, TPM2_RC.YIELDED, TPM2_RC.TESTING, TPM2_RC.CANCELED, TPM2_RC.NV_RATE}
_POLICY = {TPM2_RC.POLICY_FAIL, TPM2_RC.PCR_CHANGED}
_OUT_OF_SLOTS = {TPM2_RC.OBJECT_MEMORY, TPM2_RC.SESSION_MEMORY, TPM2_RC.OBJECT_HANDLES,
                 TPM2_RC.SESSION_HANDLES}


def base_error(rc: int) -> int:
    """The TPM error with its handle/parameter/session number stripped (TPM layer only)."""
    if rc & _LAYER_MASK != _TPM_LAYER:
        return rc
    if rc & TPM2_RC.FMT1:
        return TPM2_RC.FMT1 + (rc & 0x3F)
    return rc & 0xFFF


def classify(rc: int, action: str, decoded: str) -> TpmError:
    """Pure mapping from a return code to the error a user should see."""
    layer = rc & _LAYER_MASK
    text = f"{action} failed: {decoded} (rc 0x{rc:08x})"
    if layer in (_TCTI_LAYER, _RESMGR_LAYER):
        return TpmUnreachable(f"{action} failed: cannot talk to the TPM: {decoded}", rc=rc)
    if layer not in (_TPM_LAYER, _RESMGR_TPM_LAYER):
        return TpmError(text, rc=rc)
    err = base_error(rc & 0xFFFF)
    if err == TPM2_RC.LOCKOUT:
        return TpmLockout(text, rc=rc)
    if err in _BUSY:
        return TpmBusy(text, rc=rc)
    if err in _POLICY:
        return PcrPolicyMismatch(text, rc=rc)
    if err in _OUT_OF_SLOTS:
        return TpmError(
            text,
            hint="the TPM ran out of object or session slots: some client is leaking handles; "
            "use the resource manager (/dev/tpmrm0) and restart the leaking client",
            rc=rc,
        )
    if err in (TPM2_RC.AUTH_FAIL, TPM2_RC.BAD_AUTH):
        return TpmError(
            text,
            hint="an authorization value was wrong; repeated failures lead to lockout",
            rc=rc,
        )
    return TpmError(text, rc=rc)


def translate(exc: TSS2_Exception, action: str) -> TpmError:
    return classify(int(exc.rc), action, str(exc))
