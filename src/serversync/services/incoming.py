"""Incoming email: track new mail of one mailbox into email activities (the INCOMING job).

One run, per configured folder (INBOX by default, plus Sent when ``track_sent``):

1. the `MailSource` (IMAP or POP3) yields batches of raw messages from the folder's cursor;
2. the batch is parsed (`connectors.mime`, fast-mail-parser on all cores, stdlib fallback)
   in a worker thread while the source already fetches the next batch;
3. one transaction per batch: replayed items (already linked) are skipped; each message
   is matched to an existing activity by Message-ID (or content hash) — the same message
   in several mailboxes, or a Sent copy of an outgoing activity, is *linked*, not tracked
   twice; otherwise addresses are resolved, the message is correlated and the tracking
   rules decide (`core.tracking`); the loop guard counts per sender; activities, item
   links, quarantined items, loop counters and the folder cursor are written together;
4. only then the server-side after-processing runs (flag, move, delete; failed items to
   the profile's Undeliverable folder).

A crash anywhere replays the batch: the unique item links make the replay a no-op for
what was committed. Bad items never raise: they are quarantined with their raw bytes and an
alert; an administrator retries or discards them later (`services.quarantine`), and a retry
decides with the same `Tracker` as a run. A whole-run failure raises a typed error (wrong
password, impersonation refused, every folder gone: `PermanentError`); the runtime's
`services.runs.ChannelRunner` records it, backs off or disables the channel, and raises the
alert. A folder that disappeared while others remain is an alert of its own (code
``folder-missing``), resolved when it is back.

Fault injection for the crash tests: ``SERVERSYNC_FAULT=incoming-before-commit[:N]`` ends
the process (``os._exit``) after the N-th batch (default 1) was fetched and parsed and
before it is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from serversync.connectors import mime
from serversync.connectors.imapsessions import Reusable, SessionCache, identity
from serversync.connectors.net import ConnectOptions
from serversync.connectors.protocols import (
    Disposition,
    FetchBatch,
    FolderCursor,
    MailSource,
    RemoteMessage,
)
from serversync.core import rules, tracking
from serversync.core.email import (
    Direction,
    EmailActivity,
    EmailStatus,
    Recipient,
)
from serversync.core.errors import ItemError, PermanentError, RuleViolation, SyncError
from serversync.core.model import (
    AfterProcessing,
    Alert,
    Channel,
    CredentialSource,
    Mailbox,
    OrgSettings,
    Party,
    Profile,
    ServerKind,
    Severity,
    SyncMethod,
)
from serversync.core.rules import Login
from serversync.core.tokens import find_token, make_token
from serversync.services.admin import Clock, connect_options, utcnow
from serversync.services.bulkgc import relaxed_gc
from serversync.services.channels import RunSummary, current_run
from serversync.store.db import Database
from serversync.store.incoming import (
    LINKED,
    QUARANTINED,
    SKIPPED,
    TRACKED,
    Cursor,
    IncomingStore,
    NewLink,
)
from serversync.store.repos import Repository

log = logging.getLogger(__name__)

SourceFactory = Callable[[Profile, Mailbox, Login, ConnectOptions], MailSource]
FAULT_ENV = "SERVERSYNC_FAULT"
SMART_MATCH_DAYS = 90
FOLDER_ALERT_RECHECK_S = 600.0
STORE_REFUSED = "store-refused"  # quarantine code: the database refused the message's data


@dataclass(frozen=True, slots=True)
class IncomingOptions:
    batch_size: int = 500
    parse_threads: int | None = None  # fast-mail-parser threads; None = every core
    loop: tracking.LoopPolicy = field(default_factory=tracking.LoopPolicy)


@dataclass
class Plan:
    """What one batch (or one retried message) writes."""

    activities: list[EmailActivity] = field(default_factory=list)
    links: list[NewLink] = field(default_factory=list)
    quarantine: list[tuple[RemoteMessage, str, str]] = field(default_factory=list)
    dispositions: list[Disposition] = field(default_factory=list)
    fixups: list[tuple[int, int, str]] = field(default_factory=list)  # new idx → new idx
    alerts: list[Alert] = field(default_factory=list)
    windows: dict[str, tracking.LoopWindow] = field(default_factory=dict)
    tracked: int = 0
    linked: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class Context:
    """Where the messages being decided come from, and when they are decided."""

    mailbox: Mailbox
    mailbox_id: int
    profile: Profile
    settings: OrgSettings
    folder: str
    sent: bool  # the folder is the Sent folder: outgoing activities
    now: dt.datetime


async def parse(raws: Sequence[bytes], settings: OrgSettings,
                threads: int | None) -> list[mime.ParsedMessage | ItemError]:
    """Parse in a worker thread (the parser releases the GIL), failures in their slots."""
    if not raws:
        return []
    return await asyncio.to_thread(mime.parse_batch, raws,
                                   max_attachment_bytes=settings.max_attachment_bytes,
                                   threads=threads)


def refused_reason(exc: Exception) -> str:
    """Why the database refused one message (the quarantine's ``store-refused`` reason).

    The driver's own error (SQLAlchemy keeps it as ``orig``), first line only: SQLAlchemy's
    text appends the statement and its parameters, i.e. the message's content, which the
    raw bytes already keep and which would bury the reason an administrator reads."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"the database refused it: {type(cause).__name__}: {lines[0][:300] if lines else ''}"


def _given(source: MailSource) -> Callable[[], MailSource]:
    return lambda: source


def _fault(batch_number: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    name, _, nth = spec.partition(":")
    if name == "incoming-before-commit" and batch_number == int(nth or 1):
        os._exit(86)


class IncomingJob:
    """The `ChannelJob` for `Channel.INCOMING` on IMAP and POP3 profiles."""

    def __init__(self, db: Database, sources: Mapping[ServerKind, SourceFactory], *,
                 options: IncomingOptions = IncomingOptions(), clock: Clock = utcnow,
                 sessions: SessionCache[Any] | None = None) -> None:
        self.db = db
        self.sources = sources
        self.options = options
        self.tracker = Tracker(options.loop)
        self.clock = clock
        # logged-in sessions kept between runs (connectors.imapsessions); None: one per run
        self.sessions = sessions
        # mailbox id → (a folder-missing alert may be open, when that was last known)
        self._folder_alerts: dict[int, tuple[bool, float]] = {}

    async def aclose(self) -> None:
        """Log out the kept sessions (the runtime calls this on shutdown)."""
        if self.sessions is not None:
            await self.sessions.close()

    async def prefetch(self, repo: Repository, mailbox: Mailbox) -> dict[str, Cursor]:
        """The folder cursors, read by the runner in the transaction that opens the run
        (`services.channels.ChannelJob`): a no-change poll then needs no transaction of
        its own before it asks the server."""
        assert mailbox.id is not None
        return await IncomingStore(repo.session).cursors(mailbox.id)

    async def __call__(self, address: str) -> RunSummary:
        known = current_run.get()  # what the runner just read, if it runs us
        cursors: dict[str, Cursor] | None = None
        if known is not None and known.mailbox.address == address.strip().lower():
            mailbox, profile, settings = known.mailbox, known.profile, known.settings
            cursors = known.prefetched
        else:  # called without the runner (tests, bench-incoming): one transaction too
            async with self.db.transaction() as repo:
                mailbox = await repo.get_mailbox(address)
                profile = await repo.get_profile(mailbox.profile)
                settings = await repo.get_settings()
                cursors = await self.prefetch(repo, mailbox)
        factory = self.sources.get(profile.kind)
        if factory is None:
            raise RuleViolation(f"incoming sync of {profile.kind.value} mailboxes is not "
                                "handled here", code="connector-unavailable")
        if mailbox.incoming.method is not SyncMethod.SERVER_SIDE or not mailbox.incoming.enabled:
            raise RuleViolation(f"incoming email of {mailbox.address} is not enabled",
                                fix=f"run Test & Enable: serversync mailbox test {address}",
                                code="not-enabled")
        rules.check_approved(settings, mailbox)
        login = rules.login_for(profile, mailbox, Channel.INCOMING)
        options = connect_options(profile)
        source = factory(profile, mailbox, login, options)
        if self.sessions is not None and isinstance(source, Reusable):
            return await self._run_kept(factory, source, mailbox, profile, settings, login,
                                        options, cursors)
        try:
            await source.open()
            return await self._run(source, mailbox, profile, settings, cursors)
        finally:
            await source.close()

    async def _run_kept(self, factory: SourceFactory, source: MailSource, mailbox: Mailbox,
                        profile: Profile, settings: OrgSettings, login: Login,
                        options: ConnectOptions,
                        cursors: dict[str, Cursor] | None = None) -> RunSummary:
        """Run on the mailbox's kept session; if that session fails, once more on a new one.

        A kept session may have died since its last run (server restart, idle logout, a
        kick); the run is idempotent (item links, cursor per batch), so running it again on
        a fresh login neither loses nor duplicates mail. Permanent errors are not retried.
        """
        sessions = self.sessions
        assert sessions is not None
        key = identity(profile, mailbox.username, mailbox.allow_credentials, mailbox.folders,
                       mailbox.after_processing, mailbox.after_processing_folder,
                       mailbox.track_sent, login, login.secret.reveal() if login.secret else
                       None, options)
        # the cap counts per mailbox with the mailbox's own credentials, per profile with
        # the profile's (dynamics-sss.md §2, Maximum Concurrent Connections)
        group = f"mailbox:{mailbox.address}" if profile.credential_source is \
            CredentialSource.MAILBOX else f"profile:{profile.name}"
        cap = max(1, profile.max_concurrent_connections)
        for attempt in (1, 2):
            fresh = source if attempt == 1 else factory(profile, mailbox, login, options)
            lease = await sessions.acquire(mailbox.address, key, group, cap, _given(fresh))
            healthy = False
            try:
                result = await self._run(lease.source, mailbox, profile, settings,
                                         cursors if attempt == 1 else None)
                healthy = True
                return result
            except Exception as exc:
                if not lease.reused or isinstance(exc, PermanentError | RuleViolation):
                    raise
                log.info("kept IMAP session of %s failed (%s); running again on a new login",
                         mailbox.address, type(exc).__name__)
            finally:
                await sessions.release(lease, healthy=healthy)
        raise AssertionError("unreachable: the second attempt returns or raises")

    # ------------------------------------------------------------ one run

    async def _run(self, source: MailSource, mailbox: Mailbox, profile: Profile,
                   settings: OrgSettings,
                   cursors: dict[str, Cursor] | None = None) -> RunSummary:
        """``cursors``: every folder's cursor as read when the run opened (`prefetch`);
        None: each folder reads its own."""
        assert mailbox.id is not None
        folders = [(f, False) for f in mailbox.folders]
        if mailbox.track_sent and profile.kind is ServerKind.IMAP:
            finder = getattr(source, "sent_folder", None)
            sent = await finder() if finder is not None else None
            if sent and sent not in mailbox.folders:
                folders.append((sent, True))
        totals = {"items": 0, "failures": 0, "skipped": 0, "linked": 0}
        missing: list[PermanentError] = []
        for folder, is_sent in folders:
            try:
                await source.resolve_folder(folder)
            except PermanentError as exc:
                if exc.code != "folder-missing":
                    raise
                missing.append(exc)
                self._folder_alerts[mailbox.id] = (True, time.monotonic())
                await self._alert(mailbox, profile, Severity.ERROR, exc.code, exc.message,
                                  exc.fix)
                continue
            with relaxed_gc():  # millions of short-lived objects per initial sync
                await self._folder(source, mailbox, mailbox.id, profile, settings, folder,
                                   is_sent, totals, cursors)
        if missing and len(missing) == len(folders):
            raise missing[0]
        if not missing and await self._may_have_folder_alert(mailbox):
            async with self.db.transaction() as repo:
                await IncomingStore(repo.session).resolve_alerts(mailbox.id, "folder-missing")
            self._folder_alerts[mailbox.id] = (False, time.monotonic())
        detail = (f"{totals['items']} tracked, {totals['linked']} linked, "
                  f"{totals['skipped']} not tracked, {totals['failures']} quarantined")
        if missing:
            detail += f"; {len(missing)} folder(s) missing"
        return RunSummary(totals["items"], totals["failures"] + len(missing), False, detail)

    async def _may_have_folder_alert(self, mailbox: Mailbox) -> bool:
        """Whether a folder-missing alert may be open (then a run that found every folder
        resolves it). Known in this process after the first look, so that a no-change run
        writes nothing and reads no alerts; looked at again every ten minutes, since another
        worker may have raised one."""
        assert mailbox.id is not None
        seen = self._folder_alerts.get(mailbox.id)
        if seen is not None and time.monotonic() - seen[1] < FOLDER_ALERT_RECHECK_S:
            return seen[0]
        async with self.db.transaction() as repo:
            open_ = any(a.code == "folder-missing"
                        for a in await repo.list_alerts(mailbox=mailbox.address))
        self._folder_alerts[mailbox.id] = (open_, time.monotonic())
        return open_

    async def _alert(self, mailbox: Mailbox, profile: Profile, severity: Severity, code: str,
                     message: str, fix: str) -> None:
        """Add an alert unless the same one is still open (a missing folder, run after run)."""
        async with self.db.transaction() as repo:
            if any(a.code == code and a.message == message
                   for a in await repo.list_alerts(mailbox=mailbox.address)):
                return
            await repo.add_alert(Alert(severity, code, message, fix, mailbox=mailbox.address,
                                       profile=profile.name, channel=Channel.INCOMING,
                                       created_at=self.clock()))

    async def _folder(self, source: MailSource, mailbox: Mailbox, mailbox_id: int,
                      profile: Profile, settings: OrgSettings, folder: str, is_sent: bool,
                      totals: dict[str, int], cursors: dict[str, Cursor] | None = None
                      ) -> None:
        if cursors is not None:
            stored = cursors.get(folder)
        else:
            async with self.db.transaction() as repo:
                stored = await IncomingStore(repo.session).cursor(mailbox_id, folder)
        cursor = FolderCursor(*stored) if stored is not None else None

        async def known(remote_ids: Sequence[str]) -> set[str]:
            async with self.db.transaction() as repo:
                return await IncomingStore(repo.session).known(mailbox_id, folder, remote_ids)

        # Three stages overlap: the source fetches batch k+2 while batch k+1 is parsed in a
        # worker thread (the parser releases the GIL) and batch k is committed.
        queue: asyncio.Queue[tuple[FetchBatch, list[mime.ParsedMessage | ItemError]] | None] = \
            asyncio.Queue(maxsize=1)

        async def produce() -> None:
            try:
                async with contextlib.aclosing(source.fetch(
                        folder, cursor, batch_size=self.options.batch_size,
                        known=known)) as batches:
                    async for batch in batches:
                        parsed = await parse([m.raw for m in batch.messages], settings,
                                             self.options.parse_threads)
                        await queue.put((batch, parsed))
            finally:
                # also when the source fails: the consumer stops, then `await producer`
                # re-raises the failure (without this it would wait on the queue forever)
                await queue.put(None)

        producer = asyncio.create_task(produce())
        number = 0
        try:
            while (item := await queue.get()) is not None:
                batch, parsed = item
                number += 1
                _fault(number)
                ctx = Context(mailbox, mailbox_id, profile, settings, folder, is_sent,
                               self.clock())
                plan = await self._commit(ctx, batch, parsed)
                totals["items"] += plan.tracked
                totals["linked"] += plan.linked
                totals["skipped"] += plan.skipped
                totals["failures"] += len(plan.quarantine)
                if plan.dispositions:
                    await source.finish(folder, plan.dispositions)
            await producer  # re-raises a failure of the source
        finally:
            if not producer.done():
                producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer

    # ------------------------------------------------------------ one batch

    async def _commit(self, ctx: Context, batch: FetchBatch,
                      parsed: Sequence[mime.ParsedMessage | ItemError]) -> Plan:
        """Write the batch in one transaction; if the database refuses it, item by item."""
        items = list(zip(batch.messages, parsed, strict=True))
        try:
            async with self.db.transaction() as repo:
                return await self._write(repo, ctx, batch.cursor, items)
        except SyncError:
            raise
        except Exception as exc:  # a database error caused by one item's data
            if len(items) <= 1:
                if not items:
                    raise
                log.warning("incoming item %s refused by the database: %s",
                            items[0][0].remote_id, type(exc).__name__)
                return await self._quarantine_alone(ctx, batch.cursor, items[0][0], exc)
        plan = Plan()
        for i, item in enumerate(items):
            last = i + 1 == len(items)
            single = FetchBatch(batch.folder, [item[0]], batch.cursor if last else
                                FolderCursor(batch.cursor.uidvalidity,
                                             item[0].uid or 0, None))
            part = await self._commit(ctx, single, [item[1]])
            plan.tracked += part.tracked
            plan.linked += part.linked
            plan.skipped += part.skipped
            plan.quarantine += part.quarantine
            plan.dispositions += part.dispositions
        return plan

    async def _quarantine_alone(self, ctx: Context, cursor: FolderCursor,
                                message: RemoteMessage, exc: Exception) -> Plan:
        plan = Plan()
        plan.quarantine.append((message, STORE_REFUSED, refused_reason(exc)))
        plan.links.append(NewLink(ctx.folder, message.remote_id, QUARANTINED))
        plan.dispositions.append(self.tracker.failed_disposition(ctx, message))
        async with self.db.transaction() as repo:
            store = IncomingStore(repo.session)
            if message.remote_id not in await store.known(ctx.mailbox_id, ctx.folder,
                                                          [message.remote_id]):
                await self._store_plan(repo, store, ctx, cursor, plan)
        return plan

    async def _write(self, repo: Repository, ctx: Context, cursor: FolderCursor,
                     items: list[tuple[RemoteMessage, mime.ParsedMessage | ItemError]]) -> Plan:
        store = IncomingStore(repo.session)
        done = await store.known(ctx.mailbox_id, ctx.folder, [m.remote_id for m, _ in items])
        todo = [(m, p) for m, p in items if m.remote_id not in done]
        plan = await self.tracker.plan(repo, store, ctx, todo)
        await self._store_plan(repo, store, ctx, cursor, plan)
        return plan

    async def _store_plan(self, repo: Repository, store: IncomingStore, ctx: Context,
                          cursor: FolderCursor, plan: Plan) -> None:
        await self.tracker.write(repo, store, ctx, plan)
        for message, code, reason in plan.quarantine:
            await store.quarantine(ctx.mailbox_id, ctx.folder, message.remote_id, message.raw,
                                   code, reason, ctx.now, sent=ctx.sent,
                                   internal_date=message.internal_date)
        if plan.quarantine:
            first = plan.quarantine[0]
            plan.alerts.append(Alert(
                Severity.WARNING, "quarantined",
                f"{len(plan.quarantine)} message(s) in {ctx.folder} of {ctx.mailbox.address} "
                f"were quarantined (first: {first[1]}: {first[2][:200]})",
                "the raw messages are kept in the quarantine with the reason: see them with "
                f"`serversync quarantine list --mailbox {ctx.mailbox.address}` or the admin "
                "UI's Quarantine page; fix the cause, then retry them (or discard them)",
                mailbox=ctx.mailbox.address, profile=ctx.profile.name,
                channel=Channel.INCOMING, created_at=ctx.now))
        for alert in plan.alerts:
            await repo.add_alert(alert)
        await store.save_cursor(ctx.mailbox_id, ctx.folder, Cursor(
            cursor.uidvalidity, cursor.last_uid, cursor.highest_modseq, cursor.token), ctx.now)


class Tracker:
    """What a set of parsed messages of one folder becomes, and writing it.

    The decisions of the incoming job, apart from fetching and cursors, so that a message
    retried from the quarantine (`services.quarantine`) goes through exactly the same
    duplicate check, correlation, tracking rules and loop guard as in a sync run.
    """

    def __init__(self, loop: tracking.LoopPolicy) -> None:
        self.loop = loop

    async def write(self, repo: Repository, store: IncomingStore, ctx: Context,
                    plan: Plan) -> None:
        """Activities (raw copies in the same pack), correlations, links and loop counters.

        Quarantine rows, alerts and the cursor are the caller's: a sync run adds new ones, a
        retry updates the row it came from.
        """
        ids = await store.add_activities(plan.activities, [
            (link.raw_sha256, link.raw) for link in plan.links if link.raw is not None])
        for index, target, method in plan.fixups:
            await store.set_correlation(ids[index], ids[target], method)
        await store.add_links(ctx.mailbox_id, plan.links, ids, ctx.now)
        if plan.windows:
            await store.save_loop_windows(plan.windows)

    def done_disposition(self, ctx: Context, message: RemoteMessage) -> Disposition:
        action = ctx.mailbox.after_processing
        if ctx.sent or action is AfterProcessing.LEAVE:
            return Disposition(message.remote_id, "leave")
        if action is AfterProcessing.MOVE:
            return Disposition(message.remote_id, "move", ctx.mailbox.after_processing_folder)
        return Disposition(message.remote_id, action.value)

    def failed_disposition(self, ctx: Context, message: RemoteMessage) -> Disposition:
        target = ctx.profile.move_failed_to_folder
        if target and ctx.profile.kind is ServerKind.IMAP:
            return Disposition(message.remote_id, "move", target)
        return Disposition(message.remote_id, "leave")

    async def plan(self, repo: Repository, store: IncomingStore, ctx: Context,
                   items: list[tuple[RemoteMessage, mime.ParsedMessage | ItemError]]) -> Plan:
        """Decide every item: quarantine, skip, link to an existing activity, or track."""
        plan = Plan()
        good = [(m, p) for m, p in items if isinstance(p, mime.ParsedMessage)]
        for message, result in items:
            if isinstance(result, ItemError):
                plan.quarantine.append((message, result.code, result.message))
                plan.links.append(NewLink(ctx.folder, message.remote_id, QUARANTINED))
                plan.dispositions.append(self.failed_disposition(ctx, message))
        if not good:
            return plan
        parsed = [p for _, p in good]
        settings = ctx.settings
        by_mid, by_hash = await store.existing(
            [p.message_id for p in parsed if p.message_id],
            [p.content_hash for p in parsed if not p.message_id])
        prefix = settings.tracking_token_prefix
        thread = [i for p in parsed for i in ([p.in_reply_to] if p.in_reply_to else [])
                  + list(p.references[-tracking.MAX_REFERENCES:])]
        tokens = [t for p in parsed if (t := find_token(p.subject, prefix)) is not None] \
            if settings.use_tracking_tokens else []
        conversations = [p.conversation_id for p in parsed if p.conversation_id]
        k_mid, k_id, k_conv = await store.correlation_rows(thread, tokens, conversations)
        recent = await store.recent(ctx.now - dt.timedelta(days=SMART_MATCH_DAYS)) \
            if settings.use_smart_matching and not ctx.sent else []
        addresses = {r.address for p in parsed for r in p.recipients}
        directory = await repo.parties_by_address(addresses)
        resolved = tracking.resolve_all(addresses, directory)
        windows = await store.loop_windows(p.sender for p in parsed if p.sender) \
            if not ctx.sent else {}
        owner = tracking.Receiver(ctx.mailbox.owner_kind, ctx.mailbox.owner,
                                  ctx.mailbox.tracking_rule)
        since = ctx.mailbox.process_email_from or ctx.profile.process_email_from
        loop_window = dt.timedelta(minutes=self.loop.minutes)
        batch_mid: dict[str, int] = {}
        batch_hash: dict[str, int] = {}
        mids, convs = dict(k_mid), dict(k_conv)  # grow with this batch's own activities
        index = tracking.CorrelationIndex(mids, k_id, convs, recent)

        for message, p in good:
            when = message.internal_date or p.sent_at
            if since is not None and when is not None and when < since:
                plan.links.append(NewLink(ctx.folder, message.remote_id, SKIPPED))
                plan.skipped += 1
                continue
            raw = message.raw if settings.keep_raw_messages else None
            # the same message already tracked (another mailbox, a Sent copy, a UIDVALIDITY
            # reset, or earlier in this batch): link it, never a second activity
            existing_id = by_mid.get(p.message_id) if p.message_id else by_hash.get(
                p.content_hash)
            batch_index = batch_mid.get(p.message_id) if p.message_id else batch_hash.get(
                p.content_hash)
            if existing_id is not None or batch_index is not None:
                plan.links.append(NewLink(ctx.folder, message.remote_id, LINKED,
                                          email_index=batch_index, email_id=existing_id,
                                          raw=raw, raw_sha256=p.content_hash))
                plan.dispositions.append(self.done_disposition(ctx, message))
                plan.linked += 1
                continue
            draft = self.activity(ctx, message, p, resolved)
            if ctx.sent:
                decision = tracking.Decision(True, "sent by the mailbox's owner",
                                             owner.kind.value, owner.key)
                correlation = tracking.correlate(
                    draft, index, token_prefix=prefix, use_tokens=settings.use_tracking_tokens)
            else:
                correlation = tracking.correlate(
                    draft, index, token_prefix=prefix, use_tokens=settings.use_tracking_tokens,
                    use_smart_matching=settings.use_smart_matching)
                decision = tracking.decide(
                    draft, sender=resolved.get(p.sender), correlation=correlation,
                    receivers_=tracking.receivers(draft, resolved, owner), mailbox_owner=owner)
            if not decision.track:
                plan.links.append(NewLink(ctx.folder, message.remote_id, SKIPPED))
                plan.skipped += 1
                continue
            recent_mail = when is None or ctx.now - when < loop_window
            if not ctx.sent and p.sender and recent_mail:
                # only mail that arrived inside the window counts: an initial sync of years
                # of one customer's mail is not a loop
                step = tracking.loop_step(windows.get(p.sender), ctx.now, self.loop)
                windows[p.sender] = step.window
                plan.windows[p.sender] = step.window
                if step.newly_paused:
                    plan.alerts.append(Alert(
                        Severity.WARNING, "sender-paused",
                        f"sender {p.sender} created more than {self.loop.threshold} "
                        f"activities in {self.loop.minutes} minutes and is paused; "
                        "its further mail is quarantined", "check for a mail loop or an "
                        "automated sender; resume it once fixed",
                        mailbox=ctx.mailbox.address, profile=ctx.profile.name,
                        channel=Channel.INCOMING, created_at=ctx.now))
                if not step.allowed:
                    plan.quarantine.append((message, "loop-guard",
                                            f"sender {p.sender} is paused by the loop guard"))
                    plan.links.append(NewLink(ctx.folder, message.remote_id, QUARANTINED))
                    plan.dispositions.append(self.failed_disposition(ctx, message))
                    continue
            known = correlation.activity
            activity = dataclasses.replace(
                draft, owner_kind=decision.owner_kind, owner=decision.owner,
                regarding=known.regarding if known else None,
                correlation=correlation.method,
                correlated_to=known.id if known and known.id > 0 else None)
            position = len(plan.activities)
            if known is not None and known.id < 0:
                plan.fixups.append((position, -known.id - 1, correlation.method.value))
            plan.activities.append(activity)
            plan.links.append(NewLink(ctx.folder, message.remote_id, TRACKED,
                                      email_index=position, raw=raw,
                                      raw_sha256=p.content_hash))
            plan.dispositions.append(self.done_disposition(ctx, message))
            plan.tracked += 1
            if p.message_id:
                batch_mid[p.message_id] = position
                # later messages of this batch may reply to this one
                mids[p.message_id] = tracking.KnownActivity(
                    -position - 1, activity.regarding, activity.owner_kind, activity.owner,
                    activity.subject)
            else:
                batch_hash[p.content_hash] = position
            if p.conversation_id and p.conversation_id not in convs:
                convs[p.conversation_id] = tracking.KnownActivity(
                    -position - 1, activity.regarding, activity.owner_kind, activity.owner,
                    activity.subject)
        return plan

    def activity(self, ctx: Context, message: RemoteMessage, p: mime.ParsedMessage,
                  resolved: Mapping[str, Party | None]) -> EmailActivity:
        recipients = []
        for r in p.recipients:
            party = resolved.get(r.address)
            recipients.append(Recipient(r.role, r.address, r.name,
                                        party.kind.value if party else None,
                                        party.key if party else None))
        token_id = find_token(p.subject, ctx.settings.tracking_token_prefix)
        return EmailActivity(
            direction=Direction.OUTGOING if ctx.sent else Direction.INCOMING,
            status=EmailStatus.SENT if ctx.sent else EmailStatus.RECEIVED,
            subject=p.subject, sender=p.sender, recipients=tuple(recipients),
            message_id=p.message_id, in_reply_to=p.in_reply_to, references=p.references,
            conversation_id=p.conversation_id,
            tracking_token=make_token(ctx.settings.tracking_token_prefix, token_id)
            if token_id is not None else None,
            sent_at=p.sent_at, received_at=message.internal_date or ctx.now,
            body_text=p.body_text, body_html=p.body_html, attachments=p.attachments,
            sender_mailbox=ctx.mailbox.address if ctx.sent else None,
            content_hash=p.content_hash, notices=p.notices, created_at=ctx.now)


