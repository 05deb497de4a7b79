"""Gathering facts about the TPM, the state directory and the clock.

This is the I/O half of diagnostics; checks.py and status.py judge the facts
without touching anything. The daemon gathers with its open TPM connection;
`devidctl check` gathers the same way with its own connection when the daemon
is down, so both report through one code path.
"""

from __future__ import annotations

import contextlib
import ctypes
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import DevidError
from agent.libc import libc
from agent.pki.certinfo import public_key_sha256, summarize
from agent.pki.ekchain import ChainVerdict, TrustStore, verify_ek_chain
from agent.tpm.custody import KeyInfo, TpmCustody
from agent.tpm.handles import TpmOccupancy
from agent.tpm.info import TpmInfo


@dataclass(frozen=True)
class EkFacts:
    kind: str
    nv_index: int
    certificate: dict[str, object]
    verdict: ChainVerdict


@dataclass(frozen=True)
class IdentityFacts:
    tpm_name: str
    public_key_sha256: str
    resident: bool


@dataclass
class TpmFacts:
    tcti: str
    info: TpmInfo | None = None
    error: DevidError | None = None  # set when the TPM could not be used at all
    endorsement: list[EkFacts] = field(default_factory=list)
    ek_error: DevidError | None = None
    identity: IdentityFacts | None = None
    identity_error: DevidError | None = None
    keys_destroyed: bool = False  # decommissioned on purpose
    occupancy: TpmOccupancy | None = None  # sessions and objects in the TPM

    @property
    def reachable(self) -> bool:
        return self.error is None and self.info is not None


def identity_facts(key: KeyInfo) -> IdentityFacts:
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    return IdentityFacts(
        tpm_name=key.name.hex(),
        public_key_sha256=public_key_sha256(load_der_public_key(key.public_key_der)),
        resident=key.resident,
    )


def endorsement_facts(custody: TpmCustody, trust: TrustStore) -> list[EkFacts]:
    """Read, match and verify every EK certificate (slow on real TPMs: cache it)."""
    chain = custody.ek_chain_certificates()
    return [
        EkFacts(ek.kind, ek.nv_index, summarize(ek.certificate),
                verify_ek_chain(ek.certificate, trust, chain))
        for ek in custody.endorsement_keys()
    ]


EndorsementResult = list[EkFacts] | DevidError


def try_endorsement_facts(custody: TpmCustody, trust: TrustStore) -> EndorsementResult:
    try:
        return endorsement_facts(custody, trust)
    except DevidError as e:
        return e


def collect_tpm_facts(custody: TpmCustody, trust: TrustStore,
                      endorsement: EndorsementResult | None = None,
                      occupancy: bool = False,
                      identity: IdentityFacts | None = None) -> TpmFacts:
    """Live facts; pass a cached `endorsement` to skip re-deriving the EKs, and cached
    `identity` facts to skip proving that the identity key loads (three TPM commands:
    status asks one, GetCapability, and leaves the proof to connecting and checks).
    `occupancy`: also count sessions and objects (two more: for checks, not status)."""
    facts = TpmFacts(tcti=custody.tcti)
    try:
        facts.info = custody.info()
    except DevidError as e:
        facts.error = e
        return facts
    if occupancy:
        with contextlib.suppress(DevidError):  # the counters are a bonus, not a check
            facts.occupancy = custody.occupancy()
    if endorsement is None:
        endorsement = try_endorsement_facts(custody, trust)
    if isinstance(endorsement, DevidError):
        facts.ek_error = endorsement
    else:
        facts.endorsement = endorsement
    if identity is not None:
        facts.identity = identity
        return facts
    try:
        facts.identity = identity_facts(custody.identity_key())
    except DevidError as e:
        facts.identity_error = e
    return facts


# --- state directory --------------------------------------------------------


@dataclass(frozen=True)
class PathFacts:
    path: str
    exists: bool
    is_dir: bool = False
    mode: int = 0
    uid: int = -1
    loose_files: tuple[str, ...] = ()  # files readable or writable by group/others


def collect_path_facts(path: Path) -> PathFacts:
    try:
        st = path.stat()
    except FileNotFoundError:
        return PathFacts(str(path), exists=False)
    loose: list[str] = []
    if stat.S_ISDIR(st.st_mode):
        for child in sorted(path.rglob("*")):
            try:
                cst = child.lstat()
            except OSError:
                continue
            if stat.S_ISREG(cst.st_mode) and cst.st_mode & 0o077:
                loose.append(f"{child} ({stat.filemode(cst.st_mode)})")
    return PathFacts(str(path), True, stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode),
                     st.st_uid, tuple(loose))


# --- clock ------------------------------------------------------------------

TIME_ERROR = 5  # adjtimex(2): clock not synchronized


class _Timex(ctypes.Structure):
    # struct timex is 208 bytes on 64-bit Linux; only `modes` (first field) is
    # read by the kernel when it is 0, so an opaque buffer of that size is enough.
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 204)]


def clock_synchronized() -> bool | None:
    """The kernel's NTP sync status; None when it cannot be asked."""
    c = libc()
    if c is None:
        return None
    try:
        state = c.adjtimex(ctypes.byref(_Timex()))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != TIME_ERROR


@dataclass(frozen=True)
class ClockFacts:
    now: float
    synchronized: bool | None
    registrar_offset: float | None = None  # the registrar's clock minus ours, seconds
    offset_authenticated: bool = True  # False: read from a response TLS could not verify


def collect_clock_facts(verified: float | None = None, unverified: float | None = None,
                        remembered: float | None = None) -> ClockFacts:
    """The local clock, and its offset from the registrar's by the freshest measurement:
    one just verified, else one just read over TLS that failed on a date, else the one
    the agent remembers (which may predate a clock jump)."""
    if verified is not None or unverified is None:
        offset, authenticated = (verified if verified is not None else remembered), True
    else:
        offset, authenticated = unverified, False
    return ClockFacts(time.time(), clock_synchronized(), offset, authenticated)

