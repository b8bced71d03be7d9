"""Outgoing email: the application's API, and the channel job that sends over SMTP.

Reference behaviour: ``dynamics-sss.md`` §3.7. The application creates an outgoing email
activity in *Pending Send* (`OutgoingService.create`) — sender mailbox, To/Cc/Bcc, subject,
text and HTML, attachments, a reply-to activity (In-Reply-To/References), Send Later,
priority — and may cancel it while it is pending. The sender mailbox's outgoing channel
(`OutgoingService.__call__`, a `ChannelJob`) sends due emails as the mailbox's owner:
*Pending Send → Sending → Sent*, or *Failed* with the server's reason, and appends a copy to
the mailbox's Sent folder (on by default).

One run, for one mailbox:

1. **Recover** what a crashed run left in *Sending* (its lease expired) — see below — and
   retry Sent-folder copies that could not be made earlier.
2. **Claim** due emails (highest priority first, then oldest) in chunks of `CLAIM_CHUNK`,
   one transaction each: status *Sending*, attempt counted, lease taken, Date fixed. The
   next chunk is claimed while the sessions send, up to ``batch_size`` per run.
3. **Send** them over up to ``min(max_sessions, profile.max_concurrent_connections)`` SMTP
   sessions side by side, each session reused for many messages and pipelining each
   envelope (`connectors.smtppipeline`). Before the first byte of a message's content, the
   email is journaled ``submitting`` (durably: `_Journal` group-commits the marks of all
   sessions together); each session marks its next email while the current one is on the
   wire, so the mark is rarely waited for.
4. **Copy** accepted messages to the Sent folder in batches (MULTIAPPEND, up to
   `COPY_SESSIONS` IMAP connections side by side), then **commit**
   their outcome (again group-committed): *Sent* with per-recipient results, or a retry with
   backoff (4xx, broken connection before DATA: attempts and next attempt are visible), or
   *Failed* (5xx, with the server's reason; or after `MAX_ATTEMPTS`).
5. **Follow-ups**: recipients a server deferred (4xx at RCPT) while accepting others are
   `deferred`, each with attempts and a next attempt; the run claims the due ones with its
   first chunk and submits the bytes first transmitted (kept as a blob) to them alone,
   through the same sessions and journal; the email stays *Sent* (docs/outgoing.md).

Whole-channel failures raise, for the runtime to disable the channel with an alert
(`services.runs.ChannelRunner`): an authentication failure or a server that refuses the
login this sender (``sender-not-owned``; that one email fails with the server's reason), and
an impersonation scope that excludes the mailbox. Untried emails go back to *Pending Send*.

**Never twice.** SMTP has no way to ask a server whether it took a message, so there is a
moment — between the end of DATA and our commit — in which a crash leaves the outcome
unknown. The mechanism:

* the ``submitting`` mark is committed before the message content is sent, so an email
  whose journal still says ``claimed`` certainly never reached DATA and is simply put back
  in *Pending Send*;
* the Sent-folder copy is made after the server's ``250`` and before the status commit, so
  for an email left ``submitting`` its stored Message-ID is looked up in the Sent folder: if
  the copy is there, the server accepted it and the email becomes *Sent* without resending;
* if it is not there (the crash hit between ``250`` and the copy, or during DATA, or saving
  to Sent is off), the email is **not** resent: it becomes *Failed* with code
  ``outcome-unknown`` and a reason saying it may have been delivered. Never twice wins over
  at least once; the window is two messages per SMTP session (the one in DATA, and the next
  one, marked ahead and not yet sent).

A follow-up has no such proof (the Sent copy dates from the first submission): one left
``submitting`` fails its recipients as "outcome unknown" and is never resent to them.

The crash test sets ``SERVERSYNC_TEST_CRASH_OUTGOING`` to ``after-data`` (exit right after
the server's ``250``; ``after-data@2``: the second time) or ``after-sent-copy`` (after the
copy, before the status commit).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import hashlib
import logging
import os
import socket
import ssl
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiosmtplib

from serversync.connectors import gmail, smtp, smtppipeline
from serversync.connectors.net import ConnectOptions, tls_context
from serversync.connectors.sentfolder import SentFolder
from serversync.core import rules
from serversync.core.compose import (
    Composed,
    ComposeError,
    compose,
    make_message_id,
    needs_smtputf8,
)
from serversync.core.email import (
    Attachment,
    Direction,
    EmailActivity,
    EmailStatus,
    Recipient,
    Regarding,
    Role,
)
from serversync.core.errors import (
    ConfigError,
    ItemError,
    NotFound,
    PermanentError,
    RuleViolation,
    SyncError,
    TransientError,
)
from serversync.core.model import (
    AccessMode,
    ApprovalStatus,
    Channel,
    Endpoint,
    Mailbox,
    Profile,
    ServerKind,
    SyncMethod,
    TlsMode,
)
from serversync.core.outgoing import (
    LEASE,
    MAX_ATTEMPTS,
    CopyState,
    Phase,
    Priority,
    RecipientResult,
    RecipientStatus,
    SendState,
    backoff,
    deferred_due,
    merge,
    settle,
    summary,
)
from serversync.core.rules import Login
from serversync.core.tokens import make_token
from serversync.services.admin import Clock, connect_options, utcnow
from serversync.services.channels import RunSummary
from serversync.store.db import Database
from serversync.store.emails import EmailStore
from serversync.store.outgoing import Claimed, Finish, Journal, OutgoingStore

log = logging.getLogger("serversync.outgoing")
_T = TypeVar("_T")

CRASH_ENV = "SERVERSYNC_TEST_CRASH_OUTGOING"
CRASH_EXIT = 86
BATCH_SIZE = 2000  # the most emails one run sends; `RunSummary.more` says when more are due
CLAIM_CHUNK = 200  # claimed per transaction; the next chunk is claimed while sending
FIRST_CHUNK = 50  # a small first chunk: sending starts sooner, the rest is claimed meanwhile
MAX_SESSIONS = 4  # per run; more gave no gain on a 2-core host (docs/benchmarks.md)
COPY_SESSIONS = 6  # IMAP connections appending Sent copies side by side (docs/outgoing.md)
COPY_BATCH = 32  # copies per MULTIAPPEND: large batches were slower on Dovecot
BUILD_SLICE = 16  # messages built between two turns of the event loop
JOURNAL_LANES = 2  # journal transactions in flight at once on PostgreSQL (`_Journal`)


_crash_hits: collections.Counter[str] = collections.Counter()


def _crash_point(name: str) -> None:
    """Test hook: die here without cleanup, as a killed process would.

    ``SERVERSYNC_TEST_CRASH_OUTGOING=after-data`` dies the first time, ``after-data@2``
    the second time the point is reached.
    """
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point == name:
        _crash_hits[name] += 1
        if _crash_hits[name] >= int(nth or 1):
            os._exit(CRASH_EXIT)


@dataclass(frozen=True, slots=True)
class Address:
    address: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class NewEmail:
    """What the application asks to send."""

    sender_mailbox: str
    subject: str
    to: Sequence[str | Address] = ()
    cc: Sequence[str | Address] = ()
    bcc: Sequence[str | Address] = ()
    text: str = ""
    html: str = ""
    attachments: Sequence[Attachment] = ()
    reply_to_activity: int | None = None  # In-Reply-To/References from that activity
    send_after: dt.datetime | None = None  # Send Later
    priority: Priority = Priority.NORMAL
    regarding: Regarding | None = None
    save_to_sent: bool = True


@dataclass
class _Item:
    claimed: Claimed
    activity: EmailActivity
    built: Composed | ComposeError | None = None  # built ahead, for capabilities `offers`
    taken: bool = False  # a session has started sending it
    offers: tuple[bool, bool] = (False, False)  # (SMTPUTF8, 8BITMIME) it was built for
    raw: bytes | None = None  # a follow-up's message: the bytes first transmitted


@dataclass
class RunTally:
    """What one outgoing run did, for its run record (SMTP and Exchange paths alike)."""

    sent: int = 0
    failed: int = 0
    retried: int = 0
    released: int = 0
    recovered: int = 0
    copies: int = 0
    unknown: int = 0
    # deferred recipients (SMTP): delivered by a follow-up, deferred (again), given up
    later: int = 0
    deferred: int = 0
    given_up: int = 0

    def detail(self) -> str:
        parts = [f"{n} {label}" for n, label in (
            (self.sent, "sent"), (self.failed, "failed"), (self.retried, "to retry"),
            (self.released, "put back"), (self.recovered, "recovered"),
            (self.copies, "Sent copies made late"),
            (self.unknown, "outcome unknown, decided after the lease"),
            (self.later, "deferred recipients delivered"),
            (self.deferred, "recipients deferred"),
            (self.given_up, "recipients given up")) if n]
        return ", ".join(parts) or "nothing due"


class _Journal:
    """Group commit: every write the sessions need, in as few transactions as possible.

    ``submitting`` waits until its mark is durable (it guards DATA); ``finish`` does not.
    While one transaction commits, the next batch of marks and outcomes accumulates. On
    PostgreSQL two transactions may be in flight at once (`JOURNAL_LANES`): a mark that
    arrived just after a commit started waited for that commit and then its own (two WAL
    flushes, ~10 ms under load); with a second lane it goes at once. The two never touch
    the same email (an email's outcome is only written after its mark returned). SQLite
    takes one writer at a time, so it keeps one lane.
    """

    def __init__(self, db: Database, clock: Clock) -> None:
        self.clock = clock
        lanes = JOURNAL_LANES if db.engine.dialect.name == "postgresql" else 1
        self._stores = [Journal(db) for _ in range(lanes)]
        self._free = list(self._stores)
        self._marks: list[tuple[int, asyncio.Future[None]]] = []
        self._finishes: list[Finish] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.error: BaseException | None = None

    async def submitting(self, email_id: int) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._marks.append((email_id, future))
        self._kick(urgent=True)
        await future

    def finish(self, outcome: Finish) -> None:
        self._finishes.append(outcome)
        self._kick(urgent=False)

    def _kick(self, *, urgent: bool) -> None:
        """Start a transaction; outcomes alone wait for one already running."""
        if self._free and (urgent or len(self._free) == len(self._stores)):
            task = asyncio.create_task(self._flush(self._free.pop()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self, store: Journal) -> None:
        try:
            while self._marks or self._finishes:
                marks, self._marks = self._marks, []
                finishes, self._finishes = self._finishes, []
                try:
                    await store.write([i for i, _ in marks], finishes, self.clock())
                except Exception as exc:  # the database is gone: nothing more may be sent
                    self.error = exc
                    for _, future in marks:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for _, future in marks:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._free.append(store)

    async def drain(self) -> None:
        while pending := [t for t in self._tasks if not t.done()]:
            await asyncio.gather(*(asyncio.shield(t) for t in pending))
        await self.close()
        if self.error is not None:
            raise TransientError(f"could not record outgoing email results ({self.error})",
                                 fix="check the database; emails left in Sending are "
                                     "recovered by the next run", code="store-failed")

    async def close(self) -> None:
        for store in self._stores:
            await store.close()


class _CopyLoop:
    """An event loop in a thread of its own, for the run's Sent-folder IMAP connections.

    A batch of copies is one MULTIAPPEND of ~0.6 MB: encrypting and writing it on the
    sessions' loop held that loop for several milliseconds per batch, while the SMTP
    replies of every session waited, and the copies' TLS and socket work (a third of the
    process's CPU) shared one thread with the sessions. On a loop of their own the copies
    run beside the sessions (OpenSSL and the socket release the GIL while they work).
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever,
                                            name="outgoing-copies", daemon=True)
            self._thread.start()
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    async def stop(self) -> None:
        """End the thread, after whatever still runs on its loop (a cancelled run's copy)."""
        if self._loop is None:
            return
        await self.run(_cancel_others())
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        assert thread is not None
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        loop.close()


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _Folder:
    """A `SentFolder` whose every call runs on the run's `_CopyLoop`."""

    def __init__(self, folder: SentFolder, loop: _CopyLoop) -> None:
        self._folder = folder
        self._loop = loop

    async def open(self) -> str:
        return await self._loop.run(self._folder.open())

    async def append(self, messages: Sequence[tuple[bytes, dt.datetime]]) -> None:
        await self._loop.run(self._folder.append(messages))

    async def contains(self, message_id: str) -> bool:
        return await self._loop.run(self._folder.contains(message_id))

    async def close(self) -> None:
        await self._loop.run(self._folder.close())


