"""Typed errors that carry behaviour.

Every failure that reaches an administrator is one of these. Each carries a stable
``code`` (for alerts, metrics and the API), a ``message`` that says what happened and a
``fix`` that says what to do about it. The class decides what the runtime does:

* `ConfigError` — bad input (a field of a profile, mailbox or config file); nothing is
  written.
* `RuleViolation` — a request that breaks one of the seed's rules; refused.
* `TransientError` — network trouble, throttling, a server restart: back off and retry,
  honouring ``retry_after`` when the server gave one.
* `PermanentError` — authentication, permission, impersonation refused, TLS trust: the
  mailbox channel is disabled with an alert until an administrator acts.
* `ItemError` — one message or item cannot be processed: it is quarantined with its raw
  bytes, never dropped, and never blocks the mailbox.

Messages never contain secrets: callers pass names and addresses, never credentials.
"""

from __future__ import annotations


class SyncError(Exception):
    """Base class: a failure with a code, a message and what to fix."""

    code: str = "error"

    def __init__(self, message: str, *, fix: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message} — {self.fix}"


class ConfigError(SyncError):
    """A field has a bad value. ``field`` is its dotted path (``profiles[0].incoming.port``)."""

    code = "config"

    def __init__(self, field: str, message: str, *, fix: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message, fix=fix)
        self.field = field


class NotFound(SyncError):
    code = "not-found"


class RuleViolation(SyncError):
    """A request that one of the seed's rules forbids."""

    code = "rule"


class TransientError(SyncError):
    """Try again later; ``retry_after`` is the server's hint in seconds, when it gave one."""

    code = "transient"

    def __init__(self, message: str, *, fix: str = "", code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, fix=fix, code=code)
        self.retry_after = retry_after


class PermanentError(SyncError):
    """Retrying cannot help until someone changes something: disable the channel."""

    code = "permanent"


class AuthError(PermanentError):
    code = "auth-failed"


class ItemError(SyncError):
    """One item cannot be processed; quarantine it and carry on."""

    code = "bad-item"
