"""A byte string that refuses to be printed.

Unsealed secrets travel as SecretBytes so that a stray f-string, log call or
traceback shows `<secret: 32 bytes>` instead of the value.
"""

from __future__ import annotations


class SecretBytes:
    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        """The secret itself; call only where it is consumed."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        import hmac

        if isinstance(other, SecretBytes):
            return hmac.compare_digest(self._value, other._value)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("SecretBytes", len(self._value)))

    def __repr__(self) -> str:
        return f"<secret: {len(self._value)} bytes>"

    __str__ = __repr__

    def __reduce__(self) -> object:
        raise TypeError("SecretBytes must not be pickled")