class OutgoingService:
    """The outgoing-email API for the application, and the outgoing channel job."""

    def __init__(self, db: Database, *, clock: Clock = utcnow, batch_size: int = BATCH_SIZE,
                 max_sessions: int = MAX_SESSIONS, lease: dt.timedelta = LEASE,
                 worker: str | None = None) -> None:
        self.db = db
        self.clock = clock
        self.batch_size = batch_size
        self.max_sessions = max_sessions
        self.lease = lease
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self._gates: dict[str, asyncio.Semaphore] = {}
        self._ehlo_name: str | None = None

    # ------------------------------------------------------------ the application's API

    async def create(self, new: NewEmail) -> EmailActivity:
        """Create an outgoing email activity in Pending Send (one transaction)."""
        now = self.clock()
        if new.send_after is not None and new.send_after.tzinfo is None:
            raise ConfigError("send_after", "has no time zone", fix="give an aware datetime")
        recipients: list[Recipient] = []
        for role, field_name, values in ((Role.TO, "to", new.to), (Role.CC, "cc", new.cc),
                                         (Role.BCC, "bcc", new.bcc)):
            for i, value in enumerate(values):
                entry = value if isinstance(value, Address) else Address(value)
                address = rules.check_address(f"{field_name}[{i}]", entry.address)
                recipients.append(Recipient(role, address, entry.name))
        if not recipients:
            raise ConfigError("to", "an email needs at least one recipient (To, Cc or Bcc)")
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(new.sender_mailbox)
            if mailbox.outgoing.method is not SyncMethod.SERVER_SIDE:
                raise RuleViolation(
                    f"mailbox {mailbox.address} does not send email (outgoing: none)",
                    fix=f"set outgoing: server-side on {mailbox.address} and Test & Enable it",
                    code="outgoing-off")
            settings = await repo.get_settings()
            for i, att in enumerate(new.attachments):
                if att.content is None:
                    raise ConfigError(f"attachments[{i}]", f"{att.name!r} has no content")
                if len(att.content) > settings.max_attachment_bytes:
                    raise ConfigError(
                        f"attachments[{i}]", f"{att.name!r} is larger than the "
                        f"{settings.max_attachment_bytes // 2**20} MB attachment limit",
                        fix="send a link instead, or raise max_attachment_bytes")
            emails = EmailStore(repo.session)
            in_reply_to: str | None = None
            references: tuple[str, ...] = ()
            regarding = new.regarding
            parent_id = new.reply_to_activity
            if parent_id is not None:
                parent = await emails.get(parent_id)
                if parent.message_id:
                    in_reply_to = parent.message_id
                    references = (*parent.references[-19:], parent.message_id)
                regarding = regarding or parent.regarding
            sender_name = next((p.name for p in (await repo.parties_by_address(
                [mailbox.address])).get(mailbox.address, []) if p.name), mailbox.name)
            activity = await emails.add(EmailActivity(
                direction=Direction.OUTGOING, status=EmailStatus.PENDING_SEND,
                subject=new.subject, sender=mailbox.address,
                recipients=(Recipient(Role.FROM, mailbox.address, sender_name), *recipients),
                message_id=make_message_id(mailbox.address, uuid.uuid4().hex),
                in_reply_to=in_reply_to, references=references, body_text=new.text,
                body_html=new.html,
                attachments=tuple(dataclasses.replace(a, size=len(a.content or b""))
                                  for a in new.attachments),
                owner_kind=mailbox.owner_kind.value, owner=mailbox.owner, regarding=regarding,
                sender_mailbox=mailbox.address, created_at=now))
            email_id, message_id = activity.id, activity.message_id
            assert email_id is not None and message_id is not None
            store = OutgoingStore(repo.session)
            if settings.use_tracking_tokens:
                token = make_token(settings.tracking_token_prefix, email_id)
                await store.set_tracking_token(email_id, token)
                activity = dataclasses.replace(activity, tracking_token=token)
            await store.add(email_id, mailbox=mailbox.address, message_id=message_id, now=now,
                            priority=new.priority, send_after=new.send_after, reply_to_email_id=parent_id,
                            save_to_sent=new.save_to_sent)
        return activity

    async def cancel(self, email_id: int) -> None:
        """Cancel an email that is still Pending Send."""
        async with self.db.transaction() as repo:
            store = OutgoingStore(repo.session)
            state = await store.state(email_id)
            if not await store.cancel(email_id, self.clock()):
                raise RuleViolation(
                    f"email activity {email_id} is {state.status.value}; only pending email "
                    "can be canceled", code="not-pending")

    async def state(self, email_id: int) -> SendState:
        async with self.db.transaction() as repo:
            return await OutgoingStore(repo.session).state(email_id)

    # ------------------------------------------------------------ the channel job

    async def __call__(self, address: str) -> RunSummary:
        """Send the due email of one mailbox once (`ChannelJob`)."""
        async with self.db.transaction() as repo:
            mailbox = await repo.get_mailbox(address)
            profile = await repo.get_profile(mailbox.profile)
            settings = await repo.get_settings()
        if mailbox.outgoing.method is not SyncMethod.SERVER_SIDE or not mailbox.outgoing.enabled:
            return RunSummary(detail="outgoing is not enabled for this mailbox; its email "
                                     "stays Pending Send until it is tested and enabled")
        if settings.process_only_approved_mailboxes and \
                mailbox.approval is not ApprovalStatus.APPROVED:
            return RunSummary(detail="the mailbox is not approved; its email stays Pending Send")
        try:
            login = rules.login_for(profile, mailbox, Channel.OUTGOING)
        except RuleViolation as exc:
            raise PermanentError(exc.message, fix=exc.fix, code=exc.code) from exc
        if profile.kind in (ServerKind.EXCHANGE, ServerKind.EXCHANGE_ONLINE):
            # EWS CreateItem / Graph sendMail, same journal: services/outgoing_exchange.py
            from serversync.services.outgoing_exchange import ExchangeRun
            return await ExchangeRun(self, mailbox, profile, login).execute()
        endpoint = profile.outgoing or (profile.incoming if profile.kind is ServerKind.GMAIL
                                        else None)
        if endpoint is None:
            raise PermanentError(f"profile {profile.name!r} has no outgoing (SMTP) server",
                                 fix="set outgoing host and port on the profile",
                                 code="no-outgoing-server")
        if self._ehlo_name is None:
            self._ehlo_name = await asyncio.to_thread(socket.getfqdn)
        gate = self._gates.setdefault(profile.name,
                                      asyncio.Semaphore(profile.max_concurrent_connections))
        run = _Run(self, mailbox, profile, login, endpoint, gate)
        return await run.execute()


