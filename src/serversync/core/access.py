"""API tokens and the two roles of the REST API and admin UI.

A token is 32 random bytes (``sst_`` + url-safe base64), shown once when it is created. Only
its SHA-256 is stored: a token has 256 bits of entropy, so a fast hash resists brute force as
well as a slow password hash would, and it keeps every request to one indexed lookup. Roles
follow the issue: ``admin`` may do everything, ``reader`` may only read (GET/HEAD). Pure
standard library, so the rule is tested without a server.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import secrets
from dataclasses import dataclass

TOKEN_PREFIX = "sst_"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Role(enum.StrEnum):
    ADMIN = "admin"
    READER = "reader"

    def may(self, method: str) -> bool:
        """Whether this role may send an HTTP request with ``method``."""
        return self is Role.ADMIN or method.upper() in SAFE_METHODS


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A token's record: never its value, only a short prefix to tell tokens apart."""

    name: str
    role: Role
    prefix: str  # the first characters of the token, e.g. "sst_AbC1"
    created_at: dt.datetime
    last_used_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    id: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's name and role (and the UI session's CSRF token, if any)."""

    name: str
    role: Role
    token_id: int
    csrf: str | None = None

    def may(self, method: str) -> bool:
        return self.role.may(method)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def display_prefix(token: str) -> str:
    return token[:len(TOKEN_PREFIX) + 4]
