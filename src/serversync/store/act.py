"""Appointments, contacts and tasks in our store, and their two-way sync state.

Tables:

* ``act_appointments`` (+ ``act_attendees``), ``act_contacts``, ``act_tasks`` — the
  application's records. Each carries ``content_hash`` (`core.act.content_hash`, the synced
  fields) and ``state_hash`` (content plus owner: what decides the sync filter), so that the
  sync finds what changed in the application with one indexed join instead of reading every
  record. A delete keeps a tombstone (``deleted_at``) until every mailbox synced it.
* ``act_collections`` — per mailbox and server collection: the RFC 6578 sync token (or
  ``ctag:`` fallback cursor) and the filter the last sync applied.
* ``act_sync_status`` — per item and collection: UID, remote href and etag, the content hash
  each side had when they last agreed (``None`` = that side deliberately not synced), and
  whether the pair is held outside the sync filter. Unique on (collection, UID) and on
  (collection, href): a replay after a crash finds the same rows and never duplicates.
* ``act_quarantine`` — server items we cannot read, with their raw data, reason and alert.
* ``act_conflicts`` — every conflict the planner settled, with the policy and the winner.
* ``act_filters`` — the per-mailbox sync filter (`core.act.ActFilter`).

Times are stored as ISO text where a value may be a date or a zoned date-time (RFC 5545
DATE vs DATE-TIME), so nothing is lost to a database's DateTime normalisation.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column, relationship

from serversync.core.act import (
    ActFilter,
    Appointment,
    AppointmentScope,
    AppointmentStatus,
    Attendee,
    AttendeeRole,
    BusyStatus,
    ConflictRecord,
    Contact,
    ContactScope,
    ItemKind,
    Moment,
    Occurrence,
    Phone,
    PostalAddress,
    Record,
    Response,
    Task,
    TaskScope,
    TaskStatus,
    as_instant,
    content_hash,
)
from serversync.core.errors import NotFound
from serversync.core.times import utc
from serversync.store.tables import Base


def moment_text(value: Moment | None) -> str | None:
    return None if value is None else value.isoformat()


def moment_value(text: str | None) -> Moment | None:
    if not text:
        return None
    return dt.date.fromisoformat(text) if len(text) == 10 else dt.datetime.fromisoformat(text)


def _moment(text: str) -> Moment:
    value = moment_value(text)
    assert value is not None
    return value


def state_hash(record: Record) -> str:
    """Content plus owner: a change of either may move the record in or out of a filter."""
    return hashlib.sha256(f"{content_hash(record)}|{record.owner.lower()}".encode()).hexdigest()


class _RecordColumns:
    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = mapped_column(String(255), unique=True)
    owner: Mapped[str] = mapped_column(String(320), index=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    state_hash: Mapped[str] = mapped_column(String(64))
    modified_at: Mapped[dt.datetime]
    deleted_at: Mapped[dt.datetime | None] = mapped_column(index=True)


class AppointmentRow(_RecordColumns, Base):
    __tablename__ = "act_appointments"

    subject: Mapped[str] = mapped_column(Text, default="")
    location: Mapped[str] = mapped_column(Text, default="")
    start: Mapped[str] = mapped_column(String(40))
    end: Mapped[str] = mapped_column(String(40))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    all_day: Mapped[bool] = mapped_column(Boolean, default=False)
    organizer: Mapped[str] = mapped_column(String(320), index=True, default="")
    rrule: Mapped[str] = mapped_column(Text, default="")
    cancelled: Mapped[list[str]] = mapped_column(JSON, default=list)
    occurrences: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    reminder_minutes: Mapped[int | None] = mapped_column(Integer)
    busy: Mapped[str] = mapped_column(String(20), default="busy")
    status: Mapped[str] = mapped_column(String(20), default="open")
    body: Mapped[str] = mapped_column(Text, default="")
    # when the series is over (None: never); past appointments' deletes are not propagated
    series_end: Mapped[dt.datetime | None]
    attendees: Mapped[list[AttendeeRow]] = relationship(
        cascade="all, delete-orphan", order_by="AttendeeRow.position", lazy="selectin")


class AttendeeRow(Base):
    __tablename__ = "act_attendees"

    id: Mapped[int] = mapped_column(primary_key=True)
    appointment_id: Mapped[int] = mapped_column(
        ForeignKey("act_appointments.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    address: Mapped[str] = mapped_column(String(320), index=True)
    name: Mapped[str] = mapped_column(Text, default="")
    role: Mapped[str] = mapped_column(String(20), default="required")
    response: Mapped[str] = mapped_column(String(20), default="needs-action")


class ContactRow(_RecordColumns, Base):
    __tablename__ = "act_contacts"

    full_name: Mapped[str] = mapped_column(Text, default="")
    given_name: Mapped[str] = mapped_column(Text, default="")
    family_name: Mapped[str] = mapped_column(Text, default="")
    middle_name: Mapped[str] = mapped_column(Text, default="")
    prefix: Mapped[str] = mapped_column(Text, default="")
    suffix: Mapped[str] = mapped_column(Text, default="")
    organization: Mapped[str] = mapped_column(Text, default="")
    job_title: Mapped[str] = mapped_column(Text, default="")
    emails: Mapped[list[str]] = mapped_column(JSON, default=list)
    phones: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    addresses: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    birthday: Mapped[dt.date | None] = mapped_column(Date)
    notes: Mapped[str] = mapped_column(Text, default="")


class TaskRow(_RecordColumns, Base):
    __tablename__ = "act_tasks"

    subject: Mapped[str] = mapped_column(Text, default="")
    due: Mapped[str | None] = mapped_column(String(40))
    start: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default="not-started")
    percent_complete: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    rrule: Mapped[str] = mapped_column(Text, default="", server_default="")
    completed_at: Mapped[dt.datetime | None]
    body: Mapped[str] = mapped_column(Text, default="")


class CollectionRow(Base):
    __tablename__ = "act_collections"
    __table_args__ = (UniqueConstraint("mailbox_id", "href", name="uq_act_collections_href"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"),
                                            index=True)
    href: Mapped[str] = mapped_column(String(1000))
    kinds: Mapped[list[str]] = mapped_column(JSON, default=list)
    token: Mapped[str | None] = mapped_column(Text)  # sync-token, or "ctag:<ctag>"
    filter_key: Mapped[str] = mapped_column(String(200), default="")
    synced_at: Mapped[dt.datetime | None]


class SyncStatusRow(Base):
    __tablename__ = "act_sync_status"
    __table_args__ = (
        UniqueConstraint("collection_id", "ident", name="uq_act_sync_status_ident"),
        UniqueConstraint("collection_id", "href", name="uq_act_sync_status_href"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    collection_id: Mapped[int] = mapped_column(
        ForeignKey("act_collections.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    ident: Mapped[str] = mapped_column(String(255), index=True)  # the UID
    href: Mapped[str | None] = mapped_column(String(1000))
    etag: Mapped[str | None] = mapped_column(String(200))
    app_hash: Mapped[str | None] = mapped_column(String(64))
    server_hash: Mapped[str | None] = mapped_column(String(64))
    app_state: Mapped[str | None] = mapped_column(String(64))  # the record's state_hash
    held: Mapped[bool] = mapped_column(Boolean, default=False)  # outside the sync filter


class QuarantineRow(Base):
    __tablename__ = "act_quarantine"
    __table_args__ = (UniqueConstraint("collection_id", "href", name="uq_act_quarantine_href"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    collection_id: Mapped[int] = mapped_column(
        ForeignKey("act_collections.id", ondelete="CASCADE"), index=True)
    href: Mapped[str] = mapped_column(String(1000))
    etag: Mapped[str] = mapped_column(String(200), default="")
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    reason: Mapped[str] = mapped_column(Text)
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime]


class ConflictRow(Base):
    __tablename__ = "act_conflicts"

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"),
                                            index=True)
    kind: Mapped[str] = mapped_column(String(20))
    ident: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)
    winner: Mapped[str] = mapped_column(String(20))
    policy: Mapped[str] = mapped_column(String(30))
    created_at: Mapped[dt.datetime] = mapped_column(index=True)


class FilterRow(Base):
    __tablename__ = "act_filters"

    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"),
                                            primary_key=True)
    appointments: Mapped[str] = mapped_column(String(30))
    contacts: Mapped[str] = mapped_column(String(30))
    tasks: Mapped[str] = mapped_column(String(30))


_ROW: dict[ItemKind, type[AppointmentRow] | type[ContactRow] | type[TaskRow]] = {
    ItemKind.APPOINTMENT: AppointmentRow, ItemKind.CONTACT: ContactRow, ItemKind.TASK: TaskRow}


def filter_key(flt: ActFilter) -> str:
    return f"{flt.appointments.value}/{flt.contacts.value}/{flt.tasks.value}"


# ---------------------------------------------------------------- row <-> record

def _to_record(row: Any) -> Record:
    common = {"uid": row.uid, "owner": row.owner, "modified_at": utc(row.modified_at),
              "id": row.id}
    if isinstance(row, AppointmentRow):
        return Appointment(
            subject=row.subject, start=_moment(row.start), end=_moment(row.end),
            timezone=row.timezone, all_day=row.all_day, location=row.location,
            organizer=row.organizer,
            attendees=tuple(Attendee(a.address, a.name, AttendeeRole(a.role),
                                     Response(a.response)) for a in row.attendees),
            rrule=row.rrule, cancelled_occurrences=tuple(_moment(c) for c in row.cancelled),
            occurrences=tuple(Occurrence(_moment(o["recurrence_id"]), _moment(o["start"]),
                                         _moment(o["end"]), o["subject"], o.get("location", ""),
                                         o.get("body", "")) for o in row.occurrences),
            reminder_minutes=row.reminder_minutes, busy=BusyStatus(row.busy),
            status=AppointmentStatus(row.status), body=row.body, **common)
    if isinstance(row, ContactRow):
        return Contact(
            full_name=row.full_name, given_name=row.given_name, family_name=row.family_name,
            middle_name=row.middle_name, prefix=row.prefix, suffix=row.suffix,
            organization=row.organization, job_title=row.job_title, emails=tuple(row.emails),
            phones=tuple(Phone(p["kind"], p["number"]) for p in row.phones),
            addresses=tuple(PostalAddress(**a) for a in row.addresses), birthday=row.birthday,
            notes=row.notes, **common)
    assert isinstance(row, TaskRow)
    return Task(subject=row.subject, due=moment_value(row.due), start=moment_value(row.start),
                status=TaskStatus(row.status), percent_complete=row.percent_complete,
                priority=row.priority, completed_at=utc(row.completed_at), body=row.body,
                rrule=row.rrule or "", **common)


def _fill(row: Any, record: Record) -> None:
    row.owner = record.owner.lower()
    row.content_hash = content_hash(record)
    row.state_hash = state_hash(record)
    if isinstance(record, Appointment):
        row.subject, row.location = record.subject, record.location
        row.start, row.end = moment_text(record.start), moment_text(record.end)
        row.timezone, row.all_day = record.timezone, record.all_day
        row.organizer, row.rrule = record.organizer.lower(), record.rrule
        row.cancelled = [moment_text(c) for c in record.cancelled_occurrences]
        row.occurrences = [{"recurrence_id": moment_text(o.recurrence_id),
                            "start": moment_text(o.start), "end": moment_text(o.end),
                            "subject": o.subject, "location": o.location, "body": o.body}
                           for o in record.occurrences]
        row.reminder_minutes, row.busy = record.reminder_minutes, record.busy.value
        row.status, row.body = record.status.value, record.body
        end = record.last_end
        row.series_end = None if end is None else as_instant(end)
        wanted = [(a.address.lower(), a.name, a.role.value, a.response.value)
                  for a in record.attendees]
        if [(a.address, a.name, a.role, a.response) for a in row.attendees] != wanted:
            row.attendees = [AttendeeRow(position=i, address=a, name=n, role=r, response=s)
                             for i, (a, n, r, s) in enumerate(wanted)]
    elif isinstance(record, Contact):
        for name in ("full_name", "given_name", "family_name", "middle_name", "prefix", "suffix",
                     "organization", "job_title", "birthday", "notes"):
            setattr(row, name, getattr(record, name))
        row.emails = list(record.emails)
        row.phones = [dataclasses.asdict(p) for p in record.phones]
        row.addresses = [dataclasses.asdict(a) for a in record.addresses]
    else:
        row.subject, row.status = record.subject, record.status.value
        row.due, row.start = moment_text(record.due), moment_text(record.start)
        row.percent_complete, row.priority = record.percent_complete, record.priority
        row.completed_at, row.body = record.completed_at, record.body
        row.rrule = record.rrule


@dataclasses.dataclass(slots=True)
class StatusEntry:
    ident: str
    kind: ItemKind
    href: str | None
    etag: str | None
    app_hash: str | None
    server_hash: str | None
    app_state: str | None
    held: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Collection:
    id: int
    href: str
    kinds: frozenset[ItemKind]
    token: str | None
    filter_key: str


@dataclasses.dataclass(frozen=True, slots=True)
class Quarantined:
    href: str
    etag: str
    raw: bytes
    reason: str


class ActStore:
    """All SQL for appointments, contacts, tasks and their sync state, over one session."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        # rows read ahead for a batch (None: known to be missing), so that writing a chunk
        # of a sync costs one SELECT per table instead of one per item
        self._rows: dict[tuple[ItemKind, str], Any] = {}
        self._status: dict[int, dict[str, SyncStatusRow]] = {}

    async def preload(self, kind: ItemKind, uids: Iterable[str]) -> None:
        table = _ROW[kind]
        wanted = [u for u in uids if (kind, u) not in self._rows]
        for i in range(0, len(wanted), 500):
            part = wanted[i:i + 500]
            rows: Any = await self.session.scalars(select(table).where(table.uid.in_(part)))
            found = {row.uid: row for row in rows}
            self._rows.update({(kind, u): found.get(u) for u in part})

    async def preload_status(self, collection_id: int) -> None:
        rows = await self.session.scalars(select(SyncStatusRow).where(
            SyncStatusRow.collection_id == collection_id))
        self._status[collection_id] = {row.ident: row for row in rows}

    # ------------------------------------------------------------ records

    async def _row(self, kind: ItemKind, uid: str) -> Any:
        if (kind, uid) in self._rows:
            return self._rows[(kind, uid)]
        table = _ROW[kind]
        return await self.session.scalar(select(table).where(table.uid == uid))

    async def save(self, record: Record, *, now: dt.datetime, flush: bool = True) -> Record:
        """Insert or update by UID (a tombstoned UID comes back to life). Without ``flush``
        the row is written at commit, in bulk, and the returned record has no id yet."""
        row = await self._row(record.kind, record.uid)
        if row is None:
            row = _ROW[record.kind](uid=record.uid)
            if isinstance(row, AppointmentRow):
                row.attendees = []
            self.session.add(row)
            self._rows[(record.kind, record.uid)] = row
        _fill(row, record)
        row.modified_at = record.modified_at or now
        row.deleted_at = None
        if not flush:
            return dataclasses.replace(record, modified_at=row.modified_at)
        await self.session.flush()
        return _to_record(row)

    async def get(self, kind: ItemKind, uid: str) -> Record:
        record = await self.find(kind, uid)
        if record is None:
            raise NotFound(f"no {kind.value} with UID {uid!r}")
        return record

    async def find(self, kind: ItemKind, uid: str) -> Record | None:
        row = await self._row(kind, uid)
        return None if row is None or row.deleted_at is not None else _to_record(row)

    async def list_records(self, kind: ItemKind, owner: str | None = None) -> list[Record]:
        table = _ROW[kind]
        query = select(table).where(table.deleted_at.is_(None)).order_by(table.uid)
        if owner is not None:
            query = query.where(table.owner == owner.lower())
        return [_to_record(r) for r in await self.session.scalars(query)]

    async def delete(self, kind: ItemKind, uid: str, *, now: dt.datetime) -> None:
        """Tombstone: the sync propagates the delete, then `purge` removes the row."""
        row = await self._row(kind, uid)
        if row is None or row.deleted_at is not None:
            raise NotFound(f"no {kind.value} with UID {uid!r}")
        row.deleted_at = now
        await self.session.flush()

    async def purge(self, kind: ItemKind, uids: Iterable[str]) -> None:
        """Drop tombstones no sync status refers to any more."""
        table = _ROW[kind]
        uids = list(uids)
        if not uids:
            return
        linked = select(SyncStatusRow.ident).where(SyncStatusRow.ident.in_(uids),
                                                   SyncStatusRow.kind == kind.value)
        await self.session.execute(delete(table).where(
            table.uid.in_(uids), table.deleted_at.is_not(None), table.uid.not_in(linked)))

    async def purge_now(self, kind: ItemKind, uid: str) -> None:
        """Drop a tombstone even though a status row still names it (a kept server copy)."""
        table = _ROW[kind]
        await self.session.execute(delete(table).where(table.uid == uid,
                                                       table.deleted_at.is_not(None)))

    async def rows(self, kind: ItemKind,
                   uids: Sequence[str]) -> dict[str, tuple[Record, dt.datetime | None]]:
        """Records (live or tombstoned) by UID, with their tombstone time."""
        table = _ROW[kind]
        out: dict[str, tuple[Record, dt.datetime | None]] = {}
        for i in range(0, len(uids), 500):
            rows: Any = await self.session.scalars(select(table).where(
                table.uid.in_(uids[i:i + 500])))
            for row in rows:
                out[row.uid] = (_to_record(row), utc(row.deleted_at))
        return out

    async def touched(self, collection: Collection, kind: ItemKind, user: str,
                      full: bool) -> set[str]:
        """UIDs whose application side may differ from the sync status of ``collection``:
        changed or deleted linked records, status rows whose record is gone, and unlinked
        records related to ``user`` (owner, organiser or attendee). ``full``: every record
        related to the user or linked (after a filter change)."""
        table = _ROW[kind]
        user = user.lower()
        status = SyncStatusRow
        related = [table.owner == user]
        if table is AppointmentRow:
            related.append(AppointmentRow.organizer == user)
            related.append(AppointmentRow.id.in_(
                select(AttendeeRow.appointment_id).where(AttendeeRow.address == user)))
        linked_changed = select(table.uid).join(
            status, (status.ident == table.uid) & (status.collection_id == collection.id)
            & (status.kind == kind.value))
        if not full:
            linked_changed = linked_changed.where(or_(
                status.app_state.is_(None), status.app_state != table.state_hash,
                table.deleted_at.is_not(None)))
        unlinked = select(table.uid).where(table.deleted_at.is_(None), or_(*related),
                                           table.uid.not_in(
            select(status.ident).where(status.collection_id == collection.id,
                                       status.kind == kind.value)))
        orphans = select(status.ident).where(
            status.collection_id == collection.id, status.kind == kind.value,
            status.app_hash.is_not(None), status.ident.not_in(select(table.uid)))
        out: set[str] = set()
        for query in (linked_changed, unlinked, orphans):
            out.update(await self.session.scalars(query))
        return out

    # ------------------------------------------------------------ collections and status

    async def collection(self, mailbox_id: int, href: str, kinds: Iterable[ItemKind]) -> Collection:
        row = await self.session.scalar(select(CollectionRow).where(
            CollectionRow.mailbox_id == mailbox_id, CollectionRow.href == href))
        wanted = sorted(k.value for k in kinds)
        if row is None:
            row = CollectionRow(mailbox_id=mailbox_id, href=href, kinds=wanted, token=None,
                                filter_key="")
            self.session.add(row)
            await self.session.flush()
        elif row.kinds != wanted:
            row.kinds = wanted
        return Collection(row.id, row.href, frozenset(ItemKind(k) for k in row.kinds), row.token,
                          row.filter_key)

    async def save_cursor(self, collection_id: int, token: str | None, filter_key: str,
                          now: dt.datetime) -> None:
        row = await self.session.get(CollectionRow, collection_id)
        assert row is not None
        row.token, row.filter_key, row.synced_at = token, filter_key, now

    async def status(self, collection_id: int) -> dict[str, StatusEntry]:
        result = await self.session.execute(select(
            SyncStatusRow.ident, SyncStatusRow.kind, SyncStatusRow.href, SyncStatusRow.etag,
            SyncStatusRow.app_hash, SyncStatusRow.server_hash, SyncStatusRow.app_state,
            SyncStatusRow.held).where(SyncStatusRow.collection_id == collection_id))
        return {r[0]: StatusEntry(r[0], ItemKind(r[1]), *r[2:]) for r in result.all()}

    async def put_status(self, collection_id: int, entry: StatusEntry) -> None:
        cached = self._status.get(collection_id)
        if cached is None:
            row = await self.session.scalar(select(SyncStatusRow).where(
                SyncStatusRow.collection_id == collection_id, SyncStatusRow.ident == entry.ident))
            if entry.href is not None:
                # an href now used for another UID (a server-side move) frees the old pairing
                await self.session.execute(delete(SyncStatusRow).where(
                    SyncStatusRow.collection_id == collection_id,
                    SyncStatusRow.href == entry.href, SyncStatusRow.ident != entry.ident))
        else:
            row = cached.get(entry.ident)
            stale = [r for r in cached.values()
                     if entry.href is not None and r.href == entry.href and r.ident != entry.ident]
            for other in stale:
                await self.session.delete(other)
                del cached[other.ident]
            if stale:
                await self.session.flush()  # the unique href must be free before the insert
        if row is None:
            row = SyncStatusRow(collection_id=collection_id, ident=entry.ident)
            self.session.add(row)
            if cached is not None:
                cached[entry.ident] = row
        row.kind, row.href, row.etag = entry.kind.value, entry.href, entry.etag
        row.app_hash, row.server_hash = entry.app_hash, entry.server_hash
        row.app_state, row.held = entry.app_state, entry.held
        if cached is None:
            await self.session.flush()

    async def drop_status(self, collection_id: int, ident: str) -> None:
        cached = self._status.get(collection_id)
        if cached is not None:
            row = cached.pop(ident, None)
            if row is not None:
                await self.session.delete(row)
            return
        await self.session.execute(delete(SyncStatusRow).where(
            SyncStatusRow.collection_id == collection_id, SyncStatusRow.ident == ident))

    # ------------------------------------------------------------ quarantine, conflicts, filters

    async def quarantined(self, collection_id: int) -> dict[str, Quarantined]:
        rows = await self.session.scalars(select(QuarantineRow).where(
            QuarantineRow.collection_id == collection_id))
        return {r.href: Quarantined(r.href, r.etag, r.raw, r.reason) for r in rows}

    async def quarantine(self, collection_id: int, href: str, etag: str, raw: bytes,
                         reason: str, alert_id: int | None, now: dt.datetime) -> None:
        row = await self.session.scalar(select(QuarantineRow).where(
            QuarantineRow.collection_id == collection_id, QuarantineRow.href == href))
        if row is None:
            row = QuarantineRow(collection_id=collection_id, href=href)
            self.session.add(row)
        row.etag, row.raw, row.reason, row.created_at = etag, raw, reason, now
        row.alert_id = alert_id
        await self.session.flush()

    async def release(self, collection_id: int, hrefs: Iterable[str]) -> None:
        hrefs = list(hrefs)
        if hrefs:
            await self.session.execute(delete(QuarantineRow).where(
                QuarantineRow.collection_id == collection_id, QuarantineRow.href.in_(hrefs)))

    async def record_conflict(self, mailbox_id: int, conflict: ConflictRecord) -> None:
        self.session.add(ConflictRow(mailbox_id=mailbox_id, kind=conflict.kind.value,
                                     ident=conflict.ident, reason=conflict.reason,
                                     winner=conflict.winner, policy=conflict.policy,
                                     created_at=conflict.at))

    async def conflicts(self, mailbox_id: int) -> list[ConflictRecord]:
        rows = await self.session.scalars(select(ConflictRow).where(
            ConflictRow.mailbox_id == mailbox_id).order_by(ConflictRow.id))
        return [ConflictRecord(ItemKind(r.kind), r.ident, r.reason, r.winner, r.policy,
                               utc(r.created_at) or r.created_at) for r in rows]

    async def quarantine_count(self, mailbox_id: int) -> int:
        count = await self.session.scalar(select(func.count()).select_from(QuarantineRow).join(
            CollectionRow).where(CollectionRow.mailbox_id == mailbox_id))
        return int(count or 0)

    async def get_filter(self, mailbox_id: int) -> ActFilter:
        row = await self.session.get(FilterRow, mailbox_id)
        if row is None:
            return ActFilter()
        return ActFilter(AppointmentScope(row.appointments), ContactScope(row.contacts),
                         TaskScope(row.tasks))

    async def set_filter(self, mailbox_id: int, flt: ActFilter) -> None:
        row = await self.session.get(FilterRow, mailbox_id)
        if row is None:
            row = FilterRow(mailbox_id=mailbox_id)
            self.session.add(row)
        row.appointments, row.contacts = flt.appointments.value, flt.contacts.value
        row.tasks = flt.tasks.value
        await self.session.flush()