class _Run:
    """One run of the outgoing channel of one mailbox."""

    def __init__(self, service: OutgoingService, mailbox: Mailbox, profile: Profile,
                 login: Login, endpoint: Endpoint, gate: asyncio.Semaphore) -> None:
        self.service = service
        self.db = service.db
        self.clock = service.clock
        self.mailbox = mailbox
        self.profile = profile
        self.login = login
        self.endpoint = endpoint
        self.gate = gate
        self.options: ConnectOptions = connect_options(profile)
        self.journal = _Journal(self.db, self.clock)
        self.tally = RunTally()
        self.queue: collections.deque[_Item] = collections.deque()
        self.fatal: SyncError | None = None
        self.connect_error: SyncError | None = None
        self.connected = False
        self.proven = asyncio.Event()
        self.deadline = 0.0
        self.copy_loop = _CopyLoop()
        self.sent_folder: _Folder | None = None
        self.sent_folder_error: SyncError | None = None
        self._copies: list[tuple[_Item, Composed, Finish]] = []
        self._copy_tasks: list[asyncio.Task[None]] = []
        self._copy_slots: dict[int, asyncio.Task[None]] = {}
        self._extra_folders: dict[int, _Folder] = {}
        self.on_behalf_of = login.user if login.mode is AccessMode.DELEGATION else None
        self._tls_context: ssl.SSLContext | None = None
        self._opening: asyncio.Task[_Folder | None] | None = None
        self._refill: asyncio.Task[None] | None = None
        self._offers: tuple[bool, bool] | None = None  # (SMTPUTF8, 8BITMIME) of the server
        self.claimed_count = 0
        self.exhausted = False  # nothing more to claim in this run
        self._folder_lock = asyncio.Lock()

    def _tls(self) -> ssl.SSLContext | None:
        """One verifying TLS context for every session of the run."""
        if self.endpoint.tls is TlsMode.NONE:
            return None
        if self._tls_context is None:
            self._tls_context = tls_context(self.options.ca_file)
        return self._tls_context

    @property
    def copies_possible(self) -> bool:
        return self.profile.kind is ServerKind.IMAP and self.profile.incoming is not None

    # ------------------------------------------------------------ run

    async def execute(self) -> RunSummary:
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.service.lease.total_seconds() / 2
        try:
            await self._recover()
            await self._claim()
            if self.copies_possible and any(i.claimed.save_to_sent and not i.claimed.followup
                                            for i in self.queue):
                # log in to IMAP while SMTP connects: the first copies need it at once
                self._opening = asyncio.create_task(self._open_sent_folder())
            if self.queue:
                sessions = max(1, min(self.service.max_sessions,
                                      self.profile.max_concurrent_connections, len(self.queue)))
                await asyncio.gather(*(self._worker(first=i == 0) for i in range(sessions)))
            if self._refill is not None:  # claimed while the sessions stopped: settle them
                await asyncio.gather(self._refill, return_exceptions=True)
            await self._finish_copies()
            await self._settle_untried()
            await self.journal.drain()
        finally:
            if self._opening is not None:
                await asyncio.gather(self._opening, return_exceptions=True)
            await self.journal.close()
            if self.sent_folder is not None:
                await self.sent_folder.close()
            for folder in self._extra_folders.values():
                await folder.close()
            await self.copy_loop.stop()
        if self.fatal is not None:
            raise self.fatal
        if self.connect_error is not None and not self.connected:
            raise self.connect_error
        async with self.db.transaction() as repo:
            store, now = OutgoingStore(repo.session), self.clock()
            more = await store.due_count(self.mailbox.address, now) > 0 or \
                await store.followups_due(self.mailbox.address, now) > 0
        return RunSummary(items=self.tally.sent + self.tally.later, failures=self.tally.failed,
                          more=more, detail=self.tally.detail())

    async def _claim(self) -> None:
        """Claim the next chunk of due email (one transaction) onto the queue.

        The first chunk starts the run; later ones are claimed while the sessions send
        (`_more`), so one run goes on with warm SMTP and IMAP connections until nothing is
        due, ``batch_size`` emails were taken, or the run's time is up.
        """
        chunk = CLAIM_CHUNK if self.claimed_count else min(FIRST_CHUNK, CLAIM_CHUNK)
        limit = min(chunk, self.service.batch_size - self.claimed_count)
        if limit <= 0:
            self.exhausted = True
            return
        followups: list[Claimed] = []
        async with self.db.transaction() as repo:
            store = OutgoingStore(repo.session)
            claimed = await store.claim(
                self.mailbox.address, self.clock(), limit=limit, lease=self.service.lease,
                owner=self.service.worker)
            if not self.claimed_count:  # deferred recipients: once per run, with the first
                followups = await store.claim_followups(
                    self.mailbox.address, self.clock(), limit=limit,
                    lease=self.service.lease, owner=self.service.worker)
        # read the contents after the claim committed: on SQLite a write transaction that
        # also loaded them held the write lock long enough to stall the journal marks
        async with self.db.transaction() as repo:
            emails = EmailStore(repo.session)
            activities = await emails.get_many([c.email_id for c in claimed], with_content=True)
            sent = await emails.get_many([c.email_id for c in followups])
            raws = {c.email_id: await _kept_raw(emails, sent[c.email_id]) for c in followups}
        self.claimed_count += len(claimed)
        if len(claimed) < limit:
            self.exhausted = True
        items = [_Item(c, activities[c.email_id]) for c in claimed]
        if self._offers is not None:
            # a chunk claimed while the sessions send: built a slice at a time, so their
            # replies are handled in between (all 200 at once held every session ~50 ms)
            for start in range(0, len(items), BUILD_SLICE):
                self._build(items[start:start + BUILD_SLICE], self._offers)
                await asyncio.sleep(0)
        self.queue.extend(items)
        self.queue.extend(_Item(c, sent[c.email_id], raw=raws[c.email_id]) for c in followups)

    def _kick_refill(self) -> None:
        """Start claiming the next chunk in the background when the queue runs low."""
        loop = asyncio.get_running_loop()
        if len(self.queue) < CLAIM_CHUNK and not self.exhausted and self.fatal is None \
                and (self._refill is None or self._refill.done()) \
                and loop.time() < self.deadline - 1:
            self._refill = asyncio.create_task(self._claim())

    async def _more(self) -> bool:
        """Whether there is more to send; waits for a chunk being claimed."""
        self._kick_refill()
        if not self.queue and self._refill is not None and not self._refill.done():
            try:
                await asyncio.shield(self._refill)
            except Exception as exc:  # the store failed: stop claiming; `more` tells the rest
                log.warning("claiming more outgoing email for %s failed: %s",
                            self.mailbox.address, exc)
                self.exhausted = True
        return bool(self.queue)

    async def _settle_untried(self) -> None:
        """Emails claimed but never tried: back to Pending Send, or a counted retry.

        Follow-ups alike: released as they were, or a counted attempt for their recipients.
        """
        untried = list(self.queue)
        self.queue.clear()
        if not untried:
            return
        if self.fatal is not None or self.connect_error is None:
            # stopped by a channel failure, or out of time: the attempt did not happen
            async with self.db.transaction() as repo:
                store = OutgoingStore(repo.session)
                await store.release([i.claimed.email_id for i in untried
                                     if not i.claimed.followup], self.clock())
                await store.release_followups([i.claimed.email_id for i in untried
                                               if i.claimed.followup], self.clock())
            self.tally.released += len(untried)
            return
        for item in untried:  # the server could not be reached: a failed attempt
            if item.claimed.followup:
                self._finish_followup(item, _all(item.claimed.followup, RecipientStatus.DEFERRED,
                                                 0, self.connect_error.message))
            else:
                self._retry(item, self.connect_error, ())

    # ------------------------------------------------------------ SMTP sessions

    async def _worker(self, *, first: bool) -> None:
        """One SMTP session, reused for message after message.

        Slow start: only the first session opens at once; the others wait until it has sent
        a message, so a wrong password or a refused sender costs one login and one email,
        not one per session.
        """
        loop = asyncio.get_running_loop()
        if not first:
            await self.proven.wait()
            if self.fatal is not None or self.connect_error is not None:
                return
        async with self.gate:
            client: _Client | None = None
            upcoming: tuple[_Item, asyncio.Future[None]] | None = None
            try:
                while (upcoming or self.queue or await self._more()) \
                        and self.fatal is None and loop.time() < self.deadline:
                    if client is None:
                        try:
                            client = await self._connect()
                            self.connected = True
                        except PermanentError as exc:
                            self.fatal = exc
                            return
                        except SyncError as exc:
                            self.connect_error = exc
                            return
                        if first:
                            self._build_ahead(client)
                        continue  # the queue may have drained while connecting
                    mark: asyncio.Future[None] | None = None
                    if upcoming is not None:
                        (item, mark), upcoming = upcoming, None
                    else:
                        item = self.queue.popleft()
                    self._kick_refill()
                    if self.proven.is_set() and self.queue:
                        # journal this session's next email while this one is on the wire:
                        # its mark is then durable before its own DATA without a wait
                        following = self.queue.popleft()
                        upcoming = (following, self._premark(following))
                    try:
                        keep = await self._send_one(client, item, mark)
                    except Exception as exc:  # a bug must not strand the batch in Sending
                        log.exception("sending email activity %s failed unexpectedly",
                                      item.claimed.email_id)
                        internal = (f"internal error while sending: {type(exc).__name__}: "
                                    f"{exc}")
                        if item.claimed.followup:  # the email was sent: its recipients fail
                            self._finish_followup(item, _all(
                                item.claimed.followup, RecipientStatus.FAILED, 0,
                                f"{internal}; it may or may not have been delivered"))
                        else:
                            self._fail(item, ItemError(
                                internal, fix="report it with the log; the email may or may "
                                              "not have been delivered", code="internal"), ())
                        keep = False
                    self.proven.set()
                    if not keep:
                        await _close(client)
                        client = None
            finally:
                self.proven.set()  # never leave the other sessions waiting
                if upcoming is not None:  # marked but never sent: back for another session
                    # its mark must be written before anyone may release it to Pending Send
                    await asyncio.gather(upcoming[1], return_exceptions=True)
                    self.queue.appendleft(upcoming[0])
                if client is not None:
                    await _close(client)

    def _mark(self, premark: asyncio.Future[None] | None,
              email_id: int) -> Callable[[], Awaitable[None]]:
        """What `_submit` awaits before DATA: the durable "submitting" mark of ``email_id``,
        or the one already on its way (``premark``) when the session marked it ahead."""
        async def mark() -> None:
            if premark is not None:
                await premark
            else:
                await self.journal.submitting(email_id)
        return mark

    def _premark(self, item: _Item) -> asyncio.Future[None]:
        future = asyncio.ensure_future(self.journal.submitting(item.claimed.email_id))
        # a failed mark is reported where it is awaited (before that email's DATA), or
        # by `_Journal.drain`; consume it here so an unused one is not logged as lost
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def _connect(self) -> _Client:
        """A pipelining submission session; aiosmtplib for XOAUTH2 (Gmail) logins."""
        assert self.service._ehlo_name is not None
        if self.profile.kind is ServerKind.GMAIL:
            return await smtp.connect(
                self.endpoint, self.login, self.options, local_hostname=self.service._ehlo_name,
                context=self._tls(),
                authenticator=gmail.smtp_authenticator(self.profile, self.login, self.options))
        return await smtppipeline.connect(self.endpoint, self.login, self.options,
                                          local_hostname=self.service._ehlo_name,
                                          context=self._tls())

    async def _send_one(self, client: _Client, item: _Item,
                        premark: asyncio.Future[None] | None = None) -> bool:
        """Send one email; record its outcome. False when the session must be replaced.

        ``premark`` is this email's "submitting" mark, started while the session's previous
        email was being sent; without it the mark is written as the envelope goes out.
        """
        if item.claimed.followup:
            return await self._send_followup(client, item, premark)
        now = self.clock()
        claimed, activity = item.claimed, item.activity
        item.taken = True
        offers = _offers(client)
        try:
            if item.built is not None and item.offers == offers:
                if isinstance(item.built, ComposeError):
                    raise item.built
                composed = item.built
            else:
                composed = compose(activity, date=claimed.date_header,
                                   smtputf8_offered=offers[0], eightbit_offered=offers[1],
                                   on_behalf_of=self.on_behalf_of, priority=claimed.priority)
            item.built = None  # the bytes are not needed after this attempt
            sender = smtp.envelope_sender(self.login)
            if not sender.isascii() and not composed.smtputf8:
                raise ComposeError(f"the envelope sender {sender} needs SMTPUTF8",
                                   fix="use an ASCII login name")
        except ComposeError as exc:
            self._fail(item, exc, ())
            return True
        unreachable = tuple(RecipientResult(a, RecipientStatus.REJECTED, 0, why)
                            for a, why in composed.unreachable.items())
        if not composed.recipients:
            self._fail(item, ComposeError("no recipient can be reached: " + "; ".join(
                f"{r.address}: {r.message}" for r in unreachable)), unreachable)
            return True

        mark = self._mark(premark, claimed.email_id)
        try:
            submission = await _submit(client, sender, composed.recipients, composed.raw,
                                       smtputf8=composed.smtputf8, eightbit=composed.eightbit,
                                       before_data=mark)
        except smtp.MessageRefused as exc:
            self._fail(item, exc, (*_results(exc.refused), *unreachable))
            return client.is_connected
        except smtp.MessageDeferred as exc:
            self._retry(item, exc, (*_results(exc.refused), *unreachable))
            return client.is_connected
        except smtp.OutcomeUnknown as exc:
            self._fail(item, exc, unreachable)
            return False
        except PermanentError as exc:  # sender-not-owned: this email and the channel fail
            self._fail(item, exc, unreachable)
            self.fatal = exc
            return False
        except TransientError as exc:  # connection lost before DATA: nothing was sent
            self._retry(item, exc, unreachable)
            return False
        _crash_point("after-data")
        # deferred recipients get their own attempts and next attempt (follow-ups)
        results = tuple(settle(r, claimed.attempts, now, progressed=True) for r in (
            *_accepted(submission), *_results(submission.refused), *unreachable))
        error, error_code = summary(results)
        due = deferred_due(results)
        self._count_recipients(results)
        outcome = Finish(
            claimed.email_id, EmailStatus.SENT, claimed.attempts, now, error=error,
            error_code=error_code, recipients=results, accepted_at=now,
            smtp_reply=submission.reply, content_hash=hashlib.sha256(composed.raw).hexdigest(),
            deferred_due_at=due, raw=composed.raw if due is not None else None,
            alert=_given_up_alert(claimed, (), results))
        if claimed.save_to_sent and self.copies_possible:
            self._queue_copy((item, composed, outcome))
        else:  # no copy wanted, or no IMAP folder to put it in (POP3 profiles)
            self._record_sent(outcome, CopyState.OFF)
        return True

    def _build_ahead(self, client: _Client) -> None:
        """Build every claimed message once the first session knows the server's extensions.

        Done here, before the other sessions start (and for each later chunk as it is
        claimed), building no longer runs between the sessions' network and journal
        callbacks. Interleaving it with sending (one message per loop iteration) was slower:
        while the event loop's thread computes, the SQLite driver's thread waits for the
        GIL, so every journal transaction got longer.
        """
        self._offers = _offers(client)
        self._build(self.queue, self._offers)

    def _build(self, items: Iterable[_Item], offers: tuple[bool, bool]) -> None:
        for item in items:
            if item.taken or item.built is not None or item.claimed.followup:
                continue  # a follow-up is sent with the bytes first transmitted
            try:
                item.built = compose(item.activity, date=item.claimed.date_header,
                                     smtputf8_offered=offers[0], eightbit_offered=offers[1],
                                     on_behalf_of=self.on_behalf_of,
                                     priority=item.claimed.priority)
            except ComposeError as exc:
                item.built = exc
            except Exception:  # a bug: leave it to _send_one, which fails just this email
                log.exception("building email activity %s failed", item.claimed.email_id)
                continue
            item.offers = offers

    # ------------------------------------------------------------ outcomes

    def _record_sent(self, outcome: Finish, copy: CopyState) -> None:
        self.journal.finish(dataclasses.replace(outcome, sent_copy=copy))
        self.tally.sent += 1

    def _fail(self, item: _Item, error: SyncError,
              results: Sequence[RecipientResult]) -> None:
        attempts = item.claimed.attempts
        self.journal.finish(Finish(
            item.claimed.email_id, EmailStatus.FAILED, attempts, self.clock(),
            error=str(error), error_code=error.code,
            recipients=tuple(dataclasses.replace(r, attempts=attempts) for r in results)))
        self.tally.failed += 1

    def _retry(self, item: _Item, error: SyncError,
               results: Sequence[RecipientResult]) -> None:
        attempts = item.claimed.attempts
        if attempts >= MAX_ATTEMPTS:
            self._fail(item, TransientError(
                f"gave up after {attempts} attempts; last error: {error.message}",
                code=error.code), results)
            return
        now = self.clock()
        retry_after = getattr(error, "retry_after", None)
        next_at = now + backoff(attempts, retry_after)
        self.journal.finish(Finish(
            item.claimed.email_id, EmailStatus.PENDING_SEND, attempts, now,
            next_attempt_at=next_at, error=str(error), error_code=error.code,
            recipients=tuple(dataclasses.replace(
                r, attempts=attempts,
                next_attempt_at=next_at if r.status is RecipientStatus.DEFERRED else None)
                for r in results)))
        self.tally.retried += 1

    def _count_recipients(self, results: Sequence[RecipientResult]) -> None:
        self.tally.deferred += sum(r.status is RecipientStatus.DEFERRED for r in results)
        self.tally.given_up += sum(r.status is RecipientStatus.FAILED for r in results)

    # ------------------------------------------------------------ follow-ups

    async def _send_followup(self, client: _Client, item: _Item,
                             premark: asyncio.Future[None] | None) -> bool:
        """Submit a Sent email's message again, to its deferred recipients alone.

        The bytes are the ones first transmitted (kept as a blob under the email's content
        hash), so the message — Message-ID, Date, boundaries — is the same; the Sent folder
        already has its copy. The "submitting" mark guards DATA exactly as for a first
        submission; its outcome is recorded per recipient. False: replace the session.
        """
        claimed = item.claimed
        recipients = claimed.followup
        item.taken = True
        raw, item.raw = item.raw, None
        if raw is None:
            self._finish_followup(item, _all(
                recipients, RecipientStatus.FAILED, 0,
                "the message as first transmitted is no longer stored, so it cannot be sent "
                "again unchanged"))
            return True
        sender = smtp.envelope_sender(self.login)
        smtputf8 = not raw.partition(b"\r\n\r\n")[0].isascii() or \
            any(needs_smtputf8(a) for a in (sender, *recipients))
        eightbit = not raw.isascii()
        offers = _offers(client)
        missing = [name for needed, offered, name in ((smtputf8, offers[0], "SMTPUTF8"),
                                                      (eightbit, offers[1], "8BITMIME"))
                   if needed and not offered]
        if missing:  # sent with it the first time: the server's configuration changed
            self._finish_followup(item, _all(
                recipients, RecipientStatus.DEFERRED, 0,
                f"the server no longer offers {' and '.join(missing)}, which this message "
                "was first sent with"))
            return True

        mark = self._mark(premark, claimed.email_id)
        try:
            submission = await _submit(client, sender, recipients, raw, smtputf8=smtputf8,
                                       eightbit=eightbit, before_data=mark)
        except smtp.MessageRefused as exc:  # MAIL FROM or DATA refused: no one got it
            self._finish_followup(item, (*_results(exc.refused), *_all(
                [a for a in recipients if a not in exc.refused], RecipientStatus.REJECTED,
                exc.reply_code, exc.message)))
            return client.is_connected
        except smtp.MessageDeferred as exc:
            self._finish_followup(item, (*_results(exc.refused), *_all(
                [a for a in recipients if a not in exc.refused], RecipientStatus.DEFERRED,
                exc.reply_code, exc.message)))
            return client.is_connected
        except smtp.OutcomeUnknown as exc:  # never twice: not retried, per recipient
            self._finish_followup(item, _all(recipients, RecipientStatus.FAILED, 0,
                                             f"{exc.message}; not sent to them again"))
            return False
        except PermanentError as exc:  # sender-not-owned: untouched, the channel stops
            self._finish_followup(item, ())
            self.fatal = exc
            return False
        except TransientError as exc:  # connection lost before DATA: a counted attempt
            self._finish_followup(item, _all(recipients, RecipientStatus.DEFERRED, 0,
                                             exc.message))
            return False
        _crash_point("after-data")
        self._finish_followup(item, (*_accepted(submission), *_results(submission.refused)))
        return True

    def _finish_followup(self, item: _Item, updates: Sequence[RecipientResult]) -> None:
        """Record a follow-up (no updates: released untouched, the attempt not counted)."""
        outcome = _followup_outcome(item.claimed, updates, self.clock())
        self.journal.finish(outcome)
        changed = {r.address for r in updates}
        mine = [r for r in outcome.recipients if r.address in changed]
        self.tally.later += sum(r.status is RecipientStatus.ACCEPTED for r in mine)
        self._count_recipients(mine)
        if not updates:
            self.tally.released += 1

    # ------------------------------------------------------------ Sent folder

    async def _open_sent_folder(self) -> _Folder | None:
        """The Sent folder, opened once per run; None when it cannot be reached."""
        async with self._folder_lock:
            return await self._open_sent_folder_locked()

    async def _open_sent_folder_locked(self) -> _Folder | None:
        if self.sent_folder is not None or self.sent_folder_error is not None:
            return self.sent_folder
        assert self.profile.incoming is not None
        try:
            login = rules.login_for(self.profile, self.mailbox, Channel.INCOMING)
            folder = _Folder(SentFolder(self.profile.incoming, login, self.options),
                             self.copy_loop)
            self.sent_folder = folder
            await folder.open()
        except SyncError as exc:
            if self.sent_folder is not None:
                await self.sent_folder.close()
                self.sent_folder = None
            self.sent_folder_error = exc
            log.warning("Sent folder of %s unavailable: %s", self.mailbox.address, exc.message)
        return self.sent_folder

    def _queue_copy(self, entry: tuple[_Item, Composed, Finish]) -> None:
        """Hand an accepted message to the copy sessions; open another when they lag."""
        self._copies.append(entry)
        self._copy_tasks = [t for t in self._copy_tasks if not t.done()]
        busy = {slot for slot, task in self._copy_slots.items() if not task.done()}
        if busy and (len(self._copies) < COPY_BATCH or self.sent_folder is None):
            return  # a running session takes it; extra sessions only for a backlog
        limit = max(1, min(COPY_SESSIONS, self.profile.max_concurrent_connections))
        slot = next((n for n in range(limit) if n not in busy), None)
        if slot is not None:
            task = asyncio.create_task(self._copy_loop(slot))
            self._copy_slots[slot] = task
            self._copy_tasks.append(task)

    async def _copy_folder(self, slot: int) -> _Folder | None:
        """Slot 0 is the run's Sent folder connection; the others open their own."""
        if slot == 0:
            return await self._open_sent_folder()
        folder = self._extra_folders.get(slot)
        if folder is None:
            assert self.profile.incoming is not None
            folder = _Folder(SentFolder(self.profile.incoming, rules.login_for(
                self.profile, self.mailbox, Channel.INCOMING), self.options), self.copy_loop)
            try:
                await folder.open()
            except SyncError as exc:
                await folder.close()
                log.warning("extra Sent folder session for %s not opened: %s",
                            self.mailbox.address, exc.message)
                return None
            self._extra_folders[slot] = folder
        return folder

    async def _copy_loop(self, slot: int) -> None:
        """Append accepted messages to Sent in batches, then record them as Sent.

        Up to `COPY_SESSIONS` of these run side by side, each on its own IMAP connection:
        Dovecot appends in parallel on separate connections (one connection: ~300
        messages/s; three: ~1,000/s on the test VM), so copies keep up with SMTP.
        """
        while self._copies:
            batch, self._copies = self._copies[:COPY_BATCH], self._copies[COPY_BATCH:]
            folder = await self._copy_folder(slot)
            if folder is None and slot != 0:
                self._copies[:0] = batch  # slot 0 takes them (or defers them to next run)
                self._queue_restart()
                return
            copy_state, note = CopyState.PENDING, None
            if folder is not None:
                try:
                    await folder.append([(c.sent_copy, i.claimed.date_header)
                                         for i, c, _ in batch])
                    copy_state = CopyState.DONE
                except PermanentError as exc:
                    copy_state, note = CopyState.FAILED, f"Sent copy not made: {exc.message}"
                except SyncError as exc:  # retried by the next run
                    log.warning("Sent copy for %s deferred: %s", self.mailbox.address,
                                exc.message)
                    await folder.close()
                    if slot == 0:
                        self.sent_folder = None
                    else:
                        self._extra_folders.pop(slot, None)
            _crash_point("after-sent-copy")
            for _, _, outcome in batch:
                if note:
                    outcome = dataclasses.replace(
                        outcome, error="; ".join(e for e in (outcome.error, note) if e))
                self._record_sent(outcome, copy_state)

    def _queue_restart(self) -> None:
        """Copies left by a session that gave up: slot 0 takes them if it is not running."""
        task = self._copy_slots.get(0)
        if self._copies and (task is None or task.done()):
            self._copy_slots[0] = asyncio.create_task(self._copy_loop(0))
            self._copy_tasks.append(self._copy_slots[0])

    async def _finish_copies(self) -> None:
        while True:
            tasks = [t for t in self._copy_tasks if not t.done()]
            if tasks:
                await asyncio.gather(*tasks)
                continue
            if not self._copies:
                break
            self._queue_restart()
        self._copy_tasks.clear()
        for folder in self._extra_folders.values():
            await folder.close()
        self._extra_folders.clear()

    # ------------------------------------------------------------ recovery

    async def _recover(self) -> None:
        """Settle what a crashed run left in Sending, and make late Sent copies."""
        now = self.clock()
        async with self.db.transaction() as repo:
            store = OutgoingStore(repo.session)
            stale = await store.stale(self.mailbox.address, now)
            taken = set(await store.retake([c.email_id for c in stale], now,
                                           lease=self.service.lease, owner=self.service.worker))
            stale = [c for c in stale if c.email_id in taken]
            untried = [c.email_id for c in stale if c.phase is Phase.CLAIMED]
            await store.release(untried, now)
            await self._recover_followups(store, now)
            copies = await store.pending_copies(self.mailbox.address) \
                if self.copies_possible else []
        self.tally.released += len(untried)
        uncertain = [c for c in stale if c.phase is not Phase.CLAIMED]
        if not uncertain and not copies:
            return
        folder = await self._open_sent_folder() if self.copies_possible else None
        outcomes: list[Finish] = []
        for claimed in uncertain:
            found = False
            if folder is not None and claimed.save_to_sent:
                try:
                    found = await folder.contains(claimed.message_id)
                except SyncError as exc:  # cannot decide now: leave it for the next run
                    log.warning("cannot check the Sent folder of %s: %s",
                                self.mailbox.address, exc.message)
                    continue
            elif claimed.save_to_sent and self.copies_possible:
                continue  # Sent folder unreachable: decide in a later run
            if found:
                outcomes.append(Finish(
                    claimed.email_id, EmailStatus.SENT, claimed.attempts, now,
                    sent_copy=CopyState.DONE, accepted_at=None,
                    error="an interrupted run had sent it; its copy in the Sent folder "
                          "proves the server accepted it", error_code="recovered"))
                self.tally.recovered += 1
            else:
                outcomes.append(Finish(
                    claimed.email_id, EmailStatus.FAILED, claimed.attempts, now,
                    error="a run was interrupted while this email was being submitted; the "
                          "server may or may not have accepted it, so it is not sent again "
                          "automatically", error_code="outcome-unknown"))
                self.tally.failed += 1
        if copies:
            await self._late_copies(copies, folder)
        if outcomes:
            async with self.db.transaction() as repo:
                await OutgoingStore(repo.session).finish(outcomes)

    async def _recover_followups(self, store: OutgoingStore, now: dt.datetime) -> None:
        """Follow-ups a crashed run held: released if DATA never started, else not resent.

        A follow-up has no proof to look for (the Sent copy was made by the first
        submission), so one marked ``submitting`` is settled like an email without proof:
        each of its recipients is failed as "outcome unknown", never submitted to again.
        """
        stale = await store.stale_followups(self.mailbox.address, now)
        taken = set(await store.retake([c.email_id for c in stale], now,
                                       lease=self.service.lease, owner=self.service.worker))
        stale = [c for c in stale if c.email_id in taken]
        untried = [c.email_id for c in stale if c.phase is Phase.CLAIMED]
        await store.release_followups(untried, now)
        self.tally.released += len(untried)
        outcomes = [_followup_outcome(c, _all(
            c.followup, RecipientStatus.FAILED, 0,
            "a run was interrupted while the message was being submitted to this recipient "
            "again; the server may or may not have accepted it, so it is not sent again "
            "automatically"), now) for c in stale if c.phase is Phase.SUBMITTING]
        for outcome in outcomes:
            self._count_recipients([r for r in outcome.recipients
                                    if r.status is RecipientStatus.FAILED])
        await store.finish(outcomes)

    async def _late_copies(self, copies: Sequence[Claimed], folder: _Folder | None) -> None:
        """Sent-folder copies that failed earlier: rebuild (same bytes) and append once."""
        if folder is None:
            return
        async with self.db.transaction() as repo:
            activities = await EmailStore(repo.session).get_many(
                [c.email_id for c in copies], with_content=True)
        done: list[tuple[int, CopyState, str | None]] = []
        for claimed in copies:
            try:
                if not await folder.contains(claimed.message_id):
                    composed = compose(activities[claimed.email_id], date=claimed.date_header,
                                       smtputf8_offered=True, eightbit_offered=True,
                                       on_behalf_of=self.on_behalf_of,
                                       priority=claimed.priority)
                    await folder.append([(composed.sent_copy, claimed.date_header)])
                    self.tally.copies += 1
                done.append((claimed.email_id, CopyState.DONE, None))
            except PermanentError as exc:
                done.append((claimed.email_id, CopyState.FAILED,
                             f"Sent copy not made: {exc.message}"))
            except SyncError as exc:
                log.warning("late Sent copy for %s deferred: %s", self.mailbox.address,
                            exc.message)
                break
        async with self.db.transaction() as repo:
            await OutgoingStore(repo.session).set_copy(done, self.clock())


