"""TPM-related logic that needs no TPM: error mapping, templates, blobs, info."""

import base64
import hashlib
import json
import struct

import pytest
from tpm2_pytss.constants import TPM2_CC, TPMA_OBJECT

from agent.errors import (
    PcrPolicyMismatch,
    StateError,
    TpmBusy,
    TpmError,
    TpmLockout,
    TpmUnreachable,
)
from agent.tpm import templates
from agent.tpm.blobs import BlobStore, KeyBlob
from agent.tpm.info import TpmInfo
from agent.tpm.rc import base_error, classify


@pytest.mark.parametrize("rc, cls", [
    (0x000A000A, TpmUnreachable),   # TSS2_TCTI_RC_IO_ERROR
    (0x000B0001, TpmUnreachable),   # resource manager layer failure
    (0x00000921, TpmLockout),       # TPM_RC_LOCKOUT
    (0x000C0921, TpmLockout),       # ... relayed by tpm2-abrmd
    (0x00000922, TpmBusy),          # TPM_RC_RETRY
    (0x0000099D, PcrPolicyMismatch),  # TPM_RC_POLICY_FAIL, session 1
    (0x00000128, PcrPolicyMismatch),  # TPM_RC_PCR_CHANGED
    (0x00070001, TpmError),         # an ESAPI-layer error
])
def test_classify(rc, cls):
    err = classify(rc, "doing a thing", "decoded text")
    assert type(err) is cls
    assert err.hint and err.rc == rc and "doing a thing" in err.message
    assert err.to_dict()["tpm_rc"] == f"0x{rc:08x}"


def test_out_of_slots_hint_mentions_leak():
    assert "leaking handles" in classify(0x00000902, "load", "object memory").hint


def test_base_error_strips_session_and_parameter_numbers():
    assert base_error(0x0000099D) == 0x9D
    assert base_error(0x000001C4) == 0x84  # TPM_RC_VALUE on parameter 1
    assert base_error(0x00000921) == 0x921


def test_templates_make_resident_ecc_keys():
    for t in (templates.ak_template(), templates.identity_key_template(),
              templates.srk_template()):
        assert templates.is_resident(t)
    assert templates.ak_template().publicArea.objectAttributes & TPMA_OBJECT.RESTRICTED
    sealed = templates.sealed_object_template(b"\x00" * 32)
    assert not sealed.publicArea.objectAttributes & TPMA_OBJECT.USERWITHAUTH


def test_pcr_policy_digest_matches_spec_formula():
    sel = templates.pcr_selection([16])
    value = b"\x11" * 32
    expected = hashlib.sha256(
        b"\x00" * 32 + struct.pack(">I", 0x17F) + sel.marshal() + hashlib.sha256(value).digest()
    ).digest()
    assert int(TPM2_CC.PolicyPCR) == 0x17F
    assert templates.pcr_policy_digest(sel, [value]) == expected


@pytest.mark.parametrize("pcrs", [[], [24], [-1]])
def test_pcr_selection_rejects_bad_indices(pcrs):
    with pytest.raises(ValueError):
        templates.pcr_selection(pcrs)


def _blob_bytes():
    pub = templates.identity_key_template().marshal()
    priv = struct.pack(">H", 4) + b"abcd"
    return bytes(pub), priv


def test_blob_roundtrip_and_sealed_policy(tmp_path):
    pub, priv = _blob_bytes()
    store = BlobStore(tmp_path / "tpm")
    store.save("identity", KeyBlob(pub, priv))
    assert store.load("identity") == KeyBlob(pub, priv)
    sealed = KeyBlob.sealed(pub, priv, [16], [b"\x01" * 32])
    store.save("tls", sealed)
    assert store.load("tls") == sealed
    assert (tmp_path / "tpm" / "tls.json").stat().st_mode & 0o777 == 0o600
    assert store.load("absent") is None


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: "not json", "not valid JSON"),
    (lambda d: [], "expected a JSON object"),
    (lambda d: {**d, "version": 9}, "unsupported format version 9"),
    (lambda d: {**d, "public": "!!"}, "public: not valid base64"),
    (lambda d: {**d, "public": 5}, "public: expected a base64 string"),
    (lambda d: {**d, "public": base64.b64encode(b"\x00\x30abc").decode()},
     "not a valid TPM2B_PUBLIC"),
    (lambda d: {**d, "private": base64.b64encode(b"\x00\x02abcd").decode()}, "trailing bytes"),
    (lambda d: {**d, "pcr_policy": {"bank": "sha1", "pcrs": [1], "values_at_seal": ["00"]}},
     "bank"),
    (lambda d: {**d, "pcr_policy": {"bank": "sha256", "pcrs": [99], "values_at_seal": ["00"]}},
     "pcrs"),
    (lambda d: {**d, "pcr_policy": {"bank": "sha256", "pcrs": [1], "values_at_seal": ["zz"]}},
     "hex"),
])
def test_damaged_blob_files_give_state_error_naming_file(tmp_path, mutate, needle):
    pub, priv = _blob_bytes()
    doc = json.loads(KeyBlob(pub, priv).to_json())
    path = tmp_path / "identity.json"
    path.write_text(json.dumps(mutate(doc)) if not isinstance(mutate(doc), str) else "not json")
    with pytest.raises(StateError) as exc:
        BlobStore(tmp_path).load("identity")
    assert str(path) in exc.value.message and needle in exc.value.message


def test_tpm_info_decodes_vendor_properties():
    info = TpmInfo.from_properties({
        0x105: 0x49465800,  # "IFX"
        0x106: 0x534C4239, 0x107: 0x36373200, 0x108: 0, 0x109: 0,  # "SLB9672"
        0x10B: 0x0010000F, 0x10C: 0, 0x102: 164, 0x10E: 3,
    })
    assert info.manufacturer == "Infineon" and info.manufacturer_id == "IFX"
    assert info.vendor_string == "SLB9672"
    assert info.firmware_version.startswith("16.15 ")
    assert info.spec_version == "2.0 rev 1.64"
