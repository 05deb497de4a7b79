"""The C library, loaded once, for the two calls Python does not wrap (adjtimex,
malloc_trim). `ctypes.util.find_library` runs `ldconfig -p` each time: never per request."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def libc() -> ctypes.CDLL | None:
    """None where there is no C library to load (the callers then do without)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
