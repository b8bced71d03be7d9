"""Incoming sync state: item links, folder cursors, quarantine and loop-guard counters.

* ``incoming_links`` — one row per message processed in a mailbox folder, unique on
  (mailbox, folder, remote id). A remote id is ``"<UIDVALIDITY>:<UID>"`` on IMAP and the
  UIDL on POP3. ``email_id`` points at the activity (one activity may be linked from many
  receiving mailboxes); ``outcome`` says what happened (tracked, linked to an existing
  activity, skipped by the tracking rules, quarantined). Because every batch commits its
  links with its activities and cursor, a replayed batch finds its links and does nothing.
* ``incoming_cursors`` — per (mailbox, folder): UIDVALIDITY, last UID, HIGHESTMODSEQ.
* ``incoming_quarantine`` — a message that could not be tracked, with its raw bytes (a
  content-addressed ``blobs`` row; the bytes in a pack file, `store.blobfiles`, or inline),
  the error code and reason; and what an administrator did with it since
  (`services.quarantine`: retries, released when, by whom, as what).
* ``incoming_loop_guard`` — per sender: activities created in the current window and
  whether the sender is paused.

Activities are written in bulk here (one executemany per table and batch; on SQLite at the
driver level) because the per-row ORM path of `store.emails.EmailStore` costs more than
parsing; the rows are the same ``emails`` / ``email_recipients`` / ``email_attachments`` / ``blobs`` that
`EmailStore` reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    delete,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from serversync.core.email import EmailActivity, Regarding
from serversync.core.times import utc as _utc
from serversync.core.tracking import KnownActivity, LoopWindow
from serversync.store import blobfiles
from serversync.store.emails import AttachmentRow, BlobRow, EmailRecipientRow, EmailRow
from serversync.store.exchange import SyncTokenRow, SyncTokens
from serversync.store.tables import AlertRow, Base, MailboxRow

TRACKED, LINKED, SKIPPED, QUARANTINED = "tracked", "linked", "skipped", "quarantined"


class IncomingLinkRow(Base):
    __tablename__ = "incoming_links"
    __table_args__ = (UniqueConstraint("mailbox_id", "folder", "remote_id",
                                       name="uq_incoming_links_item"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    folder: Mapped[str] = mapped_column(String(255))
    remote_id: Mapped[str] = mapped_column(String(255))
    email_id: Mapped[int | None] = mapped_column(
        ForeignKey("emails.id", ondelete="SET NULL"), index=True)
    outcome: Mapped[str] = mapped_column(String(12))
    raw_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"))
    created_at: Mapped[dt.datetime] = mapped_column()


class IncomingCursorRow(Base):
    __tablename__ = "incoming_cursors"
    __table_args__ = (UniqueConstraint("mailbox_id", "folder", name="uq_incoming_cursors_folder"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    folder: Mapped[str] = mapped_column(String(255))
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    highest_modseq: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column()


class QuarantineRow(Base):
    __tablename__ = "incoming_quarantine"

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"),
                                            index=True)
    folder: Mapped[str] = mapped_column(String(255))
    remote_id: Mapped[str] = mapped_column(String(255))
    raw_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    size: Mapped[int] = mapped_column(Integer)
    code: Mapped[str] = mapped_column(String(50))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(index=True)
    released_at: Mapped[dt.datetime | None] = mapped_column()
    # migration 0013: NULL on rows written before it
    sent: Mapped[bool | None] = mapped_column(Boolean)  # read from the Sent folder
    internal_date: Mapped[dt.datetime | None] = mapped_column()  # the server's arrival date
    retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    retried_at: Mapped[dt.datetime | None] = mapped_column()
    released_by: Mapped[str | None] = mapped_column(String(100))
    outcome: Mapped[str | None] = mapped_column(String(12))  # tracked|linked|skipped|discarded


class LoopGuardRow(Base):
    __tablename__ = "incoming_loop_guard"

    sender: Mapped[str] = mapped_column(String(320), primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column()
    count: Mapped[int] = mapped_column(Integer, default=0)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)


class Cursor(NamedTuple):
    uidvalidity: int | None
    last_uid: int
    highest_modseq: int | None
    token: str | None = None  # EWS SyncState / Graph deltaLink, kept in store.exchange


@dataclasses.dataclass(frozen=True, slots=True)
class Quarantined:
    id: int
    mailbox_id: int
    folder: str
    remote_id: str
    raw_sha256: str
    size: int
    code: str
    reason: str
    created_at: dt.datetime
    mailbox: str = ""  # the mailbox's address
    sent: bool | None = None  # None: quarantined before this was recorded
    internal_date: dt.datetime | None = None
    retries: int = 0
    retried_at: dt.datetime | None = None
    released_at: dt.datetime | None = None
    released_by: str | None = None
    outcome: str | None = None  # how it left the quarantine; None while it is in it


DISCARDED = "discarded"


@dataclasses.dataclass(frozen=True, slots=True)
class NewLink:
    folder: str
    remote_id: str
    outcome: str
    email_index: int | None = None  # index into the batch's new activities ...
    email_id: int | None = None  # ... or an existing activity
    raw: bytes | None = None  # kept for audit when the settings say so
    raw_sha256: str | None = None  # its SHA-256 when known (the parser's content hash)


# Database column limits (PostgreSQL enforces them; SQLite does not).
_LIMITS = {"subject": None, "sender": 320, "message_id": 998, "conversation_id": 255,
           "tracking_token": 50, "owner": 255, "regarding_kind": 50, "regarding_key": 255,
           "sender_mailbox": 320}


def clean(text: str | None, limit: int | None = None) -> str | None:
    """Text any database accepts: no NUL, no lone surrogates, within the column's length."""
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text[:limit] if limit is not None else text