# The send pipeline's SMTP session: our pipelining client, or aiosmtplib for XOAUTH2 (Gmail).
_Client = aiosmtplib.SMTP | smtppipeline.SubmissionClient


def _offers(client: _Client) -> tuple[bool, bool]:
    """(SMTPUTF8, 8BITMIME) as this session's server offers them."""
    return client.supports_extension("smtputf8"), client.supports_extension("8bitmime")


async def _close(client: _Client) -> None:
    if isinstance(client, smtppipeline.SubmissionClient):
        await client.close()
    else:
        await smtp.close(client)


def _results(refused: dict[str, tuple[int, str]]) -> tuple[RecipientResult, ...]:
    return tuple(RecipientResult(a, RecipientStatus.DEFERRED if 400 <= c < 500
                                 else RecipientStatus.REJECTED, c, m)
                 for a, (c, m) in refused.items())


def _accepted(submission: smtp.Submission) -> tuple[RecipientResult, ...]:
    return tuple(RecipientResult(a, RecipientStatus.ACCEPTED, c, m)
                 for a, (c, m) in submission.accepted.items())


def _all(addresses: Iterable[str], status: RecipientStatus, code: int,
         message: str) -> tuple[RecipientResult, ...]:
    return tuple(RecipientResult(a, status, code, message) for a in addresses)


