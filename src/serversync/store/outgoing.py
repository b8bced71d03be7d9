"""The send lifecycle of outgoing email activities, in the database.

One ``outgoing`` row per outgoing email activity (1:1 with ``emails.id``): the sender
mailbox, priority, Send Later time, attempts, the next attempt, the last error, the
per-recipient results, the Message-ID generated before the first attempt, the Date the
message carries, the state of the Sent-folder copy, and the pipeline's journal (`Phase`)
with the lease of the run that holds the email. The activity's status itself stays in
``emails.status`` (`core.email.EmailStatus`), so every reader of activities sees *Pending
Send*, *Sending*, *Sent* and *Failed* without knowing this table.

Claiming is atomic on both databases: ``UPDATE … WHERE status = 'pending-send' RETURNING``
(with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so two runs never take the same email.
Bulk updates use SQLAlchemy's executemany by primary key: one round trip per batch.

Deferred recipients (migration ``0014``): a *Sent* email whose recipients include some the
server deferred has ``deferred_due_at`` (the earliest of their next attempts) and its
transmitted bytes kept as a blob under ``emails.content_hash``. A follow-up is claimed like
an email (``claim_followups``: phase ``claimed``, lease) with the status left *Sent*; the
recipients it submits to are written to ``followup_recipients`` in the claim, so that a
crashed follow-up's recovery knows exactly whose outcome is unknown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.pool import NullPool

from serversync.core.email import EmailStatus
from serversync.core.errors import NotFound
from serversync.core.model import Channel, Severity
from serversync.core.outgoing import (
    CopyState,
    Phase,
    Priority,
    RecipientResult,
    RecipientStatus,
    SendState,
    deferred_due,
    due_recipients,
)
from serversync.core.times import utc as _utc
from serversync.store.db import Database, _sqlite_pragmas
from serversync.store.emails import BlobRow, EmailRow
from serversync.store.tables import AlertRow, Base, MailboxRow


class OutgoingRow(Base):
    __tablename__ = "outgoing"
    __table_args__ = (Index("ix_outgoing_mailbox_due", "mailbox", "due_at"),
                      Index("ix_outgoing_mailbox_phase", "mailbox", "phase"),
                      Index("ix_outgoing_mailbox_deferred", "mailbox", "deferred_due_at"))

    email_id: Mapped[int] = mapped_column(ForeignKey("emails.id", ondelete="CASCADE"),
                                          primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(320))
    priority: Mapped[int] = mapped_column(Integer, default=int(Priority.NORMAL))
    send_after: Mapped[dt.datetime | None]
    next_attempt_at: Mapped[dt.datetime | None]
    # max(created, send_after, next_attempt_at): the one column the claim query ranges over
    due_at: Mapped[dt.datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    phase: Mapped[str] = mapped_column(String(12), default=Phase.QUEUED.value)
    lease_until: Mapped[dt.datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_code: Mapped[str | None] = mapped_column(String(50))
    recipient_results: Mapped[list[Any]] = mapped_column(JSON, default=list)
    message_id: Mapped[str] = mapped_column(String(998), index=True)
    date_header: Mapped[dt.datetime | None]  # fixed at the first attempt; reused by retries
    reply_to_email_id: Mapped[int | None] = mapped_column(
        ForeignKey("emails.id", ondelete="SET NULL"))
    save_to_sent: Mapped[bool] = mapped_column(Boolean, default=True)
    sent_copy: Mapped[str] = mapped_column(String(10), default=CopyState.PENDING.value)
    accepted_at: Mapped[dt.datetime | None]
    smtp_reply: Mapped[str | None] = mapped_column(Text)
    # when the next follow-up to deferred recipients is due (NULL: none deferred); 0014
    deferred_due_at: Mapped[dt.datetime | None]
    # the recipients of the follow-up a run holds (NULL otherwise): its journal; 0014
    followup_recipients: Mapped[list[Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=func.now(),
                                                    onupdate=func.now())


@dataclass(frozen=True, slots=True)
class Claimed:
    """An email a run now holds (status Sending)."""

    email_id: int
    message_id: str
    attempts: int  # including the one now starting
    priority: Priority
    save_to_sent: bool
    date_header: dt.datetime
    phase: Phase  # CLAIMED for fresh claims; SUBMITTING/DONE for recovered ones
    # a follow-up: the deferred recipients it submits the Sent message to (else empty)
    followup: tuple[str, ...] = ()
    results: tuple[RecipientResult, ...] = ()  # per-recipient results so far (follow-ups)


@dataclass(frozen=True, slots=True)
class Finish:
    """The outcome of one attempt, written back in bulk (`OutgoingStore.finish`)."""

    email_id: int
    status: EmailStatus  # SENT, FAILED or PENDING_SEND (retry)
    attempts: int
    now: dt.datetime
    next_attempt_at: dt.datetime | None = None
    error: str | None = None
    error_code: str | None = None
    recipients: tuple[RecipientResult, ...] = ()
    sent_copy: CopyState | None = None
    accepted_at: dt.datetime | None = None
    smtp_reply: str | None = None
    content_hash: str | None = None
    # a Sent email with deferred recipients: when they are due, and the transmitted bytes
    # (kept as a blob, so follow-ups submit exactly the same message)
    deferred_due_at: dt.datetime | None = None
    raw: bytes | None = None
    followup: bool = False  # the outcome of a follow-up: only the recipients' side changes
    alert: str | None = None  # recipients given up: raised as an alert in the same commit


def _results(values: Sequence[dict[str, Any]] | None) -> tuple[RecipientResult, ...]:
    return tuple(RecipientResult(
        v["address"], RecipientStatus(v["status"]), int(v["code"]), v["message"],
        int(v.get("attempts") or 0),
        _utc(dt.datetime.fromisoformat(v["next_attempt_at"])) if v.get("next_attempt_at")
        else None) for v in values or ())


def _results_json(results: Sequence[RecipientResult]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in results:
        entry: dict[str, Any] = {"address": r.address, "status": r.status.value,
                                 "code": r.code, "message": r.message, "attempts": r.attempts}
        if r.next_attempt_at is not None:
            entry["next_attempt_at"] = r.next_attempt_at.isoformat()
        out.append(entry)
    return out


class OutgoingStore:
    """Reads and writes the send lifecycle inside the caller's transaction."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, email_id: int, *, mailbox: str, message_id: str, now: dt.datetime,
                  priority: Priority = Priority.NORMAL, send_after: dt.datetime | None = None,
                  reply_to_email_id: int | None = None, save_to_sent: bool = True) -> None:
        self.session.add(OutgoingRow(
            email_id=email_id, mailbox=mailbox, priority=int(priority), send_after=send_after,
            next_attempt_at=None, due_at=max(now, send_after) if send_after else now,
            attempts=0, phase=Phase.QUEUED.value, message_id=message_id,
            reply_to_email_id=reply_to_email_id, save_to_sent=save_to_sent,
            sent_copy=(CopyState.PENDING if save_to_sent else CopyState.OFF).value,
            recipient_results=[], created_at=now))
        await self.session.flush()

    async def set_tracking_token(self, email_id: int, token: str) -> None:
        await self.session.execute(update(EmailRow).where(EmailRow.id == email_id)
                                   .values(tracking_token=token))

    async def state(self, email_id: int) -> SendState:
        found = (await self.session.execute(
            select(OutgoingRow, EmailRow.status).join(EmailRow, EmailRow.id == OutgoingRow.email_id)
            .where(OutgoingRow.email_id == email_id))).first()
        if found is None:
            raise NotFound(f"email activity {email_id} is not an outgoing email",
                           fix="create outgoing email through the outgoing service")
        row, status = found
        return SendState(
            email_id=row.email_id, status=EmailStatus(status), mailbox=row.mailbox,
            priority=Priority(row.priority), message_id=row.message_id,
            send_after=_utc(row.send_after), next_attempt_at=_utc(row.next_attempt_at),
            attempts=row.attempts, phase=Phase(row.phase), last_error=row.last_error,
            last_error_code=row.last_error_code, recipients=_results(row.recipient_results),
            sent_copy=CopyState(row.sent_copy), accepted_at=_utc(row.accepted_at),
            smtp_reply=row.smtp_reply)

    async def cancel(self, email_id: int, now: dt.datetime) -> bool:
        """Pending Send → Canceled; False when it is no longer pending."""
        result = await self.session.execute(
            update(EmailRow).where(EmailRow.id == email_id,
                                   EmailRow.status == EmailStatus.PENDING_SEND.value)
            .values(status=EmailStatus.CANCELED.value))
        if not getattr(result, "rowcount", 0):
            return False
        await self.session.execute(update(OutgoingRow).where(OutgoingRow.email_id == email_id)
                                   .values(phase=Phase.DONE.value, updated_at=now))
        return True

    # ------------------------------------------------------------ the run

    async def due_count(self, mailbox: str, now: dt.datetime) -> int:
        count = await self.session.scalar(
            select(func.count()).select_from(OutgoingRow)
            .join(EmailRow, EmailRow.id == OutgoingRow.email_id)
            .where(OutgoingRow.mailbox == mailbox, OutgoingRow.due_at <= now,
                   EmailRow.status == EmailStatus.PENDING_SEND.value))
        return int(count or 0)

    async def claim(self, mailbox: str, now: dt.datetime, *, limit: int,
                    lease: dt.timedelta, owner: str) -> list[Claimed]:
        """Take up to ``limit`` due emails: highest priority first, then oldest due."""
        candidates = (select(EmailRow.id).join(OutgoingRow, OutgoingRow.email_id == EmailRow.id)
                      .where(OutgoingRow.mailbox == mailbox, OutgoingRow.due_at <= now,
                             EmailRow.status == EmailStatus.PENDING_SEND.value)
                      .order_by(OutgoingRow.priority.desc(), OutgoingRow.due_at, EmailRow.id)
                      .limit(limit))
        if self.session.get_bind().dialect.name == "postgresql":
            candidates = candidates.with_for_update(skip_locked=True, of=EmailRow)
        ids = list(await self.session.scalars(candidates))
        if not ids:
            return []
        taken = list(await self.session.scalars(
            update(EmailRow).where(EmailRow.id.in_(ids),
                                   EmailRow.status == EmailStatus.PENDING_SEND.value)
            .values(status=EmailStatus.SENDING.value).returning(EmailRow.id)))
        if not taken:
            return []
        # one Core statement returns what the run needs (loading ORM rows again cost as
        # much as the claim itself, on the event loop, while the sessions were sending)
        o = _OUTGOING.c
        rows = await self.session.execute(
            update(_OUTGOING).where(o.email_id.in_(taken))
            .values(attempts=o.attempts + 1, phase=Phase.CLAIMED.value,
                    lease_until=now + lease, lease_owner=owner,
                    date_header=func.coalesce(o.date_header, now), updated_at=now)
            .returning(o.email_id, o.message_id, o.attempts, o.priority, o.save_to_sent,
                       o.date_header, o.created_at))
        by_id = {r.email_id: Claimed(r.email_id, r.message_id, r.attempts,
                                     Priority(r.priority), r.save_to_sent,
                                     _utc(r.date_header) or _utc(r.created_at) or now,
                                     Phase.CLAIMED) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    @staticmethod
    def _claimed(row: OutgoingRow) -> Claimed:
        return Claimed(row.email_id, row.message_id, row.attempts, Priority(row.priority),
                       row.save_to_sent, _utc(row.date_header) or _utc(row.created_at)
                       or row.created_at, Phase(row.phase))

    async def stale(self, mailbox: str, now: dt.datetime, *, limit: int = 500) -> list[Claimed]:
        """Emails left in Sending by a run whose lease has expired (it crashed)."""
        rows = await self.session.scalars(
            select(OutgoingRow).join(EmailRow, EmailRow.id == OutgoingRow.email_id)
            .where(OutgoingRow.mailbox == mailbox,
                   EmailRow.status == EmailStatus.SENDING.value,
                   OutgoingRow.lease_until < now)
            .order_by(OutgoingRow.email_id).limit(limit))
        return [self._claimed(r) for r in rows]

    async def retake(self, email_ids: Sequence[int], now: dt.datetime, *,
                     lease: dt.timedelta, owner: str) -> list[int]:
        """Take over stale emails (only those whose lease is still expired)."""
        if not email_ids:
            return []
        return list(await self.session.scalars(
            update(OutgoingRow).where(OutgoingRow.email_id.in_(list(email_ids)),
                                      OutgoingRow.lease_until < now)
            .values(lease_until=now + lease, lease_owner=owner, updated_at=now)
            .returning(OutgoingRow.email_id)))

    async def pending_copies(self, mailbox: str, *, limit: int = 200) -> list[Claimed]:
        """Sent emails whose Sent-folder copy is still to be made."""
        rows = await self.session.scalars(
            select(OutgoingRow).join(EmailRow, EmailRow.id == OutgoingRow.email_id)
            .where(OutgoingRow.mailbox == mailbox, EmailRow.status == EmailStatus.SENT.value,
                   OutgoingRow.sent_copy == CopyState.PENDING.value)
            .order_by(OutgoingRow.email_id).limit(limit))
        return [self._claimed(r) for r in rows]

    # ------------------------------------------------------------ follow-ups

    def _skip_locked(self) -> bool:
        return self.session.get_bind().dialect.name == "postgresql"

    async def followups_due(self, mailbox: str, now: dt.datetime) -> int:
        """Sent emails with deferred recipients due for a follow-up."""
        count = await self.session.scalar(
            select(func.count()).select_from(OutgoingRow)
            .where(OutgoingRow.mailbox == mailbox, OutgoingRow.deferred_due_at <= now,
                   OutgoingRow.phase == Phase.DONE.value))
        return int(count or 0)

    async def claim_followups(self, mailbox: str, now: dt.datetime, *, limit: int,
                              lease: dt.timedelta, owner: str) -> list[Claimed]:
        """Take up to ``limit`` due follow-ups: phase ``claimed`` and a lease; status stays Sent.

        The recipients each one submits to (those deferred and due now) are written in the
        same transaction (``followup_recipients``), for recovery after a crash.
        """
        candidates = (select(OutgoingRow.email_id)
                      .join(EmailRow, EmailRow.id == OutgoingRow.email_id)
                      .where(OutgoingRow.mailbox == mailbox, OutgoingRow.deferred_due_at <= now,
                             OutgoingRow.phase == Phase.DONE.value,
                             EmailRow.status == EmailStatus.SENT.value)
                      .order_by(OutgoingRow.priority.desc(), OutgoingRow.deferred_due_at,
                                OutgoingRow.email_id)
                      .limit(limit))
        if self._skip_locked():
            candidates = candidates.with_for_update(skip_locked=True, of=OutgoingRow)
        ids = list(await self.session.scalars(candidates))
        if not ids:
            return []
        taken = set(await self.session.scalars(
            update(OutgoingRow).where(OutgoingRow.email_id.in_(ids),
                                      OutgoingRow.phase == Phase.DONE.value,
                                      OutgoingRow.deferred_due_at <= now)
            .values(phase=Phase.CLAIMED.value, lease_until=now + lease, lease_owner=owner,
                    updated_at=now).returning(OutgoingRow.email_id)))
        if not taken:
            return []
        rows = {r.email_id: r for r in await self.session.scalars(
            select(OutgoingRow).where(OutgoingRow.email_id.in_(taken)))}
        claimed: list[Claimed] = []
        journal: list[dict[str, Any]] = []
        for email_id in ids:
            row = rows.get(email_id)
            if row is None:
                continue
            results = _results(row.recipient_results)
            due = due_recipients(results, now)
            journal.append({"email_id": email_id, "followup_recipients": list(due) or None,
                            "phase": (Phase.CLAIMED if due else Phase.DONE).value,
                            "deferred_due_at": deferred_due(results),
                            "lease_until": now + lease if due else None,
                            "lease_owner": owner if due else None})
            if due:
                claimed.append(dataclasses.replace(self._claimed(row), phase=Phase.CLAIMED,
                                                   followup=due, results=results))
        await self.session.execute(update(OutgoingRow), journal)
        return claimed

    async def stale_followups(self, mailbox: str, now: dt.datetime, *,
                              limit: int = 500) -> list[Claimed]:
        """Follow-ups held by a run whose lease has expired (it crashed)."""
        rows = await self.session.scalars(
            select(OutgoingRow).join(EmailRow, EmailRow.id == OutgoingRow.email_id)
            .where(OutgoingRow.mailbox == mailbox,
                   EmailRow.status == EmailStatus.SENT.value,
                   OutgoingRow.phase.in_((Phase.CLAIMED.value, Phase.SUBMITTING.value)),
                   OutgoingRow.lease_until < now)
            .order_by(OutgoingRow.email_id).limit(limit))
        return [dataclasses.replace(
            self._claimed(r), followup=tuple(r.followup_recipients or ()),
            results=_results(r.recipient_results)) for r in rows]

    async def release_followups(self, email_ids: Sequence[int], now: dt.datetime) -> None:
        """Follow-ups the caller knows never reached DATA: as they were, due again."""
        if email_ids:
            await self.session.execute(
                update(OutgoingRow).where(OutgoingRow.email_id.in_(list(email_ids)),
                                          OutgoingRow.phase.in_((Phase.CLAIMED.value,
                                                                 Phase.SUBMITTING.value)))
                .values(phase=Phase.DONE.value, followup_recipients=None, lease_until=None,
                        lease_owner=None, updated_at=now))

    async def mark_submitting(self, email_ids: Sequence[int], now: dt.datetime) -> None:
        """The journal entry written just before SMTP DATA (see `core.outgoing.Phase`)."""
        await write_journal(await self.session.connection(), email_ids, (), now)

    async def release(self, email_ids: Sequence[int], now: dt.datetime) -> None:
        """Put claimed-but-untried emails back to Pending Send; the attempt did not happen.

        Only for emails the caller knows never reached DATA: those still ``claimed``, or
        marked ``submitting`` ahead by the live run that holds them and then not sent.
        """
        if not email_ids:
            return
        ids = list(email_ids)
        await self.session.execute(
            update(EmailRow).where(EmailRow.id.in_(ids),
                                   EmailRow.status == EmailStatus.SENDING.value)
            .values(status=EmailStatus.PENDING_SEND.value))
        await self.session.execute(
            update(OutgoingRow).where(OutgoingRow.email_id.in_(ids), OutgoingRow.phase.in_(
                (Phase.CLAIMED.value, Phase.SUBMITTING.value)))
            .values(attempts=OutgoingRow.attempts - 1, phase=Phase.QUEUED.value,
                    lease_until=None, lease_owner=None, updated_at=now))

    async def finish(self, outcomes: Sequence[Finish]) -> None:
        """Write the outcome of many attempts (two executemany statements)."""
        await write_journal(await self.session.connection(), (), outcomes, None)

    async def set_copy(self, states: Sequence[tuple[int, CopyState, str | None]],
                       now: dt.datetime) -> None:
        """Record Sent-folder copies made (or refused) after the email was already Sent."""
        plain = [{"email_id": i, "sent_copy": s.value, "updated_at": now}
                 for i, s, e in states if e is None]
        noted = [{"email_id": i, "sent_copy": s.value, "updated_at": now, "last_error": e}
                 for i, s, e in states if e is not None]
        for group in (plain, noted):
            if group:
                await self.session.execute(update(OutgoingRow), group)


# ---------------------------------------------------------------- the journal, in Core
#
# The send pipeline writes one small transaction per message or two ("submitting" before
# DATA, the outcome after). Through the ORM's bulk-update path those cost more CPU than the
# SMTP transaction itself, so they are fixed Core statements (compiled once, cached) run
# with executemany on a plain connection.

_EMAILS: Table = EmailRow.__table__  # type: ignore[assignment]
_OUTGOING: Table = OutgoingRow.__table__  # type: ignore[assignment]
_MARK = (update(_OUTGOING).where(_OUTGOING.c.email_id == bindparam("b_id"))
         .values(phase=Phase.SUBMITTING.value, updated_at=bindparam("b_now")))
_EMAIL_OUTCOME = (
    update(_EMAILS).where(_EMAILS.c.id == bindparam("b_id"))
    .values(status=bindparam("b_status"),
            sent_at=func.coalesce(bindparam("b_sent_at", type_=_EMAILS.c.sent_at.type),
                                  _EMAILS.c.sent_at),
            content_hash=func.coalesce(bindparam("b_hash", type_=String()),
                                       _EMAILS.c.content_hash)))
_OUTGOING_OUTCOME = (
    update(_OUTGOING).where(_OUTGOING.c.email_id == bindparam("b_id"))
    .values(attempts=bindparam("b_attempts"), phase=bindparam("b_phase"),
            lease_until=None, lease_owner=None,
            next_attempt_at=bindparam("b_next", type_=_OUTGOING.c.next_attempt_at.type),
            due_at=func.coalesce(bindparam("b_due", type_=_OUTGOING.c.due_at.type),
                                 _OUTGOING.c.due_at),
            last_error=bindparam("b_error", type_=Text()),
            last_error_code=bindparam("b_code", type_=String()),
            recipient_results=bindparam("b_results", type_=_OUTGOING.c.recipient_results.type),
            sent_copy=func.coalesce(bindparam("b_copy", type_=String()), _OUTGOING.c.sent_copy),
            accepted_at=func.coalesce(bindparam("b_accepted",
                                                type_=_OUTGOING.c.accepted_at.type),
                                      _OUTGOING.c.accepted_at),
            smtp_reply=func.coalesce(bindparam("b_reply", type_=Text()), _OUTGOING.c.smtp_reply),
            deferred_due_at=bindparam("b_deferred", type_=_OUTGOING.c.deferred_due_at.type),
            followup_recipients=None,
            updated_at=bindparam("b_now", type_=_OUTGOING.c.updated_at.type)))
# a follow-up changes only the recipients' side: the email stays Sent, its attempts, Sent
# copy, acceptance time and first reply stay as the first submission left them
_FOLLOWUP_OUTCOME = (
    update(_OUTGOING).where(_OUTGOING.c.email_id == bindparam("b_id"))
    .values(phase=Phase.DONE.value, lease_until=None, lease_owner=None,
            followup_recipients=None,
            deferred_due_at=bindparam("b_deferred", type_=_OUTGOING.c.deferred_due_at.type),
            last_error=bindparam("b_error", type_=Text()),
            last_error_code=bindparam("b_code", type_=String()),
            recipient_results=bindparam("b_results", type_=_OUTGOING.c.recipient_results.type),
            updated_at=bindparam("b_now", type_=_OUTGOING.c.updated_at.type)))
_BLOBS: Table = BlobRow.__table__  # type: ignore[assignment]
_ALERTS: Table = AlertRow.__table__  # type: ignore[assignment]
_MAILBOXES: Table = MailboxRow.__table__  # type: ignore[assignment]
RECIPIENTS_FAILED_FIX = ("the email reached its other recipients; check the address with the "
                         "recipient (or their administrator) and send them a new email")


def _keep_raw(connection: Connection, raws: Sequence[bytes]) -> None:
    """The transmitted bytes of emails with deferred recipients, as blobs (once each)."""
    dialect = connection.dialect.name
    for raw in raws:
        values = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw), "content": raw}
        if dialect == "postgresql":
            statement: Any = postgresql.insert(_BLOBS).values(**values).on_conflict_do_nothing()
        else:
            statement = sqlite.insert(_BLOBS).values(**values).on_conflict_do_nothing()
        connection.execute(statement)


