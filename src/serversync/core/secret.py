"""A value that must never be printed: passwords, client secrets, tokens.

`Secret` keeps the plain text in memory only while a connection needs it. Its ``repr`` and
``str`` are masked, it compares by value without exposing it, and the only way out is
`reveal()`, so a secret cannot reach a log line, an exception message or a CLI table by
accident. Encryption at rest is the store's job (`store.crypto`).
"""

from __future__ import annotations

import hmac

MASK = "********"


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret holds text")
        self._value = value

    def reveal(self) -> str:
        """The plain text, for the one place that must send it to a server."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would write the plain text to disk or a queue: refuse.
        raise TypeError("a Secret cannot be pickled")
