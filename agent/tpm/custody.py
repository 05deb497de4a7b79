"""TPM key custody: the only code that talks to the TPM (through tpm2-pytss ESAPI).

Objects and their lifetimes:

- SRK (storage root key): an ECC primary re-derived once per process and kept
  loaded. Its name is pinned in state on first use, so a cleared or swapped
  TPM is noticed instead of silently producing new keys. It also salts our
  sessions.
- AK (restricted signing) and identity key (LDevID signing key): children of
  the SRK created once; their wrapped blobs live in STATE_DIR/tpm and are
  loaded for each operation and flushed right after. A bare TPM has room for
  only three loaded objects, and handles never pile up.
- EKs: re-derived on demand from the TCG templates and flushed after use.

Sessions are started per command and flushed in `finally`, also when the
command fails. A process that is killed cannot flush: behind a resource
manager (/dev/tpmrm0, tabrmd) the kernel or broker does it; with direct
access (/dev/tpm0, swtpm, mssim) the agent is the TPM's only user, so on
connecting it flushes the transient objects and sessions a killed
predecessor left, instead of failing with "out of memory for object
contexts" a few restarts later. Commands that carry secrets in or out (seal, unseal) run in a
salted session with AES-CFB parameter encryption, so a bus sniffer sees only
ciphertext.

An instance is not thread-safe; the daemon confines it to one worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TSS2_LOG", "all+NONE")  # the TSS would print to stderr; we log ourselves

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HC,
    TPM2_PT,
    TPM2_RC,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPMA_SESSION,
)
from tpm2_pytss.cryptography import tpm_ecc_private_key
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPML_DIGEST,
    TPML_DIGEST_VALUES,
    TPMS_SENSITIVE_CREATE,
    TPMT_HA,
    TPMT_SIGNATURE,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
    TPMU_HA,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from agent import faults
from agent.codec import unmarshal_exact
from agent.errors import (
    AccessDenied,
    ConfigError,
    DevidError,
    EkCertificateMissing,
    KeyBlobMismatch,
    PcrPolicyMismatch,
    ProtocolError,
    StateError,
    TpmError,
    TpmUnreachable,
)
from agent.pki.ekchain import split_der_certificates
from agent.secret import SecretBytes
from agent.tpm import templates
from agent.tpm.blobs import BlobStore, KeyBlob
from agent.tpm.ek import (
    EK_CHAIN_FIRST,
    EK_CHAIN_LAST,
    EK_PREFERENCE,
    EndorsementKey,
    cert_index,
    check_ek,
)
from agent.tpm.ekpolicy import ek_policy
from agent.tpm.handles import (
    PT_VAR_PROPERTIES,
    STALE_HANDLE_LISTS,
    TRANSIENT_FIRST,
    TpmOccupancy,
    describe_flushed,
    flushable,
)
from agent.tpm.info import TpmInfo
from agent.tpm.rc import base_error, translate
from agent.tpm.tcti import behind_resource_manager, parse_tcti

log = logging.getLogger(__name__)

AK_BLOB = "ak"
IDENTITY_BLOB = "identity"
SRK_NAME_FILE = "srk.name"
MAX_SEALED_BYTES = 128  # TPM2B_SENSITIVE_DATA limit
MAX_CAP_HANDLES = 64  # asked per GetCapability; more than any TPM has slots
MAX_FLUSH_ROUNDS = 16  # pages of stale handles per kind (each round flushes one page)

def _unreachable_hint(tcti: str) -> str:
    """What to check for this TCTI; the generic hint if it does not even parse."""
    try:
        return parse_tcti(tcti).unreachable_hint()
    except ValueError:
        return TpmUnreachable.default_hint


@dataclass(frozen=True)
class Signature:
    """A TPM signature, as the TPM produced it and as DER for X.509 consumers."""

    tpmt: bytes  # marshalled TPMT_SIGNATURE
    der: bytes


@dataclass(frozen=True)
class Attestation:
    """A TPMS_ATTEST produced by the TPM (quote or certify) and the AK's signature on it."""

    attest: bytes  # marshalled TPMS_ATTEST (the bytes that were signed)
    signature: Signature


