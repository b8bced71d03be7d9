"""API tokens and admin UI sign-in: create, list, revoke, authenticate.

Tokens are created by an administrator (``serversync token create NAME --role admin``, or
``POST /api/v1/tokens``) and shown once; only their SHA-256 is stored (`core.access`). The
admin UI signs in with a token too: `sign_in` trades a valid token for a random session
cookie (stored hashed, 12 hours) plus a CSRF token for the session's forms, so the long-lived
token never sits in a browser. Revoking a token ends its sessions at once.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass

from serversync.core.access import (
    ApiToken,
    Principal,
    Role,
    display_prefix,
    new_token,
    token_hash,
)
from serversync.core.errors import ConfigError, NotFound, RuleViolation
from serversync.services.admin import Clock, utcnow
from serversync.store.db import Database
from serversync.store.web import WebStore

SESSION_HOURS = 12
# Writing last_used_at on every request would turn every GET into a write; once a minute
# is precise enough for "last used" and keeps SQLite's single writer free.
TOUCH_EVERY = dt.timedelta(minutes=1)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


@dataclass(frozen=True, slots=True)
class NewToken:
    """A freshly created token: ``value`` is shown once and never stored."""

    token: ApiToken
    value: str


@dataclass(frozen=True, slots=True)
class SignIn:
    session: str  # the cookie value
    principal: Principal


class Tokens:
    def __init__(self, db: Database, clock: Clock = utcnow) -> None:
        self.db = db
        self.clock = clock

    async def create(self, name: str, role: Role) -> NewToken:
        if not NAME.match(name):
            raise ConfigError("name", "use 1-100 letters, digits, '.', '_', '@' or '-'")
        value = new_token()
        async with self.db.transaction() as repo:
            store = WebStore(repo.session, repo.keyring)
            if await store.active_token(name) is not None:
                raise RuleViolation(f"a token named {name!r} already exists",
                                    fix=f"revoke it first (serversync token revoke {name}) or "
                                        "choose another name", code="exists")
            token = await store.add_token(name, role, token_hash(value), display_prefix(value),
                                          self.clock())
        return NewToken(token, value)

    async def all(self, *, include_revoked: bool = False) -> list[ApiToken]:
        async with self.db.transaction() as repo:
            return await WebStore(repo.session, repo.keyring).list_tokens(
                include_revoked=include_revoked)

    async def revoke(self, name: str) -> None:
        async with self.db.transaction() as repo:
            if not await WebStore(repo.session, repo.keyring).revoke_token(name, self.clock()):
                raise NotFound(f"no active token named {name!r}",
                               fix="list them with: serversync token list")

    async def authenticate(self, value: str) -> Principal | None:
        """The caller behind a bearer token, or None for an unknown or revoked one."""
        if not value:
            return None
        now = self.clock()
        async with self.db.transaction() as repo:
            store = WebStore(repo.session, repo.keyring)
            token = await store.token_by_hash(token_hash(value))
            if token is None or token.id is None:
                return None
            if token.last_used_at is None or now - token.last_used_at >= TOUCH_EVERY:
                await store.touch_token(token.id, now)
        return Principal(token.name, token.role, token.id)

    # ------------------------------------------------------------ admin UI sessions

    async def sign_in(self, value: str) -> SignIn | None:
        principal = await self.authenticate(value.strip())
        if principal is None:
            return None
        session, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        now = self.clock()
        async with self.db.transaction() as repo:
            await WebStore(repo.session, repo.keyring).add_session(
                token_hash(session), principal.token_id, csrf, now,
                now + dt.timedelta(hours=SESSION_HOURS))
        return SignIn(session, Principal(principal.name, principal.role, principal.token_id,
                                         csrf))

    async def session(self, cookie: str) -> Principal | None:
        if not cookie:
            return None
        async with self.db.transaction() as repo:
            return await WebStore(repo.session, repo.keyring).session_principal(
                token_hash(cookie), self.clock())

    async def sign_out(self, cookie: str) -> None:
        async with self.db.transaction() as repo:
            await WebStore(repo.session, repo.keyring).delete_session(token_hash(cookie))
