"""Capped exponential backoff with jitter. Pure: the caller sleeps.

Jitter spreads a fleet's retries so that a registrar or TPM coming back is not
hit by every device in the same second.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 1.0
    cap: float = 60.0
    factor: float = 2.0
    jitter: float = 0.1  # +-10 %
    rng: random.Random = field(default_factory=random.Random)
    _attempt: int = 0

    def next_delay(self) -> float:
        base = min(self.cap, self.initial * self.factor**self._attempt)
        self._attempt += 1
        # The cap is a promise to the operator: jitter never pushes past it.
        return min(self.cap, max(0.0, base * (1 + self.rng.uniform(-self.jitter, self.jitter))))

    def reset(self) -> None:
        self._attempt = 0

    @property
    def attempts(self) -> int:
        return self._attempt