@dataclass(frozen=True)
class KeyInfo:
    name: bytes  # TPM name: nameAlg || H(public area)
    public: TPM2B_PUBLIC
    resident: bool

    @property
    def public_key_der(self) -> bytes:
        return bytes(self.public.to_der())


def _signature(sig: TPMT_SIGNATURE) -> Signature:
    if sig.sigAlg != TPM2_ALG.ECDSA:
        raise TpmError(f"unexpected signature algorithm {sig.sigAlg} from the TPM")
    r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
    s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
    return Signature(tpmt=bytes(sig.marshal()), der=encode_dss_signature(r, s))


class TpmCustody:
    """Keys that live in one TPM, and the operations on them."""

    def __init__(self, esapi: ESAPI, tcti: str, state_dir: Path,
                 srk_handle: int | None = None) -> None:
        self._esapi = esapi
        self.tcti = tcti
        self._blobs = BlobStore(state_dir / "tpm")
        self._srk: ESYS_TR | None = None
        self.srk_handle = srk_handle  # persistent SRK, if configured
        self._srk_persistent = False
        self._readonly = False
        # What the TPM's NV and EK seeds say cannot change while we are connected: read
        # once per connection (each EK is a CreatePrimary, seconds for RSA on hardware).
        self._eks: list[EndorsementKey] | None = None
        self._ek_chain: list[x509.Certificate] | None = None

    # --- lifecycle ----------------------------------------------------------

    @classmethod
    def open(cls, tcti: str, state_dir: Path, readonly: bool = False,
             create_keys: bool = True, srk_handle: int | None = None) -> TpmCustody:
        """Connect, load the SRK, and create the AK and identity key on first use.

        `readonly` (diagnostics from outside the daemon): create nothing, write nothing.
        `create_keys=False` (a decommissioned gateway): pin the SRK, make no keys.
        """
        try:
            esapi = ESAPI(tcti)
        except TSS2_Exception as e:
            raise TpmUnreachable(f"cannot open TPM via TCTI {tcti!r}: {e}",
                                 hint=_unreachable_hint(tcti), rc=int(e.rc)) from None
        custody = cls(esapi, tcti, state_dir, srk_handle)
        try:
            # Read-only users (devidctl check with the daemon down) observe the TPM as
            # they find it: what a dead process left is what they are there to see.
            if not readonly and not behind_resource_manager(tcti):
                custody._flush_stale_handles()
            custody._readonly = readonly
            custody._load_srk(pin=not readonly)
            if not readonly and create_keys:
                custody._ensure_key(AK_BLOB, templates.ak_template())
                custody._ensure_key(IDENTITY_BLOB, templates.identity_key_template())
        except BaseException:
            custody.close()
            raise
        return custody

    def close(self) -> None:
        if self._esapi is None:
            return
        if self._srk is not None:
            with contextlib.suppress(TSS2_Exception):
                if self._srk_persistent:
                    self._esapi.tr_close(self._srk)  # stays in the TPM: forget it here only
                else:
                    self._esapi.flush_context(self._srk)
            self._srk = None
        with contextlib.suppress(TSS2_Exception):
            self._esapi.close()
        self._esapi = None  # type: ignore[assignment]

    def __enter__(self) -> TpmCustody:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _flush_stale_handles(self) -> None:
        """Flush the sessions and transient objects a killed process left in the TPM
        (only without a resource manager, which does it for us). Ours are not yet made."""
        counts: dict[str, int] = {}
        with self._tpm("flushing stale TPM handles") as tpm:
            for kind, first in STALE_HANDLE_LISTS:
                for _ in range(MAX_FLUSH_ROUNDS):  # flushed handles leave the list: re-ask
                    flushed = 0
                    for handle in self._handles(first):
                        with contextlib.suppress(TSS2_Exception):
                            tpm.flush_context(tpm.tr_from_tpmpublic(handle))
                            flushed += 1
                    counts[kind] = counts.get(kind, 0) + flushed
                    if not flushed:
                        break
        if any(counts.values()):
            log.warning("flushed %s left in the TPM by a process that did not exit cleanly",
                        describe_flushed(counts))

    def _handles(self, first: int) -> list[int]:
        """The handles GetCapability lists from `first` (of whatever type the TPM puts in
        that list: see agent.tpm.handles), sessions and transient objects only."""
        with self._tpm(f"listing TPM handles from 0x{first:08x}") as tpm:
            _, data = tpm.get_capability(TPM2_CAP.HANDLES, first, MAX_CAP_HANDLES)
        return [h for h in (int(h) for h in data.data.handles) if flushable(h)]

    def occupancy(self) -> TpmOccupancy:
        """Sessions and transient objects in the TPM now, and how many more fit."""
        with self._tpm("reading TPM resource counters") as tpm:
            _, data = tpm.get_capability(TPM2_CAP.TPM_PROPERTIES, PT_VAR_PROPERTIES[0],
                                         len(PT_VAR_PROPERTIES))
        props = {int(p.property): int(p.value) for p in data.data.tpmProperties}
        transient = len(self._handles(TRANSIENT_FIRST))
        return TpmOccupancy.from_properties(props, transient)

    @contextlib.contextmanager
    def _tpm(self, action: str) -> Iterator[ESAPI]:
        """Run TPM commands, turning TSS failures into typed errors."""
        if self._esapi is None:
            raise TpmUnreachable(f"{action}: the TPM connection is closed")
        try:
            yield self._esapi
        except TSS2_Exception as e:
            error = translate(e, action)
            if isinstance(error, TpmUnreachable):
                error.hint = _unreachable_hint(self.tcti)
            raise error from None

    # --- storage root key ---------------------------------------------------

    def _load_srk(self, pin: bool) -> None:
        found = self._persistent_srk() if self.srk_handle is not None else None
        if found is not None:
            handle, public = found
            self._srk_persistent = True
        else:
            with self._tpm("creating the storage root key") as tpm:
                handle, public, _, _, _ = tpm.create_primary(
                    TPM2B_SENSITIVE_CREATE(), templates.srk_template(), ESYS_TR.OWNER
                )
            if self.srk_handle is not None and pin:
                handle = self._persist_srk(handle)
        self._srk = handle
        name = bytes(public.get_name().marshal())
        try:
            pinned = self._blobs.load_bytes(SRK_NAME_FILE)
        except AccessDenied:
            if pin:
                raise
            # Looking from outside (devidctl as another user): the TPM is still worth
            # describing; the key checks say the state is not ours to read.
            return
        if pinned is None and pin:
            self._blobs.save_bytes(SRK_NAME_FILE, name.hex().encode() + b"\n")
        elif pinned is not None and pinned.strip() != name.hex().encode():
            raise KeyBlobMismatch(
                "this TPM's storage root key differs from the one the stored keys were made "
                "under (TPM cleared, replaced, or state copied from another device)"
            )

    def _persistent_srk(self) -> tuple[ESYS_TR, TPM2B_PUBLIC] | None:
        """The SRK at srk_handle (one ReadPublic), or None if nothing is there yet."""
        assert self.srk_handle is not None
        where = f"0x{self.srk_handle:08x}"
        try:
            handle = self._esapi.tr_from_tpmpublic(self.srk_handle)
        except TSS2_Exception as e:
            if base_error(int(e.rc)) == TPM2_RC.HANDLE:
                return None
            raise translate(e, f"reading the storage root key at {where}") from None
        with self._tpm(f"reading the storage root key at {where}") as tpm:
            public, _, _ = tpm.read_public(handle)
        if not templates.same_key_template(public, templates.srk_template()):
            with contextlib.suppress(TSS2_Exception):
                self._esapi.tr_close(handle)
            raise ConfigError(
                f"[tpm] srk_handle: {where} holds a key that is not devid-agent's storage root "
                "key (the TCG ECC P-256 SRK template)",
                f"choose a free handle, or evict that key if nothing needs it "
                f"(`tpm2_evictcontrol -C o -c {where}`)")
        return handle, public

    def _persist_srk(self, transient: ESYS_TR) -> ESYS_TR:
        """EvictControl: keep the SRK at srk_handle; later starts read it (no CreatePrimary)."""
        assert self.srk_handle is not None
        where = f"0x{self.srk_handle:08x}"
        try:
            with self._tpm(f"making the storage root key persistent at {where}") as tpm:
                persistent = tpm.evict_control(ESYS_TR.OWNER, transient, self.srk_handle)
        finally:
            with contextlib.suppress(TSS2_Exception):
                self._esapi.flush_context(transient)
        self._srk_persistent = True
        log.info("storage root key made persistent at %s", where)
        return persistent

    # --- child keys ---------------------------------------------------------

    def _ensure_key(self, name: str, template: TPM2B_PUBLIC) -> None:
        if self._blobs.load(name) is not None:
            return
        with self._tpm(f"creating the {name} key") as tpm:
            private, public, _, _, _ = tpm.create(self._srk, TPM2B_SENSITIVE_CREATE(), template)
        self._blobs.save(name, KeyBlob(bytes(public.marshal()), bytes(private.marshal())))
        log.info("created %s key in the TPM", name)

    def forget_keys(self) -> None:
        """Destroy the AK and identity key (decommissioning).

        They are never persistent in the TPM (no NV or persistent handle to
        evict) and are flushed after each use; what makes them usable is the
        SRK-wrapped blob, so deleting the blobs destroys the keys for good.
        """
        for name in (IDENTITY_BLOB, AK_BLOB):
            self._blobs.remove(name)

    def _blob(self, name: str) -> KeyBlob:
        blob = self._blobs.load(name)
        if blob is None:
            raise StateError(f"no {name} key blob in {self._blobs.directory}")
        return blob

    @contextlib.contextmanager
    def _loaded(self, blob: KeyBlob, what: str) -> Iterator[ESYS_TR]:
        with self._tpm(f"loading the {what}") as tpm:
            try:
                handle = tpm.load(self._srk, blob.tpm_private(), blob.tpm_public())
            except TSS2_Exception as e:
                if e.error in (TPM2_RC.INTEGRITY, TPM2_RC.BINDING, TPM2_RC.SIZE, TPM2_RC.VALUE):
                    raise KeyBlobMismatch(f"the stored {what} does not load: {e}",
                                          rc=int(e.rc)) from None
                raise
        try:
            yield handle
        finally:
            with contextlib.suppress(TSS2_Exception):
                self._esapi.flush_context(handle)

    def key_info(self, name: str) -> KeyInfo:
        """Name and public area of a stored key, after proving it loads in this TPM."""
        blob = self._blob(name)
        with self._loaded(blob, f"{name} key") as handle, self._tpm("reading key") as tpm:
            public, tpm_name, _ = tpm.read_public(handle)
        return KeyInfo(bytes(tpm_name), public, templates.is_resident(public))

    def stored_key(self, name: str) -> KeyInfo:
        """Name and public area of a stored key from its blob alone: no TPM command.
        What connecting proved (key_info) holds for the connection; the registrar
        checks the rest (TPM2_Certify, signatures)."""
        public = self._blob(name).tpm_public()
        return KeyInfo(bytes(public.get_name().marshal()), public, templates.is_resident(public))

    def identity_key(self) -> KeyInfo:
        return self.key_info(IDENTITY_BLOB)

    def attestation_key(self) -> KeyInfo:
        return self.key_info(AK_BLOB)

    # --- signing and attestation ---------------------------------------------

    def sign(self, data: bytes) -> Signature:
        """ECDSA-SHA256 over `data` with the identity key (hashing done here)."""
        digest = hashlib.sha256(data).digest()
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with self._loaded(self._blob(IDENTITY_BLOB), "identity key") as key, \
                self._tpm("signing with the identity key") as tpm:
            sig = tpm.sign(key, digest, templates.ECDSA_SHA256, ticket)
        return _signature(sig)

    def quote(self, nonce: bytes, pcrs: Sequence[int]) -> Attestation:
        selection = templates.pcr_selection(pcrs)
        with self._loaded(self._blob(AK_BLOB), "attestation key") as ak, \
                self._tpm("quoting PCRs") as tpm:
            attest, sig = tpm.quote(ak, selection, nonce, templates.ECDSA_SHA256)
        return Attestation(bytes(attest.attestationData), _signature(sig))

    def certify_identity(self, nonce: bytes) -> Attestation:
        """TPM2_Certify: the AK vouches that the identity key lives in this TPM."""
        with self._loaded(self._blob(IDENTITY_BLOB), "identity key") as key, \
                self._loaded(self._blob(AK_BLOB), "attestation key") as ak, \
                self._tpm("certifying the identity key") as tpm:
            attest, sig = tpm.certify(key, ak, nonce, templates.ECDSA_SHA256)
        return Attestation(bytes(attest.attestationData), _signature(sig))

    def identity_csr(self) -> bytes:
        """A PKCS#10 request (DER) for the identity key, signed inside the TPM.

        The subject is left empty: the registrar builds the certificate's
        subject and SANs itself and uses the CSR only as proof of possession.
        """
        with self._loaded(self._blob(IDENTITY_BLOB), "identity key") as key, \
                self._tpm("signing a certificate request with the identity key") as tpm:
            signer = tpm_ecc_private_key(tpm, key)
            csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
                signer, hashes.SHA256())
        return csr.public_bytes(serialization.Encoding.DER)

    # --- credential activation ----------------------------------------------

    def activate_credential(self, ek: EndorsementKey, credential_blob: bytes,
                            encrypted_secret: bytes) -> SecretBytes:
        """TPM2_ActivateCredential: recover a registrar's secret bound to our AK and EK.

        Only the TPM holding both the EK (which decrypts the seed) and a loaded
        object with the AK's name can release it: this is the proof that the AK
        lives in the TPM whose EK certificate we presented.
        """
        blob = unmarshal_exact(TPM2B_ID_OBJECT, credential_blob, "credential blob")
        secret = unmarshal_exact(TPM2B_ENCRYPTED_SECRET, encrypted_secret, "encrypted secret")
        template = ek.template.publicArea
        try:
            policy = ek_policy(template.nameAlg, bytes(template.authPolicy))
        except ValueError as e:
            raise TpmError(f"{ek.kind}: {e}") from None
        with self._tpm(f"recreating {ek.kind}") as tpm:
            ek_handle, _, _, _, _ = tpm.create_primary(
                TPM2B_SENSITIVE_CREATE(), ek.template, ESYS_TR.ENDORSEMENT)
        try:
            with self._loaded(self._blob(AK_BLOB), "attestation key") as ak, \
                    self._session(TPM2_SE.POLICY, TPMA_SESSION.ENCRYPT,
                                  auth_hash=policy.hash_alg) as session, \
                    self._tpm("activating the registrar's credential") as tpm:
                tpm.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
                faults.point("custody.activate_credential.session")  # tests: killed here
                if policy.or_branches:
                    tpm.policy_or(session, TPML_DIGEST(list(policy.or_branches)))
                cert_info = tpm.activate_credential(ak, ek_handle, blob, secret,
                                                    session1=ESYS_TR.PASSWORD,
                                                    session2=session)
        finally:
            with contextlib.suppress(TSS2_Exception):
                self._esapi.flush_context(ek_handle)
        return SecretBytes(bytes(cert_info))

    # --- PCRs ---------------------------------------------------------------

    def read_pcrs(self, pcrs: Sequence[int]) -> list[bytes]:
        """Current sha256 values of `pcrs`, in ascending PCR order."""
        wanted = sorted(set(pcrs))
        values: list[bytes] = []
        with self._tpm("reading PCRs") as tpm:
            for i in range(0, len(wanted), 8):  # TPM2_PCR_Read returns at most 8 digests
                chunk = wanted[i:i + 8]
                _, _, digests = tpm.pcr_read(templates.pcr_selection(chunk))
                if len(digests) != len(chunk):
                    raise TpmError(
                        f"the TPM returned {len(digests)} of {len(chunk)} PCR values; is the "
                        "sha256 PCR bank allocated?"
                    )
                values.extend(bytes(d) for d in digests)
        return values

    def extend_pcr(self, index: int, data: bytes) -> None:
        """Measure `data` into PCR `index` (sha256 bank)."""
        digests = TPML_DIGEST_VALUES(
            [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=hashlib.sha256(data).digest()))]
        )
        templates.pcr_selection([index])  # range check
        with self._tpm(f"extending PCR {index}") as tpm:
            tpm.pcr_extend(getattr(ESYS_TR, f"PCR{index}"), digests)

    # --- sealing ------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self, kind: TPM2_SE, attributes: TPMA_SESSION,
                 auth_hash: TPM2_ALG = TPM2_ALG.SHA256) -> Iterator[ESYS_TR]:
        """A session salted to the (pinned) SRK, with AES-128-CFB parameter encryption."""
        with self._tpm("starting an encrypted session") as tpm:
            session = tpm.start_auth_session(
                tpm_key=self._srk, bind=ESYS_TR.NONE, session_type=kind,
                symmetric=TPMT_SYM_DEF(
                    algorithm=TPM2_ALG.AES,
                    keyBits=templates.SESSION_AES128_CFB.keyBits,
                    mode=templates.SESSION_AES128_CFB.mode,
                ),
                auth_hash=auth_hash,
            )
            tpm.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION | attributes)
        try:
            yield session
        finally:
            with contextlib.suppress(TSS2_Exception):
                self._esapi.flush_context(session)

    def seal(self, secret: SecretBytes, pcrs: Sequence[int]) -> KeyBlob:
        """Seal `secret` so that only this TPM, with `pcrs` as they are now, releases it."""
        if not 0 < len(secret) <= MAX_SEALED_BYTES:
            raise ValueError(f"a sealed secret must be 1..{MAX_SEALED_BYTES} bytes")
        selection = templates.pcr_selection(pcrs)
        values = self.read_pcrs(pcrs)
        policy = templates.pcr_policy_digest(selection, values)
        sensitive = TPM2B_SENSITIVE_CREATE(
            TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(secret.reveal()))
        )
        with self._session(TPM2_SE.HMAC, TPMA_SESSION.DECRYPT) as session, \
                self._tpm("sealing a secret") as tpm:
            private, public, _, _, _ = tpm.create(
                self._srk, sensitive, templates.sealed_object_template(policy), session1=session
            )
        return KeyBlob.sealed(bytes(public.marshal()), bytes(private.marshal()),
                              sorted(set(pcrs)), values)

    def unseal(self, blob: KeyBlob) -> SecretBytes:
        """Release a sealed secret; PcrPolicyMismatch names the PCRs that changed."""
        if blob.pcr_bank is None:
            raise StateError("this blob is not a sealed secret (no PCR policy recorded)")
        selection = templates.pcr_selection(blob.pcrs)
        with self._loaded(blob, "sealed secret") as item, \
                self._session(TPM2_SE.POLICY, TPMA_SESSION.ENCRYPT) as session:
            try:
                with self._tpm("unsealing a secret") as tpm:
                    tpm.policy_pcr(session, b"", selection)
                    faults.point("custody.unseal.session")  # tests: killed here
                    data = tpm.unseal(item, session1=session)
            except PcrPolicyMismatch as e:
                changed = self._changed_pcrs(blob)
                raise PcrPolicyMismatch(
                    f"unsealing refused by the TPM: PCR policy not satisfied; changed since "
                    f"sealing: {changed}", rc=e.rc) from None
        return SecretBytes(bytes(data))

    def _changed_pcrs(self, blob: KeyBlob) -> str:
        try:
            now = self.read_pcrs(blob.pcrs)
        except TpmError:
            return "unknown (PCRs unreadable)"
        changed = [f"sha256:{p}" for p, old, new in zip(blob.pcrs, blob.pcr_values, now,
                                                          strict=True) if old != new]
        return ", ".join(changed) or "none (sealed under different values)"

    # --- information and endorsement ----------------------------------------

    def info(self) -> TpmInfo:
        props: dict[int, int] = {}
        with self._tpm("reading TPM properties") as tpm:
            more, prop = True, int(TPM2_PT.FIXED)
            while more:
                more, data = tpm.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, 64)
                items = list(data.data.tpmProperties)
                for p in items:
                    props[int(p.property)] = int(p.value)
                if not items:
                    break
                prop = int(items[-1].property) + 1
                if prop > int(TPM2_PT.FIXED) + 0xFF:
                    break
        return TpmInfo.from_properties(props)

    def _nv_indices(self) -> set[int]:
        indices: set[int] = set()
        with self._tpm("listing NV indices") as tpm:
            more, start = True, int(TPM2_HC.NV_INDEX_FIRST)
            while more:
                more, data = tpm.get_capability(TPM2_CAP.HANDLES, start, 64)
                handles = [int(h) for h in data.data.handles]
                indices.update(handles)
                if not handles:
                    break
                start = handles[-1] + 1
        return indices

    def _nv_read(self, index: int) -> bytes:
        with self._tpm(f"reading NV index 0x{index:08x}") as tpm:
            handle = tpm.tr_from_tpmpublic(index)
            try:
                nv_public, _ = tpm.nv_read_public(handle)
                size = int(nv_public.nvPublic.dataSize)
                out = b""
                while len(out) < size:
                    chunk = min(512, size - len(out))
                    out += bytes(tpm.nv_read(handle, chunk, len(out), auth_handle=handle))
            finally:
                with contextlib.suppress(TSS2_Exception):
                    tpm.tr_close(handle)
        return out

    def endorsement_keys(self, limit: int | None = None) -> list[EndorsementKey]:
        """Every EK that has a certificate in NV (the first `limit` in EK_PREFERENCE order),
        each checked against its recreated key.

        Raises EkCertificateMissing if there is none, EkMismatch if one does not match.
        Remembered for the connection once all are known.
        """
        if self._eks is not None:
            return self._eks[:limit]
        present = self._nv_indices()

        def reader(i: int) -> bytes:
            if int(i) not in present:
                raise NoSuchIndex(int(i))
            return self._nv_read(int(i))

        result: list[EndorsementKey] = []
        for kind in EK_PREFERENCE:
            index = cert_index(kind)
            if index not in present:
                continue
            der, template = create_ek_template(kind, reader)
            # The DER length, not stripping, finds the end: NV may be padded, and
            # a certificate may itself end in 0x00.
            where = f"{kind}: NV index 0x{index:08x}"
            try:
                certs = split_der_certificates(bytes(der), where)
            except ProtocolError as e:
                raise TpmError(e.message) from None
            if len(certs) != 1:
                raise TpmError(f"{where}: expected one X.509 certificate, found {len(certs)}")
            cert = certs[0]
            public = self._remembered_ek(kind, template, cert) or self._recreate_ek(kind,
                                                                                  template)
            check_ek(kind, public, cert)
            result.append(EndorsementKey(kind, index, cert, template, public))
            if limit is not None and len(result) >= limit:
                break
        if not result:
            raise EkCertificateMissing("no EK certificate found in the TPM's NV indices")
        if limit is None:
            self._eks = result
        return result

    def _remembered_ek(self, kind: str, template: TPM2B_PUBLIC,
                       cert: x509.Certificate) -> TPM2B_PUBLIC | None:
        """The EK's public area as recreated before (STATE_DIR/tpm/ek-KIND.public), if it
        still fits this template and certificate. A start then costs no CreatePrimary of
        the EK (seconds for RSA on hardware); activating a credential still recreates it,
        and the SRK, re-read at every start, is what ties the state to this TPM."""
        data = self._blobs.load_bytes(f"ek-{kind}.public")
        if data is None:
            return None
        try:
            public, used = TPM2B_PUBLIC.unmarshal(data)
            if used != len(data) or not templates.same_key_template(public, template):
                return None
            check_ek(kind, public, cert)
        except (DevidError, TSS2_Exception, ValueError):
            return None
        return public

    def _recreate_ek(self, kind: str, template: TPM2B_PUBLIC) -> TPM2B_PUBLIC:
        with self._tpm(f"recreating {kind}") as tpm:
            handle, public, _, _, _ = tpm.create_primary(
                TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
            )
            tpm.flush_context(handle)
        if not self._readonly:
            with contextlib.suppress(OSError, DevidError):  # an optimisation, not state
                self._blobs.save_bytes(f"ek-{kind}.public", bytes(public.marshal()))
        return public

    def ek_chain_certificates(self) -> list[x509.Certificate]:
        """Intermediate CA certificates stored in the TCG EK-chain NV range (read once per
        connection)."""
        if self._ek_chain is not None:
            return list(self._ek_chain)
        certs: list[x509.Certificate] = []
        for index in sorted(self._nv_indices()):
            if EK_CHAIN_FIRST <= index <= EK_CHAIN_LAST:
                certs.extend(split_der_certificates(self._nv_read(index),
                                                    f"NV index 0x{index:08x}"))
        self._ek_chain = certs
        return list(certs)