def _raise_alerts(connection: Connection, outcomes: Sequence[Finish]) -> None:
    """An alert per email with recipients given up, on its sender mailbox (one commit)."""
    for f in outcomes:
        if f.alert is None:
            continue
        source = (select(literal(Severity.WARNING.value), literal("recipients-failed"),
                         literal(f.alert), literal(RECIPIENTS_FAILED_FIX), _MAILBOXES.c.id,
                         _MAILBOXES.c.profile_id, literal(Channel.OUTGOING.value),
                         literal(f.now, type_=_ALERTS.c.created_at.type))
                  .select_from(_OUTGOING.outerjoin(
                      _MAILBOXES, _MAILBOXES.c.address == _OUTGOING.c.mailbox))
                  .where(_OUTGOING.c.email_id == f.email_id))
        connection.execute(insert(_ALERTS).from_select(
            ["severity", "code", "message", "fix", "mailbox_id", "profile_id", "channel",
             "created_at"], source))


async def write_journal(connection: AsyncConnection, marks: Sequence[int],
                        outcomes: Sequence[Finish], now: dt.datetime | None) -> None:
    """"Submitting" marks and attempt outcomes, inside the caller's transaction."""
    await connection.run_sync(_write_journal, marks, outcomes, now)


def _write_journal(connection: Connection, marks: Sequence[int], outcomes: Sequence[Finish],
                   now: dt.datetime | None) -> None:
    if marks:
        connection.execute(_MARK, [{"b_id": i, "b_now": now} for i in marks])
    if not outcomes:
        return
    raws = [f.raw for f in outcomes if f.raw is not None]
    if raws:
        _keep_raw(connection, raws)
    followups = [f for f in outcomes if f.followup]
    if followups:
        connection.execute(_FOLLOWUP_OUTCOME, [
            {"b_id": f.email_id, "b_deferred": f.deferred_due_at, "b_error": f.error,
             "b_code": f.error_code, "b_results": _results_json(f.recipients),
             "b_now": f.now} for f in followups])
        outcomes = [f for f in outcomes if not f.followup]
    if any(f.alert for f in (*followups, *outcomes)):
        _raise_alerts(connection, [*followups, *outcomes])
    if not outcomes:
        return
    connection.execute(_EMAIL_OUTCOME, [
        {"b_id": f.email_id, "b_status": f.status.value,
         "b_sent_at": (f.accepted_at or f.now) if f.status is EmailStatus.SENT else None,
         "b_hash": f.content_hash} for f in outcomes])
    connection.execute(_OUTGOING_OUTCOME, [
        {"b_id": f.email_id, "b_attempts": f.attempts,
         "b_phase": (Phase.QUEUED if f.status is EmailStatus.PENDING_SEND else Phase.DONE).value,
         "b_next": f.next_attempt_at,
         "b_due": f.next_attempt_at if f.status is EmailStatus.PENDING_SEND else None,
         "b_error": f.error, "b_code": f.error_code,
         "b_results": _results_json(f.recipients),
         "b_copy": f.sent_copy.value if f.sent_copy is not None else None,
         "b_accepted": f.accepted_at, "b_reply": f.smtp_reply,
         "b_deferred": f.deferred_due_at if f.status is EmailStatus.SENT else None,
         "b_now": f.now}
        for f in outcomes])


