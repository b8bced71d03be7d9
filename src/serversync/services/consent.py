"""Each user's own consent for an Exchange Online mailbox (delegated OAuth).

An Exchange Online profile with ``credential_source: mailbox`` keeps, as each mailbox's
encrypted secret, the refresh token that the mailbox's user granted to the profile's app
registration. Two use cases live here:

* `sign_in` — the device authorization grant (RFC 8628): the administrator runs
  ``serversync mailbox sign-in ADDRESS``, the user opens Microsoft's page on any device and
  types the code shown, and the resulting refresh token is stored. No password ever reaches
  serversync, and the token must belong to the mailbox's own user.
* `save_rotated` — Microsoft answers every refresh with a new refresh token (a 90-day
  sliding window). `connectors.oauth.REFRESH_TOKENS` holds the newest in memory; after each
  run this writes it to the mailbox, compare-and-set, so a newer sign-in always wins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from serversync.connectors import graph
from serversync.connectors.net import ConnectOptions
from serversync.connectors.oauth import REFRESH_TOKENS, DeviceCode
from serversync.core.errors import RuleViolation
from serversync.core.model import CredentialSource, Profile, ServerKind
from serversync.store.db import Database

log = logging.getLogger(__name__)


async def save_rotated(db: Database) -> int:
    """Store every rotated refresh token this process holds; how many were stored."""
    stored = 0
    for address, (base, newest) in REFRESH_TOKENS.unsaved().items():
        try:
            async with db.transaction() as repo:
                if await repo.swap_mailbox_secret(address, (base, newest), newest):
                    stored += 1
        except Exception as exc:  # kept in memory; the next run tries again
            log.warning("could not store the renewed sign-in of %s: %s", address,
                        type(exc).__name__)
            continue
        REFRESH_TOKENS.saved(address, newest)
    return stored


async def sign_in(db: Database, address: str, on_code: Callable[[DeviceCode], None],
                  options_for: Callable[[Profile], ConnectOptions]) -> str:
    """Let the user of ``address`` sign in; store their refresh token. Returns who signed in."""
    async with db.transaction() as repo:
        mailbox = await repo.get_mailbox(address)
        profile = await repo.get_profile(mailbox.profile)
    if profile.kind is not ServerKind.EXCHANGE_ONLINE \
            or profile.credential_source is not CredentialSource.MAILBOX:
        raise RuleViolation(
            f"mailbox {address}: sign-in is for Exchange Online profiles whose credentials come "
            f"from each mailbox (profile {profile.name!r} is {profile.kind.value} with "
            f"credential_source {profile.credential_source.value})",
            fix="use an exchange-online profile with credential_source: mailbox",
            code="sign-in-unsupported")
    if not mailbox.allow_credentials:
        raise RuleViolation(
            f"mailbox {address}: Allow to Use Credentials for Email Processing is off",
            fix="set allow_credentials: true on the mailbox first",
            code="credentials-not-allowed")
    token = await graph.sign_in(profile, mailbox, options_for(profile), on_code)
    assert token.refresh_token is not None  # graph.sign_in refuses an answer without one
    async with db.transaction() as repo:
        current = await repo.get_mailbox(address)
        await repo.set_mailbox_secret(current.address, token.refresh_token)
    claims = token.claims
    return str(claims.get("upn") or claims.get("preferred_username") or address)
