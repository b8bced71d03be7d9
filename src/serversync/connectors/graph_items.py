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
  make events outside it look deleted. Items whose ETag we already hold are not read again.
* **Writes** carry ``If-Match`` with the ETag; 412 becomes `PreconditionFailed`. Times are
  written and read in UTC (``Prefer: outlook.timezone="UTC"``). Tasks go to the user's
  default To Do list.

Not mapped yet: recurring events and tasks (read as a problem, so the service quarantines
them; written as an `ItemError`), a task's percentage (To Do only knows the status), phone
kinds other than work/home/cell, and invitations — Graph sends them whenever an event with
attendees is created, so without ``invitations`` the attendees are left off the server copy.
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from serversync.connectors.graph import (
    ROLE_CALENDARS,
    ROLE_CONTACTS,
    ROLE_TASKS,
    EtagConflict,
    GraphClient,
    StaleDelta,
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
    Phone,
    PostalAddress,
    Record,
    Response,
    Task,
    TaskStatus,
    content_hash,
)
from serversync.core.errors import ItemError, NotFound
from serversync.core.model import Profile
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


def _when(value: Mapping[str, Any] | None) -> dt.datetime | None:
    if not value or not value.get("dateTime"):
        return None
    text = str(value["dateTime"]).rstrip("Z")
    if "." in text:
        head, _, fraction = text.partition(".")
        text = f"{head}.{fraction[:6]}"
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


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

def event_record(item: Mapping[str, Any]) -> Appointment:
    if item.get("recurrence") or item.get("type") in ("seriesMaster", "occurrence", "exception"):
        raise ItemError("recurring events are not synced over Microsoft Graph yet",
                        code="unsupported-item")
    start, end = _when(item.get("start")), _when(item.get("end"))
    if start is None or end is None:
        raise ItemError("the event has no start or end", code="bad-item")
    all_day = bool(item.get("isAllDay"))
    attendees = tuple(Attendee(
        address=str(a.get("emailAddress", {}).get("address", "")).lower(),
        name=str(a.get("emailAddress", {}).get("name", "") or ""),
        role={"optional": AttendeeRole.OPTIONAL, "resource": AttendeeRole.RESOURCE}.get(
            str(a.get("type")), AttendeeRole.REQUIRED),
        response=_RESPONSES.get(str((a.get("status") or {}).get("response")),
                                Response.NEEDS_ACTION))
        for a in item.get("attendees") or [])
    show_as = {v: k for k, v in _SHOW_AS.items()}.get(str(item.get("showAs")), BusyStatus.BUSY)
    return Appointment(
        uid=_uid(item), subject=str(item.get("subject") or ""),
        start=start.date() if all_day else start, end=end.date() if all_day else end,
        all_day=all_day, location=str((item.get("location") or {}).get("displayName") or ""),
        organizer=str(((item.get("organizer") or {}).get("emailAddress") or {})
                      .get("address") or "").lower(),
        attendees=attendees,
        reminder_minutes=int(item.get("reminderMinutesBeforeStart") or 0)
        if item.get("isReminderOn") else None,
        busy=show_as,
        status=AppointmentStatus.CANCELLED if item.get("isCancelled")
        else AppointmentStatus.OPEN,
        body=str((item.get("body") or {}).get("content") or ""))


def event_body(record: Appointment, *, invitations: bool) -> dict[str, Any]:
    if record.rrule or record.occurrences or record.cancelled_occurrences:
        raise ItemError(f"appointment {record.uid}: recurring appointments are not synced over "
                        "Microsoft Graph yet", code="unsupported-item")
    body: dict[str, Any] = {
        "subject": record.subject, "body": {"contentType": "text", "content": record.body},
        "start": _graph_time(record.start), "end": _graph_time(record.end),
        "isAllDay": record.all_day, "location": {"displayName": record.location},
        "showAs": _SHOW_AS[record.busy],
        "isReminderOn": record.reminder_minutes is not None,
        "reminderMinutesBeforeStart": record.reminder_minutes or 0,
        "singleValueExtendedProperties": [{"id": UID_PROPERTY, "value": record.uid}]}
    if invitations:
        body["attendees"] = [{"emailAddress": {"address": a.address, "name": a.name},
                              "type": a.role.value} for a in record.attendees]
    return body


def task_record(item: Mapping[str, Any]) -> Task:
    if item.get("recurrence"):
        raise ItemError("recurring tasks are not synced over Microsoft Graph yet",
                        code="unsupported-item")
    due, start = _when(item.get("dueDateTime")), _when(item.get("startDateTime"))
    status = {v: k for k, v in _TASK_STATUS.items()}.get(str(item.get("status")),
                                                         TaskStatus.NOT_STARTED)
    return Task(
        uid=_uid(item), subject=str(item.get("title") or ""), due=due, start=start,
        status=status, percent_complete=100 if status is TaskStatus.COMPLETED else 0,
        priority={"high": 1, "low": 9}.get(str(item.get("importance")), 5),
        completed_at=_when(item.get("completedDateTime")),
        body=str((item.get("body") or {}).get("content") or ""))


def task_body(record: Task) -> dict[str, Any]:
    body: dict[str, Any] = {
        "title": record.subject, "body": {"contentType": "text", "content": record.body},
        "status": _TASK_STATUS[record.status],
        "importance": "high" if 1 <= record.priority <= 4 else "low"
        if record.priority >= 6 else "normal",
        "dueDateTime": _graph_time(record.due) if record.due is not None else None,
        "startDateTime": _graph_time(record.start) if record.start is not None else None}
    if record.completed_at is not None:
        body["completedDateTime"] = _graph_time(record.completed_at)
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

class GraphItemStore:
    """`ItemStore` over Graph for one Exchange Online mailbox."""

    def __init__(self, profile: Profile, login: Login, options: ConnectOptions) -> None:
        self.graph = GraphClient(profile, login, options)

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
            params: dict[str, str] | None = {"$select": "id,changeKey", "$top": "100"}
            while url:
                response = await self.graph.request("GET", url, role=role, params=params)
                data = response.json()
                listed += [(self._href(collection, str(i["id"])),
                            str(i.get("@odata.etag") or i.get("changeKey") or ""))
                           for i in data.get("value", [])]
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
                record = self._record(href, item)
            except (ItemError, ValueError, TypeError, KeyError) as exc:
                problem = exc.message if isinstance(exc, ItemError) else f"unreadable: {exc}"
                out.append(FetchedItem(href, etag, raw, None, problem))
                continue
            out.append(FetchedItem(href, etag, raw, record))
        return out

    async def put(self, collection: ItemCollection, record: Record, *, href: str | None,
                  if_match: str | None, invitations: bool) -> WrittenItem:
        if isinstance(record, Contact):
            body = contact_body(record)
        elif isinstance(record, Appointment):
            body = event_body(record, invitations=invitations)
        else:
            body = task_body(record)
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


def store(profile: Profile, login: Login, options: ConnectOptions) -> GraphItemStore:
    """The factory `serversync.wiring` registers for Exchange Online profiles."""
    return GraphItemStore(profile, login, options)