def _sync_engine(db: Database) -> Engine | None:
    """A synchronous engine on the same database, for the journal's own thread.

    None for an in-memory SQLite database, which a second engine would not see.
    """
    url = make_url(db.url)
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:") or "mode=memory" in str(url.query):
            return None
        engine = create_engine(url.set(drivername="sqlite"), poolclass=NullPool)
        event.listen(engine, "connect", _sqlite_pragmas)  # WAL, busy timeout, as the app's
        return engine
    return create_engine(url.set(drivername="postgresql+psycopg"), poolclass=NullPool)


class Journal:
    """One run's journal writes: each flush is one transaction (BEGIN, UPDATEs, COMMIT).

    The transactions run on a synchronous connection of their own, in a thread of their
    own: through the async drivers every statement is a separate wait for the event loop
    (aiosqlite hands each call to its thread and wakes the loop with the result; psycopg
    awaits every round trip), four to five per transaction. While the sessions keep the
    loop busy each wait took 1-3 ms, so the "submitting" mark the sessions wait for took
    5-15 ms (docs/benchmarks.md). Here the loop is woken once, when the commit is done.
    An in-memory SQLite database, which another connection cannot see, keeps a pooled
    async connection instead.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._connection: AsyncConnection | None = None
        self._sync: Connection | None = None
        self._engine: Engine | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._async_only = False

    async def write(self, marks: Sequence[int], outcomes: Sequence[Finish],
                    now: dt.datetime) -> None:
        try:
            if self._async_only:
                await self._write_async(marks, outcomes, now)
                return
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="outgoing-journal")
            done = await asyncio.get_running_loop().run_in_executor(
                self._thread, self._write_sync, marks, outcomes, now)
            if not done:
                self._async_only = True
                await self._write_async(marks, outcomes, now)
        except BaseException:
            await self.close()  # a broken connection is not reused
            raise

    def _write_sync(self, marks: Sequence[int], outcomes: Sequence[Finish],
                    now: dt.datetime) -> bool:
        """In the journal's thread; False when the database needs the async connection."""
        if self._sync is None:
            self._engine = self._engine or _sync_engine(self.db)
            if self._engine is None:
                return False
            self._sync = self._engine.connect()
        connection = self._sync
        if connection.dialect.name == "postgresql":
            # pipeline mode: BEGIN, the UPDATEs and COMMIT in one round trip to the server;
            # the commit still waits for the result of every statement and the WAL flush
            driver = connection.connection.driver_connection
            assert driver is not None
            with driver.pipeline(), connection.begin():
                _write_journal(connection, marks, outcomes, now)
        else:
            with connection.begin():
                _write_journal(connection, marks, outcomes, now)
        return True

    async def _write_async(self, marks: Sequence[int], outcomes: Sequence[Finish],
                           now: dt.datetime) -> None:
        if self._connection is None:
            self._connection = await self.db.engine.connect()
        async with self._connection.begin():
            await write_journal(self._connection, marks, outcomes, now)

    def _close_sync(self) -> None:
        connection, self._sync = self._sync, None
        engine, self._engine = self._engine, None
        if connection is not None:
            connection.close()
        if engine is not None:
            engine.dispose()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
        thread, self._thread = self._thread, None
        if thread is not None:  # after any write still running in it
            try:
                await asyncio.get_running_loop().run_in_executor(thread, self._close_sync)
            finally:
                thread.shutdown(wait=False)
