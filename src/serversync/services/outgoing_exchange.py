"""Outgoing email through Exchange: EWS ``CreateItem`` (on-premises) and Graph ``sendMail``.

Reference behaviour: ``dynamics-sss.md`` §3.7 (send as the mailbox's owner, record Sent or
Failed, count attempts) and §1.2–1.4 (Exchange access types). The outgoing channel job
(`services.outgoing.OutgoingService`) hands a run of an ``exchange`` or ``exchange-online``
mailbox to `ExchangeRun`; the lifecycle, the journal and the message are the SMTP path's own
(`store.outgoing`, `core.outgoing`, `core.compose`), only the submission differs:

* EWS: ``CreateItem`` with ``MessageDisposition="SendAndSaveCopy"`` and the Sent Items folder
  (``SendOnly`` when the email asks for no Sent copy), the MIME in ``MimeContent``; the
  ``ExchangeImpersonation`` header for impersonation, the owner's mailbox named in the folder
  id for delegation (the message then carries ``Sender:`` the delegate, send on behalf);
* Graph: ``POST /users/{id}/sendMail`` with the base64 MIME, app-only token.

Both get the message *with* its Bcc header (`Composed.sent_copy`): Exchange takes the
recipients from the MIME headers, removes Bcc from what it delivers and keeps it in the Sent
Items copy, which the server makes itself.

**Never twice.** As on SMTP, the email is journaled ``submitting`` (committed) before the send
call. HTTP gives the same blind spot as SMTP's DATA: a crash, or a connection that breaks
after the request left, leaves the outcome unknown. Such an email stays in *Sending*; once its
lease has expired, a later run looks its Message-ID up in the mailbox's Sent Items (EWS
``FindItem`` with an ``IsEqualTo`` restriction on ``message:InternetMessageId``; Graph
``mailFolders/sentitems/messages?$filter=internetMessageId eq '…'``). Found → *Sent*
(``recovered``); not found, or no copy was asked for → *Failed* with ``outcome-unknown``, not
resent (the rule of ``docs/outgoing.md``). Waiting for the lease matters: both servers file
the copy after submission, asynchronously, so an immediate lookup could miss it. Answers that
prove the server did not take the message (``ErrorServerBusy``, 429/503, quota) are retried
with backoff; a Graph 504 is not (``connectors.graph`` never retries ``sendMail`` on it).

Errors: throttling → the email is retried after ``backoff(attempts, server hint)`` and the
run raises `TransientError` (the runtime backs the channel off); an authentication or
permission refusal (``ErrorImpersonateUserDenied``, 401, 403 without Mail.Send, Send As
denied, no such mailbox) → the email goes back to *Pending Send* untouched and the run raises
`PermanentError` (the runtime disables the channel with the connector's fix); a refusal of
one message (``ErrorMessageSizeExceeded``, ``ErrorInvalidRecipients`` …) → that email
*Failed* with the server's reason.

One request at a time per mailbox (Exchange's per-mailbox concurrency budgets are small); the
outcome of each email is committed together with the next email's ``submitting`` mark.

Test hook: ``SERVERSYNC_TEST_CRASH_OUTGOING=after-exchange-send`` exits right after the
server accepted a message, before its outcome is committed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Protocol

from serversync.connectors import ews, graph
from serversync.connectors.net import ConnectOptions
from serversync.core.compose import Composed, ComposeError, compose
from serversync.core.email import EmailActivity, EmailStatus
from serversync.core.errors import (
    AuthError,
    ConfigError,
    PermanentError,
    SyncError,
    TransientError,
)
from serversync.core.model import AccessMode, Mailbox, Profile, ServerKind
from serversync.core.outgoing import (
    MAX_ATTEMPTS,
    CopyState,
    Phase,
    RecipientResult,
    RecipientStatus,
    backoff,
)
from serversync.core.rules import Login
from serversync.services.admin import connect_options
from serversync.services.channels import RunSummary
from serversync.services.outgoing import CRASH_ENV, CRASH_EXIT, OutgoingService, RunTally
from serversync.store.emails import EmailStore
from serversync.store.outgoing import Claimed, Finish, Journal, OutgoingStore

log = logging.getLogger("serversync.outgoing.exchange")

CRASH_AFTER_SEND = "after-exchange-send"
# Permanent errors that concern one message, not the channel: the connectors' codes for a
# response the server gave about this request (EWS response message, Graph 4xx).
MESSAGE_ERRORS = frozenset({"ews-error", "graph-error", "item-not-found"})


def _crash_point(name: str) -> None:
    """Test hook: die here without cleanup, as a killed process would."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(CRASH_EXIT)


