"""The quarantine of incoming mail, for administrators: see, export, retry, discard.

The incoming job never drops a message it cannot track: it keeps the raw bytes in
``incoming_quarantine`` with a code and reason and raises a ``quarantined`` alert
(`services.incoming`). Here an administrator deals with them once the cause is fixed:

* **retry** runs the kept bytes through the same parser and the same `Tracker` as a sync
  run (duplicate check by Message-ID, correlation, tracking rules, loop guard), in one
  transaction with the link and the row: the item link moves from ``quarantined`` to
  ``tracked``, ``linked`` (the message was tracked meanwhile, e.g. through another
  mailbox: no second activity) or ``skipped``, and the row is released. If it fails
  again, the row stays with the new reason. A retried row is claimed with an UPDATE first,
  so two retries of one message (two admins, a double click) run one after the other and
  the second finds it released: never two activities. The server is not touched: the
  message stays wherever the run's after-processing put it (e.g. the profile's
  Undeliverable folder).
* **discard** releases the row without an activity; the link stays ``quarantined``, so the
  message is not fetched again.

Both record who and when on the row (``released_by``, ``released_at``, ``outcome``;
``retries``/``retried_at`` count attempts): there is no separate audit table. When a
mailbox has nothing left in quarantine, its open ``quarantined`` alerts are resolved.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from serversync.connectors import mime
from serversync.connectors.protocols import RemoteMessage
from serversync.core import rules
from serversync.core.errors import ItemError, NotFound, RuleViolation, SyncError
from serversync.core.model import Channel, Mailbox, Profile, ServerKind
from serversync.services.admin import Clock, Services, utcnow
from serversync.services.incoming import (
    STORE_REFUSED,
    Context,
    IncomingJob,
    IncomingOptions,
    Tracker,
    parse,
    refused_reason,
)
from serversync.store.db import Database
from serversync.store.incoming import (
    DISCARDED,
    LINKED,
    QUARANTINED,
    TRACKED,
    IncomingStore,
    Quarantined,
)
from serversync.store.repos import Repository

log = logging.getLogger(__name__)

ALERT_CODE = "quarantined"


@dataclass(frozen=True, slots=True)
class QuarantinedMessage:
    """One quarantined message as an administrator sees it."""

    id: int
    mailbox: str
    folder: str
    remote_id: str
    size: int
    code: str
    reason: str
    created_at: dt.datetime
    sent: bool | None  # read from the Sent folder (None: not recorded, before 0013)
    retries: int
    retried_at: dt.datetime | None
    released_at: dt.datetime | None
    released_by: str | None
    outcome: str | None  # tracked | linked | skipped | discarded; None while quarantined
    email_id: int | None = None  # the activity it became (tracked or linked), in `get`
    headline: mime.Headline | None = None  # subject, sender, ... in `get`


@dataclass(frozen=True, slots=True)
class RetryResult:
    """What one retry did: released as ``outcome``, or still quarantined with the new
    ``code`` and ``reason``."""

    id: int
    mailbox: str
    outcome: str  # tracked | linked | skipped | quarantined
    email_id: int | None = None
    code: str = ""
    reason: str = ""

    @property
    def released(self) -> bool:
        return self.outcome != QUARANTINED


def _message(q: Quarantined, email_id: int | None = None,
             headline: mime.Headline | None = None) -> QuarantinedMessage:
    return QuarantinedMessage(q.id, q.mailbox, q.folder, q.remote_id, q.size, q.code, q.reason,
                              q.created_at, q.sent, q.retries, q.retried_at, q.released_at,
                              q.released_by, q.outcome, email_id, headline)


def _released(q: Quarantined) -> RuleViolation:
    when = q.released_at.strftime("%Y-%m-%d %H:%M:%S UTC") if q.released_at else "?"
    return RuleViolation(
        f"quarantined message {q.id} already left the quarantine: {q.outcome} by "
        f"{q.released_by or '?'} at {when}",
        fix="list what is still quarantined: serversync quarantine list", code="released")


def _sent(q: Quarantined, mailbox: Mailbox, profile: Profile) -> bool:
    """Whether the message was read from the Sent folder (outgoing activity).

    Recorded since migration 0013; for older rows, as the run chose its folders: the
    IMAP Sent folder is the one folder it read that is not in the mailbox's list."""
    if q.sent is not None:
        return q.sent
    return (profile.kind is ServerKind.IMAP and mailbox.track_sent
            and q.folder not in mailbox.folders)


