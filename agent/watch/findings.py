"""A finding: a sensor's behaviour broke its learned baseline. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The kinds, as journaled (DEVID_FINDING) and shown by `devidctl sensors show`.
INTERVAL = "interval"  # messages at unusual intervals
BURST = "burst"  # many messages within one learned interval
SIZE = "payload-size"  # payload sizes shifted
NEW_PATH = "new-path"  # a method and path never used while learning
HOURS = "unusual-hours"  # activity in an hour of the day never seen while learning
AUTH_FAILURES = "auth-failures"  # a burst of failed authentication naming the sensor
DENIALS = "denials"  # a burst of policy denials
TWO_ADDRESSES = "two-addresses"  # the credential in use from two addresses at once
SILENT = "silent"  # no message for many learned intervals
KINDS = (INTERVAL, BURST, SIZE, NEW_PATH, HOURS, AUTH_FAILURES, DENIALS, TWO_ADDRESSES,
         SILENT)


@dataclass(frozen=True)
class Finding:
    kind: str
    score: float  # how far outside the baseline; compared with the threshold
    evidence: str  # what was seen
    baseline: str  # what was expected
    at: float  # when (the detector's clock, seconds)

    def summary(self) -> str:
        return f"{self.kind} (score {self.score:.1f}): {self.evidence}; expected " \
               f"{self.baseline}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "score": round(self.score, 2), "evidence": self.evidence,
                "baseline": self.baseline, "at": self.at}
