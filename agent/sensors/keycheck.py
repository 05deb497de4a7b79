"""Is a factory-embedded key fit to use? Pure.

Minted keys come from the OS's CSPRNG and are never checked. Keys a factory
embedded arrive in an import file, where a short key, a pattern typed by a
person, a passphrase or the same key on many devices would silently weaken
the fleet: those are refused with the reason.
"""

from __future__ import annotations

import itertools


def weak_key_reason(key: bytes, minimum: int) -> str | None:
    """Why `key` must not be used, or None. A random 16-byte key trips these with
    probability below 1e-6 (it has ~15.5 distinct byte values; all printable: 1.3e-7)."""
    if len(key) < minimum:
        return f"{len(key)} bytes, at least {minimum} required"
    if len(set(key)) < max(4, len(key) // 2):
        return f"only {len(set(key))} distinct byte values in {len(key)}: a pattern, " \
               "not a random key"
    steps = {(b - a) % 256 for a, b in itertools.pairwise(key)}
    if len(steps) == 1:
        return "an arithmetic sequence of bytes, not a random key"
    if all(0x20 <= b < 0x7F for b in key):
        return "printable text (a passphrase?), not random bytes"
    return None
