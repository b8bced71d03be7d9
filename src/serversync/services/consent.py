"""Each user's own consent for an Exchange Online mailbox (delegated OAuth).

An Exchange Online profile with ``credential_source: mailbox`` keeps, as each mailbox's
encrypted secret, the refresh token that the mailbox's user granted to the profile's app
registration. Two use cases live here:

* `SignIns` — the device authorization grant (RFC 8628), in two halves. `SignIns.start`
  asks Microsoft for a code and answers at once with what to show (the user code, the page
  to open, Microsoft's message, the expiry); a background task then polls the token endpoint
  until the user signed in, declined, or the code expired, stores the refresh token and
  records the outcome. The state lives in the ``sign_ins`` table (`store.sign_ins`), so the
  REST API and the admin UI read the same answer from any web worker, and a worker that finds
  a pending sign-in whose poller went silent (its process stopped) takes the polling over.
  The CLI (``serversync mailbox sign-in``) starts and waits in one process. No password ever
  reaches serversync, and the token must belong to the mailbox's own user.
* `save_rotated` — Microsoft answers every refresh with a new refresh token (a 90-day
  sliding window). `connectors.oauth.REFRESH_TOKENS` holds the newest in memory; after each
  run this writes it to the mailbox, compare-and-set, so a newer sign-in always wins.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from serversync.connectors import graph
from serversync.connectors.net import ConnectOptions
from serversync.connectors.oauth import REFRESH_TOKENS, DeviceCode
from serversync.core.errors import AuthError, NotFound, RuleViolation, SyncError
from serversync.core.model import CredentialSource, Mailbox, Profile, ServerKind
from serversync.core.signin import SignIn, SignInStatus
from serversync.core.times import utcnow
from serversync.store.db import Database
from serversync.store.sign_ins import SignInStore

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


def supports_sign_in(profile: Profile) -> bool:
    """Whether mailboxes of ``profile`` sign in with their user's own consent."""
    return profile.kind is ServerKind.EXCHANGE_ONLINE \
        and profile.credential_source is CredentialSource.MAILBOX


# A poller that has not been heard of for three polling intervals plus this long is taken
# to be gone (its process stopped), and the next reader takes the sign-in over.
TAKE_OVER_AFTER = dt.timedelta(seconds=30)


class _Superseded(Exception):
    """This attempt was replaced by a newer start or taken over: stop polling quietly."""