def _table(row: type[Base]) -> Table:
    """The Core table of a mapped class: bulk inserts skip the ORM's per-row bookkeeping."""
    return cast(Table, row.__table__)


# A mailbox's folder cursors and incoming sync tokens in one statement (`cursors`).
_C, _T = _table(IncomingCursorRow).c, _table(SyncTokenRow).c
_CURSORS = union_all(
    select(_C.folder, _C.uidvalidity, _C.last_uid, _C.highest_modseq,
           null().label("token")).where(_C.mailbox_id == bindparam("mailbox_id")),
    select(_T.folder, null(), literal(0), null(), _T.token).where(
        _T.mailbox_id == bindparam("mailbox_id"), _T.channel == "incoming"))


class IncomingStore:
    """Reads and writes incoming sync state inside the caller's transaction."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._stored: set[str] = set()  # blobs put in this transaction (by this store)

    # ------------------------------------------------------------ cursors and links

    async def cursor(self, mailbox_id: int, folder: str) -> Cursor | None:
        """(UIDVALIDITY, last UID, HIGHESTMODSEQ) of a folder, if it was synced before."""
        row = await self.session.scalar(select(IncomingCursorRow).where(
            IncomingCursorRow.mailbox_id == mailbox_id, IncomingCursorRow.folder == folder))
        token = await SyncTokens(self.session).get(mailbox_id, "incoming", folder)
        if row is None:
            return None if token is None else Cursor(None, 0, None, token)
        return Cursor(row.uidvalidity, row.last_uid, row.highest_modseq, token)

    async def cursors(self, mailbox_id: int) -> dict[str, Cursor]:
        """Every folder's cursor of a mailbox, in one statement (`cursor` for each folder)."""
        found: dict[str, Cursor] = {}
        for folder, uidvalidity, last_uid, modseq, token in await self.session.execute(
                _CURSORS, {"mailbox_id": mailbox_id}):
            had = found.get(folder)
            if token is not None:  # a sync_tokens row (beside the cursor row, if any)
                found[folder] = Cursor(had.uidvalidity, had.last_uid, had.highest_modseq,
                                       token) if had else Cursor(None, 0, None, token)
            else:
                found[folder] = Cursor(uidvalidity, last_uid, modseq,
                                       had.token if had else None)
        return found

    async def save_cursor(self, mailbox_id: int, folder: str, cursor: Cursor,
                          now: dt.datetime) -> None:
        if cursor.token is not None:
            await SyncTokens(self.session).put(mailbox_id, "incoming", folder, cursor.token, now)
        values = {"uidvalidity": cursor.uidvalidity, "last_uid": cursor.last_uid,
                  "highest_modseq": cursor.highest_modseq, "updated_at": now}
        result = await self.session.execute(
            update(IncomingCursorRow).where(IncomingCursorRow.mailbox_id == mailbox_id,
                                            IncomingCursorRow.folder == folder)
            .values(**values))
        if not getattr(result, "rowcount", 0):
            await self.session.execute(insert(IncomingCursorRow).values(
                mailbox_id=mailbox_id, folder=folder, **values))

    async def known(self, mailbox_id: int, folder: str, remote_ids: Sequence[str]) -> set[str]:
        """The remote ids of this folder that already have a link (processed before)."""
        found: set[str] = set()
        ids = list(dict.fromkeys(remote_ids))
        for i in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
            rows = await self.session.scalars(select(IncomingLinkRow.remote_id).where(
                IncomingLinkRow.mailbox_id == mailbox_id, IncomingLinkRow.folder == folder,
                IncomingLinkRow.remote_id.in_(ids[i:i + 900])))
            found.update(rows)
        return found

    async def links(self, mailbox_id: int) -> list[tuple[str, str, str, int | None]]:
        """(folder, remote id, outcome, email id) of a mailbox, for reports and tests."""
        rows = await self.session.execute(
            select(IncomingLinkRow.folder, IncomingLinkRow.remote_id, IncomingLinkRow.outcome,
                   IncomingLinkRow.email_id).where(IncomingLinkRow.mailbox_id == mailbox_id)
            .order_by(IncomingLinkRow.id))
        return [(f, r, o, e) for f, r, o, e in rows.all()]

    async def mailboxes_of(self, email_id: int) -> list[int]:
        rows = await self.session.scalars(select(IncomingLinkRow.mailbox_id).where(
            IncomingLinkRow.email_id == email_id).distinct())
        return sorted(rows)

    # ------------------------------------------------------------ lookups for one batch

    async def existing(self, message_ids: Iterable[str],
                       hashes: Iterable[str]) -> tuple[dict[str, int], dict[str, int]]:
        """Earliest activity per Message-ID, and per content hash (messages without one)."""
        by_mid: dict[str, int] = {}
        by_hash: dict[str, int] = {}
        mids, hs = sorted(set(message_ids)), sorted(set(hashes))
        for i in range(0, len(mids), 900):
            rows = await self.session.execute(
                select(EmailRow.message_id, func.min(EmailRow.id))
                .where(EmailRow.message_id.in_(mids[i:i + 900])).group_by(EmailRow.message_id))
            by_mid.update({m: e for m, e in rows.all() if m is not None})
        for i in range(0, len(hs), 900):
            rows = await self.session.execute(
                select(EmailRow.content_hash, func.min(EmailRow.id))
                .where(EmailRow.content_hash.in_(hs[i:i + 900]), EmailRow.message_id.is_(None))
                .group_by(EmailRow.content_hash))
            by_hash.update({h: e for h, e in rows.all() if h is not None})
        return by_mid, by_hash

    def _known(self, row: Any, addresses: dict[int, set[str]]) -> KnownActivity:
        regarding = None
        if row.regarding_kind and row.regarding_key:
            regarding = Regarding(row.regarding_kind, row.regarding_key)
        return KnownActivity(row.id, regarding, row.owner_kind, row.owner, row.subject or "",
                             frozenset(addresses.get(row.id, set()) | {row.sender}))

    _COLUMNS = (EmailRow.id, EmailRow.message_id, EmailRow.conversation_id,
                EmailRow.regarding_kind, EmailRow.regarding_key, EmailRow.owner_kind,
                EmailRow.owner, EmailRow.subject, EmailRow.sender)

    async def correlation_rows(self, message_ids: Sequence[str], ids: Sequence[int],
                               conversations: Sequence[str]) -> tuple[
            dict[str, KnownActivity], dict[int, KnownActivity], dict[str, KnownActivity]]:
        """Earlier activities by Message-ID, by id (tracking tokens), by conversation."""
        by_mid: dict[str, KnownActivity] = {}
        by_id: dict[int, KnownActivity] = {}
        by_conv: dict[str, KnownActivity] = {}
        conditions = []
        if message_ids:
            conditions.append(EmailRow.message_id.in_(sorted(set(message_ids))))
        if ids:
            conditions.append(EmailRow.id.in_(sorted(set(ids))))
        if conversations:
            conditions.append(EmailRow.conversation_id.in_(sorted(set(conversations))))
        if not conditions:
            return by_mid, by_id, by_conv
        rows = (await self.session.execute(
            select(*self._COLUMNS).where(or_(*conditions)).order_by(EmailRow.id))).all()
        for row in rows:
            known = self._known(row, {})
            if row.message_id:
                by_mid.setdefault(row.message_id, known)
            by_id[row.id] = known
            if row.conversation_id:
                by_conv.setdefault(row.conversation_id, known)
        return by_mid, by_id, by_conv

    async def recent(self, since: dt.datetime, limit: int = 2000) -> list[KnownActivity]:
        """Smart-matching candidates: the newest activities since ``since``, with addresses."""
        rows = (await self.session.execute(
            select(*self._COLUMNS).where(EmailRow.created_at >= since)
            .order_by(EmailRow.id.desc()).limit(limit))).all()
        addresses: dict[int, set[str]] = {}
        if rows:
            found = await self.session.execute(
                select(EmailRecipientRow.email_id, EmailRecipientRow.address)
                .where(EmailRecipientRow.email_id.in_([r.id for r in rows])))
            for email_id, address in found.all():
                addresses.setdefault(email_id, set()).add(address)
        return [self._known(r, addresses) for r in rows]

    # ------------------------------------------------------------ bulk writes

    def _sqlite(self) -> bool:
        return self.session.get_bind().dialect.name == "sqlite"

    async def _insert_many(self, table: Table, rows: list[dict[str, Any]], *,
                           ids: bool = False) -> list[int]:
        """Insert rows (all with the same keys); with ``ids``, return their ids in order.

        SQLite: one driver-level ``executemany`` of tuples converted by the columns' own
        bind processors (stored exactly as through SQLAlchemy, without its per-row
        parameter machinery, which cost more than SQLite's own work here). The new ids are
        consecutive and end at ``last_insert_rowid()``: the transaction holds SQLite's write
        lock from the first row to the last, and a rowid primary key takes max + 1.
        PostgreSQL: Core ``insert`` (psycopg pipelines the executemany).
        """
        if not rows:
            return []
        if not self._sqlite():
            await self.session.execute(insert(table), rows)
            return []
        conn = await self.session.connection()
        dialect = conn.dialect
        names = list(rows[0])
        processors = [table.c[n].type.dialect_impl(dialect).bind_processor(dialect)
                      for n in names]
        quote = dialect.identifier_preparer.quote
        sql = (f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)}) "
               f"VALUES ({', '.join('?' for _ in names)})")
        plain = [i for i, f in enumerate(processors) if f is None]
        if len(plain) == len(names):
            params = [tuple(r[n] for n in names) for r in rows]
        else:
            params = [tuple(v if f is None or v is None else f(v)
                            for v, f in zip((r[n] for n in names), processors, strict=True))
                      for r in rows]
        await conn.exec_driver_sql(sql, params)
        if not ids:
            return []
        last = int((await conn.exec_driver_sql("SELECT last_insert_rowid()")).scalar_one())
        return list(range(last - len(rows) + 1, last + 1))

    async def put_blobs(self, items: Sequence[tuple[str | None, bytes]]) -> list[str]:
        """Store each distinct content once; return the SHA-256 of every item, in order.

        An item may bring its digest (the parser already hashed the raw message); the rest
        are hashed in a worker thread (hashlib releases the GIL), off the event loop. New
        contents go to the blob directory when there is one (`store.blobfiles`: written
        and flushed before this transaction commits), else into the row.
        """
        digests, write = await self._start_blobs(items)
        await self._finish_blobs(write)
        return digests

    async def _start_blobs(self, items: Sequence[tuple[str | None, bytes]]) -> tuple[
            list[str], tuple[list[tuple[str, bytes]], asyncio.Future[list[str]] | None]]:
        """Hash, find what is new, and start writing it; `_finish_blobs` adds the rows.

        In between the caller may use the session (the pack is written in a worker thread);
        contents this store already put in this transaction are skipped without a query.
        """
        todo = [content for known, content in items if known is None]
        hashed = iter(await asyncio.to_thread(lambda: [blobfiles.digest(c) for c in todo])
                      if todo else [])
        digests = [known if known is not None else next(hashed) for known, _ in items]
        unique: dict[str, bytes] = {}
        for digest, (_, content) in zip(digests, items, strict=True):
            if digest not in self._stored:
                unique.setdefault(digest, content)
        keys = sorted(unique)
        present: set[str] = set()
        for i in range(0, len(keys), 900):
            present.update(await self.session.scalars(
                select(BlobRow.sha256).where(BlobRow.sha256.in_(keys[i:i + 900]))))
        self._stored.update(keys)
        new = [(k, unique[k]) for k in keys if k not in present]
        files = blobfiles.for_session(self.session) if new else None
        write = asyncio.ensure_future(asyncio.to_thread(files.write_many, new)) \
            if files is not None else None
        return digests, (new, write)

    async def _finish_blobs(self, started: tuple[list[tuple[str, bytes]],
                                                 asyncio.Future[list[str]] | None]) -> None:
        new, write = started
        if not new:
            return
        if write is None:
            rows = [{"sha256": k, "size": len(c), "content": c, "location": None}
                    for k, c in new]
        else:
            locations = await write
            rows = [{"sha256": k, "size": len(c), "content": b"", "location": loc}
                    for (k, c), loc in zip(new, locations, strict=True)]
        await self._insert_many(_table(BlobRow), rows)

    async def add_activities(self, activities: Sequence[EmailActivity],
                             raws: Sequence[tuple[str | None, bytes]] = ()) -> list[int]:
        """Insert activities with their recipients and attachments; ids in input order.

        ``raws`` are the batch's raw messages (digest, bytes) to keep: stored with the
        attachments in one pack (one flush per batch), written in a worker thread while the
        activity rows are inserted; `add_links` then finds them stored.
        """
        blobs = [(None, att.content) for a in activities for att in a.attachments
                 if att.content is not None]
        digests, started = await self._start_blobs([*blobs, *raws])
        try:
            return await self._add_activities(activities, iter(digests[:len(blobs)]),
                                              started)
        finally:
            write = started[1]
            if write is not None and not write.done():  # failed before the pack was used
                write.cancel()

    async def _add_activities(self, activities: Sequence[EmailActivity],
                              digests: Iterator[str],
                              started: tuple[list[tuple[str, bytes]],
                                             asyncio.Future[list[str]] | None]) -> list[int]:
        if not activities:
            await self._finish_blobs(started)
            return []
        rows = [{
            "direction": a.direction.value, "status": a.status.value,
            "subject": clean(a.subject), "sender": clean(a.sender, 320) or "",
            "message_id": clean(a.message_id, 998), "in_reply_to": clean(a.in_reply_to),
            "references": [clean(r) for r in a.references],
            "conversation_id": clean(a.conversation_id, 255),
            "tracking_token": clean(a.tracking_token, 50), "sent_at": a.sent_at,
            "received_at": a.received_at, "body_text": clean(a.body_text),
            "body_html": clean(a.body_html), "owner_kind": a.owner_kind,
            "owner": clean(a.owner, 255),
            "regarding_kind": clean(a.regarding.kind, 50) if a.regarding else None,
            "regarding_key": clean(a.regarding.key, 255) if a.regarding else None,
            "correlated_to": a.correlated_to, "correlation": a.correlation.value,
            "sender_mailbox": clean(a.sender_mailbox, 320), "content_hash": a.content_hash,
            "notices": [clean(n) for n in a.notices], "created_at": a.created_at,
        } for a in activities]
        # Core multi-row INSERT ... RETURNING (SQLAlchemy "insertmanyvalues"); rows are told
        # apart by (Message-ID, content hash), unique in a batch because duplicates are linked
        table = _table(EmailRow)
        if self._sqlite():
            ids = await self._insert_many(table, rows, ids=True)
        else:
            result = await self.session.execute(
                insert(table).returning(table.c.id, table.c.message_id, table.c.content_hash),
                rows)
            by_key = {(m, h): int(i) for i, m, h in result.all()}
            ids = [by_key[(r["message_id"], r["content_hash"])] for r in rows]
        recipients = [{"email_id": i, "position": p, "role": r.role.value,
                       "address": clean(r.address, 320) or "", "name": clean(r.name) or "",
                       "party_kind": r.party_kind, "party_key": clean(r.party_key, 255)}
                      for i, a in zip(ids, activities, strict=True)
                      for p, r in enumerate(a.recipients)]
        if recipients:
            await self._insert_many(_table(EmailRecipientRow), recipients)
        await self._finish_blobs(started)
        attachments = [{"email_id": i, "position": p, "name": clean(att.name) or "",
                        "content_type": clean(att.content_type, 255) or "",
                        "size": att.size, "content_id": clean(att.content_id, 998),
                        "blob_sha256": next(digests) if att.content is not None else None,
                        "notice": clean(att.notice) or ""}
                       for i, a in zip(ids, activities, strict=True)
                       for p, att in enumerate(a.attachments)]
        if attachments:
            await self._insert_many(_table(AttachmentRow), attachments)
        return ids

    async def set_correlation(self, email_id: int, correlated_to: int, method: str) -> None:
        await self.session.execute(update(EmailRow).where(EmailRow.id == email_id).values(
            correlated_to=correlated_to, correlation=method))

    async def add_links(self, mailbox_id: int, links: Sequence[NewLink], new_ids: Sequence[int],
                        now: dt.datetime) -> None:
        raws = iter(await self.put_blobs([(link.raw_sha256, link.raw) for link in links
                                          if link.raw is not None]))
        rows = [{"mailbox_id": mailbox_id, "folder": link.folder, "remote_id": link.remote_id,
                 "email_id": new_ids[link.email_index] if link.email_index is not None
                 else link.email_id, "outcome": link.outcome,
                 "raw_sha256": next(raws) if link.raw is not None else None,
                 "created_at": now} for link in links]
        if rows:
            await self._insert_many(_table(IncomingLinkRow), rows)

    # ------------------------------------------------------------ quarantine

    async def quarantine(self, mailbox_id: int, folder: str, remote_id: str, raw: bytes,
                         code: str, reason: str, now: dt.datetime, *, sent: bool = False,
                         internal_date: dt.datetime | None = None) -> None:
        digest = (await self.put_blobs([(None, raw)]))[0]
        await self.session.execute(insert(QuarantineRow).values(
            mailbox_id=mailbox_id, folder=folder, remote_id=remote_id, raw_sha256=digest,
            size=len(raw), code=code, reason=clean(reason) or "", created_at=now, sent=sent,
            internal_date=internal_date, retries=0))

    async def quarantined(self, mailbox_id: int | None = None,
                          include_released: bool = False, *, ids: Sequence[int] | None = None,
                          before_id: int | None = None, limit: int | None = None,
                          newest_first: bool = False) -> list[Quarantined]:
        """Quarantined messages, oldest first (``newest_first`` for listings; page with
        ``before_id``), with their mailbox's address."""
        query = select(QuarantineRow, MailboxRow.address).join(
            MailboxRow, MailboxRow.id == QuarantineRow.mailbox_id).order_by(
            QuarantineRow.id.desc() if newest_first else QuarantineRow.id)
        if mailbox_id is not None:
            query = query.where(QuarantineRow.mailbox_id == mailbox_id)
        if not include_released:
            query = query.where(QuarantineRow.released_at.is_(None))
        if ids is not None:
            query = query.where(QuarantineRow.id.in_(list(ids)))
        if before_id is not None:
            query = query.where(QuarantineRow.id < before_id)
        if limit is not None:
            query = query.limit(limit)
        return [Quarantined(r.id, r.mailbox_id, r.folder, r.remote_id, r.raw_sha256, r.size,
                            r.code, r.reason, _utc(r.created_at) or r.created_at, address,
                            r.sent, _utc(r.internal_date), r.retries, _utc(r.retried_at),
                            _utc(r.released_at), r.released_by, r.outcome)
                for r, address in (await self.session.execute(query)).all()]

    async def claim_quarantined(self, quarantine_id: int, now: dt.datetime) -> bool:
        """Count a retry of a message still in quarantine; False if it was released.

        An UPDATE first: on PostgreSQL it locks the row until the caller's transaction ends,
        so a second retry of the same message waits and then finds it released (on SQLite
        the database's single writer does the same).
        """
        result = await self.session.execute(
            update(QuarantineRow).where(QuarantineRow.id == quarantine_id,
                                        QuarantineRow.released_at.is_(None))
            .values(retries=QuarantineRow.retries + 1, retried_at=now))
        return bool(getattr(result, "rowcount", 0))

    async def release_quarantined(self, quarantine_id: int, now: dt.datetime, by: str,
                                  outcome: str) -> bool:
        """Take a message out of the quarantine; False if it had already left it."""
        result = await self.session.execute(
            update(QuarantineRow).where(QuarantineRow.id == quarantine_id,
                                        QuarantineRow.released_at.is_(None))
            .values(released_at=now, released_by=clean(by, 100), outcome=outcome))
        return bool(getattr(result, "rowcount", 0))

    async def requarantine(self, quarantine_id: int, code: str, reason: str) -> None:
        """A retry failed again: the row keeps the message with the new reason."""
        await self.session.execute(update(QuarantineRow).where(
            QuarantineRow.id == quarantine_id).values(code=code[:50],
                                                      reason=clean(reason) or ""))

    async def open_quarantine(self, mailbox_id: int) -> int:
        """How many of a mailbox's messages are still in quarantine."""
        return int(await self.session.scalar(
            select(func.count()).select_from(QuarantineRow).where(
                QuarantineRow.mailbox_id == mailbox_id,
                QuarantineRow.released_at.is_(None))) or 0)

    async def link(self, mailbox_id: int, folder: str,
                   remote_id: str) -> tuple[str, int | None] | None:
        """(outcome, email id) of one processed message, if it has a link."""
        row = (await self.session.execute(
            select(IncomingLinkRow.outcome, IncomingLinkRow.email_id).where(
                IncomingLinkRow.mailbox_id == mailbox_id, IncomingLinkRow.folder == folder,
                IncomingLinkRow.remote_id == remote_id))).first()
        return None if row is None else (row[0], row[1])

    async def drop_link(self, mailbox_id: int, folder: str, remote_id: str) -> None:
        """Remove a message's link, so that a retry writes the new one (same transaction)."""
        await self.session.execute(delete(IncomingLinkRow).where(
            IncomingLinkRow.mailbox_id == mailbox_id, IncomingLinkRow.folder == folder,
            IncomingLinkRow.remote_id == remote_id))

    async def raw(self, digest: str) -> bytes:
        row = await self.session.get(BlobRow, digest)
        if row is None:
            return b""
        return row.content if row.location is None else \
            await blobfiles.read(self.session, row.location)

    # ------------------------------------------------------------ loop guard

    async def loop_windows(self, senders: Iterable[str]) -> dict[str, LoopWindow]:
        wanted = sorted(set(senders))
        found: dict[str, LoopWindow] = {}
        for i in range(0, len(wanted), 900):
            for row in await self.session.scalars(
                    select(LoopGuardRow).where(LoopGuardRow.sender.in_(wanted[i:i + 900]))):
                found[row.sender] = LoopWindow(_utc(row.started_at) or row.started_at,
                                               row.count, row.paused)
        return found

    async def save_loop_windows(self, windows: dict[str, LoopWindow]) -> None:
        """Upsert every counter in one statement (ON CONFLICT: SQLite and PostgreSQL)."""
        if not windows:
            return
        rows = [{"sender": s, "started_at": w.started_at, "count": w.count, "paused": w.paused}
                for s, w in windows.items()]
        dialect = self.session.get_bind().dialect.name
        upsert = (sqlite_insert if dialect == "sqlite" else pg_insert)(LoopGuardRow)
        await self.session.execute(upsert.on_conflict_do_update(
            index_elements=["sender"], set_={"started_at": upsert.excluded.started_at,
                                             "count": upsert.excluded.count,
                                             "paused": upsert.excluded.paused}), rows)

    async def resolve_alerts(self, mailbox_id: int, code: str) -> None:
        """Resolve a mailbox's open alerts with one code (a folder that is back)."""
        await self.session.execute(update(AlertRow).where(
            AlertRow.mailbox_id == mailbox_id, AlertRow.code == code,
            AlertRow.resolved_at.is_(None)).values(resolved_at=dt.datetime.now(dt.UTC)))

    async def resume_sender(self, sender: str) -> None:
        await self.session.execute(update(LoopGuardRow).where(LoopGuardRow.sender == sender)
                                   .values(paused=False, count=0))


