"""Object templates and policy arithmetic, all ECC P-256 (fast on real TPMs).

Pure: builds TPM structures, talks to no TPM.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from tpm2_pytss.constants import TPM2_ALG, TPM2_CC, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPML_PCR_SELECTION,
    TPMS_ECC_PARMS,
    TPMS_KEYEDHASH_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_KEYEDHASH_SCHEME,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

# Attributes that make a key provably TPM-resident: it was generated inside the
# TPM and can be neither duplicated nor moved to another parent.
RESIDENT = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN

AES128_CFB = TPMT_SYM_DEF_OBJECT(
    algorithm=TPM2_ALG.AES,
    keyBits=TPMU_SYM_KEY_BITS(aes=128),
    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
)
SESSION_AES128_CFB = TPMT_SYM_DEF(
    algorithm=TPM2_ALG.AES,
    keyBits=TPMU_SYM_KEY_BITS(aes=128),
    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
)
ECDSA_SHA256 = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
ECDSA_SHA256.details.any.hashAlg = TPM2_ALG.SHA256


def _ecc(attributes: TPMA_OBJECT, scheme: TPM2_ALG, symmetric: TPMT_SYM_DEF_OBJECT | None) -> (
    TPM2B_PUBLIC
):
    ecc_scheme = TPMT_ECC_SCHEME(scheme=scheme)
    if scheme != TPM2_ALG.NULL:
        ecc_scheme.details.anySig.hashAlg = TPM2_ALG.SHA256
    params = TPMS_ECC_PARMS(
        symmetric=symmetric or TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
        scheme=ecc_scheme,
        curveID=TPM2_ECC.NIST_P256,
        kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
    )
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=attributes,
            parameters=TPMU_PUBLIC_PARMS(eccDetail=params),
        )
    )


def same_key_template(public: TPM2B_PUBLIC, template: TPM2B_PUBLIC) -> bool:
    """Whether a key's public area was made from `template`: type, name algorithm,
    attributes and parameters equal (the unique field is the key's own)."""
    a, b = public.publicArea, template.publicArea
    return (a.type, a.nameAlg, int(a.objectAttributes)) == \
        (b.type, b.nameAlg, int(b.objectAttributes)) and \
        bytes(a.parameters.marshal(a.type)) == bytes(b.parameters.marshal(b.type)) and \
        bytes(a.authPolicy) == bytes(b.authPolicy)


def srk_template() -> TPM2B_PUBLIC:
    """The TCG Provisioning Guidance ECC P-256 storage root key (empty unique)."""
    return _ecc(
        RESIDENT | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.DECRYPT,
        TPM2_ALG.NULL,
        AES128_CFB,
    )


def ak_template() -> TPM2B_PUBLIC:
    """Attestation key: restricted signing, so it only signs TPM-generated structures."""
    return _ecc(
        RESIDENT | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT,
        TPM2_ALG.ECDSA,
        None,
    )


def identity_key_template() -> TPM2B_PUBLIC:
    """Device identity (LDevID) key: general signing, never leaves the TPM."""
    return _ecc(
        RESIDENT | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT,
        TPM2_ALG.ECDSA,
        None,
    )


def sealed_object_template(policy_digest: bytes) -> TPM2B_PUBLIC:
    """A keyed-hash data object released only under `policy_digest`.

    No USERWITHAUTH: the auth value alone can never unseal it, only the policy.
    """
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.KEYEDHASH,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA,
            authPolicy=policy_digest,
            parameters=TPMU_PUBLIC_PARMS(
                keyedHashDetail=TPMS_KEYEDHASH_PARMS(
                    scheme=TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.NULL)
                )
            ),
        )
    )


def pcr_selection(pcrs: Sequence[int], bank: str = "sha256") -> TPML_PCR_SELECTION:
    if not pcrs:
        raise ValueError("a PCR policy needs at least one PCR")
    for p in pcrs:
        if not 0 <= p <= 23:
            raise ValueError(f"PCR index {p} out of range 0..23")
    return TPML_PCR_SELECTION.parse(f"{bank}:{','.join(str(p) for p in sorted(set(pcrs)))}")


def pcr_policy_digest(selection: TPML_PCR_SELECTION, pcr_values: Sequence[bytes]) -> bytes:
    """TPM2_PolicyPCR's policy digest, from an empty policy (TPM 2.0 Part 3, 23.7).

    policyDigest' = H(policyDigest || TPM_CC_PolicyPCR || pcrs || H(values...))
    """
    pcr_digest = hashlib.sha256(b"".join(pcr_values)).digest()
    return hashlib.sha256(
        b"\x00" * 32 + struct.pack(">I", TPM2_CC.PolicyPCR) + selection.marshal() + pcr_digest
    ).digest()


def is_resident(public: TPM2B_PUBLIC) -> bool:
    attrs = public.publicArea.objectAttributes
    return (attrs & RESIDENT) == RESIDENT