async def _submit(client: _Client, sender: str, recipients: Sequence[str], raw: bytes, *,
                  smtputf8: bool, eightbit: bool,
                  before_data: Callable[[], Awaitable[None]]) -> smtp.Submission:
    if isinstance(client, smtppipeline.SubmissionClient):
        return await client.submit(sender, recipients, raw, smtputf8=smtputf8,
                                   eightbit=eightbit, before_data=before_data)
    return await smtp.submit(client, sender, recipients, raw, smtputf8=smtputf8,
                             eightbit=eightbit, before_data=before_data)


async def _kept_raw(emails: EmailStore, activity: EmailActivity) -> bytes | None:
    """The bytes a Sent email was first transmitted with (kept while recipients wait)."""
    if not activity.content_hash:
        return None
    try:
        raw = await emails.get_blob(activity.content_hash)
    except NotFound:
        return None
    return raw if hashlib.sha256(raw).hexdigest() == activity.content_hash else None


def _followup_outcome(claimed: Claimed, updates: Sequence[RecipientResult],
                      now: dt.datetime) -> Finish:
    """A follow-up's outcome: its recipients' new results merged into the email's.

    Each update counts one more attempt for that recipient (`core.outgoing.settle`: the
    same backoff and `MAX_ATTEMPTS` as whole-message retries); the email stays Sent.
    """
    before = {r.address: r for r in claimed.results}
    progressed = any(u.status is RecipientStatus.ACCEPTED for u in updates)
    settled = [settle(u, (before[u.address].attempts if u.address in before else 0) + 1, now,
                      progressed=progressed) for u in updates]
    results = merge(claimed.results, settled)
    error, code = summary(results)
    return Finish(claimed.email_id, EmailStatus.SENT, claimed.attempts, now, error=error,
                  error_code=code, recipients=results, deferred_due_at=deferred_due(results),
                  followup=True, alert=_given_up_alert(claimed, claimed.results, settled))


def _given_up_alert(claimed: Claimed, before: Sequence[RecipientResult],
                    after: Sequence[RecipientResult]) -> str | None:
    """The alert text when recipients of a Sent email were just given up on (else None)."""
    already = {r.address for r in before if r.status is RecipientStatus.FAILED}
    lost = [r for r in after if r.status is RecipientStatus.FAILED and r.address not in already]
    if not lost:
        return None
    return (f"email activity {claimed.email_id} ({claimed.message_id}) was sent, but not "
            "delivered to " + "; ".join(f"{r.address}: {r.message}" for r in lost))
