"""TPM handles a dead process may leave behind, and how full the TPM is. Pure.

TPM 2.0 Part 2, 7.2 (TPM_HT) and 6.13 (TPM_PT_HR_*). Without a resource manager
(swtpm, /dev/tpm0) the TPM keeps what a killed client loaded: transient objects
and sessions. TPM2_GetCapability(TPM_CAP_HANDLES) lists them by the type of the
first handle asked for, and the list is not of that type alone: asking from
0x02000000 lists every *loaded* session, HMAC (0x02…) and policy (0x03…) alike,
and asking from 0x03000000 lists every *saved* session, whatever its handle. So
the handles are taken as the TPM answers, never filtered by the first one's type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

HT_LOADED_SESSION = 0x02  # also TPM_HT_HMAC_SESSION
HT_SAVED_SESSION = 0x03  # also TPM_HT_POLICY_SESSION
HT_TRANSIENT = 0x80

TRANSIENT_FIRST = HT_TRANSIENT << 24
# (what the list holds, the first handle to ask GetCapability for)
STALE_HANDLE_LISTS = (
    ("transient object", TRANSIENT_FIRST),
    ("loaded session", HT_LOADED_SESSION << 24),
    ("saved session", HT_SAVED_SESSION << 24),
)

# TPM_PT_HR_* (PT_VAR group): what is in use now and how much more fits.
PT_HR_LOADED = 0x203  # sessions loaded in TPM RAM
PT_HR_LOADED_AVAIL = 0x204  # more sessions that could be loaded
PT_HR_ACTIVE = 0x205  # sessions tracked: loaded and saved
PT_HR_ACTIVE_AVAIL = 0x206  # more sessions that could be started
PT_HR_TRANSIENT_AVAIL = 0x207  # more transient objects that could be loaded (estimate)
PT_VAR_PROPERTIES = (PT_HR_LOADED, PT_HR_LOADED_AVAIL, PT_HR_ACTIVE, PT_HR_ACTIVE_AVAIL,
                     PT_HR_TRANSIENT_AVAIL)

# What the agent needs free for its largest operation (credential activation): one
# session, and two objects (EK and AK) beside the storage key it keeps loaded.
NEEDED_SESSIONS = 1
NEEDED_TRANSIENT = 2


def flushable(handle: int) -> bool:
    """A session or transient object: never a persistent key, NV index or hierarchy."""
    return handle >> 24 in (HT_LOADED_SESSION, HT_SAVED_SESSION, HT_TRANSIENT)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def describe_flushed(counts: dict[str, int]) -> str:
    """'2 transient objects, 3 loaded sessions' (kinds in STALE_HANDLE_LISTS order)."""
    parts = [plural(counts[kind], kind) for kind, _ in STALE_HANDLE_LISTS if counts.get(kind)]
    return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class TpmOccupancy:
    """Sessions and transient objects in the TPM now (this connection's included)."""

    loaded_sessions: int
    loaded_sessions_free: int
    saved_sessions: int
    sessions_free: int
    transient_objects: int  # as listed for this connection (all, without a resource manager)
    transient_free: int

    @classmethod
    def from_properties(cls, props: dict[int, int], transient_objects: int) -> TpmOccupancy:
        loaded = props.get(PT_HR_LOADED, 0)
        return cls(loaded_sessions=loaded,
                   loaded_sessions_free=props.get(PT_HR_LOADED_AVAIL, 0),
                   saved_sessions=max(0, props.get(PT_HR_ACTIVE, 0) - loaded),
                   sessions_free=props.get(PT_HR_ACTIVE_AVAIL, 0),
                   transient_objects=transient_objects,
                   transient_free=props.get(PT_HR_TRANSIENT_AVAIL, 0))

    def describe(self) -> str:
        return (f"{plural(self.loaded_sessions, 'session')} loaded "
                f"({self.loaded_sessions_free} free), {self.saved_sessions} saved "
                f"({self.sessions_free} free), "
                f"{plural(self.transient_objects, 'transient object')} "
                f"({self.transient_free} free)")

    def shortages(self) -> list[str]:
        """What the agent's next operation would run out of, in words; [] if nothing."""
        short = []
        if self.loaded_sessions_free < NEEDED_SESSIONS:
            short.append(f"no room for another loaded session ({self.loaded_sessions} loaded)")
        if self.sessions_free < NEEDED_SESSIONS:
            short.append(f"no room for another session ({self.loaded_sessions} loaded, "
                         f"{self.saved_sessions} saved)")
        if self.transient_free < NEEDED_TRANSIENT:
            short.append(f"room for {plural(self.transient_free, 'more transient object')} "
                         f"({self.transient_objects} loaded), the agent needs "
                         f"{NEEDED_TRANSIENT}")
        return short

    def to_dict(self) -> dict[str, int]:
        return asdict(self)
