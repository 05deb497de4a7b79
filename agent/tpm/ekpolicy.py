"""The EK's authorization policy (TCG EK Credential Profile 2.x, "Computing PolicyA/B/C"). Pure.

An EK has no usable auth value: commands that use it (ActivateCredential)
must satisfy its authPolicy in a policy session. Low-range templates use
PolicyA = PolicySecret(TPM_RH_ENDORSEMENT). High-range templates use
PolicyB = PolicyOR(PolicyA, PolicyC), where PolicyC is PolicyAuthorizeNV on a
TCG policy index; we satisfy the PolicyA branch and then PolicyOR, which
needs both branch digests. All are computed here, in the EK's name algorithm,
and checked against the template's authPolicy before touching the TPM.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from tpm2_pytss.constants import TPM2_ALG, TPM2_CC, TPM2_RH

_HASHES = {TPM2_ALG.SHA256: "sha256", TPM2_ALG.SHA384: "sha384", TPM2_ALG.SHA512: "sha512"}
# TCG EK Credential Profile, "Handle Values": policy NV index per hash algorithm.
_POLICY_INDEX = {TPM2_ALG.SHA256: 0x01C07F01, TPM2_ALG.SHA384: 0x01C07F02,
                 TPM2_ALG.SHA512: 0x01C07F03}
# TPMA_NV of the policy indices (EK Credential Profile, "Computing Policy Index Names").
_POLICY_INDEX_ATTRIBUTES = 0x220F1008


@dataclass(frozen=True)
class EkPolicy:
    """How to satisfy one EK's authPolicy: PolicySecret(EH), then PolicyOR if `or_branches`."""

    hash_alg: TPM2_ALG
    or_branches: tuple[bytes, ...] = ()


def _h(alg: TPM2_ALG, data: bytes) -> bytes:
    return hashlib.new(_HASHES[alg], data).digest()


def policy_a(alg: TPM2_ALG) -> bytes:
    size = hashlib.new(_HASHES[alg]).digest_size
    inner = _h(alg, b"\x00" * size + struct.pack(">II", TPM2_CC.PolicySecret, TPM2_RH.ENDORSEMENT))
    return _h(alg, inner)  # policyRef is empty


def policy_c(alg: TPM2_ALG) -> bytes:
    size = hashlib.new(_HASHES[alg]).digest_size
    nv_public = (struct.pack(">IHI", _POLICY_INDEX[alg], alg, _POLICY_INDEX_ATTRIBUTES)
                 + struct.pack(">H", size) + policy_a(alg) + struct.pack(">H", size + 2))
    index_name = struct.pack(">H", alg) + _h(alg, nv_public)
    return _h(alg, b"\x00" * size + struct.pack(">I", TPM2_CC.PolicyAuthorizeNV) + index_name)


def policy_b(alg: TPM2_ALG) -> bytes:
    size = hashlib.new(_HASHES[alg]).digest_size
    return _h(alg, b"\x00" * size + struct.pack(">I", TPM2_CC.PolicyOR)
              + policy_a(alg) + policy_c(alg))


def ek_policy(name_alg: TPM2_ALG, auth_policy: bytes) -> EkPolicy:
    """The steps that satisfy an EK template's authPolicy; ValueError if it is not a TCG one."""
    if name_alg not in _HASHES:
        raise ValueError(f"EK name algorithm {name_alg} is not supported")
    if auth_policy == policy_a(name_alg):
        return EkPolicy(name_alg)
    if auth_policy == policy_b(name_alg):
        return EkPolicy(name_alg, (policy_a(name_alg), policy_c(name_alg)))
    raise ValueError("the EK's authPolicy is neither TCG PolicyA nor PolicyB; "
                     "a vendor-specific EK policy is not supported")
