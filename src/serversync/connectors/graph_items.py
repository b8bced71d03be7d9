"""Appointments, contacts and tasks of an Exchange Online mailbox as a `protocols.ItemStore`.

* **Identity.** The ACT service matches items by UID, but Graph assigns event ``iCalUId``s
  and contacts and To Do tasks have none, so our UID travels in a single-value extended
  property on events and contacts (``String {GUID} Name serversync-uid``, Graph
  "singleValueLegacyExtendedProperty") and in an open extension (``org.serversync.sync``) on
  To Do tasks, which have no extended properties; both are written on create and read back
  with ``$expand``. Items created in Outlook or To Do carry neither: their UID is their id.
* **Changes.** Contacts use ``contacts/delta`` and tasks ``todo/lists/{id}/tasks/delta`` (the
  deltaLink is the token). Events are listed in full each time (ids and change keys only,
  like DAV's etag fallback): the v1.0 event delta needs a time window, and a window would
  make events outside it look deleted. ``/events`` lists single events and series masters
  (never occurrences: the listing skips any it would meet), so a series is one record. Items
  whose ETag we already hold are not read again.
* **Recurring series** (`connectors.graph_recurrence`): a ``seriesMaster`` becomes one
  `Appointment` — its ``patternedRecurrence`` the canonical RRULE, its recurrence time zone
  (Windows name → IANA) the ``timezone``, its exceptions (``GET /events/{id}/instances``,
  type ``exception``, keyed by ``originalStart``) the changed occurrences, and the occurrences
  the pattern promises but ``instances`` does not list the cancelled ones (v1.0 has no list
  of cancellations; see the module for the window). Written as ``POST /events`` with the
  ``recurrence`` and start/end in the series' own zone (UTC would let daylight saving move
  the meetings), then each cancellation is a ``DELETE`` and each changed occurrence a
  ``PATCH`` of the occurrence found by its original start; an update touches only what
  changed (the master's changed properties, then the occurrences). The series is read back
  after writing, so the hash we return is the one the next read computes. Rules Exchange
  cannot express, and occurrences it could not store or we could not read back, are refused
  with an `ItemError` naming the rule; nothing is approximated.
* **Writes** carry ``If-Match`` with the ETag (series: the master's PATCH; the state is read
  first and a changed ETag refused); 412 becomes `PreconditionFailed`. Times are read in UTC
  (``Prefer: outlook.timezone="UTC"``, also on writes so responses read the same way);
  events are written in their own zone. Tasks go to the user's default To Do list; a
  recurring task's ``recurrence`` is anchored on its due date (To Do requires one).

Not mapped: a task's percentage (To Do only knows the status), phone kinds other than
work/home/cell, and invitations — Graph sends them whenever an event with attendees is
created, so without ``invitations`` the attendees are left off the server copy. Graph v1.0
cannot restore a cancelled occurrence: a series without attendees is created anew, one with
attendees is refused (restoring it would cancel and re-invite everyone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from serversync.connectors.graph import (
    ROLE_CALENDARS,
    ROLE_CONTACTS,
    ROLE_TASKS,
    EtagConflict,
    GraphClient,
    StaleDelta,
)
from serversync.connectors.graph_recurrence import (
    INSTANCE_FIELDS,
    Series,
    Values,
    Window,
    check_occurrences,
    check_start,
    default_values,
    iana_zone,
    instance_values,
    instant,
    iso,
    pattern_of,
    read_instances,
    recurrence_json,
    series_of,
    when,
    window,
    windows_zone,
    zone_info,
    zoned,
)
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
    Moment,
    Phone,
    PostalAddress,
    Record,
    Response,
    Task,
    TaskStatus,
    content_hash,
)
from serversync.core.errors import ItemError, NotFound, PermanentError
from serversync.core.model import Profile
from serversync.core.recurrence import from_rrule, local_start, starts, to_rrule
from serversync.core.rules import Login

UID_PROPERTY = "String {2f6b3b1e-7c54-4c1e-9a0e-5e9b5b0c8a11} Name serversync-uid"
UTC = {"Prefer": 'outlook.timezone="UTC"'}
_EXPAND = {"$expand": f"singleValueExtendedProperties($filter=id eq '{UID_PROPERTY}')"}
_SHOW_AS = {BusyStatus.BUSY: "busy", BusyStatus.FREE: "free", BusyStatus.TENTATIVE: "tentative",
            BusyStatus.OUT_OF_OFFICE: "oof"}
_RESPONSES = {"accepted": Response.ACCEPTED, "declined": Response.DECLINED,
              "tentativelyAccepted": Response.TENTATIVE}
_ADDRESS_FIELDS = {"work": "businessAddress", "home": "homeAddress", "other": "otherAddress"}
COLLECTIONS = {ItemKind.APPOINTMENT: "/events", ItemKind.CONTACT: "/contacts"}
EXTENSION = "org.serversync.sync"  # open extension on To Do tasks carrying our UID
_TASK_STATUS = {TaskStatus.NOT_STARTED: "notStarted", TaskStatus.IN_PROGRESS: "inProgress",
                TaskStatus.COMPLETED: "completed", TaskStatus.CANCELLED: "deferred"}
_TIMING = ("start", "end", "isAllDay", "recurrence")  # a change here re-times the series


def _when(value: Mapping[str, Any] | None) -> dt.datetime | None:
    return when(value)


def _graph_time(moment: dt.datetime | dt.date) -> dict[str, str]:
    if not isinstance(moment, dt.datetime):
        moment = dt.datetime(moment.year, moment.month, moment.day, tzinfo=dt.UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return {"dateTime": moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "timeZone": "UTC"}


def _uid(item: Mapping[str, Any]) -> str:
    for prop in item.get("singleValueExtendedProperties") or []:
        if str(prop.get("id", "")).lower() == UID_PROPERTY.lower() and prop.get("value"):
            return str(prop["value"])
    for extension in item.get("extensions") or []:
        if extension.get("extensionName") == EXTENSION and extension.get("uid"):
            return str(extension["uid"])
    return str(item["id"])


# ---------------------------------------------------------------- records <-> JSON

def is_series(item: Mapping[str, Any]) -> bool:
    return bool(item.get("recurrence")) or item.get("type") == "seriesMaster"


def event_zone(item: Mapping[str, Any]) -> str:
    """The IANA zone an event keeps its times in: a series' recurrence time zone (the one
    Exchange expands it in), else the zone its start was created in.

    A series in a zone we cannot name (a legacy custom Outlook zone) is refused: its
    occurrences' wall-clock times are unknown. A single event keeps its instants and is
    read as UTC.
    """
    recurrence = item.get("recurrence") or {}
    names = [(recurrence.get("range") or {}).get("recurrenceTimeZone"),
             item.get("originalStartTimeZone")]
    for name in names:
        if not name:
            continue
        zone = iana_zone(str(name))
        if zone is not None:
            return zone
        if is_series(item):
            raise ItemError(f"the series is kept in the time zone {name!r}, which has no IANA "
                            "equivalent (a custom Outlook time zone?)",
                            code="unsupported-recurrence")
    return "UTC"


def _attendees(item: Mapping[str, Any]) -> tuple[Attendee, ...]:
    return tuple(Attendee(
        address=str(a.get("emailAddress", {}).get("address", "")).lower(),
        name=str(a.get("emailAddress", {}).get("name", "") or ""),
        role={"optional": AttendeeRole.OPTIONAL, "resource": AttendeeRole.RESOURCE}.get(
            str(a.get("type")), AttendeeRole.REQUIRED),
        response=_RESPONSES.get(str((a.get("status") or {}).get("response")),
                                Response.NEEDS_ACTION))
        for a in item.get("attendees") or [])


def event_record(item: Mapping[str, Any], instances: Sequence[Mapping[str, Any]] = (),
                 win: Window | None = None) -> Appointment:
    """An event as a record; a series needs its ``instances`` within ``win``."""
    return series_record(item, instances, win)[0] if is_series(item) else _single(item)


def _common(item: Mapping[str, Any]) -> dict[str, Any]:
    show_as = {v: k for k, v in _SHOW_AS.items()}.get(str(item.get("showAs")), BusyStatus.BUSY)
    return dict(
        uid=_uid(item), subject=str(item.get("subject") or ""),
        all_day=bool(item.get("isAllDay")),
        location=str((item.get("location") or {}).get("displayName") or ""),
        organizer=str(((item.get("organizer") or {}).get("emailAddress") or {})
                      .get("address") or "").lower(),
        attendees=_attendees(item),
        reminder_minutes=int(item.get("reminderMinutesBeforeStart") or 0)
        if item.get("isReminderOn") else None,
        busy=show_as,
        status=AppointmentStatus.CANCELLED if item.get("isCancelled")
        else AppointmentStatus.OPEN,
        body=str((item.get("body") or {}).get("content") or ""))


def _single(item: Mapping[str, Any]) -> Appointment:
    if item.get("type") in ("occurrence", "exception"):
        raise ItemError("an occurrence of a series is synced with its series master, not "
                        "on its own", code="unsupported-item")
    start, end = _when(item.get("start")), _when(item.get("end"))
    if start is None or end is None:
        raise ItemError("the event has no start or end", code="bad-item")
    zone = event_zone(item)
    tz = zone_info(zone)
    fields = _common(item)
    if fields["all_day"]:  # midnight in the zone it was entered in, whatever Prefer said
        return Appointment(start=start.astimezone(tz).date(), end=end.astimezone(tz).date(),
                           timezone=zone, **fields)
    return Appointment(start=start.astimezone(tz), end=end.astimezone(tz), timezone=zone,
                       **fields)


def series_record(item: Mapping[str, Any], instances: Sequence[Mapping[str, Any]],
                  win: Window | None,
                  ) -> tuple[Appointment, Series, dict[Moment, Mapping[str, Any]]]:
    """A series master and its instances as a record, its `Series` and the instances by
    original start."""
    if win is None:
        raise ItemError("a series is read with its instances", code="bad-item")
    zone = event_zone(item)
    series, start, end = series_of(item, zone)
    fields = _common(item)
    master = Values(start, end, fields["subject"], fields["location"], fields["body"])
    cancelled, changed, by_key = read_instances(series, master, instances, win)
    record = Appointment(start=start, end=end, timezone=zone, rrule=series.rrule,
                         cancelled_occurrences=cancelled, occurrences=changed, **fields)
    return record, series, by_key


def event_body(record: Appointment, *, invitations: bool) -> dict[str, Any]:
    """The event as Graph stores it, in the appointment's own time zone.

    A series must keep its zone (UTC would let daylight saving move its meetings): a zone
    without a Windows name is refused. A single event falls back to UTC.
    """
    windows = windows_zone(record.timezone)
    zone = record.timezone
    recurrence: dict[str, Any] | None = None
    if record.rrule:
        if windows is None:
            raise ItemError(f"appointment {record.uid}: the time zone {record.timezone!r} has "
                            "no Windows name Exchange knows, and a recurring series must keep "
                            "its zone", code="unsupported-recurrence")
        recurrence = recurrence_json(check_start(record), windows)
    elif record.occurrences or record.cancelled_occurrences:
        raise ItemError(f"appointment {record.uid}: changed or cancelled occurrences without "
                        "an RRULE", code="bad-item")
    if windows is None:
        zone, windows = "UTC", "UTC"
    body: dict[str, Any] = {
        "subject": record.subject, "body": {"contentType": "text", "content": record.body},
        "start": zoned(record.start, zone, windows), "end": zoned(record.end, zone, windows),
        "isAllDay": record.all_day, "location": {"displayName": record.location},
        "showAs": _SHOW_AS[record.busy],
        "isReminderOn": record.reminder_minutes is not None,
        "reminderMinutesBeforeStart": record.reminder_minutes or 0,
        "singleValueExtendedProperties": [{"id": UID_PROPERTY, "value": record.uid}]}
    if recurrence is not None:
        body["recurrence"] = recurrence
    if invitations:
        body["attendees"] = [{"emailAddress": {"address": a.address, "name": a.name},
                              "type": a.role.value} for a in record.attendees]
    return body


def occurrence_patch(series: Series, want: Values, have: Values) -> dict[str, Any]:
    """The properties of one occurrence that must change for it to show ``want``."""
    windows = windows_zone(series.zone) or "UTC"
    out: dict[str, Any] = {}
    if want.subject != have.subject:
        out["subject"] = want.subject
    if want.location != have.location:
        out["location"] = {"displayName": want.location}
    if want.body != have.body:
        out["body"] = {"contentType": "text", "content": want.body}
    if (series.instant(want.start), series.instant(want.end)) != (
            series.instant(have.start), series.instant(have.end)):
        out["start"] = zoned(want.start, series.zone, windows)
        out["end"] = zoned(want.end, series.zone, windows)
    return out


def task_record(item: Mapping[str, Any]) -> Task:
    due, start = _when(item.get("dueDateTime")), _when(item.get("startDateTime"))
    status = {v: k for k, v in _TASK_STATUS.items()}.get(str(item.get("status")),
                                                         TaskStatus.NOT_STARTED)
    return Task(
        uid=_uid(item), subject=str(item.get("title") or ""), due=due, start=start,
        status=status, percent_complete=100 if status is TaskStatus.COMPLETED else 0,
        priority={"high": 1, "low": 9}.get(str(item.get("importance")), 5),
        completed_at=_when(item.get("completedDateTime")),
        body=str((item.get("body") or {}).get("content") or ""),
        rrule=_task_rrule(item.get("recurrence"), due))


def _task_rrule(recurrence: Mapping[str, Any] | None, due: dt.datetime | None) -> str:
    """A To Do ``recurrence`` as an RRULE anchored on the due date (in the recurrence's zone,
    UTC unless it names another)."""
    if not recurrence:
        return ""
    if due is None:
        raise ItemError("a recurring To Do task has no due date", code="bad-item")
    name = (recurrence.get("range") or {}).get("recurrenceTimeZone") or "UTC"
    zone = iana_zone(str(name))
    if zone is None:
        raise ItemError(f"the task repeats in the time zone {name!r}, which has no IANA "
                        "equivalent", code="unsupported-recurrence")
    anchor = due.astimezone(zone_info(zone))
    rule = to_rrule(pattern_of(recurrence), anchor, zone)
    if next(starts(rule, anchor, zone), None) != anchor:
        raise ItemError(f"the task's due date {anchor.isoformat()} is not an occurrence of "
                        f"its recurrence ({rule})", code="unsupported-recurrence")
    return rule


def task_body(record: Task, *, update: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "title": record.subject, "body": {"contentType": "text", "content": record.body},
        "status": _TASK_STATUS[record.status],
        "importance": "high" if 1 <= record.priority <= 4 else "low"
        if record.priority >= 6 else "normal",
        "dueDateTime": _graph_time(record.due) if record.due is not None else None,
        "startDateTime": _graph_time(record.start) if record.start is not None else None}
    if record.completed_at is not None:
        body["completedDateTime"] = _graph_time(record.completed_at)
    if record.rrule:
        if record.due is None:
            raise ItemError(f"task {record.uid}: To Do repeats a task from its due date, and "
                            f"this one has none (RRULE {record.rrule})",
                            code="unsupported-recurrence")
        pattern = from_rrule(record.rrule, record.due, "UTC")
        first = next(starts(record.rrule, record.due, "UTC"), None)
        if first != local_start(record.due, "UTC"):
            raise ItemError(f"task {record.uid}: the due date is not an occurrence of RRULE "
                            f"{record.rrule}; To Do would move it", code="unsupported-recurrence")
        body["recurrence"] = recurrence_json(pattern, "UTC")
    elif update:
        body["recurrence"] = None  # a repeat removed in the application
    return body


def contact_record(item: Mapping[str, Any]) -> Contact:
    phones = [Phone("work", str(n)) for n in item.get("businessPhones") or []]
    phones += [Phone("home", str(n)) for n in item.get("homePhones") or []]
    if item.get("mobilePhone"):
        phones.append(Phone("cell", str(item["mobilePhone"])))
    addresses = []
    for kind, key in _ADDRESS_FIELDS.items():
        value = item.get(key) or {}
        if any(value.get(k) for k in ("street", "city", "state", "postalCode",
                                      "countryOrRegion")):
            addresses.append(PostalAddress(
                kind, str(value.get("street") or ""), str(value.get("city") or ""),
                str(value.get("state") or ""), str(value.get("postalCode") or ""),
                str(value.get("countryOrRegion") or "")))
    birthday = _when({"dateTime": item["birthday"]}) if item.get("birthday") else None
    return Contact(
        uid=_uid(item), full_name=str(item.get("displayName") or ""),
        given_name=str(item.get("givenName") or ""), family_name=str(item.get("surname") or ""),
        middle_name=str(item.get("middleName") or ""), prefix=str(item.get("title") or ""),
        suffix=str(item.get("generation") or ""),
        organization=str(item.get("companyName") or ""),
        job_title=str(item.get("jobTitle") or ""),
        emails=tuple(str(e.get("address", "")).lower()
                     for e in item.get("emailAddresses") or [] if e.get("address")),
        phones=tuple(phones), addresses=tuple(addresses),
        birthday=birthday.date() if birthday else None,
        notes=str(item.get("personalNotes") or ""))


def contact_body(record: Contact) -> dict[str, Any]:
    body: dict[str, Any] = {
        "displayName": record.full_name, "givenName": record.given_name,
        "surname": record.family_name, "middleName": record.middle_name,
        "title": record.prefix, "generation": record.suffix,
        "companyName": record.organization, "jobTitle": record.job_title,
        "emailAddresses": [{"address": e, "name": record.full_name} for e in record.emails[:3]],
        "businessPhones": [p.number for p in record.phones if p.kind == "work"],
        "homePhones": [p.number for p in record.phones if p.kind == "home"],
        "mobilePhone": next((p.number for p in record.phones if p.kind == "cell"), None),
        "personalNotes": record.notes,
        "birthday": f"{record.birthday.isoformat()}T00:00:00Z" if record.birthday else None,
        "singleValueExtendedProperties": [{"id": UID_PROPERTY, "value": record.uid}]}
    for address in record.addresses:
        key = _ADDRESS_FIELDS.get(address.kind, "otherAddress")
        body[key] = {"street": address.street, "city": address.city, "state": address.region,
                     "postalCode": address.postcode, "countryOrRegion": address.country}
    return body


# ---------------------------------------------------------------- the store

@dataclass(frozen=True, slots=True)
class EventState:
    """An event as the server holds it now: the master, our record of it, and for a series
    its `Series` and the instances read, by original start."""

    item: Mapping[str, Any]
    record: Appointment
    series: Series | None = None
    instances: Mapping[Moment, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    listed: tuple[Mapping[str, Any], ...] = ()

    @property
    def etag(self) -> str:
        return str(self.item.get("@odata.etag") or "")

    def raw(self) -> bytes:
        data = {**self.item, "instances": list(self.listed)} if self.series else self.item
        return json.dumps(data, sort_keys=True).encode()


class GraphItemStore:
    """`ItemStore` over Graph for one Exchange Online mailbox."""

    def __init__(self, profile: Profile, login: Login, options: ConnectOptions, *,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.graph = GraphClient(profile, login, options)
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))  # sets the instances window

    async def __aenter__(self) -> GraphItemStore:
        await self.graph.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.graph.__aexit__(*exc)

    async def collections(self, kinds: Sequence[ItemKind]) -> dict[ItemKind, ItemCollection]:
        found = {kind: ItemCollection(COLLECTIONS[kind], frozenset({kind}), kind.value)
                 for kind in kinds if kind in COLLECTIONS}
        if ItemKind.TASK in kinds:
            list_id = await self.graph.default_todo_list()
            found[ItemKind.TASK] = ItemCollection(
                f"/todo/lists/{urllib.parse.quote(list_id, safe='')}/tasks",
                frozenset({ItemKind.TASK}), "tasks")
        return found

    @staticmethod
    def _role(href: str) -> str:
        if href.startswith("/todo/"):
            return ROLE_TASKS
        return ROLE_CONTACTS if href.startswith("/contacts") else ROLE_CALENDARS

    @staticmethod
    def _record(href: str, item: Mapping[str, Any]) -> Record:
        if href.startswith("/todo/"):
            return task_record(item)
        return contact_record(item) if href.startswith("/contacts") else event_record(item)

    @staticmethod
    def _href(collection: ItemCollection, item_id: str) -> str:
        """Our href of an item: its collection path and Graph id (``/events/AAMk…``)."""
        return f"{collection.href}/{urllib.parse.quote(item_id, safe='')}"

    async def changes(self, collection: ItemCollection, token: str | None) -> ItemChanges:
        role = self._role(collection.href)
        if collection.href == "/events":
            listed: list[tuple[str, str]] = []
            url: str | None = "/events"
            params: dict[str, str] | None = {"$select": "id,changeKey,type", "$top": "100"}
            while url:
                response = await self.graph.request("GET", url, role=role, params=params)
                data = response.json()
                listed += [(self._href(collection, str(i["id"])),
                            str(i.get("@odata.etag") or i.get("changeKey") or ""))
                           for i in data.get("value", [])
                           # /events lists single events and series masters; an occurrence
                           # belongs to its master's record, never one of its own
                           if i.get("type") not in ("occurrence", "exception")]
                url, params = data.get("@odata.nextLink"), None
            return ItemChanges(None, listed, (), complete=True)
        changed: dict[str, str] = {}
        deleted: list[str] = []
        cursor, complete = token, token is None
        while True:
            try:
                page = (await self.graph.delta(f"{collection.href}/delta", cursor, role=role)
                        if collection.href.startswith("/todo/")
                        else await self.graph.contacts_delta(cursor))
            except StaleDelta:
                if cursor is None:
                    raise
                cursor, complete, changed, deleted = None, True, {}, []
                continue
            for item in page.items:
                href = self._href(collection, str(item["id"]))
                if "@removed" in item:
                    changed.pop(href, None)
                    deleted.append(href)
                else:
                    changed[href] = str(item.get("@odata.etag") or item.get("changeKey") or "")
            cursor = page.cursor
            if not page.more:
                break
        return ItemChanges(cursor, list(changed.items()), [] if complete else deleted,
                           complete=complete)

    async def get_many(self, collection: ItemCollection,
                       hrefs: Sequence[str]) -> list[FetchedItem]:
        out: list[FetchedItem] = []
        for href in hrefs:
            try:
                response = await self.graph.request(
                    "GET", href, role=self._role(href), headers=UTC,
                    params={"$expand": f"extensions($filter=id eq '{EXTENSION}')"}
                    if href.startswith("/todo/") else _EXPAND)
            except NotFound:
                continue  # deleted between listing and reading: the next sync sees it
            item = response.json()
            raw = json.dumps(item, sort_keys=True).encode()
            etag = str(item.get("@odata.etag") or "")
            try:
                if href.startswith("/events"):
                    state = await self._event_state(href, item)
                    out.append(FetchedItem(href, etag, state.raw(), state.record))
                    continue
                record = self._record(href, item)
            except NotFound:
                continue
            except (ItemError, ValueError, TypeError, KeyError) as exc:
                problem = exc.message if isinstance(exc, ItemError) else f"unreadable: {exc}"
                out.append(FetchedItem(href, etag, raw, None, problem))
                continue
            except PermanentError as exc:
                if exc.code != "graph-error":
                    raise
                out.append(FetchedItem(href, etag, raw, None, exc.message))
                continue
            out.append(FetchedItem(href, etag, raw, record))
        return out

    async def put(self, collection: ItemCollection, record: Record, *, href: str | None,
                  if_match: str | None, invitations: bool) -> WrittenItem:
        if isinstance(record, Appointment):
            return await self._put_event(collection, record, href=href, if_match=if_match,
                                         invitations=invitations)
        if isinstance(record, Contact):
            body = contact_body(record)
        else:
            body = task_body(record, update=href is not None)
        role = self._role(collection.href)
        try:
            if href is None:
                item = dict(await self.graph.create(collection.href, body, role=role))
                if isinstance(record, Task):
                    # todoTask has no extended properties: our UID goes in an open extension
                    extension = await self.graph.create(
                        f"{self._href(collection, str(item['id']))}/extensions",
                        {"@odata.type": "microsoft.graph.openTypeExtension",
                         "extensionName": EXTENSION, "uid": record.uid}, role=role)
                    item["extensions"] = [extension]
            else:
                item = dict(await self.graph.update(href, body, role=role, etag=if_match))
                if isinstance(record, Task):
                    item["extensions"] = [{"extensionName": EXTENSION, "uid": record.uid}]
        except EtagConflict as exc:
            raise PreconditionFailed(exc.message) from None
        written = self._record(collection.href, item)
        return WrittenItem(self._href(collection, str(item["id"])),
                           str(item.get("@odata.etag") or "") or None, content_hash(written))

    async def delete(self, href: str, *, if_match: str | None) -> None:
        try:
            await self.graph.request("DELETE", href, role=self._role(href), expect=(204,),
                                     headers={"If-Match": if_match} if if_match else None)
        except NotFound:
            return
        except EtagConflict as exc:
            raise PreconditionFailed(exc.message) from None

    # ------------------------------------------------------------ events and series

    async def _event(self, href: str) -> EventState:
        response = await self.graph.request("GET", href, role=ROLE_CALENDARS, headers=UTC,
                                            params=_EXPAND)
        return await self._event_state(href, response.json())

    async def _event_state(self, href: str, item: Mapping[str, Any]) -> EventState:
        if not is_series(item):
            return EventState(item, event_record(item))
        series, _, _ = series_of(item, event_zone(item))
        win = window(series, self.clock())
        listed = await self._instances(href, win.start, win.end)
        record, series, by_key = series_record(item, listed, win)
        return EventState(item, record, series, by_key, tuple(listed))

    async def _instances(self, href: str, start: dt.datetime, end: dt.datetime,
                         select: str = INSTANCE_FIELDS) -> list[Mapping[str, Any]]:
        """``GET /events/{id}/instances`` over [start, end), every page."""
        found: list[Mapping[str, Any]] = []
        url: str | None = f"{href}/instances"
        params: dict[str, str] | None = {"startDateTime": iso(start), "endDateTime": iso(end),
                                         "$select": select, "$top": "100"}
        while url:
            response = await self.graph.request("GET", url, role=ROLE_CALENDARS, headers=UTC,
                                                params=params)
            data = response.json()
            found += data.get("value", [])
            url, params = data.get("@odata.nextLink"), None
        return found

    async def _instance_id(self, href: str, series: Series, key: Moment,
                           known: Mapping[Moment, Mapping[str, Any]]) -> str:
        """The id of the occurrence originally at ``key``: from what was read, or looked up
        in a narrow window around its original start."""
        if key in known:
            return str(known[key]["id"])
        at = series.instant(key)
        day = dt.timedelta(days=1)
        for instance in await self._instances(href, at - day, at + series.duration + day,
                                              select="id,type,originalStart"):
            if series.key(instant(str(instance.get("originalStart") or ""))) == key:
                return str(instance["id"])
        raise ItemError(f"Graph lists no occurrence originally at {key.isoformat()}",
                        code="unsupported-recurrence")

    def _occurrence_href(self, instance_id: str) -> str:
        return f"/events/{urllib.parse.quote(instance_id, safe='')}"

    async def _put_event(self, collection: ItemCollection, record: Appointment, *,
                         href: str | None, if_match: str | None,
                         invitations: bool) -> WrittenItem:
        body = event_body(record, invitations=invitations)  # refuses what Exchange cannot say
        series = None
        if record.rrule:
            series = Series.of(record)
            check_occurrences(record, series, window(series, self.clock()))
        try:
            if href is None:
                return await self._create_event(collection, record, body, series)
            return await self._update_event(collection, record, body, series, href=href,
                                            if_match=if_match, invitations=invitations)
        except EtagConflict as exc:
            raise PreconditionFailed(exc.message) from None
        except PermanentError as exc:
            if exc.code != "graph-error":
                raise  # permissions, mailbox: the channel's problem, not this item's
            raise ItemError(f"appointment {record.uid}: Graph refused it ({exc.message})",
                            code="graph-refused") from None

    async def _create_event(self, collection: ItemCollection, record: Appointment,
                            body: Mapping[str, Any], series: Series | None) -> WrittenItem:
        response = await self.graph.request("POST", collection.href, role=ROLE_CALENDARS,
                                            expect=(201,), json_body=dict(body), headers=UTC)
        item = response.json()
        href = self._href(collection, str(item["id"]))
        if series is None:
            return WrittenItem(href, str(item.get("@odata.etag") or "") or None,
                               content_hash(event_record(item)))
        try:
            await self._apply_occurrences(href, record, series, None)
            state = await self._event(href)
        except BaseException:
            # half a series (its cancellations or changes missing) must not stay behind
            with contextlib.suppress(Exception):
                await self.graph.request("DELETE", href, role=ROLE_CALENDARS, expect=(204,))
            raise
        return WrittenItem(href, state.etag or None, content_hash(state.record))

    async def _update_event(self, collection: ItemCollection, record: Appointment,
                            body: Mapping[str, Any], series: Series | None, *, href: str,
                            if_match: str | None, invitations: bool) -> WrittenItem:
        try:
            state = await self._event(href)
        except NotFound:
            raise PreconditionFailed(f"{href} was deleted on the server") from None
        except ItemError as exc:
            raise ItemError(f"appointment {record.uid}: the server copy cannot be read, so it "
                            f"is not overwritten ({exc.message})", code=exc.code) from None
        if if_match and state.etag != if_match:
            raise PreconditionFailed(f"{href} changed on the server")
        now_body = event_body(state.record, invitations=invitations)
        patch = {k: v for k, v in body.items() if now_body.get(k) != v}
        if state.series is not None and "recurrence" not in body:
            patch["recurrence"] = None  # the application made the series a single event
        if set(_TIMING) & patch.keys():  # re-timing: Graph needs start, end and range together
            patch.update({k: body[k] for k in _TIMING if k in body})
        if series is not None and state.series is not None and not set(_TIMING) & patch.keys() \
                and self._restores(state, record, series):
            return await self._recreate(collection, record, body, series, state)
        if patch:
            response = await self.graph.request(
                "PATCH", href, role=ROLE_CALENDARS, json_body=patch,
                headers={**UTC, "If-Match": state.etag} if state.etag else UTC)
            if series is None:
                item = response.json()
                return WrittenItem(href, str(item.get("@odata.etag") or "") or None,
                                   content_hash(event_record(item)))
            state = await self._event(href)  # occurrences now show the master's new values
            if self._restores(state, record, series):
                return await self._recreate(collection, record, body, series, state)
        if series is not None and await self._apply_occurrences(href, record, series, state):
            state = await self._event(href)  # read back what the occurrences now say
        return WrittenItem(href, state.etag or None, content_hash(state.record))

    @staticmethod
    def _restores(state: EventState, record: Appointment, series: Series) -> bool:
        """Whether the server has cancelled an occurrence the application wants back."""
        wanted = {series.key(m) for m in record.cancelled_occurrences}
        return any(series.key(m) not in wanted for m in state.record.cancelled_occurrences)

    async def _recreate(self, collection: ItemCollection, record: Appointment,
                        body: Mapping[str, Any], series: Series,
                        state: EventState) -> WrittenItem:
        """Graph v1.0 cannot restore a cancelled occurrence: replace the series."""
        if state.record.attendees:
            raise ItemError(
                f"appointment {record.uid}: a cancelled occurrence is to be restored, which "
                "Graph cannot do, and recreating the meeting would send its attendees "
                "cancellations and new invitations; restore the occurrence in Outlook (or "
                "cancel it again in the application)", code="unsupported-recurrence")
        href = self._href(collection, str(state.item["id"]))
        await self.graph.request("DELETE", href, role=ROLE_CALENDARS, expect=(204,),
                                 headers={"If-Match": state.etag} if state.etag else None)
        return await self._create_event(collection, record, body, series)

    async def _apply_occurrences(self, href: str, record: Appointment, series: Series,
                                 state: EventState | None) -> int:
        """Cancel and change occurrences until the series shows ``record``'s; returns how many
        requests that took. ``state`` is the series as just read (None: just created)."""
        known: Mapping[Moment, Mapping[str, Any]] = state.instances if state else {}
        now_cancelled = ({series.key(m) for m in state.record.cancelled_occurrences}
                         if state else set())
        now_changed = ({series.key(o.recurrence_id) for o in state.record.occurrences}
                       if state else set())
        cancel = {series.key(m) for m in record.cancelled_occurrences}
        wanted = {series.key(o.recurrence_id): o for o in record.occurrences}
        requests = 0
        for key in sorted(cancel - now_cancelled, key=series.instant):
            instance_id = await self._instance_id(href, series, key, known)
            with contextlib.suppress(NotFound):
                await self.graph.request("DELETE", self._occurrence_href(instance_id),
                                         role=ROLE_CALENDARS, expect=(204,))
            requests += 1
        plain = {key: default_values(series, key, record.subject, record.location, record.body)
                 for key in (set(wanted) | now_changed) - cancel}
        for key in sorted(plain, key=series.instant):
            occurrence = wanted.get(key)
            want = plain[key] if occurrence is None else Values(
                occurrence.start, occurrence.end, occurrence.subject, occurrence.location,
                occurrence.body)
            have = instance_values(series, known[key]) if key in known else plain[key]
            change = occurrence_patch(series, want, have)
            if not change:
                continue
            instance_id = await self._instance_id(href, series, key, known)
            await self.graph.request("PATCH", self._occurrence_href(instance_id),
                                     role=ROLE_CALENDARS, json_body=change, headers=UTC)
            requests += 1
        return requests


def store(profile: Profile, login: Login, options: ConnectOptions) -> GraphItemStore:
    """The factory `serversync.wiring` registers for Exchange Online profiles."""
    return GraphItemStore(profile, login, options)
