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
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    bindparam,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from serversync.core.email import EmailStatus
from serversync.core.errors import NotFound
from serversync.core.outgoing import (
    CopyState,
    Phase,
    Priority,
    RecipientResult,
    RecipientStatus,
    SendState,
)
from serversync.core.times import utc as _utc
from serversync.store.db import Database
from serversync.store.emails import EmailRow
from serversync.store.tables import Base


class OutgoingRow(Base):
    __tablename__ = "outgoing"
    __table_args__ = (Index("ix_outgoing_mailbox_due", "mailbox", "due_at"),
                      Index("ix_outgoing_mailbox_phase", "mailbox", "phase"))

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


def _results(values: Sequence[dict[str, Any]] | None) -> tuple[RecipientResult, ...]:
    return tuple(RecipientResult(v["address"], RecipientStatus(v["status"]), int(v["code"]),
                                 v["message"]) for v in values or ())


def _results_json(results: Sequence[RecipientResult]) -> list[dict[str, Any]]:
    return [{"address": r.address, "status": r.status.value, "code": r.code,
             "message": r.message} for r in results]


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
        await self.session.execute(
            update(OutgoingRow).where(OutgoingRow.email_id.in_(taken))
            .values(attempts=OutgoingRow.attempts + 1, phase=Phase.CLAIMED.value,
                    lease_until=now + lease, lease_owner=owner,
                    date_header=func.coalesce(OutgoingRow.date_header, now), updated_at=now))
        rows = await self.session.scalars(select(OutgoingRow)
                                          .where(OutgoingRow.email_id.in_(taken)))
        by_id = {r.email_id: r for r in rows}
        return [self._claimed(by_id[i]) for i in ids if i in by_id]

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
            updated_at=bindparam("b_now", type_=_OUTGOING.c.updated_at.type)))


async def write_journal(connection: AsyncConnection, marks: Sequence[int],
                        outcomes: Sequence[Finish], now: dt.datetime | None) -> None:
    """"Submitting" marks and attempt outcomes, inside the caller's transaction."""
    if marks:
        await connection.execute(_MARK, [{"b_id": i, "b_now": now} for i in marks])
    if not outcomes:
        return
    await connection.execute(_EMAIL_OUTCOME, [
        {"b_id": f.email_id, "b_status": f.status.value,
         "b_sent_at": (f.accepted_at or f.now) if f.status is EmailStatus.SENT else None,
         "b_hash": f.content_hash} for f in outcomes])
    await connection.execute(_OUTGOING_OUTCOME, [
        {"b_id": f.email_id, "b_attempts": f.attempts,
         "b_phase": (Phase.QUEUED if f.status is EmailStatus.PENDING_SEND else Phase.DONE).value,
         "b_next": f.next_attempt_at,
         "b_due": f.next_attempt_at if f.status is EmailStatus.PENDING_SEND else None,
         "b_error": f.error, "b_code": f.error_code,
         "b_results": _results_json(f.recipients),
         "b_copy": f.sent_copy.value if f.sent_copy is not None else None,
         "b_accepted": f.accepted_at, "b_reply": f.smtp_reply, "b_now": f.now}
        for f in outcomes])


class Journal:
    """A connection kept for one run's journal writes: each flush is BEGIN, UPDATEs, COMMIT.

    Checking a pooled connection out and resetting it on return cost two more round trips
    to the driver's thread per transaction; the journal runs one transaction per message.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._connection: AsyncConnection | None = None

    async def write(self, marks: Sequence[int], outcomes: Sequence[Finish],
                    now: dt.datetime) -> None:
        if self._connection is None:
            self._connection = await self.db.engine.connect()
        try:
            async with self._connection.begin():
                await write_journal(self._connection, marks, outcomes, now)
        except BaseException:
            await self.close()  # a broken connection is not reused
            raise

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