class Submitter(Protocol):
    """One mailbox's submission API (EWS or Graph) for one run."""

    where: str

    async def open(self) -> None:
        """Log in and open Sent Items: proves credentials, rights and mailbox, sends nothing."""

    async def send(self, mime: bytes, *, save_copy: bool) -> str:
        """Submit; returns the server's answer, for the email's state."""

    def keeps_copy(self, save_copy: bool) -> bool:
        """Whether a sent message will be in Sent Items (the proof recovery looks for)."""

    def not_taken(self, error: TransientError) -> bool:
        """Whether the error proves the server did not take the message (safe to retry)."""

    async def sent_contains(self, message_id: str) -> bool: ...

    async def close(self) -> None: ...


class EwsSubmitter:
    """EWS CreateItem (SendAndSaveCopy) through `connectors.ews.EwsMailbox`."""

    # Response-level refusals: the server answered, and did not submit.
    _NOT_TAKEN = frozenset({"throttled", "server-busy", "send-quota"})

    def __init__(self, profile: Profile, login: Login, options: ConnectOptions) -> None:
        self.mailbox = ews.EwsMailbox(profile, login, options)
        self.where = f"EWS {self.mailbox.where}"

    async def open(self) -> None:
        await self.mailbox.folder_count("sentitems")

    async def send(self, mime: bytes, *, save_copy: bool) -> str:
        await self.mailbox.send(mime, save_copy=save_copy)
        return ("EWS CreateItem " + ("SendAndSaveCopy" if save_copy else "SendOnly")
                + ": NoError")

    def keeps_copy(self, save_copy: bool) -> bool:
        return save_copy

    def not_taken(self, error: TransientError) -> bool:
        return error.code in self._NOT_TAKEN

    async def sent_contains(self, message_id: str) -> bool:
        return await self.mailbox.sent_contains(message_id)

    async def close(self) -> None:
        await self.mailbox.close()


class GraphSubmitter:
    """Graph sendMail (MIME) through `connectors.graph.GraphClient`, app-only."""

    def __init__(self, profile: Profile, login: Login, options: ConnectOptions) -> None:
        self.client = graph.GraphClient(profile, login, options)
        self.where = f"Graph {self.client.root}"
        self._open = False

    async def open(self) -> None:
        await self.client.__aenter__()
        self._open = True
        # Sent Items is read here and by the recovery lookup: both permissions are needed
        await self.client.folder("sentitems",
                                 role=f"{graph.ROLE_MAIL_SEND} and {graph.ROLE_MAIL_READ}")

    async def send(self, mime: bytes, *, save_copy: bool) -> str:
        # A MIME sendMail always files a copy in Sent Items (`GraphClient.send_mime`).
        await self.client.send_mime(mime, save_copy=True)
        return "Graph sendMail: 202 Accepted"

    def keeps_copy(self, save_copy: bool) -> bool:
        return True

    def not_taken(self, error: TransientError) -> bool:
        return error.code == "throttled"  # 429 or 503 (sendMail is not retried on 504)

    async def sent_contains(self, message_id: str) -> bool:
        return await self.client.sent_contains(message_id)

    async def close(self) -> None:
        if self._open:
            self._open = False
            await self.client.__aexit__(None, None, None)


def submitter_for(profile: Profile, login: Login, options: ConnectOptions) -> Submitter:
    if profile.kind is ServerKind.EXCHANGE:
        return EwsSubmitter(profile, login, options)
    if profile.kind is ServerKind.EXCHANGE_ONLINE:
        return GraphSubmitter(profile, login, options)
    raise ConfigError("kind", f"{profile.kind} does not send through Exchange")


def channel_level(error: SyncError) -> bool:
    """A refusal that concerns every email of the mailbox (credentials, rights, mailbox)."""
    return isinstance(error, AuthError | ConfigError) or (
        isinstance(error, PermanentError) and error.code not in MESSAGE_ERRORS)