class Quarantine:
    """List, show, export, retry and discard quarantined incoming mail."""

    def __init__(self, db: Database, *, options: IncomingOptions | None = None,
                 clock: Clock = utcnow) -> None:
        self.db = db
        options = options or IncomingOptions()
        self.options = options  # the incoming job's: the same loop guard and parser threads
        self.tracker = Tracker(options.loop)
        self.clock = clock

    # ------------------------------------------------------------ reading

    async def messages(self, *, mailbox: str | None = None, include_released: bool = False,
                   limit: int = 100, before_id: int | None = None) -> list[QuarantinedMessage]:
        """Newest first; page with ``before_id``. An unknown mailbox is an error, not []."""
        async with self.db.transaction() as repo:
            mailbox_id = None
            if mailbox is not None:
                mailbox_id = (await repo.get_mailbox(mailbox)).id
            found = await IncomingStore(repo.session).quarantined(
                mailbox_id, include_released, before_id=before_id, limit=limit,
                newest_first=True)
        return [_message(q) for q in found]

    async def get(self, quarantine_id: int) -> QuarantinedMessage:
        """One message with its headline and, once released as an activity, its id."""
        async with self.db.transaction() as repo:
            store = IncomingStore(repo.session)
            q = await self._entry(store, quarantine_id)
            raw = await store.raw(q.raw_sha256)
            email_id = None
            if q.outcome in (TRACKED, LINKED):
                link = await store.link(q.mailbox_id, q.folder, q.remote_id)
                email_id = link[1] if link is not None else None
        return _message(q, email_id, mime.headline(raw))

    async def raw(self, quarantine_id: int) -> bytes:
        """The message exactly as it was read from the server (an .eml)."""
        async with self.db.transaction() as repo:
            store = IncomingStore(repo.session)
            return await store.raw((await self._entry(store, quarantine_id)).raw_sha256)

    async def _entry(self, store: IncomingStore, quarantine_id: int) -> Quarantined:
        found = await store.quarantined(include_released=True, ids=[quarantine_id])
        if not found:
            raise NotFound(f"no quarantined message {quarantine_id}",
                           fix="list them: serversync quarantine list --all")
        return found[0]

    # ------------------------------------------------------------ retry

    async def retry(self, quarantine_id: int, *, by: str) -> RetryResult:
        """Process the kept message again, as the incoming job would (see the module doc)."""
        async with self.db.transaction() as repo:
            store = IncomingStore(repo.session)
            q = await self._entry(store, quarantine_id)
            if q.released_at is not None:
                raise _released(q)
            mailbox = await repo.get_mailbox(q.mailbox)
            profile = await repo.get_profile(mailbox.profile)
            settings = await repo.get_settings()
            raw = await store.raw(q.raw_sha256)
        rules.check_approved(settings, mailbox)  # only approved mailboxes are processed
        parsed = (await parse([raw], settings, self.options.parse_threads))[0]
        assert mailbox.id is not None
        message = RemoteMessage(q.folder, q.remote_id, raw,
                                internal_date=q.internal_date or q.created_at)
        ctx = Context(mailbox, mailbox.id, profile, settings, q.folder,
                      _sent(q, mailbox, profile), self.clock())
        try:
            async with self.db.transaction() as repo:
                result = await self._retry(repo, ctx, q, message, parsed, by)
        except SyncError:
            raise
        except Exception as exc:  # the database refused the message's data again
            reason = refused_reason(exc)
            async with self.db.transaction() as repo:
                store = IncomingStore(repo.session)
                if not await store.claim_quarantined(q.id, ctx.now):
                    raise _released(await self._entry(store, q.id)) from None
                await store.requarantine(q.id, STORE_REFUSED, reason)
            result = RetryResult(q.id, q.mailbox, QUARANTINED, None, STORE_REFUSED, reason)
        log.info("quarantined message %s of %s retried by %s: %s%s", q.id, q.mailbox, by,
                 result.outcome, f" ({result.code})" if result.code else "")
        return result

    async def _retry(self, repo: Repository, ctx: Context, q: Quarantined,
                     message: RemoteMessage, parsed: mime.ParsedMessage | ItemError,
                     by: str) -> RetryResult:
        store = IncomingStore(repo.session)
        if not await store.claim_quarantined(q.id, ctx.now):  # first: locks the row
            raise _released(await self._entry(store, q.id))
        link = await store.link(ctx.mailbox_id, q.folder, q.remote_id)
        if link is not None and link[0] != QUARANTINED:
            # processed another way since (not by a sync run: it skips known remote ids)
            await self._release(store, ctx, q, by, link[0])
            return RetryResult(q.id, q.mailbox, link[0], link[1])
        await store.drop_link(ctx.mailbox_id, q.folder, q.remote_id)
        plan = await self.tracker.plan(repo, store, ctx, [(message, parsed)])
        await self.tracker.write(repo, store, ctx, plan)
        for alert in plan.alerts:  # e.g. the loop guard paused the sender just now
            await repo.add_alert(alert)
        if plan.quarantine:  # the link was written back as quarantined
            _, code, reason = plan.quarantine[0]
            await store.requarantine(q.id, code, reason)
            return RetryResult(q.id, q.mailbox, QUARANTINED, None, code, reason)
        now = await store.link(ctx.mailbox_id, q.folder, q.remote_id)
        assert now is not None
        await self._release(store, ctx, q, by, now[0])
        return RetryResult(q.id, q.mailbox, now[0], now[1])

    async def retry_mailbox(self, address: str, *, by: str) -> list[RetryResult]:
        """Retry every message of a mailbox still in quarantine, oldest first (a reply
        then correlates to the message it answers, as in a run)."""
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(address)
            pending = await IncomingStore(repo.session).quarantined(mailbox.id)
        results = []
        for q in pending:
            try:
                results.append(await self.retry(q.id, by=by))
            except RuleViolation as exc:
                if exc.code != "released":  # released meanwhile by someone else: done
                    raise
        return results

    # ------------------------------------------------------------ discard

    async def discard(self, quarantine_id: int, *, by: str) -> QuarantinedMessage:
        """Release a message without an activity (its raw bytes stay referenced by the row)."""
        now = self.clock()
        async with self.db.transaction() as repo:
            store = IncomingStore(repo.session)
            q = await self._entry(store, quarantine_id)
            if not await store.release_quarantined(q.id, now, by, DISCARDED):
                raise _released(await self._entry(store, q.id))
            if not await store.open_quarantine(q.mailbox_id):
                await store.resolve_alerts(q.mailbox_id, ALERT_CODE)
            q = await self._entry(store, q.id)
        log.info("quarantined message %s of %s discarded by %s", q.id, q.mailbox, by)
        return _message(q)

    async def _release(self, store: IncomingStore, ctx: Context, q: Quarantined, by: str,
                       outcome: str) -> None:
        await store.release_quarantined(q.id, ctx.now, by, outcome)
        if not await store.open_quarantine(ctx.mailbox_id):
            await store.resolve_alerts(ctx.mailbox_id, ALERT_CODE)


def quarantine_of(services: Services) -> Quarantine:
    """The quarantine with the installed incoming job's options (loop guard, parser)."""
    job = services.jobs.get(Channel.INCOMING)
    options = job.options if isinstance(job, IncomingJob) else IncomingOptions()
    return Quarantine(services.db, options=options, clock=services.clock)