class SignIns:
    """Device-code sign-ins: start one, complete it in the background, read its state.

    One instance per process. It holds the polling tasks this process runs (referenced so
    they are not garbage-collected mid-poll); the state itself is in the database.
    """

    def __init__(self, db: Database, options_for: Callable[[Profile], ConnectOptions],
                 clock: Callable[[], dt.datetime] = utcnow,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.db = db
        self.options_for = options_for
        self.clock = clock
        self.sleep = sleep
        self._tasks: dict[str, asyncio.Task[SignIn]] = {}

    async def _target(self, address: str) -> tuple[Profile, Mailbox]:
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(address)
            profile = await repo.get_profile(mailbox.profile)
        if not supports_sign_in(profile):
            raise RuleViolation(
                f"mailbox {mailbox.address}: sign-in is for Exchange Online profiles whose "
                f"credentials come from each mailbox (profile {profile.name!r} is "
                f"{profile.kind.value} with credential_source "
                f"{profile.credential_source.value})",
                fix="use an exchange-online profile with credential_source: mailbox",
                code="sign-in-unsupported")
        if not mailbox.allow_credentials:
            raise RuleViolation(
                f"mailbox {mailbox.address}: Allow to Use Credentials for Email Processing "
                "is off", fix="set allow_credentials: true on the mailbox first",
                code="credentials-not-allowed")
        return profile, mailbox

    async def start(self, address: str, *, by: str) -> SignIn:
        """Ask Microsoft for a code, record the attempt and start polling in the background.

        Replaces any earlier attempt for the mailbox: its poller stops at its next poll.
        """
        profile, mailbox = await self._target(address)
        code = await graph.start_sign_in(profile, mailbox, self.options_for(profile))
        now = self.clock()
        left = max(0.0, code.expires_at - time.monotonic())
        state = SignIn(mailbox.address, SignInStatus.PENDING, code.user_code,
                       code.verification_uri, code.message, now,
                       now + dt.timedelta(seconds=left), by)
        attempt = secrets.token_hex(16)
        async with self.db.transaction() as repo:
            current = await repo.get_mailbox(mailbox.address)
            assert current.id is not None
            await SignInStore(repo.session, repo.keyring).start(
                current.id, current.address, attempt, code.device_code, code.interval, state)
        log.info("sign-in of %s started by %s", mailbox.address, by)
        self._spawn(mailbox.address, attempt, code)
        return state

    def _spawn(self, address: str, attempt: str, code: DeviceCode) -> None:
        task = asyncio.create_task(self._complete(address, attempt, code),
                                   name=f"sign-in {address}")
        self._tasks[address] = task

        def done(finished: asyncio.Task[SignIn]) -> None:
            if self._tasks.get(address) is finished:
                del self._tasks[address]
            if not finished.cancelled():
                finished.exception()  # recorded in the table; the CLI awaits it itself
        task.add_done_callback(done)

    async def _complete(self, address: str, attempt: str, code: DeviceCode) -> SignIn:
        """Poll until the user signed in; store the refresh token; record the outcome.

        Raises the sign-in's error after recording it (for a caller that waits, the CLI).
        """
        async def beat(seconds: float) -> None:
            await self.sleep(seconds)
            async with self.db.transaction() as repo:
                alive = await SignInStore(repo.session, repo.keyring).heartbeat(
                    address, attempt, self.clock())
            if not alive:
                raise _Superseded

        try:
            profile, mailbox = await self._target(address)
            token = await graph.finish_sign_in(profile, mailbox, self.options_for(profile),
                                               code, sleep=beat)
        except _Superseded:
            return await self.get(address)
        except SyncError as exc:
            status = SignInStatus.EXPIRED if exc.code == "sign-in-expired" \
                else SignInStatus.FAILED
            await self._finish(address, attempt, status, code=exc.code, message=exc.message,
                               fix=exc.fix)
            log.info("sign-in of %s %s: %s", address, status.value, exc.code)
            raise
        except Exception as exc:
            # never the exception's text: it could quote a request (and so the device code)
            await self._finish(address, attempt, SignInStatus.FAILED, code="internal",
                               message=f"the sign-in stopped on an unexpected "
                                       f"{type(exc).__name__}",
                               fix="start the sign-in again; report it if it repeats")
            log.error("sign-in of %s stopped: %s", address, type(exc).__name__)
            raise
        assert token.refresh_token is not None  # finish_sign_in refuses an answer without
        claims = token.claims
        who = str(claims.get("upn") or claims.get("preferred_username") or address)
        async with self.db.transaction() as repo:
            if await SignInStore(repo.session, repo.keyring).finish(
                    address, attempt, SignInStatus.DONE, self.clock(), signed_in_as=who):
                await repo.set_mailbox_secret(address, token.refresh_token)
                log.info("sign-in of %s done: signed in as %s", address, who)
        return await self.get(address)

    async def _finish(self, address: str, attempt: str | None, status: SignInStatus, *,
                      code: str, message: str, fix: str) -> None:
        async with self.db.transaction() as repo:
            await SignInStore(repo.session, repo.keyring).finish(
                address, attempt, status, self.clock(), code=code, message=message, fix=fix)

    async def get(self, address: str) -> SignIn:
        """The mailbox's latest sign-in; NotFound if none was ever started.

        A pending one past its expiry is recorded as expired; one whose poller went silent
        is taken over by this process.
        """
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(address)
            found = await SignInStore(repo.session, repo.keyring).get(mailbox.address)
        if found is None:
            raise NotFound(f"no sign-in was started for mailbox {mailbox.address}",
                           fix=f"start one: serversync mailbox sign-in {mailbox.address}, "
                               "the Sign in button, or POST .../sign-in")
        if found.status is not SignInStatus.PENDING:
            return found
        now = self.clock()
        if found.expires_at <= now:
            await self._finish(found.mailbox, None, SignInStatus.EXPIRED,
                               code="sign-in-expired",
                               message=f"the sign-in code {found.user_code} expired before "
                                       "the user signed in",
                               fix="start the sign-in again")
            return await self.get(address)
        if found.mailbox not in self._tasks:
            await self._take_over(found.mailbox, now)
        return found

    async def _take_over(self, address: str, now: dt.datetime) -> None:
        attempt = secrets.token_hex(16)
        async with self.db.transaction() as repo:
            pending = await SignInStore(repo.session, repo.keyring).take_over(
                address, now, TAKE_OVER_AFTER, attempt)
        if pending is None:
            return
        left = (pending.sign_in.expires_at - now).total_seconds()
        code = DeviceCode(pending.device_code, pending.sign_in.user_code,
                          pending.sign_in.verification_uri, pending.sign_in.message,
                          time.monotonic() + left, pending.interval_s)
        log.info("sign-in of %s: taking over the polling from a silent process", address)
        self._spawn(address, attempt, code)

    async def stop(self) -> None:
        """Stop this process's pollers (shutting down): their sign-ins stay pending, and
        another process that reads them takes the polling over."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self, address: str) -> SignIn:
        """Wait for this process's poller of ``address``; the outcome, or its error."""
        task = self._tasks.get(address.strip().lower())
        if task is not None:
            return await task
        return await self.get(address)

    async def sign_in(self, address: str, on_code: Callable[[SignIn], None], *,
                      by: str) -> str:
        """Start, show the code, wait here (the CLI). Who signed in, or the error."""
        state = await self.start(address, by=by)
        on_code(state)
        done = await self.wait(state.mailbox)
        if done.status is not SignInStatus.DONE:  # superseded by another start meanwhile
            raise AuthError(f"the sign-in of {state.mailbox} was replaced by another one",
                            fix="follow the newest sign-in", code="sign-in-replaced")
        return done.signed_in_as or state.mailbox