class ExchangeRun:
    """One run of the outgoing channel of one Exchange / Exchange Online mailbox."""

    def __init__(self, service: OutgoingService, mailbox: Mailbox, profile: Profile,
                 login: Login, *, submitter: Submitter | None = None) -> None:
        self.service = service
        self.db = service.db
        self.clock = service.clock
        self.mailbox = mailbox
        self.profile = profile
        self.login = login
        self.submitter = submitter or submitter_for(profile, login, connect_options(profile))
        self.on_behalf_of = login.user if login.mode is AccessMode.DELEGATION else None
        self.journal = Journal(self.db)
        self.tally = RunTally()
        self._outcomes: list[Finish] = []  # committed with the next mark, or at the end

    async def execute(self) -> RunSummary:
        address = self.mailbox.address
        now = self.clock()
        async with self.db.transaction() as repo:
            store = OutgoingStore(repo.session)
            stale = await store.stale(address, now)
            taken = set(await store.retake([c.email_id for c in stale], now,
                                           lease=self.service.lease, owner=self.service.worker))
            stale = [c for c in stale if c.email_id in taken]
            untried = [c.email_id for c in stale if c.phase is Phase.CLAIMED]
            await store.release(untried, now)
            claimed = await store.claim(address, now, limit=self.service.batch_size,
                                        lease=self.service.lease, owner=self.service.worker)
            activities = await EmailStore(repo.session).get_many(
                [c.email_id for c in claimed], with_content=True)
        self.tally.released += len(untried)
        uncertain = [c for c in stale if c.phase is not Phase.CLAIMED]
        if not uncertain and not claimed:
            return await self._summary()
        stop: SyncError | None = None
        try:
            try:
                await self.submitter.open()
                await self._recover(uncertain)
            except SyncError:  # nothing was sent: every claimed email goes back
                await self._release(claimed)
                raise
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.service.lease.total_seconds() / 2
            pending = list(claimed)
            while pending and stop is None and loop.time() < deadline:
                item = pending.pop(0)
                stop = await self._send_one(item, activities[item.email_id])
            await self.journal.write([], self._outcomes, self.clock())
            self._outcomes = []
            await self._release(pending)  # stopped early: those were never tried
        finally:
            await self.journal.close()
            await self.submitter.close()
        if stop is not None:
            raise stop
        return await self._summary()

    async def _summary(self) -> RunSummary:
        async with self.db.transaction() as repo:
            more = await OutgoingStore(repo.session).due_count(self.mailbox.address,
                                                               self.clock()) > 0
        return RunSummary(items=self.tally.sent, failures=self.tally.failed, more=more,
                          detail=self.tally.detail())

    async def _release(self, claimed: Sequence[Claimed]) -> None:
        if not claimed:
            return
        async with self.db.transaction() as repo:
            await OutgoingStore(repo.session).release([c.email_id for c in claimed],
                                                      self.clock())
        self.tally.released += len(claimed)

    # ------------------------------------------------------------ sending

    async def _send_one(self, claimed: Claimed, activity: EmailActivity) -> SyncError | None:
        """Send one email and queue its outcome; an error returned stops the run."""
        now = self.clock()
        try:
            composed = compose(activity, date=claimed.date_header, smtputf8_offered=False,
                               eightbit_offered=False, on_behalf_of=self.on_behalf_of,
                               priority=claimed.priority)
        except ComposeError as exc:
            self._fail(claimed, exc, ())
            return None
        unreachable = tuple(RecipientResult(a, RecipientStatus.REJECTED, 0, why)
                            for a, why in composed.unreachable.items())
        if not composed.recipients:
            self._fail(claimed, ComposeError("no recipient can be reached: " + "; ".join(
                f"{r.address}: {r.message}" for r in unreachable)), unreachable)
            return None
        # the "submitting" mark must be durable before the request leaves (with the earlier
        # outcomes, in one transaction)
        await self.journal.write([claimed.email_id], self._outcomes, now)
        self._outcomes = []
        try:
            reply = await self.submitter.send(composed.sent_copy,
                                              save_copy=claimed.save_to_sent)
        except TransientError as exc:
            if self.submitter.not_taken(exc):
                self._retry(claimed, exc, unreachable)
                return exc
            # the request may have been carried out: leave it "submitting" for recovery
            log.warning("outcome of email activity %s over %s unknown: %s", claimed.email_id,
                        self.submitter.where, exc.message)
            self.tally.unknown += 1
            return TransientError(
                f"{exc.message}; the email being sent may have gone out: it is checked in "
                "Sent Items once its lease expires, never sent twice", fix=exc.fix,
                code=exc.code, retry_after=exc.retry_after)
        except SyncError as exc:
            if channel_level(exc):  # refused before sending: untouched, channel disabled
                self._outcomes.append(Finish(
                    claimed.email_id, EmailStatus.PENDING_SEND, claimed.attempts - 1, now,
                    error=str(exc), error_code=exc.code))
                self.tally.released += 1
                return exc
            self._fail(claimed, exc, unreachable)
            return None
        except Exception as exc:  # a bug: fail this email (it may have gone out), go on
            log.exception("sending email activity %s failed unexpectedly", claimed.email_id)
            self._fail(claimed, SyncError(
                f"internal error while sending: {type(exc).__name__}: {exc}",
                fix="report it with the log; the email may or may not have been delivered",
                code="internal"), unreachable)
            return None
        _crash_point(CRASH_AFTER_SEND)
        keeps = self.submitter.keeps_copy(claimed.save_to_sent)
        self._record_sent(claimed, composed, reply, unreachable, now,
                          CopyState.DONE if keeps else CopyState.OFF)
        return None

    def _record_sent(self, claimed: Claimed, composed: Composed, reply: str,
                     unreachable: tuple[RecipientResult, ...], now: dt.datetime,
                     copy: CopyState) -> None:
        accepted = tuple(RecipientResult(a, RecipientStatus.ACCEPTED, 0, reply)
                         for a in composed.recipients)
        self._outcomes.append(Finish(
            claimed.email_id, EmailStatus.SENT, claimed.attempts, now,
            error="; ".join(f"not delivered to {r.address}: {r.message}"
                            for r in unreachable) or None,
            error_code="recipients-refused" if unreachable else None,
            recipients=(*accepted, *unreachable), sent_copy=copy, accepted_at=now,
            smtp_reply=reply, content_hash=hashlib.sha256(composed.raw).hexdigest()))
        self.tally.sent += 1

    def _fail(self, claimed: Claimed, error: SyncError,
              results: Sequence[RecipientResult]) -> None:
        self._outcomes.append(Finish(
            claimed.email_id, EmailStatus.FAILED, claimed.attempts, self.clock(),
            error=str(error), error_code=error.code, recipients=tuple(results)))
        self.tally.failed += 1

    def _retry(self, claimed: Claimed, error: TransientError,
               results: Sequence[RecipientResult]) -> None:
        if claimed.attempts >= MAX_ATTEMPTS:
            self._fail(claimed, TransientError(
                f"gave up after {claimed.attempts} attempts; last error: {error.message}",
                code=error.code), results)
            return
        now = self.clock()
        self._outcomes.append(Finish(
            claimed.email_id, EmailStatus.PENDING_SEND, claimed.attempts, now,
            next_attempt_at=now + backoff(claimed.attempts, error.retry_after),
            error=str(error), error_code=error.code, recipients=tuple(results)))
        self.tally.retried += 1

    # ------------------------------------------------------------ recovery

    async def _recover(self, uncertain: Sequence[Claimed]) -> None:
        """Decide emails a crashed run left ``submitting``: Sent Items is the proof."""
        outcomes: list[Finish] = []
        now = self.clock()
        for claimed in uncertain:
            found = False
            if self.submitter.keeps_copy(claimed.save_to_sent):
                try:
                    found = await self.submitter.sent_contains(claimed.message_id)
                except TransientError as exc:  # cannot decide now; the lease lapses again
                    log.warning("cannot look in Sent Items of %s: %s", self.mailbox.address,
                                exc.message)
                    continue
            if found:
                outcomes.append(Finish(
                    claimed.email_id, EmailStatus.SENT, claimed.attempts, now,
                    sent_copy=CopyState.DONE,
                    error="an interrupted run had sent it; its copy in Sent Items proves the "
                          "server accepted it", error_code="recovered"))
                self.tally.recovered += 1
            else:
                outcomes.append(Finish(
                    claimed.email_id, EmailStatus.FAILED, claimed.attempts, now,
                    error="a run was interrupted while this email was being submitted and "
                          "its Message-ID is not in Sent Items; the server may or may not "
                          "have accepted it, so it is not sent again automatically",
                    error_code="outcome-unknown"))
                self.tally.failed += 1
        if outcomes:
            async with self.db.transaction() as repo:
                await OutgoingStore(repo.session).finish(outcomes)
