"""Appointments, contacts and tasks of an on-premises Exchange mailbox as a `protocols.ItemStore`.

Collections are the user's Calendar, Contacts and Tasks folders (EWS distinguished folders).
Items are identified by their EWS ItemId (the href) and ChangeKey (the etag):

* **Changes**: SyncFolderItems with the folder's SyncState as the token, asking for the
  ``Categories`` of each changed item. As the reference does, only items that carry the
  tracking category (``Tracked to serversync``) come from the server to the application;
  every item we create carries it. A first sync, or a SyncState the server dropped, is a
  complete listing.
* **Identity**: the ACT service matches items by UID. Calendar items have a settable ``UID``;
  contacts and tasks carry ours in a named extended property (``PublicStrings``,
  ``serversync-uid``); items without one use their ItemId.
* **Writes**: CreateItem (SaveOnly, ``SendMeetingInvitations=SendToNone`` unless the
  service asks for invitations), UpdateItem with ``ConflictResolution=NeverOverwrite`` and the
  ChangeKey (a stale one raises `PreconditionFailed`), DeleteItem (HardDelete, no
  cancellations). The hash returned is of the record read back through the same mapping.

Not mapped yet: recurring appointments and tasks (quarantined on read, refused on write),
contact name prefixes (EWS keeps them in the read-only CompleteName), phone kinds other than
work/home/cell/fax, and attendee responses (EWS returns them; we keep them as needs-action).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import threading
from collections.abc import Sequence
from typing import Any

from exchangelib import CalendarItem, EWSDate, EWSDateTime, ExtendedProperty
from exchangelib import Contact as EwsContact
from exchangelib import Task as EwsTask
from exchangelib import errors as ews_errors
from exchangelib.fields import FieldPath
from exchangelib.indexed_properties import EmailAddress, PhoneNumber, PhysicalAddress
from exchangelib.items import SEND_ONLY_TO_ALL, SEND_TO_NONE
from exchangelib.properties import Attendee as EwsAttendee
from exchangelib.properties import ItemId
from exchangelib.properties import Mailbox as EwsMailboxAddress
from exchangelib.services import SyncFolderItems

from serversync.connectors.ews import ChangeKeyConflict, EwsMailbox, StaleCursor
from serversync.connectors.net import ConnectOptions
from serversync.connectors.protocols import (
    FetchedItem,
    ItemChanges,
    ItemCollection,
    PreconditionFailed,
    WrittenItem,
)
from serversync.core.act import (
    Appointment,
    AppointmentStatus,
    Attendee,
    AttendeeRole,
    BusyStatus,
    Contact,
    ItemKind,
    Phone,
    PostalAddress,
    Record,
    Task,
    TaskStatus,
    content_hash,
)
from serversync.core.errors import ItemError
from serversync.core.model import Profile
from serversync.core.rules import Login

CATEGORY = "Tracked to serversync"
FOLDERS = {ItemKind.APPOINTMENT: "calendar", ItemKind.CONTACT: "contacts", ItemKind.TASK: "tasks"}
_BUSY = {BusyStatus.FREE: "Free", BusyStatus.TENTATIVE: "Tentative", BusyStatus.BUSY: "Busy",
         BusyStatus.OUT_OF_OFFICE: "OOF"}
_TASK_STATUS = {TaskStatus.NOT_STARTED: "NotStarted", TaskStatus.IN_PROGRESS: "InProgress",
                TaskStatus.COMPLETED: "Completed", TaskStatus.CANCELLED: "Deferred"}
_PHONES = {"work": "BusinessPhone", "home": "HomePhone", "cell": "MobilePhone",
           "fax": "BusinessFax"}
_ADDRESSES = {"work": "Business", "home": "Home", "other": "Other"}
_REGISTER = threading.Lock()


class SyncUid(ExtendedProperty):  # type: ignore[misc]
    """Our UID on contacts and tasks (a named MAPI property in the PublicStrings set)."""

    distinguished_property_set_id = "PublicStrings"
    property_name = "serversync-uid"
    property_type = "String"


def _register() -> None:
    """Teach exchangelib the extended property (class-level, once, on first use)."""
    with _REGISTER:
        for model in (EwsContact, EwsTask):
            if "sync_uid" not in {f.name for f in model.FIELDS}:
                model.register("sync_uid", SyncUid)


def _utc(value: Any) -> dt.datetime | dt.date | None:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return dt.datetime(*value.timetuple()[:6], value.microsecond, tzinfo=dt.UTC)
        # EWSDateTime refuses stdlib time zones in astimezone(): go through the timestamp
        return dt.datetime.fromtimestamp(value.timestamp(), dt.UTC)
    if isinstance(value, dt.date):
        return dt.date(value.year, value.month, value.day)
    return None


def _ews_time(value: dt.datetime | dt.date) -> Any:
    if isinstance(value, dt.datetime):
        return EWSDateTime.from_datetime(
            (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC))
    return EWSDate.from_date(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# ---------------------------------------------------------------- records <-> exchangelib

def to_record(item: Any) -> Record:
    if isinstance(item, CalendarItem):
        if item.recurrence is not None or item.type in ("RecurringMaster", "Occurrence",
                                                         "Exception"):
            raise ItemError("recurring appointments are not synced over EWS yet",
                            code="unsupported-item")
        start, end = _utc(item.start), _utc(item.end)
        if start is None or end is None:
            raise ItemError("the appointment has no start or end", code="bad-item")
        attendees = tuple(
            Attendee(address=_text(a.mailbox.email_address).lower(),
                     name=_text(a.mailbox.name), role=role)
            for field, role in (("required_attendees", AttendeeRole.REQUIRED),
                                ("optional_attendees", AttendeeRole.OPTIONAL),
                                ("resources", AttendeeRole.RESOURCE))
            for a in getattr(item, field) or [] if a.mailbox is not None)
        return Appointment(
            uid=_text(item.uid) or _text(item.id), subject=_text(item.subject),
            start=start, end=end, all_day=bool(item.is_all_day),
            location=_text(item.location),
            organizer=_text(item.organizer.email_address if item.organizer else "").lower(),
            attendees=attendees,
            reminder_minutes=item.reminder_minutes_before_start if item.reminder_is_set
            else None,
            busy={v: k for k, v in _BUSY.items()}.get(_text(item.legacy_free_busy_status),
                                                      BusyStatus.BUSY),
            status=AppointmentStatus.CANCELLED if item.is_cancelled else AppointmentStatus.OPEN,
            body=_text(item.body))
    if isinstance(item, EwsContact):
        return Contact(
            uid=_text(getattr(item, "sync_uid", None)) or _text(item.id),
            full_name=_text(item.display_name), given_name=_text(item.given_name),
            family_name=_text(item.surname), middle_name=_text(item.middle_name),
            suffix=_text(item.generation), organization=_text(item.company_name),
            job_title=_text(item.job_title),
            emails=tuple(_text(e.email).lower() for e in item.email_addresses or [] if e.email),
            phones=tuple(Phone({v: k for k, v in _PHONES.items()}.get(p.label, "other"),
                               _text(p.phone_number))
                         for p in item.phone_numbers or [] if p.phone_number),
            addresses=tuple(PostalAddress({v: k for k, v in _ADDRESSES.items()}[a.label],
                                          _text(a.street), _text(a.city), _text(a.state),
                                          _text(a.zipcode), _text(a.country))
                            for a in item.physical_addresses or []),
            birthday=_utc(item.birthday) if item.birthday else None,
            notes=_text(item.body))
    if isinstance(item, EwsTask):
        if item.recurrence is not None:
            raise ItemError("recurring tasks are not synced over EWS yet",
                            code="unsupported-item")
        status = {v: k for k, v in _TASK_STATUS.items()}.get(_text(item.status),
                                                             TaskStatus.NOT_STARTED)
        return Task(
            uid=_text(getattr(item, "sync_uid", None)) or _text(item.id),
            subject=_text(item.subject), due=_utc(item.due_date),
            start=_utc(item.start_date), status=status,
            percent_complete=int(item.percent_complete or 0),
            priority={"High": 1, "Low": 9}.get(_text(item.importance), 5),
            completed_at=_utc(item.complete_date)  # type: ignore[arg-type]
            if isinstance(item.complete_date, dt.datetime) else None,
            body=_text(item.body))
    raise ItemError(f"unexpected EWS item {type(item).__name__}", code="bad-item")


def from_record(record: Record, *, account: Any, folder: Any, invitations: bool) -> Any:
    """An exchangelib item carrying ``record`` (always with the tracking category)."""
    categories = [CATEGORY]
    if isinstance(record, Appointment):
        if record.rrule or record.occurrences or record.cancelled_occurrences:
            raise ItemError(f"appointment {record.uid}: recurring appointments are not synced "
                            "over EWS yet", code="unsupported-item")
        people: dict[AttendeeRole, list[Any]] = {r: [] for r in AttendeeRole}
        for attendee in record.attendees:
            people[attendee.role].append(EwsAttendee(mailbox=EwsMailboxAddress(
                email_address=attendee.address, name=attendee.name or None),
                response_type="Unknown"))
        return CalendarItem(
            account=account, folder=folder, uid=record.uid, subject=record.subject,
            start=_ews_time(record.start), end=_ews_time(record.end),
            is_all_day=record.all_day, location=record.location or None,
            body=record.body or None, categories=categories,
            reminder_is_set=record.reminder_minutes is not None,
            reminder_minutes_before_start=record.reminder_minutes or 0,
            legacy_free_busy_status=_BUSY[record.busy],
            required_attendees=people[AttendeeRole.REQUIRED] if invitations else None,
            optional_attendees=people[AttendeeRole.OPTIONAL] if invitations else None,
            resources=people[AttendeeRole.RESOURCE] if invitations else None)
    _register()
    if isinstance(record, Contact):
        return EwsContact(
            account=account, folder=folder, sync_uid=record.uid,
            display_name=record.full_name or record.given_name or record.uid,
            given_name=record.given_name or None, surname=record.family_name or None,
            middle_name=record.middle_name or None, generation=record.suffix or None,
            company_name=record.organization or None, job_title=record.job_title or None,
            email_addresses=[EmailAddress(email=e, label=f"EmailAddress{i + 1}")
                             for i, e in enumerate(record.emails[:3])] or None,
            phone_numbers=[PhoneNumber(label=_PHONES[p.kind], phone_number=p.number)
                           for p in record.phones if p.kind in _PHONES] or None,
            physical_addresses=[PhysicalAddress(
                label=_ADDRESSES.get(a.kind, "Other"), street=a.street or None,
                city=a.city or None, state=a.region or None, zipcode=a.postcode or None,
                country=a.country or None) for a in record.addresses] or None,
            birthday=record.birthday, body=record.notes or None, categories=categories)
    if isinstance(record, Task):
        due = record.due.date() if isinstance(record.due, dt.datetime) else record.due
        start = record.start.date() if isinstance(record.start, dt.datetime) else record.start
        return EwsTask(
            account=account, folder=folder, sync_uid=record.uid, subject=record.subject,
            due_date=due, start_date=start, status=_TASK_STATUS[record.status],
            percent_complete=decimal.Decimal(record.percent_complete),
            importance="High" if 1 <= record.priority <= 4 else "Low"
            if record.priority >= 6 else "Normal",
            body=record.body or None, categories=categories)
    raise ItemError(f"cannot write {type(record).__name__} items to EWS", code="bad-item")


def read_back(record: Record, invitations: bool) -> Record:
    """The record as the server now holds it (our write, read through our own mapping)."""
    return to_record(from_record(record, account=None, folder=None, invitations=invitations))


def raw_of(item: Any) -> bytes:
    """A JSON rendering of the fields we read, kept when an item is quarantined."""
    values = {name: str(getattr(item, name, None)) for name in (
        "id", "changekey", "subject", "start", "end", "uid", "display_name", "due_date",
        "status", "categories")}
    return json.dumps(values, sort_keys=True).encode()


# ---------------------------------------------------------------- the store

class EwsItemStore:
    """`ItemStore` over EWS for one on-premises Exchange mailbox."""

    def __init__(self, profile: Profile, login: Login, options: ConnectOptions) -> None:
        self.ews = EwsMailbox(profile, login, options)

    async def __aenter__(self) -> EwsItemStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ews.close()

    async def collections(self, kinds: Sequence[ItemKind]) -> dict[ItemKind, ItemCollection]:
        for kind in kinds:
            await self.ews.folder_count(FOLDERS[kind])  # type: ignore[arg-type]
        return {kind: ItemCollection(FOLDERS[kind], frozenset({kind}), FOLDERS[kind])
                for kind in kinds}

    async def changes(self, collection: ItemCollection, token: str | None) -> ItemChanges:
        def work(state: str | None) -> ItemChanges:
            folder = self.ews._folder(collection.href)
            account = self.ews._connect()
            categories = FieldPath(field=folder.supported_item_models[0]
                                   .get_field_by_fieldname("categories"))
            changed: dict[str, str] = {}
            deleted: list[str] = []
            while True:
                service = SyncFolderItems(account=account)
                for kind, item in service.call(folder=folder, shape="IdOnly",
                                               additional_fields={categories},
                                               sync_state=state, ignore=None,
                                               max_changes_returned=512, sync_scope=None):
                    if isinstance(item, Exception):
                        raise item
                    if kind == "delete":
                        changed.pop(item.id, None)
                        deleted.append(item.id)
                    elif kind in ("create", "update"):
                        if CATEGORY in (item.categories or []):
                            changed[item.id] = item.changekey
                        else:
                            changed.pop(item.id, None)  # untracked now: gone for us
                            deleted.append(item.id)
                if service.sync_state == state or service.includes_last_item_in_range:
                    state = service.sync_state
                    break
                state = service.sync_state
            return ItemChanges(state, list(changed.items()),
                               [] if token is None else deleted, complete=token is None)
        try:
            return await self.ews._run(lambda: work(token))
        except StaleCursor:
            return await self.ews._run(lambda: work(None))

    async def get_many(self, collection: ItemCollection,
                       hrefs: Sequence[str]) -> list[FetchedItem]:
        _register()

        def work() -> list[FetchedItem]:
            account = self.ews._connect()
            out: list[FetchedItem] = []
            for href, item in zip(hrefs, account.fetch(ids=[(h, None) for h in hrefs]),
                                  strict=True):
                if isinstance(item, ews_errors.ErrorItemNotFound):
                    continue  # deleted between listing and reading
                if isinstance(item, Exception):
                    raise item
                try:
                    out.append(FetchedItem(href, item.changekey, raw_of(item), to_record(item)))
                except ItemError as exc:
                    out.append(FetchedItem(href, item.changekey, raw_of(item), None,
                                           exc.message))
            return out
        return await self.ews._run(work)

    async def put(self, collection: ItemCollection, record: Record, *, href: str | None,
                  if_match: str | None, invitations: bool) -> WrittenItem:
        def work() -> WrittenItem:
            account = self.ews._connect()
            folder = self.ews._folder(collection.href)
            item = from_record(record, account=account, folder=folder, invitations=invitations)
            invites = SEND_ONLY_TO_ALL if invitations else SEND_TO_NONE
            extra: dict[str, Any] = ({"send_meeting_invitations": invites}
                                     if isinstance(item, CalendarItem) else {})
            if href is None:
                item.save(**extra)
            else:
                item._id = ItemId(id=href, changekey=if_match)
                fields = [f.name for f in item.FIELDS if not f.is_read_only
                          and f.name in _UPDATABLE]
                try:
                    item.save(update_fields=fields, conflict_resolution="NeverOverwrite",
                              **({"send_meeting_invitations": invites} if extra else {}))
                except ews_errors.ErrorIrresolvableConflict as exc:
                    raise PreconditionFailed(str(exc)) from None
            return WrittenItem(item.id, item.changekey,
                               content_hash(read_back(record, invitations)))
        try:
            return await self.ews._run(work)
        except ChangeKeyConflict as exc:
            raise PreconditionFailed(exc.message) from None

    async def delete(self, href: str, *, if_match: str | None) -> None:
        def work() -> None:
            account = self.ews._connect()
            for result in account.bulk_delete(ids=[(href, None)], delete_type="HardDelete",
                                              send_meeting_cancellations=SEND_TO_NONE,
                                              affected_task_occurrences="AllOccurrences"):
                if isinstance(result, Exception) and not isinstance(
                        result, ews_errors.ErrorItemNotFound):
                    raise result
        await self.ews._run(work)


# The fields an update rewrites (everything we map; UID is fixed at creation).
_UPDATABLE = frozenset({
    "subject", "start", "end", "is_all_day", "location", "body", "categories",
    "reminder_is_set", "reminder_minutes_before_start", "legacy_free_busy_status",
    "required_attendees", "optional_attendees", "resources", "display_name", "given_name",
    "surname", "middle_name", "generation", "company_name", "job_title", "email_addresses",
    "phone_numbers", "physical_addresses", "birthday", "due_date", "start_date", "status",
    "percent_complete", "importance", "sync_uid"})


def store(profile: Profile, login: Login, options: ConnectOptions) -> EwsItemStore:
    """The factory `serversync.wiring` registers for Exchange (EWS) profiles."""
    return EwsItemStore(profile, login, options)
